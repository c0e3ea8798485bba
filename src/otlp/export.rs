//! Spans out: a thread of their own, a bounded queue, batches, OTLP/gRPC or
//! OTLP/HTTP-protobuf, retries with backoff. The analysis never waits: spans that do not
//! fit the queue, and batches the backend refused or never took after every attempt, are
//! dropped and counted (`stacktap_otlp_spans_dropped_total`) with a warning.

use super::config::{Export, Protocol};
use super::spans::{Built, Peer, attr};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the exporter has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Exporter {
    queue: Option<mpsc::UnboundedSender<Vec<Built>>>,
    /// Spans handed over and not yet exported or dropped.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    pub stats: Arc<ExportStats>,
    warned_full: AtomicBool,
    closing: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// Starts the exporting thread. The backend need not be up: it is connected to when
    /// the first batch goes, and again after every failure.
    pub fn start(export: Export) -> anyhow::Result<Exporter> {
        let target = Target::new(&export)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ExportStats::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        let worker = {
            let w = Worker {
                channel: None,
                target,
                export: export.clone(),
                stats: stats.clone(),
                queued: queued.clone(),
                failing: false,
                closing: closing.clone(),
                close_deadline: None,
            };
            std::thread::Builder::new()
                .name("otlp-export".into())
                .spawn(move || run(w, rx))?
        };
        tracing::info!("exporting spans to {} ({:?})", export.url, export.protocol);
        Ok(Exporter {
            queue: Some(tx),
            queued,
            max_queued: export.max_queue_spans,
            stats,
            warned_full: AtomicBool::new(false),
            closing,
            worker: Some(worker),
        })
    }

    /// Hands spans over; never waits. Past the queue's bound they are dropped, counted.
    pub fn push(&self, spans: Vec<Built>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        if self.queued.load(Ordering::Relaxed) + n > self.max_queued {
            self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
            if !self.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "OTLP export queue full ({} spans): spans are dropped and counted in stacktap_otlp_spans_dropped_total",
                    self.max_queued
                );
            }
            return;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        if let Some(q) = &self.queue
            && q.send(spans).is_err()
        {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Everything queued goes out (at most one export timeout more if the backend is
    /// answering; at once, counted as dropped, if it is not), then the thread ends.
    pub fn close(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        self.queue = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.close();
    }
}

/// Where requests go.
enum Target {
    Grpc {
        endpoint: Box<tonic::transport::Endpoint>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        agent: ureq::Agent,
    },
}

impl Target {
    fn new(x: &Export) -> anyhow::Result<Target> {
        let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("OTLP endpoint {}: {e}", x.url);
        match x.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(x.url.clone())
                    .map_err(|e| at(&e))?
                    .connect_timeout(x.timeout)
                    .timeout(x.timeout);
                if x.url.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(ca) = &x.certificate {
                        let pem = std::fs::read(ca).map_err(|e| {
                            anyhow::anyhow!("OTLP certificate {}: {e}", ca.display())
                        })?;
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint.tls_config(tls).map_err(|e| at(&e))?;
                }
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &x.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|_| {
                            anyhow::anyhow!("OTLP header {k:?}: not a valid gRPC metadata key")
                        })?;
                    let value = v.parse().map_err(|_| {
                        anyhow::anyhow!("OTLP header {k:?}: its value is not valid")
                    })?;
                    metadata.insert(key, value);
                }
                Ok(Target::Grpc {
                    endpoint: Box::new(endpoint),
                    metadata,
                })
            }
            Protocol::HttpProtobuf => {
                let mut tls = ureq::tls::TlsConfig::builder();
                if let Some(ca) = &x.certificate {
                    let pem = std::fs::read(ca)
                        .map_err(|e| anyhow::anyhow!("OTLP certificate {}: {e}", ca.display()))?;
                    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                        .filter_map(|i| match i {
                            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                            _ => None,
                        })
                        .collect();
                    if certs.is_empty() {
                        anyhow::bail!(
                            "OTLP certificate {}: no PEM certificate in it",
                            ca.display()
                        );
                    }
                    tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
                }
                let agent = ureq::Agent::config_builder()
                    .timeout_global(Some(x.timeout))
                    .http_status_as_error(false)
                    .tls_config(tls.build())
                    .build()
                    .into();
                Ok(Target::Http { agent })
            }
        }
    }
}

/// Why an export did not go through.
enum Failure {
    /// Worth another attempt (unreachable, overloaded, timed out).
    Retry(String),
    /// The backend refused the request: sending it again would not help.
    Refused(String),
}

fn run(mut w: Worker, mut rx: mpsc::UnboundedReceiver<Vec<Built>>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("OTLP export: no runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        // a lazy channel needs the runtime: made here
        if let Target::Grpc { endpoint, .. } = &w.target {
            w.channel = Some(endpoint.connect_lazy());
        }
        let mut batch: Vec<Built> = Vec::new();
        let mut due = Instant::now() + w.export.flush_interval;
        loop {
            let wait = due.saturating_duration_since(Instant::now());
            tokio::select! {
                got = rx.recv() => match got {
                    Some(spans) => {
                        batch.extend(spans);
                        while batch.len() >= w.export.max_batch_spans {
                            let rest = batch.split_off(w.export.max_batch_spans);
                            w.send(std::mem::replace(&mut batch, rest)).await;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {
                    if !batch.is_empty() {
                        w.send(std::mem::take(&mut batch)).await;
                    }
                    due = Instant::now() + w.export.flush_interval;
                }
            }
        }
        for chunk in batch.chunks(w.export.max_batch_spans) {
            w.send(chunk.to_vec()).await;
        }
    });
}

struct Worker {
    target: Target,
    channel: Option<tonic::transport::Channel>,
    export: Export,
    stats: Arc<ExportStats>,
    queued: Arc<AtomicUsize>,
    /// The last attempt failed (warned once per failing stretch).
    failing: bool,
    /// The run is ending: what is left gets one attempt, within one export timeout, and
    /// none if the backend is not answering.
    closing: Arc<AtomicBool>,
    close_deadline: Option<Instant>,
}

impl Worker {
    /// One batch, attempted up to `max_attempts` times with backoff (once when closing).
    async fn send(&mut self, batch: Vec<Built>) {
        let n = batch.len();
        let mut attempts = self.export.max_attempts;
        if self.closing.load(Ordering::Relaxed) {
            let deadline = *self
                .close_deadline
                .get_or_insert_with(|| Instant::now() + self.export.timeout);
            if self.failing || Instant::now() > deadline {
                self.drop_spans(n, "the backend is not answering at exit");
                return;
            }
            attempts = 1;
        }
        let request = request(batch, &self.export.resource);
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=attempts {
            match self.attempt(&request).await {
                Ok(rejected) => {
                    if self.failing {
                        tracing::info!("OTLP endpoint {}: exporting again", self.export.url);
                        self.failing = false;
                    }
                    let ok = n as u64 - rejected.min(n as u64);
                    self.stats.exported.fetch_add(ok, Ordering::Relaxed);
                    self.queued.fetch_sub(n, Ordering::Relaxed);
                    if rejected > 0 {
                        self.stats.dropped.fetch_add(rejected, Ordering::Relaxed);
                    }
                    return;
                }
                Err(Failure::Refused(why)) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    self.drop_spans(n, &why);
                    return;
                }
                Err(Failure::Retry(why)) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if !self.failing {
                        tracing::warn!(
                            "OTLP endpoint {}: {why}; retrying with backoff (spans are dropped, and counted, when attempts run out or the queue is full)",
                            self.export.url
                        );
                        self.failing = true;
                    }
                    if attempt < attempts {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        self.drop_spans(n, "no attempt went through");
    }

    fn drop_spans(&self, n: usize, why: &str) {
        tracing::debug!("OTLP export: {n} spans dropped: {why}");
        self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }

    /// One export; Ok: how many spans the backend rejected.
    async fn attempt(&self, req: &ExportTraceServiceRequest) -> Result<u64, Failure> {
        match (&self.target, &self.channel) {
            (Target::Grpc { metadata, .. }, Some(channel)) => {
                let mut client = TraceServiceClient::new(channel.clone());
                if self.export.gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                let mut r = tonic::Request::new(req.clone());
                *r.metadata_mut() = metadata.clone();
                r.set_timeout(self.export.timeout);
                match client.export(r).await {
                    Ok(resp) => Ok(rejected(resp.into_inner().partial_success)),
                    Err(s) => Err(grpc_failure(&s)),
                }
            }
            (Target::Http { agent }, _) => self.post(agent, req),
            (Target::Grpc { .. }, None) => Err(Failure::Refused("no channel".into())),
        }
    }

    fn post(&self, agent: &ureq::Agent, req: &ExportTraceServiceRequest) -> Result<u64, Failure> {
        let mut body = req.encode_to_vec();
        let mut r = agent
            .post(&self.export.url)
            .header("content-type", "application/x-protobuf");
        if self.export.gzip {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            if gz.write_all(&body).is_ok()
                && let Ok(z) = gz.finish()
            {
                body = z;
                r = r.header("content-encoding", "gzip");
            }
        }
        for (k, v) in &self.export.headers {
            r = r.header(k.as_str(), v.as_str());
        }
        let mut resp = r
            .send(&body[..])
            .map_err(|e| Failure::Retry(e.to_string()))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => {
                let bytes = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .unwrap_or_default();
                let partial = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(&bytes[..])
                    .ok()
                    .and_then(|r| r.partial_success);
                Ok(rejected(partial))
            }
            // the retryable codes of the OTLP/HTTP spec
            429 | 502 | 503 | 504 => Err(Failure::Retry(format!("HTTP {status}"))),
            _ => Err(Failure::Refused(format!("HTTP {status}"))),
        }
    }
}

fn rejected(
    p: Option<opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess>,
) -> u64 {
    match p {
        Some(p) if p.rejected_spans > 0 => {
            tracing::warn!(
                "the OTLP backend rejected {} spans: {}",
                p.rejected_spans,
                p.error_message
            );
            p.rejected_spans as u64
        }
        _ => 0,
    }
}

fn grpc_failure(s: &tonic::Status) -> Failure {
    use tonic::Code;
    let why = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        // the retryable codes of the OTLP/gRPC spec
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss
        | Code::ResourceExhausted
        | Code::Unknown => Failure::Retry(why),
        _ => Failure::Refused(why),
    }
}

/// A batch as one export request: the spans grouped by the process they belong to.
pub fn request(batch: Vec<Built>, extra: &[(String, String)]) -> ExportTraceServiceRequest {
    let mut by_peer: BTreeMap<Peer, Vec<Span>> = BTreeMap::new();
    for b in batch {
        by_peer.entry(b.peer).or_default().push(b.span);
    }
    let scope = InstrumentationScope {
        name: "stacktap".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    };
    ExportTraceServiceRequest {
        resource_spans: by_peer
            .into_iter()
            .map(|(peer, spans)| ResourceSpans {
                resource: Some(resource(&peer, extra)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// The resource of one OpenStack process (or API, or client).
fn resource(p: &Peer, extra: &[(String, String)]) -> Resource {
    let s = |k: &str, v: String| attr(k, Value::StringValue(v));
    let instance = match (p.pid, p.port) {
        (Some(pid), _) => format!("{}:{pid}@{}", p.service, p.host),
        (None, Some(port)) => format!("{}@{}:{port}", p.service, p.host),
        (None, None) => format!("{}@{}", p.service, p.host),
    };
    let mut attributes = vec![
        s("service.name", p.service.clone()),
        s("service.namespace", "openstack".into()),
        s("service.instance.id", instance),
        s("host.name", p.host.clone()),
    ];
    if let Some(pid) = p.pid {
        attributes.push(attr("process.pid", Value::IntValue(pid as i64)));
    }
    for (k, v) in extra {
        // what the wire says about the process is not overridden
        if !attributes.iter().any(|a| &a.key == k) {
            attributes.push(s(k, v.clone()));
        }
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}
