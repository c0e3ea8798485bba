//! `/api/source`: where the data comes from and how much of it arrives (the UI's header:
//! a quiet graph must never pass for a healthy one), and the links the UI builds from
//! `[ui]`'s URL templates.

use serde::Serialize;

/// `[ui]`: links from the graph UI to the evidence elsewhere.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UiConfig {
    /// A request's trace in Jaeger or Tempo: `{trace_id}` (the 32 hex digits stacktap's
    /// OTLP export gives the request) and `{request_id}` are filled in, e.g.
    /// `https://grafana.example/explore?left={"queries":[{"query":"{trace_id}"}]}` or
    /// `https://jaeger.example/trace/{trace_id}`.
    pub trace_url: Option<String>,
    /// A Grafana dashboard for a service, queue or edge: `{service}`, `{queue}` and
    /// `{operation}` are filled in (URL-encoded), e.g.
    /// `https://grafana.example/d/stacktap-rpc?var-queue={queue}&var-service={service}`.
    pub grafana_url: Option<String>,
}

/// One probe feeding a collector, as the header shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeView {
    pub name: String,
    pub host: Option<String>,
    /// Wall time it last sent anything, seconds since the epoch.
    pub last_seen: f64,
    pub silent: bool,
    pub ended: bool,
    /// Packets its kernel or interface dropped, and observations it could not send.
    pub drops: u64,
    pub unsent: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Source {
    /// "replay of a.pcap", "capture on eth1", "collector (probes on 0.0.0.0:4317)".
    pub what: String,
    pub packets: u64,
    /// Packets the kernel or the interface dropped (a live capture).
    pub drops: u64,
    /// Part of the broker's traffic goes by elsewhere.
    pub partial_view: bool,
    pub probes: Vec<ProbeView>,
    pub links: UiConfig,
}

impl Source {
    pub fn new(what: &str, links: &UiConfig) -> Source {
        Source {
            what: what.to_string(),
            links: links.clone(),
            ..Source::default()
        }
    }

    pub fn update(&mut self, h: &crate::health::Health) {
        self.packets = h.packets;
        self.drops = h.kernel_drops + h.if_drops;
        self.partial_view = h.partial_view;
    }

    pub fn set_probes(&mut self, probes: &[crate::fleet::merge::ProbeInfo]) {
        self.probes = probes
            .iter()
            .map(|p| ProbeView {
                name: p.name.clone(),
                host: p.host.clone(),
                last_seen: p.last_seen_unix,
                silent: p.silent,
                ended: p.ended,
                drops: p.stats.drops,
                unsent: p.stats.unsent,
            })
            .collect();
    }
}
