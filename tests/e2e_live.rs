//! End to end on the live broker: the generator drives the real oslo.messaging against the
//! real RabbitMQ while `stacktap capture -i lo` taps the traffic live. stacktap's events
//! must match what the processes recorded; timeouts must fire on the live clock; SIGINT
//! must stop it cleanly. Needs root (capture on lo), RabbitMQ and STACKTAP_PYTHON (a
//! Python with oslo.messaging); .ci/run provides all three.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn live_capture_on_the_real_broker_matches_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let events = dir.path().join("live.jsonl");
    let log = dir.path().join("stacktap.log");
    // killed when the test fails, so no capture outlives it
    let mut stacktap = Killed(
        Command::new(env!("CARGO_BIN_EXE_stacktap"))
            .args([
                "capture", "-i", "lo",
                // the default filter: AMQP and the OpenStack API ports
                "--listen",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--events-out")
            .arg(&events)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start stacktap capture"),
    );
    // the listener comes up once the capture handle is open
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/healthz").map(|r| r.1).is_none() {
        assert!(
            Instant::now() < deadline,
            "stacktap capture did not start:\n{}",
            log_tail(&log, 20)
        );
        assert!(
            stacktap.0.try_wait().unwrap().is_none(),
            "stacktap capture exited early:\n{}",
            log_tail(&log, 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    for scenario in ["healthy", "dead_consumer", "rest"] {
        record_scenario(scenario, dir.path());
    }

    // the 2 s timeouts were decided live, on the packet clock, while stacktap still runs
    std::thread::sleep(Duration::from_secs(2));
    let metrics = http_get(port, "/metrics")
        .map(|r| r.1)
        .expect("scrape /metrics");
    assert!(
        metrics.contains(
            "stacktap_rpc_timeouts_total{topic=\"compute\",method=\"get_console_output\"} 4"
        ),
        "live timeouts missing:\n{metrics}"
    );
    assert!(
        metrics.contains("stacktap_packets_total"),
        "probe health missing"
    );
    assert!(!metrics.contains(TOKEN_PREFIX));
    assert!(
        metrics.contains(
            "stacktap_http_requests_total{client=\"nova-scheduler\",service=\"placement\""
        ),
        "live REST metrics missing"
    );

    // SIGINT: a clean stop, with the summary and the events written
    let pid = stacktap.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut stdout = Vec::new();
    std::io::Read::read_to_end(&mut stacktap.0.stdout.take().unwrap(), &mut stdout).unwrap();
    let status = stacktap.0.wait().unwrap();
    assert!(
        status.success(),
        "stacktap capture exit status {status:?}:\n{}",
        log_tail(&log, 20)
    );
    let summary: serde_json::Value = serde_json::from_slice(&stdout).expect("--json summary");
    assert!(summary["calls"].as_u64().unwrap() > 40, "{summary}");

    let text = std::fs::read_to_string(&events).unwrap();
    assert!(!text.contains(TOKEN_PREFIX), "a token reached the events");
    let all: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut union = Vec::new();
    for scenario in ["healthy", "dead_consumer", "rest"] {
        union.extend(read_truth(
            &dir.path().join(format!("{scenario}.truth.jsonl")),
        ));
    }
    for scenario in ["healthy", "dead_consumer", "rest"] {
        let pcap = dir.path().join(format!("{scenario}.pcap"));
        let (first_ts, last_ts) = capture_bounds(&[pcap]);
        let truth = read_truth(&dir.path().join(format!("{scenario}.truth.jsonl")));
        let r = Replayed {
            events: all.clone(),
            events_text: text.clone(),
            metrics: String::new(),
            summary: empty_report(),
            first_ts,
            last_ts,
            health: Default::default(),
        };
        let mut bad = check_against_truth(&r, &truth);
        if scenario == "rest" {
            // only the rest scenario speaks HTTP: every exchange seen live is its
            bad.extend(check_rest_against_truth(&r, &truth));
            let secrets = secrets_in_capture(&pcap_of(dir.path(), scenario));
            assert!(!secrets.is_empty());
            assert_no_secrets("rest (live)", &r, &secrets);
        }
        // both scenarios share the live event stream: "invented" is judged on their union
        bad.retain(|m| !m.contains("is not in the truth"));
        bad.extend(
            check_against_truth(
                &Replayed {
                    first_ts: 0.0,
                    last_ts: f64::MAX,
                    ..r
                },
                &union,
            )
            .into_iter()
            .filter(|m| m.contains("is not in the truth")),
        );
        assert!(bad.is_empty(), "{scenario} (live): {}", bad.join("\n"));
    }
}

fn pcap_of(dir: &Path, scenario: &str) -> std::path::PathBuf {
    dir.join(format!("{scenario}.pcap"))
}

fn empty_report() -> stacktap::sink::summary::Report {
    let rca = stacktap::sink::requests::rank(&[], 0);
    stacktap::sink::summary::Summary::default().report(&Default::default(), rca)
}
