//! A minimal HTTP/1.1 client over one TCP (or unix-domain) connection, so tests control exactly how many
//! connections and requests the server sees, and count every byte each way. Responses are
//! parsed with httparse (heads and chunk sizes).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

/// The connection under a `Conn`.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The `x-worker-pid` header the test servers set: which process served the request.
    pub worker_pid: Option<u32>,
    /// The server said `Connection: close`.
    pub close: bool,
    pub body: Vec<u8>,
}

pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Bytes written to and read from the server on this connection.
    pub sent: u64,
    pub received: u64,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Conn {
    pub fn connect(port: u16) -> io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Self::over(Stream::Tcp(stream))
    }

    /// A connection to the unix-domain stream socket at `path`.
    pub fn connect_unix(path: &Path) -> io::Result<Self> {
        Self::over(Stream::Unix(UnixStream::connect(path)?))
    }

    fn over(stream: Stream) -> io::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            sent: 0,
            received: 0,
        })
    }

    /// How long a read may wait (30 s unless set): for a request known to take longer.
    pub fn set_read_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(t))
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.send("GET", path, &[])
    }

    /// Send one request and read its whole response.
    pub fn send(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
        self.write(head(method, path, body.len(), "").as_bytes())?;
        self.write(body)?;
        self.read_response(method == "HEAD")
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// `Expect: 100-continue`: send the head, wait for the interim response (up to 2 s, as
    /// clients do), then the body. Returns the interim status, if any, and the response.
    pub fn expect_continue(
        &mut self,
        path: &str,
        body: &[u8],
    ) -> io::Result<(Option<u16>, Response)> {
        let head = head("POST", path, body.len(), "Expect: 100-continue\r\n");
        self.write(head.as_bytes())?;
        self.stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let interim = match self.read_response(false) {
            Ok(r) if r.status == 100 => Some(100),
            Ok(r) => return Ok((None, r)), // answered without asking for the body
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))?;
        self.write(body)?;
        Ok((interim, self.read_response(false)?))
    }

    /// Several GETs in one write (HTTP/1.1 pipelining), then their responses in order.
    pub fn pipeline(&mut self, paths: &[&str]) -> io::Result<Vec<Response>> {
        let batch: String = paths.iter().map(|p| head("GET", p, 0, "")).collect();
        self.write(batch.as_bytes())?;
        paths.iter().map(|_| self.read_response(false)).collect()
    }

    /// An HTTP/1.0 request without keep-alive: the server closes after answering.
    pub fn http10(&mut self, path: &str) -> io::Result<Response> {
        self.write(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
        let resp = self.read_response(false)?;
        let mut rest = Vec::new();
        self.received += self.stream.read_to_end(&mut rest)? as u64;
        Ok(resp)
    }

    /// Read one response (interim ones too). `head_request`: no body follows.
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let (status, worker_pid, close, head_len, framing) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&self.buf).map_err(invalid)? {
                httparse::Status::Complete(head_len) => {
                    let header = |name: &str| {
                        parsed
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .and_then(|h| std::str::from_utf8(h.value).ok())
                            .map(|v| v.trim().to_ascii_lowercase())
                    };
                    let status = parsed.code.unwrap_or(0);
                    let pid = header("x-worker-pid").and_then(|v| v.parse().ok());
                    let close = header("connection").is_some_and(|v| v == "close");
                    let framing = if head_request
                        || (100..200).contains(&status)
                        || status == 204
                        || status == 304
                    {
                        Framing::Length(0)
                    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                        Framing::Chunked
                    } else {
                        Framing::Length(
                            header("content-length")
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0),
                        )
                    };
                    break (status, pid, close, head_len, framing);
                }
                httparse::Status::Partial => self.fill()?,
            }
        };
        self.buf.drain(..head_len);
        let body = match framing {
            Framing::Length(len) => self.take(len)?,
            Framing::Chunked => self.chunked()?,
        };
        Ok(Response {
            status,
            worker_pid,
            close,
            body,
        })
    }

    fn take(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < len {
            self.fill()?;
        }
        Ok(self.buf.drain(..len).collect())
    }

    fn chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let (used, size) = loop {
                match httparse::parse_chunk_size(&self.buf)
                    .map_err(|_| invalid("bad chunk size"))?
                {
                    httparse::Status::Complete(v) => break v,
                    httparse::Status::Partial => self.fill()?,
                }
            };
            self.buf.drain(..used);
            let size = size as usize;
            let chunk = self.take(size + 2)?; // data + CRLF (or the final CRLF)
            body.extend_from_slice(&chunk[..size]);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection mid-response",
            ));
        }
        self.received += n as u64;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Take whatever has arrived (waiting for at least one byte); returns how many bytes.
    pub fn read_some(&mut self) -> io::Result<usize> {
        if self.buf.is_empty() {
            self.fill()?;
        }
        let n = self.buf.len();
        self.buf.clear();
        Ok(n)
    }

    /// Half-close: no more requests from us.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Abort with a reset (SO_LINGER 0, then close) instead of a FIN.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on our own open socket with a valid struct and its size.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Close our side and wait for the server to close its side; returns the byte counts.
    pub fn close(mut self) -> (u64, u64) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        while let Ok(n) = self.stream.read(&mut sink) {
            if n == 0 {
                break;
            }
            self.received += n as u64;
        }
        (self.sent, self.received)
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

fn head(method: &str, path: &str, body_len: usize, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {body_len}\r\n{extra}\r\n"
    )
}

/// An HTTP/2 client without TLS (prior knowledge) for servers whose machine has no Python
/// (the kernel matrix's guests): `streams` GET requests for `path` opened at once on one
/// connection, with static-table HPACK (`GET`, `http`, `/`, else `:path` as a literal) and
/// a literal `:authority`. Returns the `:status` of each response as its first header
/// field shows it (0x88: 200, ...), in the order the responses came, once every stream
/// ended. The responses must fit the initial connection window: it sends no WINDOW_UPDATE.
pub fn h2c_gets(port: u16, path: &str, streams: u32) -> std::io::Result<Vec<u16>> {
    use std::io::{Error, ErrorKind};
    const STATIC_STATUS: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let authority = b"localhost";
    for i in 0..streams {
        let mut block = vec![0x82, 0x86];
        if path == "/" {
            block.push(0x84);
        } else {
            // A literal without indexing, name `:path` (static index 4).
            block.extend([0x04, path.len() as u8]);
            block.extend_from_slice(path.as_bytes());
        }
        block.extend([0x41, authority.len() as u8]);
        block.extend_from_slice(authority);
        // END_STREAM | END_HEADERS
        out.extend(frame(0x1, 0x5, 2 * i + 1, &block));
    }
    sock.write_all(&out)?;
    let mut statuses = Vec::new();
    let mut ended = 0;
    while ended < streams {
        let mut head = [0u8; 9];
        sock.read_exact(&mut head)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload)?;
        match kind {
            // SETTINGS (not an ACK): acknowledge it.
            0x4 if flags & 0x1 == 0 => sock.write_all(&frame(0x4, 0x1, 0, &[]))?,
            0x1 => {
                let first = payload.first().copied().unwrap_or(0);
                let status = match first {
                    0x88..=0x8e => STATIC_STATUS[(first - 0x88) as usize],
                    _ => 0,
                };
                statuses.push(status);
            }
            // GOAWAY, RST_STREAM
            0x7 | 0x3 => {
                return Err(Error::new(
                    ErrorKind::ConnectionAborted,
                    format!("frame type {kind} on stream {stream}"),
                ));
            }
            _ => {}
        }
        if (kind == 0x0 || kind == 0x1) && flags & 0x1 != 0 && stream % 2 == 1 {
            ended += 1;
        }
    }
    // GOAWAY (last stream 0, NO_ERROR), then close.
    sock.write_all(&frame(0x7, 0, 0, &[0; 8]))?;
    Ok(statuses)
}
