//! Each probe's clock offset, from causality. Probes run on hosts whose clocks NTP keeps
//! within a few milliseconds, and RPC splits are a millisecond or two: the collector
//! corrects every probe's packet times before it joins them.
//!
//! Whenever a probe P saw an event that must precede an event a probe Q saw (a message's
//! publish and its delivery, a reply's publish and its delivery, a call's delivery and
//! its reply's publish, a REST request to an API and the RPCs that API's process
//! published while answering it), `q - p` bounds Q's offset against P's from above:
//! true times are `t - offset`, and `q - oQ >= p - oP` gives `oQ - oP <= q - p`. The
//! smallest such difference per ordered pair is kept.
//!
//! The bounds chain: what A → B and B → C allow bounds A → C too (a shortest-path closure
//! over the pairs), so a pair with only slow messages between them (say, through a queue
//! whose leader sits on a third node) is still bounded tightly through the third. Each
//! probe's offsets are none at all while no event was stamped before its cause: NTP keeps
//! clocks closer than the bounds can tell, and one direction between two nodes is often
//! slower than the other (a quorum queue's replication), which would pull a middle
//! estimate off by half the difference. Once causality proves some clock wrong, each
//! probe's offset against a reference probe (the one linked to most, or the configured
//! one) is the middle of its two bounds: the fastest paths are taken to be as fast one
//! way as the other, as NTP takes a network path. A probe bounded one way only (one that
//! only ever receives, say) is taken to be one fastest transit away from its bound: the
//! fastest one-way time any pair bounded both ways shows (half its round trip), or, with
//! no such pair, none at all: then it moves only as far as causality needs.
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

    /// The tightest bound on `o[q] - o[p]` for every pair, through any chain of pairs.
    fn closure(&self, n: usize) -> Vec<Vec<Option<i64>>> {
        let mut d = vec![vec![None; n]; n];
        for (i, row) in d.iter_mut().enumerate() {
            row[i] = Some(0);
        }
        for (&(p, q), &u) in &self.upper {
            if p < n && q < n {
                d[p][q] = Some(u);
            }
        }
        for k in 0..n {
            let through = d[k].clone();
            for row in d.iter_mut() {
                let Some(ik) = row[k] else { continue };
                for (ij, kj) in row.iter_mut().zip(&through) {
                    if let Some(kj) = kj
                        && ij.is_none_or(|ij| ik + kj < ij)
                    {
                        *ij = Some(ik + kj);
                    }
                }
            }
        }
        d
    }

    /// Offsets (ns) to subtract from each probe's raw times, `n` probes, relative to
    /// `reference` (or the probe linked to most others); a probe linked to no other by any
    /// sample keeps 0.
    pub fn offsets(&self, n: usize, reference: Option<usize>) -> Vec<i64> {
        let n = n.max(self.probes);
        if n == 0 {
            return Vec::new();
        }
        let d = self.closure(n);
        let links = |p: usize| {
            (0..n)
                .filter(|&q| q != p && d[p][q].is_some() && d[q][p].is_some())
                .count()
        };
        // estimated from the best linked probe (the hub), then told against the reference
        let r = (0..n)
            .max_by_key(|&p| (links(p), std::cmp::Reverse(p)))
            .unwrap_or(0);
        // the fastest one-way time: half the shortest round trip of a pair bounded both ways
        let transit = (0..n)
            .flat_map(|p| (0..n).map(move |q| (p, q)))
            .filter(|(p, q)| p < q)
            .filter_map(|(p, q)| Some((d[p][q]? + d[q][p]?) / 2))
            .filter(|t| *t >= 0)
            .min()
            .unwrap_or(0);
        // no clock proved wrong: every event seen after its cause as the probes stamped
        // them. NTP's word stands (see the module's comment)
        if d.iter().flatten().all(|b| b.is_none_or(|b| b >= 0)) {
            return vec![0; n];
        }
        // bounded both ways against the hub: the middle of the two bounds
        let mut from_hub: Vec<Option<i64>> = (0..n)
            .map(|q| match (d[q][r], d[r][q]) {
                _ if q == r => Some(0),
                (Some(back), Some(hi)) => Some((hi - back) / 2),
                _ => None,
            })
            .collect();
        // bounded one way only: a fastest transit inside the tightest bound any placed
        // probe gives (with no transit known, only as far as causality needs)
        let placed: Vec<(usize, i64)> = from_hub
            .iter()
            .enumerate()
            .filter_map(|(k, o)| Some((k, (*o)?)))
            .collect();
        for (q, slot) in from_hub.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let hi = placed
                .iter()
                .filter_map(|&(k, ok)| Some(ok + d[k][q]?))
                .min();
            let lo = placed
                .iter()
                .filter_map(|&(k, ok)| Some(ok - d[q][k]?))
                .max();
            *slot = Some(match (lo, hi) {
                (Some(lo), Some(hi)) => (lo + hi) / 2,
                (None, Some(hi)) if transit > 0 => hi - transit,
                (Some(lo), None) if transit > 0 => lo + transit,
                (None, Some(hi)) => hi.min(0),
                (Some(lo), None) => lo.max(0),
                (None, None) => 0,
            });
        }
        let from_hub: Vec<i64> = from_hub.into_iter().map(|o| o.unwrap_or(0)).collect();
        let base = reference.filter(|&x| x < n).map_or(0, |x| from_hub[x]);
        from_hub.into_iter().map(|o| o - base).collect()
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
        let off = s.offsets(2, Some(0));
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
        let off = s.offsets(3, Some(0));
        assert!((off[1] - off[0] - 2_000_000).abs() < 10, "{off:?}");
        assert!((off[2] - off[1] + 3_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn a_pair_with_only_slow_messages_is_bounded_through_a_third_probe() {
        // same clocks; 0 ↔ 2 and 1 ↔ 2 fast (1 ms); 0 → 1 only slow (6 ms), 1 → 0 fast
        let mut s = Skew::default();
        for (p, q) in [(0, 2), (2, 0), (1, 2), (2, 1), (1, 0)] {
            s.before((p, ms(0.0)), (q, ms(1.0)));
        }
        s.before((0, ms(0.0)), (1, ms(6.0)));
        let off = s.offsets(3, Some(0));
        assert!(off[1].abs() <= 500_000, "{off:?}");
    }

    #[test]
    fn a_probe_that_only_receives_is_a_fastest_transit_from_its_bound() {
        // 0 ↔ 1 same clock, 1 ms transits both ways; 2 (3 ms behind) only receives from 0
        let mut s = Skew::default();
        s.before((0, ms(0.0)), (1, ms(1.0)));
        s.before((1, ms(5.0)), (0, ms(6.0)));
        s.before((0, ms(10.0)), (2, ms(8.0)));
        let off = s.offsets(3, Some(0));
        assert!((off[2] + 3_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn a_receiving_probe_is_placed_from_the_probe_it_is_linked_to_whatever_the_reference() {
        // 0 and 1 linked both ways (1 is 7 ms behind 0, asymmetric paths), 2 receives
        // from 1 only (2 is 4 ms ahead of 1): the same offsets whoever is the reference
        let mut s = Skew::default();
        s.before((0, ms(10.0)), (1, ms(10.0 - 5.861)));
        s.before((1, ms(10.0)), (0, ms(18.133)));
        s.before((1, ms(10.0)), (2, ms(15.143)));
        for reference in [None, Some(0), Some(1), Some(2)] {
            let off = s.offsets(3, reference);
            assert!(
                (off[2] - off[1] - 4_007_000).abs() < 200_000,
                "{reference:?}: {off:?}"
            );
            assert!(
                (off[1] - off[0] + 6_997_000).abs() < 10,
                "{reference:?}: {off:?}"
            );
        }
    }

    #[test]
    fn clocks_no_event_contradicts_are_left_alone_however_lopsided_the_paths() {
        // same clocks; 0 → 1 takes 0.2 ms at best, 1 → 0 4 ms (a quorum queue's leader
        // elsewhere): a middle estimate would put 1 1.9 ms off
        let mut s = Skew::default();
        s.before((0, ms(0.0)), (1, ms(0.2)));
        s.before((1, ms(10.0)), (0, ms(14.0)));
        assert_eq!(s.offsets(2, Some(0)), vec![0, 0]);
    }

    #[test]
    fn one_way_bounds_correct_only_what_causality_needs() {
        let mut s = Skew::default();
        // deliveries on 1 appear 1 ms before their publishes on 0: 1 is at least 1 ms behind
        s.before((0, ms(10.0)), (1, ms(9.0)));
        assert_eq!(s.offsets(2, Some(0))[1], -1_000_000);
        let mut s = Skew::default();
        s.before((0, ms(10.0)), (1, ms(12.0)));
        assert_eq!(s.offsets(2, Some(0)), vec![0, 0]);
        assert_eq!(Skew::default().offsets(3, None), vec![0, 0, 0]);
    }
}
