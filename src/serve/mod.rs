//! The HTTP listener: the graph UI at `/`, `/metrics` for Prometheus, `/api/summary`,
//! `/api/graph`, `/api/chains`, `/api/requests/{id}`, `/api/source`, `/healthz`.
//!
//! It must keep answering whoever connects: a connection gets `listen.header_timeout_s`
//! to send its request head and is closed after `listen.idle_timeout_s` without one; at
//! most `listen.max_connections` are served (kept below the process's descriptor limit),
//! and when that many are open the longest-idle one is closed for the newcomer, so idle
//! or slow clients cannot lock `/healthz` out. On a loopback address only loopback names
//! (and `listen.allowed_hosts`) are answered: a web page cannot reach it by rebinding a
//! name of its own to 127.0.0.1.
//!
//! Off loopback it also needs credentials (a bearer token or basic-auth users) and TLS,
//! both from files `access` reads, again on SIGHUP.

pub mod access;
pub mod source;

use crate::sink::graph::Graph;
use crate::sink::metrics::Metrics;
use crate::sink::requests::Requests;
use access::{Access, AccessHandle, Verdict};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// `[listen]`: the HTTP listener (`--listen`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// Connections served at once; more wait to be accepted (below the fd limit, so the
    /// probe keeps its own descriptors).
    pub max_connections: usize,
    /// A request head must arrive within this long.
    pub header_timeout_s: f64,
    /// A connection idle this long is closed.
    pub idle_timeout_s: f64,
    /// Host names the listener answers to besides its own address and, on loopback,
    /// `localhost` (a DNS-rebinding guard: a browser page cannot reach it through a name
    /// of its own).
    pub allowed_hosts: Vec<String>,
    /// Bind off loopback (`--allow-remote`). Off by default: `/metrics`, `/api/*` and the
    /// UI show request ids, fault messages and host names, so serving them beyond this
    /// host is a decision, not a default.
    pub allow_remote: bool,
    /// TLS certificate chain (PEM). Re-read on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Re-read on SIGHUP.
    pub tls_key: Option<PathBuf>,
    /// A file holding the token clients send as `Authorization: Bearer <token>` (one line,
    /// at least 16 characters). Re-read on SIGHUP.
    pub token_file: Option<PathBuf>,
    /// HTTP basic-auth users: name = bcrypt hash (`htpasswd -nbB NAME PASSWORD` prints
    /// one). Re-read from the config file on SIGHUP.
    pub basic_auth_users: BTreeMap<String, String>,
    /// `/metrics` answers without credentials (a Prometheus that scrapes without them);
    /// `/healthz` always does.
    pub metrics_open: bool,
    /// Off loopback without TLS: only behind something that terminates TLS for it (a
    /// mesh sidecar, a reverse proxy on the same host).
    pub plaintext_remote: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            max_connections: 256,
            header_timeout_s: 10.0,
            idle_timeout_s: 60.0,
            allowed_hosts: Vec::new(),
            allow_remote: false,
            tls_cert: None,
            tls_key: None,
            token_file: None,
            basic_auth_users: BTreeMap::new(),
            metrics_open: false,
            plaintext_remote: false,
        }
    }
}

#[derive(Clone)]
pub struct Shared {
    pub registry: Arc<Registry>,
    /// The latest summary as JSON, refreshed by the pipeline thread.
    pub summary: Arc<Mutex<String>>,
    pub graph: Arc<Mutex<Graph>>,
    /// The window `/api/graph` covers when none is asked for (None: everything).
    pub graph_window_s: Option<f64>,
    pub requests: Arc<Mutex<Requests>>,
    /// Where the data comes from, for the UI's header.
    pub source: Arc<Mutex<source::Source>>,
}

fn json(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], body)
}

#[derive(serde::Deserialize)]
struct Window {
    /// Seconds before the newest packet, or `all`.
    window: Option<String>,
}

/// The call graph over `?window=SECONDS` (or `all`), else the run's default window.
async fn graph(State(s): State<Shared>, Query(q): Query<Window>) -> impl IntoResponse {
    let window = match q.window.as_deref() {
        None | Some("") => s.graph_window_s,
        Some("all") => None,
        Some(w) => match seconds(w) {
            Some(v) => Some(v),
            None => {
                let msg = format!("window: seconds > 0 or `all`, not {w:?}\n");
                return (StatusCode::BAD_REQUEST, msg).into_response();
            }
        },
    };
    let Ok(g) = s.graph.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let report = g.report(window);
    drop(g);
    json(serde_json::to_string(&report).unwrap_or_default()).into_response()
}

/// A positive, finite number of seconds.
fn seconds(w: &str) -> Option<f64> {
    w.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0)
}

#[derive(serde::Deserialize)]
struct Since {
    /// Seconds before the newest packet; absent: everything kept.
    since: Option<String>,
}

/// Root causes ranked, and the chains themselves, over the last `since` seconds.
async fn chains(State(s): State<Shared>, Query(q): Query<Since>) -> impl IntoResponse {
    let since = match q.since.as_deref() {
        None | Some("") | Some("all") => None,
        Some(w) => match seconds(w) {
            Some(v) => Some(v),
            None => {
                let msg = format!("since: seconds > 0 or `all`, not {w:?}\n");
                return (StatusCode::BAD_REQUEST, msg).into_response();
            }
        },
    };
    let Ok(r) = s.requests.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, json(String::new())).into_response();
    };
    let from = match (since, r.latest()) {
        (Some(d), Some(latest)) => latest - d,
        _ => f64::MIN,
    };
    let body = serde_json::json!({
        "rca": r.rca(from),
        "chains": r.chains_since(from),
    });
    json(body.to_string()).into_response()
}

async fn request(State(s): State<Shared>, Path(id): Path<String>) -> impl IntoResponse {
    let tree = s.requests.lock().ok().and_then(|r| r.tree(&id));
    match tree {
        Some(t) => {
            // the id its spans carry in an OTLP backend, for the UI's trace link
            let trace = crate::contract::hex(&crate::otlp::ids::trace_id(&t.request_id));
            let mut v = serde_json::to_value(&t).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("trace_id".into(), trace.into());
            }
            json(v.to_string()).into_response()
        }
        None => (StatusCode::NOT_FOUND, format!("no request {id}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let body = Metrics::render(&s.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn source(State(s): State<Shared>) -> impl IntoResponse {
    let body = s
        .source
        .lock()
        .map(|g| serde_json::to_string(&*g).unwrap_or_default())
        .unwrap_or_default();
    json(body)
}

async fn summary(State(s): State<Shared>) -> impl IntoResponse {
    let body = s.summary.lock().map(|g| g.clone()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

pub fn router(shared: Shared) -> Router {
    let mut r = Router::new();
    for a in crate::ui::ASSETS {
        r = r.route(
            a.path,
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, a.content_type),
                        // the files change with the binary, not while it runs
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    a.body,
                )
            }),
        );
    }
    r.route("/metrics", get(metrics))
        .route("/api/summary", get(summary))
        .route("/api/source", get(source))
        .route("/api/graph", get(graph))
        .route("/api/chains", get(chains))
        .route("/api/requests/{id}", get(request))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
        .layer(axum::middleware::map_response(no_sniff))
}

/// Every response is what its content type says (a text body is never sniffed as HTML).
async fn no_sniff(r: axum::response::Response) -> axum::response::Response {
    nosniff(r)
}

/// Where the listener ended up.
pub struct Bound {
    pub addr: SocketAddr,
    /// It speaks TLS.
    pub tls: bool,
}

impl Bound {
    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

/// Binds `addr` and serves on a background thread. `config_file` is where SIGHUP re-reads
/// `[listen]` from (without one, the same files are re-read).
pub fn spawn(
    addr: &str,
    shared: Shared,
    cfg: &ListenConfig,
    config_file: Option<PathBuf>,
) -> anyhow::Result<Bound> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    let access = Access::load(cfg)?;
    exposure_allowed(addr, cfg, &access)?;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = Bound {
        addr: listener.local_addr()?,
        tls: access.tls.is_some(),
    };
    let handle = AccessHandle::new(access);
    let cfg = cfg.clone();
    let at = bound.addr;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::spawn(reload_on_hangup(
                    handle.clone(),
                    cfg.clone(),
                    config_file,
                    at,
                ));
                serve(listener, router(shared), cfg, at, handle).await;
            });
        })?;
    Ok(bound)
}

/// Off loopback, serving is a decision (`allow_remote`), behind credentials and over TLS
/// (or, said so, plaintext behind something that terminates TLS).
fn exposure_allowed(addr: SocketAddr, cfg: &ListenConfig, access: &Access) -> anyhow::Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !cfg.allow_remote {
        anyhow::bail!(
            "--listen {addr}: off loopback; /metrics, /api and the UI show request ids, \
             host names and fault messages: pass --allow-remote (or [listen] allow_remote = \
             true) to serve them beyond this host"
        );
    }
    if !access.has_credentials() {
        anyhow::bail!(
            "--listen {addr}: off loopback the API and UI need credentials: [listen] \
             token_file (a bearer token) or [listen.basic_auth_users] (see docs/deploy.md)"
        );
    }
    if access.tls.is_none() && !cfg.plaintext_remote {
        anyhow::bail!(
            "--listen {addr}: off loopback credentials travel over TLS: [listen] tls_cert and \
             tls_key (or plaintext_remote = true behind a proxy that terminates TLS)"
        );
    }
    Ok(())
}

/// On each SIGHUP, re-reads `[listen]` (from the config file when there is one) and the
/// certificate, key and token files it names; keeps the old ones when anything fails.
async fn reload_on_hangup(
    handle: AccessHandle,
    mut cfg: ListenConfig,
    config_file: Option<PathBuf>,
    bound: SocketAddr,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("http: cannot watch SIGHUP; TLS and credentials reload at restart");
        return;
    };
    while hangups.recv().await.is_some() {
        match reloaded(&mut cfg, config_file.as_deref(), bound) {
            Ok(access) => {
                handle.replace(access);
                tracing::info!(
                    "SIGHUP: [listen] TLS and credentials reloaded; other settings take \
                     effect at restart"
                );
            }
            Err(e) => tracing::error!("SIGHUP: kept the previous TLS and credentials: {e:#}"),
        }
    }
}

fn reloaded(
    cfg: &mut ListenConfig,
    config_file: Option<&std::path::Path>,
    bound: SocketAddr,
) -> anyhow::Result<Access> {
    let mut next = match config_file {
        Some(p) => crate::config::Config::load(p)?.listen,
        None => cfg.clone(),
    };
    // the socket is bound: what allowed it stays
    next.allow_remote = cfg.allow_remote;
    let access = Access::load(&next)?;
    exposure_allowed(bound, &next, &access)?;
    *cfg = next;
    Ok(access)
}

/// One connection being served.
struct Slot {
    /// It is answering a request (not waiting for one).
    busy: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::AbortHandle,
}

/// How many connections may be open at once: the configured number, below the process's
/// descriptor limit less what the probe needs for itself.
fn connection_cap(cfg: &ListenConfig) -> usize {
    // SAFETY: getrlimit writes into the struct we own
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur as usize
    } else {
        1024
    };
    cfg.max_connections.min(soft.saturating_sub(64).max(8))
}

/// What every request on a connection goes through before the router.
#[derive(Clone)]
struct Gate {
    app: Router,
    hosts: Arc<HostCheck>,
    access: AccessHandle,
}

impl Gate {
    async fn answer(
        self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<axum::response::Response, std::convert::Infallible> {
        use tower::ServiceExt;
        if !self.hosts.allows(&req) {
            return Ok(misdirected());
        }
        let access = self.access.current();
        if access.judge(req.uri().path(), req.headers()) == Verdict::Unauthorized {
            return Ok(nosniff(access::unauthorized(&access)));
        }
        self.app.oneshot(req.map(axum::body::Body::new)).await
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    cfg: ListenConfig,
    bound: SocketAddr,
    access: AccessHandle,
) {
    let cap = connection_cap(&cfg);
    let gate = Gate {
        app,
        hosts: Arc::new(HostCheck::new(bound, &cfg.allowed_hosts)),
        access,
    };
    let header_timeout = std::time::Duration::from_secs_f64(cfg.header_timeout_s);
    let idle_timeout = std::time::Duration::from_secs_f64(cfg.idle_timeout_s);
    let mut slots: std::collections::VecDeque<Slot> = std::collections::VecDeque::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // out of descriptors (EMFILE): make room, then accept again
                tracing::warn!("http: accept: {e}");
                evict_idle(&mut slots, 1);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        slots.retain(|s| !s.task.is_finished());
        if slots.len() >= cap {
            let over = slots.len() + 1 - cap;
            evict_idle(&mut slots, over);
        }
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tls = gate.access.current().tls.clone();
        let (gate, flag) = (gate.clone(), busy.clone());
        let task = tokio::spawn(async move {
            // a connection lives until its client is done, or until it idles too long
            let _ = tokio::time::timeout(idle_timeout, async move {
                match tls {
                    None => connection(stream, gate, flag, header_timeout).await,
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        // the handshake is part of the request head's time
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => connection(s, gate, flag, header_timeout).await,
                            Ok(Err(e)) => tracing::debug!("http: TLS handshake: {e}"),
                            Err(_) => tracing::debug!("http: TLS handshake timed out"),
                        }
                    }
                }
            })
            .await;
        });
        slots.push_back(Slot {
            busy,
            task: task.abort_handle(),
        });
    }
}

/// Serves HTTP/1 on one connection (plain or TLS), marking it busy while it answers.
async fn connection<I>(
    io: I,
    gate: Gate,
    busy: Arc<std::sync::atomic::AtomicBool>,
    header_timeout: std::time::Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::sync::atomic::Ordering;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (gate, busy) = (gate.clone(), busy.clone());
        async move {
            busy.store(true, Ordering::Relaxed);
            let resp = gate.answer(req).await;
            busy.store(false, Ordering::Relaxed);
            resp
        }
    });
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let _ = b
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// Closes up to `n` connections that are waiting for a request, oldest first.
fn evict_idle(slots: &mut std::collections::VecDeque<Slot>, mut n: usize) {
    use std::sync::atomic::Ordering;
    slots.retain(|s| {
        if n > 0 && !s.busy.load(Ordering::Relaxed) {
            s.task.abort();
            n -= 1;
            return false;
        }
        true
    });
}

fn misdirected() -> axum::response::Response {
    nosniff(
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this listener answers its own address and loopback names only ([listen] allowed_hosts adds names)\n",
        )
            .into_response(),
    )
}

/// Answers made before the router get the header the router adds to its own.
fn nosniff(mut r: axum::response::Response) -> axum::response::Response {
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

/// Which Host headers a listener answers: on a loopback address, IP literals, `localhost`
/// and the configured names (a DNS-rebinding guard); elsewhere, any.
struct HostCheck {
    loopback: bool,
    allowed: Vec<String>,
}

impl HostCheck {
    fn new(bound: SocketAddr, allowed: &[String]) -> HostCheck {
        HostCheck {
            loopback: bound.ip().is_loopback(),
            allowed: allowed.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    fn allows<B>(&self, req: &hyper::Request<B>) -> bool {
        if !self.loopback {
            return true;
        }
        // an HTTP/1.0 client may send none; a browser always does
        let Some(host) = req.headers().get(header::HOST) else {
            return true;
        };
        let Ok(host) = host.to_str() else {
            return false;
        };
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        }
        .to_ascii_lowercase();
        name == "localhost"
            || name.ends_with(".localhost")
            || name.parse::<std::net::IpAddr>().is_ok()
            || self.allowed.contains(&name)
    }
}
