//! Builders for unit tests: events with every field empty but the few a test sets.

use crate::contract::{
    HttpEvent, HttpOutcome, NotificationEvent, Outcome, Process, RpcEvent, RpcType,
};
use std::sync::Arc;

pub fn process(service: &str, pid: u32, host: &str) -> Arc<Process> {
    Arc::new(Process {
        service: Some(service.into()),
        pid: Some(pid),
        host: host.into(),
    })
}

pub fn rpc_event(rpc_type: RpcType, topic: &str, method: &str) -> RpcEvent {
    RpcEvent {
        rpc_type,
        exchange: Arc::from("nova"),
        routing_key: topic.into(),
        topic: Arc::from(topic),
        server: None,
        method: Arc::from(method),
        namespace: None,
        version: None,
        msg_id: None,
        unique_id: None,
        reply_q: None,
        timeout_s: None,
        caller: None,
        callee: None,
        request_id: None,
        global_request_id: None,
        trace_context: None,
        t_publish: None,
        t_deliver: None,
        t_reply_publish: None,
        t_reply_deliver: None,
        outcome: Outcome::Ok,
        error: None,
        deliveries: 0,
        redeliveries: 0,
        heartbeats: 0,
        returns: 0,
        copies: Vec::new(),
    }
}

pub fn http_event(
    client: Arc<Process>,
    service: &str,
    method: &'static str,
    route: &str,
) -> HttpEvent {
    HttpEvent {
        client,
        user_agent: None,
        service: Some(Arc::from(service)),
        server: "10.0.0.2:8774".into(),
        method,
        route: Arc::from(route),
        path: route.into(),
        status: Some(200),
        t_request: 0.0,
        t_response: None,
        t_response_end: None,
        duration_s: None,
        request_id: None,
        global_request_id: None,
        trace_context: None,
        outcome: HttpOutcome::Ok,
        truncated: false,
        error: None,
    }
}

pub fn notification(
    publisher: Arc<Process>,
    event_type: &str,
    priority: &str,
    t: f64,
) -> NotificationEvent {
    NotificationEvent {
        publisher_id: "compute.host1".into(),
        event_type: event_type.into(),
        priority: priority.into(),
        exchange: "nova".into(),
        t,
        request_id: None,
        global_request_id: None,
        publisher: Some(publisher),
    }
}
