//! Live capture with libpcap (the `pcap` crate).
//!
//! libpcap (1.10, TPACKET_V3) keeps polling inside `pcap_next_ex` while the interface is
//! idle, so a read may never return on a quiet link. A waker thread therefore calls
//! `pcap_breakloop` whenever no packet was read for `IDLE_MS`: the read returns, and the
//! quiet interval becomes an idle tick (the only place the wall clock enters the pipeline:
//! timeouts still fire) and a chance to notice SIGINT/SIGTERM.
//!
//! Not in immediate mode: the kernel hands over a block of packets when it is full or
//! `IDLE_MS` after its first packet, not each packet as it comes. Waking per packet cost
//! a context switch every other packet and ~3x the CPU under load (perf stat: 20k
//! switches for 40k packets); packets keep their kernel stamps, so only the delivery waits.
//!
//! So the ring may still hold packets stamped before a read that found it empty: an idle
//! tick is dated `DELIVERY_LAG_MS` back, and a tick after a packet at that packet's stamp
//! (more may wait behind it). A tick dated later would move the packet clock past
//! packets not yet read: in one process they would be processed out of order; in a fleet
//! the collector would judge calls before their publish arrived.
//!
//! The kernel stamps packets with the host's real-time clock, which NTP may step. Between
//! reads the monotonic clock says how much time really passed; a packet stamped more
//! than `capture.max_clock_jump_s` away from that is a step, and every later stamp is
//! corrected by it (counted: `stacktap_parse_anomalies_total{protocol="capture",
//! kind="clock_step"}`), so a stepped clock never reads as hours of silence.

use super::{PacketRef, SourceStats};
use crate::time::Ts;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// AMQP plus the OpenStack API ports of the reference (keystone, nova, placement and
/// kolla's placement, neutron, glance, cinder, heat, designate, octavia, swift, barbican,
/// ironic).
pub const DEFAULT_FILTER: &str = "tcp and (port 5672 or port 5000 or port 8774 or port 8778 or port 8780 \
     or port 9696 or port 9292 or port 8776 or port 8004 or port 9001 or port 9876 or port 8080 \
     or port 9311 or port 6385)";

/// A read with no packet for this long is interrupted and reported as idle.
const IDLE_MS: u64 = 200;

/// How long a captured packet may wait in the kernel's ring before a read can get it: the
/// block timer retires a block within two of its periods (`IDLE_MS`), and the waker takes
/// up to one more to notice the ring is empty.
const DELIVERY_LAG_MS: u64 = 3 * IDLE_MS;

pub struct LiveCapture {
    cap: pcap::Capture<pcap::Active>,
    linktype: i32,
    /// Bumped on every packet; the waker interrupts the read when it stops moving.
    reads: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    steps: ClockSteps,
    /// When the last read returned (monotonic): one clock read per packet serves the
    /// step check and the caller's timers.
    last_read: Instant,
    /// The time before which every packet has been read, as far as the ring tells.
    settled: Ts,
}

/// Corrects real-time stamps by the steps the monotonic clock reveals.
struct ClockSteps {
    max_jump_ns: u64,
    /// The last stamp handed out (corrected) and when (monotonic).
    anchor: Option<(Instant, Ts)>,
    correction_ns: i64,
    steps: u64,
}

impl ClockSteps {
    fn new(max_jump_s: f64) -> ClockSteps {
        ClockSteps {
            max_jump_ns: crate::time::secs_to_ns(max_jump_s),
            anchor: None,
            correction_ns: 0,
            steps: 0,
        }
    }

    fn shifted(t: Ts, by: i64) -> Ts {
        Ts((t.0 as i64).saturating_add(by).max(0) as u64)
    }

    /// Where the monotonic clock says real time was at `now` (None before the first
    /// stamp).
    fn expected(&self, now: Instant) -> Option<Ts> {
        let (at, t) = self.anchor?;
        let passed = now.saturating_duration_since(at).as_nanos() as u64;
        Some(Ts(t.0.saturating_add(passed)))
    }

    /// A packet's stamp, corrected; `now`: when it was read (monotonic).
    fn stamp(&mut self, raw: Ts, now: Instant) -> Ts {
        let mut t = Self::shifted(raw, self.correction_ns);
        if let Some(expected) = self.expected(now)
            && t.0.abs_diff(expected.0) > self.max_jump_ns
        {
            self.correction_ns += expected.0 as i64 - t.0 as i64;
            self.steps += 1;
            tracing::warn!(
                "the capture clock stepped by {:.3} s; later packets are corrected by it",
                (t.0 as f64 - expected.0 as f64) / 1e9
            );
            t = expected;
        }
        self.anchor = Some((now, t));
        t
    }

    /// Now, on the corrected clock.
    fn now(&self) -> Ts {
        self.expected(Instant::now())
            .unwrap_or_else(|| Self::shifted(wall_clock(), self.correction_ns))
    }
}

pub enum LiveRead<'a> {
    /// A packet, valid until the next read.
    Packet(PacketRef<'a>),
    Idle(Ts),
}

pub fn wall_clock() -> Ts {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ts::from_parts(d.as_secs(), d.subsec_nanos() as u64)
}

/// The kernel's ring on `iface` with stacktap's capture settings (not immediate, `buffer_mb`
/// MiB, `filter`, sent copies skipped on loopback). `LiveCapture` reads one; the ring-cost
/// measurement (`examples/ring_read`) opens the same to compare it with a fanout.
pub fn open_ring(
    iface: &str,
    filter: &str,
    buffer_mb: usize,
) -> anyhow::Result<pcap::Capture<pcap::Active>> {
    let mut cap = pcap::Capture::from_device(iface)
        .and_then(|c| {
            c.promisc(false)
                .snaplen(262_144)
                .timeout(IDLE_MS as i32)
                .immediate_mode(false)
                .buffer_size(i32::try_from(buffer_mb << 20).unwrap_or(i32::MAX))
                .open()
        })
        .map_err(|e| {
            let e = e.to_string();
            let denied = ["Operation not permitted", "ermission denied", "permission"]
                .iter()
                .any(|m| e.contains(m));
            let hint = if denied {
                " (capturing needs CAP_NET_RAW and CAP_NET_ADMIN: run as root, or give \
                 the binary both, e.g. setcap cap_net_raw,cap_net_admin=eip, or the \
                 service AmbientCapabilities=CAP_NET_RAW CAP_NET_ADMIN)"
            } else {
                ""
            };
            anyhow::anyhow!("-i {iface}: cannot capture: {e}{hint}")
        })?;
    cap.filter(filter, true)
        .map_err(|e| anyhow::anyhow!("--filter {filter:?}: {e}"))?;
    if is_loopback(iface) {
        ignore_outgoing(&cap);
    }
    Ok(cap)
}

impl LiveCapture {
    pub fn open(
        iface: &str,
        filter: &str,
        cfg: &super::CaptureConfig,
    ) -> anyhow::Result<LiveCapture> {
        let mut cap = open_ring(iface, filter, cfg.buffer_mb)?;
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
            steps: ClockSteps::new(cfg.max_clock_jump_s),
            last_read: Instant::now(),
            settled: Ts::ZERO,
        })
    }

    /// The next packet, or an idle tick after about IDLE_MS without one.
    pub fn read(&mut self) -> anyhow::Result<LiveRead<'_>> {
        let got = self.cap.next_packet();
        self.last_read = Instant::now();
        match got {
            Ok(p) => {
                let ts = p.header.ts;
                let raw =
                    Ts::from_parts(ts.tv_sec.max(0) as u64, (ts.tv_usec.max(0) as u64) * 1000);
                let ts = self.steps.stamp(raw, self.last_read);
                self.settled = self.settled.max(ts);
                self.reads.fetch_add(1, Ordering::Relaxed);
                // read where libpcap keeps it, until the next read
                Ok(LiveRead::Packet(PacketRef {
                    ts,
                    linktype: self.linktype,
                    data: p.data,
                    orig_len: p.header.len,
                    window: None,
                }))
            }
            // a timeout, or our waker's pcap_breakloop (reported as "no more packets")
            Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let lag = DELIVERY_LAG_MS * 1_000_000;
                let quiet_since = Ts(self.steps.now().0.saturating_sub(lag));
                self.settled = self.settled.max(quiet_since);
                Ok(LiveRead::Idle(self.settled))
            }
            Err(e) => Err(anyhow::anyhow!("capture failed: {e}")),
        }
    }

    pub fn stats(&mut self) -> SourceStats {
        let (kernel_drops, if_drops) = match self.cap.stats() {
            Ok(s) => (s.dropped as u64, s.if_dropped as u64),
            Err(_) => (0, 0),
        };
        SourceStats {
            kernel_drops,
            if_drops,
            clock_steps: self.steps.steps,
            damaged_records: 0,
        }
    }

    /// When the last read returned (monotonic).
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// The time every packet before has been read by: the last packet's stamp after a
    /// packet, the wall clock less the ring's delivery lag after an empty read. The packet
    /// clock may be moved on to it without passing a packet still to come.
    pub fn settled(&self) -> Ts {
        self.settled
    }
}

/// The interface is a loopback one (by its flags; `lo` if the list cannot be read).
fn is_loopback(iface: &str) -> bool {
    match pcap::Device::list() {
        Ok(devices) => devices
            .iter()
            .any(|d| d.name == iface && d.flags.is_loopback()),
        Err(_) => iface == "lo",
    }
}

/// On a loopback interface every packet passes the tap twice, sent and received, and
/// libpcap throws the sent copy away after the kernel has filtered it and copied it into
/// the ring. Asking the kernel not to hand over sent packets (PACKET_IGNORE_OUTGOING,
/// Linux 4.20) keeps the same packets at half the copying. Only on loopback: on a real
/// interface the sent copy is the only one. Older kernels refuse it: nothing changes.
fn ignore_outgoing(cap: &pcap::Capture<pcap::Active>) {
    if let Err(e) = set_packet_option(cap, libc::PACKET_IGNORE_OUTGOING, 1) {
        tracing::debug!("PACKET_IGNORE_OUTGOING: {e}; loopback packets are copied twice");
    }
}

/// Sets an int option of the ring's packet socket (`SOL_PACKET`).
pub fn set_packet_option(
    cap: &pcap::Capture<pcap::Active>,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid socket descriptor libpcap owns, and an int option of the right size
    let rc = unsafe {
        libc::setsockopt(
            cap.as_raw_fd(),
            libc::SOL_PACKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for LiveCapture {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Ts {
        Ts((s * 1e9) as u64)
    }

    #[test]
    fn stamps_that_keep_pace_with_the_monotonic_clock_are_left_alone() {
        let mut c = ClockSteps::new(30.0);
        let t0 = Instant::now();
        for i in 0..100 {
            let at = t0 + Duration::from_millis(i * 500);
            let raw = secs(1000.0 + i as f64 * 0.5);
            assert_eq!(c.stamp(raw, at), raw);
        }
        assert_eq!(c.steps, 0);
    }

    #[test]
    fn a_stepped_clock_is_corrected_from_the_step_on() {
        let mut c = ClockSteps::new(30.0);
        let t0 = Instant::now();
        assert_eq!(c.stamp(secs(1000.0), t0), secs(1000.0));
        // NTP steps the clock an hour ahead one second later
        let at = t0 + Duration::from_secs(1);
        assert_eq!(c.stamp(secs(4601.0), at), secs(1001.0));
        assert_eq!(c.steps, 1);
        // later packets keep the correction, and a quiet 20 s is not a step
        let later = at + Duration::from_secs(20);
        assert_eq!(c.stamp(secs(4621.0), later), secs(1021.0));
        assert_eq!(c.steps, 1);
        // a read that returns before the last anchor (reordered instants) passes no time
        assert_eq!(c.stamp(secs(4621.5), at), secs(1021.5));
    }
}
