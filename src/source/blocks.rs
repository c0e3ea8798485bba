//! A capture read in blocks that can be shared: the records are parsed where they lie in
//! a block, and a shard on another thread reads a packet from the same block (`Window`)
//! instead of a copy the reader made for it.
//!
//! The reader walks the input as pcap-parser's streaming readers do (it is one of them:
//! `PcapReaderIterator`), so the file source's handling of damage, truncation and large
//! blocks is the same. What differs is its buffer: pcap-parser keeps one, moving the
//! unread tail to its front to read on, which would pull bytes from under a shard still
//! reading them. Here `refill` starts a new block with that tail, and the block it leaves
//! stays whole for as long as anyone holds it. Blocks come back to a small pool when the
//! last holder lets go: a fresh one each time would be fresh pages for the kernel to zero.
//!
//! Why not map the file: windows mapped from the page cache (no `read` copy) made a
//! one-thread replay of `load` 9 % slower and a two-thread one 14 % on the development
//! VM, every packet read from a page touched for the first time.

use pcap_parser::nom::{self, Needed};
use pcap_parser::pcap::{
    parse_pcap_frame, parse_pcap_frame_be, parse_pcap_frame_modified, parse_pcap_header,
};
use pcap_parser::pcapng::{parse_block_be, parse_block_le, parse_sectionheaderblock};
use pcap_parser::traits::PcapReaderIterator;
use pcap_parser::{Block, LegacyPcapBlock, PcapBlockOwned, PcapError, PcapHeader};
use std::io::Read;
use std::sync::Arc;

/// A window onto the input: one block as read, shared by the reader and the chunks
/// that point into it.
pub type Window = Arc<Filled>;

/// A block's bytes, of which the first `len` were read.
pub struct Filled {
    bytes: Vec<u8>,
    len: usize,
}

impl std::fmt::Debug for Filled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filled({} bytes)", self.len)
    }
}

impl std::ops::Deref for Filled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A block's usual size: large enough that reading on costs nothing per packet.
pub const BLOCK: usize = 1 << 20;
/// Blocks kept for reuse: a two-thread replay holds a few while its chunks are read.
const POOL: usize = 16;

type LegacyParse = fn(&[u8]) -> nom::IResult<&[u8], LegacyPcapBlock<'_>, PcapError<&[u8]>>;

/// What the input's records are, as its first bytes say.
enum Records {
    /// The file header is handed out first, as pcap-parser's legacy reader does.
    Legacy {
        header: Option<PcapHeader>,
        parse: LegacyParse,
    },
    Ng {
        big: bool,
    },
}

pub struct BlockReader {
    input: Box<dyn Read + Send>,
    block: Window,
    /// The read position in `block`.
    at: usize,
    /// Bytes consumed before `block`.
    before: usize,
    /// The size `refill` reads into (`grow` widens it for a large record).
    size: usize,
    /// The input has no more to read.
    exhausted: bool,
    failed: bool,
    records: Records,
    pool: Vec<Window>,
    /// Blocks made (the rest were reused).
    made: usize,
}

/// Why the input cannot be read as a capture.
pub enum Unread {
    Empty,
    NotPcap,
    Failed(std::io::Error),
}

impl BlockReader {
    pub fn new(input: Box<dyn Read + Send>) -> Result<BlockReader, Unread> {
        BlockReader::sized(input, BLOCK)
    }

    /// A reader whose blocks are `size` bytes (tests read through tiny ones).
    pub fn sized(input: Box<dyn Read + Send>, size: usize) -> Result<BlockReader, Unread> {
        let mut r = BlockReader {
            input,
            block: Arc::new(Filled {
                bytes: Vec::new(),
                len: 0,
            }),
            at: 0,
            before: 0,
            size: size.max(1),
            exhausted: false,
            failed: false,
            records: Records::Ng { big: false },
            pool: Vec::new(),
            made: 0,
        };
        // the first block is widened until it holds the file's header (or a block's
        // size of what is not one)
        loop {
            r.read_on().map_err(Unread::Failed)?;
            if r.block.is_empty() {
                return Err(Unread::Empty);
            }
            if let Some(records) = records(&r.block) {
                r.records = records;
                r.size = size.max(1);
                return Ok(r);
            }
            if r.exhausted || r.block.len() >= BLOCK {
                return Err(Unread::NotPcap);
            }
            r.size = (r.block.len() * 2).min(BLOCK);
        }
    }

    /// The block the data handed out last lies in.
    pub fn window(&self) -> &Window {
        &self.block
    }

    /// A new block holding the unread tail of this one, filled from the input.
    fn read_on(&mut self) -> std::io::Result<()> {
        let mut fresh = self.spare_block();
        let tail = &self.block[self.at..];
        let want = self.size.max(tail.len());
        if fresh.bytes.len() < want {
            // zeroed once, when the block is first made or grown
            fresh.bytes.resize(want, 0);
        }
        fresh.bytes[..tail.len()].copy_from_slice(tail);
        fresh.len = tail.len();
        while fresh.len < fresh.bytes.len() {
            match self.input.read(&mut fresh.bytes[fresh.len..]) {
                Ok(0) => {
                    self.exhausted = true;
                    break;
                }
                Ok(n) => fresh.len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        self.before += self.at;
        self.at = 0;
        let old = std::mem::replace(&mut self.block, Arc::new(fresh));
        if self.pool.len() < POOL {
            self.pool.push(old);
        }
        Ok(())
    }

    /// A block no chunk holds any more, else a new one.
    fn spare_block(&mut self) -> Filled {
        while let Some(i) = self.pool.iter().position(|b| Arc::strong_count(b) == 1) {
            if let Ok(block) = Arc::try_unwrap(self.pool.swap_remove(i)) {
                return block;
            }
        }
        self.made += 1;
        Filled {
            bytes: Vec::new(),
            len: 0,
        }
    }
}

/// The input's format from its first bytes, as `pcap_parser::create_reader` decides it.
fn records(start: &[u8]) -> Option<Records> {
    if parse_sectionheaderblock(start).is_ok() {
        return Some(Records::Ng { big: false });
    }
    let (_, header) = parse_pcap_header(start).ok()?;
    let parse: LegacyParse = match (header.is_modified_format(), header.is_bigendian()) {
        (true, _) => parse_pcap_frame_modified,
        (false, true) => parse_pcap_frame_be,
        (false, false) => parse_pcap_frame,
    };
    Some(Records::Legacy {
        header: Some(header),
        parse,
    })
}

/// A record's parse as the streaming readers report it.
fn reported<'a>(
    parsed: nom::IResult<&'a [u8], PcapBlockOwned<'a>, PcapError<&'a [u8]>>,
    data: &'a [u8],
    exhausted: bool,
) -> Result<(usize, PcapBlockOwned<'a>), PcapError<&'a [u8]>> {
    match parsed {
        Ok((rest, block)) => Ok((data.len() - rest.len(), block)),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(e),
        Err(nom::Err::Incomplete(_)) if exhausted => Err(PcapError::UnexpectedEof),
        Err(nom::Err::Incomplete(Needed::Size(n))) => Err(PcapError::Incomplete(n.get())),
        Err(nom::Err::Incomplete(Needed::Unknown)) => Err(PcapError::Incomplete(0)),
    }
}

impl PcapReaderIterator for BlockReader {
    fn next(&mut self) -> Result<(usize, PcapBlockOwned<'_>), PcapError<&[u8]>> {
        if let Records::Legacy { header, .. } = &mut self.records
            && let Some(h) = header.take()
        {
            return Ok((h.size(), PcapBlockOwned::from(h)));
        }
        let exhausted = self.exhausted;
        let data = &self.block[self.at..];
        if data.is_empty() && exhausted {
            return Err(PcapError::Eof);
        }
        match &mut self.records {
            Records::Legacy { parse, .. } => {
                let parsed = parse(data).map(|(rest, b)| (rest, PcapBlockOwned::from(b)));
                reported(parsed, data, exhausted)
            }
            Records::Ng { big } => {
                let parse = if *big { parse_block_be } else { parse_block_le };
                let parsed = parse(data).map(|(rest, b)| {
                    if let Block::SectionHeader(shb) = &b {
                        *big = shb.big_endian();
                    }
                    (rest, PcapBlockOwned::from(b))
                });
                reported(parsed, data, exhausted)
            }
        }
    }

    fn consume(&mut self, offset: usize) {
        self.at = (self.at + offset).min(self.block.len());
    }

    fn consume_noshift(&mut self, offset: usize) {
        self.consume(offset);
    }

    fn consumed(&self) -> usize {
        self.before + self.at
    }

    fn refill(&mut self) -> Result<(), PcapError<&[u8]>> {
        if self.failed || (!self.exhausted && self.read_on().is_err()) {
            return Err(PcapError::ReadError);
        }
        Ok(())
    }

    fn position(&self) -> usize {
        self.at
    }

    fn grow(&mut self, new_size: usize) -> bool {
        self.size = self.size.max(new_size);
        self.exhausted || self.read_on().is_ok()
    }

    fn data(&self) -> &[u8] {
        &self.block[self.at..]
    }

    fn reader_exhausted(&self) -> bool {
        self.exhausted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_parser::create_reader;
    use proptest::prelude::*;

    /// Each record's length and its fields and bytes, and whether the input ended
    /// inside a record.
    type Seen = (Vec<(usize, Vec<u8>)>, bool);

    /// What a streaming reader hands out, driven as the file source drives it.
    fn records_of(r: &mut dyn PcapReaderIterator) -> Seen {
        let mut got = Vec::new();
        loop {
            match r.next() {
                Ok((len, block)) => {
                    let (head, data) = match block {
                        PcapBlockOwned::Legacy(b) => {
                            ([b.ts_sec, b.ts_usec, b.caplen, b.origlen, 0], b.data)
                        }
                        PcapBlockOwned::NG(Block::EnhancedPacket(b)) => {
                            ([b.ts_high, b.ts_low, b.caplen, b.origlen, b.if_id], b.data)
                        }
                        _ => ([0; 5], &[][..]),
                    };
                    let bytes = head
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .chain(data.iter().copied())
                        .collect();
                    got.push((len, bytes));
                    r.consume_noshift(len);
                }
                Err(PcapError::Eof) => return (got, false),
                Err(PcapError::Incomplete(_)) => {
                    let before = r.data().len();
                    r.refill().expect("refill");
                    if r.data().len() == before && !r.reader_exhausted() {
                        assert!(r.grow((before * 2).max(64)), "grow");
                    }
                }
                Err(PcapError::UnexpectedEof) => return (got, true),
                Err(PcapError::BufferTooSmall) => {
                    let want = r.data().len().max(64) * 2;
                    assert!(r.grow(want), "grow");
                }
                Err(e) => panic!("{e:?} after {} records", got.len()),
            }
        }
    }

    fn capture(name: &str) -> Vec<u8> {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = if name.ends_with(".pcapng") {
            repo.join("../shared/testdata/foreign/ndpi").join(name)
        } else {
            repo.join("sampledata").join(name)
        };
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The records through blocks of `size`: None if the input does not open.
    fn through_blocks(bytes: &[u8], size: usize) -> Option<Seen> {
        let input = Box::new(std::io::Cursor::new(bytes.to_vec()));
        let mut r = BlockReader::sized(input, size).ok()?;
        Some(records_of(&mut r))
    }

    fn through_pcap_parser(bytes: &[u8]) -> Option<Seen> {
        let input = std::io::Cursor::new(bytes.to_vec());
        let mut r = create_reader(1 << 20, input).ok()?;
        Some(records_of(r.as_mut()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Through blocks of any size (records cut at every place by a refill, records
        /// larger than a block), legacy pcap and pcapng, whole or cut short: the records
        /// pcap-parser's own reader hands out, and the same verdict on the cut.
        #[test]
        fn blocks_read_what_pcap_parser_reads(
            size in 1usize..5000,
            ng in any::<bool>(),
            cut in prop::option::of(0usize..100_000),
        ) {
            let mut bytes = capture(if ng { "http.pcapng" } else { "healthy.pcap" });
            if let Some(cut) = cut {
                bytes.truncate(bytes.len().saturating_sub(cut).max(64));
            }
            let theirs = through_pcap_parser(&bytes);
            prop_assert!(cut.is_some() || theirs.is_some(), "the whole capture opens");
            prop_assert_eq!(through_blocks(&bytes, size), theirs);
        }
    }

    /// A block no chunk holds any more is read into again (a new one each time would
    /// be fresh pages to zero); one still held is left as it was read.
    #[test]
    fn blocks_are_reused_once_let_go() {
        let bytes = capture("healthy.pcap");
        let input = Box::new(std::io::Cursor::new(bytes));
        let mut r = BlockReader::sized(input, 4096).unwrap_or_else(|_| panic!("opens"));
        let held = Arc::clone(r.window());
        let as_read = held.to_vec();
        let mut reads = 0;
        while !r.reader_exhausted() {
            r.consume(r.data().len().saturating_sub(100));
            r.refill().expect("refill");
            reads += 1;
        }
        assert!(reads > 50, "{reads} reads");
        assert_eq!(&held[..], &as_read[..], "a held block was read into");
        // the first (held), then two taking turns: the one read into and the one before
        // it (the empty placeholder the reader starts with is reused for one of them)
        assert!(r.made <= 3, "{} blocks made for {reads} reads", r.made);
    }

    #[test]
    fn empty_and_foreign_inputs_are_told_apart() {
        let open = |b: &[u8]| BlockReader::new(Box::new(std::io::Cursor::new(b.to_vec())));
        assert!(matches!(open(b""), Err(Unread::Empty)));
        assert!(matches!(
            open(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Unread::NotPcap)
        ));
        assert!(matches!(open(&[0xd4, 0xc3, 0xb2]), Err(Unread::NotPcap)));
    }
}
