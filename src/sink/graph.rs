//! The call graph: services, the queues and exchanges where RPC messages wait, and the
//! external client as nodes; REST (per route) and RPC (per topic.method) as edges, each
//! with rate, error ratio, latency quantiles and, for RPC calls, the reply-wait split.
//!
//! An RPC edge goes caller → queue → callee. Statistics are kept per edge in time slots
//! of packet time (`slot_s` wide, `window_s` of them kept) and as a running total, so a
//! report can cover the last minute, the last quarter hour or everything since the start.

use super::sketch::{Quantiles, Sample, Sketch};
use crate::FastMap as HashMap;
use crate::contract::{Event, HttpEvent, HttpOutcome, Outcome, RpcEvent};
use crate::openstack::services::{EXTERNAL, api_process, is_user_side};
use crate::oslo::RpcType;
use crate::time::Ts;
use petgraph::graph::{DiGraph, EdgeIndex, NodeIndex};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;

/// Failures kept per edge for the UI's side panel.
const RECENT_ERRORS: usize = 5;
/// An error message is cut to this many characters.
const MESSAGE_CHARS: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Service,
    Queue,
    Exchange,
    Client,
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    pub name: String,
}

#[derive(Default)]
struct Slot {
    index: u64,
    requests: u64,
    errors: u64,
    /// RPC calls with no reply in the caller's timeout; REST requests with no response.
    timeouts: u64,
    latency: Sketch,
    /// Queue wait, server time, reply transit (RPC calls only).
    split: Option<Box<[Sketch; 3]>>,
}

impl Slot {
    fn add(&mut self, other: &Slot) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.latency.merge(&other.latency);
        if let Some(p) = &other.split {
            let acc = self.split.get_or_insert_with(Default::default);
            for (x, y) in acc.iter_mut().zip(p.iter()) {
                x.merge(y);
            }
        }
    }
}

struct EdgeStats {
    protocol: &'static str,
    kind: &'static str,
    operation: String,
    /// The newest slots, oldest first, none older than the window.
    slots: VecDeque<Slot>,
    /// Everything since the first packet.
    total: Slot,
    recent_errors: VecDeque<RecentError>,
}

/// One failure on an edge, as the side panel lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    pub t: f64,
    /// Exception class, fault type, `HTTP 503`, `timeout`, `unroutable`…
    pub error: String,
    pub message: Option<String>,
    /// The request's root id, to open its tree.
    pub request_id: Option<String>,
    /// An RPC's msg_id, to find it in the broker's or the services' logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
}

/// What one observation adds to an edge.
struct Observed {
    failed: bool,
    timed_out: bool,
    latency: Option<f64>,
    split: Option<[Option<f64>; 3]>,
}

fn cut(m: &str) -> String {
    match m.char_indices().nth(MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &m[..i]),
        None => m.to_string(),
    }
}

/// The failure an event shows, if it failed.
fn recent_error(ev: &Event, t: f64) -> Option<RecentError> {
    let msg_id = match ev {
        Event::Rpc(e) => e.msg_id.as_deref().map(str::to_string),
        _ => None,
    };
    let (error, message, ids) = match ev {
        Event::Http(e) if http_failed(e) => {
            let fault = e.error.as_ref().and_then(|f| f.kind.clone());
            let error = match (fault, e.status) {
                (Some(kind), _) => kind,
                (None, Some(s)) => format!("HTTP {s}"),
                (None, None) => e.outcome.as_str().to_string(),
            };
            let message = e.error.as_ref().and_then(|f| f.message.as_deref());
            (error, message, (&e.global_request_id, &e.request_id))
        }
        Event::Rpc(e) if rpc_failed(e) => {
            let error = match &e.error {
                Some(r) => r.class.clone(),
                None => e.outcome.as_str().to_string(),
            };
            let message = e.error.as_ref().and_then(|r| r.message.as_deref());
            (error, message, (&e.global_request_id, &e.request_id))
        }
        _ => return None,
    };
    Some(RecentError {
        t,
        error,
        message: message.map(cut),
        request_id: ids.0.clone().or_else(|| ids.1.clone()),
        msg_id,
    })
}

/// One endpoint-to-endpoint observation, as the Tempo-style metrics see it: the pairs a
/// tracing backend draws from stacktap's spans (a CLIENT and its SERVER child, a
/// PRODUCER and each CONSUMER child).
pub struct Hop<'a> {
    pub client: &'a str,
    pub server: std::borrow::Cow<'a, str>,
    /// "http" or "rpc".
    pub protocol: &'static str,
    /// Tempo's `connection_type`: `""` for a request and its answer (CLIENT → SERVER),
    /// `messaging_system` for a cast's copy (PRODUCER → CONSUMER), `virtual_node` for a
    /// message that reached no server: the queue it waited in is the (uninstrumented)
    /// server, as the spans' `peer.service` says.
    pub connection_type: &'static str,
    pub failed: bool,
    /// Client-side duration: request to response end, publish to reply delivery.
    pub client_s: Option<f64>,
    /// Server-side duration: the same for REST, delivery to reply publish for RPC.
    pub server_s: Option<f64>,
}

/// The REST caller as a graph node name (nothing known: the external client).
fn http_client(e: &HttpEvent) -> &str {
    e.client.service.as_deref().unwrap_or(EXTERNAL)
}

fn http_server(e: &HttpEvent) -> &str {
    api_process(e.service.as_deref().unwrap_or("unknown"))
}

/// An edge's operation, keyed without building its text (built once, for the report).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Op {
    Http(&'static str, Arc<str>),
    Rpc(Arc<str>, Arc<str>),
}

impl Op {
    /// The operation by address: its names' allocations (held by the `Op` kept beside the
    /// key, so no address is reused while it is a key) and the method's text's address and
    /// length. Equal addresses mean equal names; equal names at other addresses miss and
    /// go to the lookup by text.
    fn at(&self) -> [usize; 4] {
        match self {
            Op::Http(m, r) => [
                0,
                m.as_ptr() as usize,
                m.len(),
                Arc::as_ptr(r) as *const u8 as usize,
            ],
            Op::Rpc(t, m) => [
                1,
                Arc::as_ptr(t) as *const u8 as usize,
                Arc::as_ptr(m) as *const u8 as usize,
                0,
            ],
        }
    }

    fn text(&self) -> String {
        match self {
            Op::Http(m, r) => format!("{m} {r}"),
            Op::Rpc(t, m) => format!("{t}.{m}"),
        }
    }
}

/// A REST request failed for the graph when the server erred or never answered (a 4xx is
/// an answer).
fn http_failed(e: &HttpEvent) -> bool {
    e.status.is_none_or(|s| s >= 500)
}

fn rpc_failed(e: &RpcEvent) -> bool {
    !matches!(e.outcome, Outcome::Ok | Outcome::NoReply | Outcome::Unknown)
}

fn named(p: &crate::contract::Process) -> &str {
    p.service.as_deref().unwrap_or(UNKNOWN)
}

const MESSAGING: &str = "messaging_system";

/// An edge by address: its two nodes, its kind's text (address and length) and its
/// operation's names (`Op::at`).
type EdgeAt = super::address::Addresses<8>;

/// A process nothing named (its AMQP connection was never seen opening).
const UNKNOWN: &str = "unknown";

fn name(p: &Option<std::sync::Arc<crate::contract::Process>>) -> &str {
    p.as_ref()
        .and_then(|p| p.service.as_deref())
        .unwrap_or(UNKNOWN)
}

/// The caller → callee observations of an event: one for a REST exchange or an RPC call,
/// one per delivered copy of a cast or fanout (one to its queue if none was seen), none
/// for notifications and chains.
pub fn hops_of<'a>(ev: &'a Event, mut f: impl FnMut(Hop<'a>)) {
    match ev {
        Event::Http(e) => f(Hop {
            client: http_client(e),
            server: http_server(e).into(),
            protocol: "http",
            connection_type: "",
            failed: http_failed(e),
            client_s: e.duration_s,
            server_s: e.duration_s,
        }),
        Event::Rpc(e) if e.rpc_type != RpcType::Call && !e.copies.is_empty() => {
            for c in &e.copies {
                f(Hop {
                    client: name(&e.caller),
                    server: c.consumer.service.as_deref().unwrap_or(UNKNOWN).into(),
                    protocol: "rpc",
                    connection_type: MESSAGING,
                    failed: false,
                    client_s: None,
                    server_s: None,
                })
            }
        }
        Event::Rpc(e) => f(Hop {
            client: name(&e.caller),
            // delivered to someone unnamed, or only as far as its queue
            server: match (
                e.t_deliver,
                e.callee.as_ref().and_then(|p| p.service.as_deref()),
            ) {
                (_, Some(s)) => s.into(),
                (Some(_), None) => UNKNOWN.into(),
                (None, None) => format!("queue:{}", e.topic).into(),
            },
            protocol: "rpc",
            connection_type: match (e.t_deliver, e.rpc_type) {
                (None, _) => "virtual_node",
                (Some(_), RpcType::Call) => "",
                (Some(_), _) => MESSAGING,
            },
            failed: rpc_failed(e),
            client_s: e.reply_wait(),
            server_s: e.server_time(),
        }),
        _ => {}
    }
}

pub struct Graph {
    slot_ns: u64,
    /// Slots kept per edge.
    slots: u64,
    window_s: f64,
    graph: DiGraph<Node, EdgeStats>,
    /// Per node kind, by name.
    nodes: [HashMap<Box<str>, NodeIndex>; 4],
    edges: HashMap<(NodeIndex, NodeIndex, &'static str, Op), EdgeIndex>,
    /// In front of `edges`: the same edges by the addresses of their names (`Op::at`), so
    /// that an event's edge costs a few words hashed instead of its names' text hashed and
    /// compared (events carry the correlator's interned names: the same addresses each
    /// time). Bounded like `edges`' own cap, times four for names seen at new addresses.
    edges_at: std::collections::HashMap<EdgeAt, (EdgeIndex, Op), foldhash::fast::FixedState>,
    first: Option<Ts>,
    now: Ts,
    max_edges: usize,
    pub folded: u64,
    /// Calls waiting for a reply, per topic: now, and the peak of each slot.
    in_flight: HashMap<Box<str>, QueueLoad>,
}

/// One topic's calls in flight.
#[derive(Default)]
struct QueueLoad {
    now: i64,
    /// (slot index, the most in flight during it), oldest first.
    peaks: VecDeque<(u64, i64)>,
}

/// A queue's most calls in flight during one slot.
#[derive(Debug, Serialize)]
pub struct LoadPoint {
    pub t: f64,
    pub peak: i64,
}

#[derive(Debug, Serialize)]
pub struct EdgeReport {
    pub source: String,
    pub target: String,
    pub protocol: &'static str,
    /// http, call, cast, fanout, deliver (queue → server).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub operation: String,
    pub requests: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub error_ratio: f64,
    pub rate_per_s: f64,
    pub latency_s: Quantiles,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_wait_split: Option<Split>,
    /// The newest failures in the window, newest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recent_errors: Vec<RecentError>,
    /// Slot by slot over the window, oldest first (slots with no traffic left out): the
    /// trends the UI draws.
    pub series: Vec<Point>,
}

/// One slot of an edge.
#[derive(Debug, Serialize)]
pub struct Point {
    /// The slot's start, seconds since the epoch.
    pub t: f64,
    pub requests: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub p99_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Split {
    pub queue_wait_s: Quantiles,
    pub server_s: Quantiles,
    pub reply_transit_s: Quantiles,
    /// The three parts' distributions over `HISTOGRAM_BOUNDS_S` (one more count for
    /// what lies past the last bound).
    pub histogram: SplitHistogram,
}

#[derive(Debug, Serialize)]
pub struct SplitHistogram {
    pub bounds_s: &'static [f64],
    pub queue_wait: Vec<u64>,
    pub server: Vec<u64>,
    pub reply_transit: Vec<u64>,
}

/// Where a reply wait's parts are cut for the panel's histogram.
const HISTOGRAM_BOUNDS_S: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0];

#[derive(Debug, Serialize)]
pub struct GraphReport {
    /// Seconds of packet time the statistics cover (rates are per second of it).
    pub window_s: f64,
    /// The window asked for; null: everything since the first packet.
    pub requested_window_s: Option<f64>,
    /// The longest window a report can cover, and its step.
    pub max_window_s: f64,
    pub slot_s: f64,
    /// The newest packet time seen (seconds since the epoch).
    pub latest: Option<f64>,
    pub nodes: Vec<Node>,
    pub edges: Vec<EdgeReport>,
    /// Per queue node id: calls waiting for a reply, the peak of each slot in the window.
    pub in_flight: std::collections::BTreeMap<String, Vec<LoadPoint>>,
}

impl Graph {
    /// A graph keeping `requests.graph_window_s` of history in slots of
    /// `requests.graph_slot_s` (validated: finite, a bounded number of slots), and at most
    /// `max_edges` edges (observations past it are counted in `folded`).
    pub fn new(cfg: &crate::sink::requests::RequestsConfig, max_edges: usize) -> Graph {
        let slot_s = cfg.graph_slot_s.max(0.001);
        let window_s = cfg.graph_window_s.max(slot_s);
        Graph {
            slot_ns: (slot_s * 1e9) as u64,
            slots: (window_s / slot_s).ceil() as u64,
            window_s,
            graph: DiGraph::new(),
            nodes: Default::default(),
            edges: HashMap::default(),
            edges_at: Default::default(),
            first: None,
            now: Ts::ZERO,
            max_edges,
            folded: 0,
            in_flight: HashMap::default(),
        }
    }

    /// The node of `kind` named `name` (an exchange is named by its topic).
    fn node(&mut self, kind: NodeKind, name: &str) -> NodeIndex {
        if let Some(&i) = self.nodes[kind as usize].get(name) {
            return i;
        }
        let (id, shown) = match kind {
            NodeKind::Service => (format!("service:{name}"), name.to_string()),
            NodeKind::Queue => (format!("queue:{name}"), name.to_string()),
            NodeKind::Exchange => (format!("exchange:{name}_fanout"), format!("{name}_fanout")),
            NodeKind::Client => (format!("client:{name}"), name.to_string()),
        };
        let i = self.graph.add_node(Node {
            id,
            kind,
            name: shown,
        });
        self.nodes[kind as usize].insert(name.into(), i);
        i
    }

    fn slot_index(&self, t: Ts) -> u64 {
        t.0 / self.slot_ns.max(1)
    }

    /// The edge for an observation, created on first use; None (counted as folded) past
    /// the edge cap.
    fn edge(
        &mut self,
        (from, to): (NodeIndex, NodeIndex),
        (protocol, kind, op): (&'static str, &'static str, &Op),
    ) -> Option<EdgeIndex> {
        let [o0, o1, o2, o3] = op.at();
        let at = super::address::Addresses([
            from.index(),
            to.index(),
            kind.as_ptr() as usize,
            kind.len(),
            o0,
            o1,
            o2,
            o3,
        ]);
        if let Some(&(e, _)) = self.edges_at.get(&at) {
            return Some(e);
        }
        let key = (from, to, kind, op.clone());
        let e = match self.edges.get(&key) {
            Some(&e) => e,
            None if self.edges.len() >= self.max_edges => {
                self.folded += 1;
                return None;
            }
            None => {
                let e = self.graph.add_edge(
                    from,
                    to,
                    EdgeStats {
                        protocol,
                        kind,
                        operation: op.text(),
                        slots: VecDeque::new(),
                        total: Slot::default(),
                        recent_errors: VecDeque::new(),
                    },
                );
                self.edges.insert(key, e);
                e
            }
        };
        if self.edges_at.len() < self.max_edges.saturating_mul(4) {
            self.edges_at.insert(at, (e, op.clone()));
        }
        Some(e)
    }

    /// Adds an observation to an edge (created on first use; counted as folded past the
    /// edge cap).
    fn record(
        &mut self,
        (from, to): (NodeIndex, NodeIndex),
        (protocol, kind, op): (&'static str, &'static str, &Op),
        t: Ts,
        seen: Observed,
        error: Option<RecentError>,
    ) {
        let Some(e) = self.edge((from, to), (protocol, kind, op)) else {
            return;
        };
        let index = self.slot_index(t);
        let kept = self.slots;
        let stats = &mut self.graph[e];
        if stats.slots.back().is_none_or(|s| s.index < index) {
            stats.slots.push_back(Slot {
                index,
                ..Slot::default()
            });
        }
        while stats.slots.front().is_some_and(|s| s.index + kept <= index) {
            stats.slots.pop_front();
        }
        if let Some(err) = error {
            if stats.recent_errors.len() >= RECENT_ERRORS {
                stats.recent_errors.pop_front();
            }
            stats.recent_errors.push_back(err);
        }
        let latency = seen.latency.and_then(Sample::of);
        let split = seen
            .split
            .map(|parts| parts.map(|v| v.and_then(Sample::of)));
        // a packet stamped before the newest slot (clock regression) counts in the newest
        for slot in [stats.slots.back_mut().expect("pushed"), &mut stats.total] {
            slot.requests += 1;
            slot.errors += seen.failed as u64;
            slot.timeouts += seen.timed_out as u64;
            if let Some(s) = latency {
                slot.latency.take(s);
            }
            if let Some(parts) = split {
                let sk = slot.split.get_or_insert_with(Default::default);
                for (sketch, s) in sk.iter_mut().zip(parts) {
                    if let Some(s) = s {
                        sketch.take(s);
                    }
                }
            }
        }
    }

    /// A topic's calls in flight went up or down by `delta` (at the newest event's time).
    /// Topics past the edge cap are not tracked (the metric still counts them).
    pub fn on_in_flight(&mut self, topic: &str, delta: i64) {
        let index = self.slot_index(self.now);
        let kept = self.slots;
        if !self.in_flight.contains_key(topic) && self.in_flight.len() >= self.max_edges {
            return;
        }
        let load = self.in_flight.entry(topic.into()).or_default();
        load.now = (load.now + delta).max(0);
        match load.peaks.back_mut() {
            Some((i, peak)) if *i == index => *peak = (*peak).max(load.now),
            _ => load.peaks.push_back((index, load.now)),
        }
        while load.peaks.front().is_some_and(|(i, _)| i + kept <= index) {
            load.peaks.pop_front();
        }
    }

    /// The newest packet time seen, in seconds.
    pub fn latest(&self) -> Option<f64> {
        self.first.map(|_| self.now.as_secs_f64())
    }

    #[inline(never)] // a stage's entry: scripts/stage-cost counts it (one call per event)
    pub fn on_event(&mut self, ev: &Event) {
        let now = match ev {
            Event::Http(e) => e.t_response_end.unwrap_or(e.t_request),
            Event::Rpc(e) => e
                .t_reply_deliver
                .or(e.t_deliver)
                .or(e.t_publish)
                .unwrap_or(0.0),
            _ => return,
        };
        let now = Ts::from_secs_f64(now);
        self.now = self.now.max(now);
        self.first.get_or_insert(now);
        let error = recent_error(ev, now.as_secs_f64());
        match ev {
            Event::Http(e) => {
                let client = http_client(e);
                // users: nothing named them, or they called through a client library
                let kind = if is_user_side(client) {
                    NodeKind::Client
                } else {
                    NodeKind::Service
                };
                let from = self.node(kind, client);
                let to = self.node(NodeKind::Service, http_server(e));
                let op = Op::Http(e.method, e.route.clone());
                let seen = Observed {
                    failed: http_failed(e),
                    timed_out: e.outcome == HttpOutcome::NoResponse,
                    latency: e.duration_s,
                    split: None,
                };
                self.record((from, to), ("http", "http", &op), now, seen, error);
            }
            Event::Rpc(e) => {
                let from = self.node(NodeKind::Service, name(&e.caller));
                let qkind = match e.rpc_type {
                    RpcType::Fanout => NodeKind::Exchange,
                    _ => NodeKind::Queue,
                };
                let q = self.node(qkind, &e.topic);
                let op = Op::Rpc(e.topic.clone(), e.method.clone());
                let call = e.rpc_type == RpcType::Call;
                let seen = Observed {
                    failed: rpc_failed(e),
                    timed_out: e.outcome == Outcome::Timeout,
                    latency: e.reply_wait(),
                    split: call.then(|| [e.queue_wait(), e.server_time(), e.reply_transit()]),
                };
                let kind = e.rpc_type.as_str();
                // the failure belongs to the caller's edge; the queue → server hop is
                // where the message went
                self.record((from, q), ("rpc", kind, &op), now, seen, error);
                // where it was delivered: a call's server; each consumer of a cast's copies
                let consumers: Vec<&str> = if e.copies.is_empty() {
                    let callee = e.callee.as_deref().map(named);
                    e.t_deliver
                        .and(callee.or(Some(UNKNOWN)))
                        .into_iter()
                        .collect()
                } else {
                    e.copies.iter().map(|c| named(&c.consumer)).collect()
                };
                for callee in consumers {
                    let to = self.node(NodeKind::Service, callee);
                    let seen = Observed {
                        failed: false,
                        timed_out: false,
                        latency: e.server_time(),
                        split: None,
                    };
                    self.record((q, to), ("rpc", "deliver", &op), now, seen, None);
                }
            }
            _ => {}
        }
    }

    /// The graph over the last `window_s` seconds of packet time (rounded to whole slots,
    /// at most the configured window), or over everything when None.
    pub fn report(&self, window_s: Option<f64>) -> GraphReport {
        let newest = self.slot_index(self.now);
        let first = self.first.unwrap_or(self.now);
        // the oldest slot inside the window, and the packet time the window starts at
        let (oldest, from) = match window_s {
            Some(w) => {
                let n = ((w / self.window_s.max(1e-9)).min(1.0) * self.slots as f64)
                    .ceil()
                    .max(1.0) as u64;
                let oldest = (newest + 1).saturating_sub(n);
                let start = Ts(oldest.saturating_mul(self.slot_ns)).max(first);
                (oldest, start)
            }
            None => (0, first),
        };
        let covered = self.now.secs_since(from).max(1e-9);
        let mut edges: Vec<EdgeReport> = self
            .graph
            .edge_indices()
            .filter_map(|e| {
                let (a, b) = self.graph.edge_endpoints(e)?;
                let st = &self.graph[e];
                let mut sum = Slot::default();
                let slot = match window_s {
                    None => &st.total,
                    Some(_) => {
                        for s in st.slots.iter().filter(|s| s.index >= oldest) {
                            sum.add(s);
                        }
                        &sum
                    }
                };
                let since = from.as_secs_f64();
                (slot.requests > 0).then(|| EdgeReport {
                    source: self.graph[a].id.clone(),
                    target: self.graph[b].id.clone(),
                    protocol: st.protocol,
                    kind: st.kind,
                    operation: st.operation.clone(),
                    requests: slot.requests,
                    errors: slot.errors,
                    timeouts: slot.timeouts,
                    error_ratio: slot.errors as f64 / slot.requests as f64,
                    rate_per_s: slot.requests as f64 / covered,
                    latency_s: slot.latency.summary(),
                    reply_wait_split: slot.split.as_deref().map(split),
                    series: st
                        .slots
                        .iter()
                        .filter(|s| s.index >= oldest)
                        .map(|s| Point {
                            t: s.index as f64 * self.slot_ns as f64 / 1e9,
                            requests: s.requests,
                            errors: s.errors,
                            timeouts: s.timeouts,
                            p99_s: s.latency.quantile(0.99),
                        })
                        .collect(),
                    recent_errors: st
                        .recent_errors
                        .iter()
                        .rev()
                        .filter(|r| r.t >= since)
                        .cloned()
                        .collect(),
                })
            })
            .collect();
        edges.sort_by(|a, b| {
            (&a.source, &a.target, a.kind, &a.operation).cmp(&(
                &b.source,
                &b.target,
                b.kind,
                &b.operation,
            ))
        });
        // the nodes some edge of the window touches, in id order
        let used: std::collections::BTreeMap<&str, &Node> = edges
            .iter()
            .flat_map(|e| [e.source.as_str(), e.target.as_str()])
            .filter_map(|id| self.node_by_id(id))
            .map(|n| (n.id.as_str(), n))
            .collect();
        let nodes: Vec<Node> = used.into_values().cloned().collect();
        let slot_s = self.slot_ns as f64 / 1e9;
        let in_flight = self
            .in_flight
            .iter()
            .filter_map(|(topic, load)| {
                let id = format!("queue:{topic}");
                let points: Vec<LoadPoint> = load
                    .peaks
                    .iter()
                    .filter(|(i, _)| *i >= oldest)
                    .map(|&(i, peak)| LoadPoint {
                        t: i as f64 * slot_s,
                        peak,
                    })
                    .collect();
                nodes.iter().any(|n| n.id == id).then_some((id, points))
            })
            .collect();
        GraphReport {
            window_s: covered,
            requested_window_s: window_s,
            max_window_s: self.window_s,
            slot_s: self.slot_ns as f64 / 1e9,
            latest: self.latest(),
            nodes,
            edges,
            in_flight,
        }
    }

    fn node_by_id(&self, id: &str) -> Option<&Node> {
        let (kind, name) = id.split_once(':')?;
        let (k, name) = match kind {
            "service" => (NodeKind::Service, name),
            "queue" => (NodeKind::Queue, name),
            "exchange" => (NodeKind::Exchange, name.strip_suffix("_fanout")?),
            "client" => (NodeKind::Client, name),
            _ => return None,
        };
        self.nodes[k as usize].get(name).map(|&i| &self.graph[i])
    }
}

/// A call edge's reply wait in its three parts: quantiles and distributions.
fn split(parts: &[Sketch; 3]) -> Split {
    let hist = |s: &Sketch| s.histogram(HISTOGRAM_BOUNDS_S);
    Split {
        queue_wait_s: parts[0].summary(),
        server_s: parts[1].summary(),
        reply_transit_s: parts[2].summary(),
        histogram: SplitHistogram {
            bounds_s: HISTOGRAM_BOUNDS_S,
            queue_wait: hist(&parts[0]),
            server: hist(&parts[1]),
            reply_transit: hist(&parts[2]),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Process;
    use std::sync::Arc;

    fn http(client: &str, service: &str, status: u16, d: f64) -> Event {
        let caller = Arc::new(Process {
            service: Some(client.into()),
            pid: None,
            host: "10.0.0.1".into(),
        });
        let mut e = crate::testing::http_event(caller, service, "PUT", "/v2.0/ports/{id}");
        e.status = Some(status);
        (e.t_response, e.t_response_end, e.duration_s) = (Some(d), Some(d), Some(d));
        Event::Http(Box::new(e))
    }

    #[test]
    fn a_fanout_is_delivered_to_every_consumer_of_its_copies() {
        let proc_ = |s: &str, pid| {
            Arc::new(Process {
                service: Some(s.into()),
                pid: Some(pid),
                host: "10.0.0.3".into(),
            })
        };
        let copy = |s: &str, pid, port| crate::contract::Delivery {
            queue: Some(format!("scheduler_fanout_{pid}")),
            consumer: proc_(s, pid),
            connection: crate::contract::Endpoint {
                ip: "10.0.0.3".parse().unwrap(),
                port,
            },
            t: 1.1,
        };
        let mut e = crate::testing::rpc_event(RpcType::Fanout, "scheduler", "update_instance_info");
        e.caller = Some(proc_("nova-compute", 1));
        e.t_publish = Some(1.0);
        e.t_deliver = Some(1.1);
        e.copies = vec![
            copy("nova-scheduler", 2, 40001),
            copy("nova-scheduler", 3, 40002),
        ];
        e.deliveries = 2;
        let ev = Event::Rpc(Box::new(e));
        let mut g = Graph::new(&Default::default(), 2000);
        g.on_event(&ev);
        let r = g.report(None);
        let deliver: Vec<_> = r.edges.iter().filter(|e| e.kind == "deliver").collect();
        assert_eq!(deliver.len(), 1);
        assert_eq!(deliver[0].target, "service:nova-scheduler");
        assert_eq!(deliver[0].requests, 2, "one per copy");
        let mut hops = Vec::new();
        hops_of(&ev, |h| {
            hops.push((
                h.client.to_string(),
                h.server.to_string(),
                h.connection_type,
            ))
        });
        assert_eq!(hops.len(), 2);
        assert!(hops.iter().all(|h| h
            == &(
                "nova-compute".into(),
                "nova-scheduler".into(),
                "messaging_system"
            )));
    }

    /// Events carry the correlator's interned names, but a name evicted from its table
    /// comes back at a new address: an edge is the same edge by its names' text, whatever
    /// their addresses, and one past the edge cap folds every time it is seen.
    #[test]
    fn an_edge_is_its_names_whatever_their_addresses() {
        let call = |topic: &str, t: f64| {
            let mut e = crate::testing::rpc_event(RpcType::Call, topic, "object_action");
            (e.t_publish, e.t_deliver) = (Some(t), Some(t + 0.001));
            e
        };
        let mut g = Graph::new(&Default::default(), 2);
        let shared = call("conductor", 1.0);
        // twice with the same allocations, then with the same text in new ones
        for e in [shared.clone(), shared, call("conductor", 2.0)] {
            g.on_event(&Event::Rpc(Box::new(e)));
        }
        let r = g.report(None);
        let calls: Vec<_> = r.edges.iter().filter(|e| e.kind == "call").collect();
        assert_eq!(calls.len(), 1, "one edge: {calls:?}");
        assert_eq!(calls[0].requests, 3);
        assert_eq!(g.folded, 0);
        // the cap (two edges: the call and its queue's deliver edge) is reached: a new
        // operation folds each time, however its names are held
        let other = call("scheduler", 3.0);
        for e in [other.clone(), other] {
            g.on_event(&Event::Rpc(Box::new(e)));
        }
        assert_eq!(g.folded, 4, "both edges of both events");
        assert_eq!(g.report(None).edges.len(), 2);
    }

    #[test]
    fn edges_count_and_window_slides() {
        let mut g = Graph::new(
            &crate::sink::requests::RequestsConfig {
                graph_window_s: 60.0,
                graph_slot_s: 10.0,
                ..Default::default()
            },
            100,
        );
        for i in 0..10 {
            let mut e = http(
                "nova-compute",
                "neutron",
                if i < 3 { 500 } else { 200 },
                0.01,
            );
            if let Event::Http(h) = &mut e {
                h.t_request = i as f64;
                h.t_response_end = Some(i as f64 + 0.01);
            }
            g.on_event(&e);
        }
        let r = g.report(Some(60.0));
        assert_eq!(r.edges.len(), 1);
        let e = &r.edges[0];
        assert_eq!(
            (e.source.as_str(), e.target.as_str()),
            ("service:nova-compute", "service:neutron-server")
        );
        assert_eq!((e.requests, e.errors), (10, 3));
        // the newest failure first, with what the body said
        assert_eq!(e.recent_errors.len(), 3);
        assert!((e.recent_errors[0].t - 2.01).abs() < 1e-6);
        assert_eq!(e.recent_errors[0].error, "HTTP 500");
        // the last 10 s: the slot of t = 0..10 holds them all
        assert_eq!(g.report(Some(10.0)).edges[0].requests, 10);
        // two windows later the old slots are gone
        let mut e = http("nova-compute", "neutron", 200, 0.01);
        if let Event::Http(h) = &mut e {
            h.t_request = 200.0;
            h.t_response_end = Some(200.01);
        }
        g.on_event(&e);
        let r = g.report(Some(60.0));
        assert_eq!(r.edges[0].requests, 1);
        assert!(r.edges[0].recent_errors.is_empty(), "older than the window");
        // more than the kept window: clamped to it
        assert_eq!(g.report(Some(3600.0)).edges[0].requests, 1);
        // everything since the start
        let all = g.report(None);
        assert_eq!((all.edges[0].requests, all.edges[0].errors), (11, 3));
        assert!((all.edges[0].rate_per_s - 11.0 / 200.0).abs() < 1e-6);
    }
}
