//! The analyser: observations (from one probe, or many joined by a collector) → RPC and
//! REST events → request trees, chains and masked failures, as signals for the sinks.
//! It judges: outcomes and timeouts on its packet clock, callers from everything the
//! probes' AMQP connections named, failures and their root causes.
//!
//! Deterministic and on packet time only. Time passes by `advance` (every packet of a
//! probe in the same process, a collector's watermark), observations arrive by `observe`,
//! and `flush` hands what they produced to the sinks in order.

use crate::config::Config;
use crate::contract::{Event, Obs, Observation};
use crate::correlate::{Correlator, Signal};
use crate::health::Health;
use crate::openstack::RestEvents;
use crate::time::Ts;
use crate::trace::{Traced, Tracer};

pub struct Analyser {
    cfg: Config,
    pub health: Health,
    correlator: Correlator,
    rest: RestEvents,
    tracer: Tracer,
    traced: Vec<Traced>,
    clock: Ts,
    signals: Vec<Signal>,
    /// The view's evidence total when `health.unseen` was last copied from it.
    unseen_copied: Option<u64>,
}

impl Analyser {
    pub fn new(cfg: Config) -> Analyser {
        Analyser {
            correlator: Correlator::new(cfg.rpc.clone(), cfg.view.clone()),
            rest: RestEvents::new(&cfg.http),
            tracer: Tracer::new(cfg.requests.clone()),
            traced: Vec::new(),
            health: Health::default(),
            clock: Ts::ZERO,
            signals: Vec::new(),
            unseen_copied: None,
            cfg,
        }
    }

    /// Forgets every connection, call and open request, keeping the clock and the health
    /// counters: what comes next is a new capture (see `Pipeline::restart`).
    pub fn restart(&mut self) {
        let health = std::mem::take(&mut self.health);
        let (clock, keep_events) = (self.clock, self.tracer.keep_events);
        *self = Analyser::new(self.cfg.clone());
        self.health = health;
        self.clock = clock;
        self.tracer.keep_events = keep_events;
    }

    /// Request trees keep every wire detail of their events (for OTLP spans).
    pub fn keep_events(&mut self) {
        self.tracer.keep_events = true;
    }

    /// The packet time reached.
    pub fn clock(&self) -> Ts {
        self.clock
    }

    /// Packet time reached `now`: the calls and casts whose time is up are judged.
    pub fn advance(&mut self, now: Ts) {
        if now > self.clock {
            self.clock = now;
        }
        self.correlator
            .advance(self.clock, &mut self.health, &mut self.signals);
    }

    /// One observation (at its own time, which may lag the clock). An exchange's texts
    /// are taken into its event (a copy of each was an allocation, a copy and a free);
    /// the rest is only read, and the caller frees it: with `--threads`, on the thread
    /// that made it (`src/parallel.rs`), where a free costs a fraction of one from
    /// another thread.
    pub fn observe(&mut self, o: &mut Observation) {
        if o.t > self.clock {
            self.advance(o.t);
        }
        match &mut o.what {
            Obs::Http(h) => {
                let ev = self
                    .rest
                    .event(h, self.correlator.addresses(), &mut self.health);
                self.signals.push(Signal::Event(Event::Http(Box::new(ev))));
            }
            Obs::Tick | Obs::ProbeStats(_) | Obs::End => {}
            other => self
                .correlator
                .on_obs(o.t, other, &mut self.health, &mut self.signals),
        }
    }

    /// Hands what the observations and the passing time produced to `sink`: events (each
    /// also taken in by the tracer), then the requests the tracer judged. The signals are
    /// the sink's: with `--threads` they go on to the sinks on whichever thread is free.
    pub fn flush(&mut self, sink: &mut dyn FnMut(Signal)) {
        if !self.signals.is_empty() {
            self.flush_signals(sink);
        }
        self.tracer.advance(self.clock, &mut self.traced);
        self.emit_traced(sink);
        let view = self.correlator.view();
        self.health.partial_view = view.partial(self.clock);
        // flushed after every packet: a copy only when the evidence changed (a map's
        // clone is a fresh allocation, its comparison a walk)
        if self.unseen_copied != Some(view.evidence_total()) {
            self.unseen_copied = Some(view.evidence_total());
            self.health.unseen.clone_from(&view.evidence);
        }
    }

    /// The events (each also taken in by the tracer) and verdicts, in order. Apart from
    /// `flush`: most packets produce none, and the drain alone cost more than the test.
    fn flush_signals(&mut self, sink: &mut dyn FnMut(Signal)) {
        for s in self.signals.drain(..) {
            if let Signal::Event(ev) = &s {
                self.tracer
                    .observe(ev, self.clock, &mut self.health, &mut self.traced);
            }
            sink(s);
        }
    }

    /// End of input: every open call, cast and request is judged.
    pub fn finish(&mut self, sink: &mut dyn FnMut(Signal)) {
        self.flush(sink);
        self.correlator
            .finish_all(&mut self.health, &mut self.signals);
        self.flush(sink);
        // handed over as they are built, not all at the end: with `--threads` the sinks
        // take the first trees while the tracer builds the rest
        self.tracer
            .finish_all(&mut self.traced, &mut |traced| emit(traced, sink));
    }

    /// Request trees, chains and masked failures, as signals.
    fn emit_traced(&mut self, sink: &mut dyn FnMut(Signal)) {
        if !self.traced.is_empty() {
            emit(&mut self.traced, sink);
        }
    }
}

/// The tracer's verdicts, as signals.
fn emit(traced: &mut Vec<Traced>, sink: &mut dyn FnMut(Signal)) {
    for t in traced.drain(..) {
        let s = match t {
            Traced::Tree(tree) => Signal::Request(tree),
            Traced::Chain(c) => Signal::Event(Event::Chain(c)),
            Traced::Masked(m) => Signal::Masked(m),
        };
        sink(s);
    }
}
