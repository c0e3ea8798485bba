//! OTLP helpers shared by the tests: a receiver built from the official OpenTelemetry
//! protobufs for Python (tests/otlp_receiver.py), and what the spans of a capture must
//! say against the processes' truth.

use super::{Killed, python, repo, secrets_in_capture};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub const CLIENT: i64 = 3;
pub const SERVER: i64 = 2;
pub const PRODUCER: i64 = 4;
pub const CONSUMER: i64 = 5;
pub const STATUS_ERROR: i64 = 2;

/// The Python receiver, on loopback ports of its own.
pub struct Receiver {
    _child: Killed,
    pub grpc: u16,
    pub http: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    pub fn start(refuse: bool) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/otlp_receiver.py")).arg(&out);
        if refuse {
            cmd.arg("--refuse");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the OTLP receiver (python with opentelemetry-proto and grpcio) starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = |key: &str| -> u16 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("the receiver did not say its ports: {line:?}"))
        };
        Receiver {
            grpc: port("grpc="),
            http: port("http="),
            _child: Killed(child),
            out,
            _dir: dir,
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.http)
    }

    /// Every span received so far (and truncates, for the next run).
    pub fn take(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        std::fs::write(&self.out, "").unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

pub fn attr<'a>(s: &'a Value, key: &str) -> Option<&'a str> {
    s["attributes"][key].as_str()
}

pub fn service(s: &Value) -> &str {
    s["resource"]["service.name"].as_str().unwrap_or("")
}

pub fn kind(s: &Value) -> i64 {
    s["kind"].as_i64().unwrap()
}

/// What the spans of one sample say against its truth; panics with every miss.
pub fn check_sample(name: &str, spans: &[Value], truth: &[Value], pcaps: &[PathBuf]) {
    let mut bad = Vec::new();
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    assert_eq!(by_id.len(), spans.len(), "{name}: a span id repeats");
    for s in spans {
        for id in ["trace_id", "span_id"] {
            let v = s[id].as_str().unwrap();
            assert!(
                !v.is_empty() && v.chars().any(|c| c != '0'),
                "{name}: bad {id} {s}"
            );
        }
        assert!(
            s["end"].as_u64() >= s["start"].as_u64(),
            "{name}: ends before it starts {s}"
        );
    }
    // every call the processes made: a client span with its _msg_id, a server child in
    // the process that served it; a failed call's client span is ERROR
    let calls: Vec<&Value> = truth.iter().filter(|t| t["kind"] == "call").collect();
    let served = |t: &Value| t["outcome"] == "ok" || t["outcome"] == "remote_error";
    let mut paired = 0;
    for t in &calls {
        let msg_id = t["msg_id"].as_str().unwrap();
        let client = spans
            .iter()
            .find(|s| kind(s) == CLIENT && attr(s, "messaging.message.id") == Some(msg_id));
        let Some(client) = client else {
            bad.push(format!("call {msg_id} ({}): no client span", t["method"]));
            continue;
        };
        if service(client) != t["caller"].as_str().unwrap() {
            bad.push(format!("call {msg_id}: client span in {}", service(client)));
        }
        if t["outcome"] != "ok" && client["status_code"] != STATUS_ERROR {
            bad.push(format!(
                "call {msg_id} failed ({}) but its span is not ERROR",
                t["outcome"]
            ));
        }
        let server = spans.iter().find(|s| {
            kind(s) == SERVER
                && s["parent_span_id"] == client["span_id"]
                && s["trace_id"] == client["trace_id"]
        });
        match server {
            Some(s) if service(s) != service(client) && service(s) != "unknown" => paired += 1,
            Some(s) => bad.push(format!("call {msg_id}: server span in {}", service(s))),
            None if served(t) => {
                bad.push(format!("call {msg_id} ({}): no server child", t["method"]))
            }
            None => {}
        }
        if t["outcome"] == "remote_error"
            && let Some(s) = server
            && s["status_code"] != STATUS_ERROR
        {
            bad.push(format!(
                "call {msg_id}: a remote error, its server span not ERROR"
            ));
        }
    }
    let served_n = calls.iter().filter(|t| served(t)).count();
    assert!(
        paired as f64 >= 0.99 * served_n as f64,
        "{name}: {paired} of {served_n} served calls have a client span and a server child:\n{}",
        bad.join("\n")
    );
    // one trace per user request: every span of what the user's request caused
    let trace_of_call = |id: &str| {
        spans
            .iter()
            .find(|s| {
                attr(s, "messaging.message.id") == Some(id)
                    || attr(s, "oslo.messaging.unique_id") == Some(id)
            })
            .map(|s| s["trace_id"].as_str().unwrap().to_string())
    };
    let trace_of_rest = |t: &Value| {
        spans
            .iter()
            .find(|s| {
                kind(s) == CLIENT
                    && attr(s, "openstack.request_id") == t["request_id"].as_str()
                    && attr(s, "http.request.method") == t["method"].as_str()
            })
            .map(|s| s["trace_id"].as_str().unwrap().to_string())
    };
    let root = |t: &Value| {
        t["global_request_id"]
            .as_str()
            .or(t["request_id"].as_str())
            .map(str::to_string)
    };
    let users: Vec<&Value> = truth
        .iter()
        .filter(|t| t["kind"] == "rest_call" && t["caller"] == "openstack")
        .collect();
    let mut whole = 0;
    for u in &users {
        let Some(r) = root(u) else { continue };
        let mut traces = BTreeSet::new();
        traces.insert(trace_of_rest(u));
        for t in truth.iter().filter(|t| root(t).as_deref() == Some(&r)) {
            match t["kind"].as_str() {
                Some("rest_call") => traces.insert(trace_of_rest(t)),
                Some("call") => traces.insert(trace_of_call(t["msg_id"].as_str().unwrap())),
                Some("cast") => traces.insert(trace_of_call(t["unique_id"].as_str().unwrap())),
                _ => false,
            };
        }
        if traces.len() == 1 && traces.iter().all(Option::is_some) {
            whole += 1;
        } else {
            bad.push(format!("user request {r}: traces {traces:?}"));
        }
    }
    assert!(
        whole as f64 >= 0.99 * users.len() as f64,
        "{name}: {whole} of {} user requests are one trace:\n{}",
        users.len(),
        bad.join("\n")
    );
    // nothing secret on the way out
    let text = spans.iter().map(Value::to_string).collect::<String>();
    let scenario = truth.iter().find(|t| t["kind"] == "scenario");
    let mut secrets: Vec<String> = pcaps.iter().flat_map(|p| secrets_in_capture(p)).collect();
    for key in ["token_prefix", "password_prefix"] {
        if let Some(s) = scenario.and_then(|s| s[key].as_str()) {
            secrets.push(s.to_string());
        }
    }
    secrets.extend([super::TOKEN_PREFIX.into(), super::PASSWORD_PREFIX.into()]);
    for s in secrets {
        assert!(!text.contains(&s), "{name}: secret {s:?} reached a span");
    }
}
