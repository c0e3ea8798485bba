//! The flow table: one entry per TCP connection, two reassembled directions each, handed
//! to the protocol parser (the "app") the pipeline chose for the connection.

use super::stream::{Chunk, Stream, StreamConfig};
use crate::FastMap as HashMap;
use crate::decode::{Endpoint, TcpSegment};
use crate::health::Health;
use crate::time::Ts;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Client → server (the side that connected → the listening side).
    ToServer = 0,
    ToClient = 1,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::ToServer, Dir::ToClient];
}

/// Canonical (direction-free) connection key.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    lo: Endpoint,
    hi: Endpoint,
}

/// The key as one write: every packet looks its connection up, and a derived hash wrote
/// each end's address kind, length, bytes and port one by one.
impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from(self.lo.word()) << 64 | u128::from(self.hi.word()));
    }
}

impl FlowKey {
    pub fn new(a: Endpoint, b: Endpoint) -> FlowKey {
        if a <= b {
            FlowKey { lo: a, hi: b }
        } else {
            FlowKey { lo: b, hi: a }
        }
    }
}

/// A protocol parser attached to one connection.
pub trait App {
    /// Where the parser puts what it found (e.g. a Vec of events).
    type Out;
    fn on_chunk(
        &mut self,
        dir: Dir,
        ts: Ts,
        chunk: Chunk<'_>,
        health: &mut Health,
        out: &mut Self::Out,
    );
    fn on_close(&mut self, ts: Ts, health: &mut Health, out: &mut Self::Out);
}

/// `[tcp]`: the flow table and reassembly.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    /// Connections followed at once; the least recently seen is closed past this.
    pub max_flows: usize,
    /// A connection with no packet for this long (packet time) is closed.
    pub idle_timeout_s: f64,
    /// Out-of-order bytes buffered per direction before the hole is given up as a gap.
    pub max_reorder_bytes: usize,
    /// Out-of-order segments buffered per direction.
    pub max_reorder_segments: usize,
    /// How long (packet time) a hole may stay open while data waits behind it.
    pub hole_timeout_s: f64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            max_flows: 65_536,
            idle_timeout_s: 600.0,
            max_reorder_bytes: 1 << 20,
            max_reorder_segments: 2048,
            hole_timeout_s: 2.0,
        }
    }
}

impl FlowConfig {
    /// What each direction's reassembly is held to.
    pub fn stream(&self) -> StreamConfig {
        StreamConfig {
            max_buffered_bytes: self.max_reorder_bytes,
            max_buffered_segments: self.max_reorder_segments,
            hole_timeout_ns: crate::time::secs_to_ns(self.hole_timeout_s),
        }
    }
}

pub struct Flow<A> {
    pub id: u64,
    pub client: Endpoint,
    pub server: Endpoint,
    streams: [Stream; 2],
    pub app: A,
    last_seen: Ts,
}

/// What `make` sees of a connection the table has not seen before.
pub struct NewFlow<'a> {
    pub id: u64,
    /// Best guess from the SYN flags; `make` may swap it (e.g. by well-known port).
    pub client: Endpoint,
    pub server: Endpoint,
    /// True when the connection's handshake was seen (a SYN).
    pub saw_syn: bool,
    /// The segment's payload and whether it was sent by `client` (for content sniffing).
    pub payload: &'a [u8],
    pub from_client: bool,
}

/// Set in a sweep key: the hole-timeout pass, after every close.
pub const HOLES: u64 = 1 << 63;

pub struct FlowTable<A> {
    cfg: FlowConfig,
    stream: StreamConfig,
    flows: HashMap<FlowKey, Flow<A>>,
    next_id: u64,
}

impl<A: App> FlowTable<A> {
    pub fn new(cfg: FlowConfig) -> Self {
        FlowTable {
            stream: cfg.stream(),
            cfg,
            flows: HashMap::default(),
            next_id: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The id the next new connection gets (ids only grow; a caller sharding flows over
    /// several tables numbers them from one counter, e.g. the packet's sequence number).
    pub fn name_next(&mut self, id: u64) {
        self.next_id = self.next_id.max(id);
    }

    /// Feeds one segment. `make` builds the app for a connection not seen before and says
    /// which endpoint is the client, or None: not a connection we parse.
    pub fn segment(
        &mut self,
        seg: &TcpSegment<'_>,
        ts: Ts,
        health: &mut Health,
        out: &mut A::Out,
        make: impl FnOnce(NewFlow<'_>) -> Option<(A, Endpoint, Endpoint)>,
    ) {
        let key = FlowKey::new(seg.src, seg.dst);
        // one lookup for a known connection (every packet but a connection's first): the
        // key's hash is a good part of a packet's cost here
        let closed = match self.flows.get_mut(&key) {
            Some(flow) => feed(flow, &self.stream, seg, ts, health, out),
            None => {
                if !self.open(key, seg, ts, health, out, make) {
                    return;
                }
                let flow = self.flows.get_mut(&key).expect("just opened");
                feed(flow, &self.stream, seg, ts, health, out)
            }
        };
        if closed {
            let mut flow = self.flows.remove(&key).expect("present");
            Self::close_flow(&mut flow, ts, health, out);
        }
    }

    /// Adds the connection `seg` is the first packet seen of, if it teaches anything and
    /// `make` takes it: true if it did.
    fn open(
        &mut self,
        key: FlowKey,
        seg: &TcpSegment<'_>,
        ts: Ts,
        health: &mut Health,
        out: &mut A::Out,
        make: impl FnOnce(NewFlow<'_>) -> Option<(A, Endpoint, Endpoint)>,
    ) -> bool {
        if seg.flags.rst || (seg.payload.is_empty() && !seg.flags.syn) {
            return false; // a bare ACK or RST of a connection we don't know teaches nothing
        }
        // SYN alone comes from the client, SYN+ACK from the server
        let (client, server) = if seg.flags.syn && seg.flags.ack {
            (seg.dst, seg.src)
        } else {
            (seg.src, seg.dst)
        };
        let id = self.next_id;
        let Some((app, client, server)) = make(NewFlow {
            id,
            client,
            server,
            saw_syn: seg.flags.syn,
            payload: seg.payload,
            from_client: seg.src == client,
        }) else {
            return false;
        };
        self.next_id += 1;
        if self.flows.len() >= self.cfg.max_flows {
            self.evict_oldest(health, out);
        }
        self.flows.insert(
            key,
            Flow {
                id,
                client,
                server,
                streams: Default::default(),
                app,
                last_seen: ts,
            },
        );
        true
    }

    /// End of input: every connection is flushed and closed, oldest first. `each` is
    /// called after each connection with its id (see `sweep`).
    pub fn close_all(
        &mut self,
        ts: Ts,
        health: &mut Health,
        out: &mut A::Out,
        each: &mut dyn FnMut(u64, &mut A::Out),
    ) {
        let mut flows: Vec<Flow<A>> = self.flows.drain().map(|(_, f)| f).collect();
        flows.sort_by_key(|f| f.id);
        for mut f in flows {
            Self::close_flow(&mut f, ts, health, out);
            each(f.id, out);
        }
    }

    fn close_flow(flow: &mut Flow<A>, ts: Ts, health: &mut Health, out: &mut A::Out) {
        let Flow { streams, app, .. } = flow;
        for d in Dir::BOTH {
            streams[d as usize].flush(health, &mut |c, h| app.on_chunk(d, ts, c, h, out));
        }
        app.on_close(ts, health, out);
    }

    /// The clock reached `now` (the caller decides how often: see `probe::Clock`): idle
    /// connections close, then holes that timed out in quiet connections are given up.
    /// `each` is called after each connection touched, with a key that orders the whole
    /// sweep: closes first, then holes, each by connection id. Tables that shard one
    /// probe's flows sweep at the same points, and their outputs merged by that key are
    /// what one table would have produced.
    pub fn sweep(
        &mut self,
        now: Ts,
        health: &mut Health,
        out: &mut A::Out,
        each: &mut dyn FnMut(u64, &mut A::Out),
    ) {
        let idle = crate::time::secs_to_ns(self.cfg.idle_timeout_s);
        let mut expired: Vec<(u64, FlowKey)> = self
            .flows
            .iter()
            .filter(|(_, f)| now.0.saturating_sub(f.last_seen.0) > idle)
            .map(|(k, f)| (f.id, *k))
            .collect();
        expired.sort();
        for (_, k) in expired {
            let mut f = self.flows.remove(&k).expect("present");
            // not a parse problem: the idle timeout bounds the table like its size cap
            health.evict("tcp_flows_idle", 1);
            Self::close_flow(&mut f, now, health, out);
            each(f.id, out);
        }
        // holes that timed out in connections that went quiet
        let mut waiting: Vec<(u64, FlowKey)> = self
            .flows
            .iter()
            .filter(|(_, f)| f.streams.iter().any(|s| s.buffered() > 0))
            .map(|(k, f)| (f.id, *k))
            .collect();
        waiting.sort();
        for (id, k) in waiting {
            let Flow { streams, app, .. } = self.flows.get_mut(&k).expect("present");
            for d in Dir::BOTH {
                streams[d as usize].on_clock(&self.stream, health, now, &mut |c, h| {
                    app.on_chunk(d, now, c, h, out)
                });
            }
            each(HOLES | id, out);
        }
    }

    fn evict_oldest(&mut self, health: &mut Health, out: &mut A::Out) {
        // the oldest sixteenth at once, so that a full table is not rescanned per packet
        let n = (self.flows.len() / 16).max(1);
        let mut by_age: Vec<(Ts, u64, FlowKey)> = self
            .flows
            .iter()
            .map(|(k, f)| (f.last_seen, f.id, *k))
            .collect();
        by_age.sort();
        for (_, _, k) in by_age.into_iter().take(n) {
            if let Some(mut f) = self.flows.remove(&k) {
                let at = f.last_seen;
                Self::close_flow(&mut f, at, health, out);
            }
        }
        health.evict("tcp_flows", n as u64);
    }
}

/// One segment of a known connection into its streams and its parser; true if the
/// connection is over (a reset, or both directions closed).
fn feed<A: App>(
    flow: &mut Flow<A>,
    cfg: &StreamConfig,
    seg: &TcpSegment<'_>,
    ts: Ts,
    health: &mut Health,
    out: &mut A::Out,
) -> bool {
    flow.last_seen = ts;
    let dir = if seg.src == flow.client {
        Dir::ToServer
    } else {
        Dir::ToClient
    };
    let other = if dir == Dir::ToServer {
        Dir::ToClient
    } else {
        Dir::ToServer
    };
    let Flow { streams, app, .. } = flow;
    let [to_server, to_client] = streams;
    let (mine, theirs) = if dir == Dir::ToServer {
        (to_server, to_client)
    } else {
        (to_client, to_server)
    };
    // an ACK in this direction may prove a hole in the other one will never fill
    if seg.flags.ack {
        theirs.on_peer_ack(health, seg.ack, &mut |c, h| {
            app.on_chunk(other, ts, c, h, out)
        });
    }
    // in-order bytes go straight from the packet to the parser, without a copy
    let mut to_app = |c: Chunk<'_>, h: &mut Health| app.on_chunk(dir, ts, c, h, out);
    if !seg.payload.is_empty() || seg.flags.syn || seg.flags.fin {
        mine.push(
            cfg,
            health,
            ts,
            seg.seq,
            seg.flags.syn,
            seg.flags.fin,
            seg.payload,
            &mut to_app,
        );
    }
    mine.on_clock(cfg, health, ts, &mut to_app);
    seg.flags.rst || (flow.streams[0].closed && flow.streams[1].closed)
}
