//! Packet sources: capture files (pcap, pcapng; several merged in time order) and live
//! libpcap. A source is the only place the wall clock may enter (idle ticks in live mode).

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

/// One captured frame, owned so that several files can be merged.
#[derive(Debug, Default, Clone)]
pub struct Packet {
    pub ts: Ts,
    pub linktype: i32,
    pub data: Vec<u8>,
    pub orig_len: u32,
}
