//! One packet clock over many probes. Each probe's observations arrive in its own packet
//! order; the collector holds them per probe and releases them in time order up to the
//! watermark: the oldest packet time every live probe has passed (minus `hold_s`, so
//! the clock offsets are known before the observations they correct go out). A probe
//! silent for `silent_after_s` of wall time leaves the watermark (and is reported, never
//! waited for); one whose input ended (`probe.end`) leaves it too.
//!
//! On the way out each observation's times are corrected by its probe's offset (see
//! `skew`) and duplicates are dropped: the same thing seen by two probes (two sidecars on
//! one host, a mirrored port) counts once.

use super::skew::Skew;
use crate::FastMap as HashMap;
use crate::contract::{AmqpKind, ConnId, Obs, Observation, Oslo, ProbeStats, ReplyPart};
use crate::openstack::services::api_process;
use crate::time::Ts;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

/// `[fleet]`: how a collector joins its probes.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MergeConfig {
    /// Packet time held back behind the watermark, so that clock offsets are estimated
    /// from what is around an observation before it is released.
    pub hold_s: f64,
    /// Wall time after which a probe that sent nothing leaves the watermark.
    pub silent_after_s: f64,
    /// Two probes' identical observations this close in packet time are one.
    pub dedupe_window_s: f64,
    /// Ids remembered for clock estimation and duplicates, at most.
    pub max_tracked: usize,
    /// After the first probe is heard, how long (wall time) to wait for the others before
    /// releasing anything: a probe that joins later than what was released is late.
    pub startup_s: f64,
    /// The probes expected (by name): once all are heard, the wait ends early.
    pub expect: Vec<String>,
    /// The probe whose clock the others are set to (default: the one linked to most).
    pub reference: Option<String>,
    /// Packet time gathered before the first release, so that the first observations
    /// out are corrected by offsets from enough samples.
    pub warmup_s: f64,
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            hold_s: 1.0,
            silent_after_s: 15.0,
            dedupe_window_s: 2.0,
            max_tracked: 200_000,
            startup_s: 3.0,
            expect: Vec::new(),
            reference: None,
            warmup_s: 10.0,
        }
    }
}

/// What the collector knows of one probe.
#[derive(Debug)]
pub struct ProbeInfo {
    pub name: String,
    pub host: Option<String>,
    /// The newest packet time it reported (its own clock).
    pub last_t: Ts,
    /// When it last sent anything (wall time).
    pub last_seen: Instant,
    pub last_seen_unix: f64,
    /// Its input ended (a replay done, a capture stopped).
    pub ended: bool,
    /// Silent for longer than `silent_after_s`: out of the watermark.
    pub silent: bool,
    pub stats: ProbeStats,
    pub observations: u64,
    pub duplicates: u64,
    /// Observations older than what the collector had already released when they came
    /// (the probe joined late or lagged): analysed all the same, out of order.
    pub late: u64,
    /// Its clock minus the reference probe's (ns), as estimated.
    pub offset_ns: i64,
    queue: VecDeque<Observation>,
}

pub struct Merge {
    cfg: MergeConfig,
    /// When the first probe was heard (the startup wait runs from there).
    started: Option<Instant>,
    /// The first packet time any probe reported (the warm-up runs from there).
    first_t: Option<Ts>,
    /// The packet time released so far: what was handed out, or the time the analyser was
    /// moved on to, whichever is later. An observation older than this comes too late to
    /// be judged in order.
    released: Ts,
    probes: Vec<ProbeInfo>,
    index: HashMap<String, usize>,
    skew: Skew,
    causes: Causes,
    dedupe: Dedupe,
}

impl Merge {
    pub fn new(cfg: MergeConfig) -> Merge {
        Merge {
            causes: Causes::new(cfg.max_tracked),
            dedupe: Dedupe::new(cfg.max_tracked),
            cfg,
            started: None,
            first_t: None,
            released: Ts::ZERO,
            probes: Vec::new(),
            index: HashMap::default(),
            skew: Skew::default(),
        }
    }

    pub fn probes(&self) -> &[ProbeInfo] {
        &self.probes
    }

    fn probe(&mut self, name: &str, host: Option<&str>, now: Instant) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        self.probes.push(ProbeInfo {
            name: name.to_string(),
            host: host.map(str::to_string),
            last_t: Ts::ZERO,
            last_seen: now,
            last_seen_unix: unix_now(),
            ended: false,
            silent: false,
            stats: ProbeStats::default(),
            observations: 0,
            duplicates: 0,
            late: 0,
            offset_ns: 0,
            queue: VecDeque::new(),
        });
        self.index.insert(name.to_string(), self.probes.len() - 1);
        self.probes.len() - 1
    }

    /// A batch from probe `name`, in its packet order.
    pub fn ingest(&mut self, name: &str, host: Option<&str>, obs: Vec<Observation>, now: Instant) {
        self.started.get_or_insert(now);
        let p = self.probe(name, host, now);
        {
            let info = &mut self.probes[p];
            info.last_seen = now;
            info.last_seen_unix = unix_now();
            info.silent = false;
        }
        for o in obs {
            if o.t > Ts::ZERO {
                self.first_t = Some(self.first_t.map_or(o.t, |f| f.min(o.t)));
            }
            let info = &mut self.probes[p];
            info.last_t = info.last_t.max(o.t);
            match o.what {
                Obs::Tick => continue,
                Obs::End => {
                    info.ended = true;
                    continue;
                }
                Obs::ProbeStats(s) => {
                    info.stats = s;
                    continue;
                }
                _ => {}
            }
            info.observations += 1;
            if o.t < self.released {
                info.late += 1;
            }
            self.causes.learn(p, &o, &mut self.skew);
            self.probes[p].queue.push_back(o);
        }
    }

    /// Releases, in corrected time order, what every live probe has passed; returns the
    /// packet time the analyser may advance to (None: no probe has said anything yet).
    pub fn release(&mut self, now: Instant, out: &mut Vec<Observation>) -> Option<Ts> {
        if !self.started_up(now) {
            return None;
        }
        let silent_after = Duration::from_secs_f64(self.cfg.silent_after_s.max(0.0));
        for info in &mut self.probes {
            if !info.ended && !info.silent && now.duration_since(info.last_seen) > silent_after {
                info.silent = true;
                tracing::warn!(
                    "probe {} silent for {:.0}s: no longer waited for",
                    info.name,
                    self.cfg.silent_after_s
                );
            }
        }
        self.update_offsets();
        let live = self.probes.iter().filter(|i| !i.ended && !i.silent);
        let watermark = match live.map(|i| corrected(i.last_t, i.offset_ns)).min() {
            // still warming up: nothing goes before the offsets rest on enough samples
            Some(w)
                if self.released == Ts::ZERO
                    && self
                        .first_t
                        .is_some_and(|f| w.secs_since(f) < self.cfg.warmup_s) =>
            {
                return None;
            }
            Some(w) => w.0.saturating_sub((self.cfg.hold_s.max(0.0) * 1e9) as u64),
            // nobody left to wait for: everything can go
            None => u64::MAX,
        };
        self.release_until(Ts(watermark), out);
        let reached = self
            .probes
            .iter()
            .map(|i| corrected(i.last_t, i.offset_ns))
            .max()?;
        let advanced = Ts(watermark).min(reached);
        self.released = self.released.max(advanced);
        Some(advanced)
    }

    /// Every expected probe was heard, or the startup wait is over.
    fn started_up(&self, now: Instant) -> bool {
        let Some(started) = self.started else {
            return false;
        };
        let all_expected = !self.cfg.expect.is_empty()
            && self.cfg.expect.iter().all(|n| self.index.contains_key(n));
        all_expected || now.duration_since(started).as_secs_f64() >= self.cfg.startup_s
    }

    /// Releases everything held (the collector is stopping).
    pub fn drain(&mut self, out: &mut Vec<Observation>) -> Option<Ts> {
        self.update_offsets();
        self.release_until(Ts(u64::MAX), out);
        self.probes
            .iter()
            .map(|i| corrected(i.last_t, i.offset_ns))
            .max()
    }

    fn update_offsets(&mut self) {
        let reference = self
            .cfg
            .reference
            .as_ref()
            .and_then(|r| self.index.get(r))
            .copied();
        let offsets = self.skew.offsets(self.probes.len(), reference);
        for (info, o) in self.probes.iter_mut().zip(offsets) {
            info.offset_ns = o;
        }
    }

    fn release_until(&mut self, until: Ts, out: &mut Vec<Observation>) {
        loop {
            let next = self
                .probes
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((corrected(p.queue.front()?.t, p.offset_ns), i)))
                .min();
            let Some((t, p)) = next.filter(|(t, _)| *t <= until) else {
                break;
            };
            let mut o = self.probes[p].queue.pop_front().expect("peeked");
            shift(&mut o, self.probes[p].offset_ns);
            o.t = t;
            self.released = self.released.max(t);
            if self.dedupe.duplicate(p, &o, self.cfg.dedupe_window_s) {
                self.probes[p].duplicates += 1;
                continue;
            }
            out.push(o);
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn corrected(t: Ts, offset_ns: i64) -> Ts {
    Ts((t.0 as i64).saturating_sub(offset_ns).max(0) as u64)
}

/// Corrects the times inside an observation (a REST exchange's own).
fn shift(o: &mut Observation, offset_ns: i64) {
    if let Obs::Http(h) = &mut o.what {
        h.t_request = corrected(h.t_request, offset_ns);
        h.t_response = h.t_response.map(|t| corrected(t, offset_ns));
        h.t_response_end = h.t_response_end.map(|t| corrected(t, offset_ns));
    }
}

/// A bounded map that forgets its oldest keys first.
struct Recent<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Recent {
            map: HashMap::default(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }
    /// Inserts or replaces (a replaced key keeps its place in line).
    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }
}

/// Events whose order the wire fixes, remembered by id until the other side of the order
/// shows up on another probe (probes' batches arrive in any order, so either side may
/// come first): each such pair is a sample for `Skew`.
struct Causes {
    /// Orders by (what, id): the earlier event's sightings, and the later one's.
    sides: Recent<(Pair, String), Sides>,
    /// The process at the client end of an AMQP connection (from its connection_name).
    processes: Recent<ConnId, String>,
}

/// The orders the wire fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pair {
    /// A request's publish, then its deliveries (by `_unique_id`).
    Request,
    /// A call's delivery, then its reply's publish (by `_msg_id`).
    Served,
    /// A final reply's publish, then its delivery (by `_msg_id`).
    Reply,
    /// A REST request to an API, then the RPCs its process published while answering
    /// (by the request id it returned) — and those RPCs, then the response's end.
    Rest,
}

/// The two sides of one order, as far as seen: (probe, time) of the earlier events and of
/// the later ones (a few of each: a fanout has many deliveries).
#[derive(Default)]
struct Sides {
    before: Vec<(usize, Ts)>,
    after: Vec<(usize, Ts)>,
}

const SIDES_KEPT: usize = 8;

impl Causes {
    fn new(cap: usize) -> Causes {
        Causes {
            sides: Recent::new(cap),
            processes: Recent::new(cap / 10),
        }
    }

    /// One side of an order; every sighting of the other side so far makes a sample.
    fn side(&mut self, pair: Pair, id: &str, earlier: bool, at: (usize, Ts), skew: &mut Skew) {
        let key = (pair, id.to_string());
        let mut sides = self.sides.map.remove(&key).unwrap_or_default();
        let (mine, theirs) = if earlier {
            (&mut sides.before, &sides.after)
        } else {
            (&mut sides.after, &sides.before)
        };
        for &other in theirs {
            if earlier {
                skew.before(at, other);
            } else {
                skew.before(other, at);
            }
        }
        if mine.len() < SIDES_KEPT {
            mine.push(at);
        }
        self.sides.insert(key, sides);
    }

    fn learn(&mut self, p: usize, o: &Observation, skew: &mut Skew) {
        let at = (p, o.t);
        match &o.what {
            Obs::AmqpIdentified {
                conn,
                connection_name: Some(name),
                ..
            } => {
                if let Some(s) = crate::oslo::parse_connection_name(name).0 {
                    self.processes.insert(*conn, s);
                }
            }
            Obs::AmqpMessage(m) => {
                let publish = matches!(m.kind, AmqpKind::Publish { .. });
                match m.oslo.as_ref() {
                    Ok(Oslo::Request(r)) => {
                        if let Some(u) = &r.unique_id {
                            self.side(Pair::Request, u, publish, at, skew);
                        }
                        if let (false, Some(id)) = (publish, &r.msg_id) {
                            self.side(Pair::Served, id, true, at, skew);
                        }
                        // an RPC an API's process published while answering a request
                        if let (true, Some(rid)) = (publish, &r.request_id)
                            && let Some(process) = self.processes.get(&m.conn)
                        {
                            let id = format!("{rid} {process}");
                            self.side(Pair::Rest, &id, false, at, skew);
                        }
                    }
                    Ok(Oslo::Reply(r)) if r.part == ReplyPart::Final => {
                        if publish {
                            self.side(Pair::Served, &r.msg_id, false, at, skew);
                        }
                        self.side(Pair::Reply, &r.msg_id, publish, at, skew);
                    }
                    _ => {}
                }
            }
            Obs::Http(h) => {
                if let (Some(rid), Some(service), Some(end)) =
                    (&h.request_id, &h.service, h.t_response_end)
                {
                    let id = format!("{rid} {}", api_process(service));
                    // began before the RPCs; ended after them (a second, mirrored order)
                    self.side(Pair::Rest, &id, true, (p, h.t_request), skew);
                    let back = format!("{id} end");
                    self.side(Pair::Rest, &back, false, (p, end), skew);
                }
                return;
            }
            _ => return,
        }
        // the RPC side of a REST request's end: the RPCs came first
        if let Obs::AmqpMessage(m) = &o.what
            && let (AmqpKind::Publish { .. }, Ok(Oslo::Request(r))) = (m.kind, m.oslo.as_ref())
            && let Some(rid) = &r.request_id
            && let Some(process) = self.processes.get(&m.conn)
        {
            let back = format!("{rid} {process} end");
            self.side(Pair::Rest, &back, true, at, skew);
        }
    }
}

/// Observations released recently, by fingerprint: the same one from another probe
/// within the window is a duplicate.
struct Dedupe {
    seen: Recent<u64, (usize, Ts)>,
    seed: ahash::RandomState,
}

impl Dedupe {
    fn new(cap: usize) -> Dedupe {
        Dedupe {
            seen: Recent::new(cap),
            seed: ahash::RandomState::with_seeds(7, 11, 13, 17),
        }
    }

    fn duplicate(&mut self, p: usize, o: &Observation, window_s: f64) -> bool {
        let Some(fp) = self.fingerprint(&o.what) else {
            return false;
        };
        if let Some(&(q, tq)) = self.seen.get(&fp)
            && q != p
            && o.t.secs_since(tq).abs() <= window_s
        {
            return true;
        }
        self.seen.insert(fp, (p, o.t));
        false
    }

    /// What the observation says, without its time.
    fn fingerprint(&self, what: &Obs) -> Option<u64> {
        let mut h = self.seed.build_hasher();
        match what {
            Obs::AmqpIdentified {
                conn,
                connection_name,
                ..
            } => (1u8, conn, connection_name).hash(&mut h),
            Obs::AmqpMessage(m) => {
                let ids = match m.oslo.as_ref() {
                    Ok(Oslo::Request(r)) => (r.msg_id.as_deref(), r.unique_id.as_deref()),
                    Ok(Oslo::Reply(r)) => (Some(r.msg_id.as_str()), r.unique_id.as_deref()),
                    Ok(Oslo::Notification(n)) => (n.message_id.as_deref(), n.unique_id.as_deref()),
                    Err(_) => (None, None),
                };
                let kind = match m.kind {
                    AmqpKind::Publish { .. } => 0u8,
                    AmqpKind::Deliver { redelivered } => 1 + redelivered as u8,
                    AmqpKind::GetOk { redelivered } => 3 + redelivered as u8,
                    AmqpKind::Return { .. } => 5,
                };
                (
                    2u8,
                    m.conn,
                    kind,
                    &m.exchange,
                    &m.routing_key,
                    ids,
                    m.stream_offset,
                )
                    .hash(&mut h)
            }
            Obs::AmqpClosed {
                conn,
                channel,
                reply_code,
                by_broker,
            } => (3u8, conn, channel, reply_code, by_broker).hash(&mut h),
            Obs::AmqpBlocked { conn } => (4u8, conn).hash(&mut h),
            Obs::AmqpConsumerCancelled { conn, queue } => (5u8, conn, queue).hash(&mut h),
            Obs::AmqpGone { conn } => (6u8, conn).hash(&mut h),
            Obs::Http(x) => (
                7u8,
                x.client,
                x.server,
                x.method,
                &x.path,
                x.status,
                &x.request_id,
                &x.global_request_id,
            )
                .hash(&mut h),
            Obs::Tick | Obs::ProbeStats(_) | Obs::End => return None,
        }
        Some(h.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Endpoint;

    fn at(s: f64, what: Obs) -> Observation {
        Observation {
            t: Ts((s * 1e9) as u64),
            what,
        }
    }

    fn gone(port: u16) -> Obs {
        let ep = |port| Endpoint {
            ip: [127, 0, 0, 1].into(),
            port,
        };
        Obs::AmqpGone {
            conn: ConnId {
                client: ep(port),
                server: ep(5672),
            },
        }
    }

    fn merge() -> Merge {
        Merge::new(MergeConfig {
            expect: vec!["a".into(), "b".into()],
            warmup_s: 0.0,
            ..MergeConfig::default()
        })
    }

    #[test]
    fn what_every_probe_passed_less_the_hold_goes_out_in_time_order() {
        let mut m = merge();
        let now = Instant::now();
        m.ingest("a", None, vec![at(100.0, gone(1)), at(103.0, gone(3))], now);
        m.ingest(
            "b",
            None,
            vec![at(101.0, gone(2)), at(110.0, Obs::Tick)],
            now,
        );
        let mut out = Vec::new();
        let advanced = m.release(now, &mut out);
        // a reached 103, b 110: everything before 102 goes
        assert_eq!(advanced, Some(Ts(102_000_000_000)));
        let times: Vec<_> = out.iter().map(|o| o.t.0 / 1_000_000_000).collect();
        assert_eq!(times, [100, 101]);
    }

    #[test]
    fn an_observation_older_than_the_time_the_analyser_was_moved_to_is_late() {
        let mut m = merge();
        let now = Instant::now();
        m.ingest(
            "a",
            None,
            vec![at(100.0, gone(1)), at(110.0, Obs::Tick)],
            now,
        );
        m.ingest("b", None, vec![at(110.0, Obs::Tick)], now);
        let mut out = Vec::new();
        assert_eq!(m.release(now, &mut out), Some(Ts(109_000_000_000)));
        // b had said it passed 110, then sends something from 105: released nothing
        // after 100, but the analyser already stands at 109
        m.ingest("b", None, vec![at(105.0, gone(2))], now);
        m.ingest("b", None, vec![at(109.5, gone(3))], now);
        let late: Vec<_> = m
            .probes()
            .iter()
            .map(|p| (p.name.as_str(), p.late))
            .collect();
        assert_eq!(late, [("a", 0), ("b", 1)]);
    }
}
