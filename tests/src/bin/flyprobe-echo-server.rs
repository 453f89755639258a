//! A plain TCP echo server (not HTTP) for the end-to-end tests: whatever a client writes
//! comes back. One process, tokio.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = match (args.next().as_deref(), args.next()) {
        (Some("--port"), Some(p)) => p.parse()?,
        _ => anyhow::bail!("usage: flyprobe-echo-server --port PORT"),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(("127.0.0.1", port)).await?;
            loop {
                let (mut conn, _) = listener.accept().await?;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
}
