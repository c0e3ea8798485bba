//! Hostile input and long runs: crafted captures (tests/hostile/craft.py) and clients
//! that once cost memory, data or the listener. Each test failed before its fix.

mod common;

use common::{Killed, free_port, http_get, repo};
use serde_json::Value;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The crafted captures, made once per test binary.
fn crafted() -> &'static (PathBuf, Value) {
    static DIR: std::sync::OnceLock<(PathBuf, Value)> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("stacktap-hostile-{}", std::process::id()));
        let out = Command::new("python3")
            .arg(repo().join("tests/hostile/craft.py"))
            .arg(&dir)
            .output()
            .expect("python3 runs tests/hostile/craft.py");
        assert!(
            out.status.success(),
            "craft.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secrets = serde_json::from_slice(&out.stdout).unwrap();
        (dir, secrets)
    })
}

fn input(name: &str) -> PathBuf {
    crafted().0.join(name)
}

struct Ran {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
    /// Peak resident memory, KiB.
    max_rss_kb: i64,
}

/// Runs stacktap with `args`, its peak RSS measured by the kernel (wait4).
fn stacktap(args: &[&str]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    // reaped by wait4 below, for its rusage: std's wait would not give it
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 reaps our own child and fills both
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    Ran {
        code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        max_rss_kb: ru.ru_maxrss,
    }
}

fn summary(file: &Path) -> Value {
    let r = stacktap(&["replay", file.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_slice(&r.stdout).unwrap()
}

#[test]
fn bodies_announced_and_never_sent_cost_no_memory() {
    let f = input("amqp_bodies.pcap");
    let r = stacktap(&["replay", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.max_rss_kb < 300 * 1024,
        "6000 channels announcing 64 MiB bodies: {} MiB of RSS",
        r.max_rss_kb / 1024
    );
    // under a small budget what does not fit is dropped, and counted
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("small.toml");
    std::fs::write(&cfg, "[amqp]\nmax_held_bytes_per_connection = 4096\n").unwrap();
    let metrics = dir.path().join("m.prom");
    let r = stacktap(&[
        "replay",
        f.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--metrics-out",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = std::fs::read_to_string(metrics).unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("stacktap_evictions_total{table=\"amqp_body_bytes\"}")),
        "{m}"
    );
}

#[test]
fn one_far_future_stamp_changes_no_verdict() {
    let clean = summary(&repo().join("sampledata/failures.pcap"));
    let jumped = summary(&input("far_future.pcap"));
    for key in [
        "calls",
        "casts",
        "fanouts",
        "outcomes",
        "rca",
        "http_requests",
    ] {
        assert_eq!(clean[key], jumped[key], "{key}");
    }
    assert_eq!(
        jumped["anomalies"]["capture/clock_jump"], 1,
        "{}",
        jumped["anomalies"]
    );
}

#[test]
fn a_corrupt_record_mid_file_costs_that_record_and_nothing_else() {
    let clean = summary(&repo().join("sampledata/failures.pcap"));
    for name in ["corrupt_mid.pcap", "corrupt_mid.pcapng"] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("m.prom");
        let f = input(name);
        let r = stacktap(&[
            "replay",
            f.to_str().unwrap(),
            "--json",
            "--metrics-out",
            metrics.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert!(
            r.stderr.contains("damaged at byte") && r.stderr.contains(name),
            "{name}: the warning names the file and the byte: {}",
            r.stderr
        );
        let s: Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(s["rca"], clean["rca"], "{name}: the same root causes");
        assert_eq!(s["anomalies"]["capture/damaged_record"], 1, "{name}");
        assert!(
            std::fs::read_to_string(metrics)
                .unwrap()
                .contains("stacktap_packets_total")
        );
    }
}

/// Everything stacktap writes about capture `f`: stdout and stderr of a replay that also
/// writes events and metrics, then of each `more` command (the file after its
/// subcommand), then the events and the metrics files, each named.
fn every_output(f: &Path, more: &[&[&str]]) -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let (events, metrics) = (dir.path().join("e.jsonl"), dir.path().join("m.prom"));
    let file = f.to_str().unwrap();
    let mut runs = vec![vec![
        "replay",
        file,
        "--events-out",
        events.to_str().unwrap(),
        "--metrics-out",
        metrics.to_str().unwrap(),
    ]];
    runs.extend(more.iter().map(|m| [&[m[0], file], &m[1..]].concat()));
    let mut outputs = Vec::new();
    for args in runs {
        let r = stacktap(&args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        outputs.push((format!("{args:?} stdout"), r.stdout));
        outputs.push((format!("{args:?} stderr"), r.stderr.into_bytes()));
    }
    outputs.push(("events".into(), std::fs::read(&events).unwrap()));
    outputs.push(("metrics".into(), std::fs::read(&metrics).unwrap()));
    outputs
}

fn named<'a>(outputs: &'a [(String, Vec<u8>)], name: &str) -> std::borrow::Cow<'a, str> {
    let (_, bytes) = outputs.iter().find(|(n, _)| n == name).unwrap();
    String::from_utf8_lossy(bytes)
}

#[test]
fn passwords_an_api_echoes_never_leave_the_process() {
    let secrets = &crafted().1;
    let (password, token) = (
        secrets["password"].as_str().unwrap(),
        secrets["token"].as_str().unwrap(),
    );
    let more: &[&[&str]] = &[&["replay", "--json"], &["rca"], &["rca", "--json"]];
    let outputs = every_output(&input("secrets_echo.pcap"), more);
    let events_text = named(&outputs, "events");
    assert!(
        events_text.contains("redacted"),
        "the faults are still reported: {events_text}"
    );
    for (what, bytes) in &outputs {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(password), "the password reached {what}");
        assert!(!text.contains(token), "the token reached {what}");
    }
}

#[test]
fn escape_sequences_from_the_wire_are_shown_not_obeyed() {
    let outputs = every_output(&input("escapes.pcap"), &[&["rca"]]);
    let text = String::from_utf8_lossy(&outputs[0].1).into_owned();
    assert!(
        text.contains("\\x1b[2J"),
        "the escape is shown as text: {text}"
    );
    for (what, bytes) in outputs {
        assert!(!bytes.contains(&0x1b), "an ESC byte reached {what}");
        assert!(!bytes.contains(&0x07), "a BEL byte reached {what}");
    }
}

#[test]
fn idle_connections_never_lock_the_listener_out() {
    // the descriptor limit a default systemd service gets, and more idle clients than it
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacktap"));
    cmd.args([
        "replay",
        repo().join("sampledata/healthy.pcap").to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Killed(cmd.spawn().unwrap());
    let mut err = child.0.stderr.take().unwrap();
    let t = Instant::now();
    while http_get(port, "/healthz").is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the listener never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // room for our own 1100 descriptors
    // SAFETY: plain syscalls on values we own
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 4096,
            rlim_max: 4096,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let idle: Vec<std::net::TcpStream> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(idle.len() > 1000, "{} connections", idle.len());
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let answer = http_get(port, "/healthz");
    assert_eq!(
        answer.map(|a| a.0),
        Some(200),
        "/healthz behind 1100 idle connections"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        t.elapsed()
    );
    drop(idle);
    // a page served from another name (DNS rebinding) is turned away; text is never sniffed
    let raw = |req: &str| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r
    };
    let evil = raw(
        "GET /api/summary HTTP/1.1\r\nHost: attacker.example:9465\r\nConnection: close\r\n\r\n",
    );
    assert!(evil.starts_with("HTTP/1.1 421"), "{evil}");
    let ok = raw(&format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
    ));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase()
            .contains("x-content-type-options: nosniff"),
        "{ok}"
    );
    for bad in ["-1", "nan", "-inf", "inf", "x"] {
        let r = http_get(port, &format!("/api/chains?since={bad}")).unwrap();
        assert_eq!(r.0, 400, "since={bad}");
    }
    assert_eq!(http_get(port, "/api/chains?since=60").unwrap().0, 200);
    drop(child);
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
}

#[test]
fn bad_inputs_get_messages_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let r = stacktap(&["replay", d]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(d) && r.stderr.contains("is a directory"),
        "{}",
        r.stderr
    );
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[requests]\ngraph_window_s = inf\n").unwrap();
    let healthy = repo().join("sampledata/healthy.pcap");
    let r = stacktap(&[
        "replay",
        healthy.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("requests.graph_window_s") && !r.stderr.contains("panicked"),
        "{}",
        r.stderr
    );
    if Path::new("/dev/full").exists() {
        let r = stacktap(&[
            "replay",
            healthy.to_str().unwrap(),
            "--events-out",
            "/dev/full",
        ]);
        assert_eq!(r.code, 1);
        assert!(r.stderr.contains("/dev/full"), "{}", r.stderr);
    }
}
