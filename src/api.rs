//! The serialised forms of the HTTP API (`/api/requests/{id}`, `/api/chains`) and of
//! the store (`--store`): a schema of their own, apart from the analyser's internal
//! types, so that a rename inside stacktap breaks neither a stored database nor
//! `stacktap rca --from` against another version. Chains are the contract's
//! `ChainEvent`, already public in `--events-out`. Changes here are additive only.

use crate::trace;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The schema version written with every stored row.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    Http,
    Call,
    Cast,
    Fanout,
    Notification,
}

/// How a span failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Exception class, fault type or `HTTP 500`.
    pub error: String,
    pub message: Option<String>,
    /// How the failure left the span: rest_error_response, rpc_failure_reply,
    /// rpc_timeout, rpc_unroutable, cast_undelivered.
    pub propagation: String,
}

/// One REST exchange, RPC or notification of a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Span {
    pub kind: SpanKind,
    /// Who made it: a process, a client library or tool, `external`.
    pub caller: Option<String>,
    /// Who handled it: the RPC server's process, the API's process, the publisher.
    pub handler: Option<String>,
    /// `POST /v2.1/servers`, `compute.build_and_run_instance`, an event type.
    pub operation: String,
    pub t_start: f64,
    /// When the handler was done, if the wire shows it.
    pub t_end: Option<f64>,
    pub status: Option<u16>,
    pub failure: Option<Failure>,
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    /// The parent (an index into the request's spans).
    pub parent: Option<usize>,
    /// The parent was chosen by time alone.
    pub inferred: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub error_notification: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

/// A request's tree and what became of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tree {
    pub request_id: String,
    pub spans: Vec<Span>,
    pub root: usize,
    pub user: bool,
    pub failed: Vec<usize>,
    pub masked: Vec<usize>,
    pub root_cause: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<usize>,
    pub symptom: Option<String>,
    pub t_first: f64,
    pub t_last: f64,
}

impl From<trace::SpanKind> for SpanKind {
    fn from(k: trace::SpanKind) -> SpanKind {
        match k {
            trace::SpanKind::Http => SpanKind::Http,
            trace::SpanKind::Call => SpanKind::Call,
            trace::SpanKind::Cast => SpanKind::Cast,
            trace::SpanKind::Fanout => SpanKind::Fanout,
            trace::SpanKind::Notification => SpanKind::Notification,
        }
    }
}

impl From<&trace::Span> for Span {
    fn from(s: &trace::Span) -> Span {
        Span {
            kind: s.kind.into(),
            caller: s.caller.clone(),
            handler: s.handler.clone(),
            operation: s.operation.clone(),
            t_start: s.t_start,
            t_end: s.t_end,
            status: s.status,
            failure: s.failure.as_ref().map(|f| Failure {
                error: f.error.clone(),
                message: f.message.clone(),
                propagation: f.propagation.clone(),
            }),
            request_id: s.request_id.clone(),
            global_request_id: s.global_request_id.clone(),
            msg_id: s.msg_id.clone(),
            unique_id: s.unique_id.clone(),
            parent: s.parent,
            inferred: s.inferred,
            error_notification: s.error_notification,
            superseded: s.superseded,
        }
    }
}

impl From<&trace::RequestTree> for Tree {
    /// The tree as linked (a tree kept unlinked is linked here).
    fn from(t: &trace::RequestTree) -> Tree {
        let linked;
        let t = if t.linked {
            t
        } else {
            linked = trace::build(t.request_id.clone(), t.spans.clone());
            &linked
        };
        Tree {
            request_id: t.request_id.clone(),
            spans: t.spans.iter().map(Span::from).collect(),
            root: t.root,
            user: t.user,
            failed: t.failed.clone(),
            masked: t.masked.clone(),
            root_cause: t.root_cause,
            exhausted: t.exhausted,
            attempts: t.attempts.clone(),
            symptom: t.symptom.clone(),
            t_first: t.t_first,
            t_last: t.t_last,
        }
    }
}

/// One root cause: every chain that ended at the same service, operation and error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootCause {
    pub service: Option<String>,
    pub operation: String,
    pub error: Option<String>,
    /// The last message seen for it.
    pub message: Option<String>,
    /// User requests it broke.
    pub requests: u64,
    pub first_seen: f64,
    pub last_seen: f64,
    pub example_request_id: String,
    /// How users saw it: "resource_error via compute.instance.create.error" → count.
    pub seen_as: BTreeMap<String, u64>,
    /// The services the failure crossed on its way up (from the example chain).
    pub path: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RcaReport {
    pub failed_requests: u64,
    pub masked_failures: u64,
    pub first: Option<f64>,
    pub last: Option<f64>,
    pub roots: Vec<RootCause>,
}
