//! The graph UI in real headless Chromium (Debian's `chromium`, driven by playwright-core
//! from ui/node_modules): `stacktap demo` serves it on the failure sample; the page must
//! draw the services, queues and calls the sample's processes recorded, mark each root
//! cause's path, and keep its layout while the looping replay moves the numbers.
//! Screenshots are left in `target/tmp/ui-artifacts/`.

mod common;
use common::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn chromium() -> String {
    let path = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&path).is_file(),
        "{path} is missing: the UI test needs Debian's chromium (scripts/setup-deps installs it)"
    );
    path
}

/// The graph node a chain's root names: a process, or the queue a call died in (a server's
/// own queue, `compute.host3`, is drawn as its topic's).
fn root_node(service: &str) -> String {
    match service.strip_prefix("queue:") {
        Some(q) => format!("queue:{}", q.split('.').next().unwrap_or(q)),
        None => format!("service:{service}"),
    }
}

/// What the graph must show, from the processes' own records.
fn expected(truth: &[Value]) -> Value {
    let processes: BTreeSet<&str> = truth
        .iter()
        .filter(|t| t["kind"] == "process")
        .filter_map(|t| t["service"].as_str())
        .collect();
    let (mut nodes, mut edges) = (BTreeSet::new(), BTreeSet::new());
    for t in truth {
        match t["kind"].as_str() {
            Some("call") | Some("cast") => {
                let q = truth_queue_node(t);
                let caller = format!("service:{}", t["caller"].as_str().unwrap());
                nodes.insert(q.clone());
                nodes.insert(caller.clone());
                edges.insert((caller, q));
            }
            Some("rest_call") => {
                let server = format!(
                    "service:{}",
                    stacktap::openstack::services::api_process(t["service"].as_str().unwrap())
                );
                nodes.insert(server.clone());
                // who called is known on the wire only when something names it; the
                // server and a REST edge into it always are
                edges.insert(("*".into(), server));
            }
            Some("handled") => {
                if let Some(s) = t["service"].as_str().filter(|s| processes.contains(s)) {
                    nodes.insert(format!("service:{s}"));
                }
            }
            _ => {}
        }
    }
    let mut roots: Vec<Value> = Vec::new();
    for t in truth.iter().filter(|t| t["kind"] == "surfaced") {
        // the fault at the bottom, as the processes recorded it (a reschedule that ran out
        // of hosts: what failed on the host tried)
        let cause = recorded_root(truth, root_of(t), &t["cause"]);
        let (service, error) = (cause["service"].as_str().unwrap(), &cause["error"]);
        if roots
            .iter()
            .any(|r| r["service"] == service && r["error"] == *error)
        {
            continue;
        }
        let node = root_node(service);
        let mut path = vec![
            format!("service:{}", t["service"].as_str().unwrap()),
            node.clone(),
        ];
        let op = cause["operation"].as_str().unwrap();
        if !op.contains(' ') {
            // an RPC: the queue it went through is on the path too
            path.push(format!("queue:{}", op.split('.').next().unwrap()));
        }
        let screenshot = (error == "PortBindingFailed").then_some("chain.png");
        roots.push(json!({
            "service": service, "error": error, "node": node, "path": path,
            "screenshot": screenshot,
        }));
    }
    let edges: Vec<[String; 2]> = edges.into_iter().map(|(a, b)| [a, b]).collect();
    json!({ "nodes": nodes, "edges": edges, "roots": roots })
}

#[test]
fn the_graph_ui_in_headless_chromium() {
    let chromium = chromium();
    let ui = repo().join("ui");
    assert!(
        ui.join("node_modules/playwright-core").is_dir(),
        "ui/node_modules/playwright-core is missing: run scripts/setup-deps (npm ci in ui/)"
    );
    let truth = read_truth(&repo().join("sampledata/failures.truth.jsonl"));
    let want = expected(&truth);
    assert_eq!(want["roots"].as_array().unwrap().len(), 3, "{want}");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let expected_path = dir.join("expected.json");
    std::fs::write(&expected_path, want.to_string()).unwrap();

    // the demo, looping four times faster than real time so that numbers move quickly
    let port = free_port();
    let _demo = Killed(
        Command::new(env!("CARGO_BIN_EXE_stacktap"))
            .args([
                "demo",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--speed",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while http_get(port, "/healthz").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "demo never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, page) = http_get(port, "/").unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("/ui/vendor/cytoscape.min.js"), "{page}");

    let out = Command::new("node")
        .arg(ui.join("test/ui.test.mjs"))
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(&expected_path)
        .arg(&dir)
        .env("CHROMIUM", chromium)
        .output()
        .expect("node is needed for the UI test (Node.js 20)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "UI checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for shot in ["graph.png", "chain.png", "panel.png"] {
        let len = std::fs::metadata(dir.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot}: {len} bytes");
    }
    println!("screenshots in {}", dir.display());
}

use std::path::Path;
