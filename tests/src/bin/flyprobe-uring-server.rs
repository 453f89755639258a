//! An io_uring HTTP/1.1 server for the end-to-end tests: one process, one thread, and every
//! connection's accept, recv, send and close goes through the ring (no read/write/close
//! syscall per connection, so syscall hooks see none of it). Any request gets `200 ok` with
//! Content-Length and keep-alive, `GET /slow?ms=N` after N ms (an io_uring timeout, so the
//! request is in flight meanwhile), and every response names the process in `x-worker-pid`.
//!
//! `flyprobe-uring-server --port PORT`, like the other test servers.

use std::{net::TcpListener, os::fd::AsRawFd as _, time::Duration};

use io_uring::{IoUring, opcode, squeue, types};

/// The accept's user_data; a connection's is its slot index.
const ACCEPT: u64 = u64::MAX;
const RECV_BUF: usize = 65536;

/// What a connection is waiting for: each has exactly one operation in the ring at a time,
/// so its buffers stay put until that operation completes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Recv,
    Send,
    Sleep,
    Close,
}

struct Conn {
    fd: i32,
    op: Op,
    /// Bytes received and not yet parsed into a request.
    input: Vec<u8>,
    recv_buf: Box<[u8]>,
    /// The response being sent, and how much of it went out.
    output: Vec<u8>,
    written: usize,
    /// The delay of a /slow request (the ring reads it until the timeout fires).
    sleep: Box<types::Timespec>,
    slow_body: bool,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = match (args.next().as_deref(), args.next()) {
        (Some("--port"), Some(p)) => p.parse()?,
        _ => anyhow::bail!("usage: flyprobe-uring-server --port PORT"),
    };
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    Server {
        ring: IoUring::new(256)?,
        listener: listener.as_raw_fd(),
        conns: Vec::new(),
        pid: std::process::id(),
    }
    .run()
}

struct Server {
    ring: IoUring,
    listener: i32,
    conns: Vec<Option<Conn>>,
    pid: u32,
}

impl Server {
    fn run(&mut self) -> anyhow::Result<()> {
        self.accept()?;
        loop {
            match self.ring.submit_and_wait(1) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user_data, result) in done {
                if user_data == ACCEPT {
                    if result >= 0 {
                        self.open(result)?;
                    }
                    self.accept()?;
                } else {
                    self.complete(user_data as usize, result)?;
                }
            }
        }
    }

    fn push(&mut self, sqe: squeue::Entry) -> anyhow::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at (a connection's boxed recv buffer,
            // its output Vec, its boxed timespec) stays allocated and unmoved until the
            // entry completes: a connection has one operation in flight and is freed only
            // when its Close completes.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?; // the queue is full: hand it to the kernel first
        }
    }

    fn accept(&mut self) -> anyhow::Result<()> {
        let sqe = opcode::Accept::new(
            types::Fd(self.listener),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ACCEPT);
        self.push(sqe)
    }

    fn open(&mut self, fd: i32) -> anyhow::Result<()> {
        let conn = Conn {
            fd,
            op: Op::Recv,
            input: Vec::new(),
            recv_buf: vec![0; RECV_BUF].into_boxed_slice(),
            output: Vec::new(),
            written: 0,
            sleep: Box::new(types::Timespec::new()),
            slow_body: false,
        };
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(free) => {
                self.conns[free] = Some(conn);
                free
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.recv(slot)
    }

    fn conn(&mut self, slot: usize) -> &mut Conn {
        self.conns[slot].as_mut().expect("a live connection")
    }

    fn recv(&mut self, slot: usize) -> anyhow::Result<()> {
        let conn = self.conn(slot);
        conn.op = Op::Recv;
        let sqe = opcode::Recv::new(
            types::Fd(conn.fd),
            conn.recv_buf.as_mut_ptr(),
            RECV_BUF as u32,
        )
        .build()
        .user_data(slot as u64);
        self.push(sqe)
    }

    fn send(&mut self, slot: usize) -> anyhow::Result<()> {
        let conn = self.conn(slot);
        conn.op = Op::Send;
        let rest = &conn.output[conn.written..];
        let sqe = opcode::Send::new(types::Fd(conn.fd), rest.as_ptr(), rest.len() as u32)
            .build()
            .user_data(slot as u64);
        self.push(sqe)
    }

    fn close(&mut self, slot: usize) -> anyhow::Result<()> {
        let conn = self.conn(slot);
        conn.op = Op::Close;
        let sqe = opcode::Close::new(types::Fd(conn.fd))
            .build()
            .user_data(slot as u64);
        self.push(sqe)
    }

    fn complete(&mut self, slot: usize, result: i32) -> anyhow::Result<()> {
        let op = self.conn(slot).op;
        match op {
            Op::Recv if result <= 0 => self.close(slot), // end of stream, or an error
            Op::Recv => {
                let conn = self.conn(slot);
                let n = result as usize;
                let received = conn.recv_buf[..n].to_vec();
                conn.input.extend_from_slice(&received);
                self.next_request(slot)
            }
            Op::Send if result < 0 => self.close(slot),
            Op::Send => {
                let conn = self.conn(slot);
                conn.written += result as usize;
                if conn.written < conn.output.len() {
                    self.send(slot)
                } else {
                    self.next_request(slot)
                }
            }
            // A timeout completes with -ETIME when it fires.
            Op::Sleep => {
                self.respond(slot);
                self.send(slot)
            }
            Op::Close => {
                self.conns[slot] = None;
                Ok(())
            }
        }
    }

    /// Answer the next complete request in the input, or read more.
    fn next_request(&mut self, slot: usize) -> anyhow::Result<()> {
        let conn = self.conn(slot);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&conn.input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return self.recv(slot),
            Err(_) => return self.close(slot),
        };
        let body_len: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .unwrap_or(0);
        if conn.input.len() < head_len + body_len {
            return self.recv(slot);
        }
        let slow_ms = req
            .path
            .and_then(|p| p.strip_prefix("/slow?ms="))
            .and_then(|ms| ms.parse::<u64>().ok());
        conn.input.drain(..head_len + body_len);
        match slow_ms {
            Some(ms) => {
                conn.op = Op::Sleep;
                conn.slow_body = true;
                *conn.sleep = Duration::from_millis(ms).into();
                let sqe = opcode::Timeout::new(&raw const *conn.sleep)
                    .build()
                    .user_data(slot as u64);
                self.push(sqe)
            }
            None => {
                conn.slow_body = false;
                self.respond(slot);
                self.send(slot)
            }
        }
    }

    fn respond(&mut self, slot: usize) {
        let pid = self.pid;
        let conn = self.conn(slot);
        let body: &[u8] = if conn.slow_body { b"slow ok" } else { b"ok" };
        conn.output.clear();
        conn.output.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                 x-worker-pid: {pid}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        conn.output.extend_from_slice(body);
        conn.written = 0;
    }
}
