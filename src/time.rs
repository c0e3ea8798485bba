//! Packet time. Every stage between the source and the sinks runs on this clock only.

use std::fmt;

/// A duration in seconds (from the config) as nanoseconds; negative or NaN is zero, and
/// more than ~584 years saturates.
pub fn secs_to_ns(secs: f64) -> u64 {
    if secs.is_nan() || secs <= 0.0 {
        0
    } else {
        (secs * 1e9).min(u64::MAX as f64) as u64
    }
}

/// Nanoseconds since the Unix epoch, as stamped on the packet by the capture.
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ts(pub u64);

impl Ts {
    pub const ZERO: Ts = Ts(0);

    pub fn from_parts(secs: u64, nanos: u64) -> Ts {
        Ts(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
    }

    pub fn from_secs_f64(secs: f64) -> Ts {
        Ts((secs.max(0.0) * 1e9) as u64)
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// Seconds from `earlier` to `self`, negative if `earlier` is later.
    pub fn secs_since(self, earlier: Ts) -> f64 {
        (self.0 as i128 - earlier.0 as i128) as f64 / 1e9
    }

    pub fn plus_millis(self, ms: u64) -> Ts {
        Ts(self.0.saturating_add(ms.saturating_mul(1_000_000)))
    }

    pub fn plus_secs(self, secs: f64) -> Ts {
        Ts(self.0.saturating_add((secs.max(0.0) * 1e9) as u64))
    }
}

impl fmt::Debug for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}", self.as_secs_f64())
    }
}
