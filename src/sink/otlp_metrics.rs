//! The span exporter's own counters: spans exported, dropped (a full queue, a backend
//! that refused them or never answered), failed export attempts. Declared from the start,
//! so an alert on drops has a series to watch before the first one.

use super::metrics::Declared;
use crate::otlp::export::ExportStats;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;

#[derive(Default)]
pub struct OtlpMetrics {
    exported: Counter,
    dropped: Counter,
    failures: Counter,
    /// What was exported to the registry so far, to add deltas.
    seen: [u64; 3],
}

impl OtlpMetrics {
    /// Registers the families in `r` (prefix `stacktap_`).
    pub fn register(r: &mut Registry) -> OtlpMetrics {
        let m = OtlpMetrics::default();
        r.register(
            "otlp_spans_exported",
            "Spans the OTLP backend accepted",
            Declared(m.exported.clone()),
        );
        r.register(
            "otlp_spans_dropped",
            "Spans not exported: the export queue was full, or the backend refused them or did not answer after every attempt",
            Declared(m.dropped.clone()),
        );
        r.register(
            "otlp_export_failures",
            "OTLP export attempts that failed (each retried with backoff until attempts run out)",
            Declared(m.failures.clone()),
        );
        m
    }

    pub fn sync(&mut self, s: &ExportStats) {
        let now = [
            s.exported.load(Ordering::Relaxed),
            s.dropped.load(Ordering::Relaxed),
            s.failures.load(Ordering::Relaxed),
        ];
        for ((c, seen), n) in [&self.exported, &self.dropped, &self.failures]
            .into_iter()
            .zip(self.seen.iter_mut())
            .zip(now)
        {
            c.inc_by(n.saturating_sub(*seen));
            *seen = (*seen).max(n);
        }
    }
}
