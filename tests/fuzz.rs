//! Mutation fuzzing of the whole pipeline, from the packet up: real captures with bytes
//! flipped, packets cut, dropped, duplicated and reordered. Nothing may panic, and the
//! damage shows up as counted anomalies, not as invented calls.

mod common;
use common::repo;
use proptest::prelude::*;
use stacktap::config::Config;
use stacktap::pipeline::Pipeline;
use stacktap::source::Packet;
use stacktap::source::file::MergedFiles;
use std::sync::OnceLock;

fn packets() -> &'static Vec<Packet> {
    static P: OnceLock<Vec<Packet>> = OnceLock::new();
    P.get_or_init(|| {
        let files = ["remote_error", "slow_server", "rest", "failures"]
            .map(|s| repo().join(format!("sampledata/{s}.pcap")));
        let mut m = MergedFiles::open(&files).unwrap();
        let mut out = Vec::new();
        let mut p = Packet::default();
        while m.next_into(&mut p).unwrap() {
            out.push(p.clone());
        }
        out
    })
}

fn run(pkts: &[Packet]) -> (u64, u64) {
    let mut pl = Pipeline::new(Config::default());
    let mut events = 0u64;
    for p in pkts {
        pl.packet(&p.as_ref(), &mut |s| {
            events += matches!(s, stacktap::correlate::Signal::Event(_)) as u64
        });
    }
    pl.finish(&mut |s| events += matches!(s, stacktap::correlate::Signal::Event(_)) as u64);
    // retransmits are the network's doing, seen in real loopback captures too
    let retransmits = pl.health().anomaly_count("tcp", "retransmit");
    (events, pl.health().total_anomalies() - retransmits)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn mutated_captures_never_panic(
        seed in any::<u64>(),
        flips in 0usize..200,
        drop_every in 2usize..50,
        cut_every in 2usize..50,
        swap_every in 2usize..50,
    ) {
        let mut pkts = packets().clone();
        let mut x = seed | 1;
        let mut rnd = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        for _ in 0..flips {
            let i = rnd() as usize % pkts.len();
            let d = &mut pkts[i].data;
            if !d.is_empty() {
                let j = rnd() as usize % d.len();
                d[j] ^= (rnd() as u8) | 1;
            }
        }
        for (i, p) in pkts.iter_mut().enumerate() {
            if i % cut_every == 0 {
                let keep = rnd() as usize % (p.data.len() + 1);
                p.data.truncate(keep);
            }
        }
        let mut out: Vec<Packet> = Vec::new();
        for (i, p) in pkts.into_iter().enumerate() {
            if i % drop_every == 0 { continue; }
            if i % swap_every == 0 && !out.is_empty() {
                let last = out.pop().unwrap();
                out.push(p.clone());
                out.push(last);
            } else {
                out.push(p);
            }
        }
        let _ = run(&out);
    }

    #[test]
    fn random_bytes_on_an_amqp_port_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..40)) {
        let mut pkts = Vec::new();
        let mut seq = 1000u32;
        for (i, c) in chunks.iter().enumerate() {
            let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 5672, seq, 65535).ack(1);
            let mut data = Vec::new();
            b.write(&mut data, c).unwrap();
            seq = seq.wrapping_add(c.len() as u32);
            pkts.push(Packet { ts: stacktap::time::Ts(i as u64 * 1000), linktype: 101, orig_len: data.len() as u32, data });
        }
        let (events, _) = run(&pkts);
        prop_assert_eq!(events, 0, "random bytes produced an RPC event");
    }

    #[test]
    fn random_bytes_on_an_api_port_never_panic_nor_pair(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..40),
        from_server in proptest::collection::vec(any::<bool>(), 40),
    ) {
        // both directions of a nova-api connection carry noise: no request line ever
        // starts, so no exchange may be reported
        let mut pkts = Vec::new();
        let (mut c_seq, mut s_seq) = (1000u32, 9000u32);
        for (i, c) in chunks.iter().enumerate() {
            let b = if from_server[i] {
                let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
                    .tcp(8774, 40000, s_seq, 65535).ack(c_seq);
                s_seq = s_seq.wrapping_add(c.len() as u32);
                b
            } else {
                let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                    .tcp(40000, 8774, c_seq, 65535).ack(s_seq);
                c_seq = c_seq.wrapping_add(c.len() as u32);
                b
            };
            let mut data = Vec::new();
            b.write(&mut data, c).unwrap();
            pkts.push(Packet { ts: stacktap::time::Ts(i as u64 * 1000), linktype: 101, orig_len: data.len() as u32, data });
        }
        let plausible = chunks.iter().any(|c| c.windows(4).any(|w| w.iter().all(u8::is_ascii_uppercase)));
        let (events, _) = run(&pkts);
        prop_assert!(events == 0 || plausible, "noise produced an HTTP exchange");
    }
}

#[test]
fn unmutated_captures_have_no_anomalies() {
    let (events, anomalies) = run(packets());
    assert!(events > 50);
    assert_eq!(anomalies, 0);
}
