//! The Prometheus registry: DESIGN.md's metric families, with per-family caps on distinct
//! label sets (excess folds into "other", counted) so cardinality stays bounded.

use crate::contract::{Event, Outcome};
use crate::correlate::{Name, Signal};
use crate::health::Health;
use crate::{FastMap as HashMap, FastSet as HashSet};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Histograms = Family<Labels, Histogram>;

/// Buckets from 1 ms to 5 min: enough to tell a 2 ms reply from a 60 s timeout.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0,
];

fn histograms() -> Histograms {
    Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS))
}

/// Caps distinct label sets per family. Labels named in `keep` (small enumerations such as
/// type or outcome) survive a fold; the others become "other".
struct Cap {
    seen: HashSet<Labels>,
}

/// Handles already resolved for a (family, label values) key: the per-message signals
/// then cost one small key and a fast lookup instead of label vectors, a cap check and the
/// registry's own lookup. Bounded by the caps (folded sets share one key's handle).
const MAX_MEMO: usize = 1 << 16;

struct Memo<M> {
    /// Each label value after its length: values off the wire may hold any character, so
    /// no separator could tell ("a", "b c") from ("a b", "c").
    map: HashMap<(&'static str, Vec<u8>), M>,
    /// The key being looked up, reused: a hit costs no allocation.
    key: Vec<u8>,
}

impl<M> Default for Memo<M> {
    fn default() -> Self {
        Memo {
            map: HashMap::default(),
            key: Vec::new(),
        }
    }
}

impl<M: Clone> Memo<M> {
    fn get(&mut self, family: &'static str, parts: &[&str], resolve: impl FnOnce() -> M) -> M {
        self.with(family, parts, resolve, M::clone)
    }

    /// `use_` of the handles for `parts`, resolved the first time: without a copy of
    /// them (the hop's five handles were five reference counts up and down per event).
    fn with<R>(
        &mut self,
        family: &'static str,
        parts: &[&str],
        resolve: impl FnOnce() -> M,
        use_: impl FnOnce(&M) -> R,
    ) -> R {
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        for p in parts {
            key.extend_from_slice(&(p.len() as u64).to_le_bytes());
            key.extend_from_slice(p.as_bytes());
        }
        let key = (family, key);
        if let Some(m) = self.map.get(&key) {
            let r = use_(m);
            self.key = key.1;
            return r;
        }
        let m = resolve();
        let r = use_(&m);
        // the caps bound the series, not the raw label values seen: bound the memo too
        if self.map.len() < MAX_MEMO {
            self.map.insert(key, m);
        } else {
            self.key = key.1;
        }
        r
    }
}

/// In front of a `Memo`, for label values that are the correlator's interned names: the
/// same handles keyed by the names' addresses, with the names held so that no address is
/// reused while it is a key. A hit hashes a few words instead of spelling and hashing the
/// label text. A miss goes to the `Memo`, so caps and folds count exactly as without it.
///
/// The family is keyed by its text's address and length too (equal keys then mean equal
/// text), so a hit compares no text at all. Its hasher has fixed keys: the keys are
/// addresses, not text a sender chooses, and every lookup takes the map out of `Metrics`
/// (`mem::take`), which with a random-keyed hasher drew new random keys each time.
struct ByName<M> {
    map: std::collections::HashMap<NamesKey, (M, [Option<Name>; 3]), foldhash::fast::FixedState>,
}

/// A family (its text's address and length), up to three names by address, and a small
/// enumeration (type, outcome).
type NamesKey = super::address::Addresses<6>;

impl<M> Default for ByName<M> {
    fn default() -> Self {
        ByName {
            map: Default::default(),
        }
    }
}

impl<M: Clone> ByName<M> {
    fn get(
        &mut self,
        family: &'static str,
        names: [Option<&Name>; 3],
        tag: u8,
        resolve: impl FnOnce() -> M,
    ) -> M {
        let at = names.map(|n| n.map_or(0, |n| Arc::as_ptr(n) as *const u8 as usize));
        let key = super::address::Addresses([
            family.as_ptr() as usize,
            family.len(),
            at[0],
            at[1],
            at[2],
            usize::from(tag),
        ]);
        if let Some((m, _)) = self.map.get(&key) {
            return m.clone();
        }
        let m = resolve();
        if self.map.len() < MAX_MEMO {
            self.map.insert(key, (m.clone(), names.map(|n| n.cloned())));
        }
        m
    }
}

/// One kind of handle's two caches: by the interned names' addresses (`ByName`) in front
/// of by the label text (`Memo`). Taken out of `Metrics` while a miss is resolved
/// (`Metrics::cached`), since resolving needs the caps and the families.
struct Handles<M> {
    by_name: ByName<M>,
    by_text: Memo<M>,
}

impl<M> Default for Handles<M> {
    fn default() -> Self {
        Handles {
            by_name: ByName::default(),
            by_text: Memo::default(),
        }
    }
}

/// A family's handle for a label set: `names` (interned, with a small enumeration `tag`)
/// and the same label values as `texts`.
struct Key<'a, const N: usize> {
    family: &'static str,
    names: [&'a Name; N],
    tag: u8,
    texts: &'a [&'a str],
}

/// The series of one caller → server pair (see `on_hop`).
#[derive(Clone)]
struct HopHandles {
    edge: Counter,
    tempo: Counter,
    failed: Counter,
    server_s: Histogram,
    client_s: Histogram,
}

impl HopHandles {
    fn feed(&self, hop: &super::graph::Hop) {
        self.edge.inc();
        self.tempo.inc();
        if hop.failed {
            self.failed.inc();
        }
        if let Some(v) = hop.server_s {
            self.server_s.observe(v.max(0.0));
        }
        if let Some(v) = hop.client_s {
            self.client_s.observe(v.max(0.0));
        }
    }
}

pub struct Metrics {
    pub registry: Arc<Registry>,
    memo_hops: Memo<HopHandles>,
    counters: Handles<Counter>,
    histograms: Handles<Histogram>,
    gauges: Handles<Gauge>,
    max_series: usize,
    caps: HashMap<&'static str, Cap>,
    folded: BTreeMap<&'static str, u64>,
    rpc_messages: Counters,
    rpc_deliveries: Counters,
    rpc_undelivered: Counters,
    rpc_reply_wait: Histograms,
    rpc_queue_reply_wait: Histograms,
    rpc_queue_wait: Histograms,
    rpc_server: Histograms,
    rpc_reply_transit: Histograms,
    rpc_in_flight: Family<Labels, Gauge>,
    rpc_replies: Counters,
    rpc_remote_errors: Counters,
    rpc_timeouts: Counters,
    rpc_late_replies: Counters,
    rpc_heartbeats: Counters,
    rpc_redeliveries: Counters,
    amqp_consumer_cancels: Counters,
    amqp_returns: Counters,
    amqp_channel_closes: Counters,
    amqp_connection_closes: Counters,
    amqp_blocked: Counter,
    notifications: Counters,
    http_requests: Counters,
    http_duration: Histograms,
    graph_edges: Counters,
    error_chains: Counters,
    masked_failures: Counters,
    tempo_requests: Counters,
    tempo_failed: Counters,
    tempo_server: Histograms,
    tempo_client: Histograms,
    // probe health, synced from `Health` as deltas
    packets: Counter,
    bytes: Counter,
    drops: Counters,
    tcp_gap_bytes: Counter,
    anomalies: Counters,
    evictions: Counters,
    series_folded: Counters,
    amqp_frames: Counters,
    amqp_methods: Counters,
    partial_view: Gauge,
    unseen: Counters,
    exported: Health,
    exported_folded: BTreeMap<&'static str, u64>,
    fleet: super::fleet_metrics::FleetMetrics,
    otlp: super::otlp_metrics::OtlpMetrics,
}

/// A metric whose HELP and TYPE are written even before its first series: dashboards and
/// `absent()` alerts can then tell "none yet" from "not exported". (The encoder skips
/// families that report themselves empty.)
#[derive(Debug)]
pub(crate) struct Declared<M>(pub(crate) M);

impl<M: EncodeMetric> EncodeMetric for Declared<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
    fn is_empty(&self) -> bool {
        false
    }
}

fn l<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Metrics {
    pub fn new(max_series: usize) -> Metrics {
        // Tempo's service-graph families are unprefixed (Grafana's service graph reads
        // them as they are); everything else is stacktap_*
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("stacktap");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            counters: Handles::default(),
            histograms: Handles::default(),
            gauges: Handles::default(),
            memo_hops: Memo::default(),
            max_series,
            caps: HashMap::default(),
            folded: BTreeMap::new(),
            rpc_messages: Family::default(),
            rpc_deliveries: Family::default(),
            rpc_undelivered: Family::default(),
            rpc_reply_wait: histograms(),
            rpc_queue_reply_wait: histograms(),
            rpc_queue_wait: histograms(),
            rpc_server: histograms(),
            rpc_reply_transit: histograms(),
            rpc_in_flight: Family::default(),
            rpc_replies: Family::default(),
            rpc_remote_errors: Family::default(),
            rpc_timeouts: Family::default(),
            rpc_late_replies: Family::default(),
            rpc_heartbeats: Family::default(),
            rpc_redeliveries: Family::default(),
            amqp_consumer_cancels: Family::default(),
            amqp_returns: Family::default(),
            amqp_channel_closes: Family::default(),
            amqp_connection_closes: Family::default(),
            amqp_blocked: Counter::default(),
            notifications: Family::default(),
            http_requests: Family::default(),
            http_duration: histograms(),
            graph_edges: Family::default(),
            error_chains: Family::default(),
            masked_failures: Family::default(),
            tempo_requests: Family::default(),
            tempo_failed: Family::default(),
            tempo_server: histograms(),
            tempo_client: histograms(),
            packets: Counter::default(),
            bytes: Counter::default(),
            drops: Family::default(),
            tcp_gap_bytes: Counter::default(),
            anomalies: Family::default(),
            evictions: Family::default(),
            series_folded: Family::default(),
            amqp_frames: Family::default(),
            amqp_methods: Family::default(),
            partial_view: Gauge::default(),
            unseen: Family::default(),
            exported: Health::default(),
            exported_folded: BTreeMap::new(),
            fleet: Default::default(),
            otlp: Default::default(),
        };
        r.register(
            "rpc_messages",
            "RPC request messages seen (calls, casts, fanouts), once per message",
            Declared(m.rpc_messages.clone()),
        );
        r.register(
            "rpc_deliveries",
            "RPC request copies delivered to consumers (a fanout: one per queue)",
            Declared(m.rpc_deliveries.clone()),
        );
        r.register(
            "rpc_undelivered",
            "Casts and fanouts no consumer received within the settle window",
            Declared(m.rpc_undelivered.clone()),
        );
        r.register(
            "rpc_reply_wait_seconds",
            "Call publish to reply deliver, as the caller waits",
            Declared(m.rpc_reply_wait.clone()),
        );
        r.register(
            "rpc_queue_reply_wait_seconds",
            "Call publish to reply deliver, per target queue (routing key)",
            Declared(m.rpc_queue_reply_wait.clone()),
        );
        r.register(
            "rpc_queue_wait_seconds",
            "Request publish to deliver: time in the broker queue",
            Declared(m.rpc_queue_wait.clone()),
        );
        r.register(
            "rpc_server_seconds",
            "Request deliver to reply publish: time in the server",
            Declared(m.rpc_server.clone()),
        );
        r.register(
            "rpc_reply_transit_seconds",
            "Reply publish to reply deliver",
            Declared(m.rpc_reply_transit.clone()),
        );
        r.register(
            "rpc_in_flight",
            "Calls waiting for a reply now (not yet answered, not timed out)",
            Declared(m.rpc_in_flight.clone()),
        );
        r.register(
            "rpc_replies",
            "Calls finished, by outcome",
            Declared(m.rpc_replies.clone()),
        );
        r.register(
            "rpc_remote_errors",
            "Calls answered with a remote exception, by exception class",
            Declared(m.rpc_remote_errors.clone()),
        );
        r.register(
            "rpc_timeouts",
            "Calls whose caller timeout (AMQP expiration) passed without a reply",
            Declared(m.rpc_timeouts.clone()),
        );
        r.register(
            "rpc_late_replies",
            "Replies that arrived after the caller's timeout",
            Declared(m.rpc_late_replies.clone()),
        );
        r.register(
            "rpc_heartbeats",
            "Call-monitor heartbeats (ending:false replies)",
            Declared(m.rpc_heartbeats.clone()),
        );
        r.register(
            "rpc_redeliveries",
            "Copies redelivered to another consumer (a quorum queue after its consumer died) or read again (a stream consumer re-attaching); not new deliveries",
            Declared(m.rpc_redeliveries.clone()),
        );
        r.register(
            "amqp_consumer_cancels",
            "basic.cancel from the broker (queue deleted, or failed over with x-cancel-on-ha-failover), by the kind of queue",
            Declared(m.amqp_consumer_cancels.clone()),
        );
        r.register(
            "amqp_returns",
            "basic.return from the broker (312 NO_ROUTE: reply queue gone)",
            Declared(m.amqp_returns.clone()),
        );
        r.register(
            "amqp_channel_closes",
            "channel.close, by reply code",
            Declared(m.amqp_channel_closes.clone()),
        );
        r.register(
            "amqp_connection_closes",
            "connection.close, by reply code",
            Declared(m.amqp_connection_closes.clone()),
        );
        r.register(
            "amqp_connection_blocked",
            "connection.blocked from the broker (resource alarm)",
            Declared(m.amqp_blocked.clone()),
        );
        r.register(
            "notifications",
            "oslo.messaging notifications, by publisher service",
            Declared(m.notifications.clone()),
        );
        r.register(
            "http_requests",
            "REST requests, by caller, service, route template and status (none: no response)",
            Declared(m.http_requests.clone()),
        );
        r.register(
            "http_request_duration_seconds",
            "REST request start to response end",
            Declared(m.http_duration.clone()),
        );
        r.register(
            "graph_edge_requests",
            "Requests between two services (RPC: caller to server), by protocol",
            Declared(m.graph_edges.clone()),
        );
        r.register(
            "error_chains",
            "User requests that failed, by where the failure showed and its root cause",
            Declared(m.error_chains.clone()),
        );
        r.register(
            "masked_failures",
            "Failures a successful retry hid from the user",
            Declared(m.masked_failures.clone()),
        );
        r.register("packets", "Packets read", Declared(m.packets.clone()));
        r.register(
            "bytes",
            "Bytes read (wire length)",
            Declared(m.bytes.clone()),
        );
        r.register(
            "capture_drops",
            "Packets dropped before stacktap saw them (live capture)",
            Declared(m.drops.clone()),
        );
        r.register(
            "tcp_gap_bytes",
            "Bytes lost in TCP holes the capture never filled",
            Declared(m.tcp_gap_bytes.clone()),
        );
        r.register(
            "parse_anomalies",
            "Input that could not be used, by protocol and kind",
            Declared(m.anomalies.clone()),
        );
        r.register(
            "evictions",
            "Entries evicted from a bounded table",
            Declared(m.evictions.clone()),
        );
        r.register(
            "series_folded",
            "Label sets folded into \"other\" by the cardinality cap",
            Declared(m.series_folded.clone()),
        );
        r.register(
            "amqp_frames",
            "AMQP frames, by type (method, content-header, content-body, heartbeat)",
            Declared(m.amqp_frames.clone()),
        );
        r.register(
            "amqp_methods",
            "AMQP methods, by name (declare churn, acks, rejects, ...)",
            Declared(m.amqp_methods.clone()),
        );
        r.register(
            "partial_view",
            "1 while the analyser sees only part of the broker's traffic (one node of a cluster): timeouts and undelivered casts are then not judged",
            Declared(m.partial_view.clone()),
        );
        r.register(
            "unseen",
            "Evidence of a partial view, by kind: calls split by a hole, deliveries and replies of calls published elsewhere",
            Declared(m.unseen.clone()),
        );
        // the probe's health exists as zero from the start: "no drops" must not look like
        // "no probe"
        for table in [
            "tcp_flows",
            "tcp_flows_idle",
            "rpc_calls",
            "rpc_messages",
            "open_requests",
            "request_spans",
            "address_book",
        ] {
            let _ = m.evictions.get_or_create_owned(&l([("table", table)]));
        }
        let _ = m
            .series_folded
            .get_or_create_owned(&l([("family", "http_route")]));
        for evidence in [
            "split_call",
            "delivery_without_publish",
            "reply_without_call",
        ] {
            let _ = m.unseen.get_or_create_owned(&l([("evidence", evidence)]));
        }
        for place in ["kernel", "interface"] {
            let _ = m.drops.get_or_create_owned(&l([("where", place)]));
        }
        root.register(
            "traces_service_graph_request",
            "Requests between two services (Tempo service-graph compatible)",
            Declared(m.tempo_requests.clone()),
        );
        root.register(
            "traces_service_graph_request_failed",
            "Failed requests between two services (Tempo service-graph compatible)",
            Declared(m.tempo_failed.clone()),
        );
        root.register(
            "traces_service_graph_request_server_seconds",
            "Server-side duration (Tempo service-graph compatible)",
            Declared(m.tempo_server.clone()),
        );
        root.register(
            "traces_service_graph_request_client_seconds",
            "Client-side duration (Tempo service-graph compatible)",
            Declared(m.tempo_client.clone()),
        );
        let fleet =
            super::fleet_metrics::FleetMetrics::register(root.sub_registry_with_prefix("stacktap"));
        let otlp =
            super::otlp_metrics::OtlpMetrics::register(root.sub_registry_with_prefix("stacktap"));
        Metrics {
            registry: Arc::new(root),
            fleet,
            otlp,
            ..m
        }
    }

    /// The span exporter's counters.
    pub fn sync_otlp(&mut self, stats: &crate::otlp::export::ExportStats) {
        self.otlp.sync(stats);
    }

    /// The collector's probes (live, last seen, offsets, their health).
    pub fn sync_probes(&mut self, probes: &[crate::fleet::merge::ProbeInfo]) {
        self.fleet.sync(probes);
    }

    /// Admits a label set under the family's cap, or folds it.
    fn cap(&mut self, family: &'static str, labels: Labels, keep: &[&str]) -> Labels {
        let max = self.max_series;
        let cap = self.caps.entry(family).or_insert_with(|| Cap {
            seen: HashSet::default(),
        });
        if cap.seen.contains(&labels) {
            return labels;
        }
        if cap.seen.len() < max {
            cap.seen.insert(labels.clone());
            return labels;
        }
        *self.folded.entry(family).or_default() += 1;
        labels
            .into_iter()
            .map(|(k, v)| {
                if keep.contains(&k) {
                    (k, v)
                } else {
                    (k, "other".into())
                }
            })
            .collect()
    }

    #[inline(never)] // a stage's entry: scripts/stage-cost counts it (one call per event)
    pub fn on_signal(&mut self, s: &Signal) {
        match s {
            Signal::Seen {
                exchange,
                topic,
                method,
                rpc_type,
            } => {
                self.message_counter("rpc_messages", [exchange, topic, method], *rpc_type)
                    .inc();
            }
            Signal::Delivered {
                exchange,
                topic,
                method,
                rpc_type,
                ..
            } => {
                self.message_counter("rpc_deliveries", [exchange, topic, method], *rpc_type)
                    .inc();
            }
            Signal::InFlight { topic, delta } => {
                // every call twice
                let g = self.one_name(
                    |m| &mut m.gauges,
                    "rpc_in_flight",
                    topic,
                    |m, topic| {
                        let ls = m.cap("rpc_in_flight", l([("topic", topic)]), &[]);
                        m.rpc_in_flight.get_or_create_owned(&ls)
                    },
                );
                g.inc_by(*delta);
            }
            Signal::TimedOut { topic, method } => {
                let ls = self.cap(
                    "rpc_timeouts",
                    l([("topic", topic), ("method", method)]),
                    &[],
                );
                self.rpc_timeouts.get_or_create(&ls).inc();
            }
            Signal::Heartbeat { topic, method } => {
                let ls = self.cap(
                    "rpc_heartbeats",
                    l([("topic", topic), ("method", method)]),
                    &[],
                );
                self.rpc_heartbeats.get_or_create(&ls).inc();
            }
            Signal::Redelivered { topic, method } => {
                let ls = self.cap(
                    "rpc_redeliveries",
                    l([("topic", topic), ("method", method)]),
                    &[],
                );
                self.rpc_redeliveries.get_or_create(&ls).inc();
            }
            Signal::ConsumerCancelled { queue } => {
                self.amqp_consumer_cancels
                    .get_or_create(&l([("queue_kind", crate::oslo::queue_kind(queue))]))
                    .inc();
            }
            Signal::Returned { reply_code } => {
                self.amqp_returns
                    .get_or_create(&l([("reply_code", &reply_code.to_string())]))
                    .inc();
            }
            Signal::ChannelClosed { reply_code, .. } => {
                self.amqp_channel_closes
                    .get_or_create(&l([("reply_code", &reply_code.to_string())]))
                    .inc();
            }
            Signal::ConnectionClosed { reply_code, .. } => {
                self.amqp_connection_closes
                    .get_or_create(&l([("reply_code", &reply_code.to_string())]))
                    .inc();
            }
            Signal::Blocked => {
                self.amqp_blocked.inc();
            }
            Signal::Event(Event::Notification(n)) => {
                // the service part of publisher_id ("compute" of "compute.host1"): per-host
                // series would grow with the fleet
                let publisher = n.publisher_id.split(['.', ':']).next().unwrap_or("");
                let (event_type, priority) = (&*n.event_type, &*n.priority);
                let mut memo = std::mem::take(&mut self.counters.by_text);
                let c = memo.get("notifications", &[publisher, event_type, priority], || {
                    let ls = self.cap(
                        "notifications",
                        l([
                            ("publisher", publisher),
                            ("event_type", event_type),
                            ("priority", priority),
                        ]),
                        &["priority"],
                    );
                    self.notifications.get_or_create_owned(&ls)
                });
                self.counters.by_text = memo;
                c.inc();
            }
            Signal::Event(Event::Rpc(e)) => self.on_rpc(e),
            Signal::Event(Event::Http(e)) => self.on_http(e),
            Signal::Event(Event::Chain(c)) => {
                let ls = self.cap(
                    "error_chains",
                    l([
                        (
                            "origin_service",
                            c.origin.service.as_deref().unwrap_or("unknown"),
                        ),
                        ("origin_operation", &c.origin.operation),
                        (
                            "root_service",
                            c.root.service.as_deref().unwrap_or("unknown"),
                        ),
                        ("root_operation", &c.root.operation),
                        ("root_error", c.root.error.as_deref().unwrap_or("unknown")),
                    ]),
                    &[],
                );
                self.error_chains.get_or_create(&ls).inc();
            }
            Signal::Masked(m) => {
                let ls = self.cap(
                    "masked_failures",
                    l([
                        ("service", m.service.as_deref().unwrap_or("unknown")),
                        ("operation", &m.operation),
                        ("error", &m.error),
                    ]),
                    &[],
                );
                self.masked_failures.get_or_create(&ls).inc();
            }
            Signal::Request(_) => {}
        }
        if let Signal::Event(ev) = s {
            super::graph::hops_of(ev, |hop| self.on_hop(&hop));
        }
    }

    /// The service-graph families, for one caller → server observation.
    fn on_hop(&mut self, hop: &super::graph::Hop) {
        let conn = hop.connection_type;
        let (client, server) = (hop.client, &*hop.server);
        let mut memo = std::mem::take(&mut self.memo_hops);
        memo.with(
            "hop",
            &[client, server, hop.protocol, conn],
            || self.hop_handles(client, server, hop.protocol, conn),
            |handles| handles.feed(hop),
        );
        self.memo_hops = memo;
    }

    /// The five series one caller → server pair feeds, resolved once per pair.
    fn hop_handles(
        &mut self,
        client: &str,
        server: &str,
        protocol: &'static str,
        conn: &'static str,
    ) -> HopHandles {
        let edge = {
            let ls = self.cap(
                "graph_edge_requests",
                l([
                    ("client", client),
                    ("server", server),
                    ("protocol", protocol),
                ]),
                &["protocol"],
            );
            self.graph_edges.get_or_create_owned(&ls)
        };
        let pair = l([
            ("client", client),
            ("server", server),
            ("connection_type", conn),
        ]);
        let mut capped = |family| self.cap(family, pair.clone(), &["connection_type"]);
        let (t, f, s, c) = (
            capped("traces_service_graph_request"),
            capped("traces_service_graph_request_failed"),
            capped("traces_service_graph_request_server_seconds"),
            capped("traces_service_graph_request_client_seconds"),
        );
        let tempo = self.tempo_requests.get_or_create_owned(&t);
        let failed = self.tempo_failed.get_or_create_owned(&f);
        let server_s = self.tempo_server.get_or_create_owned(&s);
        let client_s = self.tempo_client.get_or_create_owned(&c);
        HopHandles {
            edge,
            tempo,
            failed,
            server_s,
            client_s,
        }
    }

    fn on_http(&mut self, e: &crate::contract::HttpEvent) {
        let client = e.client.service.as_deref().unwrap_or("external");
        let service = e.service.as_deref().unwrap_or("unknown");
        // spelled on the stack: a String per exchange was an allocation and a free
        let mut digits = itoa::Buffer::new();
        let code = e.status.map_or("none", |s| digits.format(s));
        let mut memo = std::mem::take(&mut self.counters.by_text);
        let c = memo.get(
            "http_requests",
            &[client, service, e.method, &e.route, code],
            || {
                let ls = self.cap(
                    "http_requests",
                    l([
                        ("client", client),
                        ("service", service),
                        ("method", e.method),
                        ("route", &e.route),
                        ("code", code),
                    ]),
                    &["method", "code"],
                );
                self.http_requests.get_or_create_owned(&ls)
            },
        );
        self.counters.by_text = memo;
        c.inc();
        if let Some(d) = e.duration_s {
            let mut memo = std::mem::take(&mut self.histograms.by_text);
            let h = memo.get("http_duration", &[service, e.method, &e.route], || {
                let ls = self.cap(
                    "http_request_duration_seconds",
                    l([
                        ("service", service),
                        ("method", e.method),
                        ("route", &e.route),
                    ]),
                    &["method"],
                );
                self.http_duration.get_or_create_owned(&ls)
            });
            self.histograms.by_text = memo;
            h.observe(d.max(0.0));
        }
    }

    fn on_rpc(&mut self, e: &crate::contract::RpcEvent) {
        let (topic, method) = (&*e.topic, &*e.method);
        if let Some(v) = e.queue_wait() {
            self.topic_method_histogram("queue_wait", &e.topic, &e.method)
                .observe(v);
        }
        if e.rpc_type != crate::oslo::RpcType::Call {
            if matches!(e.outcome, Outcome::Undelivered | Outcome::Unroutable) {
                let ls = self.cap(
                    "rpc_undelivered",
                    l([
                        ("topic", topic),
                        ("method", method),
                        ("type", e.rpc_type.as_str()),
                    ]),
                    &["type"],
                );
                self.rpc_undelivered.get_or_create(&ls).inc();
            }
            return;
        }
        let outcome = e.outcome.as_str();
        let key = Key {
            family: "rpc_replies",
            names: [&e.topic, &e.method],
            tag: e.outcome as u8,
            texts: &[topic, method, outcome],
        };
        let replies = self.cached(
            |m| &mut m.counters,
            key,
            |m| {
                let ls = m.cap(
                    "rpc_replies",
                    l([("topic", topic), ("method", method), ("outcome", outcome)]),
                    &["outcome"],
                );
                m.rpc_replies.get_or_create_owned(&ls)
            },
        );
        replies.inc();
        if let Some(v) = e.server_time() {
            self.topic_method_histogram("server", &e.topic, &e.method)
                .observe(v);
        }
        match e.outcome {
            Outcome::Ok | Outcome::RemoteError => {
                if let Some(v) = e.reply_wait() {
                    self.topic_method_histogram("reply_wait", &e.topic, &e.method)
                        .observe(v);
                    let histograms: fn(&mut Self) -> &mut Handles<Histogram> =
                        |m| &mut m.histograms;
                    let q = self.one_name(histograms, "rpc_queue", &e.routing_key, |m, queue| {
                        let ls = m.cap("rpc_queue", l([("queue", queue)]), &[]);
                        m.rpc_queue_reply_wait.get_or_create_owned(&ls)
                    });
                    let t = self.one_name(histograms, "rpc_reply_transit", &e.topic, |m, topic| {
                        let ls = m.cap("rpc_topic", l([("topic", topic)]), &[]);
                        m.rpc_reply_transit.get_or_create_owned(&ls)
                    });
                    q.observe(v);
                    if let Some(v) = e.reply_transit() {
                        t.observe(v);
                    }
                }
            }
            Outcome::LateReply => {
                let ls = self.cap(
                    "rpc_topic_method",
                    l([("topic", topic), ("method", method)]),
                    &[],
                );
                self.rpc_late_replies.get_or_create(&ls).inc();
            }
            _ => {}
        }
        if e.outcome == Outcome::RemoteError {
            let class = e
                .error
                .as_ref()
                .map(|x| x.class.as_str())
                .unwrap_or("unknown");
            let ls = self.cap(
                "rpc_remote_errors",
                l([("topic", topic), ("method", method), ("exception", class)]),
                &[],
            );
            self.rpc_remote_errors.get_or_create(&ls).inc();
        }
    }

    fn message_counter(
        &mut self,
        family: &'static str,
        names: [&Name; 3],
        kind: crate::oslo::RpcType,
    ) -> Counter {
        let [exchange, topic, method] = names.map(|n| &**n);
        let type_ = kind.as_str();
        let key = Key {
            family,
            names,
            tag: kind as u8,
            texts: &[exchange, topic, method, type_],
        };
        self.cached(
            |m| &mut m.counters,
            key,
            |m| {
                let ls = m.cap(
                    family,
                    l([
                        ("exchange", exchange),
                        ("topic", topic),
                        ("method", method),
                        ("type", type_),
                    ]),
                    &["type"],
                );
                let fam = if family == "rpc_messages" {
                    &m.rpc_messages
                } else {
                    &m.rpc_deliveries
                };
                fam.get_or_create_owned(&ls)
            },
        )
    }

    /// The histogram of one topic and method in family `which`.
    fn topic_method_histogram(
        &mut self,
        which: &'static str,
        topic: &Name,
        method: &Name,
    ) -> Histogram {
        let key = Key {
            family: which,
            names: [topic, method],
            tag: 0,
            texts: &[topic, method],
        };
        self.cached(
            |m| &mut m.histograms,
            key,
            |m| {
                let ls = m.cap(
                    "rpc_topic_method",
                    l([("topic", topic), ("method", method)]),
                    &[],
                );
                match which {
                    "queue_wait" => m.rpc_queue_wait.get_or_create_owned(&ls),
                    "server" => m.rpc_server.get_or_create_owned(&ls),
                    _ => m.rpc_reply_wait.get_or_create_owned(&ls),
                }
            },
        )
    }

    /// The handle of family `family` whose one label value is the interned `name`, made by
    /// `create` (given the name's text) the first time.
    fn one_name<M: Clone>(
        &mut self,
        which: fn(&mut Self) -> &mut Handles<M>,
        family: &'static str,
        name: &Name,
        create: impl FnOnce(&mut Self, &str) -> M,
    ) -> M {
        let text = &**name;
        let key = Key {
            family,
            names: [name],
            tag: 0,
            texts: &[text],
        };
        self.cached(which, key, |m| create(m, text))
    }

    /// The handle for `key` in the caches `which` picks, made by `create` the first time:
    /// by the names' addresses, then by the label text (see `ByName`).
    fn cached<M: Clone, const N: usize>(
        &mut self,
        which: fn(&mut Self) -> &mut Handles<M>,
        key: Key<'_, N>,
        create: impl FnOnce(&mut Self) -> M,
    ) -> M {
        let mut names = [None; 3];
        for (at, n) in names.iter_mut().zip(key.names) {
            *at = Some(n);
        }
        // the text cache is taken out only on a miss: a fresh one (its hasher's random
        // keys) for every hit cost more than the lookup
        let mut by_name = std::mem::take(&mut which(self).by_name);
        let m = by_name.get(key.family, names, key.tag, || {
            let mut by_text = std::mem::take(&mut which(self).by_text);
            let m = by_text.get(key.family, key.texts, || create(self));
            which(self).by_text = by_text;
            m
        });
        which(self).by_name = by_name;
        m
    }

    /// Probe-health counters follow `Health` (cumulative) by deltas.
    pub fn sync_health(&mut self, h: &Health) {
        let old = &mut self.exported;
        self.packets.inc_by(h.packets - old.packets);
        self.bytes.inc_by(h.bytes - old.bytes);
        self.tcp_gap_bytes
            .inc_by(h.tcp_gap_bytes - old.tcp_gap_bytes);
        if h.kernel_drops != old.kernel_drops {
            self.drops
                .get_or_create(&l([("where", "kernel")]))
                .inc_by(h.kernel_drops.saturating_sub(old.kernel_drops));
        }
        if h.if_drops != old.if_drops {
            self.drops
                .get_or_create(&l([("where", "interface")]))
                .inc_by(h.if_drops.saturating_sub(old.if_drops));
        }
        if h.anomalies != old.anomalies {
            for ((proto, kind), n) in &h.anomalies {
                let before = old.anomalies.get(&(*proto, *kind)).copied().unwrap_or(0);
                if *n > before {
                    self.anomalies
                        .get_or_create(&l([("protocol", proto), ("kind", kind)]))
                        .inc_by(n - before);
                }
            }
        }
        if h.evictions != old.evictions {
            for (table, n) in &h.evictions {
                let before = old.evictions.get(table).copied().unwrap_or(0);
                self.evictions
                    .get_or_create(&l([("table", table)]))
                    .inc_by(n - before);
            }
        }
        let old_frames: BTreeMap<_, _> = old.frames_by_name().collect();
        for (name, n) in h.frames_by_name() {
            let before = old_frames.get(name).copied().unwrap_or(0);
            if n > before {
                self.amqp_frames
                    .get_or_create(&l([("type", name)]))
                    .inc_by(n - before);
            }
        }
        let old_methods = old.methods_by_name();
        for (name, n) in h.methods_by_name() {
            let before = old_methods.get(name).copied().unwrap_or(0);
            if n > before {
                self.amqp_methods
                    .get_or_create(&l([("method", name)]))
                    .inc_by(n - before);
            }
        }
        self.partial_view.set(h.partial_view as i64);
        for (kind, n) in &h.unseen {
            let before = old.unseen.get(kind).copied().unwrap_or(0);
            if *n > before {
                self.unseen
                    .get_or_create(&l([("evidence", kind)]))
                    .inc_by(n - before);
            }
        }
        // folds by the metric caps (here) and by the route cap (the pipeline's health)
        let mut folded = self.folded.clone();
        for (family, n) in &h.series_folded {
            *folded.entry(family).or_default() += n;
        }
        for (family, n) in &folded {
            let before = self.exported_folded.get(family).copied().unwrap_or(0);
            if *n > before {
                self.series_folded
                    .get_or_create(&l([("family", family)]))
                    .inc_by(n - before);
            }
        }
        self.exported_folded = folded;
        *old = h.clone();
        old.series_folded = self.folded.clone();
    }

    /// The exposition text, with series in a stable order (the registry keeps them in hash
    /// order) so that a replay writes the same file every time.
    pub fn render(registry: &Registry) -> String {
        let mut raw = String::new();
        encode(&mut raw, registry).expect("writing to a String cannot fail");
        // a label value off the wire keeps no control character (its newlines are already
        // escaped by the encoder; an ESC would reach whoever reads the exposition raw)
        let raw = crate::text::printable_text(&raw).into_owned();
        let mut out = String::with_capacity(raw.len());
        let mut block: Vec<&str> = Vec::new();
        let flush = |block: &mut Vec<&str>, out: &mut String| {
            // one series = the same labels without `le`; its lines keep their order
            block.sort_by_key(|line| series_key(line));
            for line in block.drain(..) {
                out.push_str(line);
                out.push('\n');
            }
        };
        for line in raw.lines() {
            if line.starts_with('#') {
                flush(&mut block, &mut out);
                out.push_str(line);
                out.push('\n');
            } else {
                block.push(line);
            }
        }
        flush(&mut block, &mut out);
        out
    }
}

/// The label part of a sample line without its `le` label.
fn series_key(line: &str) -> String {
    let labels = line
        .find('{')
        .and_then(|a| line.rfind('}').map(|b| &line[a + 1..b]))
        .unwrap_or("");
    labels
        .split("\",")
        .filter(|kv| !kv.starts_with("le="))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{NotificationEvent, Process};

    fn notification(publisher_id: &str, event_type: &str) -> Signal {
        let publisher = Arc::new(Process {
            service: Some("nova-compute".into()),
            pid: None,
            host: "10.0.0.1".into(),
        });
        let n = NotificationEvent {
            publisher_id: publisher_id.into(),
            ..crate::testing::notification(publisher, event_type, "INFO", 1.0)
        };
        Signal::Event(Event::Notification(Box::new(n)))
    }

    /// Label values come off the wire and may hold any character: two label sets that
    /// spell the same text when joined are still two series.
    #[test]
    fn label_sets_that_join_alike_are_apart() {
        let mut m = Metrics::new(100);
        m.on_signal(&notification("a\u{1f}b", "c"));
        m.on_signal(&notification("a", "b\u{1f}c"));
        m.on_signal(&notification("a", "b\u{1f}c"));
        let text = Metrics::render(&m.registry);
        let counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("stacktap_notifications_total{"))
            .collect();
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(counts.iter().any(|l| l.ends_with(" 1")), "{counts:?}");
        assert!(counts.iter().any(|l| l.ends_with(" 2")), "{counts:?}");
    }
}
