//! The pipeline in one process: a probe (packet → L2–L4 → TCP flow + reassembly → AMQP
//! or HTTP → oslo.messaging messages and REST exchanges, as observations) and an analyser
//! (observations → correlated RPCs, REST events with their callers, request trees,
//! chains → signals for the sinks), through the same seam a fleet of probes and a
//! collector use (`src/fleet/`).
//!
//! Deterministic and on packet time only: the same capture gives the same signals.

use crate::analyser::Analyser;
use crate::config::Config;
use crate::contract::Observation;
use crate::correlate::Signal;
use crate::health::Health;
use crate::probe::Probe;
use crate::source::PacketRef;
use crate::time::Ts;

pub struct Pipeline {
    pub probe: Probe,
    pub analyser: Analyser,
    observed: Vec<Observation>,
    cfg: Config,
}

impl Pipeline {
    pub fn new(cfg: Config) -> Pipeline {
        Pipeline {
            probe: Probe::new(cfg.clone()),
            analyser: Analyser::new(cfg.clone()),
            observed: Vec::new(),
            cfg,
        }
    }

    /// One captured packet; the signals it produced go to `sink`.
    pub fn packet(&mut self, pkt: &PacketRef<'_>, sink: &mut dyn FnMut(Signal)) {
        self.probe.packet(pkt, &mut self.observed);
        self.analyse(sink);
    }

    /// Live capture with no packet for a while: time still passes (timeouts fire).
    pub fn tick(&mut self, now: Ts, sink: &mut dyn FnMut(Signal)) {
        self.probe.tick(now, &mut self.observed);
        self.analyse(sink);
    }

    /// End of input: flush every connection and judge every open call and request.
    pub fn finish(&mut self, sink: &mut dyn FnMut(Signal)) {
        self.probe.finish(&mut self.observed);
        self.analyse(sink);
        self.analyser.finish(sink);
    }

    /// The analyser's clock follows the probe's; then what the probe saw is observed.
    fn analyse(&mut self, sink: &mut dyn FnMut(Signal)) {
        self.analyser.advance(self.probe.clock());
        if !self.observed.is_empty() {
            // most packets carry none: the drain's setup and drop alone were a cost
            for mut o in self.observed.drain(..) {
                self.analyser.observe(&mut o);
            }
        }
        self.analyser.flush(sink);
    }

    /// Observations a probe made elsewhere (the shards of `src/parallel.rs`) up to
    /// `clock`, analysed as `packet` analyses its own: `feed` hands each to the analyser
    /// in order, and keeps them (to be freed where they were made).
    pub fn analyse_observed(
        &mut self,
        clock: Ts,
        feed: impl FnOnce(&mut dyn FnMut(&mut Observation)),
        sink: &mut dyn FnMut(Signal),
    ) {
        self.analyser.advance(clock);
        feed(&mut |o| self.analyser.observe(o));
        self.analyser.flush(sink);
    }

    /// The end of input after the last observations came through `analyse_observed`.
    pub fn finish_observed(&mut self, sink: &mut dyn FnMut(Signal)) {
        self.analyser.finish(sink);
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Forgets every connection, call and open request, keeping the clock and the health
    /// counters: the next packets are a new capture. The demo's loop replays one capture
    /// again and again, and its ids (msg_id, `_unique_id`, request ids) would otherwise
    /// look like duplicates of the last pass.
    pub fn restart(&mut self) {
        self.probe.restart();
        self.analyser.restart();
    }

    /// The packet time reached (the newest packet's, or a live tick's).
    pub fn clock(&self) -> Ts {
        self.probe.clock()
    }

    /// Both halves' health counters, as one probe in one process reports them.
    pub fn health(&self) -> Health {
        let mut h = self.probe.health.clone();
        h.add(&self.analyser.health);
        h
    }
}
