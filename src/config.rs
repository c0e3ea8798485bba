//! Configuration: every cap and window in one place, defaults that suit a broker node,
//! overridable from a TOML file (`--config`).

use crate::correlate::CorrelatorConfig;
use crate::http::HttpConfig;
use crate::openstack::RestConfig;
use crate::tcp::FlowConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_ports: Vec<u16>,
    pub amqp_max_frame: usize,
    pub amqp_max_body: usize,
    pub flows: FlowConfig,
    pub correlator: CorrelatorConfig,
    pub http: HttpConfig,
    pub rest: RestConfig,
    pub trace: crate::trace::TraceConfig,
    pub requests: crate::sink::requests::RequestsConfig,
    /// How much history the call graph keeps (its edge cap is `max_series_per_family`).
    pub graph: crate::sink::graph::GraphConfig,
    pub store: crate::sink::store::StoreConfig,
    /// How a collector joins its probes.
    pub fleet: crate::fleet::merge::MergeConfig,
    /// Distinct label sets per metric family before new ones fold into "other".
    pub max_series_per_family: usize,
    /// Where spans go (`[otlp]`; the OTEL_* variables and `--otlp-endpoint` override it).
    pub otlp: crate::otlp::OtlpConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_ports: vec![5672],
            amqp_max_frame: 4 << 20,
            amqp_max_body: 64 << 20,
            flows: FlowConfig::default(),
            correlator: CorrelatorConfig::default(),
            http: HttpConfig::default(),
            rest: RestConfig::default(),
            trace: crate::trace::TraceConfig::default(),
            requests: crate::sink::requests::RequestsConfig::default(),
            graph: crate::sink::graph::GraphConfig::default(),
            store: crate::sink::store::StoreConfig::default(),
            fleet: crate::fleet::merge::MergeConfig::default(),
            max_series_per_family: 2000,
            otlp: crate::otlp::OtlpConfig::default(),
        }
    }
}

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    amqp: Option<AmqpSection>,
    tcp: Option<TcpSection>,
    rpc: Option<RpcSection>,
    http: Option<HttpSection>,
    requests: Option<RequestsSection>,
    store: Option<StoreSection>,
    metrics: Option<MetricsSection>,
    fleet: Option<FleetSection>,
    view: Option<ViewSection>,
    otlp: Option<crate::otlp::OtlpConfig>,
}

/// How a collector joins its probes (`stacktap collect`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetSection {
    /// Packet time held back behind the watermark while clock offsets settle.
    hold_s: Option<f64>,
    /// Wall time after which a silent probe is no longer waited for (and is reported).
    silent_after_s: Option<f64>,
    /// Two probes' identical observations this close are one.
    dedupe_window_s: Option<f64>,
    /// How long to wait for every probe before analysing anything.
    startup_s: Option<f64>,
    /// The probes expected, by name: the startup wait ends when all are heard.
    expect: Option<Vec<String>>,
    /// The probe whose clock is the collector's (default: the one linked to most others).
    reference: Option<String>,
    /// Packet time gathered before anything is analysed, so clock offsets settle first.
    warmup_s: Option<f64>,
}

/// How much of the broker the analyser sees.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewSection {
    partial_for_s: Option<f64>,
    settle_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AmqpSection {
    ports: Option<Vec<u16>>,
    max_frame_bytes: Option<usize>,
    max_body_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSection {
    max_flows: Option<usize>,
    idle_timeout_s: Option<f64>,
    max_reorder_bytes: Option<usize>,
    max_reorder_segments: Option<usize>,
    hole_timeout_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RpcSection {
    max_pending_calls: Option<usize>,
    max_pending_messages: Option<usize>,
    late_reply_window_s: Option<f64>,
    cast_settle_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    /// Port → service type, merged over the defaults; "" removes a default.
    ports: Option<BTreeMap<String, String>>,
    /// Path prefix → service type, tried before the ports; "" removes a default.
    prefixes: Option<BTreeMap<String, String>>,
    sniff_other_ports: Option<bool>,
    max_routes_per_service: Option<usize>,
    max_pipeline: Option<usize>,
    max_head_bytes: Option<usize>,
    max_error_body_bytes: Option<usize>,
}

/// Merges `key = service` pairs over a default list; an empty service removes the key.
fn merge<K: PartialEq>(list: &mut Vec<(K, String)>, over: Vec<(K, String)>) {
    for (k, v) in over {
        list.retain(|(old, _)| *old != k);
        if !v.is_empty() {
            list.push((k, v));
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestsSection {
    /// Quiet time after which a request is complete and judged.
    settle_s: Option<f64>,
    max_open: Option<usize>,
    max_spans: Option<usize>,
    max_trees: Option<usize>,
    max_chains: Option<usize>,
    graph_window_s: Option<f64>,
    graph_slot_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    /// Rows older than this (packet time, before the newest) are deleted.
    retention_s: Option<f64>,
    max_trees: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    max_series_per_family: Option<usize>,
}

fn ns(secs: f64) -> u64 {
    (secs.max(0.0) * 1e9) as u64
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read config: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let f: File = toml::from_str(text)?;
        let mut c = Config::default();
        if let Some(a) = f.amqp {
            if let Some(p) = a.ports {
                c.amqp_ports = p;
            }
            c.amqp_max_frame = a.max_frame_bytes.unwrap_or(c.amqp_max_frame);
            c.amqp_max_body = a.max_body_bytes.unwrap_or(c.amqp_max_body);
        }
        if let Some(t) = f.tcp {
            c.flows.max_flows = t.max_flows.unwrap_or(c.flows.max_flows);
            if let Some(s) = t.idle_timeout_s {
                c.flows.idle_timeout_ns = ns(s);
            }
            c.flows.stream.max_buffered_bytes = t
                .max_reorder_bytes
                .unwrap_or(c.flows.stream.max_buffered_bytes);
            c.flows.stream.max_buffered_segments = t
                .max_reorder_segments
                .unwrap_or(c.flows.stream.max_buffered_segments);
            if let Some(s) = t.hole_timeout_s {
                c.flows.stream.hole_timeout_ns = ns(s);
            }
        }
        if let Some(r) = f.rpc {
            let k = &mut c.correlator;
            k.max_calls = r.max_pending_calls.unwrap_or(k.max_calls);
            k.max_messages = r.max_pending_messages.unwrap_or(k.max_messages);
            k.late_reply_window_s = r.late_reply_window_s.unwrap_or(k.late_reply_window_s);
            k.cast_settle_s = r.cast_settle_s.unwrap_or(k.cast_settle_s);
        }
        if let Some(h) = f.http {
            if let Some(ports) = h.ports {
                let mut parsed = Vec::new();
                for (k, v) in ports {
                    let port: u16 = k
                        .parse()
                        .map_err(|_| anyhow::anyhow!("[http.ports]: {k:?} is not a port"))?;
                    parsed.push((port, v));
                }
                merge(&mut c.rest.ports, parsed);
            }
            if let Some(prefixes) = h.prefixes {
                for k in prefixes.keys() {
                    if !k.starts_with('/') || k.ends_with('/') {
                        anyhow::bail!(
                            "[http.prefixes]: {k:?} must start with / and not end with one"
                        );
                    }
                }
                merge(&mut c.rest.prefixes, prefixes.into_iter().collect());
            }
            let r = &mut c.rest;
            r.sniff_other_ports = h.sniff_other_ports.unwrap_or(r.sniff_other_ports);
            r.max_routes_per_service = h.max_routes_per_service.unwrap_or(r.max_routes_per_service);
            let x = &mut c.http;
            x.max_pipeline = h.max_pipeline.unwrap_or(x.max_pipeline).max(1);
            x.max_head_bytes = h.max_head_bytes.unwrap_or(x.max_head_bytes);
            x.max_error_body = h.max_error_body_bytes.unwrap_or(x.max_error_body);
        }
        if let Some(r) = f.requests {
            let t = &mut c.trace;
            t.settle_s = r.settle_s.unwrap_or(t.settle_s);
            t.max_open = r.max_open.unwrap_or(t.max_open).max(1);
            t.max_spans = r.max_spans.unwrap_or(t.max_spans).max(1);
            let q = &mut c.requests;
            q.max_trees = r.max_trees.unwrap_or(q.max_trees);
            q.max_chains = r.max_chains.unwrap_or(q.max_chains);
            let g = &mut c.graph;
            g.window_s = r.graph_window_s.unwrap_or(g.window_s).max(1.0);
            g.slot_s = r.graph_slot_s.unwrap_or(g.slot_s).clamp(0.1, g.window_s);
        }
        if let Some(s) = f.store {
            c.store.retention_s = s.retention_s.unwrap_or(c.store.retention_s);
            c.store.max_trees = s.max_trees.unwrap_or(c.store.max_trees).max(1);
        }
        if let Some(m) = f.metrics {
            c.max_series_per_family = m.max_series_per_family.unwrap_or(c.max_series_per_family);
        }
        if let Some(f) = f.fleet {
            let m = &mut c.fleet;
            m.hold_s = f.hold_s.unwrap_or(m.hold_s);
            m.silent_after_s = f.silent_after_s.unwrap_or(m.silent_after_s);
            m.dedupe_window_s = f.dedupe_window_s.unwrap_or(m.dedupe_window_s);
            m.startup_s = f.startup_s.unwrap_or(m.startup_s);
            m.expect = f.expect.unwrap_or_default();
            m.reference = f.reference;
            m.warmup_s = f.warmup_s.unwrap_or(m.warmup_s);
        }
        if let Some(v) = f.view {
            let w = &mut c.correlator.view;
            w.partial_for_s = v.partial_for_s.unwrap_or(w.partial_for_s);
            w.settle_s = v.settle_s.unwrap_or(w.settle_s);
        }
        if let Some(o) = f.otlp {
            c.otlp = o;
        }
        c.graph.max_edges = c.max_series_per_family;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_and_rejects_typos() {
        let c =
            Config::from_toml("[amqp]\nports = [5672, 5671]\n[rpc]\nlate_reply_window_s = 5.0\n")
                .unwrap();
        assert_eq!(c.amqp_ports, vec![5672, 5671]);
        assert_eq!(c.correlator.late_reply_window_s, 5.0);
        assert!(Config::from_toml("[rpc]\nlate_reply_windw_s = 5\n").is_err());
    }

    #[test]
    fn http_services_merge_over_the_defaults() {
        let c = Config::from_toml(
            "[http.ports]\n8774 = \"\"\n18774 = \"nova\"\n[http.prefixes]\n\"/api/compute\" = \"nova\"\n",
        )
        .unwrap();
        assert!(!c.rest.is_api_port(8774));
        assert!(c.rest.is_api_port(18774) && c.rest.is_api_port(9696));
        assert!(
            c.rest
                .prefixes
                .iter()
                .any(|(p, s)| p == "/api/compute" && s == "nova")
        );
        assert!(Config::from_toml("[http.ports]\nnova = \"nova\"\n").is_err());
        assert!(Config::from_toml("[http.prefixes]\n\"compute/\" = \"nova\"\n").is_err());
    }
}
