//! The end-of-replay summary: top queues by reply wait, RPC errors, REST routes by errors
//! and latency per service, anomalies. Also served live as `/api/summary`.

use super::sketch::{Quantiles, Sketch};
use crate::FastMap;
use crate::contract::{Event, HttpEvent, Outcome, RpcEvent};
use crate::correlate::{Name, Signal};
use crate::health::Health;
use crate::oslo::RpcType;
use crate::sink::requests::RcaReport;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Default)]
struct QueueStats {
    outcomes: BTreeMap<&'static str, u64>,
    reply_wait: Sketch,
    queue_wait: Sketch,
    server: Sketch,
    timeout_s: Option<f64>,
}

impl QueueStats {
    /// A call's outcome and times.
    fn add(&mut self, e: &RpcEvent) {
        *self.outcomes.entry(e.outcome.as_str()).or_default() += 1;
        self.timeout_s = self.timeout_s.or(e.timeout_s);
        if matches!(e.outcome, Outcome::Ok | Outcome::RemoteError)
            && let Some(v) = e.reply_wait()
        {
            self.reply_wait.observe(v);
        }
        if let Some(v) = e.queue_wait() {
            self.queue_wait.observe(v);
        }
        if let Some(v) = e.server_time() {
            self.server.observe(v);
        }
    }
}

/// `[summary]`: the rows the summary (`--report`, `/api/summary`) keeps. Past a cap,
/// further keys share one row and each one so folded is counted (the report's
/// evictions: `summary_queues`, `summary_errors`, `summary_routes`).
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SummaryConfig {
    /// Queues with a row of their own; calls to further queues share the row "other".
    pub max_queues: usize,
    /// (operation, exception) pairs with a row of their own; further ones share "other".
    pub max_errors: usize,
    /// REST routes with a row of their own (over every service); further ones share one
    /// "{other}" route per service.
    pub max_routes: usize,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        SummaryConfig {
            max_queues: 10_000,
            max_errors: 10_000,
            max_routes: 10_000,
        }
    }
}

#[derive(Default)]
struct RouteStats {
    /// By status code; 0 = no response seen.
    codes: BTreeMap<u16, u64>,
    latency: Sketch,
    /// The last fault an error body named ("PortBindingFailed: Binding failed …").
    last_error: Option<String>,
}

#[derive(Default)]
pub struct Summary {
    /// Hashed, not ordered: looked up for every call; the report sorts.
    queues: FastMap<String, QueueStats>,
    /// Messages seen, by type (calls, casts, fanouts): the report gives only these totals,
    /// so nothing is kept per topic or method (a map of those grew with every method name
    /// a sender chose, and hashed two names' text for every message).
    seen: [u64; 3],
    deliveries: u64,
    errors: BTreeMap<(String, String), (u64, Option<String>)>,
    outcomes: BTreeMap<(&'static str, &'static str), u64>,
    notifications: BTreeMap<(String, String), u64>,
    returns: BTreeMap<u16, u64>,
    channel_closes: BTreeMap<u16, u64>,
    /// REST by (service, method, route): the event's shared names, not copies of them.
    /// Hashed, not ordered, like the queues: the report sorts.
    routes: FastMap<(Name, &'static str, Name), RouteStats>,
    cfg: SummaryConfig,
    /// Signals whose key was past a cap, by table.
    folded: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct RouteReport {
    pub service: String,
    pub method: &'static str,
    pub route: String,
    pub requests: u64,
    pub server_errors: u64,
    pub client_errors: u64,
    pub no_response: u64,
    /// Status code → count ("none": no response seen).
    pub codes: BTreeMap<String, u64>,
    pub latency: Quantiles,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueueReport {
    pub queue: String,
    pub calls: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub timeout_s: Option<f64>,
    pub reply_wait: Quantiles,
    pub queue_wait: Quantiles,
    pub server: Quantiles,
}

#[derive(Debug, Serialize)]
pub struct ErrorReport {
    pub operation: String,
    pub exception: String,
    pub count: u64,
    pub example_msg_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub packets: u64,
    pub bytes: u64,
    pub calls: u64,
    pub casts: u64,
    pub fanouts: u64,
    pub deliveries: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub queues: Vec<QueueReport>,
    pub errors: Vec<ErrorReport>,
    pub notifications: BTreeMap<String, u64>,
    pub http_requests: u64,
    /// Per service, worst first: server errors, then client errors, then p99 latency.
    pub http_routes: Vec<RouteReport>,
    /// Failing user requests, root causes ranked (the `stacktap rca` view).
    pub rca: RcaReport,
    pub amqp_returns: BTreeMap<u16, u64>,
    pub amqp_channel_closes: BTreeMap<u16, u64>,
    pub anomalies: BTreeMap<String, u64>,
    pub evictions: BTreeMap<String, u64>,
    pub tcp_gap_bytes: u64,
    /// The view was partial (part of the broker's traffic goes by elsewhere), and the
    /// evidence of it by kind.
    pub partial_view: bool,
    pub unseen: BTreeMap<String, u64>,
}

/// Where a type's count is in `Summary::seen`.
fn type_index(t: RpcType) -> usize {
    match t {
        RpcType::Call => 0,
        RpcType::Cast => 1,
        RpcType::Fanout => 2,
    }
}

impl Summary {
    pub fn new(cfg: &SummaryConfig) -> Summary {
        Summary {
            cfg: cfg.clone(),
            ..Summary::default()
        }
    }

    /// One signal's key was past `table`'s cap: it went to the shared row.
    fn fold(&mut self, table: &'static str) {
        *self.folded.entry(table).or_default() += 1;
    }

    #[inline(never)] // a stage's entry: scripts/stage-cost counts it (one call per event)
    pub fn on_signal(&mut self, s: &Signal) {
        match s {
            Signal::Seen { rpc_type, .. } => self.seen[type_index(*rpc_type)] += 1,
            Signal::Delivered { .. } => self.deliveries += 1,
            Signal::Returned { reply_code } => *self.returns.entry(*reply_code).or_default() += 1,
            Signal::ChannelClosed { reply_code, .. } => {
                *self.channel_closes.entry(*reply_code).or_default() += 1
            }
            Signal::Event(Event::Rpc(e)) => self.on_rpc(e),
            Signal::Event(Event::Http(e)) => self.on_http(e),
            Signal::Event(Event::Notification(n)) => {
                *self
                    .notifications
                    .entry((n.priority.clone(), n.event_type.clone()))
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    fn on_http(&mut self, e: &HttpEvent) {
        let service = e.service.clone().unwrap_or_else(|| "unknown".into());
        let mut key = (service, e.method, e.route.clone());
        if self.routes.len() >= self.cfg.max_routes && !self.routes.contains_key(&key) {
            key = (key.0, "OTHER", "{other}".into());
            self.fold("summary_routes");
        }
        let r = self.routes.entry(key).or_default();
        *r.codes.entry(e.status.unwrap_or(0)).or_default() += 1;
        if let Some(d) = e.duration_s {
            r.latency.observe(d.max(0.0));
        }
        if let Some(f) = &e.error {
            let text = match (&f.kind, &f.message) {
                (Some(k), Some(m)) => format!("{k}: {m}"),
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (None, None) => return,
            };
            r.last_error = Some(text);
        }
    }

    fn route_reports(&self) -> Vec<RouteReport> {
        let mut out: Vec<RouteReport> = self
            .routes
            .iter()
            .map(|((service, method, route), r)| {
                let sum = |f: &dyn Fn(u16) -> bool| -> u64 {
                    r.codes.iter().filter(|(c, _)| f(**c)).map(|(_, n)| n).sum()
                };
                RouteReport {
                    service: service.to_string(),
                    method,
                    route: route.to_string(),
                    requests: r.codes.values().sum(),
                    server_errors: sum(&|c| c >= 500),
                    client_errors: sum(&|c| (400..500).contains(&c)),
                    no_response: sum(&|c| c == 0),
                    codes: r
                        .codes
                        .iter()
                        .map(|(c, n)| {
                            let c = if *c == 0 {
                                "none".into()
                            } else {
                                c.to_string()
                            };
                            (c, *n)
                        })
                        .collect(),
                    latency: r.latency.summary(),
                    last_error: r.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            a.service
                .cmp(&b.service)
                .then(b.server_errors.cmp(&a.server_errors))
                .then(b.client_errors.cmp(&a.client_errors))
                .then(b.latency.p99.total_cmp(&a.latency.p99))
                .then(a.route.cmp(&b.route))
                .then(a.method.cmp(b.method))
        });
        out
    }

    fn on_rpc(&mut self, e: &RpcEvent) {
        *self
            .outcomes
            .entry((e.rpc_type.as_str(), e.outcome.as_str()))
            .or_default() += 1;
        if let Some(err) = &e.error {
            let mut key = (format!("{}.{}", e.topic, e.method), err.class.clone());
            if self.errors.len() >= self.cfg.max_errors && !self.errors.contains_key(&key) {
                key = ("other".into(), "other".into());
                self.fold("summary_errors");
            }
            let entry = self.errors.entry(key).or_default();
            entry.0 += 1;
            if entry.1.is_none() {
                entry.1 = e.msg_id.clone();
            }
        }
        if e.rpc_type != RpcType::Call {
            return;
        }
        // one lookup for a known queue; the key is copied once per queue, not per call
        if let Some(q) = self.queues.get_mut(&*e.routing_key) {
            q.add(e);
            return;
        }
        // bounded like the metrics: past `max_queues` distinct queues, the rest share "other"
        if self.queues.len() < self.cfg.max_queues {
            let q = self.queues.entry(e.routing_key.to_string()).or_default();
            q.add(e);
            return;
        }
        self.fold("summary_queues");
        if let Some(other) = self.queues.get_mut("other") {
            other.add(e); // not a new copy of "other" for each call past the cap
        } else {
            self.queues.entry("other".to_owned()).or_default().add(e);
        }
    }

    /// The report; `rca` is the root-cause ranking (kept by the request store).
    pub fn report(&self, health: &Health, rca: RcaReport) -> Report {
        let count = |t: RpcType| self.seen[type_index(t)];
        let mut queues: Vec<QueueReport> = self
            .queues
            .iter()
            .map(|(name, q)| QueueReport {
                queue: name.clone(),
                calls: q.outcomes.values().sum(),
                outcomes: q.outcomes.clone(),
                timeout_s: q.timeout_s,
                reply_wait: q.reply_wait.summary(),
                queue_wait: q.queue_wait.summary(),
                server: q.server.summary(),
            })
            .collect();
        // worst first: a call that timed out kept its caller waiting at least the timeout
        let effective = |q: &QueueReport| {
            let unanswered: u64 = ["timeout", "late_reply", "unroutable"]
                .iter()
                .map(|k| q.outcomes.get(k).copied().unwrap_or(0))
                .sum();
            let waited = if unanswered > 0 {
                q.timeout_s.unwrap_or(0.0)
            } else {
                0.0
            };
            q.reply_wait.p99.max(waited)
        };
        queues.sort_by(|a, b| {
            effective(b)
                .total_cmp(&effective(a))
                .then(a.queue.cmp(&b.queue))
        });
        let mut errors: Vec<ErrorReport> = self
            .errors
            .iter()
            .map(|((op, class), (n, ex))| ErrorReport {
                operation: op.clone(),
                exception: class.clone(),
                count: *n,
                example_msg_id: ex.clone(),
            })
            .collect();
        errors.sort_by(|a, b| b.count.cmp(&a.count).then(a.operation.cmp(&b.operation)));
        Report {
            packets: health.packets,
            bytes: health.bytes,
            calls: count(RpcType::Call),
            casts: count(RpcType::Cast),
            fanouts: count(RpcType::Fanout),
            deliveries: self.deliveries,
            outcomes: self
                .outcomes
                .iter()
                .map(|((t, o), n)| (format!("{t}/{o}"), *n))
                .collect(),
            queues,
            errors,
            notifications: self
                .notifications
                .iter()
                .map(|((p, e), n)| (format!("{p} {e}"), *n))
                .collect(),
            http_requests: self.routes.values().flat_map(|r| r.codes.values()).sum(),
            http_routes: self.route_reports(),
            rca,
            amqp_returns: self.returns.clone(),
            amqp_channel_closes: self.channel_closes.clone(),
            anomalies: health
                .anomalies
                .iter()
                .map(|((p, k), n)| (format!("{p}/{k}"), *n))
                .collect(),
            evictions: health
                .evictions
                .iter()
                .map(|(t, n)| (t.to_string(), *n))
                .chain(self.folded.iter().map(|(t, n)| (t.to_string(), *n)))
                .collect(),
            tcp_gap_bytes: health.tcp_gap_bytes,
            partial_view: !health.unseen.is_empty(),
            unseen: health
                .unseen
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
        }
    }
}

/// `k=v k=v …` for a summary line.
fn pairs<K: std::fmt::Display, V: std::fmt::Display>(
    items: impl IntoIterator<Item = (K, V)>,
    sep: &str,
) -> String {
    let parts: Vec<String> = items
        .into_iter()
        .map(|(k, v)| format!("{k}{sep}{v}"))
        .collect();
    parts.join(" ")
}

/// A duration for the table; "-" when nothing was measured.
fn ms(q: &Quantiles, v: f64) -> String {
    if q.count == 0 {
        "-".into()
    } else if v >= 10.0 {
        format!("{v:.1}s")
    } else {
        format!("{:.1}ms", v * 1000.0)
    }
}

impl Report {
    /// REST routes: the worst `top` of each service.
    fn rest_text(&self, s: &mut String, top: usize) {
        let total = |f: fn(&RouteReport) -> u64| -> u64 { self.http_routes.iter().map(f).sum() };
        let _ = writeln!(
            s,
            "\nREST: {} requests, {} server errors, {} client errors, {} without response",
            self.http_requests,
            total(|r| r.server_errors),
            total(|r| r.client_errors),
            total(|r| r.no_response),
        );
        let _ = writeln!(
            s,
            "  {:<12} {:<7} {:<44} {:>6} {:>5} {:>5} {:>9} {:>9}",
            "service", "method", "route (worst first)", "reqs", "5xx", "4xx", "p50", "p99"
        );
        let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &self.http_routes {
            let n = shown.entry(&r.service).or_default();
            if *n >= top {
                continue;
            }
            *n += 1;
            let _ = writeln!(
                s,
                "  {:<12} {:<7} {:<44} {:>6} {:>5} {:>5} {:>9} {:>9}",
                r.service,
                r.method,
                r.route,
                r.requests,
                r.server_errors,
                r.client_errors,
                ms(&r.latency, r.latency.p50),
                ms(&r.latency, r.latency.p99),
            );
            if let Some(e) = &r.last_error {
                let e: String = e.chars().take(100).collect();
                let _ = writeln!(s, "  {:<12} {:<7} └ {e}", "", "");
            }
        }
    }

    pub fn to_text(&self, top: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} packets, {:.1} MB: {} calls, {} casts, {} fanouts ({} deliveries)",
            self.packets,
            self.bytes as f64 / 1e6,
            self.calls,
            self.casts,
            self.fanouts,
            self.deliveries
        );
        let _ = writeln!(s, "outcomes: {}", pairs(&self.outcomes, "="));
        if !self.queues.is_empty() {
            let _ = writeln!(
                s,
                "\nqueues, worst first (p99 reply wait; a timeout counts as its full wait):"
            );
            let _ = writeln!(
                s,
                "  {:<34} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}  outcomes",
                "queue", "calls", "p50", "p99", "queue", "server", "timeout"
            );
            for q in self.queues.iter().take(top) {
                let outs = pairs(q.outcomes.iter().filter(|(k, _)| **k != "ok"), "=");
                let _ = writeln!(
                    s,
                    "  {:<34} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                    q.queue,
                    q.calls,
                    ms(&q.reply_wait, q.reply_wait.p50),
                    ms(&q.reply_wait, q.reply_wait.p99),
                    ms(&q.queue_wait, q.queue_wait.p50),
                    ms(&q.server, q.server.p50),
                    q.timeout_s
                        .map(|t| format!("{t}s"))
                        .unwrap_or_else(|| "-".into()),
                    if outs.is_empty() {
                        "all ok".into()
                    } else {
                        outs
                    }
                );
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "\nremote errors:");
            for e in self.errors.iter().take(top) {
                let _ = writeln!(
                    s,
                    "  {:>5} × {:<40} {} (e.g. msg_id {})",
                    e.count,
                    e.operation,
                    e.exception,
                    e.example_msg_id.as_deref().unwrap_or("?")
                );
            }
        }
        if !self.http_routes.is_empty() {
            self.rest_text(&mut s, top);
        }
        if self.rca.failed_requests > 0 || self.rca.masked_failures > 0 {
            let _ = writeln!(
                s,
                "\nfailing user requests: {} ({} failures masked by retries); root causes:",
                self.rca.failed_requests, self.rca.masked_failures
            );
            for r in self.rca.roots.iter().take(top) {
                let _ = writeln!(
                    s,
                    "  {:>5} × {} {} → {} (e.g. {})",
                    r.requests,
                    r.service.as_deref().unwrap_or("?"),
                    r.operation,
                    r.error.as_deref().unwrap_or("?"),
                    r.example_request_id
                );
            }
        }
        if !self.amqp_returns.is_empty() {
            let r = pairs(&self.amqp_returns, "×");
            let _ = writeln!(s, "\nbroker returns (unroutable): {r}");
        }
        if !self.notifications.is_empty() {
            let _ = writeln!(s, "\nnotifications:");
            for (k, v) in &self.notifications {
                let _ = writeln!(s, "  {v:>5} × {k}");
            }
        }
        let anomalies = pairs(&self.anomalies, "=");
        let _ = writeln!(
            s,
            "\nprobe: tcp gaps {} bytes; anomalies: {}",
            self.tcp_gap_bytes,
            if anomalies.is_empty() {
                "none".into()
            } else {
                anomalies
            }
        );
        if !self.evictions.is_empty() {
            let _ = writeln!(s, "evictions: {}", pairs(&self.evictions, "="));
        }
        if self.partial_view {
            let _ = writeln!(
                s,
                "partial view: this probe sees part of the broker's traffic ({}); timeouts, \
                 undelivered casts and orphan replies are not judged while it does (outcome \
                 `unknown`): a collector joining every node's probe judges them",
                pairs(&self.unseen, "=")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::RemoteError;
    use crate::testing::{http_event, process, rpc_event};

    fn rest(route: &str) -> Signal {
        let e = http_event(process("nova-api", 1, "ctl1"), "nova", "GET", route);
        Signal::Event(Event::Http(Box::new(e)))
    }

    fn call(queue: &str, error: Option<&str>) -> Signal {
        let mut e = rpc_event(RpcType::Call, queue, "m");
        e.error = error.map(|class| RemoteError {
            class: class.into(),
            module: None,
            message: None,
        });
        Signal::Event(Event::Rpc(Box::new(e)))
    }

    /// A report table's rows as (name, count).
    fn rows<T>(table: &[T], row: impl Fn(&T) -> (&String, u64)) -> Vec<(&str, u64)> {
        table
            .iter()
            .map(|t| {
                let (name, n) = row(t);
                (name.as_str(), n)
            })
            .collect()
    }

    #[test]
    fn rows_past_the_caps_share_one_and_each_fold_is_counted() {
        let mut s = Summary::new(&SummaryConfig {
            max_queues: 1,
            max_errors: 1,
            max_routes: 1,
        });
        for route in ["/servers", "/servers", "/flavors", "/images"] {
            s.on_signal(&rest(route));
        }
        for (queue, error) in [
            ("compute", Some("A")),
            ("compute", Some("B")),
            ("conductor", None),
        ] {
            s.on_signal(&call(queue, error));
        }
        let r = s.report(&Health::default(), crate::sink::requests::rank(&[], 0));
        let routes = rows(&r.http_routes, |x| (&x.route, x.requests));
        assert_eq!(routes, [("/servers", 2), ("{other}", 2)]);
        let queues = rows(&r.queues, |q| (&q.queue, q.calls));
        assert_eq!(queues, [("compute", 2), ("other", 1)]);
        let errors = rows(&r.errors, |e| (&e.exception, e.count));
        assert_eq!(errors, [("A", 1), ("other", 1)]);
        let folded = |t: &str| r.evictions.get(t).copied();
        assert_eq!(
            (
                folded("summary_routes"),
                folded("summary_queues"),
                folded("summary_errors")
            ),
            (Some(2), Some(1), Some(1))
        );
    }
}
