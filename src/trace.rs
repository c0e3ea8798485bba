//! Request trees and error-propagation chains.
//!
//! Every REST exchange, RPC and notification carries request ids (REST headers,
//! `_context_request_id` / `_context_global_request_id`). The id a user request's tree
//! shares is its root id: `global_request_id` when the caller sent one, else the local
//! `request_id` (oslo-wire.md §7: the callee's global id is the caller's local one). Spans
//! with one root id are collected until the request has been quiet for `settle_s` (packet
//! time), then linked by causality into a tree: a span's parent is the latest span, still
//! running when it started, whose handler is the span's caller (a process named by AMQP
//! or a keystoneauth User-Agent); a caller we cannot name links by time alone and is
//! marked inferred.
//!
//! A user request fails when its answer is a 5xx, a 4xx caused by a downstream fault, or
//! the resource it started ends in error (an ERROR notification, a failed RPC, a cast
//! nobody consumed). Its chain walks from that symptom down to the deepest failure not
//! masked by a successful retry: the root cause. A request whose failures were all masked
//! is reported as masked, not as a chain.

use crate::FastMap as HashMap;
pub use crate::contract::{ChainEvent, Hop};
use crate::contract::{Event, Outcome};
use crate::health::Health;
use crate::openstack::services::{api_process, is_user_side};
use crate::oslo::RpcType;
use crate::sink::requests::RequestsConfig;
use crate::time::Ts;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

/// Requests finished at the end of input between two hand-overs of their verdicts. A
/// short capture's end judges thousands at once (13,500 on the bench's `load`); handed
/// over in slices, the sinks (with `--threads`, on another core) take the first trees
/// while the rest are built, instead of waiting for all of them.
const FINISHED_PER_HAND: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Http,
    Call,
    Cast,
    Fanout,
    Notification,
}

/// One REST exchange, RPC or notification inside a request.
#[derive(Debug, Clone)]
pub struct Span {
    pub kind: SpanKind,
    /// Who made it: a process or service name, a client library, `external`.
    pub caller: Option<String>,
    /// Who handled it: the RPC server's process, the API's process, the publisher.
    pub handler: Option<String>,
    /// `POST /v2.1/servers`, `compute.build_and_run_instance`, an event type.
    pub operation: String,
    pub t_start: f64,
    /// When the handler started on it (RPC delivery, request start).
    pub t_handle: f64,
    /// When the handler was done, if the wire shows it (reply, response end).
    pub t_end: Option<f64>,
    /// HTTP status, when there is one.
    pub status: Option<u16>,
    /// How it failed (None: it did not, or we cannot tell).
    pub failure: Option<Failure>,
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
    /// The RPC's `_msg_id` (calls) and `_unique_id`: what its services logged.
    pub msg_id: Option<String>,
    pub unique_id: Option<String>,
    /// The parent in the tree (an index into the request's spans).
    pub parent: Option<usize>,
    /// The parent was chosen by time alone (the caller could not be named).
    pub inferred: bool,
    /// An ERROR (or CRITICAL) notification: the resource the request touched failed.
    pub error_notification: bool,
    /// An ERROR notification a later success of the same action outdid (a build that
    /// failed on one host, was rescheduled and went ACTIVE on another): not the last word.
    pub superseded: bool,
    /// The caller named itself as a service process (not a library, not a user).
    caller_is_service: bool,
    /// The event it stands for (only with `TraceConfig::keep_events`).
    pub event: Option<Arc<Event>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Exception class, fault type or `HTTP 500`.
    pub error: String,
    pub message: Option<String>,
    /// How the failure left this span: rest_error_response, rpc_failure_reply,
    /// rpc_timeout, rpc_unroutable, cast_undelivered.
    pub propagation: String,
}

impl Span {
    /// A span with nothing wrong in it yet and no parent.
    fn new(
        kind: SpanKind,
        (caller, handler): (Option<String>, Option<String>),
        operation: String,
        (t_start, t_handle, t_end): (f64, f64, Option<f64>),
        (request_id, global_request_id): (&Option<String>, &Option<String>),
    ) -> Span {
        Span {
            kind,
            caller,
            handler,
            operation,
            t_start,
            t_handle,
            t_end,
            status: None,
            failure: None,
            request_id: request_id.clone(),
            global_request_id: global_request_id.clone(),
            msg_id: None,
            unique_id: None,
            parent: None,
            inferred: false,
            error_notification: false,
            superseded: false,
            caller_is_service: false,
            event: None,
        }
    }
}

impl Span {
    /// An ERROR notification nothing later outdid: the resource ended in error.
    pub fn last_word_error(&self) -> bool {
        self.error_notification && !self.superseded
    }
}

/// A finished request: its spans (parents set) and what became of it.
#[derive(Debug, Clone)]
pub struct RequestTree {
    pub request_id: String,
    pub spans: Vec<Span>,
    /// The span the request started with (a user's REST request when `user` is set).
    pub root: usize,
    pub user: bool,
    /// Indexes of the failed spans no retry masked, and of those a retry did.
    pub failed: Vec<usize>,
    pub masked: Vec<usize>,
    /// The span the chain blames, when the request failed.
    pub root_cause: Option<usize>,
    /// The failure that surfaced when it was a retry that ran out (`root_cause` is then
    /// the failure of the attempt before it), and the failures of every earlier attempt.
    pub exhausted: Option<usize>,
    pub attempts: Vec<usize>,
    pub symptom: Option<String>,
    pub t_first: f64,
    pub t_last: f64,
    /// False for a request with nothing wrong in it: its spans are kept as they came and
    /// linked only when someone looks (`api::Tree::from`), which most never are.
    pub linked: bool,
}

/// What the tracer tells the sinks.
#[derive(Debug, Clone)]
pub enum Traced {
    Tree(Arc<RequestTree>),
    Chain(Box<ChainEvent>),
    /// A failed span whose request still succeeded (retried elsewhere).
    Masked(MaskedFailure),
}

/// A failure a successful retry hid from the user.
#[derive(Debug, Clone)]
pub struct MaskedFailure {
    pub service: Option<String>,
    pub operation: String,
    pub error: String,
    /// When it happened (packet time, seconds).
    pub t: f64,
}

struct Open {
    spans: Vec<Span>,
    last: Ts,
    first: Ts,
}

pub struct Tracer {
    cfg: RequestsConfig,
    /// Each span keeps the event it stands for (the OTLP exporter needs every wire detail;
    /// nothing else does, so it costs memory only when spans are exported).
    pub keep_events: bool,
    open: HashMap<Arc<str>, Open>,
    /// Root ids by first sighting, for evicting the oldest (lazy: may hold finished ids).
    order: VecDeque<Arc<str>>,
    /// Root ids under a time their request was last active, earliest first, so a sweep
    /// reads only what may be due, not every open request. Lazy: a request active since
    /// its entry was made is put back under its newer time when the entry comes up, and
    /// entries of requests already gone are dropped then. Every open request has an entry
    /// at or before its last activity.
    quiet: BinaryHeap<Reverse<(Ts, Arc<str>)>>,
    last_sweep: Ts,
}

/// The id of the request an event belongs to: the caller's global request id, else its
/// own (None: no request id ties it to anything).
pub fn root_of(ev: &Event) -> Option<&str> {
    let (global, local) = match ev {
        Event::Http(e) => (&e.global_request_id, &e.request_id),
        Event::Rpc(e) => (&e.global_request_id, &e.request_id),
        Event::Notification(n) => (&n.global_request_id, &n.request_id),
        Event::Chain(_) => return None,
    };
    global.as_deref().or(local.as_deref())
}

/// The span an event stands for, and the id of the request it belongs to.
pub fn span_of(ev: &Event) -> Option<(&str, Span)> {
    let root = root_of(ev)?;
    match ev {
        Event::Http(e) => {
            let caller = e.client.service.clone();
            let failure = match e.status {
                Some(s) if s >= 500 => Some(Failure {
                    error: e
                        .error
                        .as_ref()
                        .and_then(|f| f.kind.clone())
                        .unwrap_or_else(|| format!("HTTP {s}")),
                    message: e.error.as_ref().and_then(|f| f.message.clone()),
                    propagation: "rest_error_response".into(),
                }),
                _ => None,
            };
            let service = e.service.as_deref().unwrap_or("unknown");
            Some((
                root,
                Span {
                    caller_is_service: caller.as_deref().is_some_and(|c| !is_user_side(c)),
                    status: e.status,
                    failure,
                    ..Span::new(
                        SpanKind::Http,
                        (caller, Some(api_process(service).to_string())),
                        joined(e.method, ' ', &e.route),
                        (e.t_request, e.t_request, e.t_response_end),
                        (&e.request_id, &e.global_request_id),
                    )
                },
            ))
        }
        Event::Rpc(e) => {
            let failure = match e.outcome {
                Outcome::RemoteError => Some(Failure {
                    error: e
                        .error
                        .as_ref()
                        .map_or("RemoteError".into(), |r| r.class.clone()),
                    message: e.error.as_ref().and_then(|r| r.message.clone()),
                    propagation: "rpc_failure_reply".into(),
                }),
                Outcome::Timeout | Outcome::LateReply => Some(Failure {
                    error: "MessagingTimeout".into(),
                    message: Some(format!(
                        "no reply from {} within {}s",
                        e.routing_key,
                        e.timeout_s.unwrap_or(0.0)
                    )),
                    propagation: "rpc_timeout".into(),
                }),
                Outcome::Unroutable => Some(Failure {
                    error: "Unroutable".into(),
                    message: Some("the broker returned the message (no queue)".into()),
                    propagation: "rpc_unroutable".into(),
                }),
                Outcome::Undelivered => Some(Failure {
                    error: "Undelivered".into(),
                    message: Some(format!("no consumer on {}", e.routing_key)),
                    propagation: "cast_undelivered".into(),
                }),
                Outcome::Ok | Outcome::NoReply | Outcome::Unknown => None,
            };
            let t_start = e.t_publish.or(e.t_deliver)?;
            let caller = e.caller.as_ref().and_then(|p| p.service.clone());
            // nobody consumed it: the queue it waited in is all there is to name
            let handler = e
                .callee
                .as_ref()
                .and_then(|p| p.service.clone())
                .or_else(|| failure.as_ref().map(|_| format!("queue:{}", e.routing_key)));
            let kind = match e.rpc_type {
                RpcType::Call => SpanKind::Call,
                RpcType::Cast => SpanKind::Cast,
                RpcType::Fanout => SpanKind::Fanout,
            };
            Some((
                root,
                Span {
                    failure,
                    msg_id: e.msg_id.clone(),
                    unique_id: e.unique_id.clone(),
                    caller_is_service: caller.is_some(),
                    ..Span::new(
                        kind,
                        (caller, handler),
                        joined(&e.topic, '.', &e.method),
                        (t_start, e.t_deliver.unwrap_or(t_start), e.t_reply_publish),
                        (&e.request_id, &e.global_request_id),
                    )
                },
            ))
        }
        Event::Notification(n) => {
            let publisher = n.publisher.as_ref().and_then(|p| p.service.clone());
            let error = matches!(n.priority.as_str(), "ERROR" | "CRITICAL");
            Some((
                root,
                Span {
                    caller_is_service: publisher.is_some(),
                    error_notification: error,
                    ..Span::new(
                        SpanKind::Notification,
                        (publisher.clone(), publisher),
                        n.event_type.clone(),
                        (n.t, n.t, Some(n.t)),
                        (&n.request_id, &n.global_request_id),
                    )
                },
            ))
        }
        Event::Chain(_) => None,
    }
}

impl Tracer {
    pub fn new(cfg: RequestsConfig) -> Tracer {
        Tracer {
            cfg,
            keep_events: false,
            open: HashMap::default(),
            order: VecDeque::new(),
            quiet: BinaryHeap::new(),
            last_sweep: Ts::ZERO,
        }
    }

    /// Takes in one event (REST, RPC or notification) seen at `now`.
    #[inline(never)] // a stage's entry: scripts/stage-cost counts it
    pub fn observe(&mut self, ev: &Event, now: Ts, h: &mut Health, out: &mut Vec<Traced>) {
        let Some((root, mut span)) = span_of(ev) else {
            return;
        };
        if self.keep_events {
            span.event = Some(Arc::new(ev.clone()));
        }
        if let Some(o) = self.open.get_mut(root) {
            // the common case: a request already being collected
            o.last = o.last.max(now);
            if o.spans.len() >= self.cfg.max_spans {
                h.evict("request_spans", 1);
            } else {
                o.spans.push(span);
            }
            return;
        }
        if self.open.len() >= self.cfg.max_open {
            self.evict_oldest(h, out);
        }
        // the id is copied only for a new request (most events join an open one)
        let root: Arc<str> = Arc::from(root);
        self.order.push_back(root.clone());
        self.quiet.push(Reverse((now, root.clone())));
        self.open.insert(
            root,
            Open {
                spans: vec![span],
                last: now,
                first: now,
            },
        );
    }

    /// Completes the requests quiet for `settle_s` (checked once a second of packet time).
    /// Called after every packet: the test is inline, the sweep a call.
    #[inline]
    pub fn advance(&mut self, now: Ts, out: &mut Vec<Traced>) {
        if now.0 >= self.last_sweep.0.saturating_add(1_000_000_000) {
            self.sweep(now, out);
        }
    }

    #[inline(never)] // a stage's entry: scripts/stage-cost counts it
    fn sweep(&mut self, now: Ts, out: &mut Vec<Traced>) {
        self.last_sweep = now;
        let settle = (self.cfg.settle_s * 1e9) as u64;
        let quiet_since = |t: Ts| now.0.saturating_sub(t.0) >= settle;
        let mut done: Vec<(Ts, Arc<str>)> = Vec::new();
        while let Some(Reverse((t, _))) = self.quiet.peek()
            && quiet_since(*t)
        {
            let Reverse((_, k)) = self.quiet.pop().expect("peeked");
            let Some(o) = self.open.get(&k) else {
                continue; // finished or evicted since
            };
            if quiet_since(o.last) {
                // a request may have two entries come up at once: `done` may hold it twice
                done.push((o.first, k));
            } else {
                self.quiet.push(Reverse((o.last, k)));
            }
        }
        done.sort();
        for (_, k) in done {
            if let Some(o) = self.open.remove(&k) {
                finish(String::from(&*k), o, out);
            }
        }
        if self.order.len() > 2 * self.open.len() + 1024 {
            let open = &self.open;
            self.order.retain(|k| open.contains_key(k));
        }
        if self.quiet.len() > 2 * self.open.len() + 1024 {
            // entries of requests evicted since: one entry per open request again
            self.quiet = self
                .open
                .iter()
                .map(|(k, o)| Reverse((o.last, k.clone())))
                .collect();
        }
    }

    /// End of input: every request is complete. Its verdicts go to `hand` every
    /// `FINISHED_PER_HAND` requests and at the end.
    #[inline(never)] // a stage's entry: scripts/stage-cost counts it
    pub fn finish_all(&mut self, out: &mut Vec<Traced>, hand: &mut dyn FnMut(&mut Vec<Traced>)) {
        // the keys are sorted, not the requests: moving whole requests about was a sort
        // as dear as the rest of the end; (first, id) pairs are unique, so any sort gives
        // the one order. The table is emptied first: a lookup per key cost a fifth of it.
        let mut all = Vec::with_capacity(self.open.len());
        let mut opens = Vec::with_capacity(self.open.len());
        for (k, o) in self.open.drain() {
            all.push((o.first, k, opens.len()));
            opens.push(Some(o));
        }
        all.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (n, (_, k, i)) in all.into_iter().enumerate() {
            if let Some(o) = opens[i].take() {
                finish(String::from(&*k), o, out);
            }
            if n % FINISHED_PER_HAND == FINISHED_PER_HAND - 1 {
                hand(out);
            }
        }
        hand(out);
        self.order.clear();
        self.quiet.clear();
    }

    fn evict_oldest(&mut self, h: &mut Health, out: &mut Vec<Traced>) {
        while let Some(k) = self.order.pop_front() {
            if let Some(o) = self.open.remove(&k) {
                h.evict("open_requests", 1);
                finish(String::from(&*k), o, out);
                return;
            }
        }
    }
}

fn finish(request_id: String, o: Open, out: &mut Vec<Traced>) {
    let healthy = o
        .spans
        .iter()
        .all(|s| s.failure.is_none() && !s.error_notification && s.status.is_none_or(|c| c < 400));
    if healthy {
        // nothing to judge: no chain, nothing masked; link it only if asked for
        let (t_first, t_last) = o.spans.iter().fold((f64::MAX, 0f64), |(a, b), s| {
            (a.min(s.t_start), b.max(s.t_end.unwrap_or(s.t_start)))
        });
        out.push(Traced::Tree(Arc::new(RequestTree {
            request_id,
            spans: o.spans,
            root: 0,
            user: false,
            failed: Vec::new(),
            masked: Vec::new(),
            root_cause: None,
            exhausted: None,
            attempts: Vec::new(),
            symptom: None,
            t_first,
            t_last,
            linked: false,
        })));
        return;
    }
    let tree = build(request_id, o.spans);
    for &i in &tree.masked {
        let s = &tree.spans[i];
        out.push(Traced::Masked(MaskedFailure {
            service: s.handler.clone(),
            operation: s.operation.clone(),
            error: s
                .failure
                .as_ref()
                .map(|f| f.error.clone())
                .unwrap_or_default(),
            t: s.t_start,
        }));
    }
    if let Some(chain) = chain_of(&tree) {
        out.push(Traced::Chain(Box::new(chain)));
    }
    out.push(Traced::Tree(Arc::new(tree)));
}

/// Links the spans into a tree and judges the request.
pub fn build(request_id: String, mut spans: Vec<Span>) -> RequestTree {
    spans.sort_by(|a, b| a.t_start.total_cmp(&b.t_start));
    const SLACK: f64 = 0.001;
    for i in 0..spans.len() {
        let (start, caller, named) = (
            spans[i].t_start,
            spans[i].caller.clone(),
            spans[i].caller_is_service,
        );
        let running = |p: &Span| {
            p.kind != SpanKind::Notification
                && p.t_handle <= start + SLACK
                && p.t_end.is_none_or(|e| start <= e + SLACK)
        };
        let pick = |want_handler: bool| {
            (0..spans.len())
                .filter(|&j| j != i && running(&spans[j]))
                .filter(|&j| !want_handler || spans[j].handler == caller)
                .max_by(|&a, &b| {
                    spans[a]
                        .t_handle
                        .total_cmp(&spans[b].t_handle)
                        .then(b.cmp(&a))
                })
        };
        let parent = if named { pick(true) } else { None };
        let (parent, inferred) = match parent {
            Some(p) => (Some(p), false),
            None if named => (None, false),
            None => (pick(false), true),
        };
        // a parent must start before its child (no cycles): ties go to the earlier index
        let parent = parent.filter(|&p| p < i || spans[p].t_start < start);
        spans[i].parent = parent;
        spans[i].inferred = parent.is_some() && inferred;
    }
    // the root: the earliest parentless span, preferring a REST request
    let roots: Vec<usize> = (0..spans.len())
        .filter(|&i| spans[i].parent.is_none())
        .collect();
    let root = roots
        .iter()
        .copied()
        .find(|&i| spans[i].kind == SpanKind::Http)
        .or(roots.first().copied())
        .unwrap_or(0);
    // other parentless spans hang under the root: same request, cause unseen
    for i in roots {
        if i != root {
            spans[i].parent = Some(root);
            spans[i].inferred = true;
        }
    }
    break_cycles(&mut spans, root);
    mark_superseded(&mut spans);
    let user = spans.get(root).is_some_and(|s| {
        s.kind == SpanKind::Http
            && s.caller
                .as_deref()
                .is_none_or(|c| !s.caller_is_service || c == "external")
    });
    let masked: Vec<usize> = (0..spans.len())
        .filter(|&i| spans[i].failure.is_some() && retried_ok(&spans, i))
        .collect();
    let failed: Vec<usize> = (0..spans.len())
        .filter(|&i| spans[i].failure.is_some() && !masked.contains(&i) && i != root)
        .collect();
    let symptom = if user {
        symptom(&spans, root, &failed).map(String::from)
    } else {
        None
    };
    let surfaced = symptom
        .as_ref()
        .map(|_| deepest(&spans, &failed).unwrap_or(root));
    let attempts = surfaced.map_or(Vec::new(), |f| earlier_attempts(&spans, &failed, f));
    // a retry that ran out is explained by what failed on the attempts before it
    let (root_cause, exhausted) = match attempts.last() {
        Some(&last) => (Some(last), surfaced),
        None => (surfaced, None),
    };
    let (t_first, t_last) = spans.iter().fold((f64::MAX, 0f64), |(a, b), s| {
        (a.min(s.t_start), b.max(s.t_end.unwrap_or(s.t_start)))
    });
    // a failure is masked only when the request as a whole did not fail
    let (failed, masked) = if symptom.is_some() {
        (failed, masked)
    } else {
        (Vec::new(), [masked, failed].concat())
    };
    RequestTree {
        request_id,
        spans,
        root,
        user,
        failed,
        masked,
        root_cause,
        exhausted,
        attempts,
        symptom,
        t_first,
        t_last,
        linked: true,
    }
}

/// Defensive: any parent chain that loops is cut at the root.
fn break_cycles(spans: &mut [Span], root: usize) {
    for i in 0..spans.len() {
        let mut seen = 0;
        let mut at = spans[i].parent;
        while let Some(p) = at {
            seen += 1;
            if seen > spans.len() {
                spans[i].parent = if i == root { None } else { Some(root) };
                break;
            }
            at = spans[p].parent;
        }
    }
    if let Some(s) = spans.get_mut(root) {
        s.parent = None;
    }
}

/// A later sibling did the same operation and succeeded: the failure was retried away.
fn retried_ok(spans: &[Span], i: usize) -> bool {
    let s = &spans[i];
    spans.iter().enumerate().any(|(j, o)| {
        j != i
            && o.parent == s.parent
            && o.operation == s.operation
            && o.t_start > s.t_start
            && o.failure.is_none()
            && o.status.is_none_or(|c| c < 400)
    })
}

fn symptom(spans: &[Span], root: usize, failed: &[usize]) -> Option<&'static str> {
    let r = &spans[root];
    if r.status.is_some_and(|s| s >= 500) {
        return Some("http_5xx");
    }
    if r.status.is_some_and(|s| s >= 400) {
        return (!failed.is_empty()).then_some("http_4xx");
    }
    if spans.iter().any(Span::last_word_error) {
        return Some("resource_error");
    }
    if failed.iter().any(|&i| {
        spans[i]
            .failure
            .as_ref()
            .is_some_and(|f| f.propagation == "cast_undelivered")
    }) {
        return Some("never_completed");
    }
    // an accepted request whose last word was a failure: nothing succeeded after it
    let last_good = spans
        .iter()
        .filter(|s| s.failure.is_none() && !s.last_word_error() && s.status.is_none_or(|c| c < 400))
        .map(|s| s.t_start)
        .fold(f64::MIN, f64::max);
    failed
        .iter()
        .any(|&i| spans[i].t_start >= last_good)
        .then_some("async_failure")
}

/// The action a notification reports on, whatever its format and phase:
/// `compute.instance.create.error` and `instance.create.end` are both `instance.create`.
fn notified_action(event_type: &str) -> (&str, &str) {
    let t = event_type.strip_prefix("compute.").unwrap_or(event_type);
    t.rsplit_once('.').unwrap_or((t, ""))
}

/// Marks the ERROR notifications a later `.end` of the same action outdid: the resource
/// failed once and then succeeded (nova notifies `create.error` before it reschedules).
fn mark_superseded(spans: &mut [Span]) {
    for i in 0..spans.len() {
        if spans[i].kind != SpanKind::Notification || !spans[i].error_notification {
            continue;
        }
        let (action, _) = notified_action(&spans[i].operation);
        let t = spans[i].t_start;
        spans[i].superseded = spans.iter().any(|o| {
            o.kind == SpanKind::Notification
                && !o.error_notification
                && o.t_start > t
                && notified_action(&o.operation) == (action, "end")
        });
    }
}

fn is_ancestor(spans: &[Span], a: usize, mut of: usize) -> bool {
    let mut steps = 0;
    while let Some(p) = spans[of].parent {
        if p == a {
            return true;
        }
        of = p;
        steps += 1;
        if steps > spans.len() {
            break;
        }
    }
    false
}

/// When the failure that surfaced (`f`) is a retry that ran out: the same operation had
/// succeeded earlier in the request (`scheduler.select_destinations` picked a host), and
/// what failed after that success and before `f`, elsewhere in the tree, is why it was
/// retried (the build on that host failed). Those failures, oldest first, each the
/// deepest on its branch; empty when `f` is no such retry.
fn earlier_attempts(spans: &[Span], failed: &[usize], f: usize) -> Vec<usize> {
    let ok = |s: &Span| s.failure.is_none() && s.status.is_none_or(|c| c < 400);
    let first_success = spans
        .iter()
        .filter(|e| e.operation == spans[f].operation && e.t_start < spans[f].t_start && ok(e))
        .map(|e| e.t_start)
        .fold(f64::MAX, f64::min);
    if first_success == f64::MAX {
        return Vec::new();
    }
    let between: Vec<usize> = failed
        .iter()
        .copied()
        .filter(|&g| {
            g != f
                && spans[g].t_start > first_success
                && spans[g].t_start < spans[f].t_start
                && !is_ancestor(spans, g, f)
        })
        .collect();
    // each attempt's own root: a failure with no other failure below it
    let mut leaves: Vec<usize> = between
        .iter()
        .copied()
        .filter(|&g| !between.iter().any(|&h| h != g && is_ancestor(spans, g, h)))
        .collect();
    leaves.sort_by(|&a, &b| spans[a].t_start.total_cmp(&spans[b].t_start));
    leaves
}

fn depth(spans: &[Span], mut i: usize) -> usize {
    let mut d = 0;
    while let Some(p) = spans[i].parent {
        d += 1;
        i = p;
        if d > spans.len() {
            break;
        }
    }
    d
}

/// The deepest failure that no failure below it explains.
fn deepest(spans: &[Span], failed: &[usize]) -> Option<usize> {
    let below = |i: usize| {
        failed.iter().any(|&f| {
            let mut at = spans[f].parent;
            while let Some(p) = at {
                if p == i {
                    return true;
                }
                at = spans[p].parent;
            }
            false
        })
    };
    failed
        .iter()
        .copied()
        .filter(|&i| !below(i))
        .max_by(|&a, &b| {
            depth(spans, a)
                .cmp(&depth(spans, b))
                .then(spans[b].t_start.total_cmp(&spans[a].t_start))
        })
}

fn hop(s: &Span) -> Hop {
    Hop {
        service: s.handler.clone(),
        operation: s.operation.clone(),
        error: s
            .failure
            .as_ref()
            .map(|f| f.error.clone())
            .or_else(|| s.status.filter(|c| *c >= 400).map(|c| format!("HTTP {c}"))),
        message: s.failure.as_ref().and_then(|f| f.message.clone()),
        t: s.t_start,
        propagation: s.failure.as_ref().map(|f| f.propagation.clone()),
        request_id: s.request_id.clone(),
        msg_id: s.msg_id.clone(),
        unique_id: s.unique_id.clone(),
    }
}

pub fn chain_of(tree: &RequestTree) -> Option<ChainEvent> {
    let symptom = tree.symptom.clone()?;
    let cause = tree.root_cause?;
    // down to the failure that surfaced (a retry that ran out, if so), then the root
    let surfaced = tree.exhausted.unwrap_or(cause);
    let mut path = vec![surfaced];
    let mut at = tree.spans[surfaced].parent;
    while let Some(p) = at {
        path.push(p);
        at = tree.spans[p].parent;
        if path.len() > tree.spans.len() {
            break;
        }
    }
    path.reverse();
    if surfaced != cause {
        path.push(cause);
    }
    let mut origin = hop(&tree.spans[tree.root]);
    if origin.error.is_none() {
        // the request was accepted; the failure showed later, on the resource
        // its last word: the latest error notification nothing outdid
        let shown = tree
            .spans
            .iter()
            .filter(|s| s.last_word_error())
            .max_by(|a, b| a.t_start.total_cmp(&b.t_start))
            .map(|s| s.operation.clone());
        origin.error = Some(shown.unwrap_or_else(|| symptom.clone()));
    }
    Some(ChainEvent {
        request_id: tree.request_id.clone(),
        symptom,
        origin,
        root: hop(&tree.spans[cause]),
        inferred: path.iter().any(|&i| tree.spans[i].inferred),
        hops: path.iter().map(|&i| hop(&tree.spans[i])).collect(),
        attempts: tree.attempts.iter().map(|&i| hop(&tree.spans[i])).collect(),
    })
}

/// `a`, `sep`, `b` as one string: a span name per request, without `format!`'s machinery.
fn joined(a: &str, sep: char, b: &str) -> String {
    let mut s = String::with_capacity(a.len() + 1 + b.len());
    s.push_str(a);
    s.push(sep);
    s.push_str(b);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(
        kind: SpanKind,
        caller: &str,
        handler: &str,
        op: &str,
        t: f64,
        end: Option<f64>,
    ) -> Span {
        Span {
            t_handle: t + 0.001,
            caller_is_service: !is_user_side(caller),
            ..Span::new(
                kind,
                (Some(caller.into()), Some(handler.into())),
                op.into(),
                (t, t, end),
                (&None, &None),
            )
        }
    }

    fn fail(mut s: Span, error: &str, propagation: &str) -> Span {
        s.failure = Some(Failure {
            error: error.into(),
            message: None,
            propagation: propagation.into(),
        });
        s
    }

    fn http(mut s: Span, status: u16) -> Span {
        s.status = Some(status);
        if status >= 500 {
            s = fail(s, &format!("HTTP {status}"), "rest_error_response");
        }
        s
    }

    /// A REST span `caller>handler`, running [t, t + 0.1] with this status.
    fn rest(who: &str, op: &str, t: f64, status: u16) -> Span {
        let (caller, handler) = who.split_once('>').unwrap();
        http(
            span(SpanKind::Http, caller, handler, op, t, Some(t + 0.1)),
            status,
        )
    }

    /// An RPC span `caller>handler` of `kind`; `end` None: no reply seen.
    fn rpc(kind: SpanKind, who: &str, op: &str, t: f64, end: Option<f64>) -> Span {
        let (caller, handler) = who.split_once('>').unwrap();
        span(kind, caller, handler, op, t, end)
    }

    fn note(request: &str, t: f64) -> Event {
        Event::Notification(Box::new(crate::contract::NotificationEvent {
            publisher_id: "compute.host1".into(),
            event_type: "compute.instance.update".into(),
            priority: "INFO".into(),
            exchange: "nova".into(),
            t,
            request_id: Some(request.into()),
            global_request_id: None,
            publisher: None,
        }))
    }

    /// The end of input hands the verdicts over in slices of `FINISHED_PER_HAND`, the
    /// oldest request first, and every one of them once.
    #[test]
    fn the_end_hands_requests_over_in_slices_oldest_first() {
        let mut tracer = Tracer::new(RequestsConfig::default());
        let (mut h, mut out) = (Health::default(), Vec::new());
        let total = 2 * FINISHED_PER_HAND + 7;
        // first seen in reverse order of their ids: the order is by time, not by id
        for i in 0..total {
            let t = 1.0 + i as f64 / 1000.0;
            let id = format!("req-{:05}", total - i);
            tracer.observe(&note(&id, t), Ts((t * 1e9) as u64), &mut h, &mut out);
        }
        assert!(out.is_empty());
        let mut slices = Vec::new();
        let mut ids = Vec::new();
        tracer.finish_all(&mut out, &mut |traced| {
            slices.push(traced.len());
            ids.extend(traced.drain(..).map(|t| match t {
                Traced::Tree(t) => t.request_id.clone(),
                _ => panic!("a healthy request gives a tree only"),
            }));
        });
        assert_eq!(slices, [FINISHED_PER_HAND, FINISHED_PER_HAND, 7]);
        let expected: Vec<String> = (0..total)
            .map(|i| format!("req-{:05}", total - i))
            .collect();
        assert_eq!(ids, expected);
    }

    /// Requests complete once quiet for `settle_s`, in the order they were first seen;
    /// one still active waits; a root id seen again after its request completed starts a
    /// new request, which completes once.
    #[test]
    fn requests_complete_when_quiet() {
        let cfg = RequestsConfig {
            settle_s: 10.0,
            ..RequestsConfig::default()
        };
        let mut tracer = Tracer::new(cfg);
        let (mut h, mut out) = (Health::default(), Vec::new());
        let at = |s: u64| Ts(s * 1_000_000_000);
        let mut see = |tracer: &mut Tracer, id: &str, s: u64, out: &mut Vec<Traced>| {
            tracer.observe(&note(id, s as f64), at(s), &mut h, out);
            tracer.advance(at(s), out);
        };
        let done = |out: &mut Vec<Traced>| -> Vec<(String, usize)> {
            out.drain(..)
                .map(|t| match t {
                    Traced::Tree(t) => (t.request_id.clone(), t.spans.len()),
                    _ => panic!("a healthy request gives a tree only"),
                })
                .collect()
        };
        see(&mut tracer, "req-b", 1, &mut out);
        see(&mut tracer, "req-a", 2, &mut out);
        see(&mut tracer, "req-c", 3, &mut out);
        see(&mut tracer, "req-c", 9, &mut out);
        tracer.advance(at(12), &mut out);
        assert_eq!(done(&mut out), [("req-b".into(), 1), ("req-a".into(), 1)]);
        tracer.advance(at(18), &mut out);
        assert!(out.is_empty(), "req-c was active at 9 s");
        see(&mut tracer, "req-a", 19, &mut out);
        tracer.advance(at(20), &mut out);
        assert_eq!(done(&mut out), [("req-c".into(), 2)]);
        tracer.advance(at(40), &mut out);
        assert_eq!(done(&mut out), [("req-a".into(), 1)]);
        tracer.finish_all(&mut out, &mut |_| ());
        assert!(out.is_empty());

        // evicted, then seen again before it would have been quiet: completes once
        let cfg = RequestsConfig {
            settle_s: 10.0,
            max_open: 1,
            ..RequestsConfig::default()
        };
        let mut tracer = Tracer::new(cfg);
        see(&mut tracer, "req-x", 1, &mut out);
        see(&mut tracer, "req-y", 2, &mut out);
        see(&mut tracer, "req-x", 3, &mut out);
        assert_eq!(done(&mut out), [("req-x".into(), 1), ("req-y".into(), 1)]);
        tracer.advance(at(30), &mut out);
        assert_eq!(done(&mut out), [("req-x".into(), 1)]);
    }

    proptest::proptest! {
        /// Requests complete at the first sweep that finds them quiet for `settle_s`, in
        /// the order they were first seen, as a scan of every open request finds them:
        /// the sweep reads only the entries that may be due.
        #[test]
        fn sweeps_complete_what_a_full_scan_would(
            steps in proptest::collection::vec((0usize..6, 0u64..4_000), 1..120)
        ) {
            let cfg = RequestsConfig { settle_s: 5.0, ..RequestsConfig::default() };
            let settle = 5_000_000_000u64;
            let mut tracer = Tracer::new(cfg);
            let (mut h, mut out) = (Health::default(), Vec::new());
            // the model: each open request's (first, last, spans), scanned whole
            let mut open: std::collections::BTreeMap<String, (Ts, Ts, usize)> =
                Default::default();
            let (mut now, mut last_sweep) = (0u64, 0u64);
            let mut expected = Vec::new();
            for (root, ms) in steps {
                now += ms * 1_000_000;
                let id = format!("req-{root}");
                tracer.observe(&note(&id, now as f64 / 1e9), Ts(now), &mut h, &mut out);
                let o = open.entry(id).or_insert((Ts(now), Ts(now), 0));
                o.1 = Ts(now);
                o.2 += 1;
                tracer.advance(Ts(now), &mut out);
                if now >= last_sweep + 1_000_000_000 {
                    last_sweep = now;
                    let mut due: Vec<(Ts, String)> = open
                        .iter()
                        .filter(|(_, o)| now - o.1.0 >= settle)
                        .map(|(k, o)| (o.0, k.clone()))
                        .collect();
                    due.sort();
                    for (_, k) in due {
                        let (_, _, spans) = open.remove(&k).unwrap();
                        expected.push((k, spans));
                    }
                }
            }
            let got: Vec<(String, usize)> = out
                .drain(..)
                .map(|t| match t {
                    Traced::Tree(t) => (t.request_id.clone(), t.spans.len()),
                    _ => panic!("a healthy request gives a tree only"),
                })
                .collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn port_binding_failure_chains_from_the_error_notification_to_neutron() {
        let spans = vec![
            rest("python-novaclient>nova-api", "POST /v2.1/servers", 0.0, 202),
            rpc(
                SpanKind::Cast,
                "nova-api>nova-conductor",
                "conductor.schedule_and_build_instances",
                0.05,
                None,
            ),
            rpc(
                SpanKind::Call,
                "nova-conductor>nova-scheduler",
                "scheduler.select_destinations",
                0.2,
                Some(0.3),
            ),
            rpc(
                SpanKind::Cast,
                "nova-conductor>nova-compute",
                "compute.build_and_run_instance",
                0.4,
                None,
            ),
            rest(
                "python-neutronclient>neutron-server",
                "PUT /v2.0/ports/{id}",
                0.5,
                500,
            ),
            {
                let mut n = span(
                    SpanKind::Notification,
                    "nova-compute",
                    "nova-compute",
                    "compute.instance.create.error",
                    0.7,
                    Some(0.7),
                );
                n.error_notification = true;
                n
            },
        ];
        let t = build("req-1".into(), spans);
        assert!(t.user);
        assert_eq!(t.symptom.as_deref(), Some("resource_error"));
        let c = chain_of(&t).unwrap();
        let ops: Vec<&str> = c.hops.iter().map(|h| h.operation.as_str()).collect();
        assert_eq!(
            ops,
            [
                "POST /v2.1/servers",
                "conductor.schedule_and_build_instances",
                "compute.build_and_run_instance",
                "PUT /v2.0/ports/{id}"
            ]
        );
        assert_eq!(c.root.service.as_deref(), Some("neutron-server"));
        assert!(c.inferred, "the neutron call was made by a client library");
        assert_eq!(
            c.origin.error.as_deref(),
            Some("compute.instance.create.error")
        );
    }

    #[test]
    fn a_retry_that_succeeds_masks_the_failure() {
        let spans = vec![
            rest("external>nova-api", "GET /x", 0.0, 200),
            fail(
                rpc(
                    SpanKind::Call,
                    "nova-api>nova-compute",
                    "compute.get_console_output",
                    0.1,
                    Some(0.2),
                ),
                "ValueError",
                "rpc_failure_reply",
            ),
            rpc(
                SpanKind::Call,
                "nova-api>nova-compute",
                "compute.get_console_output",
                0.3,
                Some(0.4),
            ),
        ];
        let t = build("req-2".into(), spans);
        assert_eq!(t.symptom, None);
        assert_eq!(t.masked, vec![1]);
        assert!(chain_of(&t).is_none());
    }

    #[test]
    fn a_5xx_with_healthy_downstream_blames_the_api_itself_and_4xx_alone_is_no_chain() {
        let t = build(
            "r".into(),
            vec![
                rest("external>nova-api", "GET /y", 0.0, 500),
                rest(
                    "python-glanceclient>glance-api",
                    "GET /v2/images/{id}",
                    0.1,
                    200,
                ),
            ],
        );
        assert_eq!(t.root_cause, Some(0));
        assert_eq!(chain_of(&t).unwrap().hops.len(), 1);
        let t = build(
            "r".into(),
            vec![rest("external>nova-api", "GET /z", 0.0, 404)],
        );
        assert!(chain_of(&t).is_none());
    }

    fn notification(who: &str, event: &str, t: f64, error: bool) -> Span {
        let mut n = span(SpanKind::Notification, who, who, event, t, Some(t));
        n.error_notification = error;
        n
    }

    /// A boot whose first host cannot bind the port: nova-compute notifies create.error,
    /// sends the build back to the conductor, the scheduler picks another host (or none).
    fn reschedule(second_host: Option<&str>) -> Vec<Span> {
        let mut spans = vec![
            rest("python-novaclient>nova-api", "POST /v2.1/servers", 0.0, 202),
            rpc(
                SpanKind::Cast,
                "nova-api>nova-conductor",
                "conductor.schedule_and_build_instances",
                0.05,
                None,
            ),
            rpc(
                SpanKind::Call,
                "nova-conductor>nova-scheduler",
                "scheduler.select_destinations",
                0.1,
                Some(0.15),
            ),
            rpc(
                SpanKind::Cast,
                "nova-conductor>nova-compute",
                "compute.build_and_run_instance",
                0.2,
                None,
            ),
            rest(
                "nova-compute>neutron-server",
                "PUT /v2.0/ports/{id}",
                0.25,
                500,
            ),
            notification("nova-compute", "compute.instance.create.error", 0.4, true),
            rpc(
                SpanKind::Cast,
                "nova-compute>nova-conductor",
                "compute_task.build_instances",
                0.45,
                None,
            ),
        ];
        let select = rpc(
            SpanKind::Call,
            "nova-conductor>nova-scheduler",
            "scheduler.select_destinations",
            0.5,
            Some(0.55),
        );
        match second_host {
            Some(_) => spans.extend([
                select,
                rpc(
                    SpanKind::Cast,
                    "nova-conductor>nova-compute",
                    "compute.build_and_run_instance",
                    0.6,
                    None,
                ),
                rest(
                    "nova-compute>neutron-server",
                    "PUT /v2.0/ports/{id}",
                    0.65,
                    200,
                ),
                notification("nova-compute", "instance.create.end", 0.9, false),
            ]),
            None => spans.extend([
                fail(select, "NoValidHost", "rpc_failure_reply"),
                notification("nova-conductor", "compute_task.build_instances", 0.6, true),
            ]),
        }
        spans
    }

    #[test]
    fn a_reschedule_that_went_active_is_masked_despite_its_error_notification() {
        let t = build("r".into(), reschedule(Some("host2")));
        assert_eq!(t.symptom, None);
        assert!(t.spans.iter().any(|s| s.superseded));
        assert_eq!(t.masked.len(), 1, "the first host's port binding");
        assert!(chain_of(&t).is_none());
    }

    #[test]
    fn a_reschedule_that_ran_out_of_hosts_blames_what_failed_on_the_host_tried() {
        let t = build("r".into(), reschedule(None));
        assert_eq!(t.symptom.as_deref(), Some("resource_error"));
        let c = chain_of(&t).unwrap();
        assert_eq!(c.root.service.as_deref(), Some("neutron-server"));
        assert_eq!(c.root.operation, "PUT /v2.0/ports/{id}");
        let ops: Vec<&str> = c.hops.iter().map(|h| h.operation.as_str()).collect();
        assert_eq!(
            &ops[ops.len() - 2..],
            ["scheduler.select_destinations", "PUT /v2.0/ports/{id}"],
            "down to the retry that ran out, then its cause"
        );
        assert_eq!(c.attempts.len(), 1);
        assert_eq!(c.hops.last(), Some(&c.root));
    }

    #[test]
    fn a_repeated_operation_without_failures_between_is_no_exhausted_retry() {
        // the second select_destinations fails on its own: it is the root
        let mut spans = reschedule(None);
        spans.retain(|s| s.operation != "PUT /v2.0/ports/{id}");
        let t = build("r".into(), spans);
        let c = chain_of(&t).unwrap();
        assert_eq!(c.root.error.as_deref(), Some("NoValidHost"));
        assert!(c.attempts.is_empty());
    }

    #[test]
    fn timeout_under_a_500_is_the_root_cause() {
        let t = build(
            "r".into(),
            vec![
                rest(
                    "external>nova-api",
                    "GET /v2.1/servers/{id}/action",
                    0.0,
                    500,
                ),
                fail(
                    rpc(
                        SpanKind::Call,
                        "nova-api>nova-compute",
                        "compute.get_console_output",
                        0.1,
                        None,
                    ),
                    "MessagingTimeout",
                    "rpc_timeout",
                ),
            ],
        );
        let c = chain_of(&t).unwrap();
        assert_eq!(c.symptom, "http_5xx");
        assert_eq!(c.root.error.as_deref(), Some("MessagingTimeout"));
        assert_eq!(c.root.propagation.as_deref(), Some("rpc_timeout"));
        assert!(!c.inferred);
    }
}
