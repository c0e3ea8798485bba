//! The probe's side of the fleet: observations batched and shipped to a collector over
//! OTLP/gRPC (gzip), on a thread of their own. The capture never waits for the network:
//! batches go into a bounded buffer, and when it is full the batch is dropped and
//! counted (`unsent`, reported to the collector with the probe's stats). A failing send is
//! retried with backoff while the buffer holds; TLS (`https://`) and a bearer token
//! protect the observations' request ids and fault messages on the way.

use super::wire::{self, Sender as WireSender};
use crate::contract::{Obs, Observation};
use crate::time::Ts;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// `http://host:4317` or `https://host:4317`.
    pub collector: String,
    pub probe: String,
    pub host: Option<String>,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// A PEM CA to trust for `https://` (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Observations per batch, at most.
    pub max_batch: usize,
    /// A batch goes out at least this often (wall time).
    pub flush_every: Duration,
    /// Batches waiting to be sent, at most; more are dropped and counted.
    pub max_queued_batches: usize,
    /// How long `close` waits for what is queued to go out.
    pub close_timeout: Duration,
}

impl SenderConfig {
    pub fn new(collector: &str, probe: &str) -> SenderConfig {
        SenderConfig {
            collector: collector.to_string(),
            probe: probe.to_string(),
            host: hostname(),
            token: None,
            ca_file: None,
            max_batch: 2048,
            flush_every: Duration::from_millis(200),
            max_queued_batches: 512,
            close_timeout: Duration::from_secs(30),
        }
    }
}

/// The machine's host name (`/proc/sys/kernel/hostname`), for the resource.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// What the sending thread has done, for the probe's own metrics.
#[derive(Debug, Default)]
pub struct SendStats {
    pub sent: AtomicU64,
    pub unsent: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Sender {
    batch: Vec<Observation>,
    last_flush: Instant,
    cfg: SenderConfig,
    queue: tokio::sync::mpsc::Sender<Vec<Observation>>,
    pub stats: Arc<SendStats>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Sender {
    /// Starts the sending thread. The collector need not be up: it is connected to when
    /// the first batch goes, and again after every failure.
    pub fn start(cfg: SenderConfig) -> anyhow::Result<Sender> {
        let endpoint = endpoint(&cfg)?;
        let token = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<_>>()
                    .map_err(|_| anyhow::anyhow!("--collector-token: not a valid header value"))?,
            ),
            None => None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.max_queued_batches.max(1));
        let stats = Arc::new(SendStats::default());
        let who = WireSender {
            probe: cfg.probe.clone(),
            host: cfg.host.clone(),
        };
        let worker = {
            let stats = stats.clone();
            let close_timeout = cfg.close_timeout;
            std::thread::Builder::new()
                .name("collector-sender".into())
                .spawn(move || send_loop(endpoint, token, who, rx, stats, close_timeout))?
        };
        Ok(Sender {
            batch: Vec::with_capacity(cfg.max_batch),
            last_flush: Instant::now(),
            cfg,
            queue: tx,
            stats,
            worker: Some(worker),
        })
    }

    /// One observation; the batch goes when full or due.
    pub fn push(&mut self, o: Observation) {
        let t = o.t;
        self.batch.push(o);
        if self.batch.len() >= self.cfg.max_batch {
            self.flush(t);
        }
    }

    /// Sends the batch if it is due (wall time), with the probe's clock so that the
    /// collector's watermark moves on a quiet link.
    pub fn maybe_flush(&mut self, clock: Ts) {
        if self.last_flush.elapsed() >= self.cfg.flush_every {
            self.flush(clock);
        }
    }

    /// Sends what is batched, ending with a tick at `clock`; never waits.
    pub fn flush(&mut self, clock: Ts) {
        self.last_flush = Instant::now();
        self.batch.push(Observation {
            t: clock,
            what: Obs::Tick,
        });
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(self.cfg.max_batch));
        let n = batch.len() as u64;
        if self.queue.try_send(batch).is_err() {
            self.stats.unsent.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// End of input: what is batched goes, then `probe.end`; waits (at most the close
    /// timeout) for the queue to drain.
    pub fn close(mut self, clock: Ts) {
        self.batch.push(Observation {
            t: clock,
            what: Obs::End,
        });
        self.flush(clock);
        let Sender { queue, worker, .. } = self;
        drop(queue);
        if let Some(w) = worker {
            let _ = w.join();
        }
    }
}

fn endpoint(cfg: &SenderConfig) -> anyhow::Result<Endpoint> {
    let url = &cfg.collector;
    let mut e = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("--collector {url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("--collector-ca {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        e = e
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("--collector {url}: {e}"))?;
    } else if !url.starts_with("http://") {
        anyhow::bail!("--collector {url}: expected http://HOST:PORT or https://HOST:PORT");
    }
    Ok(e)
}

type Token = Option<MetadataValue<tonic::metadata::Ascii>>;

fn send_loop(
    endpoint: Endpoint,
    token: Token,
    who: WireSender,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Observation>>,
    stats: Arc<SendStats>,
    close_timeout: Duration,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("collector sender: no runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let channel = endpoint.connect_lazy();
        let mut failing = false;
        let mut closing_since: Option<Instant> = None;
        while let Some(batch) = rx.recv().await {
            if rx.is_closed() && closing_since.is_none() {
                closing_since = Some(Instant::now());
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                match send(&channel, &token, &who, &batch).await {
                    Ok(rejected) => {
                        // the collector could not read some: sending them again would not help
                        stats.unsent.fetch_add(rejected, Ordering::Relaxed);
                        stats
                            .sent
                            .fetch_add(batch.len() as u64 - rejected.min(batch.len() as u64), Ordering::Relaxed);
                        if failing {
                            tracing::info!("collector {}: sending again", endpoint.uri());
                            failing = false;
                        }
                        break;
                    }
                    Err(e) => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                        if !failing {
                            tracing::warn!(
                                "collector {}: {e}; retrying with backoff (observations are dropped, and counted, while the buffer is full)",
                                endpoint.uri()
                            );
                            failing = true;
                        }
                        let give_up = closing_since.is_some_and(|s| s.elapsed() > close_timeout);
                        if give_up {
                            stats.unsent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                            break;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    });
}

/// One export; Ok: how many observations the collector rejected (could not read).
async fn send(
    channel: &Channel,
    token: &Token,
    who: &WireSender,
    batch: &[Observation],
) -> Result<u64, tonic::Status> {
    let mut client = LogsServiceClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let mut req = tonic::Request::new(wire::encode_batch(who, batch));
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", t.clone());
    }
    let resp = client.export(req).await?;
    match resp.into_inner().partial_success {
        Some(p) if p.rejected_log_records > 0 => {
            tracing::warn!(
                "the collector rejected {} observations: {}",
                p.rejected_log_records,
                p.error_message
            );
            Ok(p.rejected_log_records as u64)
        }
        _ => Ok(0),
    }
}
