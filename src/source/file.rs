//! pcap / pcapng files through `pcap-parser`, and a time-ordered merge of several files.

use super::{Packet, linktype};
use crate::time::Ts;
use pcap_parser::traits::PcapReaderIterator;
use pcap_parser::{Block, PcapBlockOwned, PcapError, create_reader};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: cannot open: {err}")]
    Open { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a pcap or pcapng file")]
    NotPcap { path: PathBuf },
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
    /// Timestamp units per second (pcapng if_tsresol).
    units_per_sec: u64,
    offset_secs: i64,
}

pub struct PcapFile {
    path: PathBuf,
    reader: Box<dyn PcapReaderIterator + Send>,
    interfaces: Vec<Interface>,
    done: bool,
    /// The file ended inside a record (a capture cut short): reported, not fatal.
    pub truncated: bool,
    pub bytes_read: u64,
}

const READ_BUFFER: usize = 1 << 20;
const MAX_BLOCK: usize = 64 << 20;

impl PcapFile {
    pub fn open(path: &Path) -> Result<PcapFile, SourceError> {
        let file = File::open(path).map_err(|err| SourceError::Open {
            path: path.to_owned(),
            err,
        })?;
        PcapFile::from_reader(path, Box::new(file))
    }

    /// A capture from any reader (the demo's bundled samples); `path` names it in errors.
    pub fn from_reader(path: &Path, input: Box<dyn Read + Send>) -> Result<PcapFile, SourceError> {
        let reader = match create_reader(READ_BUFFER, input) {
            Ok(r) => r,
            Err(PcapError::Eof) => {
                return Err(SourceError::Empty {
                    path: path.to_owned(),
                });
            }
            Err(_) => {
                return Err(SourceError::NotPcap {
                    path: path.to_owned(),
                });
            }
        };
        Ok(PcapFile {
            path: path.to_owned(),
            reader,
            interfaces: Vec::new(),
            done: false,
            truncated: false,
            bytes_read: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next packet into `pkt`. Ok(false) at the end of the file.
    pub fn next_into(&mut self, pkt: &mut Packet) -> Result<bool, SourceError> {
        while !self.done {
            match self.reader.next() {
                Ok((len, block)) => {
                    let got = take_block(&mut self.interfaces, block, pkt);
                    self.bytes_read += len as u64;
                    self.reader.consume(len);
                    if got {
                        return Ok(true);
                    }
                }
                Err(PcapError::Eof) => self.done = true,
                Err(PcapError::Incomplete(_)) | Err(PcapError::UnexpectedEof) => {
                    if self.reader.reader_exhausted() {
                        // bytes left that do not make a whole record: the file was cut
                        self.truncated = !self.reader.data().is_empty();
                        self.done = true;
                    } else {
                        let before = self.reader.data().len();
                        if self.reader.refill().is_err() {
                            return Err(self.corrupt("read error"));
                        }
                        if self.reader.data().len() == before && !self.reader.reader_exhausted() {
                            // the buffer is full and still holds no whole block
                            let want = (before * 2).max(READ_BUFFER);
                            if want > MAX_BLOCK || !self.reader.grow(want) {
                                return Err(self.corrupt("record larger than 64 MiB"));
                            }
                        }
                    }
                }
                Err(PcapError::BufferTooSmall) => {
                    let want = self.reader.data().len().max(READ_BUFFER) * 2;
                    if want > MAX_BLOCK || !self.reader.grow(want) {
                        return Err(self.corrupt("record larger than 64 MiB"));
                    }
                }
                Err(e) => {
                    let what: String = format!("{e:?}").chars().take(80).collect();
                    return Err(self.corrupt(&what));
                }
            }
        }
        Ok(false)
    }

    fn corrupt(&self, what: &str) -> SourceError {
        SourceError::Corrupt {
            path: self.path.clone(),
            offset: self.reader.consumed(),
            what: what.to_owned(),
        }
    }
}

/// Copies one record into `pkt` (the captured bytes only: `data` may carry padding).
fn fill(pkt: &mut Packet, ts: Ts, ifc: &Interface, orig_len: u32, caplen: u32, data: &[u8]) {
    pkt.ts = ts;
    pkt.linktype = ifc.linktype;
    pkt.orig_len = orig_len;
    let n = (caplen as usize).min(data.len());
    pkt.data.clear();
    pkt.data.extend_from_slice(&data[..n]);
}

/// Interprets one block: interface descriptions are remembered, packets copied out.
fn take_block(
    interfaces: &mut Vec<Interface>,
    block: PcapBlockOwned<'_>,
    pkt: &mut Packet,
) -> bool {
    {
        match block {
            PcapBlockOwned::LegacyHeader(h) => {
                let units = if h.is_nanosecond_precision() {
                    1_000_000_000
                } else {
                    1_000_000
                };
                *interfaces = vec![Interface {
                    linktype: h.network.0,
                    units_per_sec: units,
                    offset_secs: 0,
                }];
                false
            }
            PcapBlockOwned::Legacy(b) => {
                let Some(ifc) = interfaces.first() else {
                    return false;
                };
                let frac = b.ts_usec as u64 * (1_000_000_000 / ifc.units_per_sec);
                fill(
                    pkt,
                    Ts::from_parts(b.ts_sec as u64, frac),
                    ifc,
                    b.origlen,
                    b.caplen,
                    b.data,
                );
                true
            }
            PcapBlockOwned::NG(Block::SectionHeader(_)) => {
                interfaces.clear();
                false
            }
            PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                let units = idb.ts_resolution().unwrap_or(1_000_000).max(1);
                interfaces.push(Interface {
                    linktype: idb.linktype.0,
                    units_per_sec: units,
                    offset_secs: idb.if_tsoffset,
                });
                false
            }
            PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                let Some(ifc) = interfaces.get(epb.if_id as usize) else {
                    return false;
                };
                let raw = ((epb.ts_high as u64) << 32) | epb.ts_low as u64;
                let secs = raw / ifc.units_per_sec;
                let rem = raw % ifc.units_per_sec;
                let nanos = (rem as u128 * 1_000_000_000 / ifc.units_per_sec as u128) as u64;
                let secs = (secs as i64).saturating_add(ifc.offset_secs).max(0) as u64;
                fill(
                    pkt,
                    Ts::from_parts(secs, nanos),
                    ifc,
                    epb.origlen,
                    epb.caplen,
                    epb.data,
                );
                true
            }
            PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
                // no timestamp in a simple packet block: it keeps the previous packet's
                let Some(ifc) = interfaces.first() else {
                    return false;
                };
                pkt.linktype = ifc.linktype;
                pkt.orig_len = spb.origlen;
                let n = (spb.origlen as usize).min(spb.data.len());
                pkt.data.clear();
                pkt.data.extend_from_slice(&spb.data[..n]);
                true
            }
            _ => false,
        }
    }
}

/// Several capture files merged into one stream in timestamp order (e.g. one file per
/// broker node, or a rotated capture).
pub struct MergedFiles {
    files: Vec<PcapFile>,
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
        let mut merged = MergedFiles {
            heads: vec![None; files.len()],
            files,
        };
        for i in 0..merged.files.len() {
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

    /// The next packet in time order across all files, swapped into `out`.
    pub fn next_into(&mut self, out: &mut Packet) -> Result<bool, SourceError> {
        let mut best: Option<usize> = None;
        for (i, h) in self.heads.iter().enumerate() {
            if let Some(p) = h
                && best.is_none_or(|b| p.ts < self.heads[b].as_ref().map_or(Ts::ZERO, |q| q.ts))
            {
                best = Some(i);
            }
        }
        let Some(i) = best else { return Ok(false) };
        let mut pkt = self.heads[i].take().expect("head present");
        std::mem::swap(out, &mut pkt);
        self.heads[i] = Some(pkt); // reuse the buffer
        let keep = self.files[i].next_into(self.heads[i].as_mut().expect("just set"))?;
        if !keep {
            self.heads[i] = None;
        }
        Ok(true)
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
