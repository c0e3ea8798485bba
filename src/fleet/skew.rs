//! Each probe's clock offset, from causality. Probes run on hosts whose clocks NTP keeps
//! within a few milliseconds, and RPC splits are a millisecond or two: the collector
//! corrects every probe's packet times before it joins them.
//!
//! Whenever a probe P saw an event that must precede an event a probe Q saw (a message's
//! publish and its delivery, a reply's publish and its delivery, a call's delivery and
//! its reply's publish, a REST request to an API and the RPCs that API's process
//! published while answering it), `q - p` bounds Q's offset against P's from above:
//! true times are `t - offset`, and `q - oQ >= p - oP` gives `oQ - oP <= q - p`. The
//! smallest such difference per ordered pair (the fastest message) is kept; with both
//! directions bounded, the offset difference is the middle of the interval (the fastest
//! one-way times taken as equal, as NTP does). Offsets are then set relative to one
//! reference probe (the one with the most pairs), each probe through the pair that links
//! it. A pair bounded one way only is corrected just enough that causality holds.
//!
//! Pure: times in, offsets out.

use crate::FastMap as HashMap;
use crate::time::Ts;

/// Upper bounds on `o[q] - o[p]`, as nanoseconds, per ordered pair (p, q).
#[derive(Debug, Default, Clone)]
pub struct Skew {
    upper: HashMap<(usize, usize), i64>,
    probes: usize,
}

impl Skew {
    /// An event on probe `p` at raw time `tp` happened before one on `q` at `tq`.
    pub fn before(&mut self, (p, tp): (usize, Ts), (q, tq): (usize, Ts)) {
        if p == q {
            return;
        }
        self.probes = self.probes.max(p + 1).max(q + 1);
        let d = tq.0 as i64 - tp.0 as i64;
        let e = self.upper.entry((p, q)).or_insert(d);
        *e = (*e).min(d);
    }

    /// The best estimate of `o[q] - o[p]` from this pair alone, if it has samples.
    fn pair(&self, p: usize, q: usize) -> Option<i64> {
        match (self.upper.get(&(p, q)), self.upper.get(&(q, p))) {
            (Some(&u), Some(&v)) => Some((u - v) / 2),
            // bounded one way: move only as far as causality needs
            (Some(&u), None) => Some(u.min(0)),
            (None, Some(&v)) => Some((-v).max(0)),
            (None, None) => None,
        }
    }

    /// Offsets (ns) to subtract from each probe's raw times, `n` probes; a probe linked
    /// to no other by any sample keeps 0.
    pub fn offsets(&self, n: usize) -> Vec<i64> {
        let n = n.max(self.probes);
        let mut off = vec![0i64; n];
        if n == 0 {
            return off;
        }
        // the reference: the probe paired with the most others
        let links = |p: usize| (0..n).filter(|&q| self.pair(p, q).is_some()).count();
        let reference = (0..n).max_by_key(|&p| (links(p), std::cmp::Reverse(p))).unwrap_or(0);
        let mut known = vec![false; n];
        known[reference] = true;
        let mut frontier = vec![reference];
        // breadth first from the reference through linked pairs
        while let Some(p) = frontier.pop() {
            for q in 0..n {
                if !known[q]
                    && let Some(d) = self.pair(p, q)
                {
                    off[q] = off[p] + d;
                    known[q] = true;
                    frontier.insert(0, q);
                }
            }
        }
        off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: f64) -> Ts {
        Ts((x * 1e6) as u64 + 1_000_000_000_000)
    }

    #[test]
    fn two_probes_with_messages_both_ways_get_their_true_offset() {
        // probe 1's clock is 5 ms ahead; one-way broker latency 0.3 ms to 2 ms
        let mut s = Skew::default();
        for (i, lat) in [0.3, 1.0, 2.0, 0.5].into_iter().enumerate() {
            let t = i as f64 * 10.0;
            s.before((0, ms(t)), (1, ms(t + lat + 5.0)));
            s.before((1, ms(t + 5.0)), (0, ms(t + lat)));
        }
        let off = s.offsets(2);
        assert!((off[1] - off[0] - 5_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn a_probe_linked_only_through_another_is_placed_through_it() {
        let mut s = Skew::default();
        // 0 ↔ 1: offset 2 ms; 1 ↔ 2: 2 is 3 ms behind 1
        s.before((0, ms(0.0)), (1, ms(2.5)));
        s.before((1, ms(10.0)), (0, ms(8.5)));
        s.before((1, ms(20.0)), (2, ms(17.5)));
        s.before((2, ms(30.0)), (1, ms(33.5)));
        let off = s.offsets(3);
        assert!((off[1] - off[0] - 2_000_000).abs() < 10, "{off:?}");
        assert!((off[2] - off[1] + 3_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn one_way_bounds_correct_only_what_causality_needs() {
        let mut s = Skew::default();
        // deliveries on 1 appear 1 ms before their publishes on 0: 1 is at least 1 ms behind
        s.before((0, ms(10.0)), (1, ms(9.0)));
        assert_eq!(s.offsets(2)[1] - s.offsets(2)[0], -1_000_000);
        let mut s = Skew::default();
        s.before((0, ms(10.0)), (1, ms(12.0)));
        assert_eq!(s.offsets(2), vec![0, 0]);
        assert_eq!(Skew::default().offsets(3), vec![0, 0, 0]);
    }
}
