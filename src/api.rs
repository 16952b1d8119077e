//! The operations endpoint of `centralflow run`: `/metrics` (Prometheus text format),
//! `/health/live` (the process answers) and `/health/ready` (every source and sink that talks
//! to the outside world is connected; 503 with the reasons otherwise).

use std::net::SocketAddr;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::global().encode(),
    )
}

async fn live() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn ready() -> impl IntoResponse {
    let (all, parts) = crate::metrics::readiness();
    let body = serde_json::json!({
        "ready": all,
        "components": parts.iter().map(|(name, r, detail)| (name.clone(), serde_json::json!({"ready": r, "detail": detail}))).collect::<serde_json::Map<_, _>>(),
    });
    let status = if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CONTENT_TYPE, "application/json")], crate::secret::redact(&body.to_string()))
}

/// The router.
pub fn router() -> Router {
    Router::new().route("/metrics", get(metrics)).route("/health/live", get(live)).route("/health/ready", get(ready))
}

/// Binds and serves in the background; returns the bound address.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for /metrics and /health ({e}); set api.address, or api.enabled: false"
        )
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router()).await {
            tracing::error!("the operations endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
