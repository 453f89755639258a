//! The only payload bytes flyprobe looks at: the first `PEEK` bytes of a request's first
//! read and of a response's first write. From them it takes a method token, a status code
//! and a protocol guess; nothing else is kept. The same functions run in the kernel (so:
//! fixed-size input, constant loop bounds, no allocation, no panics) and are unit-tested
//! and fuzzed in userspace.

/// How many bytes are peeked.
pub const PEEK: usize = 16;
pub type Head = [u8; PEEK];

/// Method indexes (`METHODS` names them). `METHOD_NONE` is for non-HTTP turns.
pub const METHOD_NONE: u8 = 0;
pub const METHOD_OTHER: u8 = 10;
pub const METHODS: [&str; 11] = [
    "", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];

/// Protocols (`PROTOCOLS` names them), guessed from a connection's first read.
pub const PROTO_UNKNOWN: u8 = 0;
pub const PROTO_HTTP1: u8 = 1;
pub const PROTO_TLS: u8 = 2;
pub const PROTO_H2: u8 = 3;
pub const PROTO_OTHER: u8 = 4;
/// HTTP/1.x over TLS, seen in plaintext through OpenSSL: a label value only (the
/// connection's state says `PROTO_HTTP1` with `conn_flags::TLS`).
pub const PROTO_HTTPS: u8 = 5;
pub const PROTOCOLS: [&str; 6] = ["unknown", "http1", "tls", "h2", "other", "https"];

/// Status classes (`STATUS_CLASSES` names them); 0 when the response's status is not known
/// (no bytes to look at, or not a status line), `STATUS_ABORTED` for a request that ended
/// without a response.
pub const STATUS_ABORTED: u8 = 6;
pub const STATUS_CLASSES: [&str; 7] = ["", "1xx", "2xx", "3xx", "4xx", "5xx", "aborted"];

/// Whether a connection speaking `protocol` has requests. TLS (until its plaintext is seen)
/// and unrecognised protocols do not: their read/write turns are counted as exchanges, never
/// as requests, in flight or timed. `PROTO_UNKNOWN` (no bytes were visible: io_uring,
/// sendfile) is counted by turns as requests.
#[inline(always)]
pub const fn has_requests(protocol: u8) -> bool {
    protocol == PROTO_HTTP1 || protocol == PROTO_UNKNOWN || protocol == PROTO_HTTPS
}

/// The `protocol` label of a connection speaking `protocol` with `conn_flags` `flags`:
/// HTTP/1.x whose plaintext came through OpenSSL is `https`.
#[inline(always)]
pub const fn label_of(protocol: u8, flags: u8) -> u8 {
    if protocol == PROTO_HTTP1 && flags & crate::conn_flags::TLS != 0 {
        PROTO_HTTPS
    } else {
        protocol
    }
}

/// Whether a counted series (`ReqKey`) is requests rather than exchanges: HTTP/2 streams
/// have a method (`OTHER` at least); an h2 connection whose frames are not walked (a unix
/// socket with the fentry hooks, walks the kernel refused) is counted by exchanges,
/// without one.
#[inline(always)]
pub const fn is_request(protocol: u8, method: u8) -> bool {
    has_requests(protocol) || (protocol == PROTO_H2 && method != METHOD_NONE)
}

/// The name of `index` in one of the tables above (`""` when out of range).
pub fn name_of(names: &[&'static str], index: u8) -> &'static str {
    match names.get(index as usize) {
        Some(name) => name,
        None => "",
    }
}

#[inline(always)]
fn starts(head: &Head, len: usize, pat: &[u8]) -> bool {
    if len < pat.len() || pat.len() > PEEK {
        return false;
    }
    let mut i = 0;
    while i < pat.len() && i < PEEK {
        if head[i] != pat[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The protocol a connection speaks, from its first bytes from the client.
#[inline(always)]
pub fn detect_protocol(head: &Head, len: usize) -> u8 {
    protocol_of(head, len, parse_method(head, len))
}

/// `detect_protocol` for a caller that already parsed the method (the kernel parses once).
#[inline(always)]
pub fn protocol_of(head: &Head, len: usize, method: u8) -> u8 {
    if starts(head, len, b"PRI * HTTP/2") {
        PROTO_H2
    } else if len >= 3 && (0x14..=0x17).contains(&head[0]) && head[1] == 0x03 && head[2] <= 0x04 {
        // A TLS record, version 3.x: a handshake, or (a connection adopted mid-stream)
        // change-cipher-spec, alert or application data.
        PROTO_TLS
    } else if method != METHOD_NONE {
        PROTO_HTTP1
    } else {
        PROTO_OTHER
    }
}

/// The method of an HTTP/1.x request line (`TOKEN SP target`), or `METHOD_NONE` when the
/// bytes are not one. Unknown tokens are `METHOD_OTHER`.
#[inline(always)]
pub fn parse_method(head: &Head, len: usize) -> u8 {
    // The token: A-Z, '-' or '_', ended by a space that is followed by a request target.
    let mut space = PEEK;
    let mut i = 0;
    while i < PEEK && i < len {
        let c = head[i];
        if c == b' ' {
            space = i;
            break;
        }
        if !(c.is_ascii_uppercase() || c == b'-' || c == b'_') {
            return METHOD_NONE;
        }
        i += 1;
    }
    if space == 0 || space + 1 >= PEEK || space + 1 >= len {
        return METHOD_NONE;
    }
    let target = head[space + 1];
    let known: [(&[u8], u8); 9] = [
        (b"GET ", 1),
        (b"HEAD ", 2),
        (b"POST ", 3),
        (b"PUT ", 4),
        (b"DELETE ", 5),
        (b"PATCH ", 6),
        (b"OPTIONS ", 7),
        (b"CONNECT ", 8),
        (b"TRACE ", 9),
    ];
    let mut method = METHOD_OTHER;
    let mut k = 0;
    while k < known.len() {
        let (name, index) = known[k];
        if name.len() == space + 1 && starts(head, len, name) {
            method = index;
            break;
        }
        k += 1;
    }
    // Origin-form `/x`, asterisk-form `*`, absolute-form `http://…`; CONNECT takes an
    // authority (`host:port`).
    let target_ok = match method {
        8 => target.is_ascii_graphic(),
        _ => target == b'/' || target == b'*' || target == b'h',
    };
    if target_ok { method } else { METHOD_NONE }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.x NNN`), or 0.
#[inline(always)]
pub fn parse_status(head: &Head, len: usize) -> u16 {
    if len < 12 || !starts(head, len, b"HTTP/1.") || head[8] != b' ' {
        return 0;
    }
    let (a, b, c) = (head[9], head[10], head[11]);
    if !(a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit()) {
        return 0;
    }
    (a - b'0') as u16 * 100 + (b - b'0') as u16 * 10 + (c - b'0') as u16
}

/// 1..=5 for a valid status code, else 0.
#[inline(always)]
pub fn status_class(code: u16) -> u8 {
    if (100..600).contains(&code) {
        (code / 100) as u8
    } else {
        0
    }
}

/// 100 Continue, 102 Processing and 103 Early Hints precede the real response; 101
/// Switching Protocols is the response.
#[inline(always)]
pub fn is_interim(code: u16) -> bool {
    code == 100 || code == 102 || code == 103
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &[u8]) -> (Head, usize) {
        let mut h = [0u8; PEEK];
        let n = s.len().min(PEEK);
        h[..n].copy_from_slice(&s[..n]);
        (h, s.len())
    }

    fn method(s: &[u8]) -> &'static str {
        let (h, n) = head(s);
        METHODS[parse_method(&h, n) as usize]
    }

    #[test]
    fn methods() {
        assert_eq!(method(b"GET / HTTP/1.1\r\n"), "GET");
        assert_eq!(method(b"OPTIONS * HTTP/1.1\r\n"), "OPTIONS");
        assert_eq!(method(b"DELETE /x HTTP/1.1"), "DELETE");
        assert_eq!(method(b"CONNECT db:5432 HTTP/1.1"), "CONNECT");
        assert_eq!(method(b"EHLO mail.example"), ""); // SMTP is not HTTP
        assert_eq!(method(b"GET http://x/ HTTP/1.1"), "GET");
        assert_eq!(method(b"PROPFIND /dav HTTP/1.1"), "OTHER");
        assert_eq!(method(b"get / HTTP/1.1"), "");
        assert_eq!(method(b"GET"), "");
        assert_eq!(method(b"GET "), "");
        assert_eq!(method(b"\x16\x03\x01\x02\x00"), "");
        assert_eq!(method(b"VERYLONGMETHODNAME / HTTP/1.1"), "");
    }

    #[test]
    fn statuses() {
        let code = |s: &[u8]| {
            let (h, n) = head(s);
            parse_status(&h, n)
        };
        assert_eq!(code(b"HTTP/1.1 200 OK\r\n"), 200);
        assert_eq!(code(b"HTTP/1.0 404 Not Found"), 404);
        assert_eq!(code(b"HTTP/1.1 100 Continue\r\n\r\n"), 100);
        assert_eq!(code(b"HTTP/1.1 2x0 OK"), 0);
        assert_eq!(code(b"HTTP/2 200"), 0);
        assert_eq!(code(b"HTTP/1.1 20"), 0);
        assert_eq!(status_class(503), 5);
        assert_eq!(status_class(99), 0);
        assert_eq!(status_class(600), 0);
        assert_eq!(STATUS_CLASSES[STATUS_ABORTED as usize], "aborted");
        assert!(is_interim(100) && !is_interim(101) && !is_interim(200));
    }

    #[test]
    fn protocols() {
        let proto = |s: &[u8]| {
            let (h, n) = head(s);
            PROTOCOLS[detect_protocol(&h, n) as usize]
        };
        assert_eq!(proto(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "h2");
        assert_eq!(proto(b"\x16\x03\x01\x00\xa5\x01\x00\x00"), "tls");
        assert_eq!(proto(b"POST /upload HTTP/1.1\r\n"), "http1");
        assert_eq!(proto(b"hello echo\n"), "other");
        assert_eq!(proto(b""), "other");
        assert!(has_requests(PROTO_HTTP1) && has_requests(PROTO_UNKNOWN));
        assert!(!has_requests(PROTO_TLS) && !has_requests(PROTO_OTHER));
    }
}

#[cfg(test)]
mod fuzz {
    //! The parsers run in the kernel on arbitrary client and server bytes: whatever the input
    //! and length, they return a valid index or code and never panic.
    extern crate std;

    use proptest::prelude::*;

    use super::*;

    fn arb_head() -> impl Strategy<Value = (Head, usize)> {
        // Mostly printable bytes, so request and status lines are actually reached.
        let byte = prop_oneof![
            any::<u8>(),
            b'A'..=b'Z',
            Just(b' '),
            Just(b'/'),
            b'0'..=b'9'
        ];
        (proptest::array::uniform16(byte), 0usize..64)
    }

    /// 200,000 cases by default; `cargo xtask test` asks for 1,000,000.
    fn cases() -> u32 {
        std::env::var("FLYPROBE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn parsers_are_total((head, len) in arb_head()) {
            let m = parse_method(&head, len);
            prop_assert!((m as usize) < METHODS.len());
            prop_assert!((detect_protocol(&head, len) as usize) < PROTOCOLS.len());
            let code = parse_status(&head, len);
            prop_assert!(code <= 999);
            prop_assert!((status_class(code) as usize) < STATUS_CLASSES.len());
        }

        #[test]
        fn a_method_needs_a_space_inside_the_peeked_length((head, len) in arb_head()) {
            if parse_method(&head, len) != METHOD_NONE {
                let seen = &head[..len.min(PEEK)];
                prop_assert!(seen.contains(&b' '));
            }
        }
    }
}
