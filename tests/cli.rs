//! The command line on bad input: a clear one-line error naming the file or flag, the
//! contract's exit codes (2 usage, 1 runtime), never a panic.

mod common;
use common::{repo, stacktap};

#[test]
fn usage_errors_exit_2() {
    assert_eq!(stacktap(&[]).0, 2);
    assert_eq!(stacktap(&["replay"]).0, 2);
    assert_eq!(stacktap(&["replay", "--no-such-flag", "x.pcap"]).0, 2);
}

#[test]
fn missing_and_non_pcap_files_exit_1_naming_the_file() {
    let (code, _, err) = stacktap(&["replay", "/nonexistent/x.pcap"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/x.pcap") && err.lines().count() == 1,
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("notes.txt");
    std::fs::write(&junk, "this is not a capture\n").unwrap();
    let (code, _, err) = stacktap(&["replay", junk.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("notes.txt") && err.contains("not a pcap"),
        "{err}"
    );
    let empty = dir.path().join("empty.pcap");
    std::fs::write(&empty, "").unwrap();
    let (code, _, err) = stacktap(&["replay", empty.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("empty.pcap"), "{err}");
}

#[test]
fn truncated_capture_is_replayed_up_to_the_cut_with_a_warning() {
    let bytes = std::fs::read(repo().join("sampledata/healthy.pcap")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [30, 100, bytes.len() / 3, bytes.len() - 7] {
        let f = dir.path().join(format!("cut{cut}.pcap"));
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let (code, out, err) = stacktap(&["replay", "--json", f.to_str().unwrap()]);
        assert_eq!(code, 0, "cut at {cut}: {err}");
        let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(summary["packets"].as_u64().is_some());
        if cut > 24 {
            assert!(err.contains("truncated"), "cut at {cut}: {err}");
        }
    }
}

#[test]
fn bad_config_and_listen_address_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[rpc]\nlate_reply_windw_s = 3\n").unwrap();
    let pcap = repo().join("sampledata/healthy.pcap");
    let (code, _, err) = stacktap(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        pcap.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml"), "{err}");
    let (code, _, err) = stacktap(&[
        "replay",
        "--listen",
        "not-an-address",
        pcap.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn replay_writes_events_and_metrics_files() {
    let dir = tempfile::tempdir().unwrap();
    let ev = dir.path().join("e.jsonl");
    let m = dir.path().join("m.prom");
    let pcap = repo().join("sampledata/remote_error.pcap");
    let (code, out, _) = stacktap(&[
        "replay",
        pcap.to_str().unwrap(),
        "--events-out",
        ev.to_str().unwrap(),
        "--metrics-out",
        m.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("queues, worst first"), "{out}");
    assert!(out.contains("PortBindingFailed"), "{out}");
    assert!(std::fs::read_to_string(&ev).unwrap().lines().count() > 50);
    assert!(
        std::fs::read_to_string(&m)
            .unwrap()
            .contains("stacktap_rpc_queue_reply_wait_seconds_bucket")
    );
}

/// `--speed X` paces by packet time: a capture spanning D seconds takes at least D/X.
/// (A lower bound only: a loaded machine can make it slower, never faster.)
#[test]
fn speed_paces_the_replay_by_packet_time() {
    let pcap = repo().join("sampledata/dead_consumer.pcap");
    let (first, last) = common::capture_bounds(std::slice::from_ref(&pcap));
    let speed = 20.0;
    let t = std::time::Instant::now();
    let (code, _, err) = stacktap(&["replay", "--speed", "20", pcap.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let want = (last - first) / speed;
    assert!(
        t.elapsed().as_secs_f64() >= want * 0.95,
        "{:?} < {want}",
        t.elapsed()
    );
}

/// Every metric family DESIGN.md names is declared (HELP/TYPE) in any replay's
/// `--metrics-out`, even one with no OpenStack traffic at all: a dashboard or an
/// `absent()` alert can tell "none" from "not exported". promtool accepts the file.
#[test]
fn every_design_metric_family_is_declared_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.prom");
    let pcap = common::foreign_dir().join("arkime/http-simple-get.pcap");
    let (code, _, err) = stacktap(&[
        "replay",
        pcap.to_str().unwrap(),
        "--metrics-out",
        m.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&m).unwrap();
    for family in [
        "stacktap_rpc_messages",
        "stacktap_rpc_reply_wait_seconds",
        "stacktap_rpc_queue_reply_wait_seconds",
        "stacktap_rpc_queue_wait_seconds",
        "stacktap_rpc_server_seconds",
        "stacktap_rpc_reply_transit_seconds",
        "stacktap_rpc_in_flight",
        "stacktap_rpc_replies",
        "stacktap_rpc_remote_errors",
        "stacktap_rpc_timeouts",
        "stacktap_rpc_late_replies",
        "stacktap_amqp_returns",
        "stacktap_amqp_channel_closes",
        "stacktap_notifications",
        "stacktap_http_requests",
        "stacktap_http_request_duration_seconds",
        "stacktap_graph_edge_requests",
        "traces_service_graph_request",
        "traces_service_graph_request_failed",
        "traces_service_graph_request_server_seconds",
        "stacktap_error_chains",
        "stacktap_masked_failures",
        "stacktap_packets",
        "stacktap_bytes",
        "stacktap_capture_drops",
        "stacktap_tcp_gap_bytes",
        "stacktap_parse_anomalies",
        "stacktap_evictions",
        "stacktap_series_folded",
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {family} ")),
            "{family} is not declared"
        );
    }
    // the exposition is OpenMetrics (`# EOF`, counters named without `_total`):
    // prometheus_client's strict OpenMetrics parser must accept it
    let out = std::process::Command::new(common::python())
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nprint(len(list(p(open(sys.argv[1]).read()))))",
        ])
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn capture_without_the_capabilities_says_which_it_needs() {
    // as nobody, with no capability: the message names the two it needs
    let bin = common::BinaryForAnyUser::new("nocaps");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin.0)
        .args(["capture", "-i", "lo", "--duration", "1"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("CAP_NET_RAW") && last.contains("CAP_NET_ADMIN"),
        "{err}"
    );
}

#[test]
fn man_pages_and_completions_come_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = stacktap(&["manpages", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for cmd in ["replay", "capture", "collect", "rca", "demo"] {
        let page = dir.path().join(format!("stacktap-{cmd}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_default();
        assert!(text.contains(".TH"), "{}: not a man page", page.display());
    }
    let capture = std::fs::read_to_string(dir.path().join("stacktap-capture.1")).unwrap();
    assert!(capture.contains("interface") && capture.contains("allow\\-remote"));
    let (code, script, _) = stacktap(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(script.contains("capture") && script.contains("--request-id"));
    // the script is valid bash
    let file = dir.path().join("stacktap.bash");
    std::fs::write(&file, script).unwrap();
    let ok = std::process::Command::new("bash")
        .arg("-n")
        .arg(&file)
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn stage_cost_splits_a_replay_into_stages_that_add_up() {
    // the script names stage entries by symbol: one inlined away or one calling another
    // it does not subtract fails here, not silently in a README table
    let out = std::process::Command::new(repo().join("scripts/stage-cost"))
        .arg(repo().join("sampledata/healthy.pcap"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_stacktap"))
        .output()
        .expect("run scripts/stage-cost (needs python3 and valgrind)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let per_packet = |line: &str| -> f64 {
        let n = line.split("per packet").next().unwrap_or_default();
        let n = n.split_whitespace().last().unwrap_or_default();
        n.replace(',', "").parse().unwrap_or(f64::NAN)
    };
    let mut lines = text.lines();
    let total = lines
        .next()
        .map(|l| per_packet(l.split(", ").last().unwrap_or_default()));
    let stages: Vec<f64> = lines.map(per_packet).collect();
    assert_eq!(stages.len(), 13, "{text}");
    let sum: f64 = stages.iter().sum();
    let total = total.unwrap_or(f64::NAN);
    assert!(
        stages.iter().all(|v| *v >= 0.0) && (sum - total).abs() <= 13.0,
        "stages {sum} against {total}:\n{text}"
    );
}

#[test]
fn ab_reports_each_command_in_turn_and_stops_at_a_failure() {
    let ab = |args: &[&str]| {
        std::process::Command::new(repo().join("scripts/ab"))
            .args(args)
            .output()
            .expect("run scripts/ab (needs python3)")
    };
    let out = ab(&["3", "fast=true", "slow=sleep 0.05"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let wall = |label: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(label)).expect(label);
        assert!(line.ends_with("(median of 3)"), "{line}");
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    // a sleep of 50 ms cannot take less than that; `true` takes far less
    assert!(
        wall("slow") >= 50.0 && wall("fast") < wall("slow"),
        "{text}"
    );
    let failed = ab(&["2", "ok=true", "broken=sh -c 'echo cause >&2; exit 3'"]);
    let said = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{said}");
    assert!(said.contains("broken failed (exit 3): cause"), "{said}");
    assert_eq!(ab(&["2", "no label"]).status.code(), Some(2));
}
