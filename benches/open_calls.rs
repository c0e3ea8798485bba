//! Memory per open call: a flood of calls that never get a reply, fed straight to the
//! analyser as a collector gets them (publishes seen, nothing else), with RSS read from
//! /proc/self/statm after 100 k and after 1 M (or STACKTAP_OPEN_CALLS) calls.
//!
//!   cargo bench --bench open_calls
//!
//! Reported, never asserted (no timed or sized assertion in a bench).

use stacktap::analyser::Analyser;
use stacktap::config::Config;
use stacktap::contract::{
    AmqpKind, AmqpMessage, ConnId, Endpoint, Obs, Observation, Oslo, Request, RpcType,
};
use stacktap::time::Ts;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split(' ')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn call(i: u64) -> Observation {
    let conn = ConnId {
        client: Endpoint {
            ip: "10.0.0.1".parse().unwrap(),
            port: 40000 + (i % 20) as u16,
        },
        server: Endpoint {
            ip: "10.0.0.9".parse().unwrap(),
            port: 5672,
        },
    };
    let req = Request {
        rpc_type: RpcType::Call,
        method: "get_console_output".into(),
        namespace: None,
        version: Some("6.0".into()),
        msg_id: Some(format!("{:032x}", i * 7919 + 1)),
        reply_q: Some("reply_290096a378764630a92d2701b519157d".into()),
        unique_id: Some(format!("{:032x}", i * 104729 + 3)),
        request_id: Some(format!("req-{:08x}-0000-4000-8000-{:012x}", i, i)),
        global_request_id: None,
        call_monitor_s: None,
        trace_context: None,
    };
    Observation {
        t: Ts(1_700_000_000_000_000_000 + i * 10_000),
        what: Obs::AmqpMessage(Box::new(AmqpMessage {
            conn,
            kind: AmqpKind::Publish { mandatory: false },
            exchange: "nova".into(),
            routing_key: format!("compute.host{}", i % 500),
            queue: None,
            expiration: Some("3600000".into()),
            stream_offset: None,
            delivery_count: None,
            oslo: Arc::new(Ok(Oslo::Request(req))),
        })),
    }
}

fn main() {
    let total: u64 = std::env::var("STACKTAP_OPEN_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut cfg = Config::default();
    cfg.rpc.max_pending_calls = total as usize + 1;
    cfg.requests.max_open = total as usize + 1;
    let mut a = Analyser::new(cfg);
    let base = rss_bytes();
    let mut at_100k = 0;
    for i in 0..total {
        a.observe(call(i));
        if i % 1024 == 0 {
            a.flush(&mut |_| {});
        }
        if i + 1 == 100_000 {
            at_100k = rss_bytes();
        }
    }
    a.flush(&mut |_| {});
    let end = rss_bytes();
    println!(
        "open calls: {total}; RSS per open call {:.0} bytes (100 k: {:.0} bytes each)",
        (end - base) as f64 / total as f64,
        (at_100k - base) as f64 / 100_000f64
    );
}
