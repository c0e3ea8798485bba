//! Writes the seed corpora from real captures: `seeds OUT_DIR CAPTURE…`.
//!
//! * pcap_source: each capture's first 32 KiB, after a byte for the small block size;
//! * amqp_conn / http_conn: each connection's reassembled stream as chunk records (AMQP by
//!   its protocol header or a broker port, HTTP by a request line);
//! * tcp_reassembly: the same streams as in-order segments;
//! * oslo_scan: the message bodies the AMQP parser assembles from those streams.
//!
//! A crate apart from the targets: they link libFuzzer's runtime, a tool cannot.

/// The targets' input spellings, shared as source (their crate links libFuzzer).
#[path = "../../src/lib.rs"]
#[allow(dead_code)] // the targets use what the seeds do not
mod stacktap_fuzz;

use stacktap::amqp::AmqpConfig;
use stacktap::amqp::conn::{AmqpConnection, AmqpEvent, BodyBudget, ConnLimits};
use stacktap::decode::Decoded;
use stacktap::health::Health;
use stacktap::source::Packet;
use stacktap::source::file::PcapFile;
use stacktap::tcp::flows::{App, Dir, FlowConfig, FlowTable};
use stacktap::tcp::stream::Chunk;
use stacktap::time::Ts;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Seeds larger than this are cut: libFuzzer works best on small inputs.
const MAX_SEED: usize = 64 << 10;
/// Seeds kept per target and capture.
const MAX_PER_CAPTURE: usize = 40;

/// Records one connection's stream in the fuzz targets' spellings.
#[derive(Default)]
struct Recorder {
    chunks: Vec<u8>,
    segments: Vec<u8>,
    first: [Vec<u8>; 2],
}

#[derive(Default)]
struct Streams(Vec<Recorder>);

impl App for Recorder {
    type Out = Streams;
    fn on_chunk(&mut self, dir: Dir, _: Ts, chunk: Chunk<'_>, _: &mut Health, _: &mut Streams) {
        let Chunk::Data(d) = chunk else { return };
        if self.chunks.len() < MAX_SEED {
            stacktap_fuzz::push_chunks(&mut self.chunks, dir, d);
            stacktap_fuzz::push_segment(&mut self.segments, dir, d);
        }
        let first = &mut self.first[dir as usize];
        if first.len() < 16 {
            first.extend_from_slice(&d[..d.len().min(16 - first.len())]);
        }
    }
    fn on_close(&mut self, _: Ts, _: &mut Health, out: &mut Streams) {
        out.0.push(std::mem::take(self));
    }
}

fn streams(capture: &Path) -> Vec<Recorder> {
    let Ok(mut file) = PcapFile::open(capture) else {
        return Vec::new();
    };
    let mut table: FlowTable<Recorder> = FlowTable::new(FlowConfig::default());
    let (mut health, mut out) = (Health::default(), Streams::default());
    let mut pkt = Packet::default();
    while let Ok(true) = file.next_into(&mut pkt) {
        if let Decoded::Tcp(seg) = stacktap::decode::decode(pkt.linktype, &pkt.data) {
            table.segment(&seg, pkt.ts, &mut health, &mut out, |f| {
                Some((Recorder::default(), f.client, f.server))
            });
        }
    }
    table.close_all(Ts(u64::MAX / 2), &mut health, &mut out, &mut |_, _| {});
    out.0
}

fn is_amqp(r: &Recorder) -> bool {
    r.first[0].starts_with(b"AMQP") || r.first[0].first() == Some(&1)
}

fn is_http(r: &Recorder) -> bool {
    let m: &[&[u8]] = &[b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH "];
    m.iter().any(|m| r.first[0].starts_with(m)) || r.first[1].starts_with(b"HTTP/1.")
}

fn bodies(r: &Recorder) -> Vec<Vec<u8>> {
    let cfg = AmqpConfig::default();
    let ends = stacktap_fuzz::ends(5672);
    let budget = BodyBudget::new(cfg.max_held_bytes);
    let mut conn = AmqpConnection::new(ends, true, ConnLimits::of(&cfg), budget);
    let (mut health, mut out) = (Health::default(), Vec::new());
    for (dir, chunk) in stacktap_fuzz::chunks(&r.chunks) {
        conn.on_chunk(dir, Ts(0), chunk, &mut health, &mut out);
    }
    let exchange = |m: &stacktap::amqp::conn::Message| u8::from(&*m.exchange == "openstack");
    out.into_iter()
        .filter_map(|e| match e {
            AmqpEvent::Message(m) => Some([&[exchange(&m)][..], &m.body].concat()),
            _ => None,
        })
        .collect()
}

struct Corpus {
    dir: PathBuf,
    seen: HashSet<u64>,
}

impl Corpus {
    fn new(out: &Path, target: &str) -> Corpus {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        Corpus {
            dir,
            seen: HashSet::new(),
        }
    }

    /// Writes `seed` unless an identical one is there already.
    fn add(&mut self, seed: &[u8]) {
        let seed = &seed[..seed.len().min(MAX_SEED)];
        let h = seed.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        if self.seen.insert(h) {
            std::fs::write(self.dir.join(format!("seed-{h:016x}")), seed).expect("write a seed");
        }
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some((out, captures)) = args.split_first() else {
        eprintln!("usage: seeds OUT_DIR CAPTURE...");
        std::process::exit(2);
    };
    let corpus = |t| Corpus::new(out, t);
    let (mut pcap, mut amqp, mut http, mut tcp, mut oslo) = (
        corpus("pcap_source"),
        corpus("amqp_conn"),
        corpus("http_conn"),
        corpus("tcp_reassembly"),
        corpus("oslo_scan"),
    );
    for capture in captures {
        let bytes = std::fs::read(capture).unwrap_or_default();
        // byte 0: the size of the small blocks the file is also read through (varied)
        let small = (bytes.len() % 256) as u8;
        pcap.add(&[&[small][..], &bytes[..bytes.len().min(32 << 10)]].concat());
        let streams = streams(capture);
        for r in streams.iter().filter(|r| is_amqp(r)).take(MAX_PER_CAPTURE) {
            // byte 0: the protocol header was seen
            amqp.add(&[&[1u8][..], &r.chunks].concat());
            tcp.add(&[&[0u8][..], &r.segments].concat());
            for body in bodies(r).into_iter().take(MAX_PER_CAPTURE) {
                oslo.add(&body);
            }
        }
        for r in streams.iter().filter(|r| is_http(r)).take(MAX_PER_CAPTURE) {
            http.add(&[&[0u8][..], &r.chunks].concat());
            tcp.add(&[&[0u8][..], &r.segments].concat());
        }
    }
    for c in [&pcap, &amqp, &http, &tcp, &oslo] {
        println!("{}: {} seeds", c.dir.display(), c.seen.len());
    }
}
