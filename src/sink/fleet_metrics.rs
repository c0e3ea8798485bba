//! The collector's view of its probes (DESIGN.md's fleet metrics, labelled `probe`): is
//! it live, when was it last heard, how many observations it sent, its clock offset, and
//! the health it reports (packets, drops, gaps, anomalies, what it could not send). A
//! dead sidecar is `stacktap_probe_up 0`, an alert, not silence.

use super::metrics::Declared;
use crate::fleet::merge::ProbeInfo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabel {
    probe: String,
}

type Counters = Family<ProbeLabel, Counter>;
type Gauges = Family<ProbeLabel, Gauge>;
type FloatGauges = Family<ProbeLabel, Gauge<f64, AtomicU64>>;

#[derive(Default)]
pub struct FleetMetrics {
    up: Gauges,
    ended: Gauges,
    last_seen: FloatGauges,
    offset: FloatGauges,
    observations: Counters,
    duplicates: Counters,
    late: Counters,
    packets: Counters,
    bytes: Counters,
    drops: Counters,
    tcp_gap_bytes: Counters,
    anomalies: Counters,
    unsent: Counters,
    /// What was exported, per probe and counter, to export deltas.
    exported: BTreeMap<(String, &'static str), u64>,
}

impl FleetMetrics {
    /// Registers the families in `r` (prefix `stacktap_`).
    pub fn register(r: &mut Registry) -> FleetMetrics {
        let m = FleetMetrics::default();
        r.register(
            "probe_up",
            "1 while a probe feeds the collector; 0 once it fell silent or ended",
            Declared(m.up.clone()),
        );
        r.register(
            "probe_ended",
            "1 once a probe said its input ended (a replay done, a capture stopped): no longer waited for, and not dead",
            Declared(m.ended.clone()),
        );
        r.register(
            "probe_last_seen_seconds",
            "When the collector last heard from a probe (Unix time, wall clock)",
            Declared(m.last_seen.clone()),
        );
        r.register(
            "probe_clock_offset_seconds",
            "A probe's clock minus the reference probe's, estimated from RPC causality",
            Declared(m.offset.clone()),
        );
        let counters = [
            (
                "probe_observations",
                "Observations a probe sent",
                &m.observations,
            ),
            (
                "probe_duplicates",
                "Observations dropped as another probe's duplicates",
                &m.duplicates,
            ),
            (
                "probe_late",
                "Observations that came after the collector had released their packet time (the probe lagged by more than fleet.hold_s): analysed out of order, so a call may lose a part",
                &m.late,
            ),
            ("probe_packets", "Packets a probe read", &m.packets),
            ("probe_bytes", "Bytes a probe read", &m.bytes),
            (
                "probe_drops",
                "Packets dropped before a probe saw them",
                &m.drops,
            ),
            (
                "probe_tcp_gap_bytes",
                "Bytes lost in TCP holes at a probe",
                &m.tcp_gap_bytes,
            ),
            (
                "probe_anomalies",
                "Input a probe could not use",
                &m.anomalies,
            ),
            (
                "probe_unsent",
                "Observations a probe could not send (its buffer was full, or the collector rejected them)",
                &m.unsent,
            ),
        ];
        for (name, help, family) in counters {
            r.register(name, help, Declared(family.clone()));
        }
        m
    }

    /// Brings the families up to date with what the collector knows of its probes.
    pub fn sync(&mut self, probes: &[ProbeInfo]) {
        for p in probes {
            let l = ProbeLabel {
                probe: p.name.clone(),
            };
            self.up
                .get_or_create(&l)
                .set((!p.silent && !p.ended) as i64);
            self.ended.get_or_create(&l).set(p.ended as i64);
            self.last_seen.get_or_create(&l).set(p.last_seen_unix);
            self.offset.get_or_create(&l).set(p.offset_ns as f64 / 1e9);
            let s = &p.stats;
            for (what, family, value) in [
                ("observations", &self.observations, p.observations),
                ("duplicates", &self.duplicates, p.duplicates),
                ("late", &self.late, p.late),
                ("packets", &self.packets, s.packets),
                ("bytes", &self.bytes, s.bytes),
                ("drops", &self.drops, s.drops),
                ("tcp_gap_bytes", &self.tcp_gap_bytes, s.tcp_gap_bytes),
                ("anomalies", &self.anomalies, s.anomalies),
                ("unsent", &self.unsent, s.unsent),
            ] {
                let before = self.exported.entry((p.name.clone(), what)).or_default();
                // a probe that restarted counts from zero again: its new counts add on
                let delta = if value >= *before {
                    value - *before
                } else {
                    value
                };
                family.get_or_create(&l).inc_by(delta);
                *before = value;
            }
        }
    }
}
