//! Request trees (and events that belong to none) → OTLP spans. Pure: packet times,
//! ids from `ids`, nothing from the exporter's clock.
//!
//! Each wire exchange becomes the spans a tracing backend expects from instrumented
//! services (OpenTelemetry semantic conventions for RPC, messaging and HTTP):
//!
//! * an RPC call: a CLIENT span on the caller (publish → reply delivered) and a SERVER
//!   span on the server (delivered → reply published), the server's parent the client;
//! * a cast or fanout: a PRODUCER span on the caller and one CONSUMER span per copy
//!   delivered (a fanout: one per queue), each a child of the producer;
//! * a REST exchange: a CLIENT span for the caller and a SERVER span for the API;
//! * a notification: an event on the span that sent it (a PRODUCER span of its own when
//!   nothing in the request sent it).
//!
//! What a tree links (a span's parent is the request the caller was handling when it
//! started it) becomes the parent of the caller's span: the SERVER or CONSUMER span of
//! that request in the caller's process. A span only ever covers what the wire showed: a
//! probe that saw a call delivered but not published emits its server span only.

use super::ids::{self, Role, SpanId, TraceId};
use crate::contract::{
    Event, HttpEvent, HttpOutcome, NotificationEvent, Outcome, Process, RpcEvent, RpcType,
    TraceContext,
};
use crate::openstack::services::{EXTERNAL, api_process};
use crate::trace::{self, RequestTree};
use crate::{FastMap as HashMap, FastSet};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::span::{Event as SpanEvent, Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use std::sync::Arc;

/// The process a span belongs to: its resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// `nova-conductor`, `neutron-server`, a client library, `external`, `unknown`.
    pub service: String,
    /// The address it was seen at (the wire carries no host name).
    pub host: String,
    pub pid: Option<u32>,
    /// An API's listening port (several APIs may share a host).
    pub port: Option<u16>,
}

impl Peer {
    fn of(p: &Option<Arc<Process>>) -> Peer {
        match p {
            Some(p) => Peer::process(p),
            None => Peer {
                service: "unknown".into(),
                host: "unknown".into(),
                pid: None,
                port: None,
            },
        }
    }

    fn process(p: &Process) -> Peer {
        Peer {
            service: p.service.clone().unwrap_or_else(|| "unknown".into()),
            host: p.host.clone(),
            pid: p.pid,
            port: None,
        }
    }
}

/// One span and whose it is.
#[derive(Debug, Clone)]
pub struct Built {
    pub peer: Peer,
    pub span: Span,
}

/// The spans of a judged request.
pub fn of_tree(tree: &RequestTree, out: &mut Vec<Built>) {
    let linked;
    let tree = if tree.linked {
        tree
    } else {
        linked = trace::build(tree.request_id.clone(), tree.spans.clone());
        &linked
    };
    let events: Vec<Option<&Event>> = tree.spans.iter().map(|s| s.event.as_deref()).collect();
    let (trace, _) = trace_of(
        &tree.request_id,
        tree.spans.iter().filter_map(|s| s.event.as_deref()),
    );
    let sides: Vec<Sides> = events
        .iter()
        .map(|e| e.map_or_else(Sides::default, sides))
        .collect();
    let mut em = Emitter::new(trace, out);
    let mut notes = Vec::new();
    for (i, s) in tree.spans.iter().enumerate() {
        let Some(ev) = events[i] else { continue };
        let parent = s
            .parent
            .and_then(|p| sides[p].handler_for(s.caller.as_deref()));
        let mut attrs = verdicts(tree, i);
        if s.inferred {
            attrs.push(kv_bool("stacktap.parent_inferred", true));
        }
        if let Some(p) = parent {
            em.caused(p, s.t_end.unwrap_or(s.t_start));
        }
        match ev {
            Event::Notification(n) => notes.push((parent, n.as_ref(), attrs)),
            _ => em.exchange(ev, &sides[i], parent, attrs),
        }
    }
    for (parent, n, attrs) in notes {
        em.notification(n, parent, attrs);
    }
    em.close();
}

/// The spans of an event no request id ties to any other (an RPC with no context, a REST
/// call without ids, a periodic notification): a trace of its own.
pub fn of_lone_event(ev: &Event, out: &mut Vec<Built>) {
    let root = match ev {
        Event::Rpc(e) => e.msg_id.clone().or_else(|| e.unique_id.clone()),
        Event::Http(e) => Some(http_key(e)),
        Event::Notification(n) => Some(notification_key(n)),
        Event::Chain(_) => None,
    };
    let Some(root) = root else { return };
    let (trace, _) = trace_of(&root, std::iter::once(ev));
    let mut em = Emitter::new(trace, out);
    match ev {
        Event::Notification(n) => em.notification(n, None, Vec::new()),
        _ => em.exchange(ev, &sides(ev), None, Vec::new()),
    }
    em.close();
}

/// The request's trace: the first context the services sent themselves (they already
/// hold spans in it), else the one its root id names.
fn trace_of<'a>(
    root: &str,
    events: impl Iterator<Item = &'a Event>,
) -> (TraceId, Option<TraceContext>) {
    let mut first: Option<(f64, TraceContext)> = None;
    for ev in events {
        if let Some((t, c)) = context_of(ev)
            && first.is_none_or(|(f, _)| t < f)
        {
            first = Some((t, c));
        }
    }
    match first {
        Some((_, c)) => (c.trace_id, Some(c)),
        None => (ids::trace_id(root), None),
    }
}

fn context_of(ev: &Event) -> Option<(f64, TraceContext)> {
    match ev {
        Event::Rpc(e) => Some((e.t_publish.or(e.t_deliver)?, e.trace_context?)),
        Event::Http(e) => Some((e.t_request, e.trace_context?)),
        _ => None,
    }
}

/// The ids of the spans one exchange becomes: the caller's, and the handler's (one per
/// consumer of a cast's copies), which is where what the handler did next hangs.
#[derive(Debug, Default)]
struct Sides {
    caller: Option<SpanId>,
    handlers: Vec<(Option<String>, SpanId)>,
}

impl Sides {
    /// Where a span started by `caller` while handling this exchange hangs: the handler
    /// span in the caller's process (a fanout has several), else the first handler, else
    /// the caller's own span.
    fn handler_for(&self, caller: Option<&str>) -> Option<SpanId> {
        self.handlers
            .iter()
            .find(|(svc, _)| svc.as_deref() == caller)
            .or(self.handlers.first())
            .map(|(_, id)| *id)
            .or(self.caller)
    }
}

fn sides(ev: &Event) -> Sides {
    match ev {
        Event::Rpc(e) if e.rpc_type == RpcType::Call => {
            let Some(key) = e.msg_id.as_deref().or(e.unique_id.as_deref()) else {
                return Sides::default();
            };
            Sides {
                caller: e
                    .t_publish
                    .map(|_| ids::span_id(Role::RpcClient, key, None)),
                handlers: e
                    .t_deliver
                    .map(|_| {
                        let svc = e.callee.as_ref().and_then(|p| p.service.clone());
                        (svc, ids::span_id(Role::RpcServer, key, None))
                    })
                    .into_iter()
                    .collect(),
            }
        }
        Event::Rpc(e) => {
            let Some(key) = e.unique_id.as_deref().or(e.msg_id.as_deref()) else {
                return Sides::default();
            };
            Sides {
                caller: e.t_publish.map(|_| ids::span_id(Role::Producer, key, None)),
                handlers: copies(e)
                    .map(|c| {
                        let svc = c.consumer.and_then(|p| p.service.clone());
                        (svc, ids::span_id(Role::Consumer, key, Some(&c.key)))
                    })
                    .collect(),
            }
        }
        Event::Http(e) => {
            let key = http_key(e);
            Sides {
                caller: Some(ids::span_id(Role::HttpClient, &key, None)),
                handlers: vec![(
                    Some(http_server(e).to_string()),
                    ids::span_id(Role::HttpServer, &key, None),
                )],
            }
        }
        Event::Notification(_) | Event::Chain(_) => Sides::default(),
    }
}

/// A cast's delivered copies: what names each (its queue and its consumer: a stream
/// queue has several readers), who got it, when.
fn copies(e: &RpcEvent) -> Box<dyn Iterator<Item = Copy<'_>> + '_> {
    if e.copies.is_empty() {
        // delivered but not itemised (more copies than are kept): the first one
        return Box::new(e.t_deliver.into_iter().map(|t| Copy {
            key: e.routing_key.to_string(),
            queue: &e.routing_key,
            consumer: e.callee.as_ref(),
            t,
        }));
    }
    Box::new(e.copies.iter().map(|c| {
        let queue = c.queue.as_deref().unwrap_or(&e.routing_key);
        // the consumer as every probe names it: its process, else its connection
        let who = match (&c.consumer.service, c.consumer.pid) {
            (Some(s), Some(pid)) => format!("{s}:{pid}@{}", c.consumer.host),
            _ => c.connection.to_string(),
        };
        Copy {
            key: format!("{queue}/{who}"),
            queue,
            consumer: Some(&c.consumer),
            t: c.t,
        }
    }))
}

/// One delivered copy of a cast.
struct Copy<'a> {
    /// What names its span: the queue and the consumer.
    key: String,
    queue: &'a str,
    consumer: Option<&'a Arc<Process>>,
    t: f64,
}

/// What names a REST exchange for its span ids: the callee's request id, with the method
/// and path; an exchange without one, by where and when it was seen.
fn http_key(e: &HttpEvent) -> String {
    match &e.request_id {
        Some(id) => format!("{id} {} {}", e.method, e.path),
        None => format!(
            "{}>{} {} {} @{}",
            e.client.host,
            e.server,
            e.method,
            e.path,
            ns(e.t_request)
        ),
    }
}

fn notification_key(n: &NotificationEvent) -> String {
    format!("{} {} @{}", n.publisher_id, n.event_type, ns(n.t))
}

fn http_server(e: &HttpEvent) -> &str {
    api_process(e.service.as_deref().unwrap_or("unknown"))
}

/// The verdicts on span `i` of a judged request, as attributes.
fn verdicts(tree: &RequestTree, i: usize) -> Vec<KeyValue> {
    let mut a = Vec::new();
    if i == tree.root {
        a.push(kv("stacktap.request.id", &tree.request_id));
        if let Some(s) = &tree.symptom {
            a.push(kv("stacktap.request.symptom", s));
        }
    }
    if tree.root_cause == Some(i) {
        a.push(kv_bool("stacktap.root_cause", true));
    }
    if tree.exhausted == Some(i) {
        a.push(kv_bool("stacktap.retries_exhausted", true));
    }
    if tree.attempts.contains(&i) {
        a.push(kv_bool("stacktap.failed_attempt", true));
    }
    if tree.masked.contains(&i) {
        a.push(kv_bool("stacktap.masked", true));
    }
    a
}

/// Seconds of packet time → the nanoseconds OTLP counts.
fn ns(t: f64) -> u64 {
    (t.max(0.0) * 1e9).round() as u64
}

/// One attribute.
pub(super) fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn kv(key: &str, v: &str) -> KeyValue {
    attr(key, Value::StringValue(v.into()))
}

fn kv_int(key: &str, v: i64) -> KeyValue {
    attr(key, Value::IntValue(v))
}

fn kv_f64(key: &str, v: f64) -> KeyValue {
    attr(key, Value::DoubleValue(v))
}

fn kv_bool(key: &str, v: bool) -> KeyValue {
    attr(key, Value::BoolValue(v))
}

fn opt(a: &mut Vec<KeyValue>, key: &str, v: Option<&str>) {
    if let Some(v) = v {
        a.push(kv(key, v));
    }
}

fn error(message: String) -> Option<Status> {
    Some(Status {
        message,
        code: StatusCode::Error as i32,
    })
}

/// A message no server took: its queue is the peer, so a backend that draws virtual
/// nodes (Tempo's service graph) draws the same edge as stacktap's graph.
fn undelivered_peer(e: &RpcEvent) -> KeyValue {
    kv("peer.service", &format!("queue:{}", e.topic))
}

/// RabbitMQ's destination as the conventions spell it: `exchange:routing key`.
fn destination(exchange: &str, routing_key: &str) -> String {
    match (exchange.is_empty(), routing_key.is_empty()) {
        (false, false) => format!("{exchange}:{routing_key}"),
        (false, true) => exchange.to_string(),
        (true, false) => routing_key.to_string(),
        (true, true) => "amq.default".into(),
    }
}

/// Builds the spans of one trace.
struct Emitter<'a> {
    trace: TraceId,
    out: &'a mut Vec<Built>,
    first: usize,
    /// Spans whose end the wire does not show (a consumer's processing, a call never
    /// answered): they end when the last thing they caused did.
    open_ended: FastSet<SpanId>,
    /// When the last thing each handler span caused ended.
    caused_until: HashMap<SpanId, f64>,
}

impl<'a> Emitter<'a> {
    fn new(trace: TraceId, out: &'a mut Vec<Built>) -> Emitter<'a> {
        let first = out.len();
        Emitter {
            trace,
            out,
            first,
            open_ended: FastSet::default(),
            caused_until: HashMap::default(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &mut self,
        peer: Peer,
        (id, parent): (SpanId, Option<SpanId>),
        kind: SpanKind,
        name: &str,
        (start, end): (f64, f64),
        attributes: Vec<KeyValue>,
        status: Option<Status>,
    ) {
        self.out.push(Built {
            peer,
            span: Span {
                trace_id: self.trace.to_vec(),
                span_id: id.to_vec(),
                parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
                // sampled; the parent, when there is one, is remote (another process)
                flags: 0x100 | if parent.is_some() { 0x200 } else { 0 },
                name: name.to_string(),
                kind: kind as i32,
                start_time_unix_nano: ns(start),
                end_time_unix_nano: ns(end.max(start)),
                attributes,
                status,
                ..Span::default()
            },
        });
    }

    /// The handler span `p` caused something that ran until `end`.
    fn caused(&mut self, p: SpanId, end: f64) {
        let e = self.caused_until.entry(p).or_insert(end);
        *e = e.max(end);
    }

    fn exchange(
        &mut self,
        ev: &Event,
        sides: &Sides,
        parent: Option<SpanId>,
        extra: Vec<KeyValue>,
    ) {
        let (parent, links) = self.joined(ev, parent);
        let at = self.out.len();
        match ev {
            Event::Rpc(e) if e.rpc_type == RpcType::Call => self.call(e, sides, parent, &extra),
            Event::Rpc(e) => self.cast(e, sides, parent, &extra),
            Event::Http(e) => self.http(e, sides, parent, &extra),
            Event::Notification(_) | Event::Chain(_) => {}
        }
        if let Some(b) = self.out.get_mut(at) {
            b.span.links = links;
        }
    }

    /// The parent a context the caller sent names, when it is in this trace (the span is
    /// the child of the service's own span); a context in another trace becomes a link.
    fn joined(&self, ev: &Event, parent: Option<SpanId>) -> (Option<SpanId>, Vec<Link>) {
        match context_of(ev) {
            Some((_, c)) if c.trace_id == self.trace => (Some(c.parent_span_id), Vec::new()),
            Some((_, c)) => (
                parent,
                vec![Link {
                    trace_id: c.trace_id.to_vec(),
                    span_id: c.parent_span_id.to_vec(),
                    flags: 0x100 | 0x200,
                    ..Link::default()
                }],
            ),
            None => (parent, Vec::new()),
        }
    }

    fn rpc_attrs(e: &RpcEvent, operation: &str, extra: &[KeyValue]) -> Vec<KeyValue> {
        let mut a = vec![
            kv("rpc.system.name", "oslo_messaging"),
            kv("rpc.method", operation),
            kv("messaging.system", "rabbitmq"),
            kv(
                "messaging.destination.name",
                &destination(&e.exchange, &e.routing_key),
            ),
        ];
        if !e.routing_key.is_empty() {
            a.push(kv(
                "messaging.rabbitmq.destination.routing_key",
                &e.routing_key,
            ));
        }
        opt(&mut a, "messaging.message.id", e.msg_id.as_deref());
        opt(&mut a, "oslo.messaging.unique_id", e.unique_id.as_deref());
        opt(&mut a, "oslo.messaging.reply_queue", e.reply_q.as_deref());
        opt(&mut a, "oslo.messaging.namespace", e.namespace.as_deref());
        opt(&mut a, "oslo.messaging.version", e.version.as_deref());
        opt(&mut a, "openstack.request_id", e.request_id.as_deref());
        opt(
            &mut a,
            "openstack.global_request_id",
            e.global_request_id.as_deref(),
        );
        a.push(kv("oslo.messaging.type", e.rpc_type.as_str()));
        a.push(kv("stacktap.outcome", e.outcome.as_str()));
        if let Some(t) = e.timeout_s {
            a.push(kv_f64("oslo.messaging.timeout_s", t));
        }
        if let Some(w) = e.queue_wait() {
            a.push(kv_f64("oslo.messaging.queue_wait_s", w));
        }
        if e.redeliveries > 0 {
            a.push(kv_int("oslo.messaging.redeliveries", e.redeliveries as i64));
        }
        a.extend_from_slice(extra);
        a
    }

    fn call(&mut self, e: &RpcEvent, sides: &Sides, parent: Option<SpanId>, extra: &[KeyValue]) {
        let op = format!("{}.{}", e.topic, e.method);
        let attrs = Self::rpc_attrs(e, &op, extra);
        let remote = e.error.as_ref().map(|r| {
            let text = match &r.message {
                Some(m) => format!("{}: {m}", r.class),
                None => r.class.clone(),
            };
            (r.class.clone(), text)
        });
        let (client_error, server_error) = match e.outcome {
            Outcome::RemoteError => {
                let (class, text) =
                    remote.unwrap_or_else(|| ("RemoteError".into(), "RemoteError".into()));
                (Some((class.clone(), text.clone())), Some((class, text)))
            }
            Outcome::Timeout | Outcome::LateReply => (
                Some((
                    "MessagingTimeout".into(),
                    format!(
                        "no reply from {} within {}s",
                        e.routing_key,
                        e.timeout_s.unwrap_or(0.0)
                    ),
                )),
                None,
            ),
            Outcome::Unroutable => (
                Some((
                    "Unroutable".into(),
                    "the broker returned the call (no queue)".into(),
                )),
                None,
            ),
            _ => (None, None),
        };
        let with_error = |mut a: Vec<KeyValue>, err: &Option<(String, String)>| {
            if let Some((class, _)) = err {
                a.push(kv("error.type", class));
            }
            a
        };
        if let (Some(id), Some(start)) = (sides.caller, e.t_publish) {
            let timed_out = matches!(e.outcome, Outcome::Timeout | Outcome::LateReply);
            let end = e
                .t_reply_deliver
                .filter(|_| !timed_out)
                .or_else(|| e.timeout_s.filter(|_| timed_out).map(|s| start + s))
                .or(e.t_reply_publish)
                .unwrap_or(start);
            let mut a = with_error(attrs.clone(), &client_error);
            a.push(kv("messaging.operation.type", "send"));
            a.push(kv("messaging.operation.name", "publish"));
            if e.t_deliver.is_none() {
                a.push(undelivered_peer(e));
            }
            if let Some(w) = e.reply_wait() {
                a.push(kv_f64("oslo.messaging.reply_wait_s", w));
            }
            let status = client_error.as_ref().and_then(|(_, m)| error(m.clone()));
            self.span(
                Peer::of(&e.caller),
                (id, parent),
                SpanKind::Client,
                &op,
                (start, end),
                a,
                status,
            );
        }
        if let (Some((_, id)), Some(start)) = (sides.handlers.first(), e.t_deliver) {
            let mut a = with_error(attrs, &server_error);
            a.push(kv("messaging.operation.type", "process"));
            a.push(kv("messaging.operation.name", "deliver"));
            if let Some(s) = e.server_time() {
                a.push(kv_f64("oslo.messaging.server_s", s));
            }
            let status = server_error.as_ref().and_then(|(_, m)| error(m.clone()));
            let end = e.t_reply_publish.unwrap_or(start);
            if e.t_reply_publish.is_none() {
                self.open_ended.insert(*id);
            }
            self.span(
                Peer::of(&e.callee),
                (*id, sides.caller.or(parent)),
                SpanKind::Server,
                &op,
                (start, end),
                a,
                status,
            );
        }
    }

    fn cast(&mut self, e: &RpcEvent, sides: &Sides, parent: Option<SpanId>, extra: &[KeyValue]) {
        let op = format!("{}.{}", e.topic, e.method);
        let attrs = Self::rpc_attrs(e, &op, extra);
        if let (Some(id), Some(t)) = (sides.caller, e.t_publish) {
            let mut a = attrs.clone();
            a.push(kv("messaging.operation.type", "send"));
            a.push(kv("messaging.operation.name", "publish"));
            if e.t_deliver.is_none() {
                a.push(undelivered_peer(e));
            }
            let status = if e.outcome == Outcome::Undelivered {
                a.push(kv("error.type", "Undelivered"));
                error(format!("no consumer took it from {}", e.routing_key))
            } else {
                None
            };
            self.span(
                Peer::of(&e.caller),
                (id, parent),
                SpanKind::Producer,
                &op,
                (t, t),
                a,
                status,
            );
        }
        for (c, (_, id)) in copies(e).zip(&sides.handlers) {
            let mut a = attrs.clone();
            a.push(kv("messaging.operation.type", "process"));
            a.push(kv("messaging.operation.name", "deliver"));
            a.push(kv("messaging.destination.subscription.name", c.queue));
            self.open_ended.insert(*id);
            self.span(
                c.consumer
                    .map_or_else(|| Peer::of(&None), |p| Peer::process(p)),
                (*id, sides.caller.or(parent)),
                SpanKind::Consumer,
                &op,
                (c.t, c.t),
                a,
                None,
            );
        }
    }

    fn http(&mut self, e: &HttpEvent, sides: &Sides, parent: Option<SpanId>, extra: &[KeyValue]) {
        let name = format!("{} {}", e.method, e.route);
        let (server_ip, server_port) = split_host_port(&e.server);
        let mut common = vec![kv("http.request.method", e.method)];
        if let Some(s) = e.status {
            common.push(kv_int("http.response.status_code", s as i64));
        }
        common.push(kv("server.address", server_ip));
        if let Some(p) = server_port {
            common.push(kv_int("server.port", p as i64));
        }
        opt(&mut common, "user_agent.original", e.user_agent.as_deref());
        opt(&mut common, "openstack.request_id", e.request_id.as_deref());
        opt(
            &mut common,
            "openstack.global_request_id",
            e.global_request_id.as_deref(),
        );
        opt(&mut common, "openstack.service.type", e.service.as_deref());
        if e.outcome != HttpOutcome::Ok {
            common.push(kv("stacktap.outcome", e.outcome.as_str()));
        }
        if e.truncated {
            common.push(kv_bool("stacktap.response_truncated", true));
        }
        common.extend_from_slice(extra);
        let start = e.t_request;
        let end = e.t_response_end.or(e.t_response).unwrap_or(start);
        let fault = e.error.as_ref().map(|f| match (&f.kind, &f.message) {
            (Some(k), Some(m)) => format!("{k}: {m}"),
            (Some(k), None) => k.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => String::new(),
        });
        let failed = |min: u16| {
            e.status.filter(|s| *s >= min).map(|s| {
                let text = fault.clone().filter(|f| !f.is_empty());
                (s.to_string(), text.unwrap_or_else(|| format!("HTTP {s}")))
            })
        };
        if let Some(id) = sides.caller {
            let mut a = common.clone();
            a.push(kv("url.template", &e.route));
            let err = failed(400);
            if let Some((code, _)) = &err {
                a.push(kv("error.type", code));
            }
            let peer = Peer {
                service: e.client.service.clone().unwrap_or_else(|| EXTERNAL.into()),
                host: e.client.host.clone(),
                pid: e.client.pid,
                port: None,
            };
            let status = err.and_then(|(_, m)| error(m));
            self.span(
                peer,
                (id, parent),
                SpanKind::Client,
                &name,
                (start, end),
                a,
                status,
            );
        }
        if let Some((_, id)) = sides.handlers.first() {
            let mut a = common;
            a.push(kv("http.route", &e.route));
            a.push(kv("url.path", &e.path));
            a.push(kv("url.scheme", "http"));
            a.push(kv("client.address", &e.client.host));
            let err = failed(500);
            if let Some((code, _)) = &err {
                a.push(kv("error.type", code));
            }
            let peer = Peer {
                service: http_server(e).to_string(),
                host: server_ip.to_string(),
                pid: None,
                port: server_port,
            };
            let status = err.and_then(|(_, m)| error(m));
            self.span(
                peer,
                (*id, sides.caller.or(parent)),
                SpanKind::Server,
                &name,
                (start, end),
                a,
                status,
            );
        }
    }

    /// A notification: an event on the span that sent it, if this trace has it; else a
    /// PRODUCER span of its own. An ERROR one marks the span that sent it failed.
    fn notification(
        &mut self,
        n: &NotificationEvent,
        parent: Option<SpanId>,
        extra: Vec<KeyValue>,
    ) {
        let error_priority = matches!(n.priority.as_str(), "ERROR" | "CRITICAL");
        let mut a = vec![
            kv("oslo.messaging.notification.priority", &n.priority),
            kv("oslo.messaging.notification.publisher_id", &n.publisher_id),
        ];
        opt(&mut a, "openstack.request_id", n.request_id.as_deref());
        a.extend(extra);
        let sender = parent.and_then(|p| {
            self.out[self.first..]
                .iter()
                .position(|b| b.span.span_id == p)
                .map(|i| self.first + i)
        });
        if let Some(i) = sender {
            let span = &mut self.out[i].span;
            span.events.push(SpanEvent {
                time_unix_nano: ns(n.t),
                name: n.event_type.clone(),
                attributes: a,
                dropped_attributes_count: 0,
            });
            if error_priority && span.status.is_none() {
                span.status = error(format!("notified {}", n.event_type));
            }
            return;
        }
        let id = ids::span_id(Role::Notification, &notification_key(n), None);
        a.push(kv("messaging.system", "rabbitmq"));
        a.push(kv("messaging.destination.name", &n.exchange));
        a.push(kv("messaging.operation.type", "send"));
        a.push(kv("messaging.operation.name", "publish"));
        let status = error_priority.then(|| format!("notified {}", n.event_type));
        self.span(
            Peer::of(&n.publisher),
            (id, parent),
            SpanKind::Producer,
            &n.event_type,
            (n.t, n.t),
            a,
            status.and_then(error),
        );
    }

    /// Open-ended spans end with the last thing they caused.
    fn close(self) {
        if self.open_ended.is_empty() {
            return;
        }
        for b in &mut self.out[self.first..] {
            if let Ok(id) = <SpanId>::try_from(b.span.span_id.as_slice())
                && self.open_ended.contains(&id)
                && let Some(end) = self.caused_until.get(&id)
            {
                b.span.end_time_unix_nano = b.span.end_time_unix_nano.max(ns(*end));
            }
        }
    }
}

/// `10.0.0.5:8774` / `[::1]:8774` → address and port.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse().ok(),
        ),
        _ => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{TraceContext, hex};
    use crate::testing::{http_event, notification, process, rpc_event};

    const R: &str = "req-0d7b6b5c-9f1e-4c36-8a1c-2f4e5d6c7b8a";

    fn tree(events: Vec<Event>) -> RequestTree {
        let spans = events
            .into_iter()
            .map(|ev| {
                let (_, mut s) = trace::span_of(&ev).expect("a span");
                s.event = Some(Arc::new(ev));
                s
            })
            .collect();
        trace::build(R.into(), spans)
    }

    fn spans_of(t: &RequestTree) -> Vec<Built> {
        let mut out = Vec::new();
        of_tree(t, &mut out);
        out
    }

    fn find<'a>(b: &'a [Built], service: &str, kind: SpanKind) -> &'a Span {
        &b.iter()
            .find(|b| b.peer.service == service && b.span.kind == kind as i32)
            .unwrap_or_else(|| panic!("no {kind:?} span in {service}"))
            .span
    }

    /// A user's POST to nova-api, which calls the conductor, which calls neutron.
    fn boot() -> Vec<Event> {
        let user = Arc::new(Process {
            service: Some("python-openstackclient".into()),
            pid: None,
            host: "10.0.0.1".into(),
        });
        let mut post = http_event(user, "nova", "POST", "/v2.1/servers");
        post.request_id = Some(R.into());
        post.t_response_end = Some(1.0);
        post.status = Some(202);
        let mut call = rpc_event(RpcType::Call, "conductor", "build");
        call.msg_id = Some("18c3aeba5d884884a9ea818660fd1abe".into());
        call.request_id = Some(R.into());
        call.caller = Some(process("nova-api", 10, "10.0.0.2"));
        call.callee = Some(process("nova-conductor", 20, "10.0.0.3"));
        (call.t_publish, call.t_deliver) = (Some(0.1), Some(0.11));
        (call.t_reply_publish, call.t_reply_deliver) = (Some(0.3), Some(0.31));
        let mut put = http_event(
            process("nova-conductor", 20, "10.0.0.3"),
            "neutron",
            "PUT",
            "/v2.0/ports/{id}",
        );
        put.server = "10.0.0.4:9696".into();
        put.request_id = Some("req-11111111-2222-3333-4444-555555555555".into());
        put.global_request_id = Some(R.into());
        (put.t_request, put.t_response_end) = (0.15, Some(0.2));
        put.status = Some(500);
        vec![
            Event::Http(Box::new(post)),
            Event::Rpc(Box::new(call)),
            Event::Http(Box::new(put)),
        ]
    }

    #[test]
    fn a_call_is_a_client_span_and_its_server_child_in_the_request_that_made_it() {
        let b = spans_of(&tree(boot()));
        assert_eq!(b.len(), 6);
        let trace = hex(&b[0].span.trace_id);
        assert_eq!(
            trace, "0d7b6b5c9f1e4c368a1c2f4e5d6c7b8a",
            "the request id is the trace id"
        );
        assert!(b.iter().all(|s| hex(&s.span.trace_id) == trace));
        let api = find(&b, "nova-api", SpanKind::Server);
        let client = find(&b, "nova-api", SpanKind::Client);
        let server = find(&b, "nova-conductor", SpanKind::Server);
        let to_neutron = find(&b, "nova-conductor", SpanKind::Client);
        let neutron = find(&b, "neutron-server", SpanKind::Server);
        assert_eq!(client.parent_span_id, api.span_id);
        assert_eq!(server.parent_span_id, client.span_id);
        assert_eq!(to_neutron.parent_span_id, server.span_id);
        assert_eq!(neutron.parent_span_id, to_neutron.span_id);
        assert_eq!(
            (client.start_time_unix_nano, client.end_time_unix_nano),
            (100_000_000, 310_000_000)
        );
        // the 500 is an error on both sides of the REST call; the user's 202 is not
        assert_eq!(
            neutron.status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert_eq!(
            to_neutron.status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert!(api.status.is_none());
        let user = find(&b, "python-openstackclient", SpanKind::Client);
        assert!(user.parent_span_id.is_empty());
        // ids repeat exactly
        let again = spans_of(&tree(boot()));
        let ids = |b: &[Built]| b.iter().map(|s| s.span.span_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&b), ids(&again));
    }

    #[test]
    fn a_context_the_services_sent_is_joined_not_replaced() {
        let mut events = boot();
        let ctx = TraceContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        if let Event::Rpc(c) = &mut events[1] {
            c.trace_context = Some(ctx);
        }
        let b = spans_of(&tree(events));
        assert!(
            b.iter()
                .all(|s| hex(&s.span.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let client = find(&b, "nova-api", SpanKind::Client);
        assert_eq!(
            hex(&client.parent_span_id),
            "00f067aa0ba902b7",
            "a child of nova-api's own span"
        );
        // a context from another trace is a link, not a parent
        let mut events = boot();
        if let Event::Http(p) = &mut events[2] {
            p.trace_context = Some(ctx);
        }
        if let Event::Rpc(c) = &mut events[1] {
            c.trace_context = TraceContext::from_osprofiler(
                "11111111-2222-3333-4444-555555555555",
                "66666666-7777-8888-9999-aaaaaaaaaaaa",
            );
        }
        let b = spans_of(&tree(events));
        let to_neutron = find(&b, "nova-conductor", SpanKind::Client);
        assert_eq!(
            hex(&to_neutron.trace_id),
            "11111111222233334444555555555555"
        );
        assert_eq!(to_neutron.links.len(), 1);
        assert_eq!(
            hex(&to_neutron.links[0].trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn a_fanout_has_a_consumer_span_per_copy_and_a_notification_lands_on_its_sender() {
        let mut f = rpc_event(RpcType::Fanout, "compute", "build_and_run_instance");
        f.unique_id = Some("2ca8e518e0514cd0a3f72626d9ad5aff".into());
        f.request_id = Some(R.into());
        f.caller = Some(process("nova-conductor", 20, "10.0.0.3"));
        f.t_publish = Some(1.0);
        f.t_deliver = Some(1.01);
        f.outcome = Outcome::NoReply;
        for (pid, port) in [(31, 40001), (32, 40002)] {
            f.copies.push(crate::contract::Delivery {
                queue: Some("compute_fanout_x".into()),
                consumer: process("nova-compute", pid, "10.0.0.5"),
                connection: crate::contract::Endpoint {
                    ip: "10.0.0.5".parse().unwrap(),
                    port,
                },
                t: 1.01,
            });
        }
        let mut n = notification(
            process("nova-compute", 31, "10.0.0.5"),
            "compute.instance.create.error",
            "ERROR",
            2.5,
        );
        n.request_id = Some(R.into());
        let b = spans_of(&tree(vec![
            Event::Rpc(Box::new(f)),
            Event::Notification(Box::new(n)),
        ]));
        let producer = find(&b, "nova-conductor", SpanKind::Producer);
        let consumers: Vec<&Built> = b
            .iter()
            .filter(|b| b.span.kind == SpanKind::Consumer as i32)
            .collect();
        assert_eq!(consumers.len(), 2);
        assert_ne!(consumers[0].span.span_id, consumers[1].span.span_id);
        assert!(
            consumers
                .iter()
                .all(|c| c.span.parent_span_id == producer.span_id)
        );
        // the notification: an event on the copy its publisher handled, which failed and
        // ran until then
        let sender = consumers.iter().find(|c| c.peer.pid == Some(31)).unwrap();
        assert_eq!(sender.span.events.len(), 1);
        assert_eq!(
            sender.span.status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert_eq!(sender.span.end_time_unix_nano, 2_500_000_000);
        assert_eq!(b.len(), 3, "no span of its own");
    }
}
