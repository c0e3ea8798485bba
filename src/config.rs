//! Configuration: every cap and window in one place, defaults that suit a broker node,
//! overridable from a TOML file (`--config`). Each section is the struct of the stage it
//! configures and is its own schema (`#[serde(default, deny_unknown_fields)]`, documented
//! where it is defined): an unknown key is an error naming it, and `validate` names the
//! key of a value out of range. There is no second mapping layer.

use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp: crate::amqp::AmqpConfig,
    pub tcp: crate::tcp::FlowConfig,
    pub rpc: crate::correlate::CorrelatorConfig,
    pub view: crate::view::ViewConfig,
    pub http: crate::openstack::RestConfig,
    pub requests: crate::sink::requests::RequestsConfig,
    pub store: crate::sink::store::StoreConfig,
    pub metrics: MetricsConfig,
    pub summary: crate::sink::summary::SummaryConfig,
    pub fleet: crate::fleet::merge::MergeConfig,
    pub otlp: crate::otlp::OtlpConfig,
    pub capture: crate::source::CaptureConfig,
    pub listen: crate::serve::ListenConfig,
    pub ui: crate::serve::source::UiConfig,
}

/// `[metrics]`: the Prometheus families.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Distinct label sets per family (and edges in the call graph) before new ones fold
    /// into "other" (`stacktap_series_folded_total`).
    pub max_series_per_family: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_series_per_family: 2000,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        if path.is_dir() {
            anyhow::bail!("{}: is a directory, not a config file", path.display());
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read config: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Every value in its range, or an error naming its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let day = 86_400.0;
        let year = 365.0 * day;
        let mut v = Check::default();
        v.count(
            "amqp.max_frame_bytes",
            self.amqp.max_frame_bytes,
            4096,
            1 << 30,
        );
        v.count("amqp.max_body_bytes", self.amqp.max_body_bytes, 1, 1 << 32);
        v.count(
            "amqp.max_held_bytes_per_connection",
            self.amqp.max_held_bytes_per_connection,
            1,
            1 << 36,
        );
        v.count("amqp.max_held_bytes", self.amqp.max_held_bytes, 1, 1 << 40);
        v.count(
            "amqp.max_consumers_per_connection",
            self.amqp.max_consumers_per_connection,
            1,
            1 << 24,
        );
        v.count(
            "amqp.decode_cache_entries",
            self.amqp.decode_cache_entries,
            1,
            1 << 24,
        );
        if self.amqp.ports.is_empty() {
            v.fail("amqp.ports", "needs at least one port".into());
        }
        v.count("tcp.max_flows", self.tcp.max_flows, 1, 1 << 26);
        v.secs("tcp.idle_timeout_s", self.tcp.idle_timeout_s, 0.001, year);
        v.count(
            "tcp.max_reorder_bytes",
            self.tcp.max_reorder_bytes,
            1,
            1 << 32,
        );
        v.count(
            "tcp.max_reorder_segments",
            self.tcp.max_reorder_segments,
            1,
            1 << 24,
        );
        v.secs("tcp.hole_timeout_s", self.tcp.hole_timeout_s, 0.0, day);
        v.count(
            "rpc.max_pending_calls",
            self.rpc.max_pending_calls,
            1,
            1 << 28,
        );
        v.count(
            "rpc.max_pending_messages",
            self.rpc.max_pending_messages,
            1,
            1 << 28,
        );
        v.secs(
            "rpc.late_reply_window_s",
            self.rpc.late_reply_window_s,
            0.0,
            year,
        );
        v.secs("rpc.cast_settle_s", self.rpc.cast_settle_s, 0.0, day);
        v.secs("rpc.call_max_age_s", self.rpc.call_max_age_s, 0.001, year);
        v.count("rpc.max_recent_ids", self.rpc.max_recent_ids, 1, 1 << 28);
        v.count(
            "rpc.max_known_addresses",
            self.rpc.max_known_addresses,
            1,
            1 << 24,
        );
        v.count(
            "rpc.max_consumers_per_message",
            self.rpc.max_consumers_per_message,
            1,
            1 << 20,
        );
        v.count(
            "rpc.max_interned_names",
            self.rpc.max_interned_names,
            1,
            1 << 24,
        );
        v.secs("view.partial_for_s", self.view.partial_for_s, 0.0, year);
        v.secs("view.settle_s", self.view.settle_s, 0.0, day);
        v.count(
            "http.max_routes_per_service",
            self.http.max_routes_per_service,
            1,
            1 << 20,
        );
        v.count("http.max_pipeline", self.http.max_pipeline, 1, 1 << 16);
        v.count(
            "http.max_head_bytes",
            self.http.max_head_bytes,
            256,
            1 << 24,
        );
        v.count(
            "http.max_error_body_bytes",
            self.http.max_error_body_bytes,
            0,
            1 << 24,
        );
        let r = &self.requests;
        v.secs("requests.settle_s", r.settle_s, 0.0, day);
        v.count("requests.max_open", r.max_open, 1, 1 << 26);
        v.count("requests.max_spans", r.max_spans, 1, 1 << 20);
        v.count("requests.max_trees", r.max_trees, 0, 1 << 26);
        v.count("requests.max_chains", r.max_chains, 0, 1 << 26);
        v.secs("requests.graph_window_s", r.graph_window_s, 1.0, 30.0 * day);
        v.secs(
            "requests.graph_slot_s",
            r.graph_slot_s,
            0.1,
            r.graph_window_s.max(0.1),
        );
        if r.graph_window_s.is_finite()
            && r.graph_slot_s.is_finite()
            && r.graph_slot_s > 0.0
            && r.graph_window_s / r.graph_slot_s > 100_000.0
        {
            v.fail(
                "requests.graph_slot_s",
                "more than 100000 slots per window: make it larger".into(),
            );
        }
        v.secs(
            "store.retention_s",
            self.store.retention_s,
            1.0,
            100.0 * year,
        );
        v.count("store.max_trees", self.store.max_trees, 1, 1 << 30);
        v.count(
            "metrics.max_series_per_family",
            self.metrics.max_series_per_family,
            1,
            1 << 24,
        );
        let sm = &self.summary;
        v.count("summary.max_queues", sm.max_queues, 1, 1 << 24);
        v.count("summary.max_errors", sm.max_errors, 1, 1 << 24);
        v.count("summary.max_routes", sm.max_routes, 1, 1 << 24);
        let f = &self.fleet;
        v.secs("fleet.hold_s", f.hold_s, 0.0, 3600.0);
        v.secs("fleet.silent_after_s", f.silent_after_s, 0.1, day);
        v.secs("fleet.dedupe_window_s", f.dedupe_window_s, 0.0, 3600.0);
        v.count("fleet.max_tracked", f.max_tracked, 1, 1 << 28);
        v.secs("fleet.startup_s", f.startup_s, 0.0, 3600.0);
        v.secs("fleet.warmup_s", f.warmup_s, 0.0, 3600.0);
        let o = &self.otlp;
        v.secs("otlp.timeout_s", o.timeout_s, 0.001, 3600.0);
        v.secs("otlp.flush_interval_s", o.flush_interval_s, 0.01, 60.0);
        v.count("otlp.max_queue_spans", o.max_queue_spans, 1, 1 << 26);
        v.count("otlp.max_batch_spans", o.max_batch_spans, 1, 1 << 20);
        v.count("otlp.max_attempts", o.max_attempts as usize, 1, 100);
        let c = &self.capture;
        v.secs("capture.max_clock_jump_s", c.max_clock_jump_s, 0.001, year);
        v.count(
            "capture.clock_jump_confirm_packets",
            c.clock_jump_confirm_packets,
            1,
            1 << 16,
        );
        v.count("capture.buffer_mb", c.buffer_mb, 1, 1 << 16);
        let l = &self.listen;
        v.count("listen.max_connections", l.max_connections, 1, 1 << 20);
        v.secs("listen.header_timeout_s", l.header_timeout_s, 0.1, 3600.0);
        v.secs("listen.idle_timeout_s", l.idle_timeout_s, 0.1, day);
        v.done()
    }
}

/// Collects every value out of range, so one run names them all.
#[derive(Default)]
struct Check {
    bad: Vec<String>,
}

impl Check {
    fn fail(&mut self, key: &str, why: String) {
        self.bad.push(format!("{key}: {why}"));
    }

    fn count(&mut self, key: &str, v: usize, min: usize, max: usize) {
        if v < min || v > max {
            self.fail(key, format!("{v} is out of range ({min} to {max})"));
        }
    }

    fn secs(&mut self, key: &str, v: f64, min: f64, max: f64) {
        if !v.is_finite() || v < min || v > max {
            self.fail(key, format!("{v} is out of range ({min} to {max} seconds)"));
        }
    }

    fn done(self) -> anyhow::Result<()> {
        match self.bad.len() {
            0 => Ok(()),
            _ => anyhow::bail!("{}", self.bad.join("; ")),
        }
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
        assert_eq!(c.amqp.ports, vec![5672, 5671]);
        assert_eq!(c.rpc.late_reply_window_s, 5.0);
        let e = Config::from_toml("[rpc]\nlate_reply_windw_s = 5\n").unwrap_err();
        assert!(e.to_string().contains("late_reply_windw_s"), "{e}");
        assert!(Config::from_toml("[nonsense]\nx = 1\n").is_err());
    }

    #[test]
    fn http_services_merge_over_the_defaults() {
        let c = Config::from_toml(
            "[http.ports]\n8774 = \"\"\n18774 = \"nova\"\n[http.prefixes]\n\"/api/compute\" = \"nova\"\n",
        )
        .unwrap();
        assert!(!c.http.is_api_port(8774));
        assert!(c.http.is_api_port(18774) && c.http.is_api_port(9696));
        assert!(
            c.http
                .prefixes
                .iter()
                .any(|(p, s)| p == "/api/compute" && s == "nova")
        );
        assert!(Config::from_toml("[http.ports]\nnova = \"nova\"\n").is_err());
        assert!(Config::from_toml("[http.prefixes]\n\"compute/\" = \"nova\"\n").is_err());
    }

    #[test]
    fn values_out_of_range_are_errors_naming_their_key() {
        for (toml, key) in [
            (
                "[requests]\ngraph_window_s = inf\n",
                "requests.graph_window_s",
            ),
            (
                "[requests]\ngraph_window_s = 1e21\n",
                "requests.graph_window_s",
            ),
            ("[requests]\ngraph_slot_s = nan\n", "requests.graph_slot_s"),
            ("[tcp]\nidle_timeout_s = -1\n", "tcp.idle_timeout_s"),
            ("[tcp]\nmax_flows = 0\n", "tcp.max_flows"),
            ("[amqp]\nports = []\n", "amqp.ports"),
            ("[otlp]\ntimeout_s = 0\n", "otlp.timeout_s"),
        ] {
            let e = Config::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml:?}: {e}");
        }
        // a wrong type names its key too
        let e = Config::from_toml("[tcp]\nmax_flows = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_flows"), "{e}");
        Config::default().validate().unwrap();
    }

    /// The file the packages install (/etc/stacktap/stacktap.toml) shows every key with
    /// its default, commented out: as shipped it changes nothing, and uncommented it reads
    /// as exactly the defaults, so it cannot drift from the code.
    #[test]
    fn the_packaged_config_is_the_defaults_commented_out() {
        let text = include_str!("../packaging/stacktap.toml");
        let as_shipped: toml::Value = toml::from_str(text).unwrap();
        let sections = as_shipped.as_table().unwrap();
        assert!(sections.values().all(|s| s.as_table().unwrap().is_empty()));
        Config::from_toml(text).unwrap();

        let uncommented = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with(|c: char| c.is_alphanumeric() || "[\"".contains(c)) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let read: toml::Value = toml::from_str(&uncommented).unwrap();
        let mut defaults = toml::Value::try_from(Config::default()).unwrap();
        // an empty table (no OTLP headers, no users) is shown by an example instead
        for (_, section) in defaults.as_table_mut().unwrap().iter_mut() {
            let keys = section.as_table_mut().unwrap();
            keys.retain(|_, v| v.as_table().is_none_or(|t| !t.is_empty()));
        }
        assert_eq!(
            read, defaults,
            "packaging/stacktap.toml differs from the defaults"
        );
        Config::from_toml(&uncommented).unwrap();
    }
}
