//! Live capture with libpcap (the `pcap` crate).
//!
//! libpcap (1.10, TPACKET_V3) keeps polling inside `pcap_next_ex` while the interface is
//! idle, so a read may never return on a quiet link. A waker thread therefore calls
//! `pcap_breakloop` whenever no packet was read for `IDLE_MS`: the read returns, and the
//! quiet interval becomes an idle tick (the only place the wall clock enters the pipeline:
//! timeouts still fire) and a chance to notice SIGINT/SIGTERM.

use super::Packet;
use crate::time::Ts;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// AMQP plus the OpenStack API ports of the reference (keystone, nova, placement and
/// kolla's placement, neutron, glance, cinder, heat, designate, octavia, swift, barbican,
/// ironic).
pub const DEFAULT_FILTER: &str = "tcp and (port 5672 or port 5000 or port 8774 or port 8778 or port 8780 \
     or port 9696 or port 9292 or port 8776 or port 8004 or port 9001 or port 9876 or port 8080 \
     or port 9311 or port 6385)";

/// A read with no packet for this long is interrupted and reported as idle.
const IDLE_MS: u64 = 200;

pub struct LiveCapture {
    cap: pcap::Capture<pcap::Active>,
    linktype: i32,
    /// Bumped on every packet; the waker interrupts the read when it stops moving.
    reads: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
}

pub enum LiveRead {
    Packet,
    Idle(Ts),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LiveStats {
    pub kernel_drops: u64,
    pub if_drops: u64,
}

pub fn wall_clock() -> Ts {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ts::from_parts(d.as_secs(), d.subsec_nanos() as u64)
}

impl LiveCapture {
    pub fn open(iface: &str, filter: &str) -> anyhow::Result<LiveCapture> {
        let mut cap = pcap::Capture::from_device(iface)
            .and_then(|c| {
                c.promisc(false)
                    .snaplen(262_144)
                    .timeout(IDLE_MS as i32)
                    .immediate_mode(true)
                    .buffer_size(32 << 20)
                    .open()
            })
            .map_err(|e| anyhow::anyhow!("-i {iface}: cannot capture: {e}"))?;
        cap.filter(filter, true)
            .map_err(|e| anyhow::anyhow!("--filter {filter:?}: {e}"))?;
        let linktype = cap.get_datalink().0;
        if !super::file::is_supported_linktype(linktype) {
            anyhow::bail!("-i {iface}: link type {linktype} is not supported");
        }
        let reads = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let breaker = cap.breakloop_handle();
        let (r, c) = (reads.clone(), closed.clone());
        std::thread::Builder::new()
            .name("pcap-waker".into())
            .spawn(move || {
                let mut last = u64::MAX;
                while !c.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(IDLE_MS));
                    let now = r.load(Ordering::Relaxed);
                    if now == last {
                        breaker.breakloop();
                    }
                    last = now;
                }
            })?;
        Ok(LiveCapture {
            cap,
            linktype,
            reads,
            closed,
        })
    }

    /// The next packet, or an idle tick after about IDLE_MS without one.
    pub fn read(&mut self, pkt: &mut Packet) -> anyhow::Result<LiveRead> {
        match self.cap.next_packet() {
            Ok(p) => {
                let ts = p.header.ts;
                pkt.ts = Ts::from_parts(ts.tv_sec.max(0) as u64, (ts.tv_usec.max(0) as u64) * 1000);
                pkt.linktype = self.linktype;
                pkt.orig_len = p.header.len;
                pkt.data.clear();
                pkt.data.extend_from_slice(p.data);
                self.reads.fetch_add(1, Ordering::Relaxed);
                Ok(LiveRead::Packet)
            }
            // a timeout, or our waker's pcap_breakloop (reported as "no more packets")
            Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                Ok(LiveRead::Idle(wall_clock()))
            }
            Err(e) => Err(anyhow::anyhow!("capture failed: {e}")),
        }
    }

    pub fn stats(&mut self) -> LiveStats {
        match self.cap.stats() {
            Ok(s) => LiveStats {
                kernel_drops: s.dropped as u64,
                if_drops: s.if_dropped as u64,
            },
            Err(_) => LiveStats::default(),
        }
    }
}

impl Drop for LiveCapture {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}
