//! The events stacktap emits (`--events-out`, one JSON object a line). Field names are the
//! public contract of DESIGN.md; unknown values are null, never invented.

use super::{RemoteError, RpcType, TraceContext};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A process on the other end of an AMQP connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Process {
    /// argv[0] from oslo.messaging's connection_name, e.g. `nova-compute`.
    pub service: Option<String>,
    pub pid: Option<u32>,
    /// The TCP peer address (connection_name carries no hostname).
    pub host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    RemoteError,
    Timeout,
    LateReply,
    NoReply,
    Unroutable,
    /// A cast or fanout no consumer ever received (within the settle window).
    Undelivered,
    /// This vantage point cannot tell: the view is partial (a probe on one node of a
    /// cluster) and the answer or the delivery may have gone through another node.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RemoteError => "remote_error",
            Outcome::Timeout => "timeout",
            Outcome::LateReply => "late_reply",
            Outcome::NoReply => "no_reply",
            Outcome::Unroutable => "unroutable",
            Outcome::Undelivered => "undelivered",
            Outcome::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RpcEvent {
    #[serde(rename = "type")]
    pub rpc_type: RpcType,
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    pub topic: Arc<str>,
    pub server: Option<Arc<str>>,
    pub method: Arc<str>,
    pub namespace: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    pub msg_id: Option<String>,
    pub unique_id: Option<String>,
    pub reply_q: Option<String>,
    /// The caller's RPC timeout, from the request's AMQP `expiration`.
    pub timeout_s: Option<f64>,
    pub caller: Option<Arc<Process>>,
    pub callee: Option<Arc<Process>>,
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
    /// The trace the caller said it is in (`_context_traceparent`, osprofiler's
    /// `trace_info` ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
    pub t_publish: Option<f64>,
    pub t_deliver: Option<f64>,
    pub t_reply_publish: Option<f64>,
    pub t_reply_deliver: Option<f64>,
    pub outcome: Outcome,
    pub error: Option<RemoteError>,
    /// Copies delivered (a fanout: one per consumer queue, or stream consumer).
    pub deliveries: u32,
    /// Copies the broker redelivered to another consumer, or a consumer read again.
    pub redeliveries: u32,
    /// Call-monitor heartbeats (`ending: false` replies) seen.
    pub heartbeats: u32,
    /// Reply publishes the broker returned (312 NO_ROUTE retries).
    pub returns: u32,
    /// A cast's or fanout's copies as they reached their consumers (for the graph and the
    /// spans; not an event field: `deliveries` counts them).
    #[serde(skip)]
    pub copies: Vec<Delivery>,
}

/// One copy of a cast or fanout delivered to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The queue it was consumed from, when its consumer was seen registered.
    pub queue: Option<String>,
    pub consumer: Arc<Process>,
    /// The consumer's end of its AMQP connection.
    pub connection: super::Endpoint,
    pub t: f64,
}

impl RpcEvent {
    pub fn reply_wait(&self) -> Option<f64> {
        Some(self.t_reply_deliver? - self.t_publish?)
    }
    pub fn queue_wait(&self) -> Option<f64> {
        Some(self.t_deliver? - self.t_publish?)
    }
    pub fn server_time(&self) -> Option<f64> {
        Some(self.t_reply_publish? - self.t_deliver?)
    }
    pub fn reply_transit(&self) -> Option<f64> {
        Some(self.t_reply_deliver? - self.t_reply_publish?)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NotificationEvent {
    pub publisher_id: String,
    pub event_type: String,
    pub priority: String,
    pub exchange: String,
    pub t: f64,
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
    pub publisher: Option<Arc<Process>>,
}

/// What became of a REST request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpOutcome {
    /// A final status below 400.
    Ok,
    ClientError,
    ServerError,
    /// The connection or the capture ended first.
    NoResponse,
    /// The capture lost the response (a gap) or it was not HTTP.
    ResponseLost,
}

impl HttpOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpOutcome::Ok => "ok",
            HttpOutcome::ClientError => "client_error",
            HttpOutcome::ServerError => "server_error",
            HttpOutcome::NoResponse => "no_response",
            HttpOutcome::ResponseLost => "response_lost",
        }
    }
}

/// The fault a REST error body names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The fault's name: nova's key (`badRequest`), neutron's `type`, keystone's title.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub message: Option<String>,
}

/// One REST exchange. Credentials (tokens, cookies, Authorization, request bodies) are
/// never read into it.
#[derive(Debug, Clone, Serialize)]
pub struct HttpEvent {
    /// The caller; `service` is `external` when nothing names it.
    pub client: Arc<Process>,
    pub user_agent: Option<String>,
    /// The service type called (`neutron`), by port or path prefix; null if unknown.
    pub service: Option<Arc<str>>,
    /// The listening address.
    pub server: Arc<str>,
    pub method: &'static str,
    pub route: Arc<str>,
    /// The request path, without the query string.
    pub path: String,
    pub status: Option<u16>,
    pub t_request: f64,
    /// First byte of the final response.
    pub t_response: Option<f64>,
    pub t_response_end: Option<f64>,
    /// Request start to response end, when the whole response was seen.
    pub duration_s: Option<f64>,
    /// The callee's own id (`x-openstack-request-id` returned).
    pub request_id: Option<String>,
    /// The id the caller sent (`X-OpenStack-Request-ID`): its global request id.
    pub global_request_id: Option<String>,
    /// The trace the caller said it is in (`traceparent`, osprofiler's `X-Trace-Info`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
    pub outcome: HttpOutcome,
    /// The response body was cut by a capture gap or a closed connection.
    pub truncated: bool,
    /// The fault an error body names.
    pub error: Option<Fault>,
}

/// One line of `--events-out`, tagged by `kind`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Rpc(Box<RpcEvent>),
    Notification(Box<NotificationEvent>),
    Http(Box<HttpEvent>),
    Chain(Box<ChainEvent>),
}

/// One hop of a chain.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Hop {
    pub service: Option<String>,
    pub operation: String,
    pub error: Option<String>,
    pub message: Option<String>,
    pub t: f64,
    pub propagation: Option<String>,
    /// The ids to grep the service's log for: its request id (REST: the one it returned;
    /// RPC: the caller's context), and an RPC's `_msg_id` and `_unique_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
}

/// `kind: chain`: from the failure the user saw down to its root cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainEvent {
    /// The request's root id (what every span of it shares).
    pub request_id: String,
    /// What the user saw: http_5xx, http_4xx, resource_error, never_completed,
    /// async_failure.
    pub symptom: String,
    pub origin: Hop,
    pub root: Hop,
    pub hops: Vec<Hop>,
    /// When the failure that surfaced was a retry that ran out (a reschedule that found no
    /// host left): the failures of the attempts before it, oldest first. The root is the
    /// newest of them; `hops` runs down to the retry that ran out, then to the root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Hop>,
    /// The root was found by time alone somewhere on its path (an unnamed caller).
    pub inferred: bool,
}
