//! A fleet: probes shipping observations to a collector over OTLP/gRPC.
//!
//! * the wire loses nothing: every observation of every sample survives encoding, and an
//!   analyser fed through it reports what the single process reports;
//! * the cluster scenario's per-node captures, replayed by four probes into one collector
//!   with their clocks shifted by a few milliseconds, match the processes' truth: every
//!   call paired, casts and fanouts, timeouts, REST, chains; the split within 1 ms of the
//!   unshifted capture, never negative;
//! * one capture seen by two probes (a mirrored port) counts once;
//! * a probe killed mid-run is reported silent, the others go on, the collector exits 0.

mod common;
use common::*;
use prost::Message;
use serde_json::Value;
use stacktap::analyser::Analyser;
use stacktap::config::Config;
use stacktap::contract::Observation;
use stacktap::fleet::wire;
use stacktap::probe::Probe;
use stacktap::source::Packet;
use stacktap::source::file::MergedFiles;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn cluster_config() -> Config {
    Config::from_toml(CLUSTER_TOML).unwrap()
}

const CLUSTER_TOML: &str = "[amqp]\nports = [5672, 5682, 5683, 5684]\n";

/// Every observation a probe makes of `files`, in order, with the probe's clock after
/// each packet (what a local analyser advances to).
fn observe(files: &[PathBuf], cfg: &Config) -> Vec<(Vec<Observation>, stacktap::time::Ts)> {
    let mut probe = Probe::new(cfg.clone());
    let mut m = MergedFiles::open(files).unwrap();
    let mut pkt = Packet::default();
    let mut out = Vec::new();
    while m.next_into(&mut pkt).unwrap() {
        let mut obs = Vec::new();
        probe.packet(&pkt.as_ref(), &mut obs);
        out.push((obs, probe.clock()));
    }
    let mut obs = Vec::new();
    probe.finish(&mut obs);
    out.push((obs, probe.clock()));
    out
}

/// Events (as JSON lines) an analyser makes of `batches`.
fn analyse(batches: Vec<(Vec<Observation>, stacktap::time::Ts)>, cfg: &Config) -> Vec<String> {
    let mut a = Analyser::new(cfg.clone());
    let mut events = Vec::new();
    let mut sink = |s: stacktap::correlate::Signal| {
        if let stacktap::correlate::Signal::Event(e) = s {
            events.push(serde_json::to_string(&e).unwrap());
        }
    };
    for (obs, clock) in batches {
        a.advance(clock);
        for mut o in obs {
            a.observe(&mut o);
        }
        a.flush(&mut sink);
    }
    a.finish(&mut sink);
    events
}

/// Through the wire: OTLP export requests, as bytes, and back.
fn through_the_wire(batch: &[Observation]) -> Vec<Observation> {
    let who = wire::Sender {
        probe: "p".into(),
        host: None,
    };
    let bytes = wire::encode_batch(&who, batch).encode_to_vec();
    let req = opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest::decode(
        &bytes[..],
    )
    .unwrap();
    let rl = &req.resource_logs[0];
    assert_eq!(wire::sender_of(rl.resource.as_ref()).unwrap().probe, "p");
    rl.scope_logs[0]
        .log_records
        .iter()
        .map(|r| wire::decode(r).unwrap())
        .collect()
}

#[test]
fn the_wire_loses_nothing_and_an_analyser_behind_it_reports_the_same() {
    let dir = repo().join("sampledata");
    let mut samples: Vec<Vec<PathBuf>> = [
        "healthy",
        "remote_error",
        "slow_server",
        "rest",
        "failures",
        "modern",
    ]
    .iter()
    .map(|s| vec![dir.join(format!("{s}.pcap"))])
    .collect();
    samples.push(
        ["a", "b", "c", "api"]
            .map(|n| dir.join(format!("cluster/cluster-{n}.pcap")))
            .into(),
    );
    for files in samples {
        let cfg = cluster_config();
        let local = observe(&files, &cfg);
        let mut n = 0;
        let wired: Vec<_> = local
            .iter()
            .map(|(obs, clock)| {
                let back = through_the_wire(obs);
                assert_eq!(&back, obs, "{files:?}");
                n += back.len();
                (back, *clock)
            })
            .collect();
        assert!(n > 100, "{files:?}: {n} observations");
        let a = analyse(local, &cfg);
        let b = analyse(wired, &cfg);
        assert_eq!(a, b, "{files:?}");
        // and the same as the single process (the pipeline) reports
        let r = replay_with(&files, cfg);
        let mut single: Vec<&str> = r.events_text.lines().collect();
        let mut via: Vec<&str> = a.iter().map(String::as_str).collect();
        single.sort();
        via.sort();
        assert_eq!(single, via, "{files:?}");
    }
}

/// A `stacktap` child killed when dropped.
fn spawn(args: &[&str], log: &Path) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Killed(child)
}

/// SIGTERM, then the exit code (killed after 60 s).
fn terminate(mut c: Killed) -> i32 {
    unsafe {
        libc::kill(c.0.id() as i32, libc::SIGTERM);
    }
    let t = Instant::now();
    loop {
        if let Some(s) = c.0.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the collector did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait(c: &mut Child, what: &str) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{what} did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Collected {
    events: Vec<Value>,
    metrics: String,
    log: String,
}

/// A collector on a free port; `probes` run against it (name, capture, extra args)
/// until they exit (or `kill_after` kills the first one); then the collector is stopped.
fn collect(
    dir: &Path,
    config: &str,
    probes: &[(&str, PathBuf, &[&str])],
    kill_after: Option<Duration>,
) -> Collected {
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, config).unwrap();
    let port = free_port();
    let ingest = format!("127.0.0.1:{port}");
    let events = dir.join("events.jsonl");
    let metrics = dir.join("metrics.prom");
    let log = dir.join("collector.log");
    let collector = spawn(
        &[
            "collect",
            "--ingest",
            &ingest,
            "--config",
            cfg.to_str().unwrap(),
            "--events-out",
            events.to_str().unwrap(),
            "--metrics-out",
            metrics.to_str().unwrap(),
        ],
        &log,
    );
    // wait until it listens
    let t = Instant::now();
    while std::net::TcpStream::connect(&ingest).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "collector not listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://{ingest}");
    let mut children: Vec<Killed> = probes
        .iter()
        .map(|(name, file, extra)| {
            let mut args = vec![
                "replay",
                file.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--collector",
                &url,
                "--probe-name",
                name,
            ];
            args.extend_from_slice(extra);
            spawn(&args, &dir.join(format!("probe-{name}.log")))
        })
        .collect();
    if let Some(after) = kill_after {
        std::thread::sleep(after);
        let first = children.remove(0);
        drop(first); // SIGKILL: it sends nothing more, not even its end
    }
    for c in &mut children {
        assert_eq!(wait(&mut c.0, "a probe"), 0, "a probe failed");
    }
    // the collector releases what it holds once every probe ended or fell silent
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(terminate(collector), 0, "the collector's exit code");
    Collected {
        events: std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        metrics: std::fs::read_to_string(&metrics).unwrap(),
        log: std::fs::read_to_string(&log).unwrap(),
    }
}

/// `editcap -t SECONDS`: the capture as a host whose clock is off by that much saw it.
fn shifted(dir: &Path, src: &Path, secs: f64) -> PathBuf {
    let out = dir.join(format!(
        "shifted-{}",
        src.file_name().unwrap().to_string_lossy()
    ));
    let ok = Command::new("editcap")
        .args(["-t", &secs.to_string()])
        .arg(src)
        .arg(&out)
        .status()
        .expect("editcap (from tshark/wireshark-common) must be installed: .ci/run installs it")
        .success();
    assert!(ok, "editcap -t failed");
    out
}

fn split(e: &Value) -> [Option<f64>; 4] {
    let d = |a: &str, b: &str| Some(e[b].as_f64()? - e[a].as_f64()?);
    [
        d("t_publish", "t_deliver"),
        d("t_deliver", "t_reply_publish"),
        d("t_reply_publish", "t_reply_deliver"),
        d("t_publish", "t_reply_deliver"),
    ]
}

#[test]
fn four_probes_with_skewed_clocks_into_one_collector_match_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let sample = |n: &str| repo().join(format!("sampledata/cluster/cluster-{n}.pcap"));
    // NTP error of a few milliseconds on each host
    let skews = [("a", 0.0), ("b", 0.004), ("c", -0.003), ("api", 0.006)];
    let probes: Vec<(&str, PathBuf, &[&str])> = skews
        .iter()
        .map(|(n, s)| (*n, shifted(dir.path(), &sample(n), *s), &[][..]))
        .collect();
    // times in probe a's clock (the one left true), so the truth's times apply
    let config = format!(
        "{CLUSTER_TOML}[fleet]\nreference = \"a\"\nexpect = [\"a\", \"b\", \"c\", \"api\"]\n"
    );
    let got = collect(dir.path(), &config, &probes, None);
    let truth = read_truth(&repo().join("sampledata/cluster/cluster.truth.jsonl"));
    let files: Vec<PathBuf> = ["a", "b", "c", "api"].map(sample).into();
    let (first_ts, last_ts) = capture_bounds(&files);
    let r = Replayed {
        events_text: String::new(),
        events: got.events.clone(),
        metrics: got.metrics.clone(),
        summary: replay_with(&files, cluster_config()).summary,
        first_ts,
        last_ts,
        health: Default::default(),
    };
    // in probe a's clock, corrected to within a millisecond
    let bad = check_all_against_truth(&r, &truth, 0.001);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(
        got.metrics.contains("stacktap_partial_view 0"),
        "the collector sees the whole cluster"
    );
    // the split as one vantage point without skew sees it: within 1 ms, never negative
    let single = replay_with(&files, cluster_config());
    let unskewed: std::collections::HashMap<&str, &Value> = single
        .events
        .iter()
        .filter(|e| e["type"] == "call")
        .map(|e| (e["msg_id"].as_str().unwrap(), e))
        .collect();
    let mut compared = 0;
    for e in got.events.iter().filter(|e| e["type"] == "call") {
        let want = unskewed[e["msg_id"].as_str().unwrap()];
        for (got, want) in split(e).into_iter().zip(split(want)) {
            let (Some(g), Some(w)) = (got, want) else {
                continue;
            };
            assert!(g >= 0.0, "negative split {g} in {e}");
            assert!((g - w).abs() <= 0.001, "split {g} vs {w} unskewed, in {e}");
            compared += 1;
        }
    }
    assert!(compared > 50, "{compared} splits compared");
    // each probe's offset against the others, as applied
    let offset = |n: &str| {
        let line = got
            .metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "stacktap_probe_clock_offset_seconds{{probe=\"{n}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no offset for {n}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    for (n, s) in &skews[1..3] {
        let est = offset(n) - offset("a");
        assert!((est - s).abs() < 0.001, "{n}: offset {est} for {s}");
    }
    for n in ["a", "b", "c", "api"] {
        assert!(
            got.metrics
                .contains(&format!("stacktap_probe_ended{{probe=\"{n}\"}} 1")),
            "{n} ended"
        );
        assert!(got.metrics.contains(&format!(
            "stacktap_probe_observations_total{{probe=\"{n}\"}}"
        )));
    }
}

#[test]
fn one_capture_seen_by_two_probes_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = repo().join("sampledata/remote_error.pcap");
    let probes: Vec<(&str, PathBuf, &[&str])> =
        vec![("left", f.clone(), &[][..]), ("right", f.clone(), &[][..])];
    let got = collect(dir.path(), "", &probes, None);
    let single = replay(std::slice::from_ref(&f));
    let key = |e: &Value| format!("{} {} {}", e["kind"], e["msg_id"], e["unique_id"]);
    let mut a: Vec<String> = got
        .events
        .iter()
        .filter(|e| e["kind"] == "rpc")
        .map(key)
        .collect();
    let mut b: Vec<String> = single
        .events
        .iter()
        .filter(|e| e["kind"] == "rpc")
        .map(key)
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let deliveries = |ev: &[Value]| {
        ev.iter()
            .map(|e| e["deliveries"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(deliveries(&got.events), deliveries(&single.events));
    assert!(
        got.metrics
            .contains("stacktap_probe_duplicates_total{probe=\"right\"}")
            || got
                .metrics
                .contains("stacktap_probe_duplicates_total{probe=\"left\"}")
    );
}

#[test]
fn a_probe_killed_mid_run_is_reported_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let sample = |n: &str| repo().join(format!("sampledata/cluster/cluster-{n}.pcap"));
    let paced: &[&str] = &["--speed", "2"];
    let probes: Vec<(&str, PathBuf, &[&str])> = ["b", "a", "c", "api"]
        .iter()
        .map(|n| (*n, sample(n), paced))
        .collect();
    let config = format!("{CLUSTER_TOML}[fleet]\nsilent_after_s = 1.5\n");
    let got = collect(dir.path(), &config, &probes, Some(Duration::from_secs(3)));
    assert!(got.log.contains("probe b silent"), "{}", got.log);
    assert!(got.metrics.contains("stacktap_probe_up{probe=\"b\"} 0"));
    assert!(got.metrics.contains("stacktap_probe_ended{probe=\"b\"} 0"));
    for n in ["a", "c", "api"] {
        assert!(
            got.metrics
                .contains(&format!("stacktap_probe_ended{{probe=\"{n}\"}} 1"))
        );
    }
    assert!(!got.log.contains("panicked"), "{}", got.log);
    assert!(got.events.iter().any(|e| e["kind"] == "rpc"));
}
