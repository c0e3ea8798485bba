//! Criterion benches: the parsers and the whole pipeline on the bundled sample captures
//! (real oslo.messaging traffic), held in memory so the numbers measure stacktap, not I/O.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stacktap::amqp::Props;
use stacktap::config::Config;
use stacktap::pipeline::Pipeline;
use stacktap::source::Packet;
use stacktap::source::file::MergedFiles;
use std::hint::black_box;
use std::path::PathBuf;

// the same allocator as the binary
#[global_allocator]
static GLOBAL: stacktap::allocator::Mimalloc = stacktap::allocator::Mimalloc;

/// The bundled samples, or STACKTAP_BENCH_PCAP (e.g. target/bench/load.pcap).
fn sample_packets() -> Vec<Packet> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sampledata");
    let files: Vec<PathBuf> = match std::env::var_os("STACKTAP_BENCH_PCAP") {
        Some(p) => vec![PathBuf::from(p)],
        None => ["healthy", "remote_error", "slow_server", "dead_consumer"]
            .iter()
            .map(|s| dir.join(format!("{s}.pcap")))
            .collect(),
    };
    let mut m = MergedFiles::open(&files).expect("sample captures");
    let mut out = Vec::new();
    let mut p = Packet::default();
    while m.next_into(&mut p).unwrap() {
        out.push(p.clone());
    }
    out
}

fn pipeline(c: &mut Criterion) {
    let packets = sample_packets();
    let bytes: u64 = packets.iter().map(|p| p.data.len() as u64).sum();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.bench_function("end_to_end_without_sinks", |b| {
        b.iter(|| {
            let mut pl = Pipeline::new(Config::default());
            let mut n = 0u64;
            for p in &packets {
                pl.packet(&p.as_ref(), &mut |_| n += 1);
            }
            pl.finish(&mut |_| n += 1);
            black_box(n)
        })
    });
    g.finish();
}

fn oslo_decode(c: &mut Criterion) {
    let inner = serde_json::json!({
        "method": "build_and_run_instance", "args": {"instance": {"nova_object.name": "Instance", "nova_object.data": {"uuid": "6a1c1a2e-1b8a-4d5e-9c57-2f4a0c1c2d3e", "vcpus": 2, "memory_mb": 2048}}},
        "version": "6.0", "_msg_id": "18c3aeba5d884884a9ea818660fd1abe", "_reply_q": "reply_290096a378764630a92d2701b519157d",
        "_timeout": null, "_unique_id": "2ca8e518e0514cd0a3f72626d9ad5aff", "_context_user": "u1", "_context_project_id": "p1",
        "_context_auth_token": "gAAAAABsecret", "_context_request_id": "req-11111111-2222-3333-4444-555555555555",
        "_context_global_request_id": null, "_context_roles": ["member", "reader"], "_context_user_identity": "u1 p1 - - -"
    })
    .to_string();
    let body =
        serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": inner}))
            .unwrap();
    let props = Props::default();
    let mut g = c.benchmark_group("oslo");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("decode_call", |b| {
        b.iter(|| {
            black_box(stacktap::oslo::decode(
                "nova",
                &props,
                black_box(&body),
                64 << 20,
            ))
        })
    });
    g.finish();
}

/// Every observation a probe makes of `packets`, in batches of one packet.
fn observations(packets: &[Packet]) -> Vec<Vec<stacktap::contract::Observation>> {
    let mut probe = stacktap::probe::Probe::new(Config::default());
    let mut out = Vec::new();
    for p in packets {
        let mut obs = Vec::new();
        probe.packet(&p.as_ref(), &mut obs);
        if !obs.is_empty() {
            out.push(obs);
        }
    }
    let mut obs = Vec::new();
    probe.finish(&mut obs);
    out.push(obs);
    out
}

/// The collector's side: how many observations one core joins (the watermark merge, the
/// clock offsets, duplicate suppression and the analyser) and reads off the wire.
fn collector(c: &mut Criterion) {
    use stacktap::fleet::merge::{Merge, MergeConfig};
    use stacktap::fleet::wire;
    let batches = observations(&sample_packets());
    let n: u64 = batches.iter().map(|b| b.len() as u64).sum();
    let mut g = c.benchmark_group("collector");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.bench_function("join_observations", |b| {
        b.iter(|| {
            let cfg = MergeConfig {
                warmup_s: 0.0,
                startup_s: 0.0,
                ..MergeConfig::default()
            };
            let mut merge = Merge::new(cfg);
            let mut analyser = stacktap::analyser::Analyser::new(Config::default());
            let now = std::time::Instant::now();
            let mut released = Vec::new();
            let mut events = 0u64;
            for batch in &batches {
                merge.ingest("probe", None, batch.clone(), now);
                let reached = merge.release(now, &mut released);
                for mut o in released.drain(..) {
                    analyser.observe(&mut o);
                }
                if let Some(t) = reached {
                    analyser.advance(t);
                }
                analyser.flush(&mut |_| events += 1);
            }
            merge.drain(&mut released);
            for mut o in released.drain(..) {
                analyser.observe(&mut o);
            }
            analyser.finish(&mut |_| events += 1);
            black_box(events)
        })
    });
    let who = wire::Sender {
        probe: "probe".into(),
        host: None,
    };
    let records: Vec<_> = batches
        .iter()
        .flat_map(|b| wire::encode_batch(&who, b).resource_logs)
        .flat_map(|r| r.scope_logs)
        .flat_map(|s| s.log_records)
        .collect();
    g.bench_function("decode_wire", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for r in &records {
                ok += wire::decode(r).is_ok() as u64;
            }
            black_box(ok)
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline, oslo_decode, collector);
criterion_main!(benches);
