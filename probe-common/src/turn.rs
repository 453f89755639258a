//! The request/response turn of one connection, moved by each successful read or write.
//!
//! A request starts with the first successful read on a connection after the server last
//! wrote on it (or the first read at all); its response starts with the first successful
//! write after that. For HTTP/1.x the first bytes of the turn give the method and the status
//! code, and the turn follows the protocol:
//! - an interim status (100 Continue) does not end the request;
//! - a read after the response that does not begin with a request line is the tail of the
//!   previous body (a server may answer before reading it all);
//! - every further final status line is one more request (pipelined, or begun in a read
//!   that also held the previous body's tail).
//!
//! TLS and unrecognised protocols have no requests: their turns are exchanges, never in
//! flight or timed. The logic runs in the kernel (both hook sets) and in this crate's tests;
//! [`Turns`] is what it needs from around it.

use crate::{
    ConnState,
    http::{
        Head, METHOD_NONE, METHOD_OTHER, PEEK, PROTO_H2, PROTO_HTTP1, PROTO_UNKNOWN, has_requests,
        is_interim, parse_method, parse_status, protocol_of,
    },
    phase,
};

/// What a turn needs besides the connection's state: the clock, the event's first bytes,
/// and where counts go. In the kernel: `bpf_ktime_get_ns`, the user buffer, the per-CPU maps.
pub trait Turns {
    /// Nanoseconds on a monotonic clock.
    fn now(&mut self) -> u64;
    /// The first bytes of this event's data (at most `ret`), or None when there are none to
    /// see (io_uring, sendfile) or they cannot be read.
    fn peek(&mut self, ret: u64) -> Option<(Head, usize)>;
    /// A request started (a connection with requests).
    fn started(&mut self);
    /// A turn of a connection without requests started (TLS, other protocols).
    fn exchanged(&mut self, state: &ConnState);
    /// A request's response started: `state.status` and `state.duration_ns` are set.
    fn responded(&mut self, state: &ConnState);
    /// Whether [`Turns::finished`] is wanted (the access log): the turn is copied only then.
    fn wants_finished(&self) -> bool;
    /// A request's turn ended (the next one began on its connection).
    fn finished(&mut self, turn: &ConnState);
    /// Whether the caller walks HTTP/2 frames (`h2::on_data`: where its walk programs
    /// loaded): then an h2 connection has no turns here, from its preface on; where it does
    /// not, its turns are exchanges. Asked of h2 connections only.
    fn walks_h2(&self) -> bool;
}

/// `ret` (> 0) bytes were read from (`read`) or written to the connection `state`.
#[inline(always)]
pub fn on_data(state: &mut ConnState, read: bool, ret: u64, t: &mut impl Turns) {
    if state.protocol == PROTO_H2 && t.walks_h2() {
        return;
    }
    // The turn this event finishes, if any: handed on once, at the end (in the kernel, one
    // call site keeps the program small enough for the verifier when the access log is on).
    let mut finished: Option<ConnState> = None;
    if read {
        let now = t.now();
        if state.phase != phase::REQUEST {
            // Only HTTP/1.x turns (and the first, which tells the protocol) need the bytes.
            let head = if state.protocol == PROTO_UNKNOWN || state.protocol == PROTO_HTTP1 {
                t.peek(ret)
            } else {
                None
            };
            // Defined on both paths: the bytes a `None` leaves undefined may be spilled by
            // the compiler, and the verifier refuses reading a register never written.
            let (bytes, len, visible) = match head {
                Some((bytes, len)) => (bytes, len, true),
                None => ([0; PEEK], 0, false),
            };
            let method = if visible {
                parse_method(&bytes, len)
            } else {
                METHOD_NONE
            };
            let body_tail = state.phase == phase::RESPONSE
                && state.protocol == PROTO_HTTP1
                && method == METHOD_NONE;
            if !body_tail {
                if state.phase == phase::RESPONSE
                    && t.wants_finished()
                    && has_requests(state.protocol)
                {
                    finished = Some(*state);
                }
                start_request(state, visible.then_some((&bytes, len)), method, now);
                if state.protocol == PROTO_H2 && t.walks_h2() {
                    // Streams, not turns: the caller walks the frames after the preface
                    // (what the server wrote before, its SETTINGS, ended at a frame boundary).
                    state.phase = phase::IDLE;
                    return;
                }
                if has_requests(state.protocol) {
                    t.started();
                } else {
                    t.exchanged(state);
                }
            }
        }
        state.rx += ret;
        state.last_read_ns = now;
    } else {
        // The clock is read only where a turn changes: most writes (a body's) do not.
        let http = state.protocol == PROTO_HTTP1;
        if state.phase == phase::REQUEST {
            let status = if http { status_of(t, ret) } else { 0 };
            if !is_interim(status) {
                let now = t.now();
                state.phase = phase::RESPONSE;
                state.status = status;
                // Saturating: a server that reads and writes one connection from two threads
                // can move start_ns past this event's `now`.
                state.duration_ns = now.saturating_sub(state.start_ns);
                if has_requests(state.protocol) {
                    t.responded(state);
                }
            }
        } else if state.phase == phase::RESPONSE && http {
            // Another final status line: one more request, whose start was not seen.
            let status = status_of(t, ret);
            if status != 0 && !is_interim(status) {
                let now = t.now();
                if t.wants_finished() {
                    finished = Some(*state);
                }
                state.status = status;
                state.start_ns = state.last_read_ns;
                state.duration_ns = now.saturating_sub(state.start_ns);
                state.rx = 0;
                state.tx = 0;
                t.started();
                t.responded(state);
            }
        }
        state.tx += ret;
    }
    // Nothing of `finished` is read unless it is there: the compiler may otherwise test a
    // field of the empty one, whatever its register holds, which the verifier refuses.
    if let Some(turn) = finished {
        t.finished(&turn);
    }
}

#[inline(always)]
fn start_request(state: &mut ConnState, head: Option<(&Head, usize)>, method: u8, now: u64) {
    if state.protocol == PROTO_UNKNOWN {
        state.protocol = match head {
            Some((bytes, len)) => protocol_of(bytes, len, method),
            // No bytes to look at (io_uring, sendfile): not known, rather than not HTTP;
            // the next request tries again.
            None => PROTO_UNKNOWN,
        };
    }
    state.method = if state.protocol != PROTO_HTTP1 {
        METHOD_NONE
    } else if method == METHOD_NONE {
        // Not a request line where one should start: still a request, method unknown.
        METHOD_OTHER
    } else {
        method
    };
    state.phase = phase::REQUEST;
    state.status = 0;
    state.start_ns = now;
    state.duration_ns = 0;
    state.rx = 0;
    state.tx = 0;
}

#[inline(always)]
fn status_of(t: &mut impl Turns, ret: u64) -> u16 {
    match t.peek(ret) {
        Some((bytes, len)) => parse_status(&bytes, len),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;
    use crate::http::{METHODS, PROTO_OTHER, PROTO_TLS};

    /// One connection as the kernel sees it, with what its turns reported.
    #[derive(Default)]
    struct Conn {
        state: ConnState,
        clock: u64,
        data: Vec<u8>,
        /// Whether the event's bytes can be seen (not io_uring or sendfile).
        visible: bool,
        started: u64,
        exchanged: u64,
        /// (method, status) of each response, in order.
        responded: Vec<(&'static str, u16)>,
        finished: Vec<(&'static str, u16)>,
        log: bool,
        walks_h2: bool,
    }

    impl Turns for Conn {
        fn now(&mut self) -> u64 {
            self.clock += 1000;
            self.clock
        }
        fn peek(&mut self, ret: u64) -> Option<(Head, usize)> {
            if !self.visible {
                return None;
            }
            let mut head = [0u8; PEEK];
            let n = self.data.len().min(PEEK);
            head[..n].copy_from_slice(&self.data[..n]);
            Some((head, (ret as usize).min(PEEK)))
        }
        fn started(&mut self) {
            self.started += 1;
        }
        fn exchanged(&mut self, _: &ConnState) {
            self.exchanged += 1;
        }
        fn responded(&mut self, s: &ConnState) {
            assert!(s.duration_ns > 0, "a response is timed: {s:?}");
            self.responded.push((METHODS[s.method as usize], s.status));
        }
        fn wants_finished(&self) -> bool {
            self.log
        }
        fn finished(&mut self, s: &ConnState) {
            self.finished.push((METHODS[s.method as usize], s.status));
        }
        fn walks_h2(&self) -> bool {
            self.walks_h2
        }
    }

    impl Conn {
        fn new() -> Self {
            Self {
                visible: true,
                log: true,
                ..Self::default()
            }
        }
        fn event(&mut self, read: bool, bytes: &[u8]) -> &mut Self {
            self.data = bytes.to_vec();
            let mut state = self.state;
            on_data(&mut state, read, bytes.len() as u64, self);
            self.state = state;
            self
        }
        fn read(&mut self, bytes: &[u8]) -> &mut Self {
            self.event(true, bytes)
        }
        fn write(&mut self, bytes: &[u8]) -> &mut Self {
            self.event(false, bytes)
        }
        fn in_flight(&self) -> u64 {
            self.started - self.responded.len() as u64
        }
    }

    #[test]
    fn a_request_is_a_read_and_its_response_the_write_after_it() {
        let mut c = Conn::new();
        c.read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((c.started, c.in_flight()), (1, 1));
        c.write(b"HTTP/1.1 200 OK\r\n\r\n").write(b"body");
        assert_eq!(c.responded, vec![("GET", 200)]);
        assert_eq!(c.in_flight(), 0);
        assert_eq!((c.state.rx, c.state.tx), (27, 23));
    }

    #[test]
    fn keep_alive_requests_each_start_with_a_read_after_a_write() {
        let mut c = Conn::new();
        for (req, status) in [
            (&b"GET /a HTTP/1.1\r\n"[..], 200),
            (b"POST /b HTTP/1.1\r\n", 201),
        ] {
            c.read(req).read(b"Host: x\r\n\r\n");
            c.write(std::format!("HTTP/1.1 {status} X\r\n").as_bytes())
                .write(b"more body");
        }
        c.read(b"DELETE /c HTTP/1.1\r\n\r\n");
        assert_eq!(c.responded, vec![("GET", 200), ("POST", 201)]);
        assert_eq!(c.finished, c.responded, "each finished when the next began");
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn an_interim_status_does_not_end_the_request() {
        let mut c = Conn::new();
        c.read(b"PUT /up HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .write(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(c.in_flight(), 1);
        c.read(b"the body")
            .write(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!((c.started, c.responded.clone()), (1, vec![("PUT", 204)]));
    }

    #[test]
    fn a_read_after_the_response_that_is_no_request_line_is_the_body_tail() {
        let mut c = Conn::new();
        c.read(b"POST /big HTTP/1.1\r\n\r\npart")
            .write(b"HTTP/1.1 413 Too Large\r\n\r\n")
            .read(b"rest of the body");
        assert_eq!((c.started, c.in_flight()), (1, 0));
        c.read(b"GET /next HTTP/1.1\r\n\r\n")
            .write(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(c.responded, vec![("POST", 413), ("GET", 200)]);
    }

    #[test]
    fn pipelined_requests_read_at_once_count_by_their_status_lines() {
        let mut c = Conn::new();
        c.read(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n");
        c.write(b"HTTP/1.1 200 OK\r\n\r\n")
            .write(b"HTTP/1.1 404 Not Found\r\n\r\n")
            .write(b"body of the 404")
            .write(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(c.started, 3);
        let statuses: Vec<u16> = c.responded.iter().map(|r| r.1).collect();
        assert_eq!(statuses, vec![200, 404, 200]);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn tls_and_other_protocols_are_exchanges_never_requests() {
        for (first, protocol) in [
            (
                &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..],
                PROTO_TLS,
            ),
            (b"hello echo\n", PROTO_OTHER),
        ] {
            let mut c = Conn::new();
            for _ in 0..3 {
                c.read(first).write(b"answer");
            }
            assert_eq!(c.state.protocol, protocol);
            assert_eq!((c.started, c.exchanged, c.responded.len()), (0, 3, 0));
            assert!(c.finished.is_empty());
        }
    }

    #[test]
    fn an_h2_connection_is_streams_where_frames_are_walked_else_exchanges() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
        let mut walked = Conn::new();
        walked.walks_h2 = true;
        walked.write(b"\0\0\0\x04\0\0\0\0\0");
        walked
            .read(preface)
            .write(b"\0\0\0\x04\x01\0\0\0\0")
            .read(b"more");
        assert_eq!(
            (walked.started, walked.exchanged, walked.responded.len()),
            (0, 0, 0),
            "from the preface on, every event is the walk's: streams count there"
        );
        assert_eq!(walked.state.protocol, PROTO_H2);
        assert_eq!(walked.state.phase, phase::IDLE, "no turn in flight");

        let mut not_walked = Conn::new();
        not_walked
            .read(preface)
            .write(b"\0\0\0\x04\x01\0\0\0\0")
            .read(b"more");
        assert_eq!((not_walked.started, not_walked.exchanged), (0, 2));
    }

    #[test]
    fn unseen_bytes_still_count_requests_by_turns() {
        // io_uring and sendfile: nothing to peek at, every read after a write is a request.
        let mut c = Conn::new();
        c.visible = false;
        for _ in 0..4 {
            c.read(b"GET / HTTP/1.1\r\n\r\n")
                .write(b"HTTP/1.1 200 OK\r\n");
        }
        assert_eq!(c.state.protocol, PROTO_UNKNOWN);
        assert_eq!(c.started, 4);
        assert_eq!(c.responded, vec![("", 0); 4]);
    }

    #[test]
    fn without_the_access_log_no_turn_is_copied() {
        let mut c = Conn::new();
        c.log = false;
        c.read(b"GET / HTTP/1.1\r\n\r\n")
            .write(b"HTTP/1.1 200 OK\r\n");
        c.read(b"GET / HTTP/1.1\r\n\r\n");
        assert!(c.finished.is_empty());
        assert_eq!(c.started, 2);
    }

    /// One HTTP/1.1 exchange: its request split into reads, an optional interim
    /// response, then its final response split into writes.
    #[derive(Debug, Clone)]
    struct Exchange {
        method: usize,
        reads: Vec<usize>,
        interim: bool,
        status: u16,
        writes: Vec<usize>,
    }

    fn arb_exchange() -> impl Strategy<Value = Exchange> {
        (
            1usize..10,
            prop::collection::vec(1usize..40, 1..4),
            any::<bool>(),
            prop::sample::select(vec![200u16, 201, 204, 301, 404, 500, 503]),
            prop::collection::vec(1usize..60, 1..4),
        )
            .prop_map(|(method, mut reads, interim, status, mut writes)| {
                // The first read and write hold at least the peeked bytes: a method or
                // status cut shorter is not seen (it counts as OTHER, or not at all).
                reads[0] = reads[0].max(PEEK);
                writes[0] = writes[0].max(PEEK);
                Exchange {
                    method,
                    reads,
                    interim,
                    status,
                    writes,
                }
            })
    }

    /// `bytes` cut into chunks of the given sizes (the last one takes the rest).
    fn chunks(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        for (i, size) in sizes.iter().enumerate() {
            let end = if i + 1 == sizes.len() {
                bytes.len()
            } else {
                (at + size).min(bytes.len())
            };
            if at < end {
                out.push(bytes[at..end].to_vec());
            }
            at = end;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Keep-alive exchanges however the server splits its reads and writes: one request
        /// each, answered with its own method and status, nothing left in flight.
        #[test]
        fn every_exchange_is_one_request_with_its_method_and_status(
            exchanges in prop::collection::vec(arb_exchange(), 1..8)
        ) {
            let mut c = Conn::new();
            let mut expected = Vec::new();
            for e in &exchanges {
                let name = METHODS[e.method];
                let request = std::format!("{name} /path HTTP/1.1\r\nHost: x\r\n\r\n");
                for chunk in chunks(request.as_bytes(), &e.reads) {
                    c.read(&chunk);
                }
                if e.interim {
                    c.write(b"HTTP/1.1 100 Continue\r\n\r\n");
                    c.read(b"body bytes of the request");
                }
                let response = std::format!("HTTP/1.1 {} X\r\ncontent-length: 9\r\n\r\nbody body", e.status);
                for chunk in chunks(response.as_bytes(), &e.writes) {
                    c.write(&chunk);
                }
                expected.push((name, e.status));
            }
            prop_assert_eq!(c.started, exchanges.len() as u64);
            prop_assert_eq!(&c.responded, &expected);
            prop_assert_eq!(c.in_flight(), 0);
            prop_assert_eq!(&c.finished[..], &expected[..expected.len() - 1]);
        }
    }
}
