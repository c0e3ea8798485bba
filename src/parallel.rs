//! The pipeline over several threads (`--threads N`): the probe's per-connection work
//! sharded by connection over N shards, joined in one analyser, with exactly the signals
//! one thread gives.
//!
//! ```text
//! reader (the caller's thread)   Clock: each packet's time, step numbers, sweep points
//!   ├─ chunk of steps ─→ shard 0..N   decode, TCP, AMQP/HTTP, oslo, REST (probe::Shard)
//!   └─ the chunk's step list ─────────────────────────┐
//! joiner   per step: the packet's shard's observations, then every shard's sweep
//!          groups merged by sweep key → the analyser ─ batches of signals ─┐
//! sinks    metrics, summary, graph, requests, events (the outlet) ←──────┘
//! ```
//!
//! The stages are not threads. Each shard, the joiner and the sinks is state behind a
//! lock with a queue in front of it, and N threads (the reader and N - 1 helpers) take
//! whichever stage has work ready, their own first (the first helper's is the joiner,
//! then the sinks; the reader's and the others' a shard each), so a stage's tables mostly
//! stay in one core's cache. A thread blocks only when no stage has work, so the cores
//! stay busy however the work falls between the stages (a thread per stage left a core
//! idle a fifth of the time while the reader, a busy shard and the joiner waited on each
//! other, and switched threads at every hand-over). The sinks are a stage of their own
//! so that the end of a short capture, where the analyser judges every request still
//! open at once, is not one thread's work: another takes each batch of signals as it is
//! handed over.
//!
//! Why it is identical to one thread: the reader alone decides time (`probe::Clock`), so
//! every shard processes its packets at the times and with the step numbers one probe
//! would (connection ids are step numbers); sweeps happen at the same steps in every
//! shard, and one table's sweep output is ordered by a key (`FlowTable::sweep`) that
//! merging the shards' outputs reproduces; each stage takes its chunks in order, so the
//! analyser sees the observations in one probe's order and advances at the same points.
//! Table caps are split over the shards, so only a run that hits them (an eviction,
//! counted) can differ.
//!
//! Memory is bounded: the reader keeps at most `IN_FLIGHT` chunks between itself and
//! the joiner, and helps with the stages instead of reading on while it is that far ahead;
//! the joiner takes no chunk while `IN_FLIGHT` batches wait for the sinks.

use crate::contract::Observation;
use crate::correlate::Signal;
use crate::health::Health;
use crate::pipeline::Pipeline;
use crate::probe::{self, Clock, DecodeCache, Each, Frame, Shard, Step};
use crate::run::{self, Outlet, Outputs, Retired, Run, Tap};
use crate::sink::summary::Report;
use crate::source::PacketRef;
use crate::source::blocks::Window;
use crate::source::file::MergedFiles;
use crate::time::Ts;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Steps per chunk: large enough that handing chunks over costs nothing per packet.
const CHUNK_STEPS: usize = 1024;
/// Chunks read and not yet analysed, at most. Few: what a shard answers is then still in
/// the cache when the analyser reads it (`scripts/ab 21`, two threads: 4 took 3 % off
/// `load` and 2 % off `rest` against 8; 16 and more were slower still than 8).
const IN_FLIGHT: usize = 4;
/// Signals per batch handed from the analyser to the sinks: the end of a short capture
/// judges thousands at once, and the sinks take them while the analyser makes the next.
const SIGNALS_PER_BATCH: usize = 512;
/// Spare chunk buffers kept per shard for the reader to fill again.
const SPARES: usize = 4;
/// Live capture: a chunk waits for more packets at most this long.
const CHUNK_WAIT: Duration = Duration::from_millis(50);
/// Live capture: the health counters are published at least this often.
const REFRESH_WAIT: Duration = Duration::from_millis(250);

/// One shard's part of a step.
struct ShardStep {
    seq: u64,
    ts: Ts,
    clock: Ts,
    /// The packet's link type, and where its bytes are.
    frame: Option<(i32, Lies)>,
    sweep: bool,
    end: bool,
}

/// Where a step's packet lies: in one of the capture file's blocks (windows) the chunk
/// holds, or (a live capture, a packet the clock held back) copied into the chunk.
enum Lies {
    InWindow(usize, Range<usize>),
    Copied(Range<usize>),
}

#[derive(Default)]
struct ShardChunk {
    /// The shard's counters go with its answer (the health is published after it).
    report: bool,
    bytes: Vec<u8>,
    /// The windows its packets lie in (mostly one), held until the shard has read them.
    windows: Vec<Window>,
    steps: Vec<ShardStep>,
}

impl ShardChunk {
    fn clear(&mut self) {
        self.report = false;
        self.bytes.clear();
        self.windows.clear();
        self.steps.clear();
    }

    /// Keeps `frame`'s bytes for the shard: the window they lie in, else a copy.
    fn hold(&mut self, frame: Frame) -> Lies {
        if let Some(w) = frame.window
            && let Some(at) = offset_in(w, frame.data)
        {
            if !self.windows.last().is_some_and(|last| Arc::ptr_eq(last, w)) {
                self.windows.push(Arc::clone(w));
            }
            return Lies::InWindow(self.windows.len() - 1, at..at + frame.data.len());
        }
        let at = self.bytes.len();
        self.bytes.extend_from_slice(frame.data);
        Lies::Copied(at..self.bytes.len())
    }

    fn bytes(&self, lies: &Lies) -> &[u8] {
        match lies {
            Lies::InWindow(w, r) => &self.windows[*w][r.clone()],
            Lies::Copied(r) => &self.bytes[r.clone()],
        }
    }
}

/// Where `part` starts in `whole`, if it lies in it.
fn offset_in(whole: &[u8], part: &[u8]) -> Option<usize> {
    let at = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (at + part.len() <= whole.len()).then_some(at)
}

/// A step as the joiner sees it.
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
    /// The reader's own counters (packets, bytes, clock anomalies, the source's), when
    /// the health is to be published after this chunk (every shard's answer has its own).
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

/// One shard's answer to a chunk: the observations of all its steps in one vector (a
/// vector per step cost an allocation and a free from another thread each), which comes
/// back analysed to be freed here.
struct ShardOut {
    obs: Vec<Observation>,
    records: VecDeque<Record>,
    /// The shard's counters, when the chunk asked for them.
    health: Option<Health>,
}

/// A shard's state: the per-connection work of its connections.
struct ShardStage {
    shard: Shard,
    health: Health,
    /// Scratch for `Shard::step`'s sweep groups.
    groups: Vec<(u64, usize)>,
}

impl ShardStage {
    /// One chunk's steps in order: their observations (in `obs`, once the analysed ones
    /// it holds are freed) and where each step's are.
    fn answer(&mut self, chunk: &ShardChunk, mut obs: Vec<Observation>) -> ShardOut {
        obs.clear();
        let mut records = VecDeque::new();
        for s in &chunk.steps {
            let step = Step {
                seq: s.seq,
                frame: s.frame.as_ref().map(|(linktype, lies)| Frame {
                    linktype: *linktype,
                    data: chunk.bytes(lies),
                    window: None,
                }),
                ts: s.ts,
                clock: s.clock,
                sweep: s.sweep,
                end: s.end,
            };
            let start = obs.len();
            let lead = self
                .shard
                .step(&step, &mut self.health, &mut obs, &mut self.groups);
            if obs.len() == start {
                continue;
            }
            records.push_back(Record {
                seq: s.seq,
                start,
                lead,
                // the shard clears it at the next step
                groups: std::mem::take(&mut self.groups),
            });
        }
        ShardOut {
            obs,
            records,
            health: chunk.report.then(|| self.health.clone()),
        }
    }
}

/// The joiner's state: the probe's counters and the analyser, and what it has taken of
/// the shards' answers.
struct Joiner {
    pipeline: Pipeline,
    /// The signals made since the last hand-over to the sinks.
    batch: Vec<Signal>,
    pending: Vec<VecDeque<Record>>,
    shard_health: Vec<Health>,
    /// Each shard's observations for the chunk at hand. The analyser reads them (and
    /// takes an exchange's texts, `Analyser::observe`); the vectors go back to their
    /// shards to be freed there.
    shard_obs: Vec<Vec<Observation>>,
    /// (shard, index in its `shard_obs`) of the observations to analyse next, in order.
    observed: Vec<(usize, usize)>,
    swept: Vec<(u64, usize, usize)>,
}

impl Joiner {
    fn new(pipeline: Pipeline, shards: usize) -> Joiner {
        Joiner {
            pipeline,
            batch: Vec::new(),
            pending: (0..shards).map(|_| VecDeque::new()).collect(),
            shard_health: vec![Health::default(); shards],
            shard_obs: (0..shards).map(|_| Vec::new()).collect(),
            observed: Vec::new(),
            swept: Vec::new(),
        }
    }

    /// The observation vectors of the chunk just joined, one per shard, each analysed
    /// to the last.
    fn spent(&mut self) -> impl Iterator<Item = Vec<Observation>> + '_ {
        self.shard_obs.iter_mut().map(std::mem::take)
    }

    /// One chunk's steps in order, each shard's records at their steps, into the
    /// analyser; its signals, then the counters when they are due, to `out`. True if it
    /// was the end of input.
    fn join(&mut self, chunk: MergeChunk, outs: Vec<ShardOut>, out: &Outflow) -> bool {
        for (i, out) in outs.into_iter().enumerate() {
            // a chunk's records are all taken at its steps: nothing of the last is left
            debug_assert!(self.pending[i].is_empty() && self.shard_obs[i].is_empty());
            self.pending[i].extend(out.records);
            self.shard_obs[i] = out.obs;
            if let Some(h) = out.health {
                self.shard_health[i] = h;
            }
        }
        for step in &chunk.steps {
            self.take_step(step, out);
        }
        let mut counters = None;
        if let Some(mut health) = chunk.health {
            for h in &self.shard_health {
                health.add(h);
            }
            self.pipeline.probe.health = health;
            if chunk.end {
                let batch = &mut self.batch;
                self.pipeline
                    .finish_observed(&mut |s| out.collect(batch, s));
            }
            counters = Some(self.pipeline.health());
        }
        if !self.batch.is_empty() || counters.is_some() || chunk.end {
            out.hand(Batch {
                signals: std::mem::take(&mut self.batch),
                counters,
                end: chunk.end,
            });
        }
        chunk.end
    }

    /// The step's observations in order; the analyser runs after the last step of a
    /// reader call.
    fn take_step(&mut self, step: &MergeStep, out: &Outflow) {
        if !step.all {
            // most steps: one packet, whose shard alone can have observed anything, and no
            // sweep groups to order
            if let Some(i) = step.shard {
                self.take_packet(i, step.seq);
            }
        } else {
            self.take_sweep(step.seq);
        }
        if step.last {
            let (observed, obs) = (&mut self.observed, &mut self.shard_obs);
            let batch = &mut self.batch;
            self.pipeline.analyse_observed(
                step.clock,
                |observe| {
                    observed
                        .drain(..)
                        .for_each(|(i, k)| observe(&mut obs[i][k]))
                },
                &mut |s| out.collect(batch, s),
            );
        }
    }

    /// A packet's observations, if its shard recorded any for it.
    fn take_packet(&mut self, i: usize, seq: u64) {
        if self.pending[i].front().is_some_and(|r| r.seq == seq) {
            let Record { start, lead, .. } = self.pending[i].pop_front().expect("present");
            self.observed.extend((start..lead).map(|k| (i, k)));
        }
    }

    /// A sweep's (or the end's) step: each shard's packet observations, then every
    /// shard's groups ordered by key.
    fn take_sweep(&mut self, seq: u64) {
        for i in 0..self.pending.len() {
            // every shard took the step; one that observed nothing recorded nothing
            if self.pending[i].front().is_none_or(|r| r.seq != seq) {
                continue;
            }
            let Record {
                start,
                lead,
                groups,
                ..
            } = self.pending[i].pop_front().expect("present");
            // the packet's (only its own shard has any)
            self.observed.extend((start..lead).map(|k| (i, k)));
            let mut from = lead;
            for (key, end) in groups {
                self.swept.extend((from..end).map(|k| (key, i, k)));
                from = end;
            }
        }
        // stable: one connection's observations keep their order
        self.swept.sort_by_key(|(key, _, _)| *key);
        self.observed
            .extend(self.swept.drain(..).map(|(_, i, k)| (i, k)));
    }
}

/// What the analyser hands the sinks: signals in order, and the counters when they are
/// to be published after them.
struct Batch {
    signals: Vec<Signal>,
    counters: Option<Health>,
    /// The last: the sinks publish the counters at once and the run is over.
    end: bool,
}

/// The analyser's signals on their way to the sinks: batches in order, taken by
/// whichever thread is free (at the end of a short capture, the sinks take one batch
/// while the analyser judges the next).
struct Outflow {
    batches: Mutex<VecDeque<Batch>>,
    /// Emptied batches, to be filled again (fresh ones grew by doubling each time).
    spare: Mutex<Vec<Vec<Signal>>>,
    bell: Arc<Bell>,
}

impl Outflow {
    /// `s` into the batch being filled, handed over once full.
    fn collect(&self, batch: &mut Vec<Signal>, s: Signal) {
        if batch.capacity() == 0 {
            *batch = relock(&self.spare).pop().unwrap_or_default();
        }
        batch.push(s);
        if batch.len() >= SIGNALS_PER_BATCH {
            self.hand(Batch {
                signals: std::mem::take(batch),
                counters: None,
                end: false,
            });
        }
    }

    /// Queues a batch for the sinks. The joiner's lock is held: batches queue in order.
    fn hand(&self, batch: Batch) {
        relock(&self.batches).push_back(batch);
        self.bell.ring();
    }

    fn waiting(&self) -> usize {
        relock(&self.batches).len()
    }
}

/// The sinks' state: the outlet, taken by one thread at a time.
struct SinkStage {
    outlet: Outlet,
}

impl SinkStage {
    /// One batch into the sinks; true if it was the last.
    fn take(&mut self, batch: &mut Batch) -> bool {
        for s in batch.signals.drain(..) {
            self.outlet.sinks.on_signal(&s);
        }
        if let Some(h) = &batch.counters {
            self.outlet.refresh(h, batch.end);
        }
        batch.end
    }
}

/// A shard's queues: chunks to do, answers for the joiner, buffers to fill again.
#[derive(Default)]
struct Queues {
    todo: VecDeque<ShardChunk>,
    done: VecDeque<ShardOut>,
    spare: Vec<ShardChunk>,
    /// Answers' observations the joiner has analysed, to be freed by the shard (where
    /// they were allocated) as it answers its next chunk into the same vector.
    spent: Vec<Vec<Observation>>,
}

/// One shard: its state, taken by one thread at a time, and its queues, held only
/// while a chunk is put in or taken out.
struct Lane {
    stage: Mutex<ShardStage>,
    queues: Mutex<Queues>,
}

/// Everything the threads share.
struct Stages {
    lanes: Vec<Lane>,
    joiner: Mutex<Joiner>,
    sinks: Mutex<SinkStage>,
    outflow: Outflow,
    /// Step lists read and not yet joined, in order.
    merges: Mutex<VecDeque<MergeChunk>>,
    /// The end of input has reached the sinks (read without taking a stage's lock,
    /// which a thread looking for work would then find taken).
    ended: AtomicBool,
    bell: Arc<Bell>,
}

/// Wakes threads that found nothing to do when work arrives.
#[derive(Default)]
struct Bell {
    /// Bumped whenever work arrives: a thread that saw no work since its reading of it
    /// may sleep.
    rung: Mutex<u64>,
    ring: Condvar,
    sleepers: AtomicUsize,
    /// The helpers should exit (the end was joined, or the reader gave up).
    stop: AtomicBool,
    /// A thread panicked inside a stage: its lock is poisoned, the run cannot go on.
    failed: AtomicBool,
    /// Helpers that have let the stages go (changed under `rung`'s lock).
    left: AtomicUsize,
}

impl Bell {
    fn reading(&self) -> u64 {
        *relock(&self.rung)
    }

    fn ring(&self) {
        let mut rung = relock(&self.rung);
        *rung += 1;
        // no waker is needed when nobody sleeps (the count changes under this lock)
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.ring.notify_all();
        }
    }

    /// Sleeps until the bell rings after `seen`, or the run stops.
    fn sleep(&self, seen: u64) {
        let mut rung = relock(&self.rung);
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        while *rung == seen && !self.stopping() {
            rung = self.ring.wait(rung).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.failed.load(Ordering::Acquire)
    }

    /// A helper has let the stages go.
    fn leave(&self) {
        let _rung = relock(&self.rung);
        self.left.fetch_add(1, Ordering::Release);
        self.ring.notify_all();
    }

    /// Sleeps until `helpers` helpers have let the stages go.
    fn wait_left(&self, helpers: usize) {
        let mut rung = relock(&self.rung);
        while self.left.load(Ordering::Acquire) < helpers {
            rung = self.ring.wait(rung).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn halt(&self, failed: bool) {
        let flag = if failed { &self.failed } else { &self.stop };
        flag.store(true, Ordering::Release);
        let _rung = relock(&self.rung);
        self.ring.notify_all();
    }
}

/// A queue's lock. Nothing panics while one is held, so a poisoned one still holds
/// whole queues.
fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stage's lock if no other thread holds it (a poisoned one is a failed run: the bell
/// says so).
fn try_take<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    m.try_lock().ok()
}

impl Stages {
    /// Does one chunk of some stage's work, if any is ready: true if it did. A thread
    /// keeps to its own stages when it can (`home`: the joiner, or shard `home - 1` and
    /// then the next): their tables stay in its core's cache.
    fn work_once(&self, home: usize) -> bool {
        let n = self.lanes.len();
        let shards = |first: usize| (0..n).any(|k| self.shard_once((first + k) % n));
        if home == 0 {
            // the sinks after the analyser, on its core: the signals are still in its cache
            self.join_once() || self.sinks_once() || shards(n - 1)
        } else {
            shards(home - 1) || self.join_once() || self.sinks_once()
        }
    }

    /// The next batch of signals into the sinks, if one is waiting.
    fn sinks_once(&self) -> bool {
        let Some(mut stage) = try_take(&self.sinks) else {
            return false;
        };
        // only the thread holding the stage takes batches: they go in in order
        let Some(mut batch) = relock(&self.outflow.batches).pop_front() else {
            return false;
        };
        let end = stage.take(&mut batch);
        drop(stage);
        let mut spare = relock(&self.outflow.spare);
        if spare.len() < IN_FLIGHT {
            spare.push(batch.signals);
        }
        drop(spare);
        if end {
            self.ended.store(true, Ordering::Release);
        }
        self.bell.ring();
        true
    }

    /// The next step list, if every shard has answered its chunk.
    fn join_once(&self) -> bool {
        // the sinks are behind: what the analyser makes would pile up
        if self.outflow.waiting() >= IN_FLIGHT {
            return false;
        }
        let Some(mut joiner) = try_take(&self.joiner) else {
            return false;
        };
        let chunk = {
            let mut merges = relock(&self.merges);
            // each shard answers its chunks in order, one answer per chunk, and only
            // the joiner takes answers: present now, present when taken below
            let answered = self
                .lanes
                .iter()
                .all(|l| !relock(&l.queues).done.is_empty());
            if merges.is_empty() || !answered {
                return false;
            }
            merges.pop_front().expect("checked")
        };
        let outs = self
            .lanes
            .iter()
            .map(|l| relock(&l.queues).done.pop_front().expect("checked"))
            .collect();
        joiner.join(chunk, outs, &self.outflow);
        for (lane, obs) in self.lanes.iter().zip(joiner.spent()) {
            let mut q = relock(&lane.queues);
            if q.spent.len() < SPARES {
                q.spent.push(obs);
            } else {
                // more than the shard will reuse (it answers each chunk before the
                // join): freed here, not under its lock
                drop(q);
                drop(obs);
            }
        }
        drop(joiner);
        self.bell.ring();
        true
    }

    /// Shard `i`'s next chunk, if it has one and no other thread is in it.
    fn shard_once(&self, i: usize) -> bool {
        let lane = &self.lanes[i];
        let Some(mut stage) = try_take(&lane.stage) else {
            return false;
        };
        let (mut chunk, spent) = {
            let mut q = relock(&lane.queues);
            let Some(chunk) = q.todo.pop_front() else {
                return false;
            };
            (chunk, q.spent.pop().unwrap_or_default())
        };
        let out = stage.answer(&chunk, spent);
        // the windows go now, not when the chunk is filled again: the reader reads into
        // a block again once no chunk holds it
        chunk.windows.clear();
        #[cfg(test)]
        tests::slow_hand_over();
        {
            let mut q = relock(&lane.queues);
            // queued before the stage is let go: another thread could otherwise answer
            // the next chunk and queue it first, and the joiner would pair answers with
            // the wrong chunks (seen once in 8 threads on 2 cores)
            q.done.push_back(out);
            if q.spare.len() < SPARES {
                q.spare.push(chunk);
            }
        }
        drop(stage);
        self.bell.ring();
        true
    }

    /// Works, or sleeps when there is nothing to do, until `done` holds or the run
    /// stops. False if it stopped on a failure.
    fn help_until(&self, home: usize, done: impl Fn(&Stages) -> bool) -> bool {
        loop {
            if self.bell.failed.load(Ordering::Acquire) {
                return false;
            }
            if done(self) {
                return true;
            }
            let seen = self.bell.reading();
            if !self.work_once(home) && !done(self) {
                self.bell.sleep(seen);
            }
        }
    }
}

/// A helper thread: whatever stage is ready, until the run stops.
fn help(shared: Arc<Stages>, home: usize) {
    // a panic in a stage poisons its lock: tell the others, or they would wait for it;
    // either way, say so once the stages are let go
    struct Leaving(Arc<Bell>);
    impl Drop for Leaving {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.halt(true);
            }
            self.0.leave();
        }
    }
    let _leaving = Leaving(Arc::clone(&shared.bell));
    // declared after `_leaving`, so dropped before it
    let stages = shared;
    #[cfg(test)]
    tests::fail_on_a_helper();
    while !stages.bell.stopping() {
        let seen = stages.bell.reading();
        if !stages.work_once(home) {
            stages.bell.sleep(seen);
        }
    }
}

/// The reader side, driven like a `Run` (it is the `Tap` the sources feed).
pub struct Parallel {
    clock: Clock,
    health: Health,
    shards: Vec<ShardChunk>,
    merge: MergeChunk,
    started: Instant,
    /// The packets read at the last publishing of the health, and when it was.
    refreshed: (u64, Instant),
    stages: Arc<Stages>,
    helpers: Vec<JoinHandle<()>>,
    /// Live capture: chunks also go out when they are `CHUNK_WAIT` old.
    live: bool,
}

impl Parallel {
    /// Runs `run`'s pipeline sharded over `threads` shards, on the caller's thread and
    /// `threads - 1` helpers.
    pub fn new(run: Run, threads: usize, live: bool) -> anyhow::Result<Parallel> {
        let n = threads.max(1);
        let cfg = run.pipeline.config().clone();
        let bodies = DecodeCache::new(&cfg.amqp);
        let lanes = (0..n)
            .map(|_| Lane {
                stage: Mutex::new(ShardStage {
                    shard: Shard::new(&cfg, n, bodies.clone()),
                    health: Health::default(),
                    groups: Vec::new(),
                }),
                queues: Mutex::new(Queues::default()),
            })
            .collect();
        let Run {
            pipeline,
            outlet,
            retired,
        } = run;
        // what an earlier threaded pass of this run retired is done with: joined and freed
        // here (this pass retires its own at `finish`)
        drop(retired);
        let bell = Arc::new(Bell::default());
        let stages = Arc::new(Stages {
            lanes,
            joiner: Mutex::new(Joiner::new(pipeline, n)),
            sinks: Mutex::new(SinkStage { outlet }),
            outflow: Outflow {
                batches: Mutex::new(VecDeque::new()),
                spare: Mutex::new(Vec::new()),
                bell: bell.clone(),
            },
            merges: Mutex::new(VecDeque::new()),
            ended: AtomicBool::new(false),
            bell,
        });
        let mut helpers = Vec::new();
        for i in 1..n {
            let stages = stages.clone();
            helpers.push(
                std::thread::Builder::new()
                    .name(format!("stacktap-work-{i}"))
                    .spawn(move || help(stages, if i == 1 { 0 } else { i }))?,
            );
        }
        Ok(Parallel {
            clock: Clock::new(&cfg),
            health: Health::default(),
            shards: (0..n).map(|_| ShardChunk::default()).collect(),
            merge: MergeChunk::default(),
            started: Instant::now(),
            refreshed: (0, Instant::now()),
            stages,
            helpers,
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
        let joined = self
            .stages
            .help_until(1, |s| s.ended.load(Ordering::Acquire));
        self.stages.bell.halt(!joined);
        // the helpers' work is over once they have let the stages go; their threads'
        // own ends are not waited for here (see `Retired`)
        self.stages.bell.wait_left(self.helpers.len());
        let mut retired = Retired::default();
        self.helpers.drain(..).for_each(|h| retired.thread(h));
        // a helper that panicked after the others had done its share says so as it leaves
        if !joined || self.stages.bell.failed.load(Ordering::Acquire) {
            anyhow::bail!("a worker thread panicked");
        }
        let stages = Arc::clone(&self.stages);
        drop(self);
        let stages =
            Arc::try_unwrap(stages).map_err(|_| anyhow::anyhow!("a worker thread still runs"))?;
        let joiner = stages
            .joiner
            .into_inner()
            .map_err(|_| anyhow::anyhow!("the analyser panicked"))?;
        let sinks = stages
            .sinks
            .into_inner()
            .map_err(|_| anyhow::anyhow!("a sink panicked"))?;
        retired.keep(stages.lanes);
        Ok(Run {
            pipeline: joiner.pipeline,
            outlet: sinks.outlet,
            retired,
        })
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

    /// Whether the health counters are due to be merged and published after this chunk:
    /// every `REFRESH_PACKETS` packets, as on one thread, or after `REFRESH_WAIT` on a
    /// quiet link. Only then do the shards hand theirs over (a copy of every shard's
    /// counters with every chunk cost the joiner, the one stage that cannot be spread, a
    /// tenth of its time beyond analysing when they were merged each time, and a copy of
    /// 10 KiB of AMQP method counts a chunk when they were not).
    fn refresh_due(&self) -> bool {
        let (at, when) = self.refreshed;
        let packets = self.health.packets;
        packets / run::REFRESH_PACKETS != at / run::REFRESH_PACKETS
            || when.elapsed() >= REFRESH_WAIT
    }

    /// Hands the chunk to the stages, after helping them until fewer than `IN_FLIGHT`
    /// chunks wait to be joined.
    fn send(&mut self) {
        self.started = Instant::now();
        let stages = &self.stages;
        if !stages.help_until(1, |s| relock(&s.merges).len() < IN_FLIGHT) {
            // a stage failed (`finish` reports it): what is read is dropped, not kept
            self.shards.iter_mut().for_each(ShardChunk::clear);
            self.merge = MergeChunk::default();
            return;
        }
        let report = self.merge.end || self.refresh_due();
        if report {
            self.refreshed = (self.health.packets, Instant::now());
            self.merge.health = Some(self.health.clone());
        }
        for (lane, chunk) in stages.lanes.iter().zip(&mut self.shards) {
            chunk.report = report;
            let mut q = relock(&lane.queues);
            // the next chunk is one a shard has finished with, else one at the size of
            // this one (grown by doubling, its bytes would be copied over and over; and
            // fresh memory costs the kernel's zeroing of its pages)
            let next = match q.spare.pop() {
                Some(mut used) => {
                    used.clear();
                    used
                }
                None => ShardChunk {
                    report: false,
                    bytes: Vec::with_capacity(chunk.bytes.capacity()),
                    windows: Vec::new(),
                    steps: Vec::with_capacity(chunk.steps.capacity()),
                },
            };
            q.todo.push_back(std::mem::replace(chunk, next));
        }
        // the next step list at the size of this one (grown from empty, it would be
        // copied over at each doubling, every chunk)
        let next = MergeChunk {
            steps: Vec::with_capacity(self.merge.steps.capacity()),
            ..MergeChunk::default()
        };
        let chunk = std::mem::replace(&mut self.merge, next);
        relock(&stages.merges).push_back(chunk);
        stages.bell.ring();
    }
}

/// Replays `files` through `run` on `threads` threads (1: the caller's only), as `stacktap
/// replay --threads N` does: the run, ended and its files written, and its report.
/// Paced (`speed`), the analyser does not wait for a full chunk.
pub fn replay(
    mut run: Run,
    threads: usize,
    files: &mut MergedFiles,
    speed: Option<f64>,
    out: &Outputs,
    stop: &AtomicBool,
) -> anyhow::Result<(Run, Report)> {
    let report = if threads > 1 {
        let mut par = Parallel::new(run, threads, speed.is_some())?;
        crate::run::replay(files, &mut par, speed, out, stop)?;
        run = par.finish()?;
        run.write_out(out)?
    } else {
        crate::run::replay(files, &mut run, speed, out, stop)?;
        run.finish(out)?
    };
    Ok((run, report))
}

impl Drop for Parallel {
    /// A reader that gives up early (an error, a panic) lets the helpers go.
    fn drop(&mut self) {
        self.stages.bell.halt(false);
    }
}

/// Puts one step in the chunk: the packet to its connection's shard, a sweep or the end
/// to every shard, and the step in the joiner's list.
fn place(step: &Step, shards: &mut [ShardChunk], merge: &mut MergeChunk) {
    let n = shards.len();
    let home = step.frame.map(|f| probe::shard_of(f, n));
    let all = step.sweep || step.end;
    let part = |chunk: &mut ShardChunk, mine: bool| {
        let frame = step
            .frame
            .filter(|_| mine)
            .map(|f| (f.linktype, chunk.hold(f)));
        chunk.steps.push(ShardStep {
            seq: step.seq,
            ts: step.ts,
            clock: step.clock,
            frame,
            sweep: step.sweep,
            end: step.end,
        });
    };
    match home {
        // most steps: one packet, for one shard
        Some(i) if !all => part(&mut shards[i], true),
        _ if all => shards
            .iter_mut()
            .enumerate()
            .for_each(|(i, chunk)| part(chunk, home == Some(i))),
        _ => {}
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
    fn packet(&mut self, pkt: &PacketRef<'_>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::atomic::AtomicU64;

    /// Microseconds a shard waits between answering a chunk and handing the answer on.
    static HAND_OVER_DELAY_US: AtomicU64 = AtomicU64::new(0);

    pub(super) fn slow_hand_over() {
        let us = HAND_OVER_DELAY_US.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
    }

    /// Helpers panic as they start.
    static FAIL_ON_A_HELPER: AtomicBool = AtomicBool::new(false);

    pub(super) fn fail_on_a_helper() {
        if FAIL_ON_A_HELPER.load(Ordering::Relaxed) {
            panic!("a helper failed (a test's doing)");
        }
    }

    fn events(threads: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let out = Outputs {
            events_out: Some(dir.path().join("events.jsonl")),
            ..Default::default()
        };
        let capture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sampledata/failures.pcap");
        let mut files = MergedFiles::open(&[capture]).unwrap();
        let stop = AtomicBool::new(false);
        let run = Run::new(Config::default(), &out).unwrap();
        replay(run, threads, &mut files, None, &out, &stop).unwrap();
        std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap()
    }

    /// A helper that panics fails the run, whether its panic is seen while the others
    /// work or only once they are done (a panic's report takes a while: the reader may do
    /// every share alone meanwhile): the replay says so, and returns, having waited for
    /// every thread it started, instead of hanging or returning a run as if whole.
    #[test]
    fn a_helper_that_panics_fails_the_run_and_every_thread_ends() {
        FAIL_ON_A_HELPER.store(true, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sampledata");
            let captures: Vec<_> = std::fs::read_dir(samples)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "pcap"))
                .collect();
            let mut files = MergedFiles::open(&captures).unwrap();
            let out = Outputs::default();
            let run = Run::new(Config::default(), &out).unwrap();
            let stop = AtomicBool::new(false);
            let result = replay(run, 2, &mut files, None, &out, &stop).map(|_| ());
            tx.send(result.map_err(|e| e.to_string())).unwrap();
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the run ends within a minute");
        FAIL_ON_A_HELPER.store(false, Ordering::Relaxed);
        assert_eq!(result, Err("a worker thread panicked".to_string()));
    }

    /// A thread that answered a chunk and is slow to hand it on must not let another
    /// thread answer the shard's next chunk and hand that on first: the joiner would pair
    /// answers with the wrong chunks. (Handing on after letting the shard go did this once
    /// in CI, 8 threads on 2 cores; with this delay, in most runs.)
    #[test]
    fn a_slow_hand_over_keeps_each_shards_answers_in_order() {
        let one = events(1);
        assert!(one.lines().count() > 10, "the capture gives events");
        HAND_OVER_DELAY_US.store(300, Ordering::Relaxed);
        let differ = (0..10).filter(|_| events(8) != one).count();
        HAND_OVER_DELAY_US.store(0, Ordering::Relaxed);
        assert_eq!(
            differ, 0,
            "runs on 8 threads, hand-overs slowed, unlike one thread"
        );
    }
}
