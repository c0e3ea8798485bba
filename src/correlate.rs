//! Correlation: AMQP messages read as oslo.messaging → one event per RPC.
//!
//! publish ↔ deliver by `_unique_id` (a fanout: one publish, N delivers), call ↔ reply by
//! `_msg_id`. Timeouts are decided on packet time from the request's `expiration` (the
//! caller's own timeout). Every table is bounded; what falls out is counted and still
//! reported. Output is a list of `Signal`s for the sinks, in a deterministic order.

use crate::contract::{
    AmqpKind, AmqpMessage, ConnId, Delivery, Event, NotificationEvent, Obs, Oslo, Outcome, Process,
    RemoteError, ReplyPart, Request, RpcEvent, RpcType,
};
use crate::health::Health;
use crate::identity::AddressBook;
use crate::oslo;
use crate::time::Ts;
use crate::view::{Seen, View};
use crate::{FastMap as HashMap, FastSet as HashSet};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

/// `[rpc]`: pairing RPC messages.
#[derive(Debug, Clone, serde::Deserialize)]
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
        }
    }
}

/// An interned name (exchange, topic, method): cloning is a reference-count bump.
pub type Name = Arc<str>;

/// Interns the few distinct names a cloud uses; bounded, past the bound names are
/// allocated per use (still correct, just slower).
#[derive(Default)]
struct Names {
    table: HashMap<Box<str>, Name>,
}

const MAX_INTERNED: usize = 1 << 16;

impl Names {
    fn get(&mut self, s: &str) -> Name {
        if let Some(n) = self.table.get(s) {
            return n.clone();
        }
        let n: Name = Arc::from(s);
        if self.table.len() < MAX_INTERNED {
            self.table.insert(Box::from(s), n.clone());
        }
        n
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
enum Timer {
    /// The call's expiration (or max age) passed.
    Deadline,
    /// The late-reply window of a timed-out call closed.
    LateWindow,
    /// A cast's settle window closed.
    Settle,
}

struct Call {
    ev: RpcEvent,
    /// Who got a copy so far (see `consumer_key`): a second copy to the same consumer is
    /// a re-read (a stream consumer re-attaching), not another delivery.
    consumers: Vec<u64>,
    first_seen: Ts,
    expired: bool,
    /// Its deadline passed while the view was partial: no timeout verdict (the reply may
    /// have gone through a node this probe does not see).
    unjudged: bool,
    /// Failure from a legacy (≤ 2.x) payload reply, completed by the empty ending reply.
    legacy_failure: Option<RemoteError>,
}

/// Consumers remembered per message; a fanout to more queues than this counts every
/// further copy as a new delivery.
const MAX_CONSUMERS_KEPT: usize = 256;

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
    set: HashSet<String>,
    order: VecDeque<String>,
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
    fn insert(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
    fn contains(&self, id: &str) -> bool {
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
    calls: HashMap<String, Call>,
    /// Casts and fanouts by `_unique_id`.
    casts: HashMap<String, Call>,
    /// Insertion order, for evicting the oldest when a table is full (lazy: ids may be gone).
    call_order: VecDeque<String>,
    cast_order: VecDeque<String>,
    timers: BinaryHeap<Reverse<(Ts, Timer, String)>>,
    done_calls: Recent,
    done_messages: Recent,
    view: View,
    /// Calls past their deadline while the view was undecided, and replies without a
    /// call seen meanwhile: judged once the view is (see `decide`).
    pending_calls: Vec<String>,
    pending_orphans: u64,
    pub now: Ts,
}

impl Correlator {
    pub fn new(cfg: CorrelatorConfig, view: crate::view::ViewConfig) -> Self {
        let recent = cfg.max_recent_ids.max(1);
        Correlator {
            names: Names::default(),
            conns: HashMap::default(),
            addresses: AddressBook::new(cfg.max_known_addresses.max(1)),
            calls: HashMap::default(),
            casts: HashMap::default(),
            call_order: VecDeque::new(),
            cast_order: VecDeque::new(),
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
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((at, timer, id)) = self.timers.pop().expect("peeked");
            self.fire(at, timer, id, out);
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
        for id in std::mem::take(&mut self.pending_calls) {
            let Some(call) = self.calls.get_mut(&id).filter(|c| c.unjudged) else {
                continue;
            };
            if seen == Seen::Complete {
                call.unjudged = false;
                out.push(Signal::TimedOut {
                    topic: call.ev.topic.clone(),
                    method: call.ev.method.clone(),
                });
            } else if call.ev.t_reply_publish.is_some() {
                let outcome = answered(&call.ev);
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

    fn fire(&mut self, at: Ts, timer: Timer, id: String, out: &mut Vec<Signal>) {
        match timer {
            Timer::Deadline => {
                let late_window = self.cfg.late_reply_window_s;
                let Some(call) = self.calls.get_mut(&id) else {
                    return;
                };
                if call.expired {
                    return;
                }
                if call.ev.timeout_s.is_none() {
                    // not an oslo call (no expiration): give it up without a timeout verdict
                    self.finish_call(&id, Outcome::NoReply, out);
                    return;
                }
                let split = call.ev.t_publish.is_some()
                    && call.ev.t_deliver.is_none()
                    && call.ev.t_reply_publish.is_some();
                if split {
                    self.view.evidence("split_call", at);
                }
                let call = self.calls.get_mut(&id).expect("present");
                match self.view.seen(at, false) {
                    Seen::Partial if call.ev.t_reply_publish.is_some() => {
                        // answered in time; its delivery went by elsewhere
                        let outcome = answered(&call.ev);
                        self.finish_call(&id, outcome, out);
                        return;
                    }
                    // nothing seen of an answer here: no verdict
                    Seen::Partial => call.unjudged = true,
                    Seen::Undecided => {
                        call.unjudged = true;
                        self.pending_calls.push(id.clone());
                    }
                    Seen::Complete => out.push(Signal::TimedOut {
                        topic: call.ev.topic.clone(),
                        method: call.ev.method.clone(),
                    }),
                }
                call.expired = true;
                out.push(Signal::InFlight {
                    topic: call.ev.topic.clone(),
                    delta: -1,
                });
                self.timers
                    .push(Reverse((at.plus_secs(late_window), Timer::LateWindow, id)));
            }
            Timer::LateWindow => {
                if let Some(c) = self.calls.get(&id).filter(|c| c.expired) {
                    let outcome = expired_outcome(c);
                    self.finish_call(&id, outcome, out);
                }
            }
            Timer::Settle => {
                if let Some(c) = self.casts.get(&id) {
                    let outcome = self.cast_outcome(c, at);
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
                let Some(call) = self.calls.get_mut(&r.msg_id) else {
                    if !self.done_calls.contains(&r.msg_id) {
                        self.orphan_reply(t, health);
                    }
                    return;
                };
                match r.part {
                    ReplyPart::Heartbeat => {
                        call.ev.heartbeats += 1;
                        out.push(Signal::Heartbeat {
                            topic: call.ev.topic.clone(),
                            method: call.ev.method.clone(),
                        });
                    }
                    ReplyPart::LegacyPayload => call.legacy_failure = r.failure.clone(),
                    ReplyPart::Final => {
                        if call.ev.t_reply_publish.is_none() {
                            call.ev.t_reply_publish = Some(t.as_secs_f64());
                            call.ev.error = r.failure.clone().or(call.legacy_failure.take());
                        }
                        // answered, and published, but its delivery went by elsewhere
                        if call.ev.t_publish.is_some() && call.ev.t_deliver.is_none() {
                            self.view.evidence("split_call", t);
                        }
                        // the server that answered (a redelivered call may have gone to two)
                        if call.ev.callee.is_none() || publisher.service.is_some() {
                            call.ev.callee = Some(publisher);
                        }
                    }
                }
            }
            (AmqpKind::Deliver { .. } | AmqpKind::GetOk { .. }, Oslo::Reply(r)) => {
                let Some(call) = self.calls.get_mut(&r.msg_id) else {
                    if !self.done_calls.contains(&r.msg_id) {
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
                        if call.legacy_failure.is_none() {
                            call.legacy_failure = r.failure.clone();
                        }
                    }
                    ReplyPart::Final => {
                        call.ev.t_reply_deliver = Some(t.as_secs_f64());
                        if call.ev.error.is_none() {
                            call.ev.error = r.failure.clone().or(call.legacy_failure.take());
                        }
                        let outcome = if call.expired {
                            if call.unjudged {
                                // the caller did time out: counted now that it is known
                                out.push(Signal::TimedOut {
                                    topic: call.ev.topic.clone(),
                                    method: call.ev.method.clone(),
                                });
                            }
                            Outcome::LateReply
                        } else {
                            answered(&call.ev)
                        };
                        let split = (call.ev.t_publish.is_some() && call.ev.t_deliver.is_none())
                            || (call.ev.t_deliver.is_some() && call.ev.t_reply_publish.is_none());
                        if split {
                            self.view.evidence("split_call", t);
                        }
                        let id = r.msg_id.clone();
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
                        if let Some(call) = self.calls.get_mut(&r.msg_id) {
                            call.ev.returns += 1;
                            if r.part == ReplyPart::Final {
                                if call.ev.t_reply_publish.is_none() {
                                    call.ev.t_reply_publish = Some(t.as_secs_f64());
                                }
                                if call.ev.error.is_none() {
                                    call.ev.error = r.failure.clone();
                                }
                                let id = r.msg_id.clone();
                                self.finish_call(&id, Outcome::Unroutable, out);
                            }
                        }
                    }
                    Oslo::Request(r) => {
                        if let Some(id) = r.msg_id.clone().filter(|id| self.calls.contains_key(id))
                        {
                            self.finish_call(&id, Outcome::Unroutable, out);
                        } else if let Some(id) =
                            r.unique_id.clone().filter(|id| self.casts.contains_key(id))
                        {
                            self.finish_cast(&id, Outcome::Unroutable, out);
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
                let key = n.unique_id.clone().or(n.message_id.clone());
                if let Some(k) = &key {
                    if self.done_messages.contains(k) {
                        return;
                    }
                    self.done_messages.insert(k.clone());
                }
                let publisher =
                    matches!(m.kind, AmqpKind::Publish { .. }).then(|| self.process(&m.conn));
                out.push(Signal::Event(Event::Notification(Box::new(
                    NotificationEvent {
                        publisher_id: n.publisher_id.clone(),
                        event_type: n.event_type.clone(),
                        priority: n.priority.clone(),
                        exchange: m.exchange.clone(),
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
        let t = ts.as_secs_f64();
        let proc_ = self.process(&m.conn);
        let redelivered = matches!(
            m.kind,
            AmqpKind::Deliver { redelivered: true } | AmqpKind::GetOk { redelivered: true }
        );
        let is_call = r.rpc_type == RpcType::Call;
        let key = if is_call {
            r.msg_id.clone()
        } else {
            r.unique_id.clone()
        };
        let Some(key) = key else {
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
                if c.ev.t_publish.is_none() {
                    c.ev.t_publish = Some(t);
                    c.ev.caller = Some(proc_);
                } else {
                    health.anomaly("oslo", "duplicate_publish");
                }
            } else {
                Self::delivered(c, t, (proc_, &m.conn, &m.queue), redelivered, out);
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
        let (topic, server) = match r.rpc_type {
            RpcType::Fanout => (self.names.get(m.exchange.trim_end_matches("_fanout")), None),
            _ => {
                let (t, s) = oslo::split_routing_key(&m.routing_key);
                (self.names.get(t), s.map(str::to_owned))
            }
        };
        let timeout_s = if is_call {
            m.expiration
                .as_deref()
                .and_then(|e| e.trim().parse::<u64>().ok())
                .map(|ms| ms as f64 / 1000.0)
        } else {
            None
        };
        // delivered, never seen published, though the broker would have dropped it had it
        // waited longer than its timeout: it was published in the capture, elsewhere
        if !published
            && let (Some(first), Some(e)) = (self.view.first(), timeout_s)
            && ts.secs_since(first) > e + 1.0
        {
            self.view.evidence("delivery_without_publish", ts);
        }
        let mut call = Call {
            ev: RpcEvent {
                rpc_type: r.rpc_type,
                exchange: self.names.get(&m.exchange),
                routing_key: m.routing_key.clone(),
                topic,
                server,
                method: self.names.get(&r.method),
                namespace: r.namespace.clone(),
                version: r.version.clone(),
                msg_id: r.msg_id.clone(),
                unique_id: r.unique_id.clone(),
                reply_q: r.reply_q.clone(),
                timeout_s,
                caller: None,
                callee: None,
                request_id: r.request_id.clone(),
                global_request_id: r.global_request_id.clone(),
                trace_context: r.trace_context,
                t_publish: None,
                t_deliver: None,
                t_reply_publish: None,
                t_reply_deliver: None,
                outcome: Outcome::NoReply,
                error: None,
                deliveries: 0,
                redeliveries: 0,
                heartbeats: 0,
                returns: 0,
                copies: Vec::new(),
            },
            consumers: Vec::new(),
            first_seen: ts,
            expired: false,
            unjudged: false,
            legacy_failure: None,
        };
        out.push(Signal::Seen {
            exchange: call.ev.exchange.clone(),
            topic: call.ev.topic.clone(),
            method: call.ev.method.clone(),
            rpc_type: call.ev.rpc_type,
        });
        if published {
            call.ev.t_publish = Some(t);
            call.ev.caller = Some(proc_);
        } else {
            Self::delivered(&mut call, t, (proc_, &m.conn, &m.queue), redelivered, out);
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
            self.timers
                .push(Reverse((deadline, Timer::Deadline, key.clone())));
            out.push(Signal::InFlight {
                topic: call.ev.topic.clone(),
                delta: 1,
            });
            self.call_order.push_back(key.clone());
            self.calls.insert(key, call);
        } else {
            if self.casts.len() >= self.cfg.max_pending_messages {
                self.evict_cast(health, out);
            }
            self.timers.push(Reverse((
                ts.plus_secs(self.cfg.cast_settle_s),
                Timer::Settle,
                key.clone(),
            )));
            self.cast_order.push_back(key.clone());
            self.casts.insert(key, call);
        }
    }

    /// One copy reached a consumer. Each consumer that got the message counts once: a
    /// redelivery (the broker gave a copy nobody acked to another consumer, e.g. a quorum
    /// queue after its consumer died) moves it there, and a second copy to the same
    /// consumer (a stream consumer re-reading after it re-attached) is only counted as
    /// redelivered. A call's delivery is the one to the server that got it last.
    fn delivered(
        c: &mut Call,
        t: f64,
        (consumer, conn, queue): (Arc<Process>, &ConnId, &Option<String>),
        redelivered: bool,
        out: &mut Vec<Signal>,
    ) {
        let who = consumer_key(&consumer, conn);
        let again = c.consumers.contains(&who);
        let moved = redelivered && !again && !c.consumers.is_empty();
        if !again && c.consumers.len() < MAX_CONSUMERS_KEPT {
            c.consumers.push(who);
        }
        if again || moved {
            c.ev.redeliveries += 1;
            if moved && c.ev.rpc_type == RpcType::Call {
                c.ev.t_deliver = Some(t);
                c.ev.callee = Some(consumer);
            }
            out.push(Signal::Redelivered {
                topic: c.ev.topic.clone(),
                method: c.ev.method.clone(),
            });
            return;
        }
        c.ev.deliveries += 1;
        // a call has one server (its callee); a cast or fanout, one consumer per copy
        if c.ev.rpc_type != RpcType::Call && c.ev.copies.len() < MAX_CONSUMERS_KEPT {
            c.ev.copies.push(Delivery {
                queue: queue.clone(),
                consumer: consumer.clone(),
                connection: conn.client,
                t,
            });
        }
        if c.ev.t_deliver.is_none() {
            c.ev.t_deliver = Some(t);
            c.ev.callee = Some(consumer);
        }
        out.push(Signal::Delivered {
            exchange: c.ev.exchange.clone(),
            topic: c.ev.topic.clone(),
            method: c.ev.method.clone(),
            rpc_type: c.ev.rpc_type,
            redelivered,
        });
    }

    fn finish_call(&mut self, id: &str, outcome: Outcome, out: &mut Vec<Signal>) {
        let Some(mut call) = self.calls.remove(id) else {
            return;
        };
        if !call.expired {
            out.push(Signal::InFlight {
                topic: call.ev.topic.clone(),
                delta: -1,
            });
        }
        self.done_calls.insert(id.to_owned());
        call.ev.outcome = outcome;
        out.push(Signal::Event(Event::Rpc(Box::new(call.ev))));
    }

    fn finish_cast(&mut self, id: &str, outcome: Outcome, out: &mut Vec<Signal>) {
        let Some(mut cast) = self.casts.remove(id) else {
            return;
        };
        self.done_messages.insert(id.to_owned());
        cast.ev.outcome = outcome;
        out.push(Signal::Event(Event::Rpc(Box::new(cast.ev))));
    }

    fn evict_call(&mut self, health: &mut Health, out: &mut Vec<Signal>) {
        while let Some(id) = self.call_order.pop_front() {
            if self.calls.contains_key(&id) {
                health.evict("rpc_calls", 1);
                let c = &self.calls[&id];
                let outcome = if c.expired {
                    expired_outcome(c)
                } else {
                    Outcome::NoReply
                };
                self.finish_call(&id, outcome, out);
                return;
            }
        }
    }

    fn evict_cast(&mut self, health: &mut Health, out: &mut Vec<Signal>) {
        while let Some(id) = self.cast_order.pop_front() {
            if let Some(c) = self.casts.get(&id) {
                health.evict("rpc_messages", 1);
                let outcome = self.cast_outcome(c, self.now);
                self.finish_cast(&id, outcome, out);
                return;
            }
        }
    }

    /// End of input: everything still open is reported, oldest first.
    pub fn finish_all(&mut self, health: &mut Health, out: &mut Vec<Signal>) {
        self.decide(true, health, out);
        let mut calls: Vec<(Ts, String)> = self
            .calls
            .iter()
            .map(|(k, c)| (c.first_seen, k.clone()))
            .collect();
        calls.sort();
        for (_, id) in calls {
            let c = &self.calls[&id];
            let outcome = if c.expired {
                expired_outcome(c)
            } else {
                Outcome::NoReply
            };
            self.finish_call(&id, outcome, out);
        }
        let mut casts: Vec<(Ts, String)> = self
            .casts
            .iter()
            .map(|(k, c)| (c.first_seen, k.clone()))
            .collect();
        casts.sort();
        for (_, id) in casts {
            let outcome = self.cast_outcome(&self.casts[&id], self.now);
            self.finish_cast(&id, outcome, out);
        }
        self.timers.clear();
        self.call_order.clear();
        self.cast_order.clear();
    }

    /// A cast or fanout whose time to be delivered is up: delivered, or (no copy seen)
    /// undelivered, unless the view is partial and its consumers may be elsewhere.
    fn cast_outcome(&self, c: &Call, now: Ts) -> Outcome {
        if c.ev.deliveries > 0 {
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
fn answered(ev: &RpcEvent) -> Outcome {
    if ev.error.is_some() {
        Outcome::RemoteError
    } else {
        Outcome::Ok
    }
}

/// A call past its deadline with no answer seen: timed out, or unknown where the view
/// could not tell.
fn expired_outcome(c: &Call) -> Outcome {
    if c.unjudged {
        Outcome::Unknown
    } else {
        Outcome::Timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Endpoint, Observation};

    fn body(inner: serde_json::Value) -> Arc<Result<Oslo, crate::contract::NotOslo>> {
        let b = serde_json::to_vec(
            &serde_json::json!({"oslo.version": "2.0", "oslo.message": inner.to_string()}),
        )
        .unwrap();
        Arc::new(oslo::decode("", &Default::default(), &b))
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
            Wire {
                c: Correlator::new(CorrelatorConfig::default(), Default::default()),
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
                routing_key: String::new(),
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
