//! A Rust (tokio + axum/hyper) server for the end-to-end tests: `GET /` answers at once,
//! `GET /slow?ms=N` after N ms; every response names the serving process in `x-worker-pid`.

use std::time::Duration;

use axum::{
    Router, extract::Query, http::HeaderValue, middleware::map_response, response::Response,
    routing::get,
};

#[derive(serde::Deserialize)]
struct Slow {
    ms: u64,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = match (args.next().as_deref(), args.next()) {
        (Some("--port"), Some(p)) => p.parse()?,
        _ => anyhow::bail!("usage: flyprobe-test-server --port PORT"),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(port))
}

async fn serve(port: u16) -> anyhow::Result<()> {
    let pid = HeaderValue::from(std::process::id());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|Query(q): Query<Slow>| async move {
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                "slow ok"
            }),
        )
        .layer(map_response(move |mut resp: Response| {
            let pid = pid.clone();
            async move {
                resp.headers_mut().insert("x-worker-pid", pid);
                resp
            }
        }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
