//! The `stacktap` command line (DESIGN.md's CLI contract).

use clap::{Parser, Subcommand};

// The pipeline allocates many small, short-lived strings per message; mimalloc halves the
// allocator's share of a replay compared with glibc malloc.
#[global_allocator]
static GLOBAL: stacktap::allocator::Mimalloc = stacktap::allocator::Mimalloc;

use stacktap::config::Config;
use stacktap::parallel::{self, Parallel};
use stacktap::run::{self, Outputs, Run};
use stacktap::source::file::{MergedFiles, PcapFile};
use stacktap::source::live::{DEFAULT_FILTER, LiveCapture};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Keeps the kernel from backing the heap with transparent huge pages. mimalloc asks for
/// them (MADV_HUGEPAGE) and hands memory it has not used for a second back to the kernel
/// in 64 KiB pieces; on a sidecar's steady churn each returned piece split a huge page, and
/// the next allocation there made the kernel zero 2 MiB again (`perf`: nearly half of live
/// capture's CPU was `clear_page_erms`). With 4 KiB pages a refault zeroes 4 KiB, and RSS
/// is smaller too. mimalloc's own switch (MIMALLOC_ALLOW_THP) is read before `main`, so
/// the process-wide prctl is the one that still applies here; it overrides the madvise.
fn without_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag on this process
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[derive(Parser)]
#[command(
    name = "stacktap",
    version = VERSION,
    about = "OpenStack RPC and REST, rebuilt from packets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as text or as one JSON object per line (journald, ELK); the level and
    /// targets come from RUST_LOG (default: info)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The version and the commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STACKTAP_COMMIT"),
    ")"
);

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Serve /metrics and /api/* on this address (e.g. 127.0.0.1:9465)
    #[arg(long)]
    listen: Option<String>,
    /// Let --listen bind off loopback: what it serves names requests, hosts and faults
    #[arg(long)]
    allow_remote: bool,
    /// Write one JSON event per line ("-" for stdout)
    #[arg(long)]
    events_out: Option<PathBuf>,
    /// Write the final Prometheus exposition to this file
    #[arg(long)]
    metrics_out: Option<PathBuf>,
    /// TOML file with caps, windows and ports
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the summary as JSON instead of text
    #[arg(long)]
    json: bool,
    /// Keep error chains and request trees in this SQLite file (read back on restart)
    #[arg(long)]
    store: Option<PathBuf>,
    /// Export every request as OTLP spans to this endpoint (http://HOST:4317 gRPC,
    /// http://HOST:4318/v1/traces HTTP/protobuf); the OTEL_EXPORTER_OTLP_* variables and
    /// [otlp] in --config work too
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Threads the per-connection work (decoding, reassembly, AMQP, HTTP, oslo) is sharded
    /// over, by connection, joined in one analyser; the output is the same for any number
    /// (default: the machine's cores; 1: all in one thread)
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
}

impl Common {
    fn threads(&self) -> usize {
        self.threads
            .map(usize::from)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// Shipping observations to a collector instead of analysing here.
#[derive(clap::Args, Clone)]
struct ToCollector {
    /// Ship observations to this collector (http://HOST:4317 or https://HOST:4317) instead
    /// of analysing here
    #[arg(long)]
    collector: Option<String>,
    /// This probe's name at the collector (default: the host name for capture, the first
    /// file's name for replay)
    #[arg(long, requires = "collector")]
    probe_name: Option<String>,
    /// A bearer token the collector requires (or STACKTAP_COLLECTOR_TOKEN)
    #[arg(
        long,
        requires = "collector",
        env = "STACKTAP_COLLECTOR_TOKEN",
        hide_env_values = true
    )]
    collector_token: Option<String>,
    /// A PEM CA certificate to trust for an https:// collector
    #[arg(long, requires = "collector")]
    collector_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the graph UI on the bundled failure sample, replayed in a loop
    Demo {
        #[arg(long, default_value = "127.0.0.1:9465")]
        listen: String,
        /// Pace of the looping replay (1 = real time)
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Export the demo's requests as OTLP spans to this endpoint (see replay)
        #[arg(long)]
        otlp_endpoint: Option<String>,
        /// Let --listen bind off loopback
        #[arg(long)]
        allow_remote: bool,
    },
    /// Replay pcap/pcapng files (several are merged in time order)
    Replay {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Pace packets by their timestamps (1 = real time)
        #[arg(long)]
        speed: Option<f64>,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        fleet: ToCollector,
    },
    /// Root causes of failing user requests: on captures, or a running stacktap (--from)
    Rca {
        /// Capture files to analyse
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        files: Vec<PathBuf>,
        /// A running stacktap's address, e.g. http://127.0.0.1:9465
        #[arg(long)]
        from: Option<String>,
        /// Print this request's tree, the failing path and root cause marked
        #[arg(long)]
        request_id: Option<String>,
        /// Only failures in the last DUR (30s, 15m, 1h, 2d) before the newest packet
        #[arg(long)]
        since: Option<String>,
        /// JSON instead of text
        #[arg(long)]
        json: bool,
        /// TOML file with caps, windows and ports
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write the man pages (stacktap.1 and one per command) into DIR, for packages
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Capture live from an interface (a sidecar on a broker or API node)
    Capture {
        #[arg(short = 'i', long = "interface")]
        interface: String,
        /// BPF filter (default: AMQP and the OpenStack API ports)
        #[arg(long)]
        filter: Option<String>,
        /// Stop after this many seconds (default: until SIGINT/SIGTERM)
        #[arg(long)]
        duration: Option<f64>,
        /// The kernel's capture ring in MiB (default: [capture] buffer_mb, 64)
        #[arg(long)]
        buffer_size: Option<usize>,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        fleet: ToCollector,
    },
    /// Collect from a fleet of probes: join their observations and analyse them
    Collect {
        /// Where probes send their observations (OTLP/gRPC)
        #[arg(long, default_value = "127.0.0.1:4317")]
        ingest: String,
        /// TLS certificate chain for the ingest port (PEM)
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key for the ingest port (PEM)
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Probes must present this bearer token (or STACKTAP_COLLECTOR_TOKEN)
        #[arg(long, env = "STACKTAP_COLLECTOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Accept plaintext observations from other hosts (without TLS the ingest port
        /// is loopback-only otherwise)
        #[arg(long)]
        ingest_plaintext: bool,
        #[command(flatten)]
        common: Common,
    },
}

/// The demo's capture: the failure sample (recorded by sampledata/generator against real
/// oslo.messaging and real WSGI services), with error chains to follow.
const DEMO_SAMPLE: (&str, &[u8]) = (
    "failures.pcap",
    include_bytes!("../sampledata/failures.pcap"),
);

/// The demo graph's default window: a minute, so that its numbers move as it loops.
const DEMO_WINDOW_S: f64 = 60.0;

fn demo_files() -> anyhow::Result<MergedFiles> {
    let (name, bytes) = DEMO_SAMPLE;
    let file = PcapFile::from_reader(Path::new(name), Box::new(std::io::Cursor::new(bytes)))?;
    Ok(MergedFiles::new(vec![file])?)
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

fn print_report(report: &stacktap::sink::summary::Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        // what came off the wire never drives the terminal
        print!("{}", stacktap::text::printable_text(&report.to_text(15)));
    }
    Ok(())
}

/// The sender's settings when `--collector` is given (None: analyse here).
fn shipping(
    fleet: &ToCollector,
    common: &Common,
    default_name: impl FnOnce() -> String,
) -> anyhow::Result<Option<stacktap::fleet::sender::SenderConfig>> {
    let Some(url) = &fleet.collector else {
        return Ok(None);
    };
    if common.events_out.is_some() || common.store.is_some() || common.otlp_endpoint.is_some() {
        anyhow::bail!(
            "--collector: the analysis (--events-out, --store, --otlp-endpoint) happens at the \
             collector; a probe keeps only its own health (--listen, --metrics-out)"
        );
    }
    let name = fleet.probe_name.clone().unwrap_or_else(default_name);
    let mut to = stacktap::fleet::sender::SenderConfig::new(url, &name);
    to.token = fleet.collector_token.clone();
    to.ca_file = fleet.collector_ca.clone();
    Ok(Some(to))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "replay".into())
}

/// `--config`, with what the common flags say over it.
fn common_config(c: &Common) -> anyhow::Result<Config> {
    let mut cfg = load_config(&c.config)?;
    cfg.listen.allow_remote |= c.allow_remote;
    Ok(cfg)
}

fn outputs(c: &Common, cfg: &Config, source: String) -> anyhow::Result<Outputs> {
    Ok(Outputs {
        source,
        listen: c.listen.clone(),
        events_out: c.events_out.clone(),
        metrics_out: c.metrics_out.clone(),
        progress: std::io::stderr().is_terminal(),
        graph_window_s: None,
        store: c.store.clone(),
        otlp: otlp(cfg, c.otlp_endpoint.as_deref())?,
        config: c.config.clone(),
    })
}

/// Where spans go: the flag, else the OTEL_EXPORTER_OTLP_* variables, else `[otlp]`.
fn otlp(
    cfg: &Config,
    flag: Option<&str>,
) -> anyhow::Result<Option<stacktap::otlp::config::Export>> {
    cfg.otlp.resolve(flag, &|name| std::env::var(name).ok())
}

fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let stop = run::stop_flag();
    match cli.cmd {
        Cmd::Demo {
            listen,
            speed,
            otlp_endpoint,
            allow_remote,
        } => {
            announce("demo", None, Some(&listen));
            let mut cfg = Config::default();
            cfg.listen.allow_remote = allow_remote;
            let out = Outputs {
                listen: Some(listen.clone()),
                graph_window_s: Some(DEMO_WINDOW_S),
                otlp: otlp(&Config::default(), otlp_endpoint.as_deref())?,
                source: format!("demo: {} replayed in a loop", DEMO_SAMPLE.0),
                ..Default::default()
            };
            let mut run = Run::new(cfg, &out)?;
            // once at full speed, so that the first picture is complete
            run::replay(&mut demo_files()?, &mut run, None, &out, &stop)?;
            run.end_pass();
            print_report(&run.sinks().report(&run.health()), false)?;
            eprintln!(
                "stacktap: demo: open http://{listen}/ ({} again and again at {speed}× real \
                 time; Ctrl-C stops)",
                DEMO_SAMPLE.0
            );
            run::replay_loop(demo_files, &mut run, speed, &stop)?;
        }
        Cmd::Replay {
            files,
            speed,
            common,
            fleet,
        } => {
            // a batch replay keeps stderr for its one-line errors; a serving one announces
            if common.listen.is_some() {
                let what = format!("replay of {} file(s)", files.len());
                announce(&what, common.config.as_deref(), common.listen.as_deref());
            }
            let cfg = common_config(&common)?;
            let names: Vec<String> = files.iter().map(|f| file_name(f)).collect();
            let mut out = outputs(&common, &cfg, format!("replay of {}", names.join(", ")))?;
            // a file can wait for the backend: a replay exports every span
            if let Some(x) = out.otlp.as_mut() {
                x.wait_when_full = true;
            }
            let mut merged = MergedFiles::open(&files)?;
            if let Some(to) = shipping(&fleet, &common, || file_name(&files[0]))? {
                let mut ship = run::Ship::new(cfg, &out, to)?;
                run::replay(&mut merged, &mut ship, speed, &out, &stop)?;
                ship.finish(&out)?;
                return Ok(());
            }
            let run = Run::new(cfg, &out)?;
            let (run, report) =
                parallel::replay(run, common.threads(), &mut merged, speed, &out, &stop)?;
            print_report(&report, common.json)?;
            if out.listen.is_some() && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!("stacktap: replay done; serving until Ctrl-C");
                run::wait_for_stop(&stop);
            }
            run.exit_unfreed();
        }
        Cmd::Capture {
            interface,
            filter,
            duration,
            buffer_size,
            common,
            fleet,
        } => {
            let what = format!("capture on {interface}");
            announce(&what, common.config.as_deref(), common.listen.as_deref());
            let mut cfg = common_config(&common)?;
            if let Some(mb) = buffer_size {
                cfg.capture.buffer_mb = mb;
                cfg.validate()
                    .map_err(|e| anyhow::anyhow!("--buffer-size: {e}"))?;
            }
            let out = Outputs {
                graph_window_s: Some(cfg.requests.graph_window_s),
                ..outputs(&common, &cfg, format!("capture on {interface}"))?
            };
            let mut cap = LiveCapture::open(
                &interface,
                filter.as_deref().unwrap_or(DEFAULT_FILTER),
                &cfg.capture,
            )?;
            let duration = duration.map(std::time::Duration::from_secs_f64);
            let host = || stacktap::fleet::sender::hostname().unwrap_or_else(|| interface.clone());
            if let Some(to) = shipping(&fleet, &common, host)? {
                let mut ship = run::Ship::new(cfg, &out, to)?;
                eprintln!(
                    "stacktap: capturing on {interface}, shipping to {}",
                    fleet.collector.as_deref().unwrap_or("")
                );
                run::capture(&mut cap, &mut ship, duration, &stop)?;
                ship.finish(&out)?;
                return Ok(());
            }
            let mut run = Run::new(cfg, &out)?;
            eprintln!("stacktap: capturing on {interface}");
            if common.threads() > 1 {
                let mut par = Parallel::new(run, common.threads(), true)?;
                run::capture(&mut cap, &mut par, duration, &stop)?;
                run = par.finish()?;
                print_report(&run.write_out(&out)?, common.json)?;
            } else {
                run::capture(&mut cap, &mut run, duration, &stop)?;
                print_report(&run.finish(&out)?, common.json)?;
            }
        }
        Cmd::Collect {
            ingest,
            tls_cert,
            tls_key,
            token,
            ingest_plaintext,
            common,
        } => {
            let what = format!("collector, probes in on {ingest}");
            announce(&what, common.config.as_deref(), common.listen.as_deref());
            let cfg = common_config(&common)?;
            let out = Outputs {
                graph_window_s: Some(cfg.requests.graph_window_s),
                ..outputs(&common, &cfg, format!("collector, probes on {ingest}"))?
            };
            let cc = stacktap::fleet::collector::CollectConfig {
                ingest,
                tls: tls_cert.zip(tls_key),
                token,
                plaintext_remote: ingest_plaintext,
                merge: cfg.fleet.clone(),
            };
            let report = stacktap::fleet::collector::run(cfg, &out, cc, &stop)?;
            print_report(&report, common.json)?;
        }
        Cmd::Rca {
            files,
            from,
            request_id,
            since,
            json,
            config,
        } => rca(files, from, request_id, since, json, config)?,
        Cmd::Manpages { dir } => manpages(&dir)?,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "stacktap", &mut std::io::stdout());
        }
    }
    Ok(())
}

/// The man pages, generated from the command line's own definitions so they never drift.
fn manpages(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
}

/// `stacktap rca`: on capture files (replayed here) or on a running stacktap's API.
fn rca(
    files: Vec<PathBuf>,
    from: Option<String>,
    request_id: Option<String>,
    since: Option<String>,
    json: bool,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    use stacktap::rca::{fetch, parse_duration, render_report, render_tree, shell_word};
    let since = since.as_deref().map(parse_duration).transpose()?;
    // what names this input again, for the example command the report prints
    let mut input: Vec<String> = match &from {
        Some(base) => vec!["--from".into(), shell_word(base)],
        None => files
            .iter()
            .map(|f| shell_word(&f.to_string_lossy()))
            .collect(),
    };
    if let Some(c) = &config {
        input.extend(["--config".into(), shell_word(&c.to_string_lossy())]);
    }
    let input = input.join(" ");
    if let Some(base) = from {
        if let Some(id) = request_id {
            let body = fetch(&base, &format!("/api/requests/{id}"))?;
            let tree: stacktap::api::Tree = serde_json::from_str(&body)
                .map_err(|e| anyhow::anyhow!("--from {base}: bad answer: {e}"))?;
            print_rca(json, &tree, || render_tree(&tree))?;
        } else {
            let q = since.map(|s| format!("?since={s}")).unwrap_or_default();
            let body: serde_json::Value =
                serde_json::from_str(&fetch(&base, &format!("/api/chains{q}"))?)
                    .map_err(|e| anyhow::anyhow!("--from {base}: bad answer: {e}"))?;
            let report: stacktap::api::RcaReport = serde_json::from_value(body["rca"].clone())
                .map_err(|e| anyhow::anyhow!("--from {base}: bad answer: {e}"))?;
            print_rca(json, &report, || render_report(&report, &input))?;
        }
        return Ok(());
    }
    let cfg = load_config(&config)?;
    let out = Outputs::default();
    let mut merged = MergedFiles::open(&files)?;
    let mut run = Run::new(cfg, &out)?;
    if let Some(id) = &request_id {
        run.sinks().requests.lock().expect("requests").pin(id);
    }
    let stop = run::stop_flag();
    run::replay(&mut merged, &mut run, None, &out, &stop)?;
    run.finish(&out)?;
    let requests = run.sinks().requests.lock().expect("requests");
    match request_id {
        Some(id) => {
            let tree = requests.tree(&id).ok_or_else(|| {
                anyhow::anyhow!("--request-id {id}: no such request in the capture")
            })?;
            print_rca(json, &tree, || render_tree(&tree))?;
        }
        None => {
            let from = match (since, requests.latest()) {
                (Some(d), Some(latest)) => latest - d,
                _ => f64::MIN,
            };
            let report = requests.rca(from);
            print_rca(json, &report, || render_report(&report, &input))?;
        }
    }
    Ok(())
}

/// The one line every service logs when it starts: what runs, from which build, with which config, and
/// where it listens.
fn announce(what: &str, config: Option<&Path>, listen: Option<&str>) {
    let config = config.map_or("built-in defaults".to_string(), |p| p.display().to_string());
    let listen = listen.map_or("no HTTP listener".to_string(), |l| format!("HTTP on {l}"));
    tracing::info!("stacktap {VERSION}: {what}; config: {config}; {listen}");
}

/// Logs to stderr, filtered by RUST_LOG (default info), as text or JSON lines.
fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn print_rca<T: serde::Serialize + ?Sized>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", stacktap::text::printable_text(&text()));
    }
    Ok(())
}

fn main() -> ExitCode {
    without_huge_pages();
    let cli = Cli::parse(); // usage errors exit 2
    init_logs(cli.log_format);
    match main_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = format!("{e:#}");
            eprintln!("stacktap: error: {}", stacktap::text::printable(&e));
            ExitCode::from(1)
        }
    }
}
