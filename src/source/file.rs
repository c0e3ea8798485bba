//! pcap / pcapng files through `pcap-parser`, and a time-ordered merge of several files.
//!
//! A damaged record mid-file (an absurd length, a block that does not parse) is skipped:
//! the reader looks for the next plausible record (pcap: a header whose time is near the
//! last one and whose lengths fit the snap length, followed by another such header; pcapng:
//! a known block type whose trailing length matches), as Wireshark's tools do, and the
//! damage is reported with its byte offset. What was read is never thrown away.

use super::blocks::{BLOCK, BlockReader, Unread, Window};
use super::{Packet, PacketRef, linktype};
use crate::time::Ts;
use pcap_parser::traits::PcapReaderIterator;
use pcap_parser::{Block, PcapBlockOwned, PcapError};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: cannot open: {err}")]
    Open { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a pcap or pcapng file (no capture file header at its start)")]
    NotPcap { path: PathBuf },
    #[error("{path}: is a directory, not a capture file")]
    Directory { path: PathBuf },
    #[error("{path}: empty file")]
    Empty { path: PathBuf },
    #[error("{path}: unreadable at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: String,
    },
}

struct Interface {
    linktype: i32,
    units: Units,
    offset_secs: i64,
}

/// How an interface's timestamps count time (pcapng `if_tsresol`; micro- or nanoseconds
/// in a legacy file).
struct Units {
    per_sec: u64,
    /// The nanoseconds one unit is, when that is a whole number (every decimal resolution
    /// down to the nanosecond): a packet's time is then a multiplication, where a division
    /// per packet (by a number known only at run time) cost tens of cycles.
    nanos_each: Option<u64>,
}

impl Units {
    fn new(per_sec: u64) -> Units {
        let per_sec = per_sec.max(1);
        Units {
            per_sec,
            nanos_each: NANOS.is_multiple_of(per_sec).then(|| NANOS / per_sec),
        }
    }

    /// `frac` units as nanoseconds.
    fn nanos(&self, frac: u64) -> u64 {
        match self.nanos_each {
            Some(n) => frac.saturating_mul(n),
            None => (frac as u128 * NANOS as u128 / self.per_sec as u128) as u64,
        }
    }

    /// A time counted in units since the epoch, as seconds and nanoseconds.
    fn split(&self, raw: u64) -> (u64, u64) {
        // the usual resolutions as constants: their division is a multiplication
        let (secs, rem) = match self.per_sec {
            1_000_000 => (raw / 1_000_000, raw % 1_000_000),
            NANOS => (raw / NANOS, raw % NANOS),
            p => (raw / p, raw % p),
        };
        (secs, self.nanos(rem))
    }
}

const NANOS: u64 = 1_000_000_000;

pub struct PcapFile {
    path: PathBuf,
    reader: BlockReader,
    /// The block the reader's data lies in, kept beside the reader so that a packet can
    /// name it while the reader is lent to the packet.
    window: Window,
    interfaces: Vec<Interface>,
    format: Format,
    done: bool,
    /// The file ended inside a record (a capture cut short): reported, not fatal.
    pub truncated: bool,
    /// Damaged stretches skipped (or that ended the file), in order.
    pub damage: Vec<Damage>,
    pub bytes_read: u64,
    /// The last packet's time: a pcapng simple packet block has none of its own.
    last_ts: Ts,
}

/// A damaged stretch of a capture file.
#[derive(Debug, Clone)]
pub struct Damage {
    /// Where the damage starts (bytes from the start of the file).
    pub offset: u64,
    pub what: String,
    /// Bytes skipped to the next plausible record; None: none was found, the file ends
    /// there.
    pub skipped: Option<u64>,
}

/// What the file's records look like, to find the next one after damage.
#[derive(Debug, Clone, Copy)]
enum Format {
    Unknown,
    Legacy {
        big: bool,
        snaplen: u32,
        /// The last good record's seconds.
        last_sec: u32,
        nanos: bool,
    },
    Ng {
        big: bool,
    },
}

/// The largest record a capture plausibly holds when its header says no better.
const MAX_RECORD: u32 = 256 << 10;

const MAX_BLOCK: usize = 64 << 20;

impl PcapFile {
    pub fn open(path: &Path) -> Result<PcapFile, SourceError> {
        if path.is_dir() {
            return Err(SourceError::Directory {
                path: path.to_owned(),
            });
        }
        let file = File::open(path).map_err(|err| SourceError::Open {
            path: path.to_owned(),
            err,
        })?;
        PcapFile::from_reader(path, Box::new(file))
    }

    /// A capture from any reader (the demo's bundled samples); `path` names it in errors.
    pub fn from_reader(path: &Path, input: Box<dyn Read + Send>) -> Result<PcapFile, SourceError> {
        PcapFile::in_blocks(path, input, BLOCK)
    }

    /// A capture read in blocks of `block` bytes (at first: they grow for a record that
    /// does not fit). What is read does not depend on it; tests and the fuzz target read
    /// through small blocks to check that.
    #[doc(hidden)]
    pub fn in_blocks(
        path: &Path,
        input: Box<dyn Read + Send>,
        block: usize,
    ) -> Result<PcapFile, SourceError> {
        let reader = BlockReader::sized(input, block).map_err(|e| match e {
            Unread::Empty => SourceError::Empty {
                path: path.to_owned(),
            },
            Unread::NotPcap => SourceError::NotPcap {
                path: path.to_owned(),
            },
            Unread::Failed(err) => SourceError::Open {
                path: path.to_owned(),
                err,
            },
        })?;
        Ok(PcapFile::with(path, reader))
    }

    fn with(path: &Path, reader: BlockReader) -> PcapFile {
        PcapFile {
            path: path.to_owned(),
            window: reader.window().clone(),
            reader,
            interfaces: Vec::new(),
            format: Format::Unknown,
            done: false,
            truncated: false,
            damage: Vec::new(),
            bytes_read: 0,
            last_ts: Ts::ZERO,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next packet into `pkt`. Ok(false) at the end of the file (or at damage
    /// nothing after it could be read past: see `damage`).
    pub fn next_into(&mut self, pkt: &mut Packet) -> Result<bool, SourceError> {
        let got = self.next_with(|p| pkt.copy_from(p))?;
        Ok(got.is_some())
    }

    /// Hands the next packet, still in the read buffer, to `f`: its answer, or None at the
    /// end of the file (or at damage nothing after it could be read past: see `damage`).
    pub fn next_with<R>(
        &mut self,
        f: impl FnOnce(PacketRef<'_>) -> R,
    ) -> Result<Option<R>, SourceError> {
        while !self.done {
            if self.implausible_next() {
                self.skip_damage("a record header with an impossible length");
                continue;
            }
            match self.reader.next() {
                Ok((len, block)) => {
                    learn_format(&mut self.format, &block);
                    let got = take_block(&mut self.interfaces, block, self.last_ts);
                    let got = got.map(|pkt| PacketRef {
                        window: Some(&self.window),
                        ..pkt
                    });
                    self.bytes_read += len as u64;
                    let Some(pkt) = got else {
                        self.reader.consume_noshift(len);
                        continue;
                    };
                    self.last_ts = pkt.ts;
                    if let Format::Legacy { last_sec, .. } = &mut self.format {
                        *last_sec = (pkt.ts.0 / 1_000_000_000) as u32;
                    }
                    // the packet is read where it lies, then its bytes are let go
                    let answer = f(pkt);
                    self.reader.consume_noshift(len);
                    return Ok(Some(answer));
                }
                Err(PcapError::Eof) => self.done = true,
                Err(PcapError::Incomplete(_)) | Err(PcapError::UnexpectedEof) => {
                    if self.reader.reader_exhausted() {
                        // bytes left that do not make a whole record: the file was cut
                        self.truncated = !self.reader.data().is_empty();
                        self.done = true;
                    } else {
                        let before = self.reader.data().len();
                        if !self.refill() {
                            return Err(self.corrupt("read error"));
                        }
                        let r = &self.reader;
                        if r.data().len() == before && !r.reader_exhausted() && !self.widen(before)
                        {
                            // the block is full and still holds no whole record
                            self.skip_damage("a block larger than 64 MiB");
                        }
                    }
                }
                Err(PcapError::ReadError) => return Err(self.corrupt("read error")),
                Err(_) => self.skip_damage("a block that does not parse"),
            }
        }
        Ok(None)
    }

    /// Reads on into a new block: false on a read error.
    fn refill(&mut self) -> bool {
        let ok = self.reader.refill().is_ok();
        self.window = self.reader.window().clone();
        ok
    }

    /// Reads on into a block twice as wide as the `have` bytes it holds (up to 64 MiB, a
    /// limit every block size reaches exactly): false if it is that wide already.
    fn widen(&mut self, have: usize) -> bool {
        let ok = have < MAX_BLOCK && self.reader.grow((have * 2).clamp(64, MAX_BLOCK));
        self.window = self.reader.window().clone();
        ok
    }

    /// The next record's header announces more than the file can hold (checked before the
    /// reader tries to buffer it).
    fn implausible_next(&self) -> bool {
        let d = self.reader.data();
        match self.format {
            Format::Legacy { big, snaplen, .. } if d.len() >= 16 => {
                let caplen = u32_at(d, 8, big);
                caplen > snaplen.max(MAX_RECORD)
            }
            Format::Ng { big } if d.len() >= 8 => {
                let len = u32_at(d, 4, big) as usize;
                len < 12 || !len.is_multiple_of(4) || len > MAX_BLOCK
            }
            _ => false,
        }
    }

    /// Skips damage: from the byte after the damaged record's start to the next plausible
    /// record, refilling as needed; the file ends if there is none.
    fn skip_damage(&mut self, what: &str) {
        let offset = self.reader.consumed() as u64;
        let mut skipped = 1u64;
        self.reader.consume(1);
        loop {
            let data = self.reader.data();
            let (at, found) = find_record(data, self.format, self.reader.reader_exhausted());
            self.reader.consume(at);
            skipped += at as u64;
            if let Some(record) = found {
                self.damage.push(Damage {
                    offset,
                    what: what.into(),
                    skipped: record.then_some(skipped),
                });
                // no record after the damage: the file ends there
                self.done = !record;
                return;
            }
            // a record may start at `at`: whether it does shows in the bytes after the
            // block's end
            let len = self.reader.data().len();
            if !self.refill() {
                self.done = true;
                return;
            }
            let stuck = self.reader.data().len() == len && !self.reader.reader_exhausted();
            if stuck && !self.widen(len) {
                // the block is full of one undecided place and as wide as it gets
                self.reader.consume(1);
                skipped += 1;
            }
        }
    }

    fn corrupt(&self, what: &str) -> SourceError {
        SourceError::Corrupt {
            path: self.path.clone(),
            offset: self.reader.consumed(),
            what: what.to_owned(),
        }
    }
}

fn u32_at(d: &[u8], at: usize, big: bool) -> u32 {
    let b = [d[at], d[at + 1], d[at + 2], d[at + 3]];
    if big {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    }
}

fn learn_format(f: &mut Format, block: &PcapBlockOwned<'_>) {
    match block {
        PcapBlockOwned::LegacyHeader(h) => {
            *f = Format::Legacy {
                big: h.is_bigendian(),
                snaplen: h.snaplen,
                last_sec: 0,
                nanos: h.is_nanosecond_precision(),
            }
        }
        PcapBlockOwned::NG(Block::SectionHeader(shb)) => {
            *f = Format::Ng {
                big: shb.big_endian(),
            }
        }
        _ => {}
    }
}

/// How far a search for the next plausible record got in `d`, and what it found there:
/// Some(true), a record; Some(false), none to the end of the input; None, a place that
/// may start one, undecided until the bytes after `d` show (then it stopped there).
fn find_record(d: &[u8], f: Format, at_end: bool) -> (usize, Option<bool>) {
    for i in 0..d.len() {
        match plausible_at(d, i, f, at_end, 2) {
            Some(true) => return (i, Some(true)),
            Some(false) => {}
            None => return (i, None),
        }
    }
    if at_end {
        (d.len(), Some(false))
    } else {
        (d.len(), None)
    }
}

/// Whether a record starts at `i` (and `depth - 1` more follow it): None while that
/// depends on bytes past the end of `d` (never `at_end`, when `d` runs to the input's end).
fn plausible_at(d: &[u8], i: usize, f: Format, at_end: bool, depth: u8) -> Option<bool> {
    if depth == 0 {
        return Some(true);
    }
    let rest = &d[i..];
    // what is not in `d` yet: decided by the end of the input, else undecided
    let short = |whole: bool| if at_end { Some(whole) } else { None };
    let (len, ok) = match f {
        Format::Legacy {
            big,
            snaplen,
            last_sec,
            nanos,
        } => {
            if rest.len() < 16 {
                return short(rest.is_empty());
            }
            let (sec, frac) = (u32_at(rest, 0, big), u32_at(rest, 4, big));
            let (caplen, orig) = (u32_at(rest, 8, big), u32_at(rest, 12, big));
            let near = last_sec == 0 || sec.abs_diff(last_sec) <= 86_400;
            let frac_ok = frac < if nanos { 1_000_000_000 } else { 1_000_000 };
            let len_ok = caplen <= snaplen.max(MAX_RECORD) && caplen <= orig && orig <= 1 << 20;
            (16 + caplen as usize, near && frac_ok && len_ok)
        }
        Format::Ng { big } => {
            if rest.len() < 12 {
                return short(rest.is_empty());
            }
            let kind = u32_at(rest, 0, big);
            let len = u32_at(rest, 4, big) as usize;
            let known = matches!(kind, 1..=6 | 10 | 0x0A0D_0D0A);
            let head_ok =
                known && len >= 12 && len.is_multiple_of(4) && len <= MAX_RECORD as usize + 64;
            if head_ok && rest.len() < len {
                return short(false);
            }
            (len, head_ok && u32_at(rest, len - 4, big) as usize == len)
        }
        Format::Unknown => return Some(false),
    };
    if !ok {
        return Some(false);
    }
    // the record must be whole, and the record after it plausible too
    if i + len > d.len() {
        return short(false);
    }
    if i + len == d.len() {
        return short(true);
    }
    plausible_at(d, i + len, f, at_end, depth - 1)
}

/// Copies one record into `pkt` (the captured bytes only: `data` may carry padding).
fn packet<'b>(
    ts: Ts,
    ifc: &Interface,
    orig_len: u32,
    caplen: u32,
    data: &'b [u8],
) -> PacketRef<'b> {
    let n = (caplen as usize).min(data.len());
    PacketRef {
        ts,
        linktype: ifc.linktype,
        data: &data[..n],
        orig_len,
        window: None,
    }
}

/// Interprets one block: interface descriptions are remembered, a packet is returned (a
/// simple packet block, which has no time, at `last_ts`).
fn take_block<'b>(
    interfaces: &mut Vec<Interface>,
    block: PcapBlockOwned<'b>,
    last_ts: Ts,
) -> Option<PacketRef<'b>> {
    match block {
        PcapBlockOwned::LegacyHeader(h) => {
            let units = if h.is_nanosecond_precision() {
                1_000_000_000
            } else {
                1_000_000
            };
            *interfaces = vec![Interface {
                linktype: h.network.0,
                units: Units::new(units),
                offset_secs: 0,
            }];
            None
        }
        PcapBlockOwned::Legacy(b) => {
            let ifc = interfaces.first()?;
            let ts = Ts::from_parts(b.ts_sec as u64, ifc.units.nanos(b.ts_usec as u64));
            Some(packet(ts, ifc, b.origlen, b.caplen, b.data))
        }
        PcapBlockOwned::NG(Block::SectionHeader(_)) => {
            interfaces.clear();
            None
        }
        PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
            interfaces.push(Interface {
                linktype: idb.linktype.0,
                units: Units::new(idb.ts_resolution().unwrap_or(1_000_000)),
                offset_secs: idb.if_tsoffset,
            });
            None
        }
        PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
            let ifc = interfaces.get(epb.if_id as usize)?;
            let raw = ((epb.ts_high as u64) << 32) | epb.ts_low as u64;
            let (secs, nanos) = ifc.units.split(raw);
            let secs = (secs as i64).saturating_add(ifc.offset_secs).max(0) as u64;
            let ts = Ts::from_parts(secs, nanos);
            Some(packet(ts, ifc, epb.origlen, epb.caplen, epb.data))
        }
        PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
            // no timestamp in a simple packet block: it keeps the previous packet's
            let ifc = interfaces.first()?;
            Some(packet(last_ts, ifc, spb.origlen, spb.origlen, spb.data))
        }
        _ => None,
    }
}

/// Several capture files merged into one stream in timestamp order (e.g. one file per
/// broker node, or a rotated capture).
pub struct MergedFiles {
    files: Vec<PcapFile>,
    /// Each file's next packet, read ahead to choose the earliest (only when there are
    /// several: one file's packets are handed on from its read buffer).
    heads: Vec<Option<Packet>>,
}

impl MergedFiles {
    pub fn open(paths: &[PathBuf]) -> Result<MergedFiles, SourceError> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            files.push(PcapFile::open(p)?);
        }
        MergedFiles::new(files)
    }

    pub fn new(files: Vec<PcapFile>) -> Result<MergedFiles, SourceError> {
        let ahead = if files.len() > 1 { files.len() } else { 0 };
        let mut merged = MergedFiles {
            heads: vec![None; ahead],
            files,
        };
        for i in 0..ahead {
            merged.refill(i)?;
        }
        Ok(merged)
    }

    fn refill(&mut self, i: usize) -> Result<(), SourceError> {
        let mut pkt = self.heads[i].take().unwrap_or_default();
        if self.files[i].next_into(&mut pkt)? {
            self.heads[i] = Some(pkt);
        }
        Ok(())
    }

    /// The next packet in time order across all files, copied into `out`.
    pub fn next_into(&mut self, out: &mut Packet) -> Result<bool, SourceError> {
        let got = self.next_with(|p| out.copy_from(p))?;
        Ok(got.is_some())
    }

    /// Hands the next packet in time order across all files to `f`: its answer, or None
    /// when every file has ended.
    pub fn next_with<R>(
        &mut self,
        f: impl FnOnce(PacketRef<'_>) -> R,
    ) -> Result<Option<R>, SourceError> {
        if let [only] = self.files.as_mut_slice() {
            return only.next_with(f);
        }
        let mut best: Option<usize> = None;
        for (i, h) in self.heads.iter().enumerate() {
            if let Some(p) = h
                && best.is_none_or(|b| p.ts < self.heads[b].as_ref().map_or(Ts::ZERO, |q| q.ts))
            {
                best = Some(i);
            }
        }
        let Some(i) = best else { return Ok(None) };
        let answer = f(self.heads[i].as_ref().expect("head present").as_ref());
        self.refill(i)?;
        Ok(Some(answer))
    }

    pub fn files(&self) -> &[PcapFile] {
        &self.files
    }

    pub fn bytes_read(&self) -> u64 {
        self.files.iter().map(|f| f.bytes_read).sum()
    }
}

pub fn is_supported_linktype(lt: i32) -> bool {
    matches!(
        lt,
        linktype::NULL
            | linktype::ETHERNET
            | linktype::RAW
            | linktype::LOOP
            | linktype::LINUX_SLL
            | linktype::IPV4
            | linktype::IPV6
            | linktype::LINUX_SLL2
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything a capture gives: each packet (time, link type, bytes), the damage
    /// (where, how much was skipped) and whether it was cut short.
    type Whole = (Vec<(Ts, i32, Vec<u8>)>, Vec<(u64, Option<u64>)>, bool);

    fn read_through(bytes: &[u8], block: usize) -> Option<Whole> {
        let input = Box::new(std::io::Cursor::new(bytes.to_vec()));
        let mut file = PcapFile::in_blocks(Path::new("t.pcap"), input, block).ok()?;
        let mut packets = Vec::new();
        while let Some(p) = file
            .next_with(|p| (p.ts, p.linktype, p.data.to_vec()))
            .ok()?
        {
            packets.push(p);
        }
        let damage = file.damage.iter().map(|d| (d.offset, d.skipped)).collect();
        Some((packets, damage, file.truncated))
    }

    fn sample(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("sampledata")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A capture damaged anywhere (bytes overwritten, a stretch cut out, the end cut
        /// off) gives the same packets, damage and verdict read through blocks of any
        /// size as through the usual ones: where a record may start near a block's end,
        /// the search waits for the bytes after it rather than judge without them.
        #[test]
        fn what_is_read_does_not_depend_on_the_block_size(
            block in 1usize..20_000,
            hits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in prop::option::of((any::<prop::sample::Index>(), 1usize..3000)),
            end in 0usize..200,
        ) {
            let mut bytes = sample("failures.pcap");
            bytes.truncate(120_000);
            for (at, b) in hits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if let Some((at, n)) = cut {
                let i = at.index(bytes.len());
                bytes.drain(i..(i + n).min(bytes.len()));
            }
            bytes.truncate(bytes.len() - end.min(bytes.len()));
            let usual = read_through(&bytes, BLOCK);
            prop_assert_eq!(read_through(&bytes, block), usual);
        }
    }

    /// The time of `raw` units at `per_sec` units a second, by the one exact formula.
    fn exact(per_sec: u64, raw: u64) -> (u64, u64) {
        let rem = raw % per_sec;
        (
            raw / per_sec,
            (rem as u128 * NANOS as u128 / per_sec as u128) as u64,
        )
    }

    #[test]
    fn every_resolution_splits_as_the_exact_formula_does() {
        // decimal resolutions, binary ones (pcapng's high bit) and finer than a nanosecond
        let resolutions = [
            1,
            10,
            1_000,
            1_000_000,
            NANOS,
            1 << 10,
            1 << 20,
            1 << 40,
            NANOS * 1000,
        ];
        let raws = [
            0,
            1,
            999_999,
            1_000_000,
            1_733_000_000_123_456,
            u64::MAX / 3,
            u64::MAX,
        ];
        for per_sec in resolutions {
            let units = Units::new(per_sec);
            assert_eq!(
                units.nanos_each.is_some(),
                NANOS.is_multiple_of(per_sec),
                "{per_sec}"
            );
            for raw in raws {
                assert_eq!(
                    units.split(raw),
                    exact(per_sec, raw),
                    "{raw} at {per_sec}/s"
                );
            }
        }
        // a legacy file's fraction is micro- or nanoseconds, whatever its value
        assert_eq!(
            Units::new(1_000_000).nanos(u32::MAX as u64),
            u32::MAX as u64 * 1000
        );
        assert_eq!(Units::new(0).per_sec, 1);
    }
}
