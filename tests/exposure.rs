//! The listener off loopback: refused unless told, then only behind credentials and TLS,
//! checked with real clients (curl, certificates made by openssl), and the certificate and
//! credentials swapped by SIGHUP without a restart.

mod common;

use common::{Killed, free_port, repo, stacktap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "t0ken-for-the-exposure-test-0123";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate for 127.0.0.1 it signs: (ca.pem, cert.pem, key.pem).
fn authority(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(p("ca-key.pem"))
        .arg("-out")
        .arg(p("ca.pem"))
        .args(["-subj", &format!("/CN=stacktap test CA {name}")]));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("key.pem"))
        .arg("-out")
        .arg(p("csr.pem")));
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("csr.pem"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca-key.pem"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("cert.pem")));
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

fn config(cert: &Path, key: &Path, token: &Path, metrics_open: bool) -> String {
    let hash = bcrypt::hash("correct horse battery", 4).unwrap();
    format!(
        "[listen]\nallow_remote = true\ntls_cert = {:?}\ntls_key = {:?}\ntoken_file = {:?}\n\
         metrics_open = {metrics_open}\n[listen.basic_auth_users]\nops = {hash:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        token.display().to_string()
    )
}

/// curl's exit code and the HTTP status it got (0 when none).
fn curl(url: &str, ca: &Path, extra: &[&str]) -> (i32, u16) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (out.status.code().unwrap_or(-1), code)
}

#[test]
fn off_loopback_it_asks_for_a_decision_credentials_and_tls() {
    let healthy = repo().join("sampledata/healthy.pcap");
    let healthy = healthy.to_str().unwrap();
    let everywhere = format!("0.0.0.0:{}", free_port());
    let (code, _, err) = stacktap(&["replay", healthy, "--listen", &everywhere]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--allow-remote"), "{err}");
    let (code, _, err) = stacktap(&["replay", healthy, "--listen", &everywhere, "--allow-remote"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("token_file") && err.contains("basic_auth_users"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let cfg = dir.path().join("plain.toml");
    std::fs::write(
        &cfg,
        format!("[listen]\ntoken_file = {:?}\n", token.display().to_string()),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (code, _, err) = stacktap(&[
        "replay",
        healthy,
        "--listen",
        &everywhere,
        "--allow-remote",
        "--config",
        cfg,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tls_cert"), "{err}");
}

#[test]
fn off_loopback_it_serves_tls_to_who_has_credentials_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = authority(dir.path(), "first");
    let (other_ca, other_cert, other_key) = authority(dir.path(), "second");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let cfg = dir.path().join("stacktap.toml");
    std::fs::write(&cfg, config(&cert, &key, &token, false)).unwrap();

    let port = free_port();
    let log = dir.path().join("stderr");
    let served = Killed(
        Command::new(env!("CARGO_BIN_EXE_stacktap"))
            .arg("replay")
            .arg(repo().join("sampledata/healthy.pcap"))
            .args([
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--allow-remote",
                "--config",
            ])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    let t = Instant::now();
    while curl(&url("/healthz"), &ca, &[]).1 != 200 {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(t.elapsed() < Duration::from_secs(30), "not served: {said}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let wrong_bearer = "Authorization: Bearer t0ken-for-the-exposure-test-0124";
    for path in ["/", "/api/summary", "/api/graph", "/api/chains", "/metrics"] {
        assert_eq!(
            curl(&url(path), &ca, &[]).1,
            401,
            "{path} without credentials"
        );
        assert_eq!(
            curl(&url(path), &ca, &["-H", wrong_bearer]).1,
            401,
            "{path}"
        );
        assert_eq!(
            curl(&url(path), &ca, &["-H", &bearer]).1,
            200,
            "{path} with the token"
        );
    }
    let user = ["-u", "ops:correct horse battery"];
    assert_eq!(curl(&url("/api/summary"), &ca, &user).1, 200);
    assert_eq!(curl(&url("/api/summary"), &ca, &["-u", "ops:wrong"]).1, 401);
    assert_eq!(
        curl(
            &url("/api/summary"),
            &ca,
            &["-u", "root:correct horse battery"]
        )
        .1,
        401
    );
    // a certificate the client does not trust is refused (curl: 60, peer certificate)
    assert_eq!(curl(&url("/healthz"), &other_ca, &[]).0, 60);
    // plaintext gets no answer
    let plain = format!("http://127.0.0.1:{port}/api/summary");
    assert_ne!(curl(&plain, &ca, &["-H", &bearer]).1, 200);

    // SIGHUP: a new certificate, /metrics opened; the listener keeps its socket
    std::fs::write(&cfg, config(&other_cert, &other_key, &token, true)).unwrap();
    let pid = served.0.id().to_string();
    run(Command::new("kill").args(["-HUP", &pid]));
    let t = Instant::now();
    while curl(&url("/metrics"), &other_ca, &[]).1 != 200 {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not reloaded: {said}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(curl(&url("/api/summary"), &other_ca, &[]).1, 401);
    assert_eq!(
        curl(&url("/healthz"), &ca, &[]).0,
        60,
        "the old certificate is gone"
    );

    // a broken reload keeps what was there
    std::fs::write(
        &cfg,
        "[listen]\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/x\"\n",
    )
    .unwrap();
    run(Command::new("kill").args(["-HUP", &pid]));
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("kept the previous")
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no word on the failed reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        curl(&url("/api/summary"), &other_ca, &["-H", &bearer]).1,
        200
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains(TOKEN), "the token reached the log: {said}");
}
