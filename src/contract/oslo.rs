//! What oslo.messaging put in a message, as a probe read it: the decoded request, reply
//! or notification and its ids (never `args`, `payload` or a `_context_*` secret).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcType {
    Call,
    Cast,
    Fanout,
}

impl RpcType {
    pub fn as_str(self) -> &'static str {
        match self {
            RpcType::Call => "call",
            RpcType::Cast => "cast",
            RpcType::Fanout => "fanout",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub rpc_type: RpcType,
    pub method: String,
    pub namespace: Option<String>,
    pub version: Option<String>,
    pub msg_id: Option<String>,
    pub reply_q: Option<String>,
    pub unique_id: Option<String>,
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
    /// `_timeout`: the call-monitor interval, not the RPC timeout (that is `expiration`).
    pub call_monitor_s: Option<f64>,
    /// The trace the caller is in (`_context_traceparent`, osprofiler's `trace_info`).
    pub trace_context: Option<super::TraceContext>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteError {
    pub class: String,
    pub module: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReplyPart {
    /// `ending: true`: the call's answer (result or failure).
    Final,
    /// `ending: false` with nothing in it: a call-monitor heartbeat.
    Heartbeat,
    /// oslo.messaging ≤ 2.x: payload without `ending`, then an empty `ending: true`.
    LegacyPayload,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub msg_id: String,
    pub unique_id: Option<String>,
    pub part: ReplyPart,
    pub failure: Option<RemoteError>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub publisher_id: String,
    pub event_type: String,
    pub priority: String,
    pub message_id: Option<String>,
    pub unique_id: Option<String>,
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Oslo {
    Request(Request),
    Reply(Reply),
    Notification(Notification),
}

/// Why a body could not be read as oslo.messaging; each is a counted anomaly kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOslo {
    NotJson,
    UnsupportedEnvelope,
    UnknownShape,
    CompressedUnsupported,
    BadCompression,
    /// A compressed body inflates past `amqp.max_body_bytes`.
    InflatedTooLarge,
}

impl NotOslo {
    pub const ALL: [NotOslo; 6] = [
        NotOslo::NotJson,
        NotOslo::UnsupportedEnvelope,
        NotOslo::UnknownShape,
        NotOslo::CompressedUnsupported,
        NotOslo::BadCompression,
        NotOslo::InflatedTooLarge,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            NotOslo::NotJson => "not_json",
            NotOslo::UnsupportedEnvelope => "unsupported_envelope",
            NotOslo::UnknownShape => "unknown_shape",
            NotOslo::CompressedUnsupported => "compressed_unsupported",
            NotOslo::BadCompression => "bad_compression",
            NotOslo::InflatedTooLarge => "inflated_too_large",
        }
    }
}
