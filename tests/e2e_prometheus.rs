//! End to end with a real Prometheus (Debian's package): it scrapes `stacktap replay
//! --speed 1 --listen` on the failure sample with our rules loaded; the expected alerts
//! must fire and the dashboards' main queries must return data, asked through
//! Prometheus' own HTTP API.

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_stacktap_and_the_alerts_fire() {
    let dir = tempfile::tempdir().unwrap();
    let (st_port, prom_port) = (free_port(), free_port());
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: stacktap\n    static_configs:\n      - targets: ['127.0.0.1:{st_port}']\n",
        repo().join("rules/stacktap.rules.yml").display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus must be installed (Debian package prometheus; .ci/run installs it)",
            ),
    );
    // Prometheus first, so that it sees stacktap's counters from their birth
    let ready = Instant::now() + Duration::from_secs(30);
    while http_get(prom_port, "/-/ready").map(|r| r.1).is_none() {
        assert!(Instant::now() < ready, "prometheus did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _stacktap = Killed(
        Command::new(env!("CARGO_BIN_EXE_stacktap"))
            .args(["replay", "--speed", "1", "--listen"])
            .arg(format!("127.0.0.1:{st_port}"))
            .arg(repo().join("sampledata/failures.pcap"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let want = ["StacktapRpcTimeouts", "StacktapNewErrorChainRoot"];
    let firing = loop {
        let alerts: Vec<(String, String)> = http_get(prom_port, "/api/v1/alerts")
            .map(|r| r.1)
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .map(|v| {
                v["data"]["alerts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|a| {
                        (
                            a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                            a["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let all = want
            .iter()
            .all(|w| alerts.iter().any(|(n, s)| n == w && s == "firing"));
        if all {
            break alerts;
        }
        assert!(
            Instant::now() < deadline,
            "alerts not firing through Prometheus: {alerts:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // no alert about the probe itself on a clean replay
    assert!(
        !firing.iter().any(|(n, _)| n.starts_with("StacktapProbe")),
        "{firing:?}"
    );
    // the dashboards' main queries return data
    for q in [
        "sum by (topic, type) (rate(stacktap_rpc_messages_total[1m]))",
        "histogram_quantile(0.99, sum by (topic, le) (rate(stacktap_rpc_reply_wait_seconds_bucket[1m])))",
        "sum by (service) (rate(stacktap_http_requests_total[1m]))",
        "sum by (root_service, root_operation, root_error) (increase(stacktap_error_chains_total[5m]))",
        "stacktap:rpc_reply_wait_seconds:p99_5m",
        "sum(traces_service_graph_request_total)",
    ] {
        // recording rules are evaluated every 30 s: give each query time to have data
        let deadline = Instant::now() + Duration::from_secs(75);
        loop {
            let body = http_get(prom_port, &format!("/api/v1/query?query={}", encode(q)))
                .unwrap()
                .1;
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["status"], "success", "{q}: {body}");
            if !v["data"]["result"].as_array().unwrap().is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{q}: no data");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
