//! Memory per open call, all in: a generated capture of RPC calls that never get a reply
//! (the generator is below), replayed through the whole pipeline in this process, with
//! RSS read from /proc/self/statm after 100 k calls and at the end.
//!
//!   cargo bench --bench open_calls [-- CALLS]        (default 1 000 000)
//!
//! Two runs: every call kept (caps above the flood: RSS per open call), and small caps
//! (RSS at 1 M against RSS at 100 k: flat once the caps are reached, every eviction
//! counted). Reported, never asserted (no sized assertion in a bench).

use stacktap::config::Config;
use stacktap::run::{Outputs, Run};
use stacktap::source::file::MergedFiles;
use std::io::Write;
use std::path::{Path, PathBuf};

#[global_allocator]
static GLOBAL: stacktap::allocator::Mimalloc = stacktap::allocator::Mimalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split(' ')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The capture: `calls` oslo.messaging calls from 20 nova-conductor connections to
/// 500 compute hosts, each with a request context as nova sends it (a token, roles, a
/// catalog), none answered. Ethernet/IPv4/TCP on 5672, one AMQP frame trio per packet.
fn generate(path: &Path, calls: u64) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    // pcap header: microseconds, snaplen 256 KiB, Ethernet
    w.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
    w.write_all(&2u16.to_le_bytes())?;
    w.write_all(&4u16.to_le_bytes())?;
    w.write_all(&[0; 8])?;
    w.write_all(&262_144u32.to_le_bytes())?;
    w.write_all(&1u32.to_le_bytes())?;
    let conns = 20u64;
    let mut seq = vec![1000u32; conns as usize];
    let t0 = 1_700_000_000u64;
    let catalog = r#"[{\"type\": \"image\", \"name\": \"glance\", \"endpoints\": [{\"region\": \"RegionOne\", \"publicURL\": \"http://10.0.0.2:9292\"}]}, {\"type\": \"network\", \"name\": \"neutron\", \"endpoints\": [{\"region\": \"RegionOne\", \"publicURL\": \"http://10.0.0.2:9696\"}]}]"#;
    for c in 0..conns {
        // the handshake and the protocol header, so the connection is followed from its start
        let port = 40000 + c as u16;
        for (flags, from_client) in [(0x02u8, true), (0x12, false), (0x10, true)] {
            let f = frame(port, from_client, seq[c as usize], flags, &[]);
            record(&mut w, t0, 0, &f)?;
        }
        seq[c as usize] += 1;
        let f = frame(port, true, seq[c as usize], 0x18, b"AMQP\x00\x00\x09\x01");
        record(&mut w, t0, 0, &f)?;
        seq[c as usize] += 8;
    }
    for i in 0..calls {
        let c = (i % conns) as usize;
        let inner = format!(
            r#"{{\"method\": \"get_console_output\", \"args\": {{\"instance_uuid\": \"{i:08x}-1111-4222-8333-444455556666\", \"tail_length\": 50}}, \"version\": \"6.0\", \"_msg_id\": \"{:032x}\", \"_reply_q\": \"reply_{:032x}\", \"_timeout\": null, \"_unique_id\": \"{:032x}\", \"_context_user\": \"u1\", \"_context_project_id\": \"p1\", \"_context_auth_token\": \"gAAAAABbench-token-{:064x}\", \"_context_request_id\": \"req-{:08x}-0000-4000-8000-{:012x}\", \"_context_global_request_id\": null, \"_context_roles\": [\"member\", \"reader\"], \"_context_is_admin\": false, \"_context_read_deleted\": \"no\", \"_context_remote_address\": \"10.0.0.50\", \"_context_timestamp\": \"2026-12-01T10:00:00.000000\", \"_context_service_catalog\": {catalog}}}"#,
            i * 7919 + 1,
            c + 1,
            i * 104_729 + 3,
            i,
            i,
            i
        );
        let body = format!(r#"{{"oslo.version": "2.0", "oslo.message": "{inner}"}}"#);
        let rk = format!("compute.host{}", i % 500);
        let mut amqp = Vec::with_capacity(body.len() + 128);
        // basic.publish
        let mut args = vec![0, 0, 4];
        args.extend_from_slice(b"nova");
        args.push(rk.len() as u8);
        args.extend_from_slice(rk.as_bytes());
        args.push(0);
        amqp_frame(&mut amqp, 1, &[&[0, 60, 0, 40], &args]);
        // content header: expiration (an hour), then the body
        let mut head = vec![0, 60, 0, 0];
        head.extend_from_slice(&(body.len() as u64).to_be_bytes());
        head.extend_from_slice(&(1u16 << 8).to_be_bytes());
        head.push(7);
        head.extend_from_slice(b"3600000");
        amqp_frame(&mut amqp, 2, &[&head]);
        amqp_frame(&mut amqp, 3, &[body.as_bytes()]);
        let f = frame(40000 + c as u16, true, seq[c], 0x18, &amqp);
        seq[c] = seq[c].wrapping_add(amqp.len() as u32);
        let us = i * 10;
        record(&mut w, t0 + us / 1_000_000, (us % 1_000_000) as u32, &f)?;
    }
    w.flush()
}

fn amqp_frame(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.push(kind);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out.push(0xce);
}

/// Ethernet, IPv4 10.0.0.1 ↔ 10.0.0.9, TCP `port` ↔ 5672.
fn frame(port: u16, from_client: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
    let total = 40 + payload.len();
    let (src, dst) = if from_client {
        ([10, 0, 0, 1], [10, 0, 0, 9])
    } else {
        ([10, 0, 0, 9], [10, 0, 0, 1])
    };
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    let (sp, dp) = if from_client {
        (port, 5672)
    } else {
        (5672, port)
    };
    f.extend_from_slice(&sp.to_be_bytes());
    f.extend_from_slice(&dp.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

fn record(w: &mut impl Write, sec: u64, usec: u32, f: &[u8]) -> std::io::Result<()> {
    w.write_all(&(sec as u32).to_le_bytes())?;
    w.write_all(&usec.to_le_bytes())?;
    w.write_all(&(f.len() as u32).to_le_bytes())?;
    w.write_all(&(f.len() as u32).to_le_bytes())?;
    w.write_all(f)
}

/// Replays `file`, returning (RSS before, RSS after 100 k calls, RSS at the end, the run).
fn replay(file: &Path, cfg: Config) -> (u64, u64, u64, Run) {
    let mut run = Run::new(cfg, &Outputs::default()).expect("run");
    let mut files = MergedFiles::open(&[file.to_path_buf()]).expect("open the capture");
    let mut pkt = stacktap::source::Packet::default();
    let base = rss_bytes();
    let mut at_100k = 0;
    let mut n = 0u64;
    while files.next_into(&mut pkt).expect("read") {
        run.packet(&pkt.as_ref());
        n += 1;
        // 20 connections × 4 handshake packets, then one call a packet
        if n == 100_000 + 80 {
            at_100k = rss_bytes();
        }
    }
    run.refresh(true);
    let end = rss_bytes();
    (base, at_100k, end, run)
}

fn main() {
    let calls: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let file = dir.join(format!("open_calls-{calls}.pcap"));
    if !file.exists() {
        eprintln!("generating {} ({calls} calls)", file.display());
        generate(&file, calls).expect("write the capture");
    }
    // every call kept
    let mut cfg = Config::default();
    cfg.rpc.max_pending_calls = calls as usize + 1;
    cfg.rpc.call_max_age_s = 1e9;
    let (base, at_100k, end, run) = replay(&file, cfg);
    let open = run.sinks().metrics.registry.clone();
    drop(open);
    println!(
        "{calls} open calls, all kept: RSS per open call {:.0} bytes all in (after 100 k: {:.0})",
        (end - base) as f64 / calls as f64,
        (at_100k - base) as f64 / 100_000f64
    );
    drop(run);
    // the first run's memory back to the system before the second is measured: mimalloc
    // returns freed pages after a delay, and a fast second run reached its 100 k calls
    // with the first run's tables still counted in its RSS
    // SAFETY: a plain call into the allocator, with no pointer passed
    unsafe { libmimalloc_sys::mi_collect(true) };
    // small caps: flat once they are reached
    let mut cfg = Config::default();
    cfg.rpc.max_pending_calls = 20_000;
    cfg.rpc.max_recent_ids = 20_000;
    cfg.requests.max_open = 20_000;
    cfg.requests.max_trees = 5_000;
    let (_, at_100k, end, run) = replay(&file, cfg);
    let evicted: u64 = run.health().evictions.values().sum();
    println!(
        "{calls} calls under small caps (20 k pending, 20 k open requests): RSS {:.1} MiB after 100 k, {:.1} MiB at the end ({:+.1} %), {evicted} evictions counted",
        at_100k as f64 / (1 << 20) as f64,
        end as f64 / (1 << 20) as f64,
        (end as f64 / at_100k as f64 - 1.0) * 100.0
    );
}
