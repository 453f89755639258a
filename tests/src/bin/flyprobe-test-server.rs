//! A Rust (tokio + axum/hyper) server for the end-to-end tests, with the same routes as
//! tests/apps/app.py: any method on `/`, `/redirect` (302), `/error` (500), `POST /echo`,
//! `/slow?ms=N`, `/big?kb=N`, 404 otherwise. Every response names the serving process in
//! `x-worker-pid`. `--workers N` makes it a pre-fork server: the parent binds, forks N
//! workers that serve the shared listener, and forks a new one for each that dies.
//! `--unix PATH` serves a unix-domain stream socket instead of a TCP port.

use std::time::Duration;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::Query,
    http::{HeaderValue, StatusCode, header},
    middleware::map_response,
    response::{IntoResponse, Response},
    routing::{any, get, post},
};

#[derive(serde::Deserialize)]
struct Slow {
    ms: u64,
}

#[derive(serde::Deserialize)]
struct Big {
    kb: usize,
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: flyprobe-test-server (--port PORT | --unix PATH) [--workers N]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut port, mut unix, mut workers) = (None, None, 0u32);
    for pair in args.chunks(2) {
        match pair {
            [flag, v] if flag == "--port" => port = Some(v.parse::<u16>()?),
            [flag, v] if flag == "--unix" => unix = Some(v.clone()),
            [flag, v] if flag == "--workers" => workers = v.parse()?,
            _ => anyhow::bail!(usage),
        }
    }
    raise_fd_limit();
    let listener = match (port, unix) {
        (Some(port), None) => Listener::Tcp(std::net::TcpListener::bind(("127.0.0.1", port))?),
        (None, Some(path)) => Listener::Unix(std::os::unix::net::UnixListener::bind(path)?),
        _ => anyhow::bail!(usage),
    };
    if workers == 0 {
        return run(listener);
    }
    // Fork before any runtime exists: a forked tokio runtime is not usable.
    let mut alive = 0;
    loop {
        while alive < workers {
            // SAFETY: single-threaded here; the child only builds a fresh runtime.
            match unsafe { libc::fork() } {
                0 => {
                    // SAFETY: the worker dies with the parent (the harness kills the group
                    // too; this covers a parent killed alone).
                    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                    return run(listener);
                }
                -1 => anyhow::bail!("fork: {}", std::io::Error::last_os_error()),
                _ => alive += 1,
            }
        }
        let mut status = 0;
        // SAFETY: waiting for any of our own children.
        if unsafe { libc::wait(&mut status) } > 0 {
            alive -= 1;
        }
    }
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

fn run(listener: Listener) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(listener))
}

/// The benchmark holds 10,000 idle connections: allow as many fds as the hard limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn serve(listener: Listener) -> anyhow::Result<()> {
    let pid = HeaderValue::from(std::process::id());
    let app = Router::new()
        // Read the body even when unused: hyper closes a keep-alive connection whose
        // request body the handler left unread, which would make counts timing-dependent.
        .route("/", any(|_body: Bytes| async { "ok" }))
        .route(
            "/redirect",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/")]) }),
        )
        .route(
            "/error",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "error") }),
        )
        .route(
            "/echo",
            post(|body: Bytes| async move { format!("received {}", body.len()) }),
        )
        .route(
            "/slow",
            get(|Query(q): Query<Slow>| async move {
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                "slow ok"
            }),
        )
        .route(
            "/big",
            get(|Query(q): Query<Big>| async move {
                // Many frames, so the response spans many writes.
                let chunks = (0..q.kb.div_ceil(64)).map(move |i| {
                    let n = (q.kb * 1024 - i * 65536).min(65536);
                    Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; n]))
                });
                let len = q.kb * 1024;
                (
                    [(header::CONTENT_LENGTH, len.to_string())],
                    Body::from_stream(futures_util::stream::iter(chunks)),
                )
                    .into_response()
            }),
        )
        .layer(map_response(move |mut resp: Response| {
            let pid = pid.clone();
            async move {
                resp.headers_mut().insert("x-worker-pid", pid);
                resp
            }
        }));
    match listener {
        Listener::Tcp(listener) => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app).await?;
        }
        Listener::Unix(listener) => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(listener)?;
            axum::serve(listener, app).await?;
        }
    }
    Ok(())
}
