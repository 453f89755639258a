//! The HTTP endpoint: /metrics, the dashboard at /, and its JSON API; behind TLS and
//! authentication when the web config asks for them.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{
        Html, IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::stream::{self, Stream};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use prometheus::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    expose::api::{self, RateTracker},
    expose::metrics,
    expose::openmetrics,
    expose::web_config::{Auth, WebConfig},
    model::snapshot::SnapshotSource,
    model::state::Shared,
};

static DASHBOARD: &str = include_str!("../../assets/dashboard.html");

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct App {
    registry: Registry,
    source: Shared,
}

pub fn router(registry: Registry, source: Shared, auth: Option<Arc<Auth>>) -> Router {
    let app = Arc::new(App { registry, source });
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(dashboard))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/stream", get(stream))
        .with_state(app);
    match auth {
        Some(auth) => router.layer(middleware::from_fn_with_state(auth, authenticate)),
        None => router,
    }
}

pub async fn serve(listener: TcpListener, router: Router, web: WebConfig) -> std::io::Result<()> {
    let Some(tls) = web.tls else {
        return axum::serve(listener, router).await;
    };
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of fds and the like: keep serving once they free up.
                log::warn!("accepting a metrics connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    log::debug!("TLS handshake with {peer} failed: {err}");
                    return;
                }
                Err(_) => return,
            };
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn authenticate(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if auth.clone().allows(header).await {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, auth.challenge())],
        "401 Unauthorized\n",
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if openmetrics::wanted(accept) {
        let body = openmetrics::encode(&app.registry.gather());
        return ([(header::CONTENT_TYPE, openmetrics::CONTENT_TYPE)], body).into_response();
    }
    match metrics::render(&app.registry) {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(err) => {
            log::error!("encoding metrics: {err}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {err}\n"),
            )
                .into_response()
        }
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn snapshot(State(app): State<Arc<App>>) -> Json<api::ApiSnapshot> {
    Json(api::build(&app.source.snapshot(), api::unix_now()))
}

#[derive(Debug, Deserialize)]
struct StreamParams {
    interval_ms: Option<u64>,
}

async fn stream(
    State(app): State<Arc<App>>,
    Query(params): Query<StreamParams>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let every = Duration::from_millis(params.interval_ms.unwrap_or(1000).clamp(200, 60_000));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each stream owns its tracker: rates are never shared between clients.
    let events = stream::unfold(
        (app, tick, RateTracker::default()),
        |(app, mut tick, mut tracker)| async move {
            tick.tick().await;
            let snap = tracker.apply(api::build(&app.source.snapshot(), api::unix_now()));
            let event = Event::default()
                .event("snapshot")
                .json_data(&snap)
                .unwrap_or_else(|_| Event::default().event("error"));
            Some((Ok(event), (app, tick, tracker)))
        },
    );
    Sse::new(events).keep_alive(KeepAlive::default())
}
