//! `--threads N`: the per-connection work sharded over N workers gives exactly the events,
//! metrics and health counters of one thread, on every bundled and foreign capture (clock
//! jumps, mid-stream joins, gaps, idle closes and hole timeouts included) and on the
//! cluster's captures merged by time.

mod common;
use common::*;
use stacktap::config::Config;
use stacktap::parallel::Parallel;
use stacktap::run::{Outputs, Run, Tap};
use stacktap::source::Packet;
use stacktap::time::Ts;
use std::path::PathBuf;

fn assert_same_for_any_threads(files: &[PathBuf], cfg: &Config) {
    let one = replay_threads(files, cfg.clone(), 1);
    for n in [2, 3, 8] {
        let many = replay_threads(files, cfg.clone(), n);
        let name = format!("{files:?} on {n} threads");
        assert!(
            one.events_text == many.events_text,
            "{name}: events differ from one thread's"
        );
        assert!(
            one.metrics == many.metrics,
            "{name}: metrics differ from one thread's"
        );
        assert_eq!(one.health.packets, many.health.packets, "{name}");
        assert_eq!(one.health.anomalies, many.health.anomalies, "{name}");
        assert_eq!(one.health.evictions, many.health.evictions, "{name}");
    }
}

#[test]
fn the_bundled_samples_give_the_same_output_on_any_number_of_threads() {
    let samples = captures_under(repo().join("sampledata"));
    assert!(samples.len() >= 10, "sampledata has too few captures");
    for f in samples {
        assert_same_for_any_threads(&[f], &Config::default());
    }
}

#[test]
fn a_cluster_merged_by_time_gives_the_same_output_on_any_number_of_threads() {
    let files = captures_under(repo().join("sampledata/cluster"));
    assert_eq!(files.len(), 4);
    let mut cfg = Config::default();
    cfg.amqp.ports = vec![5672, 5682, 5683, 5684];
    assert_same_for_any_threads(&files, &cfg);
}

#[test]
fn the_foreign_captures_give_the_same_output_on_any_number_of_threads() {
    let all = captures_under(foreign_dir());
    assert!(all.len() >= 60, "the foreign captures are missing");
    for f in all {
        assert_same_for_any_threads(&[f], &Config::default());
    }
}

/// Idle closes and hole timeouts sweep every shard at the same steps: a short idle
/// timeout makes connections close mid-capture, in several shards at once.
#[test]
fn sweeps_close_connections_in_one_order_on_any_number_of_threads() {
    let mut cfg = Config::default();
    cfg.tcp.idle_timeout_s = 0.5;
    for name in ["failures", "rest", "midstream"] {
        let f = repo().join(format!("sampledata/{name}.pcap"));
        assert_same_for_any_threads(&[f], &cfg);
    }
}

/// `packets` fed to a run on `threads` threads: (events, metrics).
fn run_packets(packets: &[Packet], cfg: &Config, threads: usize) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Outputs {
        events_out: Some(dir.path().join("events.jsonl")),
        metrics_out: Some(dir.path().join("metrics.prom")),
        ..Default::default()
    };
    let mut run = Run::new(cfg.clone(), &out).unwrap();
    if threads > 1 {
        let mut par = Parallel::new(run, threads, false).unwrap();
        packets.iter().for_each(|p| par.packet(&p.as_ref()));
        run = par.finish().unwrap();
        run.write_out(&out).unwrap();
    } else {
        packets.iter().for_each(|p| run.packet(&p.as_ref()));
        run.finish(&out).unwrap();
    }
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    (read("events.jsonl"), read("metrics.prom"))
}

/// One Ethernet frame: a TCP segment from 10.0.0.`client`:`port` to nova-api.
fn segment(t_ms: u64, client: u8, port: u16, seq: u32, syn: bool, payload: &[u8]) -> Packet {
    let b = etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 0, 0, client], [10, 0, 1, 1], 64)
        .tcp(port, 8774, seq, 64000);
    let b = if syn { b.syn() } else { b.ack(1).psh() };
    let mut data = Vec::new();
    b.write(&mut data, payload).unwrap();
    Packet {
        ts: Ts(1_700_000_000_000_000_000 + t_ms * 1_000_000),
        linktype: 1,
        orig_len: data.len() as u32,
        data,
    }
}

/// Requests on 48 connections, none answered, in two waves: the first goes idle and is
/// closed by one sweep (connections in every shard at the same step), the second is
/// closed by the end of input. Each close reports its request `no_response`, so the
/// events show the order the closes were merged in.
fn unanswered_requests() -> Vec<Packet> {
    let mut packets = Vec::new();
    for wave in 0..2u64 {
        for i in 0..24u16 {
            let (client, port) = (1 + (i % 5) as u8, 40000 + 100 * wave as u16 + i);
            let t = wave * 5000 + u64::from(i);
            packets.push(segment(t, client, port, 0, true, b""));
            let req = format!("GET /v2.1/servers/{wave}-{i} HTTP/1.1\r\nHost: nova\r\n\r\n");
            packets.push(segment(t + 1, client, port, 1, false, req.as_bytes()));
        }
    }
    packets
}

#[test]
fn connections_closing_at_one_step_in_several_shards_merge_in_one_order() {
    let mut cfg = Config::default();
    cfg.tcp.idle_timeout_s = 2.0;
    let packets = unanswered_requests();
    let one = run_packets(&packets, &cfg, 1);
    assert_eq!(one.0.matches("\"no_response\"").count(), 48, "{}", one.0);
    for n in [2, 3, 8] {
        let many = run_packets(&packets, &cfg, n);
        assert!(
            one.0 == many.0,
            "{n} threads: the closes came in another order"
        );
        assert!(one.1 == many.1, "{n} threads: metrics differ");
    }
}
