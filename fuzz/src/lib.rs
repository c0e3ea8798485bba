//! What the fuzz targets share: how a fuzz input spells a connection's byte stream (so the
//! fuzzer can split frames across reads and punch holes), and how a TCP segment list is
//! spelled. `seeds` writes real traffic in these forms.

use stacktap::contract::Endpoint;
use stacktap::tcp::flows::Dir;
use stacktap::tcp::stream::Chunk;

/// A control byte whose high nibble is all ones makes a gap instead of data.
const GAP: u8 = 0xF0;

/// Reads an input as `[control][len][len bytes]…`: bit 0 of control is the direction,
/// a control with its high nibble set is a gap of `len` bytes. A short tail is data.
pub fn chunks(mut input: &[u8]) -> impl Iterator<Item = (Dir, Chunk<'_>)> {
    std::iter::from_fn(move || {
        let (&ctl, rest) = input.split_first()?;
        let (&len, rest) = rest.split_first().unwrap_or((&0, rest));
        let dir = if ctl & 1 == 0 {
            Dir::ToServer
        } else {
            Dir::ToClient
        };
        if ctl & GAP == GAP {
            input = rest;
            return Some((dir, Chunk::Gap(u64::from(len))));
        }
        let n = usize::from(len).min(rest.len());
        let (data, rest) = rest.split_at(n);
        input = rest;
        Some((dir, Chunk::Data(data)))
    })
}

/// Spells `data` sent in `dir` as chunk records (at most 255 bytes each).
pub fn push_chunks(out: &mut Vec<u8>, dir: Dir, data: &[u8]) {
    for piece in data.chunks(255) {
        out.push(dir as u8);
        out.push(piece.len() as u8);
        out.extend_from_slice(piece);
    }
}

/// One segment of a fuzzed TCP connection, read from
/// `[flags][seq offset: i16 LE][len][len bytes]`: flags bit 0 is the direction, bits 1-3
/// SYN, FIN, RST, bit 4 ACK; the sequence number is the direction's next expected one
/// moved by the offset (so segments repeat, overlap, reorder and leave holes).
pub struct Segment<'a> {
    pub dir: Dir,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub ack: bool,
    pub offset: i16,
    pub payload: &'a [u8],
}

pub fn segments(mut input: &[u8]) -> impl Iterator<Item = Segment<'_>> {
    std::iter::from_fn(move || {
        if input.len() < 4 {
            return None;
        }
        let (head, rest) = input.split_at(4);
        let n = usize::from(head[3]).min(rest.len());
        let (payload, rest) = rest.split_at(n);
        input = rest;
        let f = head[0];
        Some(Segment {
            dir: if f & 1 == 0 {
                Dir::ToServer
            } else {
                Dir::ToClient
            },
            syn: f & 2 != 0,
            fin: f & 4 != 0,
            rst: f & 8 != 0,
            ack: f & 16 != 0,
            offset: i16::from_le_bytes([head[1], head[2]]),
            payload,
        })
    })
}

/// Spells one in-order segment of `data` sent in `dir`.
pub fn push_segment(out: &mut Vec<u8>, dir: Dir, data: &[u8]) {
    for piece in data.chunks(255) {
        out.extend_from_slice(&[dir as u8 | 16, 0, 0, piece.len() as u8]);
        out.extend_from_slice(piece);
    }
}

/// The two ends every fuzzed connection runs between (the server on `port`).
pub fn ends(port: u16) -> (Endpoint, Endpoint) {
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    (Endpoint { ip, port: 40000 }, Endpoint { ip, port })
}
