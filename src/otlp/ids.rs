//! Trace and span ids that need no coordination: derived from what the wire carries, so
//! two probes (or two replays) that see the same traffic give the same ids, and a tracing
//! backend joins what they sent into one trace. The derivation is a contract, like the
//! metric names (ARCHITECTURE.md, "Span ids"): changing it splits traces across versions.
//!
//! * Trace id: the 16 bytes of the request's root id when it is `req-<uuid>` (or a bare
//!   UUID), so a request id pasted into a backend's search finds the trace; any other root
//!   id is hashed. A context the services sent themselves (`traceparent`, osprofiler's
//!   ids) wins over both: stacktap's spans then join the services' own trace.
//! * Span id: xxh3-64 of `stacktap/1/<role>/<key>` (big-endian), where the key is what
//!   names the span on the wire: an RPC call's `_msg_id`, a cast's `_unique_id` (and the
//!   queue, for each delivered copy), a REST exchange's `x-openstack-request-id` with its
//!   method and path. Never all zero.

use crate::contract::uuid_bytes;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// Which span of an exchange an id is for: the two sides of one call get different ids
/// from the same `_msg_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    RpcClient,
    RpcServer,
    Producer,
    Consumer,
    HttpClient,
    HttpServer,
    Notification,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::RpcClient => "rpc.client",
            Role::RpcServer => "rpc.server",
            Role::Producer => "rpc.producer",
            Role::Consumer => "rpc.consumer",
            Role::HttpClient => "http.client",
            Role::HttpServer => "http.server",
            Role::Notification => "notification",
        }
    }
}

/// The trace of a request, from its root id.
pub fn trace_id(root: &str) -> TraceId {
    let uuid = root.strip_prefix("req-").unwrap_or(root);
    if let Some(b) = uuid_bytes(uuid).filter(|b| *b != [0; 16]) {
        return b;
    }
    let h = xxh3_128(format!("stacktap/1/trace/{root}").as_bytes()).to_be_bytes();
    if h == [0; 16] { [1; 16] } else { h }
}

/// The span `role` of the exchange named by `key` (and `part`, when one exchange has
/// several spans of one role: a cast's copies).
pub fn span_id(role: Role, key: &str, part: Option<&str>) -> SpanId {
    let text = match part {
        Some(p) => format!("stacktap/1/{}/{key}/{p}", role.as_str()),
        None => format!("stacktap/1/{}/{key}", role.as_str()),
    };
    let h = xxh3_64(text.as_bytes()).to_be_bytes();
    if h == [0; 8] { [1; 8] } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::hex;

    #[test]
    fn a_request_id_is_its_trace_id() {
        let t = trace_id("req-0d7b6b5c-9f1e-4c36-8a1c-2f4e5d6c7b8a");
        assert_eq!(hex(&t), "0d7b6b5c9f1e4c368a1c2f4e5d6c7b8a");
        assert_eq!(trace_id("0d7b6b5c9f1e4c368a1c2f4e5d6c7b8a"), t);
        // anything else is hashed, deterministically, never zero
        let other = trace_id("my-own-id");
        assert_eq!(other, trace_id("my-own-id"));
        assert_ne!(other, [0; 16]);
        assert_ne!(
            trace_id("req-00000000-0000-0000-0000-000000000000"),
            [0; 16]
        );
    }

    #[test]
    fn span_ids_differ_by_role_and_part_and_repeat_exactly() {
        let m = "18c3aeba5d884884a9ea818660fd1abe";
        let c = span_id(Role::RpcClient, m, None);
        assert_eq!(c, span_id(Role::RpcClient, m, None));
        assert_ne!(c, span_id(Role::RpcServer, m, None));
        assert_ne!(
            span_id(Role::Consumer, m, Some("q1")),
            span_id(Role::Consumer, m, Some("q2"))
        );
        // pinned: the derivation is a contract
        assert_eq!(
            hex(&c),
            hex(&xxh3_64(format!("stacktap/1/rpc.client/{m}").as_bytes()).to_be_bytes())
        );
    }
}
