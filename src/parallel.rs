//! The pipeline over several threads (`--threads N`): the probe's per-connection work
//! sharded by connection over N workers, joined in one analyser, with exactly the signals
//! one thread gives.
//!
//! ```text
//! reader (the caller's thread)   Clock: each packet's time, step numbers, sweep points
//!   ├─ chunk of steps ─→ shard 0..N   decode, TCP, AMQP/HTTP, oslo, REST (probe::Shard)
//!   └─ the chunk's step list ─────────────────────────┐
//! merger thread   per step: the packet's shard's observations, then every shard's
//!                 sweep groups merged by sweep key → the analyser → the outlet
//! ```
//!
//! Why it is identical to one thread: the reader alone decides time (`probe::Clock`), so
//! every shard processes its packets at the times and with the step numbers one probe
//! would (connection ids are step numbers); sweeps happen at the same steps in every
//! shard, and one table's sweep output is ordered by a key (`FlowTable::sweep`) that
//! merging the shards' outputs reproduces; the analyser sees the observations in one
//! probe's order and advances at the same points. Table caps are split over the shards,
//! so only a run that hits them (an eviction, counted) can differ.
//!
//! Every channel is bounded, and the reader sends a chunk to every shard before its step
//! list to the merger, so a slow analyser holds the reader back instead of growing queues.

use crate::contract::Observation;
use crate::health::Health;
use crate::probe::{self, Clock, DecodeCache, Each, Frame, Shard, Step};
use crate::run::{Run, Tap};
use crate::source::Packet;
use crate::time::Ts;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Steps per chunk: large enough that the channels cost nothing per packet.
const CHUNK_STEPS: usize = 1024;
/// Chunks in flight per channel.
const IN_FLIGHT: usize = 8;
/// Live capture: a chunk waits for more packets at most this long.
const CHUNK_WAIT: Duration = Duration::from_millis(50);

/// One shard's part of a step.
struct ShardStep {
    seq: u64,
    ts: Ts,
    clock: Ts,
    /// The packet's bytes in the chunk's `bytes`, and its link type.
    frame: Option<(i32, std::ops::Range<usize>)>,
    sweep: bool,
    end: bool,
}

#[derive(Default)]
struct ShardChunk {
    bytes: Vec<u8>,
    steps: Vec<ShardStep>,
}

/// A step as the merger sees it.
struct MergeStep {
    seq: u64,
    clock: Ts,
    /// The shard that had the packet.
    shard: Option<usize>,
    /// Every shard has a part (a sweep or the end).
    all: bool,
    /// The last step of one reader call: the analyser runs after it.
    last: bool,
}

#[derive(Default)]
struct MergeChunk {
    steps: Vec<MergeStep>,
    /// The reader's own counters (packets, bytes, clock anomalies, the source's).
    health: Option<Health>,
    end: bool,
}

/// What one shard's step produced (steps that produced nothing are left out), as
/// indices into its chunk's `ShardOut::obs`.
struct Record {
    seq: u64,
    /// `obs[start..lead]` are the packet's; then sweep groups, each (key, end in `obs`).
    start: usize,
    lead: usize,
    groups: Vec<(u64, usize)>,
}

/// One shard's answer to a chunk: the observations of all its steps in one vector, made
/// here and freed by the analyser once per chunk (a vector per step cost an allocation
/// and a free from another thread each).
struct ShardOut {
    obs: Vec<Observation>,
    records: std::collections::VecDeque<Record>,
    health: Health,
}

/// The reader side, driven like a `Run` (it is the `Tap` the sources feed).
pub struct Parallel {
    clock: Clock,
    health: Health,
    shards: Vec<ShardChunk>,
    merge: MergeChunk,
    started: Instant,
    to_shards: Vec<SyncSender<ShardChunk>>,
    /// Chunks the shards are done with, to be filled again: a new chunk's buffers would
    /// be fresh memory, and the kernel zeroing fresh pages cost more than the copies
    /// that fill them.
    spare: Vec<Receiver<ShardChunk>>,
    to_merger: Option<SyncSender<MergeChunk>>,
    workers: Vec<JoinHandle<()>>,
    merger: Option<JoinHandle<anyhow::Result<Run>>>,
    /// Live capture: chunks also go out when they are `CHUNK_WAIT` old.
    live: bool,
}

impl Parallel {
    /// Runs `run`'s pipeline over `threads` shard workers and one analyser thread.
    pub fn new(run: Run, threads: usize, live: bool) -> anyhow::Result<Parallel> {
        let n = threads.max(1);
        let cfg = run.pipeline.config().clone();
        let mut to_shards = Vec::new();
        let mut spare = Vec::new();
        let mut outs = Vec::new();
        let mut workers = Vec::new();
        let bodies = DecodeCache::new(cfg.amqp.decode_cache_entries);
        for i in 0..n {
            let (tx, rx) = sync_channel::<ShardChunk>(IN_FLIGHT);
            let (back_tx, back_rx) = sync_channel::<ShardChunk>(IN_FLIGHT);
            let (otx, orx) = sync_channel::<ShardOut>(IN_FLIGHT);
            let shard = Shard::new(&cfg, n, bodies.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("stacktap-shard-{i}"))
                    .spawn(move || work(shard, rx, back_tx, otx))?,
            );
            to_shards.push(tx);
            spare.push(back_rx);
            outs.push(orx);
        }
        let (mtx, mrx) = sync_channel::<MergeChunk>(IN_FLIGHT);
        let merger = std::thread::Builder::new()
            .name("stacktap-analyser".into())
            .spawn(move || merge(run, mrx, outs))?;
        Ok(Parallel {
            clock: Clock::new(&cfg),
            health: Health::default(),
            shards: (0..n).map(|_| ShardChunk::default()).collect(),
            merge: MergeChunk::default(),
            started: Instant::now(),
            to_shards,
            spare,
            to_merger: Some(mtx),
            workers,
            merger: Some(merger),
            live,
        })
    }

    /// The steps the clock makes of one input, placed in the chunk.
    fn place(&mut self, input: impl FnOnce(&mut Clock, &mut Health, Each)) {
        let Parallel {
            clock,
            health,
            shards,
            merge,
            ..
        } = self;
        input(clock, health, &mut |step, _| place(&step, shards, merge));
    }

    /// End of input: every connection closed, every call judged; the run comes back for
    /// its files and report.
    pub fn finish(mut self) -> anyhow::Result<Run> {
        self.place(|clock, health, each| clock.finish(health, each));
        self.merge.end = true;
        self.end_call(true);
        self.to_shards.clear();
        self.to_merger = None;
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| anyhow::anyhow!("a shard worker panicked"))?;
        }
        self.merger
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("the analyser thread panicked"))?
    }

    /// Marks the end of one reader call and sends the chunk when it is full (or old).
    fn end_call(&mut self, force: bool) {
        if let Some(last) = self.merge.steps.last_mut() {
            last.last = true;
        }
        let full = self.merge.steps.len() >= CHUNK_STEPS;
        let old = self.live && self.started.elapsed() >= CHUNK_WAIT;
        if force || full || old {
            self.send();
        }
    }

    fn send(&mut self) {
        self.started = Instant::now();
        for ((tx, back), chunk) in self.to_shards.iter().zip(&self.spare).zip(&mut self.shards) {
            // the next chunk is one the shard has finished with, else one at the size of
            // this one (grown by doubling, its bytes would be copied over and over)
            let next = match back.try_recv() {
                Ok(mut used) => {
                    used.bytes.clear();
                    used.steps.clear();
                    used
                }
                Err(_) => ShardChunk {
                    bytes: Vec::with_capacity(chunk.bytes.capacity()),
                    steps: Vec::with_capacity(chunk.steps.capacity()),
                },
            };
            // a worker gone is a worker that panicked: the join reports it
            let _ = tx.send(std::mem::replace(chunk, next));
        }
        let mut chunk = std::mem::take(&mut self.merge);
        chunk.health = Some(self.health.clone());
        if let Some(tx) = &self.to_merger {
            let _ = tx.send(chunk);
        }
    }
}

/// Puts one step in the chunk: the packet to its connection's shard, a sweep or the end
/// to every shard, and the step in the merger's list.
fn place(step: &Step, shards: &mut [ShardChunk], merge: &mut MergeChunk) {
    let n = shards.len();
    let home = step.frame.map(|f| probe::shard_of(f, n));
    let all = step.sweep || step.end;
    for (i, chunk) in shards.iter_mut().enumerate() {
        let mine = home == Some(i);
        if !(mine || all) {
            continue;
        }
        let frame = step.frame.filter(|_| mine).map(|f| {
            let at = chunk.bytes.len();
            chunk.bytes.extend_from_slice(f.data);
            (f.linktype, at..chunk.bytes.len())
        });
        chunk.steps.push(ShardStep {
            seq: step.seq,
            ts: step.ts,
            clock: step.clock,
            frame,
            sweep: step.sweep,
            end: step.end,
        });
    }
    merge.steps.push(MergeStep {
        seq: step.seq,
        clock: step.clock,
        shard: home,
        all,
        last: false,
    });
}

impl Tap for Parallel {
    fn packet(&mut self, pkt: &Packet) {
        self.place(|clock, health, each| clock.packet(pkt, health, each));
        self.end_call(false);
    }

    fn tick(&mut self, now: Ts) {
        self.place(|clock, health, each| clock.tick(now, health, each));
        self.end_call(true);
    }

    fn source_stats(&mut self, st: &crate::source::SourceStats) {
        self.health.source_stats(st);
    }
}

/// A shard worker: each chunk's steps in order, one answer per chunk.
fn work(
    mut shard: Shard,
    rx: Receiver<ShardChunk>,
    back: SyncSender<ShardChunk>,
    tx: SyncSender<ShardOut>,
) {
    let mut health = Health::default();
    let mut groups = Vec::new();
    for chunk in rx {
        let mut records = std::collections::VecDeque::new();
        let mut obs = Vec::new();
        for s in &chunk.steps {
            let step = Step {
                seq: s.seq,
                frame: s.frame.as_ref().map(|(linktype, r)| Frame {
                    linktype: *linktype,
                    data: &chunk.bytes[r.clone()],
                }),
                ts: s.ts,
                clock: s.clock,
                sweep: s.sweep,
                end: s.end,
            };
            let start = obs.len();
            let lead = shard.step(&step, &mut health, &mut obs, &mut groups);
            if obs.len() == start {
                continue;
            }
            records.push_back(Record {
                seq: s.seq,
                start,
                lead,
                // the shard clears it at the next step
                groups: std::mem::take(&mut groups),
            });
        }
        // back to the reader to fill again (dropped if it has enough spares)
        let _ = back.try_send(chunk);
        let out = ShardOut {
            obs,
            records,
            health: health.clone(),
        };
        if tx.send(out).is_err() {
            return; // the analyser is gone: its join reports why
        }
    }
}

/// The merger: the steps in order, each shard's records at their steps, into the run.
fn merge(
    mut run: Run,
    rx: Receiver<MergeChunk>,
    outs: Vec<Receiver<ShardOut>>,
) -> anyhow::Result<Run> {
    let n = outs.len();
    let mut pending: Vec<std::collections::VecDeque<Record>> =
        (0..n).map(|_| Default::default()).collect();
    let mut shard_health = vec![Health::default(); n];
    // each shard's observations for the chunk at hand, taken in step order
    let mut shard_obs: Vec<std::vec::IntoIter<Observation>> =
        (0..n).map(|_| Vec::new().into_iter()).collect();
    let mut observed: Vec<Observation> = Vec::new();
    let mut swept: Vec<(u64, usize, Observation)> = Vec::new();
    for chunk in rx {
        for (i, orx) in outs.iter().enumerate() {
            let out = orx
                .recv()
                .map_err(|_| anyhow::anyhow!("shard worker {i} stopped"))?;
            // a chunk's records are all taken at its steps: nothing of the last is left
            debug_assert!(pending[i].is_empty() && shard_obs[i].len() == 0);
            pending[i].extend(out.records);
            shard_obs[i] = out.obs.into_iter();
            shard_health[i] = out.health;
        }
        for step in &chunk.steps {
            // the packet's own observations, then the sweep's groups by key
            for i in 0..n {
                let mine = step.shard == Some(i);
                let here = pending[i].front().is_some_and(|r| r.seq == step.seq);
                if !((step.all || mine) && here) {
                    continue;
                }
                let Record {
                    start,
                    lead,
                    groups,
                    ..
                } = pending[i].pop_front().expect("present");
                let it = &mut shard_obs[i];
                // the packet's (only its own shard has any)
                observed.extend(it.take(lead - start));
                let mut from = lead;
                for (key, end) in groups {
                    for o in it.take(end - from) {
                        swept.push((key, i, o));
                    }
                    from = end;
                }
            }
            // stable: one connection's observations keep their order
            swept.sort_by_key(|(key, _, _)| *key);
            observed.extend(swept.drain(..).map(|(_, _, o)| o));
            if step.last {
                let sinks = &mut run.outlet.sinks;
                run.pipeline
                    .analyse_observed(step.clock, &mut observed, &mut |s| sinks.on_signal(s));
            }
        }
        let mut health = chunk.health.unwrap_or_default();
        for h in &shard_health {
            health.add(h);
        }
        run.pipeline.probe.health = health;
        if chunk.end {
            run.end_pass_analysed();
            return Ok(run);
        }
        run.refresh(false);
    }
    anyhow::bail!("the reader stopped before the end of input")
}
