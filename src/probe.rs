//! The probe: packets → observations. Everything one vantage point can do alone, on the
//! node that sees the packets: L2–L4 decoding, TCP reassembly, the AMQP and HTTP parsers,
//! reading oslo.messaging bodies, templating REST routes. It judges nothing (no timeout,
//! no caller, no failure): that is the analyser's, which may join several probes.
//!
//! Deterministic and on packet time only.

use crate::FastMap as HashMap;
use crate::amqp::conn::ConnLimits;
use crate::amqp::{AmqpEvent, BodyBudget, Message, MessageKind};
use crate::config::Config;
use crate::contract::{AmqpKind, AmqpMessage, NotOslo, Obs, Observation, Oslo};
use crate::decode::{self, Decoded};
use crate::health::Health;
use crate::openstack::Rest;
use crate::oslo;
use crate::protocols::{self, Choice, Conn, Found};
use crate::source::Packet;
use crate::tcp::FlowTable;
use crate::time::Ts;
use std::collections::VecDeque;
use std::sync::Arc;

pub struct Probe {
    cfg: Config,
    pub health: Health,
    flows: FlowTable<Conn>,
    found: Found,
    bodies: DecodeCache,
    rest: Rest,
    /// Body bytes held by every AMQP connection's message assembly, against one cap.
    budget: BodyBudget,
    http: crate::http::HttpConfig,
    clock: Ts,
    /// Packets stamped far after the clock, until the next packets say whether time
    /// really jumped.
    held: Vec<Packet>,
}

impl Probe {
    pub fn new(cfg: Config) -> Probe {
        Probe {
            flows: FlowTable::new(cfg.tcp.clone()),
            rest: Rest::new(cfg.http.clone()),
            bodies: DecodeCache::new(cfg.amqp.decode_cache_entries),
            budget: BodyBudget::new(cfg.amqp.max_held_bytes),
            http: cfg.http.http(),
            held: Vec::new(),
            found: Found::default(),
            health: Health::default(),
            clock: Ts::ZERO,
            cfg,
        }
    }

    /// Forgets every connection, keeping the clock and the health counters (see
    /// `Pipeline::restart`).
    pub fn restart(&mut self) {
        let health = std::mem::take(&mut self.health);
        let clock = self.clock;
        *self = Probe::new(self.cfg.clone());
        self.health = health;
        self.clock = clock;
    }

    /// The packet time reached (the newest packet's, or a live tick's).
    pub fn clock(&self) -> Ts {
        self.clock
    }

    /// One captured packet; what it completed goes to `out`.
    ///
    /// A packet stamped more than `capture.max_clock_jump_s` after the clock is held: if
    /// the next `capture.clock_jump_confirm_packets` packets agree, time really passed (a
    /// quiet link) and they go in order; if a packet near the clock comes first, the held
    /// ones were stamped wrong (a corrupt record, a clock stepped and back) and go at the
    /// clock's time, counted. One bad stamp never turns hours of calls into timeouts.
    pub fn packet(&mut self, pkt: &Packet, out: &mut Vec<Observation>) {
        self.health.packets += 1;
        self.health.bytes += pkt.orig_len.max(pkt.data.len() as u32) as u64;
        let jump = crate::time::secs_to_ns(self.cfg.capture.max_clock_jump_s);
        let started = self.clock != Ts::ZERO;
        if started && pkt.ts.0 > self.clock.0.saturating_add(jump) {
            let agrees = self
                .held
                .first()
                .is_none_or(|h| pkt.ts.0.abs_diff(h.ts.0) <= jump);
            if !agrees {
                self.release_held(false, out);
            }
            self.held.push(pkt.clone());
            if self.held.len() >= self.cfg.capture.clock_jump_confirm_packets.max(1) {
                self.release_held(true, out);
            }
            return;
        }
        self.release_held(false, out);
        let ts = if started && pkt.ts.0.saturating_add(jump) < self.clock.0 {
            // far in the past: stamped wrong; it happened now, as far as we can tell
            self.health.anomaly("capture", "clock_jump_back");
            self.clock
        } else {
            pkt.ts
        };
        self.process(pkt, ts, out);
    }

    /// The held packets: time really jumped (`real`), or their stamps were wrong and they
    /// are processed at the clock's time.
    fn release_held(&mut self, real: bool, out: &mut Vec<Observation>) {
        for p in std::mem::take(&mut self.held) {
            let ts = if real {
                p.ts
            } else {
                self.health.anomaly("capture", "clock_jump");
                self.clock
            };
            self.process(&p, ts, out);
        }
    }

    fn process(&mut self, pkt: &Packet, ts: Ts, out: &mut Vec<Observation>) {
        // the clock never goes back; a packet stamped earlier is processed at its own time
        if ts < self.clock {
            self.health.anomaly("capture", "clock_regression");
        } else {
            self.clock = ts;
        }
        match decode::decode(pkt.linktype, &pkt.data) {
            Decoded::Tcp(seg) => {
                let cfg = &self.cfg;
                let choice = Choice {
                    amqp_ports: &cfg.amqp.ports,
                    amqp: ConnLimits::of(&cfg.amqp),
                    amqp_budget: &self.budget,
                    http_ports: &|p| cfg.http.is_api_port(p),
                    sniff_other_ports: cfg.http.sniff_other_ports,
                    http: &self.http,
                };
                self.flows
                    .segment(&seg, ts, &mut self.health, &mut self.found, |f| {
                        protocols::choose(f, &choice)
                    });
            }
            Decoded::NotTcp => {}
            Decoded::Fragment => self.health.anomaly("ip", "fragment"),
            Decoded::UnsupportedLinktype => self.health.anomaly("link", "unsupported_linktype"),
            Decoded::Malformed(kind) => self.health.anomaly("decode", kind),
        }
        self.drain(out);
    }

    /// Live capture with no packet for a while: idle connections close. Held packets the
    /// wall clock has caught up with were real time passing.
    pub fn tick(&mut self, now: Ts, out: &mut Vec<Observation>) {
        let jump = crate::time::secs_to_ns(self.cfg.capture.max_clock_jump_s);
        if self
            .held
            .first()
            .is_some_and(|h| now.0.saturating_add(jump) >= h.ts.0)
        {
            self.release_held(true, out);
        }
        if now > self.clock {
            self.clock = now;
        }
        self.flows
            .tick(self.clock, &mut self.health, &mut self.found);
        self.drain(out);
    }

    /// End of input: every connection is flushed (held packets nothing confirmed were
    /// stamped wrong).
    pub fn finish(&mut self, out: &mut Vec<Observation>) {
        self.release_held(false, out);
        self.flows
            .close_all(self.clock, &mut self.health, &mut self.found);
        self.drain(out);
    }

    /// What the parsers found, as observations: AMQP first, then REST (their order within
    /// one packet or tick does not matter: one packet is one connection).
    fn drain(&mut self, out: &mut Vec<Observation>) {
        for ev in self.found.amqp.drain(..) {
            if let Some(o) = amqp_observation(ev, self.clock, &mut self.bodies) {
                out.push(o);
            }
        }
        for ex in self.found.http.drain(..) {
            let what = Obs::Http(Box::new(self.rest.observe(ex)));
            out.push(Observation {
                t: self.clock,
                what,
            });
        }
    }
}

/// An AMQP parser's event as an observation (None: nothing the analyser uses).
fn amqp_observation(ev: AmqpEvent, now: Ts, bodies: &mut DecodeCache) -> Option<Observation> {
    let (t, what) = match ev {
        AmqpEvent::Identified { conn, identity } => (
            now,
            Obs::AmqpIdentified {
                conn,
                connection_name: identity.connection_name.clone(),
                product: identity.product.clone(),
            },
        ),
        AmqpEvent::Message(m) => {
            let oslo = bodies.decode(&m);
            let m = *m;
            let kind = match m.kind {
                MessageKind::Publish { mandatory } => AmqpKind::Publish { mandatory },
                MessageKind::Deliver { redelivered, .. } => AmqpKind::Deliver { redelivered },
                MessageKind::GetOk { redelivered } => AmqpKind::GetOk { redelivered },
                MessageKind::Return { reply_code, .. } => AmqpKind::Return { reply_code },
            };
            let msg = AmqpMessage {
                conn: m.conn,
                kind,
                exchange: m.exchange,
                routing_key: m.routing_key,
                queue: m.queue,
                expiration: m.props.expiration,
                stream_offset: m.props.stream_offset,
                delivery_count: m.props.delivery_count,
                oslo,
            };
            (m.ts, Obs::AmqpMessage(Box::new(msg)))
        }
        AmqpEvent::ChannelClosed {
            conn,
            ts,
            by_broker,
            reply_code,
            ..
        } => (
            ts,
            Obs::AmqpClosed {
                conn,
                channel: true,
                reply_code,
                by_broker,
            },
        ),
        AmqpEvent::ConnectionClosed {
            conn,
            ts,
            by_broker,
            reply_code,
            ..
        } => (
            ts,
            Obs::AmqpClosed {
                conn,
                channel: false,
                reply_code,
                by_broker,
            },
        ),
        AmqpEvent::Blocked { conn, ts, .. } => (ts, Obs::AmqpBlocked { conn }),
        AmqpEvent::BrokerCancel { conn, queue, .. } => {
            (now, Obs::AmqpConsumerCancelled { conn, queue })
        }
        AmqpEvent::Gone { conn, ts } => (ts, Obs::AmqpGone { conn }),
        AmqpEvent::VhostOpened { .. }
        | AmqpEvent::ConsumerStarted { .. }
        | AmqpEvent::Nack { .. } => return None,
    };
    Some(Observation { t, what })
}

/// Recently decoded bodies. A deliver carries the exact bytes of its publish, so each
/// message's JSON is parsed once, not once per copy. Keyed by a 64-bit hash of exchange,
/// compression and body (a collision among the last few thousand bodies is ~1e-12).
struct DecodeCache {
    seed: u64,
    map: HashMap<u64, Arc<Result<Oslo, NotOslo>>>,
    order: VecDeque<u64>,
    cap: usize,
}

impl DecodeCache {
    fn new(cap: usize) -> DecodeCache {
        DecodeCache {
            seed: ahash::RandomState::new().hash_one(0x5eed_u64),
            map: HashMap::default(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn decode(&mut self, m: &Message) -> Arc<Result<Oslo, NotOslo>> {
        // xxh3 over the body (GB/s on any x86-64), salted per process so that crafted
        // bodies cannot be made to collide on purpose
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        let meta = xxh3_64_with_seed(m.exchange.as_bytes(), self.seed)
            ^ xxh3_64_with_seed(
                m.props.compression.as_deref().unwrap_or("").as_bytes(),
                self.seed.rotate_left(17),
            );
        let key = xxh3_64_with_seed(&m.body, self.seed ^ meta);
        if let Some(hit) = self.map.get(&key) {
            return hit.clone();
        }
        let decoded = Arc::new(oslo::decode(&m.exchange, &m.props, &m.body));
        if self.order.len() >= self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.map.remove(&old);
        }
        self.order.push_back(key);
        self.map.insert(key, decoded.clone());
        decoded
    }
}
