//! The probe: packets → observations. Everything one vantage point can do alone, on the
//! node that sees the packets: L2–L4 decoding, TCP reassembly, the AMQP and HTTP parsers,
//! reading oslo.messaging bodies, templating REST routes. It judges nothing (no timeout,
//! no caller, no failure): that is the analyser's, which may join several probes.
//!
//! Deterministic and on packet time only.

use crate::amqp::conn::ConnLimits;
use crate::amqp::{AmqpEvent, BodyBudget};
use crate::config::Config;
use crate::contract::{Obs, Observation};
use crate::decode::{self, Decoded};
use crate::health::Health;
use crate::openstack::Rest;
use crate::protocols::{self, AmqpFound, Choice, Conn, Found, message_observation};
use crate::source::blocks::Window;
use crate::source::{Packet, PacketRef};
use crate::tcp::FlowTable;
use crate::time::Ts;
use std::sync::Arc;

pub use crate::oslo::DecodeCache;

pub struct Probe {
    pub health: Health,
    clock: Clock,
    shard: Shard,
    /// Sweep keys of the shard's last step: one shard needs no merging, so unused.
    groups: Vec<(u64, usize)>,
}

impl Probe {
    pub fn new(cfg: Config) -> Probe {
        Probe {
            clock: Clock::new(&cfg),
            shard: Shard::new(&cfg, 1, DecodeCache::new(&cfg.amqp)),
            health: Health::default(),
            groups: Vec::new(),
        }
    }

    /// Forgets every connection, keeping the clock and the health counters (see
    /// `Pipeline::restart`).
    pub fn restart(&mut self) {
        // the bodies' readings stay: they do not depend on any connection
        let bodies = self.shard.found.bodies.clone();
        self.shard = Shard::new(&self.shard.cfg, 1, bodies);
        self.clock.held.clear();
    }

    /// The packet time reached (the newest packet's, or a live tick's).
    pub fn clock(&self) -> Ts {
        self.clock.now
    }

    /// One captured packet; what it completed goes to `out`.
    pub fn packet(&mut self, pkt: &PacketRef<'_>, out: &mut Vec<Observation>) {
        self.run(out, |clock, health, each| clock.packet(pkt, health, each));
    }

    /// Live capture with no packet for a while: idle connections close. Held packets the
    /// wall clock has caught up with were real time passing.
    pub fn tick(&mut self, now: Ts, out: &mut Vec<Observation>) {
        self.run(out, |clock, health, each| clock.tick(now, health, each));
    }

    /// End of input: every connection is flushed (held packets nothing confirmed were
    /// stamped wrong).
    pub fn finish(&mut self, out: &mut Vec<Observation>) {
        self.run(out, |clock, health, each| clock.finish(health, each));
    }

    /// The steps the clock makes of one input, each through the shard.
    fn run(
        &mut self,
        out: &mut Vec<Observation>,
        input: impl FnOnce(&mut Clock, &mut Health, Each),
    ) {
        let Probe {
            health,
            clock,
            shard,
            groups,
        } = self;
        input(clock, health, &mut |step, health| {
            shard.step(&step, health, out, groups);
        });
    }
}

/// What a `Clock` hands each step to, with the counters to count in.
pub type Each<'e> = &'e mut dyn FnMut(Step, &mut Health);

/// One captured frame, as the link layer gave it.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    pub linktype: i32,
    pub data: &'a [u8],
    /// The block of the capture file `data` lies in, if it does.
    pub window: Option<&'a Window>,
}

/// One unit of a probe's work, in order: a packet at the time it counts for, or none (a
/// live tick, the end of input); then, maybe, a sweep of every connection or their close.
#[derive(Clone, Copy)]
pub struct Step<'a> {
    /// Numbers the steps from 1; a connection is named by the step that opened it, so
    /// that connections sharded over several tables keep the ids one table gives them.
    pub seq: u64,
    pub frame: Option<Frame<'a>>,
    /// The time the packet is processed at (its own, or the clock's if stamped wrong).
    pub ts: Ts,
    /// The probe's clock after this step.
    pub clock: Ts,
    pub sweep: bool,
    pub end: bool,
}

/// The probe's time: which time each packet counts for, when the connections are swept,
/// how steps are numbered. It sees every packet before any per-connection work, so it can
/// run ahead of the shards (`src/parallel.rs`) and keep them in step.
///
/// A packet stamped more than `capture.max_clock_jump_s` after the clock is held: if the
/// next `capture.clock_jump_confirm_packets` packets agree, time really passed (a quiet
/// link) and they go in order; if a packet near the clock comes first, the held ones were
/// stamped wrong (a corrupt record, a clock stepped and back) and go at the clock's time,
/// counted. One bad stamp never turns hours of calls into timeouts.
pub struct Clock {
    jump_ns: u64,
    confirm: usize,
    now: Ts,
    held: Vec<Packet>,
    last_sweep: Ts,
    seq: u64,
}

/// How often connections are swept for idleness and timed-out holes, in packet time.
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

impl Clock {
    pub fn new(cfg: &Config) -> Clock {
        Clock {
            jump_ns: crate::time::secs_to_ns(cfg.capture.max_clock_jump_s),
            confirm: cfg.capture.clock_jump_confirm_packets.max(1),
            now: Ts::ZERO,
            held: Vec::new(),
            last_sweep: Ts::ZERO,
            seq: 0,
        }
    }

    pub fn now(&self) -> Ts {
        self.now
    }

    pub fn packet(&mut self, pkt: &PacketRef<'_>, health: &mut Health, each: Each) {
        health.packets += 1;
        health.bytes += pkt.orig_len.max(pkt.data.len() as u32) as u64;
        let started = self.now != Ts::ZERO;
        if started && pkt.ts.0 > self.now.0.saturating_add(self.jump_ns) {
            let agrees = self
                .held
                .first()
                .is_none_or(|h| pkt.ts.0.abs_diff(h.ts.0) <= self.jump_ns);
            if !agrees {
                self.release_held(false, health, each);
            }
            self.held.push(pkt.to_owned());
            if self.held.len() >= self.confirm {
                self.release_held(true, health, each);
            }
            return;
        }
        if !self.held.is_empty() {
            // the jump was not confirmed: the held packets were stamped wrong
            self.release_held(false, health, each);
        }
        let ts = if started && pkt.ts.0.saturating_add(self.jump_ns) < self.now.0 {
            // far in the past: stamped wrong; it happened now, as far as we can tell
            health.anomaly("capture", "clock_jump_back");
            self.now
        } else {
            pkt.ts
        };
        self.step(Some(pkt), ts, health, each);
    }

    /// The held packets: time really jumped (`real`), or their stamps were wrong and they
    /// are processed at the clock's time.
    fn release_held(&mut self, real: bool, health: &mut Health, each: Each) {
        for p in std::mem::take(&mut self.held) {
            let ts = if real {
                p.ts
            } else {
                health.anomaly("capture", "clock_jump");
                self.now
            };
            self.step(Some(&p.as_ref()), ts, health, each);
        }
    }

    fn step(&mut self, pkt: Option<&PacketRef<'_>>, ts: Ts, health: &mut Health, each: Each) {
        // the clock never goes back; a packet stamped earlier is processed at its own time
        if ts < self.now {
            health.anomaly("capture", "clock_regression");
        } else {
            self.now = ts;
        }
        self.emit(pkt, ts, false, health, each);
    }

    fn emit(
        &mut self,
        pkt: Option<&PacketRef<'_>>,
        ts: Ts,
        end: bool,
        health: &mut Health,
        each: Each,
    ) {
        self.seq += 1;
        let sweep = self.now.0 >= self.last_sweep.0.saturating_add(SWEEP_EVERY_NS);
        if sweep {
            self.last_sweep = self.now;
        }
        each(
            Step {
                seq: self.seq,
                frame: pkt.map(|p| Frame {
                    linktype: p.linktype,
                    data: p.data,
                    window: p.window,
                }),
                ts,
                clock: self.now,
                sweep: sweep && !end,
                end,
            },
            health,
        );
    }

    pub fn tick(&mut self, now: Ts, health: &mut Health, each: Each) {
        if self
            .held
            .first()
            .is_some_and(|h| now.0.saturating_add(self.jump_ns) >= h.ts.0)
        {
            self.release_held(true, health, each);
        }
        if now > self.now {
            self.now = now;
        }
        self.emit(None, self.now, false, health, each);
    }

    pub fn finish(&mut self, health: &mut Health, each: Each) {
        self.release_held(false, health, each);
        self.emit(None, self.now, true, health, each);
    }
}

/// The per-connection half of a probe: decoding, the flow table, the parsers, oslo
/// bodies and REST routes. One probe has one; `--threads N` shards connections over N.
pub struct Shard {
    cfg: Config,
    flows: FlowTable<Conn>,
    /// What the parsers found, and the shared decode cache bodies are read through.
    found: Found,
    rest: Rest,
    /// Body bytes held by every AMQP connection's message assembly, against one cap.
    budget: BodyBudget,
    http: crate::http::HttpConfig,
}

impl Shard {
    /// One of `of` shards: the table caps (connections, held body bytes) are split; the
    /// oslo readings of bodies are shared (`bodies`).
    pub fn new(cfg: &Config, of: usize, bodies: Arc<DecodeCache>) -> Shard {
        let of = of.max(1);
        let mut tcp = cfg.tcp.clone();
        tcp.max_flows = tcp.max_flows.div_ceil(of);
        Shard {
            flows: FlowTable::new(tcp),
            rest: Rest::new(cfg.http.clone()),
            found: Found::new(bodies),
            budget: BodyBudget::new(cfg.amqp.max_held_bytes.div_ceil(of)),
            http: cfg.http.http(),
            cfg: cfg.clone(),
        }
    }

    /// One step; its observations go to `out`. A sweep's or the end's come in groups,
    /// one per connection, each recorded in `groups` as (sweep key, end of group in `out`)
    /// for merging with other shards' (see `FlowTable::sweep`). Returns where the
    /// packet's own observations end in `out`.
    pub fn step(
        &mut self,
        step: &Step,
        health: &mut Health,
        out: &mut Vec<Observation>,
        groups: &mut Vec<(u64, usize)>,
    ) -> usize {
        groups.clear();
        if let Some(frame) = step.frame {
            self.frame(frame, step.ts, step.seq, health);
            self.drain(step.clock, out);
        }
        let lead = out.len();
        if !(step.sweep || step.end) {
            return lead;
        }
        let Shard {
            flows, found, rest, ..
        } = self;
        let mut each = |key: u64, found: &mut Found| {
            drain(found, step.clock, rest, out);
            groups.push((key, out.len()));
        };
        if step.end {
            flows.close_all(step.clock, health, found, &mut each);
        } else {
            flows.sweep(step.clock, health, found, &mut each);
        }
        lead
    }

    fn frame(&mut self, frame: Frame, ts: Ts, seq: u64, health: &mut Health) {
        match decode::decode(frame.linktype, frame.data) {
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
                self.flows.name_next(seq);
                self.flows.segment(&seg, ts, health, &mut self.found, |f| {
                    protocols::choose(f, &choice)
                });
            }
            Decoded::NotTcp => {}
            Decoded::Fragment => health.anomaly("ip", "fragment"),
            Decoded::UnsupportedLinktype => health.anomaly("link", "unsupported_linktype"),
            Decoded::Malformed(kind) => health.anomaly("decode", kind),
        }
    }

    fn drain(&mut self, clock: Ts, out: &mut Vec<Observation>) {
        drain(&mut self.found, clock, &self.rest, out);
    }
}

/// Which of `n` shards a frame's connection belongs to: both directions of a connection
/// go to the same one (anything not TCP to the first, which counts it).
pub fn shard_of(frame: Frame, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    // the ends read from the headers when they are plain IPv4/TCP (the reader does this
    // for every packet, and a full decode here is done again by the shard); both ways
    // give the same ends, so a connection's packets meet in one shard either way
    let ends = decode::ipv4_tcp_ends(frame.linktype, frame.data).or_else(|| {
        match decode::decode(frame.linktype, frame.data) {
            Decoded::Tcp(seg) => Some((seg.src, seg.dst)),
            _ => None,
        }
    });
    let Some((a, b)) = ends else { return 0 };
    // the two ends' words xor'ed are the same both ways, so the ends need no ordering (a
    // flow key and a general hasher were about 1 % of a two-thread replay, all on the
    // reader); one mix spreads them (connections differ mostly in the client's port);
    // no seed from the run: a connection has one shard in every run
    (mix64(a.word() ^ b.word()) % n as u64) as usize
}

/// A 64-bit finaliser (splitmix64's): every input bit moves about half the output bits.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the parsers found, as observations: AMQP first, then REST (their order within
/// one packet or connection does not matter: one packet is one connection).
fn drain(found: &mut Found, clock: Ts, rest: &Rest, out: &mut Vec<Observation>) {
    let Found { amqp, http, bodies } = found;
    if amqp.is_empty() && http.is_empty() {
        return; // most packets: an ack, a heartbeat, part of a message
    }
    for found in amqp.drain(..) {
        let o = match found {
            AmqpFound::Message(o) => Some(o),
            AmqpFound::Event(ev) => amqp_observation(ev, clock, bodies),
        };
        out.extend(o);
    }
    for ex in http.drain(..) {
        let what = Obs::Http(Box::new(rest.observe(ex)));
        out.push(Observation { t: clock, what });
    }
}

/// An AMQP parser's event as an observation (None: nothing the analyser uses).
fn amqp_observation(ev: AmqpEvent, now: Ts, bodies: &DecodeCache) -> Option<Observation> {
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
            // the probe's connections hand messages over read (`AmqpFound::Message`)
            let oslo = bodies.decode(&m.exchange, &m.props, &m.body);
            return Some(message_observation(*m, oslo));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::linktype;

    fn packet(v6: bool, src: u16, dst: u16) -> Vec<u8> {
        let b = if v6 {
            let (a, z) = ([0xfd; 16], [0xfe; 16]);
            let (a, z) = if src < dst { (a, z) } else { (z, a) };
            etherparse::PacketBuilder::ipv6(a, z, 64)
        } else {
            let (a, z) = ([10, 0, 0, 1], [10, 0, 0, 2]);
            let (a, z) = if src < dst { (a, z) } else { (z, a) };
            etherparse::PacketBuilder::ipv4(a, z, 64)
        };
        let mut out = Vec::new();
        b.tcp(src, dst, 1, 1000).write(&mut out, b"x").unwrap();
        out
    }

    fn shard(data: &[u8], n: usize) -> usize {
        let linktype = linktype::RAW;
        let window = None;
        shard_of(
            Frame {
                linktype,
                data,
                window,
            },
            n,
        )
    }

    /// Both directions of a connection meet in one shard (IPv4 by the reader's shortcut,
    /// IPv6 by the full decode), and connections spread over the shards.
    #[test]
    fn shards_by_connection() {
        for v6 in [false, true] {
            let mut per_shard = [0usize; 3];
            for client in 40_000..41_000u16 {
                let there = shard(&packet(v6, client, 5672), 3);
                assert_eq!(there, shard(&packet(v6, 5672, client), 3));
                per_shard[there] += 1;
            }
            assert!(per_shard.iter().all(|&n| n > 250), "{per_shard:?}");
        }
        assert_eq!(shard(b"not a packet", 3), 0);
        assert_eq!(shard(&packet(false, 1, 2), 1), 0);
    }
}
