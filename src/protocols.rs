//! Which parser a connection gets: AMQP by port (the broker's), HTTP by port (the
//! OpenStack API ports) or, on any other port, by its first bytes (a request line from
//! the client or a status line from the server).

use crate::amqp::conn::{AmqpOut, ConnLimits};
use crate::amqp::{AmqpConnection, AmqpEvent, BodyBudget, Message, MessageKind};
use crate::contract::{AmqpKind, AmqpMessage, NotOslo, Obs, Observation, Oslo};
use crate::decode::Endpoint;
use crate::health::Health;
use crate::http::head::{looks_like_request, looks_like_response};
use crate::http::{Exchange, HttpConfig, HttpConnection};
use crate::oslo::DecodeCache;
use crate::tcp::flows::{App, Dir, NewFlow};
use crate::tcp::stream::Chunk;
use crate::time::Ts;
use std::sync::Arc;

/// What the parsers of all connections found, per protocol.
pub struct Found {
    pub amqp: Vec<AmqpFound>,
    pub http: Vec<Exchange>,
    /// Where a message's body is read, as it comes (its bytes are only lent); shared by
    /// every shard of a run.
    pub bodies: Arc<DecodeCache>,
}

impl Found {
    pub fn new(bodies: Arc<DecodeCache>) -> Found {
        Found {
            amqp: Vec::new(),
            http: Vec::new(),
            bodies,
        }
    }

    fn amqp_side(&mut self) -> AmqpSide<'_> {
        AmqpSide {
            found: &mut self.amqp,
            bodies: &self.bodies,
        }
    }
}

/// An AMQP connection's event; a whole message with its body already read, as the
/// observation it is (made where the message is handed over: moving the parser's whole
/// message on to be made one later cost a box and a copy per message).
pub enum AmqpFound {
    Event(AmqpEvent),
    Message(Observation),
}

/// The AMQP half of `Found`: each message's body read while it is lent.
struct AmqpSide<'a> {
    found: &'a mut Vec<AmqpFound>,
    bodies: &'a DecodeCache,
}

impl AmqpOut for AmqpSide<'_> {
    fn event(&mut self, ev: AmqpEvent) {
        self.found.push(AmqpFound::Event(ev));
    }

    fn message(&mut self, m: Message, lent: Option<&[u8]>) {
        let oslo = self
            .bodies
            .decode(&m.exchange, &m.props, lent.unwrap_or(&m.body));
        // read: the bytes are of no more use (freed here, on the thread that made them)
        self.found
            .push(AmqpFound::Message(message_observation(m, oslo)));
    }
}

/// A whole message, its body read, as an observation.
pub fn message_observation(m: Message, oslo: Arc<Result<Oslo, NotOslo>>) -> Observation {
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
    Observation {
        t: m.ts,
        what: Obs::AmqpMessage(Box::new(msg)),
    }
}

// AMQP connections are the common and hot case: kept inline (no pointer chase per
// segment); the rarer HTTP parser is boxed
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Amqp(AmqpConnection),
    Http(Box<HttpConnection>),
    /// A handshake on a port we don't know: the first payload decides.
    Undecided {
        id: u64,
        client: Endpoint,
        server: Endpoint,
        http: HttpConfig,
    },
    /// Not a protocol we read.
    Opaque,
}

/// The settings `choose` needs.
pub struct Choice<'a> {
    pub amqp_ports: &'a [u16],
    pub amqp: ConnLimits,
    pub amqp_budget: &'a BodyBudget,
    pub http_ports: &'a dyn Fn(u16) -> bool,
    pub sniff_other_ports: bool,
    pub http: &'a HttpConfig,
}

/// Picks the parser for a new connection and says which side is the client (None: a
/// connection we don't follow).
pub fn choose(f: NewFlow<'_>, c: &Choice<'_>) -> Option<(Conn, Endpoint, Endpoint)> {
    let by_port = |is: &dyn Fn(u16) -> bool| {
        if is(f.server.port) {
            Some((f.client, f.server))
        } else if is(f.client.port) {
            Some((f.server, f.client))
        } else {
            None
        }
    };
    if let Some((client, server)) = by_port(&|p| c.amqp_ports.contains(&p)) {
        let a = AmqpConnection::new((client, server), f.saw_syn, c.amqp, c.amqp_budget.clone());
        return Some((Conn::Amqp(a), client, server));
    }
    let http = |client, server| {
        let h = HttpConnection::new(f.id, client, server, !f.saw_syn, c.http.clone());
        Some((Conn::Http(Box::new(h)), client, server))
    };
    if let Some((client, server)) = by_port(c.http_ports) {
        return http(client, server);
    }
    if !c.sniff_other_ports {
        return None;
    }
    if f.payload.is_empty() {
        // a handshake: follow the connection until its first bytes say what it is
        return f.saw_syn.then(|| {
            let u = Conn::Undecided {
                id: f.id,
                client: f.client,
                server: f.server,
                http: c.http.clone(),
            };
            (u, f.client, f.server)
        });
    }
    // joined mid-stream: the sender of a request line is the client
    let (sender, receiver) = if f.from_client {
        (f.client, f.server)
    } else {
        (f.server, f.client)
    };
    if looks_like_request(f.payload) == Some(true) {
        http(sender, receiver)
    } else if looks_like_response(f.payload) == Some(true) {
        http(receiver, sender)
    } else {
        None
    }
}

impl App for Conn {
    type Out = Found;

    fn on_chunk(&mut self, dir: Dir, ts: Ts, chunk: Chunk<'_>, h: &mut Health, out: &mut Found) {
        match self {
            Conn::Amqp(a) => a.chunk(dir, ts, chunk, h, &mut out.amqp_side()),
            Conn::Http(c) => c.on_chunk(dir, ts, chunk, h, &mut out.http),
            Conn::Undecided {
                id,
                client,
                server,
                http,
            } => {
                let Chunk::Data(d) = chunk else { return };
                let verdict = if dir == Dir::ToServer {
                    looks_like_request(d)
                } else {
                    looks_like_response(d)
                };
                if verdict == Some(false) {
                    *self = Conn::Opaque;
                    return;
                }
                // a request line split after a few bytes is still taken for HTTP
                let mut c = HttpConnection::new(*id, *client, *server, false, http.clone());
                c.on_chunk(dir, ts, chunk, h, &mut out.http);
                *self = Conn::Http(Box::new(c));
            }
            Conn::Opaque => {}
        }
    }

    fn on_close(&mut self, ts: Ts, h: &mut Health, out: &mut Found) {
        match self {
            Conn::Amqp(a) => a.close(ts, h, &mut out.amqp_side()),
            Conn::Http(c) => c.on_close(ts, h, &mut out.http),
            Conn::Undecided { .. } | Conn::Opaque => {}
        }
    }
}
