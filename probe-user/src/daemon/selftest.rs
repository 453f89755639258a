//! The socket hooks' start-up self-test: the daemon serves one HTTP exchange to itself over
//! loopback while it is in the target set, and checks that the kernel saw it whole — the
//! connection on a watched listener, the request line through the syscall's saved registers,
//! the status line of the response. Wrong BTF offsets or a register layout the programs do
//! not expect show here, before any server is measured with them. Everything the exchange
//! left in the maps is removed afterwards.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use probe_common::{
    ListenKey,
    http::{METHODS, PROTO_HTTP1},
};
use thiserror::Error;

use crate::{kernel::maps::KernelMaps, processes::containers};

#[derive(Debug, Error)]
pub enum SelfTestError {
    #[error("the self-test exchange over loopback failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel saw {seen}, not the one exchange of the self-test")]
    Unseen { seen: String },
}

const REQUEST: &[u8] = b"GET /flyprobe-self-test HTTP/1.1\r\nHost: flyprobe\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";

/// Run the exchange; Ok when the kernel counted one connection and one `GET` answered `2xx`.
pub fn run(maps: &mut KernelMaps) -> Result<(), SelfTestError> {
    let me = std::process::id();
    maps.track(me)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let exchanged = exchange();
    maps.untrack(me);
    // The kernel recorded the self-test's listener at listen(): its port is an ephemeral
    // one, which an outbound connection of a watched server may get next.
    if let (Ok(port), Some(netns)) = (&exchanged, containers::netns_id(me)) {
        maps.unlisten(&ListenKey {
            netns: netns as u32,
            port: *port,
            _pad: 0,
        });
    }
    let verdict = exchanged
        .map_err(SelfTestError::from)
        .and_then(|_| check(maps, me));
    let remains = maps.retire(me);
    log::debug!(
        "self-test left {} connections behind, freed",
        remains.held.len()
    );
    verdict
}

/// One connection, one request, one response, both ends in this thread: the handshake
/// completes in the kernel before accept().
fn exchange() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    client.write_all(REQUEST)?;
    let (mut served, _) = listener.accept()?;
    served.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while got < REQUEST.len() {
        let n = served.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    served.write_all(RESPONSE)?;
    drop(served);
    let mut reply = Vec::new();
    client.read_to_end(&mut reply)?;
    Ok(port)
}

fn check(maps: &KernelMaps, me: u32) -> Result<(), SelfTestError> {
    let stats = maps.stats_of(me);
    let labels: Vec<String> = maps
        .requests()
        .into_iter()
        .filter(|(key, _)| key.tgid == me)
        .map(|(key, value)| {
            let method = METHODS.get(key.method as usize).copied().unwrap_or("?");
            format!(
                "{}x method={method} status={}xx protocol={}",
                value.count, key.status, key.protocol
            )
        })
        .collect();
    let get = METHODS
        .iter()
        .position(|m| *m == "GET")
        .unwrap_or(usize::MAX);
    let requests = maps.requests();
    let whole = stats.accepted == 1
        && stats.requests == 1
        && stats.responses == 1
        && requests.iter().any(|(key, value)| {
            key.tgid == me
                && key.method as usize == get
                && key.status == 2
                && key.protocol == PROTO_HTTP1
                && value.count == 1
        });
    if whole {
        return Ok(());
    }
    Err(SelfTestError::Unseen {
        seen: format!(
            "accepted={} requests={} responses={} [{}]",
            stats.accepted,
            stats.requests,
            stats.responses,
            labels.join(", ")
        ),
    })
}
