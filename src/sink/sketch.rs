//! A small log-bucket latency sketch: bounded memory, ~2.5% relative error, exact count,
//! sum and max. Used for the summary's quantiles (and later the graph's edges).

use serde::Serialize;

const MIN: f64 = 1e-6; // 1 µs
const GROWTH: f64 = 1.05;
const BUCKETS: usize = 480; // up to 1e-6 · 1.05^480 ≈ 1.5e4 s

/// Buckets are kept only over the range observed so far (`base..base + counts.len()`):
/// one edge's latencies in one time slot span a few dozen buckets, and the graph keeps
/// many slots per edge.
#[derive(Debug, Clone, Default)]
pub struct Sketch {
    base: usize,
    counts: Vec<u32>,
    pub count: u64,
    pub sum: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// A value with its bucket worked out, to observe into several sketches for the price
/// of one logarithm (the graph counts each latency in its time slot and in the total).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    value: f64,
    bucket: usize,
}

impl Sample {
    /// None for a value no sketch counts (not finite).
    pub fn of(v: f64) -> Option<Sample> {
        let value = if v.is_finite() {
            v.max(0.0)
        } else {
            return None;
        };
        let bucket = if value <= MIN {
            0
        } else {
            ((value / MIN).ln() / GROWTH.ln()).ceil() as usize
        };
        Some(Sample {
            value,
            bucket: bucket.min(BUCKETS - 1),
        })
    }
}

impl Sketch {
    pub fn observe(&mut self, v: f64) {
        if let Some(s) = Sample::of(v) {
            self.take(s);
        }
    }

    pub fn take(&mut self, s: Sample) {
        self.add(s.bucket, 1);
        self.count += 1;
        self.sum += s.value;
        self.max = self.max.max(s.value);
    }

    /// Adds another sketch's observations (for windows made of slots).
    pub fn merge(&mut self, other: &Sketch) {
        if !other.counts.is_empty() {
            // widen to the other's range, then add bucket by bucket
            self.add(other.base, 0);
            self.add(other.base + other.counts.len() - 1, 0);
            let at = other.base - self.base;
            for (a, b) in self.counts[at..].iter_mut().zip(&other.counts) {
                *a += b;
            }
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// Adds `n` to bucket `i`, growing the kept range to include it.
    fn add(&mut self, i: usize, n: u32) {
        if self.counts.is_empty() {
            self.base = i;
            self.counts.push(n);
            return;
        }
        if i < self.base {
            let grow = self.base - i;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.base = i;
        } else if i >= self.base + self.counts.len() {
            self.counts.resize(i - self.base + 1, 0);
        }
        self.counts[i - self.base] += n;
    }

    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen >= rank {
                // upper edge of the bucket, never above the true maximum
                return (MIN * GROWTH.powi((self.base + i) as i32)).min(self.max);
            }
        }
        self.max
    }

    /// Observations per interval of `bounds` (ascending upper bounds, seconds), plus one
    /// past the last: the distribution drawn as a histogram. A bucket straddling a bound
    /// counts below it (the sketch's ~5 % resolution).
    pub fn histogram(&self, bounds: &[f64]) -> Vec<u64> {
        let mut out = vec![0u64; bounds.len() + 1];
        for (i, &c) in self.counts.iter().enumerate() {
            let lower = MIN * GROWTH.powi((self.base + i) as i32 - 1);
            let at = bounds.partition_point(|&b| b < lower);
            out[at] += c as u64;
        }
        out
    }

    pub fn summary(&self) -> Quantiles {
        Quantiles {
            count: self.count,
            mean: if self.count > 0 {
                self.sum / self.count as f64
            } else {
                0.0
            },
            p50: self.quantile(0.5),
            p95: self.quantile(0.95),
            p99: self.quantile(0.99),
            max: self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_once_in_its_interval() {
        let mut s = Sketch::default();
        for v in [0.0005, 0.002, 0.003, 0.05, 2.0, 100.0] {
            s.observe(v);
        }
        assert_eq!(s.histogram(&[0.001, 0.01, 0.1, 1.0]), vec![1, 2, 1, 0, 2]);
        assert_eq!(Sketch::default().histogram(&[1.0]), vec![0, 0]);
    }

    #[test]
    fn quantiles_within_error() {
        let mut s = Sketch::default();
        for i in 1..=1000 {
            s.observe(i as f64 / 1000.0);
        }
        let q = s.summary();
        assert!((q.p50 - 0.5).abs() / 0.5 < 0.06, "{q:?}");
        assert!((q.p99 - 0.99).abs() / 0.99 < 0.06, "{q:?}");
        assert_eq!(q.max, 1.0);
        s.observe(f64::NAN);
        assert_eq!(s.count, 1000);
    }

    #[test]
    fn merged_slots_equal_one_sketch() {
        let (mut all, mut low, mut high) =
            (Sketch::default(), Sketch::default(), Sketch::default());
        for i in 1..=500 {
            let (a, b) = (i as f64 * 1e-4, i as f64 * 0.1);
            all.observe(a);
            all.observe(b);
            low.observe(a);
            high.observe(b);
        }
        let mut merged = Sketch::default();
        merged.merge(&high);
        merged.merge(&Sketch::default());
        merged.merge(&low);
        let (m, a) = (merged.summary(), all.summary());
        assert_eq!(
            (m.count, m.p50, m.p95, m.p99, m.max),
            (a.count, a.p50, a.p95, a.p99, a.max)
        );
        assert!((m.mean - a.mean).abs() < 1e-9);
        assert_eq!((merged.base, &merged.counts), (all.base, &all.counts));
    }
}
