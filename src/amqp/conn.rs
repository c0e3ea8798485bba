//! One AMQP connection: both directions' frames → methods, whole messages per channel, the
//! client's identity (connection.start-ok) and its consumers (consumer tag → queue).

use super::channels::ChannelMap;
use super::frame::{
    FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FrameEvent, FrameReader, RawFrame,
};
use super::kept::{Pending, Props};
use super::recent::RecentNames;
use crate::FastMap as HashMap;
use crate::contract::{ConnId, Endpoint};
use crate::health::Health;
use crate::tcp::{Chunk, Dir, flows::App};
use crate::time::Ts;
use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Who is at the client end of a connection, from connection.start-ok.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// oslo.messaging's `<argv0>:<pid>:<uuid>`, or whatever the client sent.
    pub connection_name: Option<String>,
    pub product: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageKind {
    Publish {
        mandatory: bool,
    },
    Deliver {
        consumer_tag: String,
        redelivered: bool,
    },
    GetOk {
        redelivered: bool,
    },
    /// The broker gave an unroutable mandatory message back (312 NO_ROUTE, …).
    Return {
        reply_code: u16,
        reply_text: String,
    },
}

/// A whole message (method + header + body) as it crossed the connection.
#[derive(Debug, Clone)]
pub struct Message {
    /// Time of the packet that completed it.
    pub ts: Ts,
    pub conn: ConnId,
    pub kind: MessageKind,
    pub channel: u16,
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    /// For a deliver: the queue its consumer tag was registered on, when we saw that.
    pub queue: Option<Arc<str>>,
    pub props: Props,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub enum AmqpEvent {
    Identified {
        conn: ConnId,
        identity: Arc<ClientIdentity>,
    },
    VhostOpened {
        conn: ConnId,
        vhost: String,
    },
    Message(Box<Message>),
    ConsumerStarted {
        conn: ConnId,
        queue: String,
        consumer_tag: String,
    },
    /// The broker cancelled a consumer (queue deleted, HA failover).
    BrokerCancel {
        conn: ConnId,
        consumer_tag: String,
        queue: Option<String>,
    },
    ChannelClosed {
        conn: ConnId,
        ts: Ts,
        by_broker: bool,
        reply_code: u16,
        reply_text: String,
    },
    ConnectionClosed {
        conn: ConnId,
        ts: Ts,
        by_broker: bool,
        reply_code: u16,
        reply_text: String,
    },
    Blocked {
        conn: ConnId,
        ts: Ts,
        reason: String,
    },
    /// A publisher confirm said no.
    Nack {
        conn: ConnId,
        ts: Ts,
    },
    /// The TCP connection is gone.
    Gone {
        conn: ConnId,
        ts: Ts,
    },
}

/// Where a connection's events go. A whole message comes to `message` with its body
/// lent: when one frame carried all of it, where it lies in the stream, so a consumer that
/// reads the body at once (the probe) never copies it; `Vec<AmqpEvent>` keeps a copy.
pub trait AmqpOut {
    fn event(&mut self, ev: AmqpEvent);
    /// `m.body` is empty when `lent` holds the body, else it holds it.
    fn message(&mut self, m: Message, lent: Option<&[u8]>);
}

impl AmqpOut for Vec<AmqpEvent> {
    fn event(&mut self, ev: AmqpEvent) {
        self.push(ev);
    }

    fn message(&mut self, mut m: Message, lent: Option<&[u8]>) {
        if let Some(body) = lent {
            m.body = body.to_vec();
        }
        self.push(AmqpEvent::Message(Box::new(m)));
    }
}

/// A message being assembled on one channel of one direction.
struct Assembly {
    method: Pending,
    props: Option<Props>,
    body_size: u64,
    /// The body so far; it grows with the bytes that arrive, never with what the header
    /// announced (a few bytes could otherwise reserve gigabytes).
    body: Vec<u8>,
    /// Over budget: the rest of the body is counted, not kept, and the message dropped.
    discarding: bool,
    received: u64,
}

/// Body bytes held while messages are assembled, over every AMQP connection of a probe:
/// one cap for all (`amqp.max_held_bytes`), shared by the connections.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    held: Arc<AtomicUsize>,
    cap: usize,
}

impl BodyBudget {
    pub fn new(cap: usize) -> BodyBudget {
        BodyBudget {
            held: Default::default(),
            cap,
        }
    }

    /// Takes `n` bytes if they fit (one probe's connections run on one thread: no race
    /// between the check and the add matters).
    fn take(&self, n: usize) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        if held.saturating_add(n) > self.cap {
            return false;
        }
        self.held.fetch_add(n, Ordering::Relaxed);
        true
    }

    /// Whether `n` bytes would fit now (what `take` checks).
    fn fits(&self, n: usize) -> bool {
        self.held.load(Ordering::Relaxed).saturating_add(n) <= self.cap
    }

    fn give(&self, n: usize) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(n))
            });
    }

    /// Bytes held now, over every connection.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

pub struct AmqpConnection {
    conn: ConnId,
    readers: [FrameReader; 2],
    assembling: [ChannelMap<Assembly>; 2],
    /// queue.declare / basic.consume requests waiting for their -ok, per channel.
    pending_consumes: HashMap<u16, VecDeque<String>>,
    consumers: HashMap<String, Arc<str>>,
    /// The names this connection's messages carry, shared from one message to the next.
    names: RecentNames,
    cfg: ConnLimits,
    /// Body bytes this connection holds (the capacity of its bodies being assembled).
    held: usize,
    budget: BodyBudget,
}

/// What one connection may hold (from `[amqp]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_frame: usize,
    pub max_body: usize,
    pub max_held: usize,
    pub max_consumers: usize,
}

impl ConnLimits {
    pub fn of(c: &super::AmqpConfig) -> ConnLimits {
        ConnLimits {
            max_frame: c.max_frame_bytes,
            max_body: c.max_body_bytes,
            max_held: c.max_held_bytes_per_connection,
            max_consumers: c.max_consumers_per_connection,
        }
    }
}

impl AmqpConnection {
    pub fn new(
        (client, server): (Endpoint, Endpoint),
        saw_handshake: bool,
        cfg: ConnLimits,
        budget: BodyBudget,
    ) -> Self {
        AmqpConnection {
            conn: ConnId { client, server },
            readers: [
                FrameReader::new(saw_handshake, cfg.max_frame),
                FrameReader::new(saw_handshake, cfg.max_frame),
            ],
            assembling: [ChannelMap::default(), ChannelMap::default()],
            pending_consumes: HashMap::default(),
            consumers: HashMap::default(),
            names: RecentNames::default(),
            cfg,
            held: 0,
            budget,
        }
    }

    /// Drops the message being assembled on `channel`, returning its bytes.
    fn forget(&mut self, dir: Dir, channel: u16) -> Option<Assembly> {
        let asm = self.assembling[dir as usize].remove(channel)?;
        self.release(&asm);
        Some(asm)
    }

    fn release(&mut self, asm: &Assembly) {
        let n = asm.body.capacity();
        self.held = self.held.saturating_sub(n);
        self.budget.give(n);
    }

    /// Drops every message being assembled in `dir` (a gap lost them); how many.
    fn forget_all(&mut self, dir: Dir) -> usize {
        let lost = self.assembling[dir as usize].channels();
        for ch in &lost {
            self.forget(dir, *ch);
        }
        lost.len()
    }

    /// Whether `n` more body bytes could be held now, by this connection and the probe.
    fn fits(&self, n: usize) -> bool {
        self.held + n <= self.cfg.max_held && self.budget.fits(n)
    }

    /// Room for `more` body bytes in `asm`, taken from this connection's and the probe's
    /// budgets as the body grows; false if it does not fit.
    fn grow(&mut self, asm_len: usize, cap: usize, body_size: u64, more: usize) -> Option<usize> {
        let want = asm_len + more;
        if want <= cap {
            return Some(0);
        }
        // double as bytes come (amortised), never past what the header announced
        let target = want.max(cap * 2).min(body_size as usize).max(want);
        let extra = target - cap;
        if self.held + extra > self.cfg.max_held || !self.budget.take(extra) {
            return None;
        }
        self.held += extra;
        Some(extra)
    }

    fn on_frame(
        &mut self,
        dir: Dir,
        ts: Ts,
        f: RawFrame<'_>,
        health: &mut Health,
        out: &mut impl AmqpOut,
    ) {
        health.count_frame(f.kind);
        match f.kind {
            FRAME_METHOD => {
                // the frame reader guarantees at least the 4 bytes of class and method id
                let id = |i: usize| u16::from_be_bytes([f.payload[i], f.payload[i + 1]]);
                let (class, method) = (id(0), id(2));
                health.count_method(class, method);
                if !acted_on(class, method) {
                    return; // acks, declares, qos…: counted, not decoded
                }
                if let Some(pending) = super::hot::method(f.payload, &mut self.names) {
                    return self.start_content(dir, f.channel, pending, health);
                }
                match amq_protocol::protocol::parse_class(f.payload) {
                    Ok((_, parsed)) => self.on_method(dir, ts, f.channel, parsed, health, out),
                    Err(_) => health.anomaly("amqp", "bad_method"),
                }
            }
            FRAME_HEADER => {
                let Some(asm) = self.assembling[dir as usize].get_mut(f.channel) else {
                    health.anomaly("amqp", "header_without_method");
                    return;
                };
                let header = super::hot::content_header(f.payload)
                    .ok_or(())
                    .or_else(|()| {
                        let (_, h) = parse_content_header(f.payload).map_err(|_| ())?;
                        Ok((h.body_size, props_of(&h.properties)))
                    });
                match header {
                    Ok((body_size, props)) => {
                        if asm.props.is_some() {
                            health.anomaly("amqp", "duplicate_header");
                        }
                        asm.body_size = body_size;
                        asm.props = Some(props);
                        if body_size > self.cfg.max_body as u64 {
                            health.anomaly("amqp", "body_too_large");
                            self.forget(dir, f.channel);
                        } else if body_size == 0 {
                            self.finish(dir, ts, f.channel, None, out);
                        }
                    }
                    Err(()) => {
                        health.anomaly("amqp", "bad_content_header");
                        self.forget(dir, f.channel);
                    }
                }
            }
            FRAME_BODY => self.on_body(dir, ts, f, health, out),
            FRAME_HEARTBEAT => {}
            _ => health.anomaly("amqp", "bad_frame_type"),
        }
    }

    fn on_body(
        &mut self,
        dir: Dir,
        ts: Ts,
        f: RawFrame<'_>,
        health: &mut Health,
        out: &mut impl AmqpOut,
    ) {
        let Some(asm) = self.assembling[dir as usize].get(f.channel) else {
            // joined mid-message: the method and header went by before we synced
            health.anomaly("amqp", "body_without_method");
            return;
        };
        if asm.props.is_none() {
            health.anomaly("amqp", "body_without_header");
            self.forget(dir, f.channel);
            return;
        }
        let (len, cap, size, discarding) = (
            asm.body.len(),
            asm.body.capacity(),
            asm.body_size,
            asm.discarding,
        );
        // the whole body in this one frame (oslo.messaging's usual case): lent where it
        // lies, not copied into the assembly, as long as holding it would have fit the
        // budgets (so a run near its caps counts the same anomalies either way)
        if !discarding && len == 0 && f.payload.len() as u64 == size && self.fits(f.payload.len()) {
            self.finish(dir, ts, f.channel, Some(f.payload), out);
            return;
        }
        let room = if discarding {
            None
        } else {
            self.grow(len, cap, size, f.payload.len())
        };
        let Some(asm) = self.assembling[dir as usize].get_mut(f.channel) else {
            return;
        };
        asm.received += f.payload.len() as u64;
        match room {
            Some(extra) => {
                asm.body.reserve_exact(extra);
                asm.body.extend_from_slice(f.payload);
            }
            None if !asm.discarding => {
                // over budget: the bytes held go back, the rest is only counted
                asm.discarding = true;
                let body = std::mem::take(&mut asm.body);
                self.held = self.held.saturating_sub(body.capacity());
                self.budget.give(body.capacity());
                health.anomaly("amqp", "body_over_budget");
                health.evict("amqp_body_bytes", 1);
            }
            None => {}
        }
        let Some(asm) = self.assembling[dir as usize].get(f.channel) else {
            return;
        };
        if asm.received >= asm.body_size {
            if asm.received > asm.body_size {
                health.anomaly("amqp", "body_overrun");
            }
            if asm.discarding {
                self.forget(dir, f.channel);
            } else {
                self.finish(dir, ts, f.channel, None, out);
            }
        }
    }

    fn start_content(&mut self, dir: Dir, channel: u16, method: Pending, health: &mut Health) {
        let asm = Assembly {
            method,
            props: None,
            body_size: 0,
            body: Vec::new(),
            discarding: false,
            received: 0,
        };
        if let Some(old) = self.assembling[dir as usize].insert(channel, asm) {
            self.release(&old);
            health.anomaly("amqp", "incomplete_message");
        }
    }

    fn on_method(
        &mut self,
        dir: Dir,
        ts: Ts,
        ch: u16,
        class: AMQPClass,
        health: &mut Health,
        out: &mut impl AmqpOut,
    ) {
        let conn = self.conn;
        let by_broker = dir == Dir::ToClient;
        match class {
            AMQPClass::Basic(m) => match m {
                basic::AMQPMethod::Publish(p) => self.start_content(
                    dir,
                    ch,
                    Pending::Publish {
                        exchange: Arc::from(p.exchange.as_str()),
                        routing_key: Arc::from(p.routing_key.as_str()),
                        mandatory: p.mandatory,
                    },
                    health,
                ),
                basic::AMQPMethod::Deliver(d) => self.start_content(
                    dir,
                    ch,
                    Pending::Deliver {
                        consumer_tag: d.consumer_tag.into(),
                        redelivered: d.redelivered,
                        exchange: Arc::from(d.exchange.as_str()),
                        routing_key: Arc::from(d.routing_key.as_str()),
                    },
                    health,
                ),
                basic::AMQPMethod::GetOk(g) => self.start_content(
                    dir,
                    ch,
                    Pending::GetOk {
                        redelivered: g.redelivered,
                        exchange: Arc::from(g.exchange.as_str()),
                        routing_key: Arc::from(g.routing_key.as_str()),
                    },
                    health,
                ),
                basic::AMQPMethod::Return(r) => self.start_content(
                    dir,
                    ch,
                    Pending::Return {
                        reply_code: r.reply_code,
                        reply_text: r.reply_text.into(),
                        exchange: Arc::from(r.exchange.as_str()),
                        routing_key: Arc::from(r.routing_key.as_str()),
                    },
                    health,
                ),
                basic::AMQPMethod::Consume(c) => {
                    let q = c.queue.as_str().to_owned();
                    if c.nowait && !c.consumer_tag.as_str().is_empty() {
                        self.register_consumer(c.consumer_tag.as_str(), q, out);
                    } else {
                        self.await_consume_ok(ch, q, health);
                    }
                }
                basic::AMQPMethod::ConsumeOk(ok) => {
                    let queue = self
                        .pending_consumes
                        .get_mut(&ch)
                        .and_then(|q| q.pop_front());
                    match queue {
                        Some(q) => self.register_consumer(ok.consumer_tag.as_str(), q, out),
                        None => health.anomaly("amqp", "consume_ok_without_consume"),
                    }
                }
                basic::AMQPMethod::Cancel(c) if by_broker => {
                    let queue = self
                        .consumers
                        .get(c.consumer_tag.as_str())
                        .map(|q| q.to_string());
                    out.event(AmqpEvent::BrokerCancel {
                        conn,
                        consumer_tag: c.consumer_tag.into(),
                        queue,
                    })
                }
                basic::AMQPMethod::Nack(_) if by_broker => out.event(AmqpEvent::Nack { conn, ts }),
                _ => {}
            },
            AMQPClass::Connection(m) => match m {
                connection::AMQPMethod::StartOk(s) => {
                    // s.response holds the broker credentials: it is dropped here, unread
                    let identity = ClientIdentity {
                        connection_name: table_str(&s.client_properties, "connection_name"),
                        product: table_str(&s.client_properties, "product"),
                    };
                    out.event(AmqpEvent::Identified {
                        conn,
                        identity: Arc::new(identity),
                    });
                }
                connection::AMQPMethod::Open(o) => out.event(AmqpEvent::VhostOpened {
                    conn,
                    vhost: o.virtual_host.as_str().to_owned(),
                }),
                connection::AMQPMethod::Close(c) => out.event(AmqpEvent::ConnectionClosed {
                    conn,
                    ts,
                    by_broker,
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.into(),
                }),
                connection::AMQPMethod::Blocked(b) => out.event(AmqpEvent::Blocked {
                    conn,
                    ts,
                    reason: b.reason.as_str().to_owned(),
                }),
                _ => {}
            },
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                self.forget(Dir::ToServer, ch);
                self.forget(Dir::ToClient, ch);
                self.pending_consumes.remove(&ch);
                out.event(AmqpEvent::ChannelClosed {
                    conn,
                    ts,
                    by_broker,
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.into(),
                })
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(_)) => {}
            _ => {}
        }
    }

    /// A basic.consume waiting for its consume-ok (which names the tag). Bounded: a
    /// channel has a few outstanding at most; a client flooding them is counted.
    fn await_consume_ok(&mut self, ch: u16, queue: String, health: &mut Health) {
        const PER_CHANNEL: usize = 16;
        if self.pending_consumes.len() >= self.cfg.max_consumers
            && !self.pending_consumes.contains_key(&ch)
        {
            health.anomaly("amqp", "too_many_pending_consumes");
            return;
        }
        let q = self.pending_consumes.entry(ch).or_default();
        if q.len() >= PER_CHANNEL {
            q.pop_front();
            health.anomaly("amqp", "too_many_pending_consumes");
        }
        q.push_back(queue);
    }

    fn register_consumer(&mut self, tag: &str, queue: String, out: &mut impl AmqpOut) {
        if self.consumers.len() >= self.cfg.max_consumers && !self.consumers.contains_key(tag) {
            // a client registering consumers without end: the newest are not remembered
            // (their deliveries carry no queue name), and the event still goes out
        } else {
            self.consumers
                .insert(tag.to_owned(), Arc::from(queue.as_str()));
        }
        out.event(AmqpEvent::ConsumerStarted {
            conn: self.conn,
            queue,
            consumer_tag: tag.to_owned(),
        });
    }

    /// The message on `channel` is whole: its body is in its assembly, or `lent` (then its
    /// assembly holds none).
    fn finish(
        &mut self,
        dir: Dir,
        ts: Ts,
        channel: u16,
        lent: Option<&[u8]>,
        out: &mut impl AmqpOut,
    ) {
        // the body leaves the budget with the message (it is decoded at once)
        let Some(asm) = self.forget(dir, channel) else {
            return;
        };
        let (kind, exchange, routing_key, queue) = match asm.method {
            Pending::Publish {
                exchange,
                routing_key,
                mandatory,
            } => (
                MessageKind::Publish { mandatory },
                exchange,
                routing_key,
                None,
            ),
            Pending::Deliver {
                consumer_tag,
                redelivered,
                exchange,
                routing_key,
            } => {
                let queue = self.consumers.get(&consumer_tag).cloned();
                (
                    MessageKind::Deliver {
                        consumer_tag,
                        redelivered,
                    },
                    exchange,
                    routing_key,
                    queue,
                )
            }
            Pending::GetOk {
                redelivered,
                exchange,
                routing_key,
            } => (
                MessageKind::GetOk { redelivered },
                exchange,
                routing_key,
                None,
            ),
            Pending::Return {
                reply_code,
                reply_text,
                exchange,
                routing_key,
            } => (
                MessageKind::Return {
                    reply_code,
                    reply_text,
                },
                exchange,
                routing_key,
                None,
            ),
        };
        let m = Message {
            ts,
            conn: self.conn,
            kind,
            channel,
            exchange,
            routing_key,
            queue,
            props: asm.props.unwrap_or_default(),
            body: asm.body,
        };
        out.message(m, lent);
    }
}

impl AmqpConnection {
    /// The next in-order bytes (or gap) of direction `dir`; what they complete goes to `out`.
    pub fn chunk(
        &mut self,
        dir: Dir,
        ts: Ts,
        chunk: Chunk<'_>,
        health: &mut Health,
        out: &mut impl AmqpOut,
    ) {
        // the reader is taken out so that frames can be handled with &mut self
        let mut reader =
            std::mem::replace(&mut self.readers[dir as usize], FrameReader::new(false, 0));
        reader.feed(chunk, health, &mut |ev, health| match ev {
            FrameEvent::Frame(f) => self.on_frame(dir, ts, f, health, out),
            FrameEvent::ProtocolHeader => {}
            FrameEvent::Desync => {
                for _ in 0..self.forget_all(dir) {
                    health.anomaly("amqp", "message_lost_in_gap");
                }
            }
        });
        self.readers[dir as usize] = reader;
    }

    /// The TCP connection is gone: what was being assembled is lost.
    pub fn close(&mut self, ts: Ts, health: &mut Health, out: &mut impl AmqpOut) {
        for dir in Dir::BOTH {
            for _ in 0..self.forget_all(dir) {
                health.anomaly("amqp", "incomplete_message");
            }
        }
        out.event(AmqpEvent::Gone {
            conn: self.conn,
            ts,
        });
    }
}

impl App for AmqpConnection {
    type Out = Vec<AmqpEvent>;

    fn on_chunk(
        &mut self,
        dir: Dir,
        ts: Ts,
        chunk: Chunk<'_>,
        health: &mut Health,
        out: &mut Vec<AmqpEvent>,
    ) {
        self.chunk(dir, ts, chunk, health, out);
    }

    fn on_close(&mut self, ts: Ts, health: &mut Health, out: &mut Vec<AmqpEvent>) {
        self.close(ts, health, out);
    }
}

/// The methods `on_method` acts on; every other method is only counted.
fn acted_on(class: u16, method: u16) -> bool {
    matches!(
        (class, method),
        (10, 11) | (10, 40) | (10, 50) | (10, 60) // connection start-ok, open, close, blocked
            | (20, 40) // channel.close
            | (60, 20) | (60, 21) | (60, 30) // basic consume, consume-ok, cancel
            | (60, 40) | (60, 50) | (60, 60) | (60, 71) // publish, return, deliver, get-ok
            | (60, 120) // nack
    )
}

fn props_of(p: &basic::AMQPProperties) -> Props {
    let header = |key| p.headers().as_ref().and_then(|h| table_value(h, key));
    Props {
        expiration: p.expiration().as_ref().map(|s| s.as_str().to_owned()),
        delivery_mode: *p.delivery_mode(),
        compression: p
            .headers()
            .as_ref()
            .and_then(|h| table_str(h, "compression")),
        stream_offset: header("x-stream-offset").and_then(int_of),
        delivery_count: header("x-delivery-count").and_then(int_of),
    }
}

fn table_value<'a>(t: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    t.inner()
        .iter()
        .find(|(k, _)| k.as_str() == key)
        .map(|(_, v)| v)
}

/// Any AMQP integer type, as brokers and clients pick different widths.
fn int_of(v: &AMQPValue) -> Option<i64> {
    Some(match *v {
        AMQPValue::ShortShortInt(i) => i.into(),
        AMQPValue::ShortShortUInt(i) => i.into(),
        AMQPValue::ShortInt(i) => i.into(),
        AMQPValue::ShortUInt(i) => i.into(),
        AMQPValue::LongInt(i) => i.into(),
        AMQPValue::LongUInt(i) => i.into(),
        AMQPValue::LongLongInt(i) => i,
        _ => return None,
    })
}

fn table_str(t: &FieldTable, key: &str) -> Option<String> {
    table_value(t, key).and_then(|v| match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Content headers as clients write them: any properties, header tables of every
    /// value type amq-protocol reads (nested ones too), sometimes cut or with a bad byte.
    fn header_payload() -> impl Strategy<Value = Vec<u8>> {
        // mostly text, sometimes bytes that are not UTF-8
        let short = || {
            prop_oneof![
                4 => "\\PC{0,8}".prop_map(String::into_bytes),
                1 => proptest::collection::vec(any::<u8>(), 0..12),
            ]
        };
        let key = prop_oneof![
            Just(b"compression".to_vec()),
            Just(b"x-stream-offset".to_vec()),
            Just(b"x-delivery-count".to_vec()),
            short(),
        ];
        let value = (
            prop_oneof![
                Just(b'S'),
                Just(b'I'),
                Just(b'l'),
                Just(b'b'),
                Just(b'B'),
                Just(b's'),
                Just(b'u'),
                Just(b'i'),
                Just(b'L'),
                Just(b'U'),
                Just(b't'),
                Just(b'f'),
                Just(b'd'),
                Just(b'D'),
                Just(b'T'),
                Just(b'x'),
                Just(b'V'),
                Just(b'F'),
                Just(b'A'),
                any::<u8>(),
            ],
            proptest::collection::vec(any::<u8>(), 0..10),
        );
        let entries = proptest::collection::vec((key, value), 0..5);
        let cut = proptest::bool::weighted(0.2);
        (
            any::<u16>(),
            any::<u64>(),
            short(),
            entries,
            any::<u8>(),
            cut,
        )
            .prop_map(|(flags, size, text, entries, octet, cut)| {
                let mut v = vec![0, 60, 0, 0];
                v.extend(size.to_be_bytes());
                v.extend(flags.to_be_bytes());
                let short = |v: &mut Vec<u8>, b: &[u8]| {
                    v.push(b.len() as u8);
                    v.extend_from_slice(b);
                };
                for k in 0..14u16 {
                    if flags & (1 << (15 - k)) == 0 {
                        continue;
                    }
                    match k {
                        2 => {
                            let mut t = Vec::new();
                            for (key, (ty, body)) in &entries {
                                short(&mut t, key);
                                t.push(*ty);
                                let mut body = body.clone();
                                // mostly the size the type has (a random one otherwise)
                                let size = match ty {
                                    b't' | b'b' | b'B' => Some(1),
                                    b's' | b'u' | b'U' => Some(2),
                                    b'I' | b'i' | b'f' => Some(4),
                                    b'D' => Some(5),
                                    b'l' | b'L' | b'd' | b'T' => Some(8),
                                    b'V' => Some(0),
                                    _ => None,
                                };
                                if let Some(n) = size.filter(|_| body.len() % 5 != 4) {
                                    body.resize(n, 7);
                                }
                                // nested ones mostly well formed: an entry, a value
                                match ty {
                                    b'F' if body.len() % 3 != 2 => {
                                        body = b"\x01kI\0\0\0\x05".to_vec()
                                    }
                                    b'A' if body.len() % 3 != 2 => body = b"S\0\0\0\x01zV".to_vec(),
                                    _ => {}
                                }
                                if matches!(ty, b'S' | b'x' | b'F' | b'A') {
                                    t.extend((body.len() as u32).to_be_bytes());
                                }
                                t.extend_from_slice(&body);
                            }
                            v.extend((t.len() as u32).to_be_bytes());
                            v.extend(t);
                        }
                        3 | 4 => v.push(octet),
                        9 => v.extend(size.to_be_bytes()),
                        _ => short(&mut v, &text),
                    }
                }
                if cut {
                    v.truncate(v.len() * 3 / 4);
                }
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The hand reader keeps what amq-protocol's parse gives, and refuses what it refuses.
        #[test]
        fn content_headers_read_as_amq_protocol_reads_them(p in header_payload()) {
            let reference = parse_content_header(&p[..])
                .ok()
                .map(|(_, h)| (h.body_size, props_of(&h.properties)));
            prop_assert_eq!(super::super::hot::content_header(&p), reference);
        }
    }

    /// What an `AmqpOut` was handed: each message's body, and whether it was lent.
    #[derive(Default)]
    struct Handed(Vec<(bool, Vec<u8>)>, usize);

    impl AmqpOut for Handed {
        fn event(&mut self, _: AmqpEvent) {
            self.1 += 1;
        }
        fn message(&mut self, m: Message, lent: Option<&[u8]>) {
            assert!(
                lent.is_none() || m.body.is_empty(),
                "a lent body is not also kept"
            );
            self.0
                .push((lent.is_some(), lent.unwrap_or(&m.body).to_vec()));
        }
    }

    /// A publish of `body` on channel 1, its body cut into frames of `per_frame` bytes.
    fn published(body: &[u8], per_frame: usize) -> Vec<u8> {
        let frame = |kind: u8, payload: &[u8]| {
            let mut v = vec![kind, 0, 1];
            v.extend((payload.len() as u32).to_be_bytes());
            v.extend(payload);
            v.push(0xCE); // frame-end
            v
        };
        let mut method = vec![0, 60, 0, 40, 0, 0, 4];
        method.extend(b"nova\x07compute\x00");
        let mut header = vec![0, 60, 0, 0];
        header.extend((body.len() as u64).to_be_bytes());
        header.extend([0, 0]);
        let mut out = frame(FRAME_METHOD, &method);
        out.extend(frame(FRAME_HEADER, &header));
        for part in body.chunks(per_frame) {
            out.extend(frame(FRAME_BODY, part));
        }
        out
    }

    fn connection(max_held: usize) -> AmqpConnection {
        let at = |port| Endpoint {
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            port,
        };
        let limits = ConnLimits {
            max_frame: 1 << 20,
            max_body: 1 << 20,
            max_held,
            max_consumers: 16,
        };
        AmqpConnection::new(
            (at(40000), at(5672)),
            false,
            limits,
            BodyBudget::new(1 << 20),
        )
    }

    #[test]
    fn a_body_in_one_frame_is_lent_and_one_in_several_is_assembled() {
        let body: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let (mut h, mut out) = (Health::default(), Handed::default());
        let mut c = connection(1 << 20);
        for per_frame in [3000, 1000, 2999] {
            c.chunk(
                Dir::ToServer,
                Ts(1),
                Chunk::Data(&published(&body, per_frame)),
                &mut h,
                &mut out,
            );
        }
        let lent: Vec<bool> = out.0.iter().map(|(lent, _)| *lent).collect();
        assert_eq!(lent, [true, false, false]);
        assert!(out.0.iter().all(|(_, b)| *b == body));
        // the events' consumer of tests and fuzzing gets the same message either way
        let mut events = Vec::new();
        c.chunk(
            Dir::ToServer,
            Ts(2),
            Chunk::Data(&published(&body, 3000)),
            &mut h,
            &mut events,
        );
        assert!(matches!(&events[..], [AmqpEvent::Message(m)] if m.body == body));
        assert_eq!(h.total_anomalies(), 0);
    }

    #[test]
    fn a_lent_body_is_still_held_to_the_budget() {
        let body = vec![b'x'; 3000];
        let (mut h, mut out) = (Health::default(), Handed::default());
        let mut c = connection(2000);
        c.chunk(
            Dir::ToServer,
            Ts(1),
            Chunk::Data(&published(&body, 3000)),
            &mut h,
            &mut out,
        );
        assert!(out.0.is_empty(), "too large to hold, so not handed over");
        assert_eq!(h.anomaly_count("amqp", "body_over_budget"), 1);
        assert_eq!(c.held, 0);
    }
}
