//! Observations: what a probe saw on the wire, for the analyser. The seam between
//! probing (packets → observations, on the node that sees the packets) and analysing
//! (observations from one probe or many → events, trees, chains, metrics). In one process
//! they pass by value; between a probe and a collector they travel as OTLP log records
//! (`src/fleet/wire.rs`).
//!
//! An observation carries what one vantage point can know and no judgement: a message
//! published, delivered or returned with its ids, a connection naming its process, a REST
//! exchange with its templated route. Secrets never enter one (the oslo data holds no
//! `_context_*` value but the two request ids; an HTTP exchange no header but the
//! User-Agent and the request ids).

use super::{Endpoint, Fault, NotOslo, Oslo, TraceContext};
use crate::time::Ts;
use std::sync::Arc;

/// One TCP connection, named the same by every probe that sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub client: Endpoint,
    pub server: Endpoint,
}

/// Something a probe saw at packet time `t`.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub t: Ts,
    pub what: Obs,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Obs {
    /// An AMQP client named itself (connection.start-ok; the credentials are not read).
    AmqpIdentified {
        conn: ConnId,
        /// oslo.messaging's `<argv0>:<pid>:<uuid>`, or whatever the client sent.
        connection_name: Option<String>,
        product: Option<String>,
    },
    AmqpMessage(Box<AmqpMessage>),
    /// channel.close or connection.close.
    AmqpClosed {
        conn: ConnId,
        channel: bool,
        reply_code: u16,
        by_broker: bool,
    },
    /// connection.blocked from the broker (a resource alarm).
    AmqpBlocked {
        conn: ConnId,
    },
    /// basic.cancel from the broker: a consumer's queue was deleted or failed over.
    AmqpConsumerCancelled {
        conn: ConnId,
        queue: Option<String>,
    },
    /// The TCP connection is gone.
    AmqpGone {
        conn: ConnId,
    },
    Http(Box<HttpObs>),
    /// Nothing else to say: the probe's packet clock reached `t` (a live capture's idle
    /// tick, or a batch's end). Lets time pass where a probe is quiet.
    Tick,
    /// The probe's own health so far (cumulative), now and then.
    ProbeStats(ProbeStats),
    /// The probe's input ended (a replay's last packet, a capture stopped): it will send
    /// nothing more, and is no longer waited for.
    End,
}

/// What a probe counted of its own work, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeStats {
    pub packets: u64,
    pub bytes: u64,
    /// Packets the kernel or the interface dropped (live capture).
    pub drops: u64,
    pub tcp_gap_bytes: u64,
    pub anomalies: u64,
    pub evictions: u64,
    /// Observations the probe could not send (its send buffer was full).
    pub unsent: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmqpKind {
    Publish {
        mandatory: bool,
    },
    Deliver {
        redelivered: bool,
    },
    GetOk {
        redelivered: bool,
    },
    /// The broker gave an unroutable mandatory message back (312 NO_ROUTE, …).
    Return {
        reply_code: u16,
    },
}

/// One whole AMQP message (method, header, body) and what oslo.messaging put in it.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpMessage {
    pub conn: ConnId,
    pub kind: AmqpKind,
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    /// A delivery's queue, when its consumer tag was seen registered.
    pub queue: Option<Arc<str>>,
    /// The AMQP `expiration` property as sent (a call's timeout in ms).
    pub expiration: Option<String>,
    /// A stream queue's offset of this delivery (`x-stream-offset`).
    pub stream_offset: Option<i64>,
    /// A quorum queue's redelivery count (`x-delivery-count`).
    pub delivery_count: Option<i64>,
    /// The body read as oslo.messaging (shared by a publish and its deliveries).
    pub oslo: Arc<Result<Oslo, NotOslo>>,
}

/// What became of a REST request's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpEnd {
    /// The whole response was seen.
    Complete,
    /// The response head was seen, part of its body was not.
    Truncated,
    /// A capture gap swallowed the response (or it was not HTTP).
    ResponseLost,
    /// The connection or the capture ended with no response.
    NoResponse,
}

/// One REST exchange with what the probe can tell alone: the service (by port or path
/// prefix), the route template, the fault of an error body. Who called is the analyser's
/// to say: it may take AMQP connections another probe saw.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpObs {
    pub client: Endpoint,
    pub server: Endpoint,
    /// A method label (`GET`, …, `OTHER`): see `method_label`.
    pub method: &'static str,
    /// The request path without the query string.
    pub path: String,
    /// The service type called, if the port or a path prefix names it.
    pub service: Option<Arc<str>>,
    /// The route template, before the analyser's cap on templates per service.
    pub route: String,
    pub user_agent: Option<String>,
    pub status: Option<u16>,
    pub t_request: Ts,
    pub t_response: Option<Ts>,
    pub t_response_end: Option<Ts>,
    pub end: HttpEnd,
    /// The callee's own id (`x-openstack-request-id` returned).
    pub request_id: Option<String>,
    /// The id the caller sent, when it is in oslo.middleware's format.
    pub global_request_id: Option<String>,
    /// The trace the caller said it is in (`traceparent`, osprofiler's `X-Trace-Info`).
    pub trace_context: Option<TraceContext>,
    pub fault: Option<Fault>,
}

/// Label values for the methods of RFC 9110 and WebDAV's common ones; others fold.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "COPY", "MOVE",
    "PROPFIND", "MKCOL", "LOCK", "UNLOCK",
];

/// A request method as a bounded label: a known method, else `OTHER`.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("OTHER")
}
