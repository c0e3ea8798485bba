//! How much of the broker the analyser sees. One probe on one node of a RabbitMQ cluster
//! sees the connections to that node only, and oslo.messaging spreads one call's four
//! wire events (publish, deliver, reply publish, reply deliver) over the nodes its
//! connections happen to be on. "Not seen here" must then never read as "failed": a call
//! whose reply went through another node did not time out.
//!
//! The evidence of a partial view is what a complete one never shows, however late it
//! joined (each kind below is sound mid-stream too):
//! * `split_call`: a call seen on both sides of a hole, its publish and its reply but not
//!   its delivery, or its delivery and the reply's delivery but not the reply's publish;
//! * `delivery_without_publish`: a call delivered when its publish must have been inside
//!   the capture (delivered later than its own timeout after the first packet: the broker
//!   drops an expired request);
//! * `reply_without_call`: a reply delivered to a reply queue whose consumer started in the
//!   capture, for a call never seen (every call answered there was published after).
//!
//! While evidence is recent (`view.partial_for_s`), the correlator judges nothing the view
//! cannot support: no timeout, no undelivered cast, no orphan-reply anomaly. A collector
//! joining every node's probe sees it all, and judges.

use crate::time::Ts;
use std::collections::BTreeMap;

/// `[view]`: how much of the broker the analyser sees.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewConfig {
    /// How long one piece of evidence keeps the view partial (packet time).
    pub partial_for_s: f64,
    /// How long after the first message a view with no evidence of being partial is taken
    /// for complete; verdicts that need a complete view wait until then.
    pub settle_s: f64,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig {
            partial_for_s: 600.0,
            settle_s: 10.0,
        }
    }
}

/// What the view is, as far as the evidence tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Everything goes by here (as far as the evidence tells, for long enough).
    Complete,
    Partial,
    /// Too early to tell: no evidence yet, and not for long.
    Undecided,
}

#[derive(Debug, Clone, Default)]
pub struct View {
    cfg: ViewConfig,
    first: Option<Ts>,
    last_evidence: Option<Ts>,
    /// Evidence by kind, since the start.
    pub evidence: BTreeMap<&'static str, u64>,
    /// How many pieces of evidence, all kinds: it grows exactly when `evidence` changes.
    evidence_total: u64,
}

impl View {
    pub fn new(cfg: ViewConfig) -> View {
        View {
            cfg,
            ..View::default()
        }
    }

    /// The first packet time seen (the start of what the capture can show).
    pub fn first(&self) -> Option<Ts> {
        self.first
    }

    /// Notes packet time (the first call starts the view).
    pub fn saw(&mut self, t: Ts) {
        if self.first.is_none() && t > Ts::ZERO {
            self.first = Some(t);
        }
    }

    /// Grows exactly when `evidence` changes: a reader can tell that without a walk.
    pub fn evidence_total(&self) -> u64 {
        self.evidence_total
    }

    pub fn evidence(&mut self, kind: &'static str, t: Ts) {
        *self.evidence.entry(kind).or_default() += 1;
        self.evidence_total += 1;
        self.last_evidence = Some(self.last_evidence.map_or(t, |l| l.max(t)));
    }

    /// Part of the traffic goes by elsewhere, as of `now`.
    pub fn partial(&self, now: Ts) -> bool {
        self.last_evidence
            .is_some_and(|e| now.secs_since(e) <= self.cfg.partial_for_s)
    }

    /// What the view is as of `now`; at the end of the input an undecided view is taken
    /// for complete (nothing in the whole capture said otherwise).
    pub fn seen(&self, now: Ts, at_end: bool) -> Seen {
        if self.partial(now) {
            Seen::Partial
        } else if at_end
            || self
                .first
                .is_some_and(|f| now.secs_since(f) >= self.cfg.settle_s)
        {
            Seen::Complete
        } else {
            Seen::Undecided
        }
    }

    /// Was the view ever partial.
    pub fn ever_partial(&self) -> bool {
        self.last_evidence.is_some()
    }
}
