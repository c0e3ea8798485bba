//! The pipeline, top to bottom: packet → L2–L4 → TCP flow + reassembly → AMQP →
//! oslo.messaging → correlation → signals for the sinks.
//!
//! Deterministic and on packet time only: the same capture gives the same signals.

use crate::amqp::{AmqpConnection, AmqpEvent};
use crate::config::Config;
use crate::correlate::{Correlator, Signal};
use crate::decode::{self, Decoded};
use crate::health::Health;
use crate::source::Packet;
use crate::tcp::FlowTable;
use crate::tcp::flows::NewFlow;
use crate::time::Ts;

pub struct Pipeline {
    cfg: Config,
    pub health: Health,
    flows: FlowTable<AmqpConnection>,
    correlator: Correlator,
    clock: Ts,
    amqp: Vec<AmqpEvent>,
    signals: Vec<Signal>,
}

impl Pipeline {
    pub fn new(cfg: Config) -> Pipeline {
        Pipeline {
            flows: FlowTable::new(cfg.flows.clone()),
            correlator: Correlator::new(cfg.correlator.clone()),
            cfg,
            health: Health::default(),
            clock: Ts::ZERO,
            amqp: Vec::new(),
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
                let ports = &self.cfg.amqp_ports;
                let (max_frame, max_body) = (self.cfg.amqp_max_frame, self.cfg.amqp_max_body);
                self.flows.segment(
                    &seg,
                    pkt.ts,
                    &mut self.health,
                    &mut self.amqp,
                    |f: NewFlow| {
                        // the broker is the side on an AMQP port
                        let (client, server) = if ports.contains(&f.server.port) {
                            (f.client, f.server)
                        } else if ports.contains(&f.client.port) {
                            (f.server, f.client)
                        } else {
                            return None;
                        };
                        Some((
                            AmqpConnection::new(f.id, client, f.saw_syn, max_frame, max_body),
                            client,
                            server,
                        ))
                    },
                );
            }
            Decoded::NotTcp => {}
            Decoded::Fragment => self.health.anomaly("ip", "fragment"),
            Decoded::UnsupportedLinktype => self.health.anomaly("link", "unsupported_linktype"),
            Decoded::Malformed(kind) => self.health.anomaly("decode", kind),
        }
        self.correlate_and_emit(sink);
    }

    /// Live capture with no packet for a while: time still passes (timeouts fire).
    pub fn tick(&mut self, now: Ts, sink: &mut dyn FnMut(&Signal, &Health)) {
        if now > self.clock {
            self.clock = now;
        }
        self.flows
            .tick(self.clock, &mut self.health, &mut self.amqp);
        self.correlator.advance(self.clock, &mut self.signals);
        self.correlate_and_emit(sink);
    }

    /// End of input: flush every connection and report every open call.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&Signal, &Health)) {
        self.flows
            .close_all(self.clock, &mut self.health, &mut self.amqp);
        self.correlate_and_emit(sink);
        self.correlator.finish_all(&mut self.signals);
        self.correlate_and_emit(sink);
    }

    fn correlate_and_emit(&mut self, sink: &mut dyn FnMut(&Signal, &Health)) {
        for ev in self.amqp.drain(..) {
            self.correlator
                .on_amqp(ev, &mut self.health, &mut self.signals);
        }
        for s in self.signals.drain(..) {
            sink(&s, &self.health);
        }
    }
}
