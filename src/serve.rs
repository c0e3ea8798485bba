//! The HTTP listener: the graph UI at `/`, `/metrics` for Prometheus, `/api/summary`,
//! `/api/graph`, `/api/chains`, `/api/requests/{id}`, `/healthz`.

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
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            max_connections: 256,
            header_timeout_s: 10.0,
            idle_timeout_s: 60.0,
            allowed_hosts: Vec::new(),
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
        Some(w) => match w.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Some(v),
            _ => {
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

#[derive(serde::Deserialize)]
struct Since {
    /// Seconds before the newest packet; absent: everything kept.
    since: Option<f64>,
}

/// Root causes ranked, and the chains themselves, over the last `since` seconds.
async fn chains(State(s): State<Shared>, Query(q): Query<Since>) -> impl IntoResponse {
    let Ok(r) = s.requests.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, json(String::new())).into_response();
    };
    let from = match (q.since, r.latest()) {
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
}

/// Binds `addr` and serves on a background thread; returns the bound address.
pub fn spawn(addr: &str, shared: Shared) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                if let Err(e) = axum::serve(listener, router(shared)).await {
                    tracing::error!("http server stopped: {e}");
                }
            });
        })?;
    Ok(bound)
}
