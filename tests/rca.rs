//! `stacktap rca` on a failure capture and on a running stacktap, and the API behind it
//! (`/api/chains`, `/api/requests/{id}`, `/api/graph`).

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};

/// `stacktap replay ARGS --listen` on a free port, killed when dropped.
fn serve(args: &[&str]) -> (Killed, u16, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .arg("replay")
        .args(args)
        .args(["--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Killed(child), port, addr)
}
use std::time::{Duration, Instant};

fn sample(name: &str) -> String {
    repo()
        .join(format!("sampledata/{name}"))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn rca_on_a_capture_ranks_the_injected_faults_and_prints_a_tree() {
    let (code, out, err) = stacktap(&["rca", "--json", &sample("failures.pcap")]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let truth = read_truth(&repo().join("sampledata/failures.truth.jsonl"));
    let surfaced: std::collections::BTreeSet<&str> = truth
        .iter()
        .filter(|t| t["kind"] == "surfaced")
        .filter_map(|t| t["global_request_id"].as_str().or(t["request_id"].as_str()))
        .collect();
    assert_eq!(report["failed_requests"], surfaced.len() as u64);
    let roots = report["roots"].as_array().unwrap();
    // one root per distinct fault the processes recorded at the bottom of a failure
    let recorded: std::collections::BTreeSet<String> = truth
        .iter()
        .filter(|t| t["kind"] == "surfaced")
        .map(|t| {
            let r = recorded_root(&truth, root_of(t), &t["cause"]);
            format!("{} {}", r["service"], r["error"])
        })
        .collect();
    assert_eq!(roots.len(), recorded.len(), "{report} vs {recorded:?}");
    let total: u64 = roots.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(total, surfaced.len() as u64);

    // the text view names each root with an example to drill into
    let (code, text, _) = stacktap(&["rca", &sample("failures.pcap")]);
    assert_eq!(code, 0);
    assert!(
        text.contains("root causes, by user requests broken"),
        "{text}"
    );
    assert!(text.contains("neutron-server PUT /v2.0/ports/{id} → PortBindingFailed"));
    let example = roots[0]["example_request_id"].as_str().unwrap();
    let (code, tree, err) = stacktap(&["rca", &sample("failures.pcap"), "--request-id", example]);
    assert_eq!(code, 0, "{err}");
    assert!(
        tree.contains("ROOT CAUSE") && tree.contains("FAILED"),
        "{tree}"
    );
    assert!(
        tree.lines()
            .any(|l| l.contains("✗") && l.contains("POST /v2.1/servers"))
    );
    let (code, _, err) = stacktap(&["rca", &sample("failures.pcap"), "--request-id", "req-nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("req-nope"), "{err}");
}

#[test]
fn rca_usage_errors() {
    assert_eq!(stacktap(&["rca"]).0, 2);
    assert_eq!(
        stacktap(&[
            "rca",
            "--from",
            "http://127.0.0.1:1",
            &sample("failures.pcap")
        ])
        .0,
        2
    );
    let (code, _, err) = stacktap(&["rca", "--since", "1w", &sample("failures.pcap")]);
    assert_eq!(code, 1);
    assert!(err.contains("--since"), "{err}");
    let (code, _, err) = stacktap(&["rca", "--from", "http://127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("--from"), "{err}");
}

#[test]
fn a_running_stacktap_serves_chains_trees_and_the_graph() {
    let (server, port, addr) = serve(&[&sample("failures.pcap")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    // the replay is done once the chains are published
    let chains = loop {
        if let Some((200, body)) = http_get(port, "/api/chains") {
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["rca"]["failed_requests"].as_u64().unwrap_or(0) > 0 {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "no chains served");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(1200)); // the graph is refreshed once a second
    let from = format!("http://{addr}");
    let (code, out, err) = stacktap(&["rca", "--from", &from, "--json"]);
    assert_eq!(code, 0, "{err}");
    let remote: Value = serde_json::from_str(&out).unwrap();
    let (_, local, _) = stacktap(&["rca", "--json", &sample("failures.pcap")]);
    let local: Value = serde_json::from_str(&local).unwrap();
    assert_eq!(
        remote, local,
        "the same answer from the API as from the file"
    );
    assert_eq!(
        chains["chains"].as_array().unwrap().len() as u64,
        chains["rca"]["failed_requests"]
    );
    let example = local["roots"][0]["example_request_id"].as_str().unwrap();
    let (code, tree, _) = stacktap(&["rca", "--from", &from, "--request-id", example]);
    assert_eq!(code, 0);
    assert!(tree.contains("ROOT CAUSE"));
    // the example command the text report prints works as printed
    let (_, text, _) = stacktap(&["rca", "--from", &from]);
    let hint = text
        .lines()
        .find_map(|l| {
            l.split_once("e.g. stacktap ")
                .map(|(_, cmd)| cmd.to_string())
        })
        .expect("an example command");
    let words: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(words[..3], ["rca", "--from", from.as_str()], "{hint}");
    let (code, tree, err) = stacktap(&words);
    assert_eq!(code, 0, "{hint}: {err}");
    assert!(tree.contains("ROOT CAUSE"), "{hint}");
    assert_eq!(http_get(port, "/api/requests/req-nope").unwrap().0, 404);
    let (code, out, _) = stacktap(&["rca", "--from", &from, "--since", "1s", "--json"]);
    assert_eq!(code, 0);
    let recent: Value = serde_json::from_str(&out).unwrap();
    assert!(recent["failed_requests"].as_u64() < local["failed_requests"].as_u64());

    // the graph: every REST request and RPC of the truth on an edge, with the right count
    let (status, body) = http_get(port, "/api/graph").unwrap();
    assert_eq!(status, 200);
    let graph: Value = serde_json::from_str(&body).unwrap();
    // a window: the last 2 s of the capture hold fewer requests than all of it
    let (status, body) = http_get(port, "/api/graph?window=2").unwrap();
    assert_eq!(status, 200);
    let recent: Value = serde_json::from_str(&body).unwrap();
    let total = |g: &Value| -> u64 {
        g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["requests"].as_u64().unwrap())
            .sum()
    };
    assert!(
        total(&recent) > 0 && total(&recent) < total(&graph),
        "{}",
        recent["window_s"]
    );
    assert_eq!(recent["requested_window_s"], 2.0);
    assert_eq!(http_get(port, "/api/graph?window=soon").unwrap().0, 400);
    // the UI, with its scripts, from the same listener
    let (status, page) = http_get(port, "/").unwrap();
    assert!(
        status == 200 && page.contains("<title>stacktap"),
        "{status}"
    );
    let (status, js) = http_get(port, "/ui/vendor/cytoscape.min.js").unwrap();
    assert!(status == 200 && js.len() > 100_000, "{status} {}", js.len());
    drop(server);
    let truth = read_truth(&repo().join("sampledata/failures.truth.jsonl"));
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for t in &truth {
        let key = match t["kind"].as_str() {
            Some("rest_call") => format!(
                "http service:{}",
                process_of(t["service"].as_str().unwrap())
            ),
            Some("call") | Some("cast") => format!(
                "rpc {} from service:{}",
                truth_queue_node(t),
                t["caller"].as_str().unwrap()
            ),
            _ => continue,
        };
        *want.entry(key).or_default() += 1;
    }
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for e in graph["edges"].as_array().unwrap() {
        let key = match e["protocol"].as_str().unwrap() {
            "http" => format!("http {}", e["target"].as_str().unwrap()),
            _ if e["type"] == "deliver" => continue,
            _ => format!(
                "rpc {} from {}",
                e["target"].as_str().unwrap(),
                e["source"].as_str().unwrap()
            ),
        };
        *got.entry(key).or_default() += e["requests"].as_u64().unwrap();
    }
    assert_eq!(got, want, "graph edges vs the processes' own records");
    assert!(
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "queue:compute")
    );
}

fn process_of(service: &str) -> String {
    stacktap::openstack::services::api_process(service).to_string()
}

#[test]
fn the_store_keeps_chains_and_trees_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stacktap.db");
    let db = db.to_str().unwrap();
    // a first run records the failures, then exits
    let (code, _, err) = stacktap(&["replay", &sample("failures.pcap"), "--store", db]);
    assert_eq!(code, 0, "{err}");
    let (_, local, _) = stacktap(&["rca", "--json", &sample("failures.pcap")]);
    let local: Value = serde_json::from_str(&local).unwrap();
    // a new process on other traffic still answers about them
    let (server, port, addr) = serve(&[&sample("healthy.pcap"), "--store", db]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/healthz").is_none() {
        assert!(Instant::now() < deadline, "no listener");
        std::thread::sleep(Duration::from_millis(100));
    }
    let from = format!("http://{addr}");
    let (code, out, err) = stacktap(&["rca", "--from", &from, "--json"]);
    let example = local["roots"][0]["example_request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (tcode, tree, _) = stacktap(&["rca", "--from", &from, "--request-id", &example]);
    drop(server);
    assert_eq!(code, 0, "{err}");
    let remote: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(remote["roots"], local["roots"]);
    assert_eq!(tcode, 0);
    assert!(tree.contains("ROOT CAUSE"), "{tree}");
    let (code, _, err) = stacktap(&[
        "replay",
        &sample("healthy.pcap"),
        "--store",
        "/nonexistent/dir/x.db",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--store"), "{err}");
}
