//! Running the pipeline: from files (replay, demo) or from an interface (capture), feeding
//! the sinks, optionally serving them, and reporting at the end.

use crate::config::Config;
use crate::health::Health;
use crate::pipeline::Pipeline;
use crate::serve::{self, Shared};
use crate::sink::graph::Graph;
use crate::sink::metrics::Metrics;
use crate::sink::requests::Requests;
use crate::sink::summary::{Report, Summary};
use crate::sink::{EventWriter, Sinks};
use crate::source::PacketRef;
use crate::source::file::MergedFiles;
use crate::source::live::{LiveCapture, LiveRead};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Health metrics are brought up to date every this many packets (and on idle ticks).
pub const REFRESH_PACKETS: u64 = 4096;

#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub listen: Option<String>,
    pub events_out: Option<PathBuf>,
    pub metrics_out: Option<PathBuf>,
    /// Show a progress bar (stderr is a terminal and the input is large).
    pub progress: bool,
    /// The window `/api/graph` covers when none is asked for (a live capture: the
    /// configured graph window); None: everything since the first packet (a replay).
    pub graph_window_s: Option<f64>,
    /// `--store`: chains and request trees persisted in SQLite.
    pub store: Option<PathBuf>,
    /// Where spans go (`--otlp-endpoint`, the OTEL_* variables, `[otlp]`), resolved.
    pub otlp: Option<crate::otlp::config::Export>,
    /// `--config`: where a SIGHUP re-reads the listener's TLS and credentials from.
    pub config: Option<PathBuf>,
    /// What the data comes from, in words, for the UI's header.
    pub source: String,
}

/// Where an analysis goes: the sinks, the HTTP listener, the files and the store.
pub struct Outlet {
    pub sinks: Sinks,
    shared: Option<Shared>,
    last_publish: Instant,
    last_flush: Instant,
    store_error: Option<anyhow::Error>,
}

impl Outlet {
    pub fn new(cfg: &Config, out: &Outputs) -> anyhow::Result<Outlet> {
        let events = match &out.events_out {
            Some(p) if p.as_os_str() == "-" => Some(EventWriter::new(Box::new(std::io::stdout()))),
            Some(p) => Some(EventWriter::new(Box::new(
                std::fs::File::create(p)
                    .map_err(|e| anyhow::anyhow!("--events-out {}: {e}", p.display()))?,
            ))),
            None => None,
        };
        let metrics = Metrics::new(cfg.metrics.max_series_per_family);
        let mut reqs = Requests::new(cfg.requests.clone());
        if let Some(path) = &out.store {
            reqs.attach_store(crate::sink::store::Store::open(path, cfg.store.clone())?)?;
        }
        let requests = Arc::new(Mutex::new(reqs));
        let graph = Arc::new(Mutex::new(Graph::new(
            &cfg.requests,
            cfg.metrics.max_series_per_family,
        )));
        let shared = match &out.listen {
            Some(addr) => {
                let shared = Shared {
                    registry: metrics.registry.clone(),
                    summary: Arc::new(Mutex::new("{}".into())),
                    graph: graph.clone(),
                    graph_window_s: out.graph_window_s,
                    requests: requests.clone(),
                    source: Arc::new(Mutex::new(serve::source::Source::new(&out.source, &cfg.ui))),
                };
                let bound = serve::spawn(addr, shared.clone(), &cfg.listen, out.config.clone())?;
                eprintln!("stacktap: serving {}/metrics and /api/summary", bound.url());
                Some(shared)
            }
            None => None,
        };
        Ok(Outlet {
            sinks: Sinks {
                metrics,
                summary: Summary::new(&cfg.summary),
                graph,
                requests,
                events,
                write_error: None,
                otlp: match &out.otlp {
                    Some(x) => Some(crate::otlp::OtlpSink::new(
                        crate::otlp::export::Exporter::start(x.clone())?,
                    )),
                    None => None,
                },
            },
            shared,
            last_publish: Instant::now(),
            last_flush: Instant::now(),
            store_error: None,
        })
    }

    /// Brings health metrics and the served summary and source up to date (those at most
    /// once a second of wall time, unless forced).
    pub fn refresh(&mut self, health: &Health, force: bool) {
        self.sinks.sync(health);
        if let Some(shared) = &self.shared
            && (force || self.last_publish.elapsed() >= Duration::from_secs(1))
        {
            self.last_publish = Instant::now();
            if let Ok(mut s) = shared.source.lock() {
                s.update(health);
            }
            let json = serde_json::to_string(&self.sinks.report(health)).unwrap_or_default();
            if let Ok(mut g) = shared.summary.lock() {
                *g = json;
            }
        }
        if force || self.last_flush.elapsed() >= Duration::from_secs(1) {
            self.last_flush = Instant::now();
            if let Ok(mut r) = self.sinks.requests.lock()
                && let Err(e) = r.flush()
                && self.store_error.is_none()
            {
                self.store_error = Some(e);
            }
        }
    }

    /// The probes feeding a collector, for the UI's header.
    pub fn set_probes(&self, probes: &[crate::fleet::merge::ProbeInfo]) {
        if let Some(shared) = &self.shared
            && let Ok(mut s) = shared.source.lock()
        {
            s.set_probes(probes);
        }
    }

    /// The end: the files written, the summary returned.
    pub fn finish(&mut self, out: &Outputs, health: &Health) -> anyhow::Result<Report> {
        // every span out (or counted as dropped) before the counters are written
        if let Some(o) = self.sinks.otlp.as_mut() {
            o.close();
        }
        self.refresh(health, true);
        let events = out
            .events_out
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string());
        if let Some(w) = self.sinks.events.as_mut()
            && let Err(e) = w.flush()
            && self.sinks.write_error.is_none()
        {
            self.sinks.write_error = Some(e);
        }
        // one output failing does not cost the others
        if let Some(p) = &out.metrics_out {
            std::fs::write(p, Metrics::render(&self.sinks.metrics.registry))
                .map_err(|e| anyhow::anyhow!("--metrics-out {}: cannot write: {e}", p.display()))?;
        }
        if let Some(e) = self.sinks.write_error.take() {
            anyhow::bail!("--events-out {events}: cannot write: {e}");
        }
        if let Some(e) = self.store_error.take() {
            return Err(e);
        }
        Ok(self.sinks.report(health))
    }
}

/// What reading packets feeds: a local run (probe and analyser) or a probe shipping to a
/// collector.
pub trait Tap {
    fn packet(&mut self, pkt: &PacketRef<'_>);
    /// No packet for a while (live capture): time passes all the same.
    fn tick(&mut self, now: crate::time::Ts);
    /// What the source counted (drops, clock steps, damaged records), cumulative.
    fn source_stats(&mut self, st: &crate::source::SourceStats);
}

impl Tap for Run {
    fn packet(&mut self, pkt: &PacketRef<'_>) {
        Run::packet(self, pkt)
    }
    fn tick(&mut self, now: crate::time::Ts) {
        Run::tick(self, now)
    }
    fn source_stats(&mut self, st: &crate::source::SourceStats) {
        self.pipeline.probe.health.source_stats(st);
    }
}

/// A probe that ships its observations to a collector (`--collector`): no analysis here,
/// only the probe's own health (served and written when asked).
pub struct Ship {
    pub probe: crate::probe::Probe,
    sender: Option<crate::fleet::sender::Sender>,
    outlet: Outlet,
    observed: Vec<crate::contract::Observation>,
    last_stats: Instant,
}

impl Ship {
    pub fn new(
        cfg: Config,
        out: &Outputs,
        to: crate::fleet::sender::SenderConfig,
    ) -> anyhow::Result<Ship> {
        let sender = crate::fleet::sender::Sender::start(to)?;
        // spans are the collector's to export: it judges the requests
        let out = Outputs {
            otlp: None,
            ..out.clone()
        };
        Ok(Ship {
            outlet: Outlet::new(&cfg, &out)?,
            probe: crate::probe::Probe::new(cfg),
            sender: Some(sender),
            observed: Vec::new(),
            last_stats: Instant::now(),
        })
    }

    fn ship(&mut self) {
        if self.last_stats.elapsed() >= Duration::from_secs(1) {
            self.last_stats = Instant::now();
            self.observed.push(crate::contract::Observation {
                t: self.probe.clock(),
                what: crate::contract::Obs::ProbeStats(self.stats()),
            });
            self.outlet.refresh(&self.probe.health, false);
        }
        let sender = self.sender.as_mut().expect("open until finish");
        for o in self.observed.drain(..) {
            sender.push(o);
        }
        sender.maybe_flush(self.probe.clock());
    }

    /// The probe's counters, as the collector gets them.
    fn stats(&self) -> crate::contract::ProbeStats {
        let h = &self.probe.health;
        let unsent = self.sender.as_ref().map_or(0, |s| {
            s.stats.unsent.load(std::sync::atomic::Ordering::Relaxed)
        });
        crate::contract::ProbeStats {
            packets: h.packets,
            bytes: h.bytes,
            drops: h.kernel_drops + h.if_drops,
            tcp_gap_bytes: h.tcp_gap_bytes,
            anomalies: h.total_anomalies(),
            evictions: h.evictions.values().sum(),
            unsent,
        }
    }

    /// End of input: every connection flushed and shipped, `probe.end` sent; waits for
    /// the sender to drain (bounded), writes `--metrics-out`.
    pub fn finish(&mut self, out: &Outputs) -> anyhow::Result<Report> {
        self.probe.finish(&mut self.observed);
        self.observed.push(crate::contract::Observation {
            t: self.probe.clock(),
            what: crate::contract::Obs::ProbeStats(self.stats()),
        });
        if let Some(mut sender) = self.sender.take() {
            for o in self.observed.drain(..) {
                sender.push(o);
            }
            let stats = sender.stats.clone();
            sender.close(self.probe.clock());
            let unsent = stats.unsent.load(std::sync::atomic::Ordering::Relaxed);
            let sent = stats.sent.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("stacktap: probe: {sent} observations sent, {unsent} not sent");
        }
        self.outlet.finish(out, &self.probe.health)
    }
}

impl Tap for Ship {
    fn packet(&mut self, pkt: &PacketRef<'_>) {
        self.probe.packet(pkt, &mut self.observed);
        self.ship();
    }
    fn tick(&mut self, now: crate::time::Ts) {
        self.probe.tick(now, &mut self.observed);
        self.ship();
    }
    fn source_stats(&mut self, st: &crate::source::SourceStats) {
        self.probe.health.source_stats(st);
    }
}

/// A run in one process: the pipeline (probe and analyser) and its outlet.
pub struct Run {
    pub pipeline: Pipeline,
    pub outlet: Outlet,
    /// What the threads of a threaded run left behind (nothing on one thread).
    pub retired: Retired,
}

/// What a threaded run leaves when its input ends: the shards' state (their tables and
/// the decode cache) and the helper threads, which have left their work but may still be
/// ending (the allocator's and the C library's end of a thread take most of a
/// millisecond). Neither is waited for when the input ends: the state is freed with the
/// run, or left to the kernel by `exit_unfreed`, and the threads are joined then.
#[derive(Default)]
pub struct Retired {
    /// Owned only to be freed (or not) with the run.
    state: Vec<Box<dyn Send>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Retired {
    pub fn keep(&mut self, state: impl Send + 'static) {
        self.state.push(Box::new(state));
    }

    pub fn thread(&mut self, ending: std::thread::JoinHandle<()>) {
        self.threads.push(ending);
    }

    /// Waits for the threads to end (a panic was reported when it happened).
    fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        self.join();
    }
}

impl Run {
    pub fn new(cfg: Config, out: &Outputs) -> anyhow::Result<Run> {
        let outlet = Outlet::new(&cfg, out)?;
        let mut pipeline = Pipeline::new(cfg);
        // spans need every wire detail of the events a request is made of
        if out.otlp.is_some() {
            pipeline.analyser.keep_events();
        }
        Ok(Run {
            outlet,
            pipeline,
            retired: Retired::default(),
        })
    }

    /// Never inlined (one call a packet costs nothing measurable): see `replay`.
    #[inline(never)]
    pub fn packet(&mut self, pkt: &PacketRef<'_>) {
        let sinks = &mut self.outlet.sinks;
        self.pipeline.packet(pkt, &mut |s| sinks.on_signal(&s));
        if self
            .pipeline
            .probe
            .health
            .packets
            .is_multiple_of(REFRESH_PACKETS)
        {
            self.refresh(false);
        }
    }

    pub fn tick(&mut self, now: crate::time::Ts) {
        let sinks = &mut self.outlet.sinks;
        self.pipeline.tick(now, &mut |s| sinks.on_signal(&s));
        self.refresh(false);
    }

    pub fn refresh(&mut self, force: bool) {
        let health = self.pipeline.health();
        self.outlet.refresh(&health, force);
    }

    /// The end of one pass over a capture: every connection closed, every open call and
    /// request reported, as at the end of input; the run goes on with later packets.
    pub fn end_pass(&mut self) {
        let sinks = &mut self.outlet.sinks;
        self.pipeline.finish(&mut |s| sinks.on_signal(&s));
        self.refresh(true);
    }

    /// End of input: flush everything, write the files, return the summary.
    pub fn finish(&mut self, out: &Outputs) -> anyhow::Result<Report> {
        self.end_pass();
        self.write_out(out)
    }

    /// The process is about to exit, its files written: the store is closed and the rest
    /// (request trees, call and flow tables: millions of small allocations, freed one by one
    /// from a thread that did not make them after `--threads`) is left to the kernel, which
    /// takes the whole address space back at once; so are the allocator's free pages. The
    /// retired threads are joined first: the allocator's end of the process must not run
    /// beside a thread's end.
    pub fn exit_unfreed(mut self) {
        if let Ok(mut r) = self.outlet.sinks.requests.lock() {
            r.close_store();
        }
        self.retired.join();
        std::mem::forget(self);
        crate::allocator::leave_free_pages_to_exit();
    }

    /// Writes the files and returns the summary of a run whose input has ended.
    pub fn write_out(&mut self, out: &Outputs) -> anyhow::Result<Report> {
        self.outlet.finish(out, &self.pipeline.health())
    }

    /// The probe's and the analyser's counters together.
    pub fn health(&self) -> Health {
        self.pipeline.health()
    }

    /// The sinks (metrics, summary, graph, requests).
    pub fn sinks(&self) -> &Sinks {
        &self.outlet.sinks
    }
}

/// Installs SIGINT/SIGTERM handlers that set the returned flag, and makes SIGHUP harmless.
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    // SIGHUP reloads what can be reloaded (the listener's TLS and credentials, see serve);
    // it must never end a run, listener or not
    let _ = signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    );
    flag
}

/// Replays capture files; `speed` > 0 paces packets by their timestamps. Never inlined,
/// nor is `Run::packet`: `scripts/stage-cost` takes the reading as this less that.
#[inline(never)]
pub fn replay(
    files: &mut MergedFiles,
    run: &mut impl Tap,
    speed: Option<f64>,
    out: &Outputs,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let total: u64 = files
        .files()
        .iter()
        .filter_map(|f| std::fs::metadata(f.path()).ok())
        .map(|m| m.len())
        .sum();
    let bar = (out.progress && total > 50 << 20).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let started = Instant::now();
    let mut first: Option<crate::time::Ts> = None;
    let mut n = 0u64;
    loop {
        let fed = files.next_with(|pkt| {
            if let Some(speed) = speed.filter(|s| *s > 0.0) {
                let t0 = *first.get_or_insert(pkt.ts);
                if !wait_until(started, pkt.ts.secs_since(t0) / speed, stop) {
                    return false;
                }
            }
            run.packet(&pkt);
            true
        })?;
        if fed != Some(true) {
            break;
        }
        n += 1;
        if n.is_multiple_of(8192) {
            if let Some(b) = &bar {
                b.set_position(files.bytes_read());
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for f in files.files() {
        if f.truncated {
            eprintln!(
                "stacktap: warning: {}: file ends in the middle of a packet (truncated capture)",
                f.path().display()
            );
        }
        for d in &f.damage {
            let after = match d.skipped {
                Some(n) => format!("skipped {n} bytes to the next readable record"),
                None => "nothing after it could be read".into(),
            };
            eprintln!(
                "stacktap: warning: {}: damaged at byte {}: {}; {after}",
                f.path().display(),
                d.offset,
                d.what
            );
        }
    }
    let damaged = files.files().iter().map(|f| f.damage.len() as u64).sum();
    run.source_stats(&crate::source::SourceStats {
        damaged_records: damaged,
        ..Default::default()
    });
    Ok(())
}

/// Sleeps until `due_s` seconds after `started`, in short steps so that Ctrl-C is not kept
/// waiting by a quiet stretch of the capture; false if stopped.
fn wait_until(started: Instant, due_s: f64, stop: &AtomicBool) -> bool {
    // beyond Duration's range (a tiny --speed): wait until stopped
    let due = Duration::try_from_secs_f64(due_s.max(0.0)).unwrap_or(Duration::MAX);
    loop {
        let left = due.saturating_sub(started.elapsed());
        if left.is_zero() {
            return true;
        }
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
}

/// Replays one capture over and over at `speed` (1 = real time) until stopped: the demo's
/// moving picture.
pub fn replay_loop(
    open: impl Fn() -> anyhow::Result<MergedFiles>,
    run: &mut Run,
    speed: f64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        replay_again(&mut open()?, run, Some(speed), stop)?;
    }
    Ok(())
}

/// Replays a capture as if its traffic happened again: shifted in time to start a second
/// after the newest packet so far, on a restarted pipeline (its ids repeat the last
/// pass's), ending like an input does (`end_pass`). `speed` paces it (1 = real time);
/// None: as fast as possible. Returns early, Ok, when `stop` is set.
pub fn replay_again(
    files: &mut MergedFiles,
    run: &mut Run,
    speed: Option<f64>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    run.pipeline.restart();
    if let Some(o) = run.outlet.sinks.otlp.as_mut() {
        o.next_pass();
    }
    let started = Instant::now();
    let start_at = run.pipeline.clock().0 + 1_000_000_000;
    let mut first: Option<crate::time::Ts> = None;
    loop {
        let fed = files.next_with(|mut pkt| {
            let t0 = *first.get_or_insert(pkt.ts);
            if let Some(speed) = speed
                && !wait_until(started, pkt.ts.secs_since(t0) / speed.max(1e-3), stop)
            {
                return false;
            }
            pkt.ts = crate::time::Ts(start_at + pkt.ts.0.saturating_sub(t0.0));
            run.packet(&pkt);
            true
        })?;
        match fed {
            None => break,
            Some(false) => return Ok(()),
            // paced packets are few: publish by the wall clock, not every 4096 packets
            Some(true) => run.refresh(false),
        }
    }
    run.end_pass();
    if first.is_none() {
        anyhow::bail!("the capture to replay again has no packets");
    }
    Ok(())
}

/// Captures live until stopped (or for `duration`).
pub fn capture(
    cap: &mut LiveCapture,
    run: &mut impl Tap,
    duration: Option<Duration>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Relaxed) && duration.is_none_or(|d| started.elapsed() < d) {
        match cap.read()? {
            LiveRead::Packet(pkt) => run.packet(&pkt),
            LiveRead::Idle(now) => run.tick(now),
        }
        if cap.last_read().saturating_duration_since(last_stats) >= Duration::from_secs(1) {
            last_stats = cap.last_read();
            run.source_stats(&cap.stats());
            run.tick(cap.settled());
        }
    }
    run.source_stats(&cap.stats());
    Ok(())
}

/// Blocks until SIGINT/SIGTERM (serving after a finished replay).
pub fn wait_for_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
}
