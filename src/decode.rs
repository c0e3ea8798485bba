//! L2–L4 decoding with `etherparse`: link layer → IPv4/IPv6 → TCP segment.
//! Link types etherparse does not know (BSD null/loop, Linux SLL2) are unwrapped here.

use crate::source::linktype;
use etherparse::{
    EtherType, IpNumber, Ipv4Slice, NetSlice, SlicedPacket, TcpSlice, TransportSlice,
};
use std::net::IpAddr;

pub use crate::contract::Endpoint;

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

#[derive(Debug)]
pub struct TcpSegment<'a> {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: &'a [u8],
}

#[derive(Debug)]
pub enum Decoded<'a> {
    Tcp(TcpSegment<'a>),
    /// Valid, but not TCP (UDP, ICMP, ARP, …): not our business.
    NotTcp,
    /// An IP fragment; we do not reassemble IP fragments (OpenStack traffic has DF set).
    Fragment,
    UnsupportedLinktype,
    Malformed(&'static str),
}

pub fn decode(lt: i32, data: &[u8]) -> Decoded<'_> {
    if let Some(d) = ipv4_start(lt, data).and_then(ipv4_tcp) {
        return d;
    }
    sliced(lt, data)
}

/// The two ends of an IPv4 TCP packet read straight from the headers, nothing checked
/// beyond what locating them needs: for choosing a packet's shard, where a whole decode
/// would be done twice (the shard decodes it again). None for anything else. Where
/// `decode` reads a packet as TCP it finds the same ends, so a connection's packets meet
/// in one shard; a packet it rejects (a fragment, a damaged header) may go to any shard,
/// which counts it as before.
pub fn ipv4_tcp_ends(lt: i32, data: &[u8]) -> Option<(Endpoint, Endpoint)> {
    let ip = ipv4_start(lt, data)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 6 {
        return None;
    }
    let addr = |at: usize| -> Option<IpAddr> {
        let b: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
        Some(IpAddr::from(b))
    };
    let port = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(ip.get(at..at + 2)?.try_into().ok()?))
    };
    let src = Endpoint {
        ip: addr(12)?,
        port: port(ihl)?,
    };
    let dst = Endpoint {
        ip: addr(16)?,
        port: port(ihl + 2)?,
    };
    Some((src, dst))
}

/// Where the IPv4 header starts, when the link layer says the packet is IPv4.
fn ipv4_start(lt: i32, data: &[u8]) -> Option<&[u8]> {
    const IPV4: [u8; 2] = [0x08, 0x00];
    match lt {
        linktype::ETHERNET if data.get(12..14)? == IPV4 => data.get(14..),
        linktype::LINUX_SLL if data.get(14..16)? == IPV4 => data.get(16..),
        linktype::LINUX_SLL2 if data.get(..2)? == IPV4 => data.get(20..),
        linktype::RAW | linktype::IPV4 => Some(data),
        linktype::NULL | linktype::LOOP
            if [[2, 0, 0, 0], [0, 0, 0, 2]].contains(data.get(..4)?.try_into().ok()?) =>
        {
            data.get(4..)
        }
        _ => None,
    }
}

/// The common case (IPv4 carrying TCP), read with etherparse's IPv4 and TCP slicers
/// directly: a whole-packet slice walks the link layer and every transport generically,
/// and costs twice as much on the path every packet takes. Anything else, a fault
/// included, is None and goes the general way (`sliced`), which names it.
fn ipv4_tcp(ip: &[u8]) -> Option<Decoded<'_>> {
    let v4 = Ipv4Slice::from_slice(ip).ok()?;
    if v4.is_payload_fragmented() {
        return Some(Decoded::Fragment);
    }
    if v4.payload_ip_number() != IpNumber::TCP {
        return None;
    }
    let tcp = TcpSlice::from_slice(v4.payload().payload).ok()?;
    let h = v4.header();
    Some(segment(
        h.source_addr().into(),
        h.destination_addr().into(),
        &tcp,
    ))
}

fn segment<'a>(src_ip: IpAddr, dst_ip: IpAddr, tcp: &TcpSlice<'a>) -> Decoded<'a> {
    Decoded::Tcp(TcpSegment {
        src: Endpoint {
            ip: src_ip,
            port: tcp.source_port(),
        },
        dst: Endpoint {
            ip: dst_ip,
            port: tcp.destination_port(),
        },
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags: TcpFlags {
            syn: tcp.syn(),
            ack: tcp.ack(),
            fin: tcp.fin(),
            rst: tcp.rst(),
        },
        payload: tcp.payload(),
    })
}

/// Any packet of any supported link type, sliced whole by etherparse.
fn sliced(lt: i32, data: &[u8]) -> Decoded<'_> {
    let sliced = match lt {
        linktype::ETHERNET => SlicedPacket::from_ethernet(data),
        linktype::LINUX_SLL => {
            // 16-byte header ending in the protocol (an EtherType); etherparse's own SLL
            // parser rejects some device types (e.g. loopback captures)
            if data.len() < 16 {
                return Decoded::Malformed("short_link_header");
            }
            let proto = u16::from_be_bytes([data[14], data[15]]);
            SlicedPacket::from_ether_type(EtherType(proto), &data[16..])
        }
        linktype::RAW | linktype::IPV4 | linktype::IPV6 => SlicedPacket::from_ip(data),
        linktype::NULL | linktype::LOOP => {
            if data.len() < 4 {
                return Decoded::Malformed("short_link_header");
            }
            let le = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            let be = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            // AF_INET is 2 everywhere; AF_INET6 is 10 (Linux), 24, 28 or 30 (BSDs, macOS)
            let family_ok = |v: u32| matches!(v, 2 | 10 | 24 | 28 | 30);
            if !family_ok(le) && !family_ok(be) {
                return Decoded::NotTcp;
            }
            SlicedPacket::from_ip(&data[4..])
        }
        linktype::LINUX_SLL2 => {
            // 20-byte header; the protocol (an EtherType) is its first field
            if data.len() < 20 {
                return Decoded::Malformed("short_link_header");
            }
            let proto = u16::from_be_bytes([data[0], data[1]]);
            SlicedPacket::from_ether_type(EtherType(proto), &data[20..])
        }
        _ => return Decoded::UnsupportedLinktype,
    };
    let packet = match sliced {
        Ok(p) => p,
        Err(etherparse::err::packet::SliceError::Len(_)) => return Decoded::Malformed("truncated"),
        Err(_) => return Decoded::Malformed("bad_header"),
    };
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match &packet.net {
        Some(NetSlice::Ipv4(v4)) => {
            if v4.is_payload_fragmented() {
                return Decoded::Fragment;
            }
            let h = v4.header();
            (h.source_addr().into(), h.destination_addr().into())
        }
        Some(NetSlice::Ipv6(v6)) => {
            if v6.is_payload_fragmented() {
                return Decoded::Fragment;
            }
            let h = v6.header();
            (h.source_addr().into(), h.destination_addr().into())
        }
        _ => return Decoded::NotTcp,
    };
    match packet.transport {
        Some(TransportSlice::Tcp(tcp)) => segment(src_ip, dst_ip, &tcp),
        _ => Decoded::NotTcp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_tcp(payload: &[u8]) -> Vec<u8> {
        let builder = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 5672, 1000, 65535)
            .ack(77);
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn raw_ip_tcp() {
        let pkt = ipv4_tcp(b"AMQP");
        let Decoded::Tcp(seg) = decode(linktype::RAW, &pkt) else {
            panic!("not tcp")
        };
        assert_eq!(seg.src.port, 40000);
        assert_eq!(seg.dst.port, 5672);
        assert_eq!(seg.seq, 1000);
        assert_eq!(seg.payload, b"AMQP");
        assert!(seg.flags.ack);
    }

    #[test]
    fn null_and_sll2_wrappers() {
        let ip = ipv4_tcp(b"x");
        let mut null = 2u32.to_le_bytes().to_vec();
        null.extend_from_slice(&ip);
        assert!(matches!(decode(linktype::NULL, &null), Decoded::Tcp(_)));
        let mut sll2 = vec![0x08, 0x00];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(&ip);
        assert!(matches!(
            decode(linktype::LINUX_SLL2, &sll2),
            Decoded::Tcp(_)
        ));
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            for lt in [0, 1, 101, 108, 113, 228, 229, 276, 999] {
                let _ = decode(lt, &junk);
            }
        }
        assert!(matches!(
            decode(linktype::RAW, &ipv4_tcp(b"abc")[..30]),
            Decoded::Malformed(_)
        ));
    }

    /// A packet as one link type frames it (the link header's own fields filled in).
    fn framed(lt: i32, ip: &[u8], ether_type: [u8; 2]) -> Vec<u8> {
        let mut out = match lt {
            linktype::ETHERNET => {
                let mut h = vec![0u8; 12];
                h.extend_from_slice(&ether_type);
                h
            }
            linktype::LINUX_SLL => {
                let mut h = vec![0u8; 14];
                h.extend_from_slice(&ether_type);
                h
            }
            linktype::LINUX_SLL2 => {
                let mut h = ether_type.to_vec();
                h.extend_from_slice(&[0u8; 18]);
                h
            }
            linktype::NULL => 2u32.to_le_bytes().to_vec(),
            linktype::LOOP => 2u32.to_be_bytes().to_vec(),
            _ => Vec::new(),
        };
        out.extend_from_slice(ip);
        out
    }

    proptest::proptest! {
        /// The IPv4/TCP fast path reads every packet exactly as the whole-packet slicer
        /// does: valid ones, and ones with any bytes changed or cut.
        #[test]
        fn the_fast_path_agrees_with_the_slicer(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            ports in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>()),
            seq in proptest::prelude::any::<u32>(),
            lt in proptest::sample::select(vec![
                linktype::ETHERNET, linktype::LINUX_SLL, linktype::LINUX_SLL2,
                linktype::RAW, linktype::IPV4, linktype::NULL, linktype::LOOP,
            ]),
            udp in proptest::prelude::any::<bool>(),
            edits in proptest::collection::vec((0usize..80, proptest::prelude::any::<u8>()), 0..4),
            cut in proptest::option::of(0usize..100),
            pad in 0usize..8,
            ether_type in proptest::sample::select(vec![[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x08, 0x06]]),
        ) {
            let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64);
            let mut ip = Vec::new();
            if udp {
                b.udp(ports.0, ports.1).write(&mut ip, &payload).unwrap();
            } else {
                b.tcp(ports.0, ports.1, seq, 1000).syn().write(&mut ip, &payload).unwrap();
            }
            let mut pkt = framed(lt, &ip, ether_type);
            pkt.extend(std::iter::repeat_n(0u8, pad)); // Ethernet padding past the IP length
            for (at, v) in edits {
                if let Some(b) = pkt.get_mut(at) {
                    *b = v;
                }
            }
            if let Some(n) = cut {
                pkt.truncate(n);
            }
            proptest::prop_assert_eq!(
                format!("{:?}", decode(lt, &pkt)),
                format!("{:?}", sliced(lt, &pkt))
            );
        }
    }
}
