//! A real fleet end to end: a 3-node RabbitMQ cluster on this host (scripts/rabbitmq-
//! cluster: 5682-5684, quorum queues), the generator's real oslo.messaging processes
//! listing all three nodes (oslo.messaging shuffles them per connection), one live
//! `stacktap capture --collector` probe per node and one for the API ports, one
//! `stacktap collect`. The collector's events must match what the processes recorded,
//! as a single vantage point seeing everything would. Needs root (capture on lo),
//! rabbitmq-server and STACKTAP_PYTHON; .ci/run provides them.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str =
    "[amqp]\nports = [5682, 5683, 5684]\n[fleet]\nexpect = [\"a\", \"b\", \"c\", \"api\"]\n";
const API_PORTS: &[u16] = &[5000, 8774, 9292, 9696, 8778];

fn stacktap_child(args: &[String], log: &Path) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_stacktap"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start stacktap"),
    )
}

fn signal(c: &Killed, sig: i32) {
    unsafe {
        libc::kill(c.0.id() as i32, sig);
    }
}

fn exit_code(c: &mut Killed, what: &str) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(s) = c.0.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_real_three_node_cluster_through_four_live_probes_and_one_collector() {
    let up = Command::new(repo().join("scripts/rabbitmq-cluster"))
        .arg("start")
        .status()
        .expect("scripts/rabbitmq-cluster");
    assert!(up.success(), "the 3-node RabbitMQ cluster did not start");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("fleet.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let (ingest, listen) = (free_port(), free_port());
    let events = d.join("events.jsonl");
    let metrics = d.join("metrics.prom");
    let spans = common::otlp::Receiver::start(false);
    let mut collector = stacktap_child(
        &[
            "collect".into(),
            "--ingest".into(),
            format!("127.0.0.1:{ingest}"),
            "--listen".into(),
            format!("127.0.0.1:{listen}"),
            "--config".into(),
            cfg.clone(),
            "--events-out".into(),
            events.to_str().unwrap().into(),
            "--metrics-out".into(),
            metrics.to_str().unwrap().into(),
            "--otlp-endpoint".into(),
            spans.grpc_url(),
        ],
        &d.join("collector.log"),
    );
    let api_filter = API_PORTS
        .iter()
        .map(|p| format!("tcp port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut probes: Vec<(String, Killed)> = [
        ("a", "tcp port 5682".to_string()),
        ("b", "tcp port 5683".into()),
        ("c", "tcp port 5684".into()),
        ("api", api_filter),
    ]
    .into_iter()
    .map(|(name, filter)| {
        let args = [
            "capture",
            "-i",
            "lo",
            "--filter",
            &filter,
            "--config",
            &cfg,
            "--collector",
            &format!("http://127.0.0.1:{ingest}"),
            "--probe-name",
            name,
        ]
        .map(String::from);
        (
            name.to_string(),
            stacktap_child(&args, &d.join(format!("probe-{name}.log"))),
        )
    })
    .collect();
    // every probe is heard (each sends its clock every 200 ms, quiet or not)
    let t = Instant::now();
    loop {
        let m = http_get(listen, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        let heard = ["a", "b", "c", "api"]
            .iter()
            .all(|n| m.contains(&format!("stacktap_probe_up{{probe=\"{n}\"}} 1")));
        if heard {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the probes did not reach the collector:\n{m}"
        );
        for (n, p) in &mut probes {
            assert!(
                p.0.try_wait().unwrap().is_none(),
                "probe {n} exited early:\n{}",
                log_tail(&d.join(format!("probe-{n}.log")), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    record_scenario("cluster", d);
    // the UI's header: the collector names each probe feeding it, all live
    let source: serde_json::Value = http_get(listen, "/api/source")
        .and_then(|r| serde_json::from_str(&r.1).ok())
        .expect("/api/source");
    assert!(
        source["what"].as_str().unwrap().contains("collector"),
        "{source}"
    );
    let live: Vec<&str> = source["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["silent"] == false && p["last_seen"].as_f64() > Some(0.0))
        .filter_map(|p| p["name"].as_str())
        .collect();
    for n in ["a", "b", "c", "api"] {
        assert!(live.contains(&n), "probe {n} not live in {source}");
    }
    for (n, p) in &mut probes {
        signal(p, libc::SIGINT);
        let code = exit_code(p, n);
        let log = log_tail(&d.join(format!("probe-{n}.log")), 20);
        assert_eq!(code, 0, "probe {n}:\n{log}");
    }
    std::thread::sleep(Duration::from_secs(2));
    signal(&collector, libc::SIGTERM);
    let code = exit_code(&mut collector, "the collector");
    let log = log_tail(&d.join("collector.log"), 20);
    assert_eq!(code, 0, "the collector:\n{log}");

    let truth = read_truth(&d.join("cluster.truth.jsonl"));
    let text = std::fs::read_to_string(&events).unwrap();
    let pcaps: Vec<_> = ["a", "b", "c", "api"]
        .map(|n| d.join(format!("cluster-{n}.pcap")))
        .into();
    let (first_ts, last_ts) = capture_bounds(&pcaps);
    let r = Replayed {
        events: text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        events_text: text.clone(),
        metrics: std::fs::read_to_string(&metrics).unwrap(),
        summary: replay(&[d.join("cluster-api.pcap")]).summary,
        first_ts,
        last_ts,
        health: Default::default(),
    };
    // the probes share this host's clock: no event is stamped before its cause, so the
    // collector corrects nothing and the wire times are the processes' own
    let bad = check_all_against_truth(&r, &truth, 0.001);
    let offsets: Vec<&str> = r
        .metrics
        .lines()
        .filter(|l| l.starts_with("stacktap_probe_clock_offset_seconds{"))
        .collect();
    // shown by --no-capture: a probe's anomalies (a packet clock regression) warn early
    for l in r.metrics.lines() {
        if l.starts_with("stacktap_probe_anomalies_total")
            || l.starts_with("stacktap_probe_late_total")
        {
            eprintln!("{l}");
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches (estimated offsets: {offsets:?}):\n{}\n{}",
        bad.len(),
        bad.join("\n"),
        why_mismatched(&r.metrics, &pcaps, &truth, d)
    );
    assert!(r.metrics.contains("stacktap_partial_view 0"));
    // the collector's spans, received by the official OTLP protobufs
    let received = spans.take();
    assert!(!received.is_empty(), "the collector sent no spans");
    common::otlp::check_sample("live cluster", &received, &truth, &pcaps);
    assert!(!text.contains(TOKEN_PREFIX), "a token reached the events");
}

/// What tells the live path's losses from the capture's: the collector's view of each
/// probe (drops, late observations, silence), the same capture replayed by one process
/// and checked against the same truth, and the end of every log.
fn why_mismatched(
    metrics: &str,
    pcaps: &[std::path::PathBuf],
    truth: &[serde_json::Value],
    d: &Path,
) -> String {
    let probes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("stacktap_probe_") && !l.starts_with("stacktap_probe_last_seen"))
        .collect();
    let cfg = stacktap::config::Config::from_toml(CONFIG).unwrap();
    let one = replay_with(pcaps, cfg);
    let one_bad = check_all_against_truth(&one, truth, 0.001);
    let logs: Vec<String> = ["a", "b", "c", "api"]
        .iter()
        .map(|n| format!("probe-{n}.log"))
        .chain(["collector.log".to_string()])
        .map(|f| format!("--- {f}\n{}", log_tail(&d.join(&f), 10)))
        .collect();
    format!(
        "the collector's probes:\n{}\nthe recorded captures replayed by one process: {} mismatches\n{}\n{}",
        probes.join("\n"),
        one_bad.len(),
        one_bad.join("\n"),
        logs.join("\n")
    )
}
