//! The end-of-replay summary: top queues by reply wait, errors, timeouts, anomalies.
//! Also served live as `/api/summary`.

use super::sketch::{Quantiles, Sketch};
use crate::correlate::{Name, Signal};
use crate::event::{Event, Outcome, RpcEvent};
use crate::health::Health;
use crate::oslo::RpcType;
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

const MAX_QUEUES: usize = 10_000;
const MAX_ERRORS: usize = 10_000;

#[derive(Default)]
pub struct Summary {
    queues: BTreeMap<String, QueueStats>,
    messages: BTreeMap<(Name, Name, &'static str), (u64, u64)>,
    errors: BTreeMap<(String, String), (u64, Option<String>)>,
    outcomes: BTreeMap<(&'static str, &'static str), u64>,
    notifications: BTreeMap<(String, String), u64>,
    returns: BTreeMap<u16, u64>,
    channel_closes: BTreeMap<u16, u64>,
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
    pub amqp_returns: BTreeMap<u16, u64>,
    pub amqp_channel_closes: BTreeMap<u16, u64>,
    pub anomalies: BTreeMap<String, u64>,
    pub evictions: BTreeMap<String, u64>,
    pub tcp_gap_bytes: u64,
}

impl Summary {
    pub fn on_signal(&mut self, s: &Signal) {
        match s {
            Signal::Seen {
                topic,
                method,
                rpc_type,
                ..
            } => self.count(topic, method, *rpc_type).0 += 1,
            Signal::Delivered {
                topic,
                method,
                rpc_type,
                ..
            } => self.count(topic, method, *rpc_type).1 += 1,
            Signal::Returned { reply_code } => *self.returns.entry(*reply_code).or_default() += 1,
            Signal::ChannelClosed { reply_code, .. } => {
                *self.channel_closes.entry(*reply_code).or_default() += 1
            }
            Signal::Event(Event::Rpc(e)) => self.on_rpc(e),
            Signal::Event(Event::Notification(n)) => {
                *self
                    .notifications
                    .entry((n.priority.clone(), n.event_type.clone()))
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    /// (seen, delivered) for one topic/method/type.
    fn count(&mut self, topic: &Name, method: &Name, t: RpcType) -> &mut (u64, u64) {
        self.messages
            .entry((topic.clone(), method.clone(), t.as_str()))
            .or_default()
    }

    fn on_rpc(&mut self, e: &RpcEvent) {
        *self
            .outcomes
            .entry((e.rpc_type.as_str(), e.outcome.as_str()))
            .or_default() += 1;
        if let Some(err) = &e.error {
            let mut key = (format!("{}.{}", e.topic, e.method), err.class.clone());
            if self.errors.len() >= MAX_ERRORS && !self.errors.contains_key(&key) {
                key = ("other".into(), "other".into());
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
        // bounded like the metrics: past MAX_QUEUES distinct queues, the rest share "other"
        let name = if self.queues.len() < MAX_QUEUES || self.queues.contains_key(&e.routing_key) {
            e.routing_key.clone()
        } else {
            "other".to_owned()
        };
        let q = self.queues.entry(name).or_default();
        *q.outcomes.entry(e.outcome.as_str()).or_default() += 1;
        q.timeout_s = q.timeout_s.or(e.timeout_s);
        if matches!(e.outcome, Outcome::Ok | Outcome::RemoteError)
            && let Some(v) = e.reply_wait()
        {
            q.reply_wait.observe(v);
        }
        if let Some(v) = e.queue_wait() {
            q.queue_wait.observe(v);
        }
        if let Some(v) = e.server_time() {
            q.server.observe(v);
        }
    }

    pub fn report(&self, health: &Health) -> Report {
        let count = |t: RpcType| {
            self.messages
                .iter()
                .filter(|((_, _, k), _)| *k == t.as_str())
                .map(|(_, v)| v.0)
                .sum()
        };
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
            deliveries: self.messages.values().map(|v| v.1).sum(),
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
                .collect(),
            tcp_gap_bytes: health.tcp_gap_bytes,
        }
    }
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
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "outcomes: {}", outcomes.join(" "));
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
                let outs: Vec<String> = q
                    .outcomes
                    .iter()
                    .filter(|(k, _)| **k != "ok")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
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
                        outs.join(" ")
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
        if !self.amqp_returns.is_empty() {
            let r: Vec<String> = self
                .amqp_returns
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            let _ = writeln!(s, "\nbroker returns (unroutable): {}", r.join(" "));
        }
        if !self.notifications.is_empty() {
            let _ = writeln!(s, "\nnotifications:");
            for (k, v) in &self.notifications {
                let _ = writeln!(s, "  {v:>5} × {k}");
            }
        }
        let anomalies: Vec<String> = self
            .anomalies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            s,
            "\nprobe: tcp gaps {} bytes; anomalies: {}",
            self.tcp_gap_bytes,
            if anomalies.is_empty() {
                "none".into()
            } else {
                anomalies.join(" ")
            }
        );
        if !self.evictions.is_empty() {
            let e: Vec<String> = self
                .evictions
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "evictions: {}", e.join(" "));
        }
        s
    }
}
