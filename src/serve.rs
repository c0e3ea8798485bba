//! The HTTP listener: `/metrics` for Prometheus, `/api/summary`, `/healthz`.

use crate::sink::metrics::Metrics;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Shared {
    pub registry: Arc<Registry>,
    /// The latest summary as JSON, refreshed by the pipeline thread.
    pub summary: Arc<Mutex<String>>,
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let body = Metrics::render(&s.registry);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn summary(State(s): State<Shared>) -> impl IntoResponse {
    let body = s.summary.lock().map(|g| g.clone()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/summary", get(summary))
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
