//! Correlation: AMQP messages read as oslo.messaging → one event per RPC.
//!
//! publish ↔ deliver by `_unique_id` (a fanout: one publish, N delivers), call ↔ reply by
//! `_msg_id`. Timeouts are decided on packet time from the request's `expiration` (the
//! caller's own timeout). Every table is bounded; what falls out is counted and still
//! reported. Output is a list of `Signal`s for the sinks, in a deterministic order.

mod record;
mod table;

use crate::contract::{
    AmqpKind, AmqpMessage, ConnId, Delivery, Event, NotificationEvent, Obs, Oslo, Outcome, Process,
    ReplyPart, Request, RpcType,
};
use crate::health::Health;
use crate::identity::AddressBook;
use crate::oslo;
use crate::time::Ts;
use crate::view::{Seen, View};
use crate::{FastMap as HashMap, FastSet as HashSet};
use record::{Field, Id, Record, Shape, When};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use table::{Handle, Table};

/// `[rpc]`: pairing RPC messages.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorrelatorConfig {
    /// Calls waiting for a reply, at most; the oldest is reported (`no_reply`) past this.
    pub max_pending_calls: usize,
    /// Casts and fanouts waiting for their deliveries, at most.
    pub max_pending_messages: usize,
    /// After a call times out, how long a late reply is still matched to it.
    pub late_reply_window_s: f64,
    /// How long a cast waits for its deliveries before it is reported.
    pub cast_settle_s: f64,
    /// A call with no `expiration` (not oslo.messaging) is given up after this long.
    pub call_max_age_s: f64,
    /// Ids of reported messages remembered, to tell a retransmit or a late delivery from a
    /// new message.
    pub max_recent_ids: usize,
    /// Addresses whose process is remembered (for REST callers).
    pub max_known_addresses: usize,
    /// Consumers remembered per cast or fanout: its deliveries listed in its event, and
    /// whom a copy went to already. A fanout to more queues than this lists no further
    /// copy, and a second copy to a consumer not remembered counts as a new delivery
    /// (each copy past the cap is counted: `stacktap_evictions_total{table="rpc_consumers"}`).
    pub max_consumers_per_message: usize,
    /// Exchange, topic and method names (and message shapes) shared by every message that
    /// names them; past this, new ones are kept per message instead (more memory, no loss).
    pub max_interned_names: usize,
}

impl Default for CorrelatorConfig {
    fn default() -> Self {
        CorrelatorConfig {
            max_pending_calls: 200_000,
            max_pending_messages: 200_000,
            late_reply_window_s: 300.0,
            cast_settle_s: 30.0,
            call_max_age_s: 3600.0,
            max_recent_ids: 200_000,
            max_known_addresses: 65_536,
            max_consumers_per_message: 256,
            max_interned_names: 65_536,
        }
    }
}

/// An interned name (exchange, topic, method): cloning is a reference-count bump.
pub type Name = Arc<str>;

/// Interns the few distinct names a cloud uses, and the shapes of its messages (one per
/// destination and method); bounded, past the bound they are allocated per use (still
/// correct, just bigger).
#[derive(Default)]
struct Names {
    table: HashMap<Box<str>, Name>,
    shapes: HashMap<u64, Arc<Shape>>,
    /// `rpc.max_interned_names`
    cap: usize,
}

impl Names {
    fn get(&mut self, s: &str) -> Name {
        if let Some(n) = self.table.get(s) {
            return n.clone();
        }
        let n: Name = Arc::from(s);
        if self.table.len() < self.cap {
            self.table.insert(Box::from(s), n.clone());
        }
        n
    }

    /// The shape of a request message on `m`, shared with every other like it.
    fn shape(&mut self, m: &AmqpMessage, r: &Request) -> Arc<Shape> {
        let key = ahash::RandomState::with_seeds(5, 6, 7, 8).hash_one((
            r.rpc_type,
            &m.exchange,
            &m.routing_key,
            &r.method,
            &r.namespace,
            &r.version,
        ));
        if let Some(s) = self.shapes.get(&key)
            && s.rpc_type == r.rpc_type
            && *s.exchange == *m.exchange
            && *s.routing_key == *m.routing_key
            && *s.method == *r.method
            && s.namespace.as_deref() == r.namespace.as_deref()
            && s.version.as_deref() == r.version.as_deref()
        {
            return s.clone();
        }
        let (topic, server) = match r.rpc_type {
            RpcType::Fanout => (self.get(m.exchange.trim_end_matches("_fanout")), None),
            _ => {
                let (t, s) = oslo::split_routing_key(&m.routing_key);
                (self.get(t), s.map(Arc::from))
            }
        };
        let shape = Arc::new(Shape {
            rpc_type: r.rpc_type,
            exchange: self.get(&m.exchange),
            routing_key: m.routing_key.clone(),
            topic,
            server,
            method: self.get(&r.method),
            namespace: r.namespace.as_deref().map(Arc::from),
            version: r.version.as_deref().map(Arc::from),
        });
        if self.shapes.len() < self.cap {
            self.shapes.insert(key, shape.clone());
        }
        shape
    }
}

/// What the correlator tells the sinks.
#[derive(Debug, Clone)]
pub enum Signal {
    /// A request message seen for the first time ("RPCs received").
    Seen {
        exchange: Name,
        topic: Name,
        method: Name,
        rpc_type: RpcType,
    },
    /// One copy delivered to a consumer.
    Delivered {
        exchange: Name,
        topic: Name,
        method: Name,
        rpc_type: RpcType,
        redelivered: bool,
    },
    InFlight {
        topic: Name,
        delta: i64,
    },
    /// The caller's timeout passed with no reply (counted now; the event comes later).
    TimedOut {
        topic: Name,
        method: Name,
    },
    Heartbeat {
        topic: Name,
        method: Name,
    },
    /// A copy redelivered to another consumer, or read again by the same one.
    Redelivered {
        topic: Name,
        method: Name,
    },
    /// The broker cancelled a consumer (its queue was deleted, or failed over).
    ConsumerCancelled {
        queue: String,
    },
    Returned {
        reply_code: u16,
    },
    ChannelClosed {
        reply_code: u16,
        by_broker: bool,
    },
    ConnectionClosed {
        reply_code: u16,
        by_broker: bool,
    },
    Blocked,
    Event(Event),
    /// A finished request tree (for the request API and the store).
    Request(std::sync::Arc<crate::trace::RequestTree>),
    /// A failure a successful retry masked.
    Masked(crate::trace::MaskedFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Timer {
    /// The call's expiration (or max age) passed.
    Deadline = 0,
    /// The late-reply window of a timed-out call closed.
    LateWindow = 1,
    /// A cast's settle window closed.
    Settle = 2,
}

impl Timer {
    fn of(tag: u8) -> Timer {
        match tag {
            0 => Timer::Deadline,
            1 => Timer::LateWindow,
            _ => Timer::Settle,
        }
    }
}

/// A consumer's identity across reconnects: its process (connection_name survives a
/// reconnect) when named, else its connection.
fn consumer_key(p: &Process, conn: &ConnId) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = ahash::RandomState::with_seeds(1, 2, 3, 4).build_hasher();
    match (&p.service, p.pid) {
        (Some(s), Some(pid)) => (s, pid, &p.host).hash(&mut h),
        _ => conn.hash(&mut h),
    }
    h.finish()
}

/// Ids already reported, so that retries and duplicates are recognised. Bounded FIFO.
struct Recent {
    set: HashSet<Id>,
    order: VecDeque<Id>,
    cap: usize,
}

impl Recent {
    fn new(cap: usize) -> Self {
        Recent {
            set: HashSet::default(),
            order: VecDeque::new(),
            cap,
        }
    }
    fn insert(&mut self, id: Id) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
    fn contains(&self, id: &Id) -> bool {
        self.set.contains(id)
    }
}

pub struct Correlator {
    cfg: CorrelatorConfig,
    names: Names,
    /// The process at the client end of each open connection.
    conns: HashMap<ConnId, Arc<Process>>,
    /// Named processes by address, for REST callers.
    addresses: AddressBook,
    /// Calls by `_msg_id`.
    calls: Table,
    /// Casts and fanouts by `_unique_id`.
    casts: Table,
    /// Deadlines (lazy: a handle may be stale; pruned when stale ones outnumber the live).
    timers: BinaryHeap<Reverse<(Ts, u64)>>,
    done_calls: Recent,
    done_messages: Recent,
    view: View,
    /// Calls past their deadline while the view was undecided, and replies without a
    /// call seen meanwhile: judged once the view is (see `decide`).
    pending_calls: Vec<Handle>,
    pending_orphans: u64,
    pub now: Ts,
}

impl Correlator {
    pub fn new(cfg: CorrelatorConfig, view: crate::view::ViewConfig) -> Self {
        let recent = cfg.max_recent_ids.max(1);
        Correlator {
            names: Names {
                cap: cfg.max_interned_names,
                ..Names::default()
            },
            conns: HashMap::default(),
            addresses: AddressBook::new(cfg.max_known_addresses.max(1)),
            calls: Table::new(Field::MsgId),
            casts: Table::new(Field::UniqueId),
            timers: BinaryHeap::new(),
            done_calls: Recent::new(recent),
            done_messages: Recent::new(recent),
            view: View::new(view),
            cfg,
            pending_calls: Vec::new(),
            pending_orphans: 0,
            now: Ts::ZERO,
        }
    }

    /// Advances packet time: fires the timers that are due.
    pub fn advance(&mut self, now: Ts, health: &mut Health, out: &mut Vec<Signal>) {
        if now > self.now {
            self.now = now;
        }
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((at, packed)) = self.timers.pop().expect("peeked");
            let (h, timer) = Handle::unpack(packed);
            self.fire(at, Timer::of(timer), h, out);
        }
        self.decide(false, health, out);
    }

    /// Once the view is decided, the verdicts that waited for it: the expired calls are
    /// timeouts (complete view) or unknown (partial; answered, if a reply was published
    /// in time), the replies without a call anomalies or not.
    fn decide(&mut self, at_end: bool, health: &mut Health, out: &mut Vec<Signal>) {
        if self.pending_calls.is_empty() && self.pending_orphans == 0 {
            return;
        }
        let seen = self.view.seen(self.now, at_end);
        if seen == Seen::Undecided {
            return;
        }
        for h in std::mem::take(&mut self.pending_calls) {
            let Some((id, call)) = self.calls.at(h).filter(|(_, c)| c.unjudged) else {
                continue;
            };
            if seen == Seen::Complete {
                call.unjudged = false;
                out.push(Signal::TimedOut {
                    topic: call.shape.topic.clone(),
                    method: call.shape.method.clone(),
                });
            } else if call.seen(When::ReplyPublish) {
                let outcome = answered(call);
                self.finish_call(&id, outcome, out);
            }
        }
        if seen == Seen::Complete {
            for _ in 0..self.pending_orphans {
                health.anomaly("oslo", "reply_without_call");
            }
        }
        self.pending_orphans = 0;
    }

    /// A reply to a call never seen: an anomaly in a complete view, what a partial one
    /// shows all the time.
    fn orphan_reply(&mut self, t: Ts, health: &mut Health) {
        match self.view.seen(t, false) {
            Seen::Complete => health.anomaly("oslo", "reply_without_call"),
            Seen::Undecided => self.pending_orphans += 1,
            Seen::Partial => {}
        }
    }

    fn fire(&mut self, at: Ts, timer: Timer, h: Handle, out: &mut Vec<Signal>) {
        match timer {
            Timer::Deadline => {
                let late_window = self.cfg.late_reply_window_s;
                let Some((id, call)) = self.calls.at(h) else {
                    return;
                };
                if call.expired {
                    return;
                }
                if call.timeout_s().is_none() {
                    // not an oslo call (no expiration): give it up without a timeout verdict
                    self.finish_call(&id, Outcome::NoReply, out);
                    return;
                }
                let split = call.seen(When::Publish)
                    && !call.seen(When::Deliver)
                    && call.seen(When::ReplyPublish);
                if split {
                    self.view.evidence("split_call", at);
                }
                let seen = self.view.seen(at, false);
                let (_, call) = self.calls.at(h).expect("present");
                match seen {
                    Seen::Partial if call.seen(When::ReplyPublish) => {
                        // answered in time; its delivery went by elsewhere
                        let outcome = answered(call);
                        self.finish_call(&id, outcome, out);
                        return;
                    }
                    // nothing seen of an answer here: no verdict
                    Seen::Partial => call.unjudged = true,
                    Seen::Undecided => {
                        call.unjudged = true;
                        self.pending_calls.push(h);
                    }
                    Seen::Complete => out.push(Signal::TimedOut {
                        topic: call.shape.topic.clone(),
                        method: call.shape.method.clone(),
                    }),
                }
                call.expired = true;
                out.push(Signal::InFlight {
                    topic: call.shape.topic.clone(),
                    delta: -1,
                });
                self.timer(at.plus_secs(late_window), Timer::LateWindow, h);
            }
            Timer::LateWindow => {
                if let Some((id, c)) = self.calls.at(h).filter(|(_, c)| c.expired) {
                    let outcome = expired_outcome(c);
                    self.finish_call(&id, outcome, out);
                }
            }
            Timer::Settle => {
                if let Some((id, _)) = self.casts.at(h) {
                    let outcome = self.cast_outcome(&id, at);
                    self.finish_cast(&id, outcome, out);
                }
            }
        }
    }

    /// One AMQP observation at packet time `t` (others are not the correlator's).
    pub fn on_obs(&mut self, t: Ts, obs: &Obs, health: &mut Health, out: &mut Vec<Signal>) {
        match obs {
            Obs::AmqpIdentified {
                conn,
                connection_name,
                product,
            } => {
                let (service, pid) = match connection_name.as_deref() {
                    Some(name) => oslo::parse_connection_name(name),
                    None => (product.clone(), None),
                };
                let p = Process {
                    service,
                    pid,
                    host: conn.client.ip.to_string(),
                };
                let p = Arc::new(p);
                if !self.addresses.learn(conn.client.ip, &p) {
                    health.evict("address_book", 1);
                }
                self.conns.insert(*conn, p);
            }
            Obs::AmqpMessage(m) => self.on_message(t, m, health, out),
            Obs::AmqpClosed {
                channel,
                reply_code,
                by_broker,
                ..
            } => out.push(if *channel {
                Signal::ChannelClosed {
                    reply_code: *reply_code,
                    by_broker: *by_broker,
                }
            } else {
                Signal::ConnectionClosed {
                    reply_code: *reply_code,
                    by_broker: *by_broker,
                }
            }),
            Obs::AmqpBlocked { .. } => out.push(Signal::Blocked),
            Obs::AmqpGone { conn } => {
                // open calls keep their own Arc<Process>; a connection gone is forgotten
                // (its 4-tuple may come back as a new connection, named anew)
                self.conns.remove(conn);
            }
            Obs::AmqpConsumerCancelled { queue, .. } => out.push(Signal::ConsumerCancelled {
                queue: queue.clone().unwrap_or_default(),
            }),
            Obs::Http(_) | Obs::Tick | Obs::ProbeStats(_) | Obs::End => {}
        }
    }

    /// The processes AMQP connections named, by address.
    pub fn addresses(&mut self) -> &mut AddressBook {
        &mut self.addresses
    }

    /// The process at the client end of `conn`: named when start-ok was seen, else just
    /// the peer address.
    fn process(&mut self, conn: &ConnId) -> Arc<Process> {
        let host = conn.client.ip;
        self.conns
            .entry(*conn)
            .or_insert_with(|| {
                Arc::new(Process {
                    service: None,
                    pid: None,
                    host: host.to_string(),
                })
            })
            .clone()
    }

    fn on_message(&mut self, t: Ts, m: &AmqpMessage, health: &mut Health, out: &mut Vec<Signal>) {
        self.view.saw(t);
        let oslo = match m.oslo.as_ref() {
            Ok(o) => o,
            Err(e) => {
                health.anomaly("oslo", e.kind());
                if let AmqpKind::Return { reply_code } = m.kind {
                    out.push(Signal::Returned { reply_code });
                }
                return;
            }
        };
        match (&m.kind, oslo) {
            (AmqpKind::Publish { .. }, Oslo::Request(r)) => {
                self.request_seen(t, m, r, true, health, out)
            }
            (AmqpKind::Deliver { .. } | AmqpKind::GetOk { .. }, Oslo::Request(r)) => {
                self.request_seen(t, m, r, false, health, out)
            }
            (AmqpKind::Publish { .. }, Oslo::Reply(r)) => {
                let publisher = self.process(&m.conn);
                let id = Id::of(&r.msg_id);
                let Some(call) = self.calls.get_mut(&id) else {
                    if !self.done_calls.contains(&id) {
                        self.orphan_reply(t, health);
                    }
                    return;
                };
                match r.part {
                    ReplyPart::Heartbeat => {
                        call.add_heartbeat();
                        out.push(Signal::Heartbeat {
                            topic: call.shape.topic.clone(),
                            method: call.shape.method.clone(),
                        });
                    }
                    ReplyPart::LegacyPayload => call.rare().legacy_failure = r.failure.clone(),
                    ReplyPart::Final => {
                        if !call.seen(When::ReplyPublish) {
                            call.set(When::ReplyPublish, t);
                            let legacy = call.rare_ref().and_then(|x| x.legacy_failure.clone());
                            if let Some(e) = r.failure.clone().or(legacy) {
                                call.rare().error = Some(e);
                            }
                        }
                        // answered, and published, but its delivery went by elsewhere
                        if call.seen(When::Publish) && !call.seen(When::Deliver) {
                            self.view.evidence("split_call", t);
                        }
                        // the server that answered (a redelivered call may have gone to two)
                        if call.callee.is_none() || publisher.service.is_some() {
                            call.callee = Some(publisher);
                        }
                    }
                }
            }
            (AmqpKind::Deliver { .. } | AmqpKind::GetOk { .. }, Oslo::Reply(r)) => {
                let id = Id::of(&r.msg_id);
                let Some(call) = self.calls.get_mut(&id) else {
                    if !self.done_calls.contains(&id) {
                        // a reply queue consumed since the capture began: every call
                        // answered there was published since, and should have been seen
                        if m.queue.is_some() {
                            self.view.evidence("reply_without_call", t);
                        }
                        self.orphan_reply(t, health);
                    }
                    return;
                };
                match r.part {
                    ReplyPart::Heartbeat => {}
                    ReplyPart::LegacyPayload => {
                        if call.rare_ref().is_none_or(|x| x.legacy_failure.is_none())
                            && let Some(f) = r.failure.clone()
                        {
                            call.rare().legacy_failure = Some(f);
                        }
                    }
                    ReplyPart::Final => {
                        call.set(When::ReplyDeliver, t);
                        if call.error().is_none() {
                            let legacy = call.rare_ref().and_then(|x| x.legacy_failure.clone());
                            if let Some(e) = r.failure.clone().or(legacy) {
                                call.rare().error = Some(e);
                            }
                        }
                        let outcome = if call.expired {
                            if call.unjudged {
                                // the caller did time out: counted now that it is known
                                out.push(Signal::TimedOut {
                                    topic: call.shape.topic.clone(),
                                    method: call.shape.method.clone(),
                                });
                            }
                            Outcome::LateReply
                        } else {
                            answered(call)
                        };
                        let split = (call.seen(When::Publish) && !call.seen(When::Deliver))
                            || (call.seen(When::Deliver) && !call.seen(When::ReplyPublish));
                        if split {
                            self.view.evidence("split_call", t);
                        }
                        self.finish_call(&id, outcome, out);
                    }
                }
            }
            (AmqpKind::Return { reply_code }, oslo) => {
                out.push(Signal::Returned {
                    reply_code: *reply_code,
                });
                match oslo {
                    Oslo::Reply(r) => {
                        let id = Id::of(&r.msg_id);
                        if let Some(call) = self.calls.get_mut(&id) {
                            call.add_return();
                            if r.part == ReplyPart::Final {
                                if !call.seen(When::ReplyPublish) {
                                    call.set(When::ReplyPublish, t);
                                }
                                if call.error().is_none()
                                    && let Some(f) = r.failure.clone()
                                {
                                    call.rare().error = Some(f);
                                }
                                self.finish_call(&id, Outcome::Unroutable, out);
                            }
                        }
                    }
                    Oslo::Request(r) => {
                        let call = Id::of_opt(r.msg_id.as_deref());
                        let cast = Id::of_opt(r.unique_id.as_deref());
                        if r.msg_id.is_some() && self.calls.contains(&call) {
                            self.finish_call(&call, Outcome::Unroutable, out);
                        } else if r.unique_id.is_some() && self.casts.contains(&cast) {
                            self.finish_cast(&cast, Outcome::Unroutable, out);
                        }
                    }
                    Oslo::Notification(_) => {}
                }
            }
            (
                AmqpKind::Publish { .. } | AmqpKind::Deliver { .. } | AmqpKind::GetOk { .. },
                Oslo::Notification(n),
            ) => {
                // one publish, delivered to every listener queue: report it once
                let key = n.unique_id.as_deref().or(n.message_id.as_deref());
                if let Some(k) = key.map(Id::of) {
                    if self.done_messages.contains(&k) {
                        return;
                    }
                    self.done_messages.insert(k);
                }
                let publisher =
                    matches!(m.kind, AmqpKind::Publish { .. }).then(|| self.process(&m.conn));
                out.push(Signal::Event(Event::Notification(Box::new(
                    NotificationEvent {
                        publisher_id: n.publisher_id.clone(),
                        event_type: n.event_type.clone(),
                        priority: n.priority.clone(),
                        exchange: m.exchange.to_string(),
                        t: t.as_secs_f64(),
                        request_id: n.request_id.clone(),
                        global_request_id: n.global_request_id.clone(),
                        publisher,
                    },
                ))));
            }
        }
    }

    fn request_seen(
        &mut self,
        ts: Ts,
        m: &AmqpMessage,
        r: &Request,
        published: bool,
        health: &mut Health,
        out: &mut Vec<Signal>,
    ) {
        let proc_ = self.process(&m.conn);
        let redelivered = matches!(
            m.kind,
            AmqpKind::Deliver { redelivered: true } | AmqpKind::GetOk { redelivered: true }
        );
        let is_call = r.rpc_type == RpcType::Call;
        let kept = self.cfg.max_consumers_per_message;
        let key = if is_call { &r.msg_id } else { &r.unique_id };
        let Some(key) = key.as_deref().map(Id::of) else {
            health.anomaly("oslo", "request_without_id");
            return;
        };
        let done = if is_call {
            self.done_calls.contains(&key)
        } else {
            self.done_messages.contains(&key)
        };
        let table = if is_call {
            &mut self.calls
        } else {
            &mut self.casts
        };
        if let Some(c) = table.get_mut(&key) {
            if published {
                if !c.seen(When::Publish) {
                    c.set(When::Publish, ts);
                    c.caller = Some(proc_);
                } else {
                    health.anomaly("oslo", "duplicate_publish");
                }
            } else {
                Self::delivered(
                    c,
                    ts,
                    (proc_, &m.conn, &m.queue),
                    redelivered,
                    (kept, health),
                    out,
                );
            }
            return;
        }
        if done {
            if !published {
                health.anomaly("oslo", "delivery_after_report");
            }
            return;
        }
        // first sighting
        let timeout_ms = if is_call {
            m.expiration
                .as_deref()
                .and_then(|e| e.trim().parse::<u64>().ok())
                .map(|ms| ms.min(u32::MAX as u64) as u32)
        } else {
            None
        };
        let timeout_s = timeout_ms.map(|ms| ms as f64 / 1000.0);
        // delivered, never seen published, though the broker would have dropped it had it
        // waited longer than its timeout: it was published in the capture, elsewhere
        if !published
            && let (Some(first), Some(e)) = (self.view.first(), timeout_s)
            && ts.secs_since(first) > e + 1.0
        {
            self.view.evidence("delivery_without_publish", ts);
        }
        let mut call = Record::new(self.names.shape(m, r), ts, timeout_ms);
        // the key is the call's msg_id or the cast's unique_id, read once above
        let keyed = if is_call {
            Field::MsgId
        } else {
            Field::UniqueId
        };
        for (f, v) in [
            (Field::MsgId, &r.msg_id),
            (Field::UniqueId, &r.unique_id),
            (Field::ReplyQ, &r.reply_q),
            (Field::RequestId, &r.request_id),
            (Field::GlobalRequestId, &r.global_request_id),
        ] {
            if f == keyed {
                call.set_parsed_id(f, key, v.as_deref());
            } else {
                call.set_id(f, v.as_deref());
            }
        }
        if let Some(tc) = r.trace_context {
            call.rare().trace_context = Some(tc);
        }
        out.push(Signal::Seen {
            exchange: call.shape.exchange.clone(),
            topic: call.shape.topic.clone(),
            method: call.shape.method.clone(),
            rpc_type: call.shape.rpc_type,
        });
        if published {
            call.set(When::Publish, ts);
            call.caller = Some(proc_);
        } else {
            Self::delivered(
                &mut call,
                ts,
                (proc_, &m.conn, &m.queue),
                redelivered,
                (kept, health),
                out,
            );
        }
        if is_call {
            if self.calls.len() >= self.cfg.max_pending_calls {
                self.evict_call(health, out);
            }
            // a timeout counts from the publish; seen only delivered, from the deliver
            let deadline = match timeout_s {
                Some(s) => ts.plus_secs(s),
                None => ts.plus_secs(self.cfg.call_max_age_s),
            };
            out.push(Signal::InFlight {
                topic: call.shape.topic.clone(),
                delta: 1,
            });
            let h = self.calls.insert(call);
            self.timer(deadline, Timer::Deadline, h);
        } else {
            if self.casts.len() >= self.cfg.max_pending_messages {
                self.evict_cast(health, out);
            }
            let h = self.casts.insert(call);
            self.timer(ts.plus_secs(self.cfg.cast_settle_s), Timer::Settle, h);
        }
    }

    /// Sets a timer; the heap is pruned of stale ones when they outnumber the live ones
    /// (a call evicted long before its deadline leaves one behind).
    fn timer(&mut self, at: Ts, timer: Timer, h: Handle) {
        self.timers.push(Reverse((at, h.pack(timer as u8))));
        let live = self.calls.len() + self.casts.len();
        if self.timers.len() > 2 * live + 1024 {
            let (calls, casts) = (&self.calls, &self.casts);
            self.timers.retain(|Reverse((_, packed))| {
                let (h, t) = Handle::unpack(*packed);
                match Timer::of(t) {
                    Timer::Settle => casts.live(h),
                    Timer::Deadline | Timer::LateWindow => calls.live(h),
                }
            });
        }
    }

    /// One copy reached a consumer. Each consumer that got the message counts once: a
    /// redelivery (the broker gave a copy nobody acked to another consumer, e.g. a quorum
    /// queue after its consumer died) moves it there, and a second copy to the same
    /// consumer (a stream consumer re-reading after it re-attached) is only counted as
    /// redelivered. A call's delivery is the one to the server that got it last.
    fn delivered(
        c: &mut Record,
        t: Ts,
        (consumer, conn, queue): (Arc<Process>, &ConnId, &Option<Arc<str>>),
        redelivered: bool,
        (kept, health): (usize, &mut Health),
        out: &mut Vec<Signal>,
    ) {
        let who = consumer_key(&consumer, conn);
        let (again, any) = c.consumer_seen(who, kept, health);
        let moved = redelivered && !again && any;
        if again || moved {
            c.add_redelivery();
            if moved && c.shape.rpc_type == RpcType::Call {
                c.set(When::Deliver, t);
                c.callee = Some(consumer);
            }
            out.push(Signal::Redelivered {
                topic: c.shape.topic.clone(),
                method: c.shape.method.clone(),
            });
            return;
        }
        c.add_delivery();
        // a call has one server (its callee); a cast or fanout, one consumer per copy
        // (a copy past the cap was counted as its consumer was not remembered)
        if c.shape.rpc_type != RpcType::Call && c.rare_ref().map_or(0, |r| r.copies.len()) < kept {
            c.rare().copies.push(Delivery {
                queue: queue.as_deref().map(str::to_owned),
                consumer: consumer.clone(),
                connection: conn.client,
                t: t.as_secs_f64(),
            });
        }
        if !c.seen(When::Deliver) {
            c.set(When::Deliver, t);
            c.callee = Some(consumer);
        }
        out.push(Signal::Delivered {
            exchange: c.shape.exchange.clone(),
            topic: c.shape.topic.clone(),
            method: c.shape.method.clone(),
            rpc_type: c.shape.rpc_type,
            redelivered,
        });
    }

    fn finish_call(&mut self, id: &Id, outcome: Outcome, out: &mut Vec<Signal>) {
        let Some(call) = self.calls.remove(id) else {
            return;
        };
        if !call.expired {
            out.push(Signal::InFlight {
                topic: call.shape.topic.clone(),
                delta: -1,
            });
        }
        self.done_calls.insert(*id);
        out.push(Signal::Event(Event::Rpc(Box::new(call.event(outcome)))));
    }

    fn finish_cast(&mut self, id: &Id, outcome: Outcome, out: &mut Vec<Signal>) {
        let Some(cast) = self.casts.remove(id) else {
            return;
        };
        self.done_messages.insert(*id);
        out.push(Signal::Event(Event::Rpc(Box::new(cast.event(outcome)))));
    }

    fn evict_call(&mut self, health: &mut Health, out: &mut Vec<Signal>) {
        if let Some(id) = self.calls.oldest() {
            health.evict("rpc_calls", 1);
            let c = self.calls.get(&id).expect("oldest is present");
            let outcome = if c.expired {
                expired_outcome(c)
            } else {
                Outcome::NoReply
            };
            self.finish_call(&id, outcome, out);
        }
    }

    fn evict_cast(&mut self, health: &mut Health, out: &mut Vec<Signal>) {
        if let Some(id) = self.casts.oldest() {
            health.evict("rpc_messages", 1);
            let outcome = self.cast_outcome(&id, self.now);
            self.finish_cast(&id, outcome, out);
        }
    }

    /// End of input: everything still open is reported, oldest first.
    pub fn finish_all(&mut self, health: &mut Health, out: &mut Vec<Signal>) {
        self.decide(true, health, out);
        for id in self.calls.ids_by_age() {
            let c = self.calls.get(&id).expect("listed");
            let outcome = if c.expired {
                expired_outcome(c)
            } else {
                Outcome::NoReply
            };
            self.finish_call(&id, outcome, out);
        }
        for id in self.casts.ids_by_age() {
            let outcome = self.cast_outcome(&id, self.now);
            self.finish_cast(&id, outcome, out);
        }
        self.timers.clear();
        self.calls.clear();
        self.casts.clear();
    }

    /// A cast or fanout whose time to be delivered is up: delivered, or (no copy seen)
    /// undelivered, unless the view is partial and its consumers may be elsewhere.
    fn cast_outcome(&self, id: &Id, now: Ts) -> Outcome {
        if self.casts.get(id).is_some_and(|c| c.deliveries > 0) {
            Outcome::Ok
        } else if self.view.seen(now, true) == Seen::Partial {
            Outcome::Unknown
        } else {
            Outcome::Undelivered
        }
    }

    /// How much of the broker the correlator sees (the evidence of a partial view).
    pub fn view(&self) -> &View {
        &self.view
    }
}

/// A call whose final reply was seen: its answer.
fn answered(c: &Record) -> Outcome {
    if c.error().is_some() {
        Outcome::RemoteError
    } else {
        Outcome::Ok
    }
}

/// A call past its deadline with no answer seen: timed out, or unknown where the view
/// could not tell.
fn expired_outcome(c: &Record) -> Outcome {
    if c.unjudged {
        Outcome::Unknown
    } else {
        Outcome::Timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Endpoint, Observation, RpcEvent};

    fn body(inner: serde_json::Value) -> Arc<Result<Oslo, crate::contract::NotOslo>> {
        let b = serde_json::to_vec(
            &serde_json::json!({"oslo.version": "2.0", "oslo.message": inner.to_string()}),
        )
        .unwrap();
        Arc::new(oslo::decode("", &Default::default(), &b, 64 << 20))
    }

    fn conn(n: u16) -> ConnId {
        ConnId {
            client: Endpoint {
                ip: "10.0.0.1".parse().unwrap(),
                port: n,
            },
            server: Endpoint {
                ip: "10.0.0.9".parse().unwrap(),
                port: 5672,
            },
        }
    }

    struct Wire {
        c: Correlator,
        h: Health,
        out: Vec<Signal>,
    }

    impl Wire {
        fn new() -> Wire {
            Wire::with(CorrelatorConfig::default())
        }

        fn with(cfg: CorrelatorConfig) -> Wire {
            Wire {
                c: Correlator::new(cfg, Default::default()),
                h: Health::default(),
                out: Vec::new(),
            }
        }

        fn see(&mut self, o: Observation) {
            self.c.on_obs(o.t, &o.what, &mut self.h, &mut self.out);
        }

        /// Connection `n` belongs to process `name:pid`.
        fn conn(&mut self, n: u16, name: &str) {
            self.see(Observation {
                t: Ts::ZERO,
                what: Obs::AmqpIdentified {
                    conn: conn(n),
                    connection_name: Some(format!("{name}:00000000-0000")),
                    product: None,
                },
            });
        }

        fn msg(
            &mut self,
            t: f64,
            n: u16,
            kind: AmqpKind,
            exchange: &str,
            b: &Arc<Result<Oslo, crate::contract::NotOslo>>,
        ) {
            let m = AmqpMessage {
                conn: conn(n),
                kind,
                exchange: exchange.into(),
                routing_key: "".into(),
                queue: None,
                expiration: None,
                stream_offset: None,
                delivery_count: None,
                oslo: b.clone(),
            };
            self.see(Observation {
                t: Ts::from_secs_f64(t),
                what: Obs::AmqpMessage(Box::new(m)),
            });
        }

        fn rpc_events(&mut self) -> Vec<RpcEvent> {
            self.c.finish_all(&mut self.h, &mut self.out);
            self.out
                .drain(..)
                .filter_map(|s| match s {
                    Signal::Event(Event::Rpc(e)) => Some(*e),
                    _ => None,
                })
                .collect()
        }
    }

    fn deliver(redelivered: bool) -> AmqpKind {
        AmqpKind::Deliver { redelivered }
    }

    #[test]
    fn a_stream_re_read_and_a_redelivery_count_once_per_consumer() {
        let mut w = Wire::new();
        w.conn(1, "nova-compute:11");
        w.conn(2, "nova-scheduler:21");
        w.conn(3, "nova-scheduler:22");
        w.conn(4, "nova-scheduler:21"); // sched 21 again, reconnected after a broker cancel
        let fanout =
            body(serde_json::json!({"method": "update_instance_info", "_unique_id": "u1"}));
        // a fanout's exchange decides its type: decode it as the fanout it is
        let fanout = match fanout.as_ref() {
            Ok(Oslo::Request(r)) => Arc::new(Ok(Oslo::Request(Request {
                rpc_type: RpcType::Fanout,
                ..r.clone()
            }))),
            other => panic!("{other:?}"),
        };
        let publish = AmqpKind::Publish { mandatory: false };
        w.msg(0.0, 1, publish, "scheduler_fanout", &fanout);
        w.msg(0.1, 2, deliver(false), "scheduler_fanout", &fanout);
        w.msg(0.1, 3, deliver(false), "scheduler_fanout", &fanout);
        // the reconnected consumer re-reads the stream's last chunk
        w.msg(0.9, 4, deliver(false), "scheduler_fanout", &fanout);
        let ev = w.rpc_events();
        assert_eq!((ev[0].deliveries, ev[0].redeliveries), (2, 1));
    }

    #[test]
    fn a_fanout_past_the_consumer_cap_lists_what_it_kept_and_counts_the_rest() {
        let mut w = Wire::with(CorrelatorConfig {
            max_consumers_per_message: 2,
            ..CorrelatorConfig::default()
        });
        w.conn(1, "nova-compute:11");
        for n in 2..=5 {
            w.conn(n, &format!("nova-scheduler:{n}"));
        }
        let fanout = match body(serde_json::json!({"method": "m", "_unique_id": "u1"})).as_ref() {
            Ok(Oslo::Request(r)) => Arc::new(Ok(Oslo::Request(Request {
                rpc_type: RpcType::Fanout,
                ..r.clone()
            }))),
            other => panic!("{other:?}"),
        };
        w.msg(0.0, 1, AmqpKind::Publish { mandatory: false }, "f", &fanout);
        for n in 2..=5 {
            w.msg(0.1, n, deliver(false), "f", &fanout);
        }
        let ev = w.rpc_events();
        // every copy is a delivery; two are listed, and the two past them counted
        assert_eq!(ev[0].deliveries, 4);
        assert_eq!(ev[0].copies.len(), 2);
        assert_eq!(w.h.evictions.get("rpc_consumers"), Some(&2));
    }

    #[test]
    fn a_call_redelivered_to_another_server_is_one_call_served_by_the_second() {
        let mut w = Wire::new();
        w.conn(1, "nova-api:1");
        w.conn(2, "nova-compute:11");
        w.conn(3, "nova-compute:12");
        let call = body(
            serde_json::json!({"method": "slow_op", "_msg_id": "m1", "_reply_q": "reply_api:nova-api:1", "_unique_id": "u1"}),
        );
        let reply = body(
            serde_json::json!({"result": 1, "failure": null, "ending": true, "_msg_id": "m1", "_unique_id": "u2"}),
        );
        w.msg(
            0.0,
            1,
            AmqpKind::Publish { mandatory: false },
            "nova",
            &call,
        );
        w.msg(0.01, 2, deliver(false), "nova", &call);
        // compute 11 died holding it unacked: the broker hands it to compute 12
        w.msg(1.0, 3, deliver(true), "nova", &call);
        w.msg(1.2, 3, AmqpKind::Publish { mandatory: true }, "", &reply);
        w.msg(1.21, 1, deliver(false), "", &reply);
        let ev = w.rpc_events();
        assert_eq!(ev.len(), 1);
        let e = &ev[0];
        assert_eq!(
            (e.deliveries, e.redeliveries, e.outcome),
            (1, 1, Outcome::Ok)
        );
        assert_eq!(e.callee.as_ref().unwrap().pid, Some(12));
        assert_eq!(
            e.t_deliver,
            Some(1.0),
            "the delivery to the server that answered"
        );
    }
}
