//! Frame splitting for one direction of an AMQP connection, with resynchronisation.

use crate::health::Health;
use crate::tcp::Chunk;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const HEADER_LEN: usize = 7;
const PROTOCOL_HEADER: &[u8; 5] = b"AMQP\0";

/// One frame, borrowed from the stream.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    pub kind: u8,
    pub channel: u16,
    pub payload: &'a [u8],
}

/// What the reader hands its consumer.
pub enum FrameEvent<'a> {
    ProtocolHeader,
    Frame(RawFrame<'a>),
    /// Bytes were lost (TCP gap or a bad frame): state spanning frames is no longer valid.
    Desync,
}

pub struct FrameReader {
    buf: Vec<u8>,
    synced: bool,
    /// Largest frame we accept, in bytes of payload; larger means we are not on a boundary.
    max_frame: usize,
}

/// Class ids a method frame may carry (AMQP 0-9-1 + RabbitMQ's confirm).
fn known_class(class: u16) -> bool {
    matches!(class, 10 | 20 | 30 | 40 | 50 | 60 | 85 | 90)
}

impl FrameReader {
    /// `synced`: true when the stream is read from its first byte (SYN seen).
    pub fn new(synced: bool, max_frame: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            synced,
            max_frame,
        }
    }

    /// Checks a frame header at `at`; Some(total length) when plausible, None when not a
    /// boundary. Err(()) when more bytes are needed to decide.
    fn plausible(&self, data: &[u8], at: usize) -> Result<Option<usize>, ()> {
        let h = data.get(at..at + HEADER_LEN).ok_or(())?;
        let kind = h[0];
        let channel = u16::from_be_bytes([h[1], h[2]]);
        let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
        let ok_kind = match kind {
            FRAME_METHOD => size >= 4,
            FRAME_HEADER => size >= 14 && channel != 0,
            FRAME_BODY => channel != 0,
            FRAME_HEARTBEAT => size == 0 && channel == 0,
            _ => false,
        };
        if !ok_kind || size > self.max_frame {
            return Ok(None);
        }
        let total = HEADER_LEN + size + 1;
        if kind == FRAME_METHOD || kind == FRAME_HEADER {
            let p = data.get(at + HEADER_LEN..at + HEADER_LEN + 2).ok_or(())?;
            if !known_class(u16::from_be_bytes([p[0], p[1]])) {
                return Ok(None);
            }
        }
        let end = *data.get(at + total - 1).ok_or(())?;
        Ok((end == FRAME_END).then_some(total))
    }

    /// Finds the first offset where two frames in a row are plausible. Returns the offset,
    /// or None when more bytes are needed (keeping what might start a frame).
    fn resync(&self, data: &[u8]) -> (usize, bool) {
        let mut at = 0;
        while at + HEADER_LEN <= data.len() {
            if data[at..].starts_with(PROTOCOL_HEADER) {
                return (at, true);
            }
            match self.plausible(data, at) {
                Ok(Some(len)) => match self.plausible(data, at + len) {
                    Ok(Some(_)) => return (at, true),
                    Err(()) => return (at, false), // wait for the second frame
                    Ok(None) => {}
                },
                Err(()) => return (at, false),
                Ok(None) => {}
            }
            at += 1;
        }
        (at, false)
    }

    pub fn feed(
        &mut self,
        chunk: Chunk<'_>,
        health: &mut Health,
        out: &mut dyn FnMut(FrameEvent<'_>, &mut Health),
    ) {
        match chunk {
            Chunk::Gap(_) => {
                self.buf.clear();
                if self.synced {
                    self.synced = false;
                    out(FrameEvent::Desync, health);
                }
            }
            Chunk::Data(data) => {
                if self.buf.is_empty() {
                    let used = self.parse(data, health, out);
                    self.buf.extend_from_slice(&data[used..]);
                } else {
                    self.buf.extend_from_slice(data);
                    let buf = std::mem::take(&mut self.buf);
                    let used = self.parse(&buf, health, out);
                    self.buf = buf;
                    self.buf.drain(..used);
                }
                if self.buf.len() > self.max_frame + 2 * HEADER_LEN + 8 && !self.synced {
                    // still no boundary in a frame's worth of bytes: not AMQP, or garbage
                    health.anomaly("amqp", "resync_discard");
                    let keep = HEADER_LEN;
                    let cut = self.buf.len() - keep;
                    self.buf.drain(..cut);
                }
            }
        }
    }

    /// Parses whole frames from `data`; returns how many bytes were consumed.
    fn parse(
        &mut self,
        data: &[u8],
        health: &mut Health,
        out: &mut dyn FnMut(FrameEvent<'_>, &mut Health),
    ) -> usize {
        let mut at = 0;
        loop {
            if !self.synced {
                let (skip, found) = self.resync(&data[at..]);
                if skip > 0 {
                    health.anomaly("amqp", "resync_skip");
                }
                at += skip;
                if !found {
                    return at;
                }
                self.synced = true;
            }
            let rest = &data[at..];
            if rest.len() < HEADER_LEN + 1 {
                return at;
            }
            if rest.starts_with(PROTOCOL_HEADER) {
                if rest.len() < 8 {
                    return at;
                }
                out(FrameEvent::ProtocolHeader, health);
                at += 8;
                continue;
            }
            let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
            let kind = rest[0];
            if !matches!(
                kind,
                FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
            ) || size > self.max_frame
            {
                health.anomaly(
                    "amqp",
                    if size > self.max_frame {
                        "frame_too_large"
                    } else {
                        "bad_frame_type"
                    },
                );
                self.lose_sync(health, out);
                at += 1;
                continue;
            }
            if kind == FRAME_METHOD && size < 4 {
                // no room for its class and method ids: not a frame boundary after all
                health.anomaly("amqp", "short_method_frame");
                self.lose_sync(health, out);
                at += 1;
                continue;
            }
            let total = HEADER_LEN + size + 1;
            if rest.len() < total {
                return at;
            }
            if rest[total - 1] != FRAME_END {
                health.anomaly("amqp", "bad_frame_end");
                self.lose_sync(health, out);
                at += 1;
                continue;
            }
            let frame = RawFrame {
                kind,
                channel: u16::from_be_bytes([rest[1], rest[2]]),
                payload: &rest[HEADER_LEN..HEADER_LEN + size],
            };
            out(FrameEvent::Frame(frame), health);
            at += total;
        }
    }

    fn lose_sync(&mut self, health: &mut Health, out: &mut dyn FnMut(FrameEvent<'_>, &mut Health)) {
        self.synced = false;
        out(FrameEvent::Desync, health);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(FRAME_END);
        v
    }

    fn kinds(reader: &mut FrameReader, chunks: &[Chunk<'_>]) -> Vec<String> {
        let mut h = Health::default();
        let mut got = Vec::new();
        for c in chunks {
            let c = match c {
                Chunk::Data(d) => Chunk::Data(d),
                Chunk::Gap(n) => Chunk::Gap(*n),
            };
            reader.feed(c, &mut h, &mut |e, _| {
                got.push(match e {
                    FrameEvent::ProtocolHeader => "P".to_string(),
                    FrameEvent::Frame(f) => format!("{}@{}:{}", f.kind, f.channel, f.payload.len()),
                    FrameEvent::Desync => "D".to_string(),
                })
            });
        }
        got
    }

    #[test]
    fn split_anywhere() {
        let mut bytes = b"AMQP\x00\x00\x09\x01".to_vec();
        bytes.extend(frame(1, 0, &[0, 10, 0, 11, 1, 2, 3]));
        bytes.extend(frame(8, 0, &[]));
        bytes.extend(frame(3, 1, &[9; 300]));
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(true, 1 << 17);
            let got = kinds(
                &mut r,
                &[Chunk::Data(&bytes[..cut]), Chunk::Data(&bytes[cut..])],
            );
            assert_eq!(got, vec!["P", "1@0:7", "8@0:0", "3@1:300"], "cut at {cut}");
        }
    }

    /// Found by the amqp_conn fuzz target: a method frame too short for its ids, on a
    /// stream read from its start, reached the connection, which indexes those ids.
    #[test]
    fn a_method_frame_without_its_ids_is_no_frame() {
        let mut bytes = b"AMQP\x00\x00\x09\x01".to_vec();
        bytes.extend(frame(1, 0, &[0, 10]));
        bytes.extend(frame(8, 0, &[]));
        bytes.extend(frame(8, 0, &[]));
        let mut r = FrameReader::new(true, 1 << 17);
        let got = kinds(&mut r, &[Chunk::Data(&bytes)]);
        // resynced on the two heartbeats after it
        assert_eq!(got, vec!["P", "D", "8@0:0", "8@0:0"]);
    }

    #[test]
    fn resync_mid_stream_on_two_frames() {
        let mut bytes = vec![0x33, 0xCE, 0x01, 0x00, 0x00, 0x12]; // tail of an earlier frame
        bytes.extend(frame(1, 1, &[0, 60, 0, 40, 0, 0]));
        bytes.extend(frame(2, 1, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]));
        bytes.extend(frame(3, 1, b"hello"));
        let mut r = FrameReader::new(false, 1 << 17);
        let got = kinds(&mut r, &[Chunk::Data(&bytes)]);
        assert_eq!(got, vec!["1@1:6", "2@1:14", "3@1:5"]);
    }

    #[test]
    fn gap_desyncs_then_recovers() {
        let a = frame(1, 1, &[0, 60, 0, 40, 0, 0]);
        let b = frame(8, 0, &[]);
        let mut r = FrameReader::new(true, 1 << 17);
        let mut second = a[3..].to_vec();
        second.extend(&b);
        second.extend(&a);
        let got = kinds(
            &mut r,
            &[Chunk::Data(&a[..3]), Chunk::Gap(10), Chunk::Data(&second)],
        );
        assert_eq!(got, vec!["D", "8@0:0", "1@1:6"]);
    }

    #[test]
    fn garbage_never_panics_and_is_bounded() {
        let mut r = FrameReader::new(false, 1 << 10);
        let junk: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut h = Health::default();
        for c in junk.chunks(1000) {
            r.feed(Chunk::Data(c), &mut h, &mut |_, _| {});
        }
        assert!(r.buf.len() < 4096);
    }
}
