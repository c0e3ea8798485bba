//! Captures from other projects' test suites (Packetbeat, nDPI, suricata-verify, Arkime),
//! used in place: stacktap must never panic on any of them, and must agree with tshark's
//! AMQP decode where there is AMQP.

mod common;
use common::*;
use serde_json::Value;
use std::path::PathBuf;

fn all_captures() -> Vec<PathBuf> {
    captures_under(foreign_dir())
}

#[test]
fn every_foreign_capture_replays_without_panic() {
    let files = all_captures();
    assert!(
        files.len() >= 70,
        "expected the 72 foreign captures, found {}",
        files.len()
    );
    for f in &files {
        let r = std::panic::catch_unwind(|| replay(std::slice::from_ref(f)));
        assert!(r.is_ok(), "{} panicked", f.display());
    }
}

fn expected(name: &str) -> Value {
    let p = foreign_dir().join("expected").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn check_amqp(name: &str, pcap: &str) {
    let exp = expected(name);
    let r = replay(&[foreign_dir().join(pcap)]);
    let amqp = &exp["amqp"];
    let methods = r.health.methods_by_name();
    let frames: std::collections::BTreeMap<_, _> = r.health.frames_by_name().collect();
    for (method, n) in amqp["method_counts"].as_object().unwrap() {
        let got = methods.get(method.as_str()).copied().unwrap_or(0);
        assert_eq!(got, n.as_u64().unwrap(), "{name}: {method}");
    }
    let total_methods: u64 = methods.values().sum();
    let want: u64 = amqp["method_counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total_methods, want, "{name}: total methods {methods:?}");
    for (kind, n) in amqp["frame_type_counts"].as_object().unwrap() {
        let got = frames.get(kind.as_str()).copied().unwrap_or(0);
        assert_eq!(got, n.as_u64().unwrap(), "{name}: {kind} frames");
    }
    assert_eq!(r.health.anomaly_count("amqp", "bad_frame_end"), 0, "{name}");
}

#[test]
fn packetbeat_amqp_publish() {
    check_amqp("packetbeat__amqp_publish", "packetbeat/amqp_publish.pcap");
}

#[test]
fn packetbeat_amqp_emit_receive() {
    check_amqp(
        "packetbeat__amqp_emit_receive",
        "packetbeat/amqp_emit_receive.pcap",
    );
}

#[test]
fn packetbeat_amqp_channel_error() {
    check_amqp(
        "packetbeat__amqp_channel_error",
        "packetbeat/amqp_channel_error.pcap",
    );
    // the 404 channel.close from the broker is counted by reply code
    let r = replay(&[foreign_dir().join("packetbeat/amqp_channel_error.pcap")]);
    assert!(
        r.metrics
            .contains("stacktap_amqp_channel_closes_total{reply_code=\"404\"} 1"),
        "{}",
        r.metrics
    );
}

#[test]
fn ndpi_amqp_midstream() {
    check_amqp("ndpi__amqp", "ndpi/amqp.pcap");
}
