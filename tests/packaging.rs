//! What an installation relies on, checked on the packages `scripts/package` built into
//! target/dist (.ci/run builds them first): the .deb installs into a clean root and keeps
//! local edits to its config across a reinstall, lintian finds nothing, the .rpm holds the
//! same files, the installed units are valid (`systemd-analyze verify`), and the installed
//! binary captures as an unprivileged user holding only the two capabilities the probe's
//! unit grants (CAP_NET_RAW, CAP_NET_ADMIN), and it reads every capture as the tested
//! build does (it is built another way: profile-guided). Needs root (to hand out the capabilities),
//! dpkg, lintian, rpm and systemd's tools; .ci/run runs as root on Debian.

mod common;
use common::{free_port, repo};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The one package of `ext` in target/dist.
fn package(ext: &str) -> PathBuf {
    let dist = repo().join("target/dist");
    let found: Vec<PathBuf> = std::fs::read_dir(&dist)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one .{ext} in {}: run `scripts/package` first (.ci/run does)",
        dist.display()
    );
    found.into_iter().next().unwrap()
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty root with a dpkg database, any user may enter it.
struct Root(tempfile::TempDir);

impl Root {
    fn new() -> Root {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("var/lib/dpkg/status"), "").unwrap();
        Root(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// `dpkg --root` the .deb: its maintainer script runs outside the root, told where
    /// it is (DPKG_ROOT); the root has no libc or systemd package to depend on.
    fn install(&self, deb: &Path) -> String {
        ok(Command::new("dpkg")
            .arg(format!("--root={}", self.path().display()))
            .arg(format!(
                "--log={}",
                self.path().join("var/log/dpkg.log").display()
            ))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--force-confold",
                "-i",
            ])
            .arg(deb))
    }

    fn installed(deb: &Path) -> Root {
        let root = Root::new();
        root.install(deb);
        root
    }
}

const INSTALLED: &[&str] = &[
    "/usr/bin/stacktap",
    "/etc/stacktap/stacktap.toml",
    "/lib/systemd/system/stacktap-capture@.service",
    "/lib/systemd/system/stacktap-collect.service",
    "/usr/lib/sysusers.d/stacktap.conf",
    "/usr/share/stacktap/dashboards/rpc-overview.json",
    "/usr/share/stacktap/dashboards/provisioning/stacktap.yml",
    "/usr/share/stacktap/rules/stacktap.rules.yml",
    "/usr/share/man/man1/stacktap.1.gz",
    "/usr/share/man/man1/stacktap-capture.1.gz",
    "/usr/share/bash-completion/completions/stacktap",
];

#[test]
fn the_deb_installs_into_a_clean_root_and_keeps_local_config() {
    let deb = package("deb");
    let root = Root::installed(&deb);
    let r = root.path();
    let status = ok(Command::new("dpkg")
        .arg(format!("--root={}", r.display()))
        .args(["-s", "stacktap"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/stacktap/stacktap.toml");
    let listed = ok(Command::new("dpkg")
        .arg(format!("--root={}", r.display()))
        .args(["-L", "stacktap"]));
    for f in INSTALLED {
        assert!(
            listed.lines().any(|l| l == *f),
            "{f} not installed: {listed}"
        );
        assert!(r.join(&f[1..]).is_file(), "{f}");
    }
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap_or_default();
    assert!(
        passwd.lines().any(|l| l.starts_with("stacktap:")),
        "no stacktap user: {passwd}"
    );

    // the installed binary runs, with the installed config
    let bin = r.join("usr/bin/stacktap");
    let version = ok(Command::new(&bin).arg("--version"));
    assert!(version.starts_with("stacktap 0."), "{version}");
    let conf = r.join("etc/stacktap/stacktap.toml");
    ok(Command::new(&bin)
        .arg("replay")
        .arg(repo().join("sampledata/healthy.pcap"))
        .arg("--config")
        .arg(&conf));

    // an operator's edit survives reinstalling (a conffile)
    let edited = format!(
        "{}\n# edited here\n",
        std::fs::read_to_string(&conf).unwrap()
    );
    std::fs::write(&conf, &edited).unwrap();
    root.install(&deb);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
}

/// `bin replay --threads N FILE`'s events, metrics and summary, as one text.
fn replay_output(bin: &Path, file: &Path, threads: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (events, metrics) = (dir.path().join("e.jsonl"), dir.path().join("m.prom"));
    let summary = ok(Command::new(bin)
        .args(["replay", "--json", "--threads", &threads.to_string()])
        .arg("--events-out")
        .arg(&events)
        .arg("--metrics-out")
        .arg(&metrics)
        .arg(file));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    format!("{}\n{}\n{summary}", read(&events), read(&metrics))
}

/// The packaged binary is built another way than the one the tests run (scripts/package
/// builds the release profile with profile-guided optimisation): it must read every
/// sample, the cluster's captures and the foreign ones exactly as the tested build does.
#[test]
fn the_packaged_binary_reads_every_capture_as_the_tested_build_does() {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(package("deb"))
        .arg(dir.path()));
    let packaged = dir.path().join("usr/bin/stacktap");
    let tested = PathBuf::from(env!("CARGO_BIN_EXE_stacktap"));
    let mut files = common::captures_under(repo().join("sampledata"));
    files.extend(common::captures_under(common::foreign_dir()));
    assert!(files.len() >= 80, "too few captures: {}", files.len());
    for f in &files {
        for threads in [1, 2] {
            assert!(
                replay_output(&packaged, f, threads) == replay_output(&tested, f, threads),
                "{} on {threads} threads: the packaged binary's output differs",
                f.display()
            );
        }
    }
}

#[test]
fn lintian_finds_nothing_to_warn_about() {
    let out = Command::new("lintian")
        .args(["--fail-on", "warning", "--tag-display-limit", "0"])
        .arg(package("deb"))
        .output()
        .expect("lintian (apt install lintian; scripts/setup-deps does)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_rpm_holds_what_the_deb_holds() {
    let rpm = package("rpm");
    let files = ok(Command::new("rpm").arg("-qlp").arg(&rpm));
    for f in INSTALLED {
        // Fedora and EL keep units under /usr/lib
        let f = f.replace("/lib/systemd", "/usr/lib/systemd");
        assert!(files.lines().any(|l| l == f), "{f} not in the rpm: {files}");
    }
    let config = ok(Command::new("rpm").args(["-qp", "--configfiles"]).arg(&rpm));
    assert_eq!(config.trim(), "/etc/stacktap/stacktap.toml");
    let requires = ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&rpm));
    assert!(requires.contains("libpcap"), "{requires}");
}

#[test]
fn the_installed_units_verify() {
    let root = Root::installed(&package("deb"));
    let installed = root.path().join("usr/bin/stacktap");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (file, instance) in [
        ("stacktap-capture@.service", "stacktap-capture@lo.service"),
        ("stacktap-collect.service", "stacktap-collect.service"),
    ] {
        let text =
            std::fs::read_to_string(root.path().join("lib/systemd/system").join(file)).unwrap();
        // verify checks that ExecStart's binary exists: point it at the one in the root
        let text = text.replace("/usr/bin/stacktap", installed.to_str().unwrap());
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
fn the_installed_binary_captures_as_nobody_with_only_the_two_capabilities() {
    let root = Root::installed(&package("deb"));
    let bin = root.path().join("usr/bin/stacktap");
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
        .arg(&bin)
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

/// The Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, strict),
/// and against what stacktap needs (tests/manifests.py: least privilege, limits, health
/// checks, flags that exist, configs that load, the Containerfile's runtime user and
/// capabilities).
#[test]
fn the_kubernetes_manifests_and_the_containerfile_hold() {
    let python = common::python();
    let validator = python.with_file_name("kubernetes-validate");
    let manifests: Vec<PathBuf> = std::fs::read_dir(repo().join("packaging/kubernetes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 3, "{manifests:?}");
    let said = ok(Command::new(&validator)
        .args(["--strict", "--no-warn"])
        .args(&manifests));
    assert!(!said.contains("ERROR"), "{said}");
    ok(Command::new(&python)
        .arg(repo().join("tests/manifests.py"))
        .arg(env!("CARGO_BIN_EXE_stacktap"))
        .arg(repo()));
}
