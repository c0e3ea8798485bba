//! What an installation relies on: the systemd units are valid (`systemd-analyze verify`)
//! and a capture works as an unprivileged user holding only the two capabilities the
//! probe's unit grants (CAP_NET_RAW, CAP_NET_ADMIN). Needs root (to hand out the
//! capabilities) and systemd's tools; .ci/run runs as root on Debian.

mod common;
use common::{free_port, repo};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (file, instance) in [
        ("stacktap-capture@.service", "stacktap-capture@lo.service"),
        ("stacktap-collect.service", "stacktap-collect.service"),
    ] {
        let text = std::fs::read_to_string(repo().join("packaging/systemd").join(file)).unwrap();
        // verify checks that ExecStart's binary exists: point it at the one just built
        let text = text.replace("/usr/bin/stacktap", env!("CARGO_BIN_EXE_stacktap"));
        std::fs::write(dir.path().join(file), &text).unwrap();
        std::fs::write(dir.path().join(instance), &text).unwrap();
        units.push(dir.path().join(instance));
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// A one-response HTTP server on loopback, for traffic to capture.
fn http_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

#[test]
fn a_capture_runs_as_nobody_with_only_the_two_capabilities() {
    let bin = common::BinaryForAnyUser::new("caps");
    let server = http_server();
    let listen = free_port();
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_raw,+net_admin",
            "--ambient-caps=-all,+net_raw,+net_admin",
            "--bounding-set=-all,+net_raw,+net_admin",
        ])
        .arg(&bin.0)
        .args(["capture", "-i", "lo", "--duration", "4", "--json"])
        .args(["--filter", &format!("tcp port {server}")])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    // the listener answers once the capture is open
    let t = Instant::now();
    while common::http_get(listen, "/healthz").is_none() && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server)).unwrap();
        s.write_all(b"GET /v2.1/servers HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.0\r\n\r\n")
            .unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json summary");
    assert!(summary["packets"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["http_requests"], 5, "{summary}");
}
