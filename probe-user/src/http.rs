//! The metrics endpoint.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::Registry;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, registry: Registry) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(Arc::new(registry));
    axum::serve(listener, app).await
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    match crate::metrics::render(&registry) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        ),
        Err(err) => {
            log::error!("encoding metrics: {err}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("encoding metrics failed: {err}\n"),
            )
        }
    }
}

async fn index() -> &'static str {
    "flyprobe: Prometheus metrics at /metrics\n"
}
