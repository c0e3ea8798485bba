//! HTTP on captures from other projects' test suites (packetbeat, suricata-verify, nDPI,
//! Arkime): every request/response pairing tshark found, with tshark's known blind spots
//! replaced by what the upstream project asserts (../shared/testdata/foreign/expected).

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

type Exchange = (String, String, Option<u64>);

/// The path of a request target, as stacktap reports it (no query, no authority).
fn path_of(uri: &str) -> String {
    let uri = uri
        .strip_prefix("http://")
        .map(|rest| rest.find('/').map_or("/", |i| &rest[i..]))
        .unwrap_or(uri);
    uri.split(['?', '#']).next().unwrap_or("").to_string()
}

/// tshark's exchanges: each request with the status of its linked final response.
fn tshark_exchanges(http: &Value) -> Vec<Exchange> {
    let mut final_for: BTreeMap<u64, u64> = BTreeMap::new();
    for resp in http["responses"].as_array().unwrap() {
        let (Some(req), Some(status)) = (resp["request_in"].as_u64(), resp["status"].as_u64())
        else {
            continue;
        };
        if !(100..200).contains(&status) {
            final_for.insert(req, status);
        }
    }
    http["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let frame = r["frame"].as_u64().unwrap();
            (
                r["method"].as_str().unwrap().to_string(),
                path_of(r["uri"].as_str().unwrap()),
                final_for.get(&frame).copied(),
            )
        })
        .collect()
}

fn ex(method: &str, path: &str, status: Option<u64>) -> Exchange {
    (method.into(), path.into(), status)
}

/// Where tshark is wrong, the upstream project's own assertion (expected/README.md,
/// UPSTREAM-ASSERTIONS.md).
fn upstream_truth(capture: &str, tshark: &[Exchange]) -> Option<Vec<Exchange>> {
    let all = |status: u64| {
        tshark
            .iter()
            .map(|(m, p, _)| ex(m, p, Some(status)))
            .collect()
    };
    Some(match capture {
        // packetbeat: one transaction, status OK, response partly lost
        "packetbeat__gap_in_stream.json" => all(200),
        // suricata: /1 /2 /3 all 200 despite gaps in the bodies
        "suricata-verify__http-gap-simple.json"
        | "suricata-verify__http-gap-double.json"
        | "suricata-verify__http-gap-whole-body.json" => all(200),
        // suricata: /1 200; the gap eats into the next response (its status unasserted):
        // we report it lost, and /3 paired with the response after the gap
        "suricata-verify__http-gap-beyond-body.json" => vec![
            ex("GET", "/1", Some(200)),
            ex("GET", "/2", None),
            ex("GET", "/3", Some(200)),
        ],
        // suricata: three responses (one with gaps)
        "suricata-verify__http-pipeline-files-with-gap.json" => all(200),
        // nDPI: three GETs answered 200 (tshark loses the multi-space request line)
        "ndpi__http-manipulated.json" => vec![
            ex("GET", "/", Some(200)),
            ex("GET", "/aaaaaaaaaaaaaaaaaaaaaaaa_very_long_uri", Some(200)),
            ex("GET", "/rick.gif", Some(200)),
        ],
        // 40 requests, 40 responses all 404; tshark links only some of them
        "suricata-verify__http-protocol-nodup.json" => all(404),
        // status "2XX" is not a number: the exchange is reported, its status unknown
        "suricata-verify__http1-noint-status.json" => vec![ex("GET", "/test", None)],
        // two Content-Length headers: Python's http.server answers the first request
        // (501) and closes; tshark's framing takes the second length and sees /bad.php
        "suricata-verify__http-multiple-cl.json" => vec![
            ex("POST", "/which.php", Some(501)),
            ex("POST", "/evil.php", None),
        ],
        _ => return None,
    })
}

#[test]
fn http_exchanges_match_tshark_and_upstream() {
    let dir = foreign_dir();
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir.join("expected"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    for expected in entries {
        let name = expected.file_name().unwrap().to_string_lossy().to_string();
        let truth: Value =
            serde_json::from_str(&std::fs::read_to_string(&expected).unwrap()).unwrap();
        let Some(http) = truth.get("http") else {
            continue;
        };
        let capture = dir.join(truth["file"].as_str().unwrap());
        let r = replay(std::slice::from_ref(&capture));
        let tshark = tshark_exchanges(http);
        let mut want = upstream_truth(&name, &tshark).unwrap_or(tshark);
        let mut ours: Vec<Exchange> = r
            .events
            .iter()
            .filter(|e| e["kind"] == "http")
            .map(|e| {
                (
                    e["method"].as_str().unwrap().to_string(),
                    e["path"].as_str().unwrap().to_string(),
                    e["status"].as_u64(),
                )
            })
            .collect();
        want.sort();
        ours.sort();
        if ours != want {
            failures.push(format!("{name}:\n  ours  {ours:?}\n  want  {want:?}"));
        }
        for e in r.events.iter().filter(|e| e["kind"] == "http") {
            if let (Some(a), Some(b)) = (e["t_request"].as_f64(), e["t_response"].as_f64()) {
                assert!(a <= b, "{name}: response before its request: {e}");
            }
        }
        // no credential of the capture in any output
        assert_no_secrets(&name, &r, &secrets_in_capture(&capture));
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} HTTP captures found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn asymmetric_capture_pairs_nothing_and_counts_every_orphan() {
    // nDPI http_asymmetric: requests and responses travel on different 5-tuples, so a
    // per-connection pairer must report 3 unanswered requests and count 3 orphans
    let r = replay(&[foreign_dir().join("ndpi/http_asymmetric.pcapng")]);
    let http: Vec<_> = r.events.iter().filter(|e| e["kind"] == "http").collect();
    assert_eq!(http.len(), 3);
    assert!(http.iter().all(|e| e["status"].is_null()));
    assert_eq!(
        r.health.anomaly_count("http", "response_without_request"),
        3
    );
}
