//! Packet sources: capture files (pcap, pcapng; several merged in time order) and live
//! libpcap. A source is the only place the wall clock may enter (idle ticks in live mode).

pub mod blocks;
pub mod file;
pub mod live;

use crate::time::Ts;

/// Link-layer types we decode (values from the tcpdump LINKTYPE registry).
pub mod linktype {
    pub const NULL: i32 = 0;
    pub const ETHERNET: i32 = 1;
    pub const RAW: i32 = 101;
    pub const LOOP: i32 = 108;
    pub const LINUX_SLL: i32 = 113;
    pub const IPV4: i32 = 228;
    pub const IPV6: i32 = 229;
    pub const LINUX_SLL2: i32 = 276;
}

/// What a source counted of its own trouble, since it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceStats {
    /// Packets the kernel or the interface dropped (live capture).
    pub kernel_drops: u64,
    pub if_drops: u64,
    /// Steps of the host's clock corrected (live capture).
    pub clock_steps: u64,
    /// Damaged stretches of capture files skipped (or that ended a file).
    pub damaged_records: u64,
}

/// `[capture]`: reading packets.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// A packet stamped this much later than the packets before it is a clock jump
    /// (a corrupt record, a clock stepped on the capture host) unless the packets after it
    /// agree: it does not move the packet clock on its own.
    pub max_clock_jump_s: f64,
    /// How many packets in a row must agree with a jump for it to be real time passing
    /// (a quiet link in a replayed capture).
    pub clock_jump_confirm_packets: usize,
    /// The kernel's capture ring for `capture`, in MiB.
    pub buffer_mb: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            max_clock_jump_s: 30.0,
            clock_jump_confirm_packets: 8,
            buffer_mb: 64,
        }
    }
}

/// One captured frame, owned: kept past its read (the head of each file being merged, a
/// packet the clock holds back, a test's list).
#[derive(Debug, Default, Clone)]
pub struct Packet {
    pub ts: Ts,
    pub linktype: i32,
    pub data: Vec<u8>,
    pub orig_len: u32,
}

/// One captured frame as the pipeline reads it, borrowed from where the source keeps it
/// (a file's block as read, libpcap's ring): a replay copies no packet on its way in.
#[derive(Debug, Clone, Copy)]
pub struct PacketRef<'a> {
    pub ts: Ts,
    pub linktype: i32,
    pub data: &'a [u8],
    pub orig_len: u32,
    /// The file's block `data` lies in, when it does: a shard on another thread can
    /// hold it and read the packet there, not from a copy.
    pub window: Option<&'a blocks::Window>,
}

impl Packet {
    /// `p`, copied into this packet's buffer (reused, not reallocated).
    pub fn copy_from(&mut self, p: PacketRef<'_>) {
        self.ts = p.ts;
        self.linktype = p.linktype;
        self.orig_len = p.orig_len;
        self.data.clear();
        self.data.extend_from_slice(p.data);
    }

    pub fn as_ref(&self) -> PacketRef<'_> {
        PacketRef {
            ts: self.ts,
            linktype: self.linktype,
            data: &self.data,
            orig_len: self.orig_len,
            window: None,
        }
    }
}

impl PacketRef<'_> {
    pub fn to_owned(&self) -> Packet {
        let mut owned = Packet::default();
        owned.copy_from(*self);
        owned
    }
}
