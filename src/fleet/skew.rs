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
//! A message's transit through the broker (publish → delivery) takes about as long one
//! way as the other, as a network path does for NTP: with transits both ways, the offset
//! difference is the middle of their fastest ones. Their mean is the cluster's fastest
//! transit, which a pair with transits one way only is then taken to have (the nodes of
//! one cluster sit on one network). The other orders (a server's work, a REST request's
//! span) only bound it. Offsets are then set relative to one reference
//! probe (the one with the most pairs), each probe through the pair that links it. A pair
//! bounded one way only is corrected just enough that causality holds.
//!
//! Pure: times in, offsets out.

use crate::FastMap as HashMap;
use crate::time::Ts;

/// How an order was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A message's publish and its delivery: about as long one way as the other.
    Transit,
    /// Any other order: a bound only.
    Bound,
}

/// Upper bounds on `o[q] - o[p]`, as nanoseconds, per ordered pair (p, q): from every
/// order, and from transits alone.
#[derive(Debug, Default, Clone)]
pub struct Skew {
    upper: HashMap<(usize, usize), i64>,
    transit: HashMap<(usize, usize), i64>,
    probes: usize,
}

fn keep_min(m: &mut HashMap<(usize, usize), i64>, k: (usize, usize), d: i64) {
    let e = m.entry(k).or_insert(d);
    *e = (*e).min(d);
}

impl Skew {
    /// An event on probe `p` at raw time `tp` happened before one on `q` at `tq`.
    pub fn before(&mut self, how: Order, (p, tp): (usize, Ts), (q, tq): (usize, Ts)) {
        if p == q {
            return;
        }
        self.probes = self.probes.max(p + 1).max(q + 1);
        let d = tq.0 as i64 - tp.0 as i64;
        keep_min(&mut self.upper, (p, q), d);
        if how == Order::Transit {
            keep_min(&mut self.transit, (p, q), d);
        }
    }

    /// The fastest transit between two nodes, from the pairs with transits both ways.
    fn typical_transit(&self) -> Option<i64> {
        self.transit
            .iter()
            .filter_map(|(&(p, q), &u)| Some((u + self.transit.get(&(q, p))?) / 2))
            .min()
    }

    /// The best estimate of `o[q] - o[p]` from this pair alone, if it has samples: the
    /// middle of the fastest transits both ways (or the one way less the cluster's
    /// typical transit), kept within every bound.
    fn pair(&self, p: usize, q: usize, typical: Option<i64>) -> Option<i64> {
        let hi = self.upper.get(&(p, q)).copied();
        let lo = self.upper.get(&(q, p)).map(|v| -v);
        let transits = (self.transit.get(&(p, q)), self.transit.get(&(q, p)));
        let estimate = match (transits, lo, hi, typical) {
            ((Some(&u), Some(&v)), _, _, _) => (u - v) / 2,
            ((Some(&u), None), _, _, Some(tau)) => u - tau,
            ((None, Some(&v)), _, _, Some(tau)) => tau - v,
            (_, Some(lo), Some(hi), _) => (lo + hi) / 2,
            // bounded one way: move only as far as causality needs
            (_, None, Some(hi), _) => hi.min(0),
            (_, Some(lo), None, _) => lo.max(0),
            (_, None, None, _) => return None,
        };
        Some(match (lo, hi) {
            (Some(lo), Some(hi)) if lo <= hi => estimate.clamp(lo, hi),
            _ => estimate,
        })
    }

    /// Offsets (ns) to subtract from each probe's raw times, `n` probes, relative to
    /// `reference` (or the probe linked to most others); a probe linked to no other by any
    /// sample keeps 0.
    pub fn offsets(&self, n: usize, reference: Option<usize>) -> Vec<i64> {
        let n = n.max(self.probes);
        let mut off = vec![0i64; n];
        if n == 0 {
            return off;
        }
        let typical = self.typical_transit();
        // the reference: the probe paired with the most others
        let links = |p: usize| {
            (0..n)
                .filter(|&q| self.pair(p, q, typical).is_some())
                .count()
        };
        let reference = reference.filter(|&r| r < n).unwrap_or_else(|| {
            (0..n)
                .max_by_key(|&p| (links(p), std::cmp::Reverse(p)))
                .unwrap_or(0)
        });
        let mut known = vec![false; n];
        known[reference] = true;
        let mut frontier = vec![reference];
        // breadth first from the reference through linked pairs
        while let Some(p) = frontier.pop() {
            for q in 0..n {
                if !known[q]
                    && let Some(d) = self.pair(p, q, typical)
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
            s.before(Order::Transit, (0, ms(t)), (1, ms(t + lat + 5.0)));
            s.before(Order::Transit, (1, ms(t + 5.0)), (0, ms(t + lat)));
        }
        let off = s.offsets(2, None);
        assert!((off[1] - off[0] - 5_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn a_probe_linked_only_through_another_is_placed_through_it() {
        let mut s = Skew::default();
        // 0 ↔ 1: offset 2 ms; 1 ↔ 2: 2 is 3 ms behind 1
        s.before(Order::Transit, (0, ms(0.0)), (1, ms(2.5)));
        s.before(Order::Transit, (1, ms(10.0)), (0, ms(8.5)));
        s.before(Order::Transit, (1, ms(20.0)), (2, ms(17.5)));
        s.before(Order::Transit, (2, ms(30.0)), (1, ms(33.5)));
        let off = s.offsets(3, None);
        assert!((off[1] - off[0] - 2_000_000).abs() < 10, "{off:?}");
        assert!((off[2] - off[1] + 3_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn transits_set_the_offset_and_slower_orders_only_bound_it() {
        // transits of 0.3 ms both ways around a 2 ms offset; a server's 5 ms work one way
        let mut s = Skew::default();
        s.before(Order::Transit, (0, ms(0.0)), (1, ms(2.3)));
        s.before(Order::Transit, (1, ms(10.0)), (0, ms(8.3)));
        s.before(Order::Bound, (1, ms(20.0)), (0, ms(23.0)));
        let off = s.offsets(2, None);
        assert!((off[1] - off[0] - 2_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn a_pair_with_transits_one_way_takes_the_clusters_typical_transit() {
        // 0 ↔ 1 both ways (1 ms transits, no offset); 2 only receives from 0, 1 ms later
        // than it was published by 2's clock 3 ms ahead
        let mut s = Skew::default();
        s.before(Order::Transit, (0, ms(0.0)), (1, ms(1.0)));
        s.before(Order::Transit, (1, ms(5.0)), (0, ms(6.0)));
        s.before(Order::Transit, (0, ms(10.0)), (2, ms(14.0)));
        s.before(Order::Bound, (2, ms(20.0)), (0, ms(30.0)));
        let off = s.offsets(3, None);
        assert!((off[2] - off[0] - 3_000_000).abs() < 10, "{off:?}");
    }

    #[test]
    fn one_way_bounds_correct_only_what_causality_needs() {
        let mut s = Skew::default();
        // deliveries on 1 appear 1 ms before their publishes on 0: 1 is at least 1 ms behind
        s.before(Order::Bound, (0, ms(10.0)), (1, ms(9.0)));
        assert_eq!(s.offsets(2, None)[1] - s.offsets(2, None)[0], -1_000_000);
        let mut s = Skew::default();
        s.before(Order::Bound, (0, ms(10.0)), (1, ms(12.0)));
        assert_eq!(s.offsets(2, None), vec![0, 0]);
        assert_eq!(Skew::default().offsets(3, None), vec![0, 0, 0]);
    }
}
