//! Probe health: what each stage could not use, counted instead of dropped silently.
//!
//! Stages get `&mut Health` and only add to it; the metrics sink exports it. Keeping it
//! plain data keeps the stages pure and the counts exact in replay.

use std::collections::BTreeMap;

#[derive(Default, Debug, Clone)]
pub struct Health {
    pub packets: u64,
    pub bytes: u64,
    /// Packets the kernel or the interface dropped (live capture only).
    pub kernel_drops: u64,
    pub if_drops: u64,
    /// Packets stamped earlier than the clock: processed on the clock, counted here.
    pub clock_regressions: u64,
    /// Parse problems by protocol and kind: ("tcp","gap"), ("amqp","bad_frame_end"), …
    pub anomalies: BTreeMap<(&'static str, &'static str), u64>,
    /// Entries thrown out of a bounded table, by table.
    pub evictions: BTreeMap<&'static str, u64>,
    /// Bytes skipped over TCP holes the capture never filled.
    pub tcp_gap_bytes: u64,
    /// AMQP frames by type and methods by name (bounded: the spec's ~60 names).
    pub amqp_frames: BTreeMap<&'static str, u64>,
    pub amqp_methods: BTreeMap<&'static str, u64>,
    /// Label values folded into "other" by the cardinality caps, by metric family.
    pub series_folded: BTreeMap<&'static str, u64>,
}

impl Health {
    pub fn anomaly(&mut self, protocol: &'static str, kind: &'static str) {
        *self.anomalies.entry((protocol, kind)).or_default() += 1;
    }

    pub fn anomaly_count(&self, protocol: &'static str, kind: &'static str) -> u64 {
        self.anomalies.get(&(protocol, kind)).copied().unwrap_or(0)
    }

    pub fn evict(&mut self, table: &'static str, n: u64) {
        if n > 0 {
            *self.evictions.entry(table).or_default() += n;
        }
    }

    pub fn count_frame(&mut self, kind: u8) {
        let name = match kind {
            1 => "method",
            2 => "content-header",
            3 => "content-body",
            8 => "heartbeat",
            _ => "unknown",
        };
        *self.amqp_frames.entry(name).or_default() += 1;
    }

    pub fn count_method(&mut self, name: &'static str) {
        *self.amqp_methods.entry(name).or_default() += 1;
    }

    pub fn total_anomalies(&self) -> u64 {
        self.anomalies.values().sum()
    }
}
