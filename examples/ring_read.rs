//! What reading the kernel's capture ring costs, one ring against a flow fanout:
//!
//!   cargo run --release --example ring_read -- [--rings N] [--seconds S] [--iface lo]
//!
//! The question behind `stacktap capture`'s design: one ring read by one thread that hands
//! the packets to the workers, or N rings in a `PACKET_FANOUT_HASH` group (the kernel
//! spreads the flows, every packet of a connection to the same ring) each read by its own
//! worker. With `--rings 1` one thread reads the ring and copies every packet into chunks
//! of 1,024 (what stacktap's reader does to hand them on); with `--rings N` N threads each
//! read their ring in place (what a worker reading its own ring would do). Both open the
//! ring as `stacktap capture` does (`source::live::open_ring`, the default filter and ring
//! size). It prints the
//! CPU time of the reading threads per packet, the packets each ring got and the kernel's
//! drops. Run it while traffic flows: `scripts/ring-cost FILE [PPS]` puts a recorded
//! capture back on lo (moved off-host, as `scripts/live-cost --wire` does) while it runs
//! each way in turn.
//!
//! Needs root.

use stacktap::source::live;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const CHUNK: usize = 1024;

struct Args {
    rings: usize,
    seconds: u64,
    iface: String,
}

fn args() -> Args {
    let mut a = Args {
        rings: 1,
        seconds: 10,
        iface: "lo".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} wants a value"));
        match flag.as_str() {
            "--rings" => a.rings = value.parse::<usize>().expect("--rings N").max(1),
            "--seconds" => a.seconds = value.parse().expect("--seconds S"),
            "--iface" => a.iface = value,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// A ring on `iface` as `stacktap capture` opens one (its default filter and ring size),
/// joined to fanout group `group` when there are several.
fn open(iface: &str, group: Option<u16>) -> pcap::Capture<pcap::Active> {
    let ring_mb = stacktap::source::CaptureConfig::default().buffer_mb;
    let cap = live::open_ring(iface, live::DEFAULT_FILTER, ring_mb).expect("open the capture");
    if let Some(group) = group {
        // the group id in the low half, the mode (a hash of the flow, the same both ways)
        // in the high half
        let how = i32::from(group) | ((libc::PACKET_FANOUT_HASH as i32) << 16);
        live::set_packet_option(&cap, libc::PACKET_FANOUT, how).expect("PACKET_FANOUT");
    }
    cap
}

/// This thread's CPU time so far (user + system), in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

struct Read {
    packets: u64,
    bytes: u64,
    cpu_s: f64,
    drops: u32,
}

/// Reads `cap` until `stop`; copies each packet into a chunk when `copy`.
fn read(mut cap: pcap::Capture<pcap::Active>, copy: bool, stop: &AtomicBool) -> Read {
    let start = thread_cpu();
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK * 1600);
    let mut in_chunk = 0;
    while !stop.load(Ordering::Relaxed) {
        match cap.next_packet() {
            Ok(p) => {
                packets += 1;
                bytes += p.data.len() as u64;
                if copy {
                    chunk.extend_from_slice(p.data);
                    in_chunk += 1;
                    if in_chunk == CHUNK {
                        std::hint::black_box(&chunk);
                        chunk.clear();
                        in_chunk = 0;
                    }
                } else {
                    std::hint::black_box(p.data);
                }
            }
            Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    let drops = cap.stats().map(|s| s.dropped).unwrap_or(0);
    Read {
        packets,
        bytes,
        cpu_s: thread_cpu() - start,
        drops,
    }
}

fn main() {
    let a = args();
    let stop = Arc::new(AtomicBool::new(false));
    let group = (a.rings > 1).then_some(std::process::id() as u16);
    let mut caps: Vec<_> = (0..a.rings).map(|_| open(&a.iface, group)).collect();
    let began = Instant::now();
    // libpcap keeps polling an idle ring inside its read: each is interrupted at the end
    let breakers: Vec<_> = caps.iter_mut().map(|c| c.breakloop_handle()).collect();
    let readers: Vec<_> = caps
        .into_iter()
        .map(|cap| {
            let stop = stop.clone();
            let copy = a.rings == 1;
            std::thread::spawn(move || read(cap, copy, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.seconds));
    stop.store(true, Ordering::Relaxed);
    while !readers.iter().all(|r| r.is_finished()) {
        breakers.iter().for_each(|b| b.breakloop());
        std::thread::sleep(Duration::from_millis(50));
    }
    let reads: Vec<Read> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    let wall = began.elapsed().as_secs_f64();
    let packets: u64 = reads.iter().map(|r| r.packets).sum();
    let bytes: u64 = reads.iter().map(|r| r.bytes).sum();
    let cpu: f64 = reads.iter().map(|r| r.cpu_s).sum();
    let drops: u32 = reads.iter().map(|r| r.drops).sum();
    let per_ring: Vec<String> = reads.iter().map(|r| r.packets.to_string()).collect();
    println!(
        "rings {}: {} packets ({} MB; per ring {}) in {:.1} s, kernel drops {}; \
         reading threads' CPU {:.1} ms, {:.0} ns per packet",
        a.rings,
        packets,
        bytes / 1_000_000,
        per_ring.join(" / "),
        wall,
        drops,
        cpu * 1e3,
        if packets > 0 {
            cpu * 1e9 / packets as f64
        } else {
            0.0
        }
    );
}
