//! OTLP spans, received by code nobody here wrote: a receiver built from the official
//! OpenTelemetry protobufs for Python (opentelemetry-proto + grpcio), over OTLP/gRPC and
//! OTLP/HTTP. The spans are checked against what the processes recorded (the samples'
//! truth), against stacktap's own call graph (paired the way Tempo pairs), and for
//! determinism, secrets and an unreachable backend.

mod common;

use common::otlp::*;
use common::{Killed, free_port, http_get, read_truth, repo};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sample(name: &str) -> PathBuf {
    repo().join("sampledata").join(name)
}

/// Replays `files` exporting to `endpoint`; returns stderr and the final metrics.
fn replay(files: &[PathBuf], endpoint: &str, extra: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.prom");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .arg("replay")
        .args(files)
        .args(["--otlp-endpoint", endpoint, "--metrics-out"])
        .arg(&metrics)
        .args(extra)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_SDK_DISABLED")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the replay stalled on its exporter"
    );
    (stderr, std::fs::read_to_string(&metrics).unwrap())
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics")) as u64
}

#[test]
fn spans_match_what_the_processes_recorded_on_every_sample() {
    let rx = Receiver::start(false);
    for name in [
        "healthy",
        "remote_error",
        "dead_consumer",
        "slow_server",
        "failures",
        "rest",
        "modern",
        "failover",
    ] {
        let pcap = sample(&format!("{name}.pcap"));
        let (_, metrics) = replay(std::slice::from_ref(&pcap), &rx.grpc_url(), &[]);
        let spans = rx.take();
        assert!(!spans.is_empty(), "{name}: no spans");
        assert_eq!(
            counter(&metrics, "stacktap_otlp_spans_exported_total"),
            spans.len() as u64
        );
        assert_eq!(counter(&metrics, "stacktap_otlp_spans_dropped_total"), 0);
        let truth = read_truth(&sample(&format!("{name}.truth.jsonl")));
        check_sample(name, &spans, &truth, &[pcap]);
    }
}

#[test]
fn a_cluster_seen_by_four_probes_gives_the_same_spans_as_the_whole() {
    let rx = Receiver::start(false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cluster.toml");
    std::fs::write(&cfg, "[amqp]\nports = [5672, 5682, 5683, 5684]\n").unwrap();
    let pcaps: Vec<PathBuf> = ["a", "b", "c", "api"]
        .iter()
        .map(|n| sample(&format!("cluster/cluster-{n}.pcap")))
        .collect();
    replay(&pcaps, &rx.grpc_url(), &["--config", cfg.to_str().unwrap()]);
    let spans = rx.take();
    let truth = read_truth(&sample("cluster/cluster.truth.jsonl"));
    check_sample("cluster", &spans, &truth, &pcaps);
}

/// The ids of a run: (trace, span, parent, kind, name) for every span.
fn ids(spans: &[Value]) -> BTreeSet<(String, String, String, i64, String)> {
    spans
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().unwrap().to_string();
            (
                f("trace_id"),
                f("span_id"),
                f("parent_span_id"),
                kind(s),
                f("name"),
            )
        })
        .collect()
}

#[test]
fn two_runs_over_grpc_and_http_give_identical_ids() {
    let rx = Receiver::start(false);
    let files = [sample("failures.pcap"), sample("rest.pcap")];
    replay(&files, &rx.grpc_url(), &[]);
    let over_grpc = rx.take();
    replay(&files, &rx.http_url(), &[]);
    let over_http = rx.take();
    assert!(over_grpc.iter().all(|s| s["transport"] == "grpc"));
    assert!(over_http.iter().all(|s| s["transport"] == "http"));
    assert!(!over_grpc.is_empty());
    assert_eq!(ids(&over_grpc), ids(&over_http));
    // a request id pasted into a backend's search finds its trace
    let failed_user_request = over_grpc
        .iter()
        .find(|s| attr(s, "stacktap.request.symptom").is_some())
        .expect("a failed user request");
    let id = attr(failed_user_request, "stacktap.request.id").unwrap();
    assert_eq!(
        failed_user_request["trace_id"].as_str().unwrap(),
        id.trim_start_matches("req-").replace('-', "")
    );
}

/// Tempo's service-graph rule: a CLIENT (PRODUCER) span and the SERVER (CONSUMER) span
/// whose parent it is, in one trace, are one edge between their services; a CLIENT
/// (PRODUCER) span left without one that names a `peer.service` is an edge to that
/// virtual node.
fn paired_edges(spans: &[Value]) -> BTreeMap<(String, String, String), u64> {
    let by_id: HashMap<(&str, &str), &Value> = spans
        .iter()
        .map(|s| {
            (
                (
                    s["trace_id"].as_str().unwrap(),
                    s["span_id"].as_str().unwrap(),
                ),
                s,
            )
        })
        .collect();
    let mut edges = BTreeMap::new();
    for s in spans
        .iter()
        .filter(|s| matches!(kind(s), SERVER | CONSUMER))
    {
        let key = (
            s["trace_id"].as_str().unwrap(),
            s["parent_span_id"].as_str().unwrap(),
        );
        let Some(p) = by_id.get(&key) else { continue };
        let conn = match (kind(p), kind(s)) {
            (CLIENT, SERVER) => "",
            (PRODUCER, CONSUMER) => "messaging_system",
            _ => continue,
        };
        *edges
            .entry((
                service(p).to_string(),
                service(s).to_string(),
                conn.to_string(),
            ))
            .or_default() += 1;
    }
    let parents: BTreeSet<(&str, &str)> = spans
        .iter()
        .filter(|s| matches!(kind(s), SERVER | CONSUMER))
        .map(|s| {
            (
                s["trace_id"].as_str().unwrap(),
                s["parent_span_id"].as_str().unwrap(),
            )
        })
        .collect();
    for c in spans
        .iter()
        .filter(|s| matches!(kind(s), CLIENT | PRODUCER))
    {
        let key = (
            c["trace_id"].as_str().unwrap(),
            c["span_id"].as_str().unwrap(),
        );
        if let (false, Some(peer)) = (parents.contains(&key), attr(c, "peer.service")) {
            *edges
                .entry((
                    service(c).to_string(),
                    peer.to_string(),
                    "virtual_node".into(),
                ))
                .or_default() += 1;
        }
    }
    edges
}

/// The service-to-service edges of `/api/graph`: REST edges as they are, RPC edges
/// through their queue (each caller of an operation on a queue to each server it was
/// delivered to).
fn graph_edges(graph: &Value) -> BTreeSet<(String, String, String)> {
    let name = |id: &str| id.split_once(':').map_or(id, |(_, n)| n).to_string();
    let edges = graph["edges"].as_array().unwrap();
    let mut out = BTreeSet::new();
    for e in edges {
        let (src, dst) = (e["source"].as_str().unwrap(), e["target"].as_str().unwrap());
        match e["type"].as_str().unwrap() {
            "http" => {
                out.insert((name(src), name(dst), String::new()));
            }
            kind @ ("call" | "cast" | "fanout") => {
                let conn = if kind == "call" {
                    ""
                } else {
                    "messaging_system"
                };
                for d in edges.iter().filter(|d| {
                    d["type"] == "deliver"
                        && d["source"] == e["target"]
                        && d["operation"] == e["operation"]
                }) {
                    out.insert((name(src), name(d["target"].as_str().unwrap()), conn.into()));
                }
            }
            _ => {}
        }
    }
    out
}

/// `traces_service_graph_request_total` by (client, server, connection_type).
fn tempo_metric(metrics: &str) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("traces_service_graph_request_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let label = |k: &str| {
            let at = labels.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
            labels[at..at + labels[at..].find('"').unwrap()].to_string()
        };
        out.insert(
            (label("client"), label("server"), label("connection_type")),
            value.parse::<f64>().unwrap() as u64,
        );
    }
    out
}

#[test]
fn paired_as_tempo_pairs_the_spans_draw_the_api_graph() {
    let rx = Receiver::start(false);
    let port = free_port();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_stacktap"))
            .args([
                "replay",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--otlp-endpoint",
            ])
            .arg(rx.grpc_url())
            .args([
                sample("failures.pcap"),
                sample("rest.pcap"),
                sample("modern.pcap"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // the spans are out once it says the replay is done
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut said = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let done = line.contains("replay done");
        said.push(line);
        if done {
            break;
        }
    }
    assert!(said.iter().any(|l| l.contains("replay done")), "{said:?}");
    let (_, graph) = http_get(port, "/api/graph").expect("/api/graph");
    let (_, metrics) = http_get(port, "/metrics").expect("/metrics");
    let spans = rx.take();
    let paired = paired_edges(&spans);
    let graph: Value = serde_json::from_str(&graph).unwrap();
    let from_graph = graph_edges(&graph);
    assert!(!from_graph.is_empty());
    let (to_queues, to_services): (BTreeSet<_>, BTreeSet<_>) = paired
        .keys()
        .cloned()
        .partition(|(_, _, conn)| conn == "virtual_node");
    assert_eq!(
        to_services, from_graph,
        "the pairs Tempo would draw from the spans are the /api/graph edges"
    );
    // a message no server took ends at its queue, in both
    let graph_ids: BTreeSet<(String, String)> = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().into(),
                e["target"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (client, queue, _) in &to_queues {
        assert!(
            graph_ids.contains(&(format!("service:{client}"), queue.clone())),
            "{client} → {queue}"
        );
    }
    // and they count what stacktap's own Tempo-compatible families count
    assert_eq!(paired, tempo_metric(&metrics));
}

#[test]
fn an_unreachable_or_refusing_backend_costs_counted_drops_never_a_stall() {
    let files = [sample("failures.pcap")];
    // nobody listens
    let (stderr, metrics) = replay(&files, &format!("http://127.0.0.1:{}", free_port()), &[]);
    let dropped = counter(&metrics, "stacktap_otlp_spans_dropped_total");
    assert!(dropped > 0, "{metrics}");
    assert_eq!(counter(&metrics, "stacktap_otlp_spans_exported_total"), 0);
    assert!(
        stderr.contains("OTLP endpoint"),
        "a warning names the endpoint: {stderr}"
    );
    // a backend that answers, refusing (gRPC UNAVAILABLE; HTTP 503)
    let rx = Receiver::start(true);
    for url in [rx.grpc_url(), rx.http_url()] {
        let (_, m) = replay(&files, &url, &[]);
        assert_eq!(
            counter(&m, "stacktap_otlp_spans_dropped_total"),
            dropped,
            "{url}"
        );
        assert!(counter(&m, "stacktap_otlp_export_failures_total") > 0);
    }
    assert!(rx.take().is_empty());
}

#[test]
fn the_standard_variables_configure_the_export() {
    let rx = Receiver::start(false);
    let out = Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .args(["replay"])
        .arg(sample("healthy.pcap"))
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", rx.http),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        .env("OTEL_EXPORTER_OTLP_HEADERS", "x-scope-orgid=region-one")
        .env("OTEL_RESOURCE_ATTRIBUTES", "cloud.region=RegionOne")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = rx.take();
    assert!(!spans.is_empty());
    assert!(spans.iter().all(|s| s["transport"] == "http"));
    assert!(
        spans
            .iter()
            .all(|s| s["resource"]["cloud.region"] == "RegionOne")
    );
    // the services are the processes the wire named, not stacktap
    let services: BTreeSet<&str> = spans.iter().map(service).collect();
    assert!(services.contains("nova-conductor"), "{services:?}");
    // disabled: nothing goes, nothing fails
    let out = Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .args(["replay"])
        .arg(sample("healthy.pcap"))
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", rx.grpc),
        )
        .env("OTEL_SDK_DISABLED", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(rx.take().is_empty());
}
