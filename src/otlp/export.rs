//! Spans out: a thread of their own, a bounded queue, batches, OTLP/gRPC or
//! OTLP/HTTP-protobuf, retries with backoff. The analysis never waits: spans that do not
//! fit the queue, and batches the backend refused or never took after every attempt, are
//! dropped and counted (`stacktap_otlp_spans_dropped_total`) with a warning.

use super::config::{Export, Protocol};
use super::spans::{Built, Peer, attr};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint};
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

/// A span encoded as it is built (its OTLP `Span` message) and whose it is: the queue
/// holds a few hundred bytes a span, not trees of small strings, and an export request is
/// these bytes framed, with nothing re-encoded or copied per attempt.
pub struct Encoded {
    pub peer: Peer,
    pub span: Vec<u8>,
}

impl From<Built> for Encoded {
    fn from(b: Built) -> Encoded {
        Encoded {
            span: b.span.encode_to_vec(),
            peer: b.peer,
        }
    }
}

pub struct Exporter {
    queue: Option<mpsc::UnboundedSender<Vec<Encoded>>>,
    /// Spans handed over and not yet exported or dropped.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    pub stats: Arc<ExportStats>,
    warned_full: AtomicBool,
    closing: Arc<AtomicBool>,
    /// The backend is not answering (the worker's last attempt failed).
    failing: Arc<AtomicBool>,
    wait_when_full: bool,
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
        let failing = Arc::new(AtomicBool::new(false));
        let worker = {
            let w = Worker {
                channel: None,
                target,
                export: export.clone(),
                stats: stats.clone(),
                queued: queued.clone(),
                failing: failing.clone(),
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
            failing,
            wait_when_full: export.wait_when_full,
            worker: Some(worker),
        })
    }

    /// Hands spans over. Past the queue's bound they are dropped, counted; a replay
    /// (`wait_when_full`) waits instead, while the backend is answering.
    pub fn push(&self, spans: Vec<Encoded>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        let full = || self.queued.load(Ordering::Relaxed) + n > self.max_queued.max(n);
        let alive = || self.worker.as_ref().is_some_and(|w| !w.is_finished());
        while self.wait_when_full && full() && !self.failing.load(Ordering::Relaxed) && alive() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if full() {
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

fn run(mut w: Worker, mut rx: mpsc::UnboundedReceiver<Vec<Encoded>>) {
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
        let mut batch: Vec<Encoded> = Vec::new();
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
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(w.export.max_batch_spans));
            w.send(std::mem::replace(&mut batch, rest)).await;
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
    failing: Arc<AtomicBool>,
    /// The run is ending: what is left gets one attempt, within one export timeout, and
    /// none if the backend is not answering.
    closing: Arc<AtomicBool>,
    close_deadline: Option<Instant>,
}

impl Worker {
    /// One batch, attempted up to `max_attempts` times with backoff (once when closing).
    async fn send(&mut self, batch: Vec<Encoded>) {
        let n = batch.len();
        let mut attempts = self.export.max_attempts;
        if self.closing.load(Ordering::Relaxed) {
            let deadline = *self
                .close_deadline
                .get_or_insert_with(|| Instant::now() + self.export.timeout);
            if self.failing.load(Ordering::Relaxed) || Instant::now() > deadline {
                self.drop_spans(n, "the backend is not answering at exit");
                return;
            }
            attempts = 1;
        }
        let request = Raw(request(batch, &self.export.resource).into());
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=attempts {
            match self.attempt(&request).await {
                Ok(rejected) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("OTLP endpoint {}: exporting again", self.export.url);
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
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "OTLP endpoint {}: {why}; retrying with backoff (spans are dropped, and counted, when attempts run out or the queue is full)",
                            self.export.url
                        );
                    }
                    if attempt < attempts {
                        // the run ending cuts the wait short: a dead backend costs no time
                        let until = Instant::now() + backoff;
                        while Instant::now() < until && !self.closing.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if self.closing.load(Ordering::Relaxed) {
                            break;
                        }
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
    async fn attempt(&self, req: &Raw) -> Result<u64, Failure> {
        match (&self.target, &self.channel) {
            (Target::Grpc { metadata, .. }, Some(channel)) => {
                // TraceService/Export, with the request already encoded
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                if self.export.gzip {
                    grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                grpc.ready()
                    .await
                    .map_err(|e| Failure::Retry(format!("not ready: {e}")))?;
                let mut r = tonic::Request::new(req.clone());
                *r.metadata_mut() = metadata.clone();
                r.set_timeout(self.export.timeout);
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                );
                let codec = tonic_prost::ProstCodec::<Raw, ExportTraceServiceResponse>::default();
                match grpc.unary(r, path, codec).await {
                    Ok(resp) => Ok(rejected(resp.into_inner().partial_success)),
                    Err(s) => Err(grpc_failure(&s)),
                }
            }
            (Target::Http { agent }, _) => self.post(agent, req),
            (Target::Grpc { .. }, None) => Err(Failure::Refused("no channel".into())),
        }
    }

    fn post(&self, agent: &ureq::Agent, req: &Raw) -> Result<u64, Failure> {
        let mut body: Vec<u8> = req.0.to_vec();
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
                let partial = ExportTraceServiceResponse::decode(&bytes[..])
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

fn rejected(p: Option<ExportTracePartialSuccess>) -> u64 {
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

/// An export request already encoded: the message tonic and the HTTP body send.
#[derive(Debug, Clone, Default)]
pub struct Raw(Arc<[u8]>);

impl Message for Raw {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // never decoded: it only goes out
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Arc::from(Vec::new());
    }
}

/// A length-delimited field: `tag`, then `bytes` (an encoded message).
fn field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A batch as one `ExportTraceServiceRequest`, encoded: the spans grouped by the process
/// they belong to (`resource_spans` = 1; in each, `resource` = 1 and `scope_spans` = 2;
/// in that, `scope` = 1 and `spans` = 2).
pub fn request(batch: Vec<Encoded>, extra: &[(String, String)]) -> Vec<u8> {
    let mut by_peer: BTreeMap<Peer, Vec<Vec<u8>>> = BTreeMap::new();
    for e in batch {
        by_peer.entry(e.peer).or_default().push(e.span);
    }
    let scope = InstrumentationScope {
        name: "stacktap".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
    .encode_to_vec();
    let mut out = Vec::new();
    for (peer, spans) in by_peer {
        let mut scope_spans =
            Vec::with_capacity(scope.len() + spans.iter().map(|s| s.len() + 4).sum::<usize>());
        field(1, &scope, &mut scope_spans);
        for s in &spans {
            field(2, s, &mut scope_spans);
        }
        let mut resource_spans = Vec::with_capacity(scope_spans.len() + 256);
        field(
            1,
            &resource(&peer, extra).encode_to_vec(),
            &mut resource_spans,
        );
        field(2, &scope_spans, &mut resource_spans);
        field(1, &resource_spans, &mut out);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn built(service: &str, id: u8) -> Built {
        Built {
            peer: Peer {
                service: service.into(),
                host: "10.0.0.1".into(),
                pid: Some(7),
                port: None,
            },
            span: Span {
                trace_id: vec![1; 16],
                span_id: vec![id; 8],
                name: format!("span {id}"),
                attributes: vec![attr("k", Value::StringValue("v".into()))],
                ..Span::default()
            },
        }
    }

    #[test]
    fn the_framed_request_is_what_the_official_message_decodes() {
        let spans = [
            built("nova-api", 1),
            built("nova-conductor", 2),
            built("nova-api", 3),
        ];
        let extra = vec![("cloud.region".to_string(), "RegionOne".to_string())];
        let bytes = request(spans.iter().cloned().map(Encoded::from).collect(), &extra);
        let req = ExportTraceServiceRequest::decode(&bytes[..]).unwrap();
        assert_eq!(req.resource_spans.len(), 2, "one per process");
        let api = &req.resource_spans[0];
        let names: Vec<_> = api
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|a| a.key.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "service.name",
                "service.namespace",
                "service.instance.id",
                "host.name",
                "process.pid",
                "cloud.region"
            ]
        );
        let got: Vec<&Span> = api.scope_spans[0].spans.iter().collect();
        assert_eq!(got, [&spans[0].span, &spans[2].span]);
        assert_eq!(api.scope_spans[0].scope.as_ref().unwrap().name, "stacktap");
        assert_eq!(
            req.resource_spans[1].scope_spans[0].spans,
            [spans[1].span.clone()]
        );
    }
}
