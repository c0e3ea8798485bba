//! The call graph: services, the queues and exchanges where RPC messages wait, and the
//! external client as nodes; REST (per route) and RPC (per topic.method) as edges, each
//! with rate, error ratio, latency quantiles and, for RPC calls, the reply-wait split.
//!
//! An RPC edge goes caller → queue → callee. Statistics cover a sliding window of packet
//! time (live) or the whole input (replay), kept as slots so the window slides cheaply.

use super::sketch::{Quantiles, Sketch};
use crate::FastMap as HashMap;
use crate::event::{Event, HttpEvent, Outcome, RpcEvent};
use crate::oslo::RpcType;
use crate::time::Ts;
use crate::trace::api_process_name;
use petgraph::graph::{DiGraph, EdgeIndex, NodeIndex};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;

/// Slots a window is cut into (the oldest slides out whole).
const SLOTS: u64 = 6;

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
    latency: Sketch,
    /// Queue wait, server time, reply transit (RPC calls only).
    split: Option<Box<[Sketch; 3]>>,
}

struct EdgeStats {
    protocol: &'static str,
    kind: &'static str,
    operation: String,
    slots: VecDeque<Slot>,
}

/// One endpoint-to-endpoint observation, as the Tempo-style metrics see it.
pub struct Hop<'a> {
    pub client: &'a str,
    pub server: std::borrow::Cow<'a, str>,
    /// "http" or "rpc".
    pub protocol: &'static str,
    pub failed: bool,
    /// Client-side duration: request to response end, publish to reply delivery.
    pub client_s: Option<f64>,
    /// Server-side duration: the same for REST, delivery to reply publish for RPC.
    pub server_s: Option<f64>,
}

/// The REST caller as a graph node name: a service type named by keystonemiddleware is
/// its API process; nothing known is the external client.
fn http_client(e: &HttpEvent) -> &str {
    let c = e.client.service.as_deref().unwrap_or("external");
    match c {
        "nova" | "neutron" | "glance" | "placement" | "cinder" | "heat" | "designate"
        | "octavia" | "barbican" | "ironic" => api_process_name(c),
        other => other,
    }
}

fn http_server(e: &HttpEvent) -> &str {
    api_process_name(e.service.as_deref().unwrap_or("unknown"))
}

/// An edge's operation, keyed without building its text (built once, for the report).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Op {
    Http(&'static str, Arc<str>),
    Rpc(Arc<str>, Arc<str>),
}

impl Op {
    fn text(&self) -> String {
        match self {
            Op::Http(m, r) => format!("{m} {r}"),
            Op::Rpc(t, m) => format!("{t}.{m}"),
        }
    }
}

fn rpc_failed(e: &RpcEvent) -> bool {
    !matches!(e.outcome, Outcome::Ok | Outcome::NoReply)
}

fn name(p: &Option<std::sync::Arc<crate::event::Process>>) -> &str {
    p.as_ref()
        .and_then(|p| p.service.as_deref())
        .unwrap_or("unknown")
}

/// The caller → callee observation of an event (None for notifications and chains).
pub fn hop_of(ev: &Event) -> Option<Hop<'_>> {
    match ev {
        Event::Http(e) => Some(Hop {
            client: http_client(e),
            server: http_server(e).into(),
            protocol: "http",
            failed: e.status.is_none_or(|s| s >= 500),
            client_s: e.duration_s,
            server_s: e.duration_s,
        }),
        Event::Rpc(e) => Some(Hop {
            client: name(&e.caller),
            server: match e.callee.as_ref().and_then(|p| p.service.as_deref()) {
                Some(s) => s.into(),
                None => format!("queue:{}", e.topic).into(),
            },
            protocol: "rpc",
            failed: rpc_failed(e),
            client_s: e.reply_wait(),
            server_s: e.server_time(),
        }),
        _ => None,
    }
}

pub struct Graph {
    /// None: the whole input (replay).
    window_ns: Option<u64>,
    graph: DiGraph<Node, EdgeStats>,
    /// Per node kind, by name.
    nodes: [HashMap<Box<str>, NodeIndex>; 4],
    edges: HashMap<(NodeIndex, NodeIndex, &'static str, Op), EdgeIndex>,
    first: Option<Ts>,
    now: Ts,
    max_edges: usize,
    pub folded: u64,
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
    pub error_ratio: f64,
    pub rate_per_s: f64,
    pub latency_s: Quantiles,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_wait_split: Option<Split>,
}

#[derive(Debug, Serialize)]
pub struct Split {
    pub queue_wait_s: Quantiles,
    pub server_s: Quantiles,
    pub reply_transit_s: Quantiles,
}

#[derive(Debug, Serialize)]
pub struct GraphReport {
    /// Seconds of packet time the statistics cover.
    pub window_s: f64,
    pub nodes: Vec<Node>,
    pub edges: Vec<EdgeReport>,
}

impl Graph {
    pub fn new(window_s: Option<f64>, max_edges: usize) -> Graph {
        Graph {
            window_ns: window_s.map(|w| (w.max(1.0) * 1e9) as u64),
            graph: DiGraph::new(),
            nodes: Default::default(),
            edges: HashMap::default(),
            first: None,
            now: Ts::ZERO,
            max_edges,
            folded: 0,
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
        match self.window_ns {
            Some(w) => t.0 / (w / SLOTS).max(1),
            None => 0,
        }
    }

    /// The current slot of an edge, created on first use (None past the edge cap).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        from: NodeIndex,
        to: NodeIndex,
        protocol: &'static str,
        kind: &'static str,
        op: &Op,
        t: Ts,
        failed: bool,
        latency: Option<f64>,
        split: Option<[Option<f64>; 3]>,
    ) {
        let key = (from, to, kind, op.clone());
        let e = match self.edges.get(&key) {
            Some(&e) => e,
            None if self.edges.len() >= self.max_edges => {
                self.folded += 1;
                return;
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
                    },
                );
                self.edges.insert(key, e);
                e
            }
        };
        let index = self.slot_index(t);
        let stats = &mut self.graph[e];
        if stats.slots.back().is_none_or(|s| s.index < index) {
            stats.slots.push_back(Slot {
                index,
                ..Slot::default()
            });
            while stats.slots.len() as u64 > SLOTS {
                stats.slots.pop_front();
            }
        }
        let slot = stats.slots.back_mut().expect("pushed");
        slot.requests += 1;
        slot.errors += failed as u64;
        if let Some(v) = latency {
            slot.latency.observe(v);
        }
        if let Some(parts) = split {
            let sk = slot.split.get_or_insert_with(Default::default);
            for (s, v) in sk.iter_mut().zip(parts) {
                if let Some(v) = v {
                    s.observe(v);
                }
            }
        }
    }

    /// The newest packet time seen, in seconds.
    pub fn latest(&self) -> Option<f64> {
        self.first.map(|_| self.now.as_secs_f64())
    }

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
        match ev {
            Event::Http(e) => {
                let client = http_client(e);
                let kind = if client == "external" || e.client.service.is_none() {
                    NodeKind::Client
                } else {
                    NodeKind::Service
                };
                let from = self.node(kind, client);
                let to = self.node(NodeKind::Service, http_server(e));
                let op = Op::Http(e.method, e.route.clone());
                let failed = e.status.is_none_or(|s| s >= 500);
                self.record(
                    from,
                    to,
                    "http",
                    "http",
                    &op,
                    now,
                    failed,
                    e.duration_s,
                    None,
                );
            }
            Event::Rpc(e) => {
                let from = self.node(NodeKind::Service, name(&e.caller));
                let qkind = match e.rpc_type {
                    RpcType::Fanout => NodeKind::Exchange,
                    _ => NodeKind::Queue,
                };
                let q = self.node(qkind, &e.topic);
                let op = Op::Rpc(e.topic.clone(), e.method.clone());
                let failed = rpc_failed(e);
                let call = e.rpc_type == RpcType::Call;
                let split = call.then(|| [e.queue_wait(), e.server_time(), e.reply_transit()]);
                let kind = e.rpc_type.as_str();
                self.record(
                    from,
                    q,
                    "rpc",
                    kind,
                    &op,
                    now,
                    failed,
                    e.reply_wait(),
                    split,
                );
                if let Some(callee) = e.callee.as_ref().and_then(|p| p.service.as_deref()) {
                    let to = self.node(NodeKind::Service, callee);
                    let server = e.server_time();
                    self.record(q, to, "rpc", "deliver", &op, now, false, server, None);
                }
            }
            _ => {}
        }
    }

    pub fn report(&self) -> GraphReport {
        let newest = self.slot_index(self.now);
        let live = |s: &&Slot| newest.saturating_sub(s.index) < SLOTS;
        let window_s = match self.window_ns {
            Some(w) => w as f64 / 1e9,
            None => self.first.map_or(0.0, |f| self.now.secs_since(f)).max(1e-9),
        };
        let mut edges: Vec<EdgeReport> = self
            .graph
            .edge_indices()
            .filter_map(|e| {
                let (a, b) = self.graph.edge_endpoints(e)?;
                let st = &self.graph[e];
                let (mut requests, mut errors) = (0, 0);
                let mut latency = Sketch::default();
                let mut split: Option<[Sketch; 3]> = None;
                for s in st.slots.iter().filter(live) {
                    requests += s.requests;
                    errors += s.errors;
                    latency.merge(&s.latency);
                    if let Some(p) = &s.split {
                        let acc = split.get_or_insert_with(Default::default);
                        for (x, y) in acc.iter_mut().zip(p.iter()) {
                            x.merge(y);
                        }
                    }
                }
                (requests > 0).then(|| EdgeReport {
                    source: self.graph[a].id.clone(),
                    target: self.graph[b].id.clone(),
                    protocol: st.protocol,
                    kind: st.kind,
                    operation: st.operation.clone(),
                    requests,
                    errors,
                    error_ratio: errors as f64 / requests as f64,
                    rate_per_s: requests as f64 / window_s,
                    latency_s: latency.summary(),
                    reply_wait_split: split.map(|[q, s, t]| Split {
                        queue_wait_s: q.summary(),
                        server_s: s.summary(),
                        reply_transit_s: t.summary(),
                    }),
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
        let used: std::collections::BTreeMap<&str, &Node> = self
            .graph
            .edge_indices()
            .filter(|&e| self.graph[e].slots.iter().any(|s| live(&s)))
            .filter_map(|e| self.graph.edge_endpoints(e))
            .flat_map(|(a, b)| [&self.graph[a], &self.graph[b]])
            .map(|n| (n.id.as_str(), n))
            .collect();
        let nodes = used.into_values().cloned().collect();
        GraphReport {
            window_s,
            nodes,
            edges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{HttpOutcome, Process};
    use std::sync::Arc;

    fn http(client: &str, service: &str, status: u16, d: f64) -> Event {
        Event::Http(Box::new(HttpEvent {
            kind: "http",
            client: Process {
                service: Some(client.into()),
                pid: None,
                host: "10.0.0.1".into(),
            },
            user_agent: None,
            service: Some(Arc::from(service)),
            server: "10.0.0.2:9696".into(),
            method: "PUT",
            route: Arc::from("/v2.0/ports/{id}"),
            path: "/v2.0/ports/x".into(),
            status: Some(status),
            t_request: 0.0,
            t_response: Some(d),
            t_response_end: Some(d),
            duration_s: Some(d),
            request_id: None,
            global_request_id: None,
            outcome: HttpOutcome::Ok,
            truncated: false,
            error: None,
        }))
    }

    #[test]
    fn edges_count_and_window_slides() {
        let mut g = Graph::new(Some(60.0), 100);
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
        let r = g.report();
        assert_eq!(r.edges.len(), 1);
        let e = &r.edges[0];
        assert_eq!(
            (e.source.as_str(), e.target.as_str()),
            ("service:nova-compute", "service:neutron-server")
        );
        assert_eq!((e.requests, e.errors), (10, 3));
        // two windows later the old slots are gone
        let mut e = http("nova-compute", "neutron", 200, 0.01);
        if let Event::Http(h) = &mut e {
            h.t_request = 200.0;
            h.t_response_end = Some(200.01);
        }
        g.on_event(&e);
        let r = g.report();
        assert_eq!(r.edges[0].requests, 1);
    }
}
