//! An RPC message waiting for its answer or its deliveries, kept small: a busy region has
//! hundreds of thousands in flight, and every byte here is multiplied by that. Names are
//! interned (one `Shape` per exchange, routing key and method), ids are their 16 bytes
//! when they have oslo's usual spelling, times are packet nanoseconds, and what few
//! messages need (an error, a trace context, a cast's copies) is boxed. `event` turns a
//! record back into the `RpcEvent` it stands for, exactly as a full one would have been.

use crate::contract::{Delivery, Outcome, Process, RemoteError, RpcEvent, RpcType, TraceContext};
use crate::health::Health;
use crate::time::Ts;
use std::sync::Arc;

/// What messages with the same destination and method share.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub rpc_type: RpcType,
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    pub topic: Arc<str>,
    pub server: Option<Arc<str>>,
    pub method: Arc<str>,
    pub namespace: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
enum IdKind {
    None,
    /// 32 lower-case hex digits (`_msg_id`, `_unique_id`).
    Hex,
    /// `req-` and a lower-case UUID (oslo.context's request ids).
    Req,
    /// `reply_` and 32 lower-case hex digits (oslo's reply queues).
    Reply,
    /// Any other spelling: kept whole in the record's `Rare` part.
    Other,
}

/// An id in 17 bytes when it is spelled the usual way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id {
    kind: IdKind,
    bytes: [u8; 16],
}

/// Ids are compared by their text, so only lower-case spellings are compacted (the bytes
/// give the text back in lower case).
fn hex16(s: &str) -> Option<[u8; 16]> {
    crate::contract::lower_hex_bytes(s)
}

/// 16 bytes from a hyphenated lower-case UUID (8-4-4-4-12).
fn uuid16(s: &str) -> Option<[u8; 16]> {
    crate::contract::lower_uuid_bytes(s)
}

impl Id {
    pub const NONE: Id = Id {
        kind: IdKind::None,
        bytes: [0; 16],
    };

    /// The compact form, or None when it needs its text kept (`Other`).
    pub fn of(s: &str) -> Id {
        let (kind, bytes) = if let Some(b) = hex16(s) {
            (IdKind::Hex, b)
        } else if let Some(b) = s.strip_prefix("req-").and_then(uuid16) {
            (IdKind::Req, b)
        } else if let Some(b) = s.strip_prefix("reply_").and_then(hex16) {
            (IdKind::Reply, b)
        } else {
            // the text goes to the record's rare part; the bytes only tell ids apart in a
            // map (a hash of the text)
            let h = xxhash_rust::xxh3::xxh3_128(s.as_bytes()).to_le_bytes();
            (IdKind::Other, h)
        };
        Id { kind, bytes }
    }

    pub fn of_opt(s: Option<&str>) -> Id {
        s.map_or(Id::NONE, Id::of)
    }

    fn needs_text(&self) -> bool {
        self.kind == IdKind::Other
    }

    /// The id's text (`other` holds it when it is not spelled the usual way).
    fn text(&self, other: Option<&str>) -> Option<String> {
        use crate::contract::hex_into;
        // five ids for every event: spelled into one buffer, allocated once at their size
        let b = &self.bytes;
        let mut buf = [0u8; 40];
        let len = match self.kind {
            IdKind::None => return None,
            IdKind::Other => return other.map(str::to_owned),
            IdKind::Hex => {
                hex_into(&mut buf[..32], b);
                32
            }
            IdKind::Reply => {
                buf[..6].copy_from_slice(b"reply_");
                hex_into(&mut buf[6..38], b);
                38
            }
            IdKind::Req => {
                buf[..4].copy_from_slice(b"req-");
                // 8-4-4-4-12 digits: hyphens before bytes 4, 6, 8 and 10
                let mut at = 4;
                for (i, group) in [&b[..4], &b[4..6], &b[6..8], &b[8..10], &b[10..]]
                    .into_iter()
                    .enumerate()
                {
                    if i > 0 {
                        buf[at] = b'-';
                        at += 1;
                    }
                    hex_into(&mut buf[at..at + 2 * group.len()], group);
                    at += 2 * group.len();
                }
                at
            }
        };
        crate::text::utf8(&buf[..len]).map(str::to_owned)
    }
}

/// The ids a record keeps, in the order `Rare::texts` holds the odd ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    MsgId = 0,
    UniqueId = 1,
    ReplyQ = 2,
    RequestId = 3,
    GlobalRequestId = 4,
}

/// What few records need.
#[derive(Debug, Default)]
pub struct Rare {
    pub error: Option<RemoteError>,
    /// A failure from a legacy (≤ 2.x) payload reply, completed by the empty ending reply.
    pub legacy_failure: Option<RemoteError>,
    pub trace_context: Option<TraceContext>,
    /// A cast's copies as they reached their consumers.
    pub copies: Vec<Delivery>,
    /// Consumers past the first (see `Record::consumers`).
    pub more_consumers: Vec<u64>,
    /// Ids not spelled the usual way, by `Field`.
    texts: [Option<Box<str>>; 5],
}

/// One RPC message waiting (a call for its reply, a cast for its deliveries).
#[derive(Debug)]
pub struct Record {
    pub shape: Arc<Shape>,
    ids: [Id; 5],
    pub caller: Option<Arc<Process>>,
    pub callee: Option<Arc<Process>>,
    /// Publish, delivery, reply publish, reply delivery (zero: not seen).
    times: [Ts; 4],
    pub first_seen: Ts,
    /// The caller's timeout from the AMQP expiration, in ms (`NO_TIMEOUT`: none).
    timeout_ms: u32,
    pub deliveries: u16,
    pub redeliveries: u16,
    pub heartbeats: u16,
    pub returns: u16,
    /// Its deadline passed.
    pub expired: bool,
    /// Its deadline passed while the view was partial: no timeout verdict (the reply may
    /// have gone through a node this probe does not see).
    pub unjudged: bool,
    /// The first consumer that got a copy (`consumer_key`; zero: none yet).
    first_consumer: u64,
    rare: Option<Box<Rare>>,
}

const NO_TIMEOUT: u32 = u32::MAX;

/// The four wire times of a record.
#[derive(Debug, Clone, Copy)]
pub enum When {
    Publish = 0,
    Deliver = 1,
    ReplyPublish = 2,
    ReplyDeliver = 3,
}

/// Counts saturate rather than wrap (a record's counters are u16).
fn bump(c: &mut u16) {
    *c = c.saturating_add(1);
}

impl Record {
    pub fn new(shape: Arc<Shape>, first_seen: Ts, timeout_ms: Option<u32>) -> Record {
        Record {
            shape,
            ids: [Id::NONE; 5],
            caller: None,
            callee: None,
            times: [Ts::ZERO; 4],
            first_seen,
            timeout_ms: timeout_ms.map_or(NO_TIMEOUT, |t| t.min(NO_TIMEOUT - 1)),
            deliveries: 0,
            redeliveries: 0,
            heartbeats: 0,
            returns: 0,
            expired: false,
            unjudged: false,
            first_consumer: 0,
            rare: None,
        }
    }

    pub fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    pub fn rare_ref(&self) -> Option<&Rare> {
        self.rare.as_deref()
    }

    pub fn set_id(&mut self, f: Field, s: Option<&str>) {
        self.set_parsed_id(f, Id::of_opt(s), s);
    }

    /// `set_id` with the id already read from `s` (`Id::of_opt(s)`).
    pub fn set_parsed_id(&mut self, f: Field, id: Id, s: Option<&str>) {
        debug_assert_eq!(id, Id::of_opt(s));
        self.ids[f as usize] = id;
        if id.needs_text() {
            self.rare().texts[f as usize] = s.map(Box::from);
        }
    }

    /// The compact id in `f` (what a table indexes a record by).
    pub fn key(&self, f: Field) -> Id {
        self.ids[f as usize]
    }

    pub fn id(&self, f: Field) -> Option<String> {
        let other = self
            .rare
            .as_ref()
            .and_then(|r| r.texts[f as usize].as_deref());
        self.ids[f as usize].text(other)
    }

    pub fn at(&self, w: When) -> Option<Ts> {
        let t = self.times[w as usize];
        (t != Ts::ZERO).then_some(t)
    }

    pub fn seen(&self, w: When) -> bool {
        self.times[w as usize] != Ts::ZERO
    }

    pub fn set(&mut self, w: When, t: Ts) {
        // a packet stamped at the epoch still counts as seen
        self.times[w as usize] = Ts(t.0.max(1));
    }

    pub fn timeout_s(&self) -> Option<f64> {
        (self.timeout_ms != NO_TIMEOUT).then(|| self.timeout_ms as f64 / 1000.0)
    }

    pub fn error(&self) -> Option<&RemoteError> {
        self.rare.as_ref()?.error.as_ref()
    }

    pub fn add_heartbeat(&mut self) {
        bump(&mut self.heartbeats);
    }

    pub fn add_return(&mut self) {
        bump(&mut self.returns);
    }

    pub fn add_delivery(&mut self) {
        bump(&mut self.deliveries);
    }

    pub fn add_redelivery(&mut self) {
        bump(&mut self.redeliveries);
    }

    /// Whether `who` already got a copy; remembers it if not (at most `max` consumers, a
    /// consumer past them counted as an eviction).
    pub fn consumer_seen(&mut self, who: u64, max: usize, health: &mut Health) -> (bool, bool) {
        let who = who.max(1);
        let again = self.first_consumer == who
            || self
                .rare
                .as_ref()
                .is_some_and(|r| r.more_consumers.contains(&who));
        let any = self.first_consumer != 0;
        if !again {
            if self.first_consumer == 0 {
                self.first_consumer = who;
            } else if self.rare_ref().map_or(0, |r| r.more_consumers.len()) + 1 < max {
                self.rare().more_consumers.push(who);
            } else {
                health.evict("rpc_consumers", 1);
            }
        }
        (again, any)
    }

    /// The event this record stands for, judged `outcome`.
    pub fn event(self, outcome: Outcome) -> RpcEvent {
        let secs = |w: When| self.at(w).map(Ts::as_secs_f64);
        let s = &self.shape;
        let rare = self.rare.as_deref();
        RpcEvent {
            rpc_type: s.rpc_type,
            exchange: s.exchange.clone(),
            routing_key: s.routing_key.clone(),
            topic: s.topic.clone(),
            server: s.server.clone(),
            method: s.method.clone(),
            namespace: s.namespace.clone(),
            version: s.version.clone(),
            msg_id: self.id(Field::MsgId),
            unique_id: self.id(Field::UniqueId),
            reply_q: self.id(Field::ReplyQ),
            timeout_s: self.timeout_s(),
            caller: self.caller.clone(),
            callee: self.callee.clone(),
            request_id: self.id(Field::RequestId),
            global_request_id: self.id(Field::GlobalRequestId),
            trace_context: rare.and_then(|r| r.trace_context),
            t_publish: secs(When::Publish),
            t_deliver: secs(When::Deliver),
            t_reply_publish: secs(When::ReplyPublish),
            t_reply_deliver: secs(When::ReplyDeliver),
            outcome,
            error: rare.and_then(|r| r.error.clone()),
            deliveries: self.deliveries as u32,
            redeliveries: self.redeliveries as u32,
            heartbeats: self.heartbeats as u32,
            returns: self.returns as u32,
            copies: rare.map(|r| r.copies.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_exactly_as_they_were_spelled() {
        let mut r = Record::new(
            Arc::new(Shape {
                rpc_type: RpcType::Call,
                exchange: Arc::from("nova"),
                routing_key: "compute.host1".into(),
                topic: Arc::from("compute"),
                server: Some("host1".into()),
                method: Arc::from("build"),
                namespace: None,
                version: Some("6.0".into()),
            }),
            Ts(5),
            Some(60_000),
        );
        let ids = [
            (Field::MsgId, Some("18c3aeba5d884884a9ea818660fd1abe")),
            (Field::UniqueId, Some("2CA8E518E0514CD0A3F72626D9AD5AFF")),
            (
                Field::ReplyQ,
                Some("reply_290096a378764630a92d2701b519157d"),
            ),
            (
                Field::RequestId,
                Some("req-11111111-2222-3333-4444-555555555555"),
            ),
            (Field::GlobalRequestId, Some("m1")),
        ];
        for (f, v) in ids {
            r.set_id(f, v);
        }
        r.set(When::Publish, Ts(1_500_000_000));
        let e = r.event(Outcome::Ok);
        assert_eq!(e.msg_id.as_deref(), ids[0].1);
        assert_eq!(
            e.unique_id.as_deref(),
            ids[1].1,
            "upper case is kept as text"
        );
        assert_eq!(e.reply_q.as_deref(), ids[2].1);
        assert_eq!(e.request_id.as_deref(), ids[3].1);
        assert_eq!(e.global_request_id.as_deref(), ids[4].1);
        assert_eq!(
            (e.t_publish, e.t_deliver, e.timeout_s),
            (Some(1.5), None, Some(60.0))
        );
    }

    #[test]
    fn only_the_usual_spellings_are_compacted() {
        let kind = |s: &str| Id::of(s).kind;
        assert_eq!(
            kind("req-0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
            IdKind::Req
        );
        for odd in [
            "req-0A1B2C3D-4e5f-6789-abcd-ef0123456789",
            "req-0a1b2c3d-4e5f-6789-abcd-ef012345678-",
            "req-0a1b2c3d-4e5f-6789-abcdef-0123456789",
            "req-0a1b2c3d4e5f6789abcdef0123456789",
            "0a1b2c3d4e5f6789abcdef012345678g",
            "reply_0a1b2c3d4e5f6789abcdef01234567",
        ] {
            assert_eq!(kind(odd), IdKind::Other, "{odd}");
        }
        let id = "req-0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        assert_eq!(Id::of(id).text(None).as_deref(), Some(id));
    }

    #[test]
    fn a_record_is_small() {
        assert!(
            std::mem::size_of::<Record>() <= 200,
            "{}",
            std::mem::size_of::<Record>()
        );
        assert_eq!(std::mem::size_of::<Id>(), 17);
    }
}
