//! The HTTP listener: the graph UI at `/`, `/metrics` for Prometheus, `/api/summary`,
//! `/api/graph`, `/api/chains`, `/api/requests/{id}`, `/healthz`.
//!
//! It must keep answering whoever connects: a connection gets `listen.header_timeout_s`
//! to send its request head and is closed after `listen.idle_timeout_s` without one; at
//! most `listen.max_connections` are served (kept below the process's descriptor limit),
//! and when that many are open the longest-idle one is closed for the newcomer, so idle
//! or slow clients cannot lock `/healthz` out. On a loopback address only loopback names
//! (and `listen.allowed_hosts`) are answered: a web page cannot reach it by rebinding a
//! name of its own to 127.0.0.1.

use crate::sink::graph::Graph;
use crate::sink::metrics::Metrics;
use crate::sink::requests::Requests;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// `[listen]`: the HTTP listener (`--listen`).
#[derive(Debug, Clone, serde::Deserialize)]
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
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            max_connections: 256,
            header_timeout_s: 10.0,
            idle_timeout_s: 60.0,
            allowed_hosts: Vec::new(),
            allow_remote: false,
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
        Some(t) => json(serde_json::to_string(&t).unwrap_or_default()).into_response(),
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
        .route("/api/graph", get(graph))
        .route("/api/chains", get(chains))
        .route("/api/requests/{id}", get(request))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
        .layer(axum::middleware::map_response(no_sniff))
}

/// Every response is what its content type says (a text body is never sniffed as HTML).
async fn no_sniff(mut r: axum::response::Response) -> axum::response::Response {
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

/// Binds `addr` and serves on a background thread; returns the bound address.
pub fn spawn(addr: &str, shared: Shared, cfg: &ListenConfig) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    if !addr.ip().is_loopback() && !cfg.allow_remote {
        anyhow::bail!(
            "--listen {addr}: off loopback; /metrics, /api and the UI show request ids, \
             host names and fault messages: pass --allow-remote (or [listen] allow_remote = \
             true) to serve them beyond this host"
        );
    }
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                serve(listener, router(shared), cfg, bound).await;
            });
        })?;
    Ok(bound)
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

async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    cfg: ListenConfig,
    bound: SocketAddr,
) {
    use std::sync::atomic::Ordering;
    let cap = connection_cap(&cfg);
    let hosts = Arc::new(HostCheck::new(bound, &cfg.allowed_hosts));
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
        let (app, hosts, flag) = (app.clone(), hosts.clone(), busy.clone());
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (app, hosts, flag) = (app.clone(), hosts.clone(), flag.clone());
                async move {
                    flag.store(true, Ordering::Relaxed);
                    let resp = if hosts.allows(&req) {
                        use tower::ServiceExt;
                        app.oneshot(req.map(axum::body::Body::new)).await
                    } else {
                        Ok(misdirected())
                    };
                    flag.store(false, Ordering::Relaxed);
                    resp
                }
            });
        let task = tokio::spawn(async move {
            let mut b =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = b.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // a connection lives until its client is done, or until it idles too long
            let _ = tokio::time::timeout(idle_timeout, conn).await;
        });
        slots.push_back(Slot {
            busy,
            task: task.abort_handle(),
        });
    }
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
    let mut r = (
        StatusCode::MISDIRECTED_REQUEST,
        "this listener answers its own address and loopback names only ([listen] allowed_hosts adds names)\n",
    )
        .into_response();
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
