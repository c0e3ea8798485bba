//! OTLP spans, received by code nobody here wrote: a receiver built from the official
//! OpenTelemetry protobufs for Python (opentelemetry-proto + grpcio), over OTLP/gRPC and
//! OTLP/HTTP. The spans are checked against what the processes recorded (the samples'
//! truth), against stacktap's own call graph (paired the way Tempo pairs), and for
//! determinism, secrets and an unreachable backend.

mod common;

use common::{Killed, free_port, http_get, python, read_truth, repo, secrets_in_capture};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CLIENT: i64 = 3;
const SERVER: i64 = 2;
const PRODUCER: i64 = 4;
const CONSUMER: i64 = 5;
const STATUS_ERROR: i64 = 2;

/// The Python receiver, on loopback ports of its own.
struct Receiver {
    _child: Killed,
    grpc: u16,
    http: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start(refuse: bool) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/otlp_receiver.py")).arg(&out);
        if refuse {
            cmd.arg("--refuse");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the OTLP receiver (python with opentelemetry-proto and grpcio) starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = |key: &str| -> u16 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("the receiver did not say its ports: {line:?}"))
        };
        Receiver {
            grpc: port("grpc="),
            http: port("http="),
            _child: Killed(child),
            out,
            _dir: dir,
        }
    }

    fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.http)
    }

    /// Every span received so far (and truncates, for the next run).
    fn take(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        std::fs::write(&self.out, "").unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

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

fn attr<'a>(s: &'a Value, key: &str) -> Option<&'a str> {
    s["attributes"][key].as_str()
}

fn service(s: &Value) -> &str {
    s["resource"]["service.name"].as_str().unwrap_or("")
}

fn kind(s: &Value) -> i64 {
    s["kind"].as_i64().unwrap()
}

/// What the spans of one sample say against its truth; panics with every miss.
fn check_sample(name: &str, spans: &[Value], truth: &[Value], pcaps: &[PathBuf]) {
    let mut bad = Vec::new();
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    assert_eq!(by_id.len(), spans.len(), "{name}: a span id repeats");
    for s in spans {
        for id in ["trace_id", "span_id"] {
            let v = s[id].as_str().unwrap();
            assert!(
                !v.is_empty() && v.chars().any(|c| c != '0'),
                "{name}: bad {id} {s}"
            );
        }
        assert!(
            s["end"].as_u64() >= s["start"].as_u64(),
            "{name}: ends before it starts {s}"
        );
    }
    // every call the processes made: a client span with its _msg_id, a server child in
    // the process that served it; a failed call's client span is ERROR
    let calls: Vec<&Value> = truth.iter().filter(|t| t["kind"] == "call").collect();
    let served = |t: &Value| t["outcome"] == "ok" || t["outcome"] == "remote_error";
    let mut paired = 0;
    for t in &calls {
        let msg_id = t["msg_id"].as_str().unwrap();
        let client = spans
            .iter()
            .find(|s| kind(s) == CLIENT && attr(s, "messaging.message.id") == Some(msg_id));
        let Some(client) = client else {
            bad.push(format!("call {msg_id} ({}): no client span", t["method"]));
            continue;
        };
        if service(client) != t["caller"].as_str().unwrap() {
            bad.push(format!("call {msg_id}: client span in {}", service(client)));
        }
        if t["outcome"] != "ok" && client["status_code"] != STATUS_ERROR {
            bad.push(format!(
                "call {msg_id} failed ({}) but its span is not ERROR",
                t["outcome"]
            ));
        }
        let server = spans.iter().find(|s| {
            kind(s) == SERVER
                && s["parent_span_id"] == client["span_id"]
                && s["trace_id"] == client["trace_id"]
        });
        match server {
            Some(s) if service(s) != service(client) && service(s) != "unknown" => paired += 1,
            Some(s) => bad.push(format!("call {msg_id}: server span in {}", service(s))),
            None if served(t) => {
                bad.push(format!("call {msg_id} ({}): no server child", t["method"]))
            }
            None => {}
        }
        if t["outcome"] == "remote_error"
            && let Some(s) = server
            && s["status_code"] != STATUS_ERROR
        {
            bad.push(format!(
                "call {msg_id}: a remote error, its server span not ERROR"
            ));
        }
    }
    let served_n = calls.iter().filter(|t| served(t)).count();
    assert!(
        paired as f64 >= 0.99 * served_n as f64,
        "{name}: {paired} of {served_n} served calls have a client span and a server child:\n{}",
        bad.join("\n")
    );
    // one trace per user request: every span of what the user's request caused
    let trace_of_call = |id: &str| {
        spans
            .iter()
            .find(|s| {
                attr(s, "messaging.message.id") == Some(id)
                    || attr(s, "oslo.messaging.unique_id") == Some(id)
            })
            .map(|s| s["trace_id"].as_str().unwrap().to_string())
    };
    let trace_of_rest = |t: &Value| {
        spans
            .iter()
            .find(|s| {
                kind(s) == CLIENT
                    && attr(s, "openstack.request_id") == t["request_id"].as_str()
                    && attr(s, "http.request.method") == t["method"].as_str()
            })
            .map(|s| s["trace_id"].as_str().unwrap().to_string())
    };
    let root = |t: &Value| {
        t["global_request_id"]
            .as_str()
            .or(t["request_id"].as_str())
            .map(str::to_string)
    };
    let users: Vec<&Value> = truth
        .iter()
        .filter(|t| t["kind"] == "rest_call" && t["caller"] == "openstack")
        .collect();
    let mut whole = 0;
    for u in &users {
        let Some(r) = root(u) else { continue };
        let mut traces = BTreeSet::new();
        traces.insert(trace_of_rest(u));
        for t in truth.iter().filter(|t| root(t).as_deref() == Some(&r)) {
            match t["kind"].as_str() {
                Some("rest_call") => traces.insert(trace_of_rest(t)),
                Some("call") => traces.insert(trace_of_call(t["msg_id"].as_str().unwrap())),
                Some("cast") => traces.insert(trace_of_call(t["unique_id"].as_str().unwrap())),
                _ => false,
            };
        }
        if traces.len() == 1 && traces.iter().all(Option::is_some) {
            whole += 1;
        } else {
            bad.push(format!("user request {r}: traces {traces:?}"));
        }
    }
    assert!(
        whole as f64 >= 0.99 * users.len() as f64,
        "{name}: {whole} of {} user requests are one trace:\n{}",
        users.len(),
        bad.join("\n")
    );
    // nothing secret on the way out
    let text = spans.iter().map(Value::to_string).collect::<String>();
    let scenario = truth.iter().find(|t| t["kind"] == "scenario");
    let mut secrets: Vec<String> = pcaps.iter().flat_map(|p| secrets_in_capture(p)).collect();
    for key in ["token_prefix", "password_prefix"] {
        if let Some(s) = scenario.and_then(|s| s[key].as_str()) {
            secrets.push(s.to_string());
        }
    }
    secrets.extend([common::TOKEN_PREFIX.into(), common::PASSWORD_PREFIX.into()]);
    for s in secrets {
        assert!(!text.contains(&s), "{name}: secret {s:?} reached a span");
    }
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
