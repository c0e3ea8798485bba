//! Test helpers: run a capture through the real pipeline and read back its outputs.
#![allow(dead_code)]

pub mod otlp;

use serde_json::Value;
use stacktap::config::Config;
use stacktap::run::{Outputs, Run};
use stacktap::source::file::MergedFiles;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub struct Replayed {
    pub events: Vec<Value>,
    pub events_text: String,
    pub metrics: String,
    pub summary: stacktap::sink::summary::Report,
    pub first_ts: f64,
    pub last_ts: f64,
    pub health: stacktap::health::Health,
}

/// The Python with the generator's requirements (oslo.messaging, keystoneauth1,
/// prometheus_client, …): `.ci/run` sets STACKTAP_PYTHON to its venv.
pub fn python() -> PathBuf {
    std::env::var_os("STACKTAP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn replay(files: &[PathBuf]) -> Replayed {
    replay_with(files, Config::default())
}

pub fn replay_with(files: &[PathBuf], cfg: Config) -> Replayed {
    replay_threads(files, cfg, 1)
}

/// A replay with the per-connection work sharded over `threads` workers (1: one thread,
/// no workers), as `stacktap replay --threads N` runs it.
pub fn replay_threads(files: &[PathBuf], cfg: Config, threads: usize) -> Replayed {
    let dir = tempfile::tempdir().unwrap();
    let out = Outputs {
        events_out: Some(dir.path().join("events.jsonl")),
        metrics_out: Some(dir.path().join("metrics.prom")),
        ..Default::default()
    };
    let mut merged = MergedFiles::open(files).expect("open capture");
    let (first_ts, last_ts) = capture_bounds(files);
    let run = Run::new(cfg, &out).unwrap();
    let stop = AtomicBool::new(false);
    let (run, summary) =
        stacktap::parallel::replay(run, threads, &mut merged, None, &out, &stop).unwrap();
    let health = run.health().clone();
    let events_text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let events = events_text
        .lines()
        .map(|l| serde_json::from_str(l).expect("event is JSON"))
        .collect();
    let metrics = std::fs::read_to_string(dir.path().join("metrics.prom")).unwrap();
    Replayed {
        events,
        events_text,
        metrics,
        summary,
        first_ts,
        last_ts,
        health,
    }
}

/// First and last packet time of the capture files.
pub fn capture_bounds(files: &[PathBuf]) -> (f64, f64) {
    let mut m = MergedFiles::open(files).unwrap();
    let mut p = stacktap::source::Packet::default();
    let (mut first, mut last) = (f64::MAX, 0f64);
    while m.next_into(&mut p).unwrap() {
        first = first.min(p.ts.as_secs_f64());
        last = last.max(p.ts.as_secs_f64());
    }
    (first, last)
}

pub fn read_truth(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Compares stacktap's events with the truth the generator's processes wrote.
/// Returns a list of human-readable mismatches (empty = agreement).
pub fn check_against_truth(r: &Replayed, truth: &[Value]) -> Vec<String> {
    check_against_truth_within(r, truth, 0.0)
}

/// The same, with wire times allowed `slack` seconds outside the caller's own interval:
/// a collector corrects its probes' clocks to within a millisecond, not exactly.
pub fn check_against_truth_within(r: &Replayed, truth: &[Value], slack: f64) -> Vec<String> {
    let mut bad = Vec::new();
    let rpc: Vec<&Value> = r.events.iter().filter(|e| e["kind"] == "rpc").collect();
    let by_msg_id = |id: &str| rpc.iter().find(|e| e["msg_id"] == id).copied();
    let by_unique_id = |id: &str| rpc.iter().find(|e| e["unique_id"] == id).copied();
    // a call whose caller started it before the capture began may be half-seen: the
    // acceptance bar is every call that starts after the capture began
    let inside = |t: &Value| {
        t["t_start"].as_f64().unwrap() >= r.first_ts && t["t_end"].as_f64().unwrap() <= r.last_ts
    };
    let mut truth_calls = 0;
    for t in truth.iter().filter(|t| t["kind"] == "call" && inside(t)) {
        truth_calls += 1;
        let id = t["msg_id"].as_str().expect("truth has msg_id");
        let Some(e) = by_msg_id(id) else {
            bad.push(format!("call {id} ({}) not reported", t["method"]));
            continue;
        };
        for key in ["method", "topic", "server", "namespace", "version"] {
            if e[key] != t[key] {
                bad.push(format!("call {id}: {key} {} != truth {}", e[key], t[key]));
            }
        }
        if e["timeout_s"].as_f64() != t["timeout_s"].as_f64() {
            bad.push(format!(
                "call {id}: timeout_s {} != {}",
                e["timeout_s"], t["timeout_s"]
            ));
        }
        // a connection joined mid-stream never showed its start-ok: its process may be
        // unknown (null), but never wrong
        let named = !e["caller"]["service"].is_null();
        if named && (e["caller"]["service"] != t["caller"] || e["caller"]["pid"] != t["pid"]) {
            bad.push(format!(
                "call {id}: caller {} != {} pid {}",
                e["caller"], t["caller"], t["pid"]
            ));
        }
        if !named && r.first_ts < t["t_start"].as_f64().unwrap() - 600.0 {
            bad.push(format!(
                "call {id}: caller unnamed although its connection started in the capture"
            ));
        }
        if e["request_id"] != t["request_id"] {
            bad.push(format!(
                "call {id}: request_id {} != {}",
                e["request_id"], t["request_id"]
            ));
        }
        let outcome = e["outcome"].as_str().unwrap();
        let ok = match t["outcome"].as_str().unwrap() {
            "ok" => outcome == "ok",
            "remote_error" => outcome == "remote_error" && e["error"]["class"] == t["error_class"],
            // the caller saw a timeout; the wire may also show the reply coming late or
            // being returned by the broker
            "timeout" => matches!(outcome, "timeout" | "late_reply" | "unroutable"),
            other => panic!("unknown truth outcome {other}"),
        };
        if !ok {
            bad.push(format!(
                "call {id} {}: outcome {outcome} {} vs truth {} {}",
                t["method"], e["error"], t["outcome"], t["error_class"]
            ));
        }
        // the wire times sit inside the caller's own start..end
        let (start, end) = (t["t_start"].as_f64().unwrap(), t["t_end"].as_f64().unwrap());
        let (start, end) = (start - slack, end + slack);
        let tp = e["t_publish"].as_f64();
        match tp {
            Some(tp) if tp >= start && tp <= end => {}
            _ => bad.push(format!(
                "call {id}: t_publish {:?} outside caller [{start}, {end}]",
                tp
            )),
        }
        if matches!(outcome, "ok" | "remote_error") {
            match e["t_reply_deliver"].as_f64() {
                Some(trd) if trd <= end && tp.is_some_and(|tp| tp <= trd + slack) => {}
                x => bad.push(format!(
                    "call {id}: t_reply_deliver {x:?} not in [t_publish, caller end {end}]"
                )),
            }
        }
    }
    // nothing reported twice: a redelivered or re-read copy is not a new call or cast
    let mut ids = std::collections::HashSet::new();
    for e in &rpc {
        let id = e["msg_id"]
            .as_str()
            .or(e["unique_id"].as_str())
            .unwrap_or("");
        if !id.is_empty() && !ids.insert(id) {
            bad.push(format!("{} {id} reported twice", e["type"]));
        }
    }
    // no invented calls: every reported call whose publish was seen is in the truth
    let truth_ids: std::collections::HashSet<&str> = truth
        .iter()
        .filter(|t| t["kind"] == "call")
        .filter_map(|t| t["msg_id"].as_str())
        .collect();
    for e in rpc.iter().filter(|e| e["type"] == "call") {
        let id = e["msg_id"].as_str().unwrap_or("");
        if !truth_ids.contains(id) {
            bad.push(format!("reported call {id} is not in the truth"));
        }
    }
    // casts and fanouts: each reported once, with the deliveries the servers handled
    for t in truth.iter().filter(|t| t["kind"] == "cast" && inside(t)) {
        let id = t["unique_id"].as_str().expect("truth has unique_id");
        match by_unique_id(id) {
            None => bad.push(format!("cast {id} ({}) not reported", t["method"])),
            Some(e) => {
                let want = if t["fanout"] == true {
                    "fanout"
                } else {
                    "cast"
                };
                if e["type"] != want || e["method"] != t["method"] {
                    bad.push(format!(
                        "cast {id}: {} {} != {want} {}",
                        e["type"], e["method"], t["method"]
                    ));
                }
            }
        }
    }
    let handled = |method: &str| {
        truth
            .iter()
            .filter(|t| {
                t["kind"] == "handled"
                    && t["method"] == method
                    && t["t"]
                        .as_f64()
                        .is_some_and(|x| x >= r.first_ts && x <= r.last_ts)
            })
            .count() as u64
    };
    for method in [
        "update_instance_info",
        "build_and_run_instance",
        "schedule_and_build_instances",
    ] {
        let delivered: u64 = rpc
            .iter()
            .filter(|e| {
                e["method"] == method
                    && e["t_publish"]
                        .as_f64()
                        .is_some_and(|t| t >= r.first_ts && t <= r.last_ts)
            })
            .map(|e| e["deliveries"].as_u64().unwrap())
            .sum();
        let want = handled(method);
        // a server may still be handling the last one when the capture stops: the wire
        // can show one more delivery than handled records, never fewer
        if delivered < want || delivered > want + 2 {
            bad.push(format!(
                "{method}: {delivered} deliveries on the wire, {want} handled by servers"
            ));
        }
    }
    assert!(truth_calls > 0, "the truth has no call inside the capture");
    bad
}

/// The shared test data beside the repository (CI clones main with shared/ next to it).
/// Every .pcap and .pcapng under `dir`, sorted.
pub fn captures_under(dir: PathBuf) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("pcap" | "pcapng")
            ) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn foreign_dir() -> PathBuf {
    let dir = std::env::var_os("STACKTAP_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
        .join("testdata/foreign");
    assert!(
        dir.is_dir(),
        "{} is missing: the foreign captures must sit beside the repo (or set STACKTAP_SHARED)",
        dir.display()
    );
    dir
}

/// Every token the generator put in `_context_auth_token` starts with this.
pub const TOKEN_PREFIX: &str = "gAAAAABsecret-token-";

/// Every password the generator sent to keystone starts with this.
pub const PASSWORD_PREFIX: &str = "secret-password-";

/// `{image_id}` and `{id}` alike: placeholder names differ between services' routers.
fn placeholders_erased(route: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in route.chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            _ if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

/// Compares the `kind: http` events with what the generator's REST clients sent and got.
pub fn check_rest_against_truth(r: &Replayed, truth: &[Value]) -> Vec<String> {
    let mut bad = Vec::new();
    let http: Vec<&Value> = r.events.iter().filter(|e| e["kind"] == "http").collect();
    let calls: Vec<&Value> = truth.iter().filter(|t| t["kind"] == "rest_call").collect();
    assert!(!calls.is_empty(), "the truth has no REST call");
    if http.len() != calls.len() {
        bad.push(format!(
            "{} http events for {} REST calls in the truth",
            http.len(),
            calls.len()
        ));
    }
    let mut used = vec![false; http.len()];
    for t in &calls {
        let rid = &t["request_id"];
        let found = http.iter().enumerate().find(|(i, e)| {
            !used[*i]
                && e["request_id"] == *rid
                && e["method"] == t["method"]
                && e["path"] == t["path"]
        });
        let Some((i, e)) = found else {
            bad.push(format!(
                "{} {} (request id {rid}) not reported",
                t["method"], t["path"]
            ));
            continue;
        };
        used[i] = true;
        let what = format!("{} {}", t["method"], t["path"]);
        if e["status"] != t["status"] {
            bad.push(format!("{what}: status {} != {}", e["status"], t["status"]));
        }
        if e["service"] != t["service"] {
            bad.push(format!(
                "{what}: service {} != {}",
                e["service"], t["service"]
            ));
        }
        if let Some(route) = t["route"].as_str() {
            let ours = e["route"].as_str().unwrap_or("");
            if placeholders_erased(ours) != placeholders_erased(route) {
                bad.push(format!("{what}: route {ours} != {route}"));
            }
        }
        let sent = t["global_request_id"]
            .as_str()
            .filter(|g| g.starts_with("req-"));
        if e["global_request_id"].as_str() != sent {
            bad.push(format!(
                "{what}: global_request_id {} != sent {:?}",
                e["global_request_id"], sent
            ));
        }
        // the calling process, or (when its User-Agent names no process) the library or
        // tool it names, or `external` for a user: never another process
        let client = e["client"]["service"].as_str().unwrap_or("");
        let ua = t["user_agent"].as_str().unwrap_or("").to_ascii_lowercase();
        let named_library = !client.is_empty() && ua.contains(&client.to_ascii_lowercase());
        let user = t["caller"] == "openstack";
        if client != t["caller"] && !named_library && !(user && client == "external") {
            bad.push(format!(
                "{what}: client {client} but the caller was {} (User-Agent {ua:?})",
                t["caller"]
            ));
        }
        let (start, end) = (t["t_start"].as_f64().unwrap(), t["t_end"].as_f64().unwrap());
        let slack = 0.002;
        let t_req = e["t_request"].as_f64().unwrap();
        let t_end = e["t_response_end"].as_f64().unwrap_or(f64::NAN);
        if !(t_req >= start - slack && t_end <= end + slack && t_req <= t_end) {
            bad.push(format!(
                "{what}: wire [{t_req}, {t_end}] outside the caller's [{start}, {end}]"
            ));
        }
    }
    bad
}

/// Credentials in a capture: the values of the headers that carry them, as raw bytes
/// found in the file (tokens, Basic/Digest credentials, cookies) and JSON passwords.
pub fn secrets_in_capture(pcap: &Path) -> Vec<String> {
    let bytes = std::fs::read(pcap).unwrap();
    let lower = bytes.to_ascii_lowercase();
    let mut found = std::collections::BTreeSet::new();
    let names: [&[u8]; 8] = [
        b"\nx-auth-token:",
        b"\nx-subject-token:",
        b"\nx-service-token:",
        b"\nauthorization:",
        b"\nproxy-authorization:",
        b"\ncookie:",
        b"\nset-cookie:",
        b"\"password\": \"",
    ];
    for name in names {
        let mut at = 0;
        while let Some(p) = memfind(&lower[at..], name) {
            let start = at + p + name.len();
            let end = bytes[start..]
                .iter()
                .position(|b| matches!(b, b'\r' | b'\n' | b'"'))
                .map_or(bytes.len(), |e| start + e);
            let value = String::from_utf8_lossy(&bytes[start..end])
                .trim()
                .to_string();
            // the credential part: after the scheme word of Authorization headers
            let value = value
                .strip_prefix("Basic ")
                .or_else(|| value.strip_prefix("Digest "))
                .or_else(|| value.strip_prefix("Bearer "))
                .unwrap_or(&value)
                .to_string();
            if value.len() >= 8 {
                found.insert(value);
            }
            at = start;
        }
    }
    found.into_iter().collect()
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Panics if any secret appears in any output of the replay.
pub fn assert_no_secrets(name: &str, r: &Replayed, secrets: &[String]) {
    let summary_json = serde_json::to_string(&r.summary).unwrap();
    let summary_text = r.summary.to_text(1000);
    for (what, text) in [
        ("events", &r.events_text),
        ("metrics", &r.metrics),
        ("summary", &summary_json),
        ("summary text", &summary_text),
    ] {
        for s in secrets
            .iter()
            .map(String::as_str)
            .chain([TOKEN_PREFIX, PASSWORD_PREFIX])
        {
            assert!(!text.contains(s), "{name}: secret {s:?} reached the {what}");
        }
    }
}

/// The root cause the processes recorded for a failure: follow `cause` from the record
/// that surfaced it through the `failure` records of the same request.
pub fn recorded_root(truth: &[Value], root_id: &str, cause: &Value) -> Value {
    let mut at = cause.clone();
    for _ in 0..10 {
        let next = truth.iter().find(|t| {
            t["kind"] == "failure"
                && root_of(t) == root_id
                && t["service"] == at["service"]
                && t["operation"] == at["operation"]
                && t["error"] == at["error"]
                && !t["cause"].is_null()
        });
        match next {
            Some(t) => at = t["cause"].clone(),
            None => break,
        }
    }
    at
}

pub fn root_of(t: &Value) -> &str {
    t["global_request_id"]
        .as_str()
        .or(t["request_id"].as_str())
        .unwrap_or("")
}

/// Every check against the truth at once: RPC (times within `slack` s), REST and chains.
pub fn check_all_against_truth(r: &Replayed, truth: &[Value], slack: f64) -> Vec<String> {
    let mut bad = check_against_truth_within(r, truth, slack);
    bad.extend(check_rest_against_truth(r, truth));
    bad.extend(check_chains_against_truth(r, truth));
    bad
}

/// Every failure the processes saw surface to a user has exactly one chain, whose root
/// is the fault the processes recorded at the bottom; nothing else is a chain; every
/// request rescheduled away from a failure that then succeeded counts as masked.
pub fn check_chains_against_truth(r: &Replayed, truth: &[Value]) -> Vec<String> {
    let mut bad = Vec::new();
    let chains: Vec<&Value> = r.events.iter().filter(|e| e["kind"] == "chain").collect();
    let mut surfaced: Vec<&Value> = truth.iter().filter(|t| t["kind"] == "surfaced").collect();
    surfaced.sort_by_key(|t| root_of(t).to_string());
    surfaced.dedup_by_key(|t| root_of(t).to_string());
    assert!(!surfaced.is_empty(), "the truth has no surfaced failure");
    for s in &surfaced {
        let id = root_of(s);
        let want = recorded_root(truth, id, &s["cause"]);
        let mine: Vec<&&Value> = chains.iter().filter(|c| c["request_id"] == id).collect();
        if mine.len() != 1 {
            bad.push(format!("{id} ({}): {} chains", s["how"], mine.len()));
            continue;
        }
        let root = &mine[0]["root"];
        let op = |v: &Value| placeholders_erased(v.as_str().unwrap_or(""));
        if root["service"] != want["service"]
            || root["error"] != want["error"]
            || op(&root["operation"]) != op(&want["operation"])
        {
            bad.push(format!(
                "{id}: root {root} but the processes recorded {want}"
            ));
        }
    }
    if chains.len() != surfaced.len() {
        bad.push(format!(
            "{} chains for {} surfaced failures",
            chains.len(),
            surfaced.len()
        ));
    }
    let masked_requests = truth
        .iter()
        .filter(|t| t["kind"] == "rescheduled")
        .map(root_of)
        .filter(|id| !surfaced.iter().any(|s| root_of(s) == *id))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let masked: u64 = r
        .metrics
        .lines()
        .filter(|l| l.starts_with("stacktap_masked_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    if masked < masked_requests {
        bad.push(format!(
            "{masked} masked failures counted, {masked_requests} requests were rescheduled and succeeded"
        ));
    }
    bad
}

/// The graph node a truth `call`/`cast` record went through: its topic's queue, or the
/// fanout exchange.
pub fn truth_queue_node(t: &Value) -> String {
    let topic = t["topic"].as_str().unwrap();
    if t["fanout"] == true {
        format!("exchange:{topic}_fanout")
    } else {
        format!("queue:{topic}")
    }
}

/// Runs the stacktap binary: (exit code, stdout, stderr).
pub fn stacktap(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stacktap"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback port nobody listens on (now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 GET on loopback: (status, body), None if nobody answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Records a generator scenario into `out`: the real oslo.messaging (and REST) processes
/// against the live broker. On failure the test fails with the cause: the generator's own
/// message and the tail of the processes' log, read before the temp dir goes away.
pub fn record_scenario(scenario: &str, out: &Path) {
    let ran = std::process::Command::new(python())
        .arg(repo().join("sampledata/generator/minicloud.py"))
        .args(["record", scenario, "--out"])
        .arg(out)
        .output()
        .expect("run the generator (STACKTAP_PYTHON)");
    if ran.status.success() {
        print!("{}", String::from_utf8_lossy(&ran.stdout));
        return;
    }
    let log = out.join(format!("{scenario}.log"));
    panic!(
        "the generator failed for {scenario} ({}):\n{}\n--- last lines of {} ---\n{}",
        ran.status,
        String::from_utf8_lossy(&ran.stderr).trim_end(),
        log.display(),
        log_tail(&log, 40)
    );
}

/// The last `n` lines of a child's log, for a failure message.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(no log: {e})"),
    }
}

/// A copy of the stacktap binary that any user may run (the checkout may sit in a
/// directory an unprivileged user cannot enter), removed when this goes out of scope.
pub struct BinaryForAnyUser(pub PathBuf);

impl BinaryForAnyUser {
    pub fn new(tag: &str) -> BinaryForAnyUser {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("stacktap-{tag}-{}", std::process::id());
        let bin = std::env::temp_dir().join(name);
        std::fs::copy(env!("CARGO_BIN_EXE_stacktap"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        BinaryForAnyUser(bin)
    }
}

impl Drop for BinaryForAnyUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child process killed when this goes out of scope (also when a test fails).
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
