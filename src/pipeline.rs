//! The pipeline, top to bottom: packet → L2–L4 → TCP flow + reassembly → per
//! connection AMQP or HTTP → oslo.messaging RPCs (correlated) and REST exchanges (with
//! OpenStack semantics) → signals for the sinks.
//!
//! Deterministic and on packet time only: the same capture gives the same signals.

use crate::config::Config;
use crate::contract::Event;
use crate::correlate::{Correlator, Signal};
use crate::decode::{self, Decoded};
use crate::health::Health;
use crate::openstack::Rest;
use crate::protocols::{self, Choice, Conn, Found};
use crate::source::Packet;
use crate::tcp::FlowTable;
use crate::time::Ts;
use crate::trace::{Traced, Tracer};

pub struct Pipeline {
    cfg: Config,
    pub health: Health,
    flows: FlowTable<Conn>,
    correlator: Correlator,
    rest: Rest,
    tracer: Tracer,
    traced: Vec<Traced>,
    clock: Ts,
    found: Found,
    signals: Vec<Signal>,
}

impl Pipeline {
    pub fn new(cfg: Config) -> Pipeline {
        Pipeline {
            flows: FlowTable::new(cfg.flows.clone()),
            correlator: Correlator::new(cfg.correlator.clone()),
            rest: Rest::new(cfg.rest.clone()),
            tracer: Tracer::new(cfg.trace.clone()),
            traced: Vec::new(),
            cfg,
            health: Health::default(),
            clock: Ts::ZERO,
            found: Found::default(),
            signals: Vec::new(),
        }
    }

    /// One captured packet; the signals it produced go to `sink`.
    pub fn packet(&mut self, pkt: &Packet, sink: &mut dyn FnMut(&Signal, &Health)) {
        self.health.packets += 1;
        self.health.bytes += pkt.orig_len.max(pkt.data.len() as u32) as u64;
        // the clock never goes back; a packet stamped earlier is processed at its own time
        if pkt.ts < self.clock {
            self.health.anomaly("capture", "clock_regression");
        } else {
            self.clock = pkt.ts;
        }
        self.correlator.advance(self.clock, &mut self.signals);
        match decode::decode(pkt.linktype, &pkt.data) {
            Decoded::Tcp(seg) => {
                let cfg = &self.cfg;
                let choice = Choice {
                    amqp_ports: &cfg.amqp_ports,
                    amqp_max_frame: cfg.amqp_max_frame,
                    amqp_max_body: cfg.amqp_max_body,
                    http_ports: &|p| cfg.rest.is_api_port(p),
                    sniff_other_ports: cfg.rest.sniff_other_ports,
                    http: &cfg.http,
                };
                self.flows
                    .segment(&seg, pkt.ts, &mut self.health, &mut self.found, |f| {
                        protocols::choose(f, &choice)
                    });
            }
            Decoded::NotTcp => {}
            Decoded::Fragment => self.health.anomaly("ip", "fragment"),
            Decoded::UnsupportedLinktype => self.health.anomaly("link", "unsupported_linktype"),
            Decoded::Malformed(kind) => self.health.anomaly("decode", kind),
        }
        self.correlate_and_emit(sink);
    }

    /// Forgets every connection, call and open request, keeping the clock and the health
    /// counters: the next packets are a new capture. The demo's loop replays one capture
    /// again and again, and its ids (msg_id, `_unique_id`, request ids) would otherwise
    /// look like duplicates of the last pass.
    pub fn restart(&mut self) {
        let health = std::mem::take(&mut self.health);
        let clock = self.clock;
        *self = Pipeline::new(self.cfg.clone());
        self.health = health;
        self.clock = clock;
    }

    /// The packet time reached (the newest packet's, or a live tick's).
    pub fn clock(&self) -> Ts {
        self.clock
    }

    /// Live capture with no packet for a while: time still passes (timeouts fire).
    pub fn tick(&mut self, now: Ts, sink: &mut dyn FnMut(&Signal, &Health)) {
        if now > self.clock {
            self.clock = now;
        }
        self.flows
            .tick(self.clock, &mut self.health, &mut self.found);
        self.correlator.advance(self.clock, &mut self.signals);
        self.correlate_and_emit(sink);
    }

    /// End of input: flush every connection and report every open call.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&Signal, &Health)) {
        self.flows
            .close_all(self.clock, &mut self.health, &mut self.found);
        self.correlate_and_emit(sink);
        self.correlator.finish_all(&mut self.signals);
        self.correlate_and_emit(sink);
        self.tracer.finish_all(&mut self.traced);
        self.emit_traced(sink);
    }

    fn correlate_and_emit(&mut self, sink: &mut dyn FnMut(&Signal, &Health)) {
        for ev in self.found.amqp.drain(..) {
            self.correlator
                .on_amqp(ev, &mut self.health, &mut self.signals);
        }
        for ex in self.found.http.drain(..) {
            let ev = self
                .rest
                .event(ex, self.correlator.addresses(), &mut self.health);
            self.signals.push(Signal::Event(Event::Http(Box::new(ev))));
        }
        for s in self.signals.drain(..) {
            if let Signal::Event(ev) = &s {
                self.tracer
                    .observe(ev, self.clock, &mut self.health, &mut self.traced);
            }
            sink(&s, &self.health);
        }
        self.tracer.advance(self.clock, &mut self.traced);
        self.emit_traced(sink);
    }

    /// Request trees, chains and masked failures, as signals.
    fn emit_traced(&mut self, sink: &mut dyn FnMut(&Signal, &Health)) {
        for t in self.traced.drain(..) {
            let s = match t {
                Traced::Tree(tree) => Signal::Request(tree),
                Traced::Chain(c) => Signal::Event(Event::Chain(c)),
                Traced::Masked(m) => Signal::Masked(m),
            };
            sink(&s, &self.health);
        }
    }
}
