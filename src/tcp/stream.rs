//! One direction of a TCP connection: bytes back in order, holes reported as gaps.
//!
//! Sequence numbers are unwrapped into a 64-bit space anchored at the first byte seen, so
//! wrap-around is invisible to the rest. Policy on overlaps: the bytes delivered first win
//! (a retransmit never rewrites what a parser already consumed).

use crate::health::Health;
use crate::time::Ts;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Out-of-order bytes buffered per direction before the hole is given up as a gap.
    pub max_buffered_bytes: usize,
    /// Out-of-order segments buffered per direction.
    pub max_buffered_segments: usize,
    /// How long (packet time) a hole may stay open while data waits behind it.
    pub hole_timeout_ns: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_buffered_bytes: 1 << 20,
            max_buffered_segments: 2048,
            hole_timeout_ns: 2_000_000_000,
        }
    }
}

/// What a stream hands its parser.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    Data(&'a [u8]),
    /// This many bytes went by on the wire and the capture missed them.
    Gap(u64),
}

/// Offset added to the first sequence number so that early retransmits stay positive.
const ANCHOR: u64 = 1 << 40;

#[derive(Debug, Default)]
pub struct Stream {
    /// Unwrapped sequence number of the next byte to deliver; None until the first segment.
    next: Option<u64>,
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    hole_since: Option<Ts>,
    fin_at: Option<u64>,
    pub closed: bool,
    /// True when the stream was joined after its start (no SYN seen).
    pub midstream: bool,
}

impl Stream {
    fn unwrap(&self, seq: u32, next: u64) -> u64 {
        let diff = seq.wrapping_sub(next as u32) as i32 as i64;
        (next as i64 + diff) as u64
    }

    /// Buffered out-of-order bytes (for the global memory budget).
    pub fn buffered(&self) -> usize {
        self.pending_bytes
    }

    /// Feeds one segment of this direction; in-order bytes go to `out` at once.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        cfg: &StreamConfig,
        health: &mut Health,
        ts: Ts,
        seq: u32,
        syn: bool,
        fin: bool,
        payload: &[u8],
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        if self.closed {
            if !payload.is_empty() {
                health.anomaly("tcp", "data_after_close");
            }
            return;
        }
        let next = match self.next {
            Some(n) => n,
            None => {
                let first = ANCHOR + seq as u64 + syn as u64;
                self.midstream = !syn;
                self.next = Some(first);
                first
            }
        };
        let mut start = self.unwrap(seq, next);
        if syn {
            start += 1; // SYN occupies one sequence number
        }
        let end = start + payload.len() as u64;
        if fin {
            self.fin_at = Some(end);
        }
        if !payload.is_empty() {
            if end <= next {
                health.anomaly("tcp", "retransmit");
            } else if start <= next {
                if start < next {
                    health.anomaly("tcp", "overlap");
                }
                let skip = (next - start) as usize;
                self.emit(&payload[skip..], health, out);
                self.drain(health, out);
            } else {
                self.buffer(health, ts, start, payload);
                self.enforce_caps(cfg, health, out);
            }
        }
        self.check_hole_timeout(cfg, health, ts, out);
        self.check_fin();
    }

    /// The other direction acknowledged up to `ack`: any hole below it was on the wire and
    /// the capture lost it, so waiting longer cannot fill it.
    pub fn on_peer_ack(
        &mut self,
        health: &mut Health,
        ack: u32,
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        let Some(next) = self.next else { return };
        if self.pending.is_empty() {
            return;
        }
        let acked = self.unwrap(ack, next);
        if acked > next {
            let first = *self.pending.keys().next().expect("non-empty");
            self.skip_to(health, acked.min(first), out);
            self.drain(health, out);
            self.check_fin();
        }
    }

    /// Packet clock advanced (idle tick or any packet): give up holes that are too old.
    pub fn on_clock(
        &mut self,
        cfg: &StreamConfig,
        health: &mut Health,
        now: Ts,
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        self.check_hole_timeout(cfg, health, now, out);
        self.check_fin();
    }

    /// The connection is over (RST, idle, eviction, end of capture): hand over everything
    /// still buffered, holes as gaps.
    pub fn flush(&mut self, health: &mut Health, out: &mut dyn FnMut(Chunk<'_>, &mut Health)) {
        while let Some(&first) = self.pending.keys().next() {
            self.skip_to(health, first, out);
            self.drain(health, out);
        }
        if let (Some(next), Some(fin)) = (self.next, self.fin_at)
            && fin > next
        {
            self.skip_to(health, fin, out);
        }
        self.closed = true;
    }

    fn emit(
        &mut self,
        data: &[u8],
        health: &mut Health,
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        if data.is_empty() {
            return;
        }
        out(Chunk::Data(data), health);
        *self.next.as_mut().expect("started") += data.len() as u64;
    }

    fn skip_to(
        &mut self,
        health: &mut Health,
        to: u64,
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        let next = self.next.expect("started");
        if to > next {
            let gap = to - next;
            health.anomaly("tcp", "gap");
            health.tcp_gap_bytes += gap;
            out(Chunk::Gap(gap), health);
            self.next = Some(to);
        }
    }

    fn buffer(&mut self, health: &mut Health, ts: Ts, start: u64, payload: &[u8]) {
        if self.pending.is_empty() {
            self.hole_since = Some(ts);
        }
        health.anomaly("tcp", "out_of_order");
        match self.pending.get_mut(&start) {
            Some(existing) if existing.len() >= payload.len() => {
                health.anomaly("tcp", "retransmit");
            }
            Some(existing) => {
                self.pending_bytes += payload.len() - existing.len();
                existing.clear();
                existing.extend_from_slice(payload);
            }
            None => {
                self.pending_bytes += payload.len();
                self.pending.insert(start, payload.to_vec());
            }
        }
    }

    fn enforce_caps(
        &mut self,
        cfg: &StreamConfig,
        health: &mut Health,
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        while self.pending_bytes > cfg.max_buffered_bytes
            || self.pending.len() > cfg.max_buffered_segments
        {
            health.anomaly("tcp", "reorder_buffer_full");
            let first = *self
                .pending
                .keys()
                .next()
                .expect("over cap means non-empty");
            self.skip_to(health, first, out);
            self.drain(health, out);
        }
    }

    fn check_hole_timeout(
        &mut self,
        cfg: &StreamConfig,
        health: &mut Health,
        now: Ts,
        out: &mut dyn FnMut(Chunk<'_>, &mut Health),
    ) {
        let Some(since) = self.hole_since else { return };
        if now.0.saturating_sub(since.0) >= cfg.hole_timeout_ns {
            if let Some(&first) = self.pending.keys().next() {
                health.anomaly("tcp", "hole_timeout");
                self.skip_to(health, first, out);
                self.drain(health, out);
            }
            if !self.pending.is_empty() {
                self.hole_since = Some(now);
            }
        }
    }

    /// Delivers buffered segments that are now in order.
    fn drain(&mut self, health: &mut Health, out: &mut dyn FnMut(Chunk<'_>, &mut Health)) {
        while let Some(entry) = self.pending.first_entry() {
            let start = *entry.key();
            let next = self.next.expect("started");
            if start > next {
                break;
            }
            let data = entry.remove();
            self.pending_bytes -= data.len();
            let end = start + data.len() as u64;
            if end > next {
                if start < next {
                    health.anomaly("tcp", "overlap");
                }
                let skip = (next - start) as usize;
                self.emit(&data[skip..], health, out);
            } else {
                health.anomaly("tcp", "retransmit");
            }
        }
        if self.pending.is_empty() {
            self.hole_since = None;
        }
    }

    fn check_fin(&mut self) {
        if let (Some(next), Some(fin)) = (self.next, self.fin_at)
            && next >= fin
            && self.pending.is_empty()
        {
            self.closed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq)]
    enum Out {
        Data(Vec<u8>),
        Gap(u64),
    }

    fn collect(out: &mut Vec<Out>) -> impl FnMut(Chunk<'_>, &mut Health) + '_ {
        move |c, _| match c {
            Chunk::Data(d) => match out.last_mut() {
                Some(Out::Data(v)) => v.extend_from_slice(d),
                _ => out.push(Out::Data(d.to_vec())),
            },
            Chunk::Gap(n) => out.push(Out::Gap(n)),
        }
    }

    #[test]
    fn in_order_and_reordered() {
        let cfg = StreamConfig::default();
        let mut h = Health::default();
        let mut s = Stream::default();
        let mut out = Vec::new();
        let mut f = collect(&mut out);
        s.push(&cfg, &mut h, Ts(1), 100, true, false, b"", &mut f);
        s.push(&cfg, &mut h, Ts(2), 104, false, false, b"defg", &mut f);
        s.push(&cfg, &mut h, Ts(3), 101, false, false, b"abc", &mut f);
        s.push(&cfg, &mut h, Ts(4), 101, false, false, b"abc", &mut f); // retransmit
        drop(f);
        assert_eq!(out, vec![Out::Data(b"abcdefg".to_vec())]);
        assert_eq!(h.anomaly_count("tcp", "retransmit"), 1);
    }

    #[test]
    fn sequence_wraps() {
        let cfg = StreamConfig::default();
        let mut h = Health::default();
        let mut s = Stream::default();
        let mut out = Vec::new();
        let mut f = collect(&mut out);
        s.push(
            &cfg,
            &mut h,
            Ts(1),
            u32::MAX - 2,
            false,
            false,
            b"abc",
            &mut f,
        );
        s.push(&cfg, &mut h, Ts(2), 0, false, false, b"def", &mut f);
        drop(f);
        assert_eq!(out, vec![Out::Data(b"abcdef".to_vec())]);
    }

    #[test]
    fn ack_beyond_hole_gives_gap() {
        let cfg = StreamConfig::default();
        let mut h = Health::default();
        let mut s = Stream::default();
        let mut out = Vec::new();
        let mut f = collect(&mut out);
        s.push(&cfg, &mut h, Ts(1), 1000, false, false, b"ab", &mut f);
        s.push(&cfg, &mut h, Ts(2), 1005, false, false, b"fg", &mut f);
        s.on_peer_ack(&mut h, 1007, &mut f);
        drop(f);
        assert_eq!(
            out,
            vec![
                Out::Data(b"ab".to_vec()),
                Out::Gap(3),
                Out::Data(b"fg".to_vec())
            ]
        );
        assert_eq!(h.tcp_gap_bytes, 3);
    }

    #[test]
    fn hole_timeout_on_packet_clock() {
        let cfg = StreamConfig {
            hole_timeout_ns: 10,
            ..Default::default()
        };
        let mut h = Health::default();
        let mut s = Stream::default();
        let mut out = Vec::new();
        let mut f = collect(&mut out);
        s.push(&cfg, &mut h, Ts(1), 0, false, false, b"a", &mut f);
        s.push(&cfg, &mut h, Ts(2), 5, false, false, b"f", &mut f);
        s.on_clock(&cfg, &mut h, Ts(5), &mut f);
        assert_eq!(s.buffered(), 1);
        s.on_clock(&cfg, &mut h, Ts(12), &mut f);
        drop(f);
        assert_eq!(
            out,
            vec![
                Out::Data(b"a".to_vec()),
                Out::Gap(4),
                Out::Data(b"f".to_vec())
            ]
        );
    }

    proptest! {
        /// A random byte stream cut into random segments, shuffled, duplicated and partly
        /// dropped reassembles to the original, with exactly the dropped bytes as gaps.
        #[test]
        fn reassembles_any_segmentation(
            data in proptest::collection::vec(any::<u8>(), 1..4000),
            cuts in proptest::collection::vec(1usize..300, 1..80),
            order_seed in any::<u64>(),
            drop_mask in any::<u64>(),
            dup_mask in any::<u64>(),
            isn in any::<u32>(),
        ) {
            // segments
            let mut segs = Vec::new();
            let mut pos = 0usize;
            let mut i = 0;
            while pos < data.len() {
                let len = cuts[i % cuts.len()].min(data.len() - pos);
                segs.push((pos, len));
                pos += len;
                i += 1;
            }
            // never drop the first segment (it anchors a mid-stream join)
            let kept: Vec<(usize, usize, bool)> = segs.iter().enumerate()
                .map(|(k, &(p, l))| (p, l, k == 0 || drop_mask >> (k % 64) & 1 == 0))
                .collect();
            let mut sent: Vec<(usize, usize)> = Vec::new();
            for (k, &(p, l, keep)) in kept.iter().enumerate() {
                if keep {
                    sent.push((p, l));
                    if dup_mask >> (k % 64) & 1 == 1 { sent.push((p, l)); }
                }
            }
            // shuffle all but the first (deterministic from the seed)
            let mut rng = order_seed | 1;
            for j in (2..sent.len()).rev() {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
                let k = 1 + (rng as usize % j);
                sent.swap(j, k);
            }
            let cfg = StreamConfig::default();
            let mut h = Health::default();
            let mut s = Stream::default();
            let mut out = Vec::new();
            {
                let mut f = collect(&mut out);
                for (t, &(p, l)) in sent.iter().enumerate() {
                    s.push(&cfg, &mut h, Ts(t as u64), isn.wrapping_add(p as u32), false, false,
                           &data[p..p + l], &mut f);
                }
                // FIN after the last byte tells where the stream ends
                s.push(&cfg, &mut h, Ts(1_000), isn.wrapping_add(data.len() as u32), false, true, b"", &mut f);
                s.flush(&mut h, &mut f);
            }
            let mut rebuilt = Vec::new();
            let mut gap_bytes = 0u64;
            for o in &out {
                match o {
                    Out::Data(d) => rebuilt.extend_from_slice(d),
                    Out::Gap(n) => { gap_bytes += n; rebuilt.extend(std::iter::repeat_n(0u8, *n as usize)); }
                }
            }
            let mut expected = data.clone();
            let mut dropped = 0u64;
            for &(p, l, keep) in &kept {
                if !keep { expected[p..p + l].fill(0); dropped += l as u64; }
            }
            prop_assert_eq!(rebuilt, expected);
            prop_assert_eq!(gap_bytes, dropped);
            prop_assert_eq!(h.tcp_gap_bytes, dropped);
        }
    }
}
