//! `stacktap collect`: receives the observations of many probes over OTLP/gRPC, joins
//! them on one packet clock (`merge`), and runs the same analyser and outlet as a single
//! process does (metrics, events, the store, the UI, `/api/*`, `rca --from`).
//!
//! The receiver runs on its own threads and hands each batch to the analysis thread
//! through a bounded channel: when the analysis falls behind, exports wait, and the
//! probes' own bounded buffers count what they drop. On SIGINT/SIGTERM everything held
//! is released, every open call and request judged, the outputs written.

use super::merge::{Merge, MergeConfig};
use super::wire;
use crate::analyser::Analyser;
use crate::config::Config;
use crate::contract::Observation;
use crate::health::Health;
use crate::run::{Outlet, Outputs};
use crate::serve::access::constant_time_eq;
use crate::sink::summary::Report;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Identity, Server, ServerTlsConfig};

#[derive(Debug, Clone)]
pub struct CollectConfig {
    /// Where probes send (OTLP/gRPC), e.g. 127.0.0.1:4317.
    pub ingest: String,
    /// TLS: the collector's certificate chain and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Probes must send `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Accept plaintext from other hosts (without TLS the collector otherwise listens on
    /// loopback only).
    pub plaintext_remote: bool,
    pub merge: MergeConfig,
}

/// One probe's batch, as received.
struct Batch {
    probe: String,
    host: Option<String>,
    obs: Vec<Observation>,
}

/// What the receiver counted.
#[derive(Default)]
struct IngestStats {
    rejected: AtomicU64,
    unauthenticated: AtomicU64,
}

struct Ingest {
    tx: tokio::sync::mpsc::Sender<Batch>,
    token: Option<String>,
    stats: Arc<IngestStats>,
}

#[tonic::async_trait]
impl LogsService for Ingest {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        if let Some(want) = &self.token {
            let got = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !got.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
                self.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
                return Err(tonic::Status::unauthenticated(
                    "a valid bearer token is required",
                ));
            }
        }
        let mut rejected = 0i64;
        let mut why = String::new();
        for rl in req.into_inner().resource_logs {
            let n: usize = rl.scope_logs.iter().map(|s| s.log_records.len()).sum();
            let sender = match wire::sender_of(rl.resource.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    rejected += n as i64;
                    why = e.to_string();
                    continue;
                }
            };
            let mut obs = Vec::with_capacity(n);
            for rec in rl.scope_logs.iter().flat_map(|s| &s.log_records) {
                match wire::decode(rec) {
                    Ok(o) => obs.push(o),
                    Err(e) => {
                        rejected += 1;
                        why = e.to_string();
                    }
                }
            }
            let batch = Batch {
                probe: sender.probe,
                host: sender.host,
                obs,
            };
            if self.tx.send(batch).await.is_err() {
                return Err(tonic::Status::unavailable("the collector is stopping"));
            }
        }
        if rejected > 0 {
            self.stats
                .rejected
                .fetch_add(rejected as u64, Ordering::Relaxed);
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: (rejected > 0).then_some(ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: why,
            }),
        }))
    }
}

/// Binds the OTLP/gRPC receiver on its own thread; returns the bound address.
fn spawn_receiver(
    cc: &CollectConfig,
    tx: tokio::sync::mpsc::Sender<Batch>,
    stats: Arc<IngestStats>,
) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = cc
        .ingest
        .parse()
        .map_err(|e| anyhow::anyhow!("--ingest {}: {e}", cc.ingest))?;
    if cc.tls.is_none() && !addr.ip().is_loopback() && !cc.plaintext_remote {
        anyhow::bail!(
            "--ingest {addr}: observations carry request ids and fault messages; off \
             loopback give --tls-cert/--tls-key (or --ingest-plaintext to accept it)"
        );
    }
    let tls = match &cc.tls {
        Some((cert, key)) => {
            let read = |p: &PathBuf, flag: &str| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
            };
            let id = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
            Some(ServerTlsConfig::new().identity(id))
        }
        None => None,
    };
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--ingest {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let service = LogsServiceServer::new(Ingest {
        tx,
        token: cc.token.clone(),
        stats,
    })
    .accept_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(64 << 20);
    std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let mut server = Server::builder();
                if let Some(tls) = tls {
                    server = match server.tls_config(tls) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!("ingest: TLS: {e}");
                            return;
                        }
                    };
                }
                if let Err(e) = server
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!("ingest stopped: {e}");
                }
            });
        })?;
    Ok(bound)
}

/// Runs until `stop`: receives, merges, analyses; then judges what is open and writes.
pub fn run(
    cfg: Config,
    out: &Outputs,
    cc: CollectConfig,
    stop: &AtomicBool,
) -> anyhow::Result<Report> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(256);
    let stats = Arc::new(IngestStats::default());
    let bound = spawn_receiver(&cc, tx, stats.clone())?;
    eprintln!(
        "stacktap: collecting from probes on {}://{bound} (OTLP/gRPC)",
        if cc.tls.is_some() { "https" } else { "http" }
    );
    let mut outlet = Outlet::new(&cfg, out)?;
    let mut analyser = Analyser::new(cfg);
    if out.otlp.is_some() {
        analyser.keep_events();
    }
    let mut merge = Merge::new(cc.merge.clone());
    let mut released = Vec::new();
    let health = |analyser: &Analyser, merge: &Merge, stats: &IngestStats| {
        let mut h: Health = analyser.health.clone();
        // what the probes read, for the summary's first line
        for p in merge.probes() {
            h.packets += p.stats.packets;
            h.bytes += p.stats.bytes;
            h.tcp_gap_bytes += p.stats.tcp_gap_bytes;
            h.kernel_drops += p.stats.drops;
        }
        let rejected = stats.rejected.load(Ordering::Relaxed);
        if rejected > 0 {
            h.anomalies
                .insert(("fleet", "rejected_observation"), rejected);
        }
        h
    };
    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        while let Ok(b) = rx.try_recv() {
            merge.ingest(&b.probe, b.host.as_deref(), b.obs, Instant::now());
            got = true;
        }
        let reached = merge.release(Instant::now(), &mut released);
        feed(&mut analyser, &mut outlet, &mut released, reached);
        if last_refresh.elapsed() >= Duration::from_millis(500) {
            last_refresh = Instant::now();
            outlet.sinks.metrics.sync_probes(merge.probes());
            outlet.set_probes(merge.probes());
            outlet.refresh(&health(&analyser, &merge, &stats), false);
        }
        if !got {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // the end: what the probes sent so far, all of it
    rx.close();
    while let Ok(b) = rx.try_recv() {
        merge.ingest(&b.probe, b.host.as_deref(), b.obs, Instant::now());
    }
    let reached = merge.drain(&mut released);
    feed(&mut analyser, &mut outlet, &mut released, reached);
    let sinks = &mut outlet.sinks;
    analyser.finish(&mut |s| sinks.on_signal(&s));
    outlet.sinks.metrics.sync_probes(merge.probes());
    outlet.finish(out, &health(&analyser, &merge, &stats))
}

/// Released observations into the analyser (each at its own time), then the clock on to
/// what every probe has passed.
fn feed(
    analyser: &mut Analyser,
    outlet: &mut Outlet,
    released: &mut Vec<Observation>,
    reached: Option<crate::time::Ts>,
) {
    for mut o in released.drain(..) {
        analyser.observe(&mut o);
    }
    if let Some(t) = reached {
        analyser.advance(t);
    }
    let sinks = &mut outlet.sinks;
    analyser.flush(&mut |s| sinks.on_signal(&s));
}
