//! The worker's HTTP endpoints (`http.listen`): `/metrics` in the Prometheus text
//! format, `/healthz` (the process is alive and serving) and `/readyz` (broker
//! connected, database reachable, not draining; a 503 whose body names every check
//! that fails, so an operator reading it at 3 a.m. knows where to look).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::ledger::resilient::Health;

/// What the worker's readiness is made of.
pub struct Readiness {
    /// The ledger's reachability (probed while idle too, see `worker`).
    pub ledger: Arc<Health>,
    /// Whether the broker connection is up.
    pub broker: Box<dyn Fn() -> bool + Send + Sync>,
    /// Cancelled once the worker stops taking new tickets (a signal).
    pub draining: CancellationToken,
}

impl Readiness {
    /// The checks that fail now; empty when ready.
    pub fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if !(self.broker)() {
            problems.push("broker: not connected");
        }
        if !self.ledger.is_ready() {
            problems.push("database: unreachable");
        }
        if self.draining.is_cancelled() {
            problems.push("draining: shutting down, taking no new tickets");
        }
        problems
    }
}

struct Shared {
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
}

/// Binds `listen`; a clear error when the address is taken or not ours to bind.
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, String> {
    let addr: SocketAddr = listen.parse().map_err(|_| format!("http.listen: '{listen}' is not host:port"))?;
    tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("http.listen {listen}: cannot listen: {e}"))
}

/// Serves the endpoints on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let shared = Arc::new(Shared { metrics, readiness });
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the HTTP endpoints stopped");
    }
}

async fn metrics_page(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render())
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let problems = shared.readiness.problems();
    crate::telemetry::ready(problems.is_empty());
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; ")))
    }
}

/// How often an idle worker checks that its database still answers, so that
/// `/readyz` reports an outage even when no ticket is there to notice it.
pub const LEDGER_CHECK_INTERVAL: Duration = Duration::from_secs(2);
