//! Sinks: where signals end up. Metrics (Prometheus registry), events (JSONL), summary.

mod address;
pub mod fleet_metrics;
pub mod graph;
pub mod metrics;
pub mod otlp_metrics;
pub mod requests;
pub mod sketch;
pub mod store;
pub mod summary;

use crate::contract::Event;
use crate::correlate::Signal;
use crate::health::Health;
use std::io::Write;

/// JSON lines, one event a line (`--events-out`).
pub struct EventWriter {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    pub written: u64,
}

impl EventWriter {
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        EventWriter {
            out: std::io::BufWriter::with_capacity(1 << 16, w),
            written: 0,
        }
    }

    pub fn write(&mut self, ev: &Event) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, ev)?;
        self.out.write_all(b"\n")?;
        self.written += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Every sink of a run, fed in one place.
pub struct Sinks {
    pub metrics: metrics::Metrics,
    pub summary: summary::Summary,
    /// Shared with the HTTP API, which reports it over the window asked for.
    pub graph: std::sync::Arc<std::sync::Mutex<graph::Graph>>,
    /// Shared with the HTTP API (and read by `stacktap rca`).
    pub requests: std::sync::Arc<std::sync::Mutex<requests::Requests>>,
    pub events: Option<EventWriter>,
    pub write_error: Option<std::io::Error>,
    /// OTLP spans, when an endpoint is configured.
    pub otlp: Option<crate::otlp::OtlpSink>,
}

impl Sinks {
    #[inline(never)] // a stage's entry: scripts/stage-cost counts it (one call per event)
    pub fn on_signal(&mut self, s: &Signal) {
        self.metrics.on_signal(s);
        if let Some(o) = self.otlp.as_mut() {
            o.on_signal(s);
        }
        self.summary.on_signal(s);
        match s {
            Signal::Event(Event::Chain(c)) => {
                if let Ok(mut r) = self.requests.lock() {
                    r.add_chain(std::sync::Arc::new((**c).clone()));
                }
            }
            Signal::Event(ev) => {
                if let Ok(mut g) = self.graph.lock() {
                    g.on_event(ev);
                }
            }
            Signal::InFlight { topic, delta } => {
                if let Ok(mut g) = self.graph.lock() {
                    g.on_in_flight(topic, *delta);
                }
            }
            Signal::Request(t) => {
                if let Ok(mut r) = self.requests.lock() {
                    r.add_tree(t.clone());
                }
            }
            Signal::Masked(m) => {
                if let Ok(mut r) = self.requests.lock() {
                    r.add_masked(m.t);
                }
            }
            _ => {}
        }
        if let (Signal::Event(ev), Some(w)) = (s, self.events.as_mut())
            && self.write_error.is_none()
            && let Err(e) = w.write(ev)
        {
            self.write_error = Some(e);
        }
    }

    /// The summary with the root causes ranked, over everything kept.
    pub fn report(&self, health: &Health) -> summary::Report {
        let rca = match self.requests.lock() {
            Ok(r) => r.rca(f64::MIN),
            Err(_) => requests::rank(&[], 0),
        };
        self.summary.report(health, rca)
    }

    /// Brings the probe-health metrics up to date (cheap, but not per signal).
    pub fn sync(&mut self, health: &Health) {
        self.metrics.sync_health(health);
        if let Some(o) = &self.otlp {
            self.metrics.sync_otlp(&o.exporter.stats);
        }
    }
}
