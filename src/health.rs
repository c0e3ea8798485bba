//! Probe health: what each stage could not use, counted instead of dropped silently.
//!
//! Stages get `&mut Health` and only add to it; the metrics sink exports it. Keeping it
//! plain data keeps the stages pure and the counts exact in replay.

use std::collections::BTreeMap;

const METHOD_SLOTS: usize = 10 * 128;

#[derive(Default, Debug, Clone)]
pub struct Health {
    pub packets: u64,
    pub bytes: u64,
    /// Packets the kernel or the interface dropped (live capture only).
    pub kernel_drops: u64,
    pub if_drops: u64,
    /// Parse problems by protocol and kind: ("tcp","gap"), ("amqp","bad_frame_end"), …
    pub anomalies: BTreeMap<(&'static str, &'static str), u64>,
    /// Entries thrown out of a bounded table, by table.
    pub evictions: BTreeMap<&'static str, u64>,
    /// Bytes skipped over TCP holes the capture never filled.
    pub tcp_gap_bytes: u64,
    /// AMQP frames by type (method, header, body, heartbeat, other) and methods by
    /// class id / 10 * 128 + method id: flat arrays, counted on every frame.
    pub amqp_frames: [u64; 5],
    pub amqp_methods: Vec<u64>,
    /// Label values folded into "other" by the cardinality caps, by metric family.
    pub series_folded: BTreeMap<&'static str, u64>,
    /// The analyser's view is partial now (see `src/view.rs`), and the evidence so far.
    pub partial_view: bool,
    pub unseen: BTreeMap<&'static str, u64>,
}

impl Health {
    pub fn anomaly(&mut self, protocol: &'static str, kind: &'static str) {
        *self.anomalies.entry((protocol, kind)).or_default() += 1;
    }

    pub fn anomaly_count(&self, protocol: &'static str, kind: &'static str) -> u64 {
        self.anomalies.get(&(protocol, kind)).copied().unwrap_or(0)
    }

    /// The live source's counters (cumulative: set, not added).
    pub fn source_stats(&mut self, st: &crate::source::SourceStats) {
        (self.kernel_drops, self.if_drops) = (st.kernel_drops, st.if_drops);
        for (kind, n) in [
            ("clock_step", st.clock_steps),
            ("damaged_record", st.damaged_records),
        ] {
            if n > 0 {
                self.anomalies.insert(("capture", kind), n);
            }
        }
    }

    pub fn evict(&mut self, table: &'static str, n: u64) {
        if n > 0 {
            *self.evictions.entry(table).or_default() += n;
        }
    }

    pub fn count_frame(&mut self, kind: u8) {
        let i = match kind {
            1 => 0,
            2 => 1,
            3 => 2,
            8 => 3,
            _ => 4,
        };
        self.amqp_frames[i] += 1;
    }

    pub fn count_method(&mut self, class: u16, method: u16) {
        if self.amqp_methods.is_empty() {
            self.amqp_methods = vec![0; METHOD_SLOTS];
        }
        let i = class as usize / 10 * 128 + method as usize;
        if method < 128
            && let Some(n) = self.amqp_methods.get_mut(i)
        {
            *n += 1;
        }
    }

    /// Frame counts by the names tshark uses.
    pub fn frames_by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [
            "method",
            "content-header",
            "content-body",
            "heartbeat",
            "unknown",
        ]
        .into_iter()
        .zip(self.amqp_frames)
        .filter(|(_, n)| *n > 0)
    }

    /// Method counts by name ("basic.publish", …).
    pub fn methods_by_name(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (i, n) in self.amqp_methods.iter().enumerate() {
            if *n > 0 {
                let (class, method) = ((i / 128 * 10) as u16, (i % 128) as u16);
                *out.entry(crate::amqp::names::method_name(class, method))
                    .or_default() += n;
            }
        }
        out
    }

    /// Adds another stage's counters (a probe's and its analyser's, reported as one).
    pub fn add(&mut self, o: &Health) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.kernel_drops += o.kernel_drops;
        self.if_drops += o.if_drops;
        self.tcp_gap_bytes += o.tcp_gap_bytes;
        for (k, n) in &o.anomalies {
            *self.anomalies.entry(*k).or_default() += n;
        }
        for (k, n) in &o.evictions {
            *self.evictions.entry(k).or_default() += n;
        }
        for (k, n) in &o.series_folded {
            *self.series_folded.entry(k).or_default() += n;
        }
        self.partial_view |= o.partial_view;
        for (k, n) in &o.unseen {
            *self.unseen.entry(k).or_default() += n;
        }
        for (a, b) in self.amqp_frames.iter_mut().zip(o.amqp_frames) {
            *a += b;
        }
        if !o.amqp_methods.is_empty() {
            self.amqp_methods.resize(METHOD_SLOTS, 0);
            for (a, b) in self.amqp_methods.iter_mut().zip(&o.amqp_methods) {
                *a += b;
            }
        }
    }

    pub fn total_anomalies(&self) -> u64 {
        self.anomalies.values().sum()
    }
}
