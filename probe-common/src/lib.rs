//! Types and names shared by the kernel programs (`probe-ebpf`) and the daemon (`probe-user`).
//!
//! Every struct is `#[repr(C)]`, `Copy`, and laid out without implicit padding, so the kernel
//! and userspace agree on its bytes. Discriminants are plain `u32` constants, not enums: a
//! value read from a map can hold anything, and a constant cannot be an invalid enum.
#![no_std]

pub mod h2;
pub mod http;
pub mod turn;

/// A connection, as the kernel programs key it. The socket hook set uses the address of the
/// kernel's `struct sock` (one socket, whichever processes hold descriptors to it); the
/// syscall hook set names it the way the accepting process does, `fd_key(tgid, fd)`.
pub type ConnKey = u64;

/// The syscall hook set's key: (process, descriptor).
#[inline(always)]
pub const fn fd_key(tgid: u32, fd: u32) -> ConnKey {
    ((tgid as u64) << 32) | fd as u64
}

/// Bits of `ConnState::flags`.
pub mod conn_flags {
    /// Established for a watched listener, not yet read, written or closed by any watched
    /// process: waiting in the accept queue, or accepted and not yet touched.
    pub const QUEUED: u8 = 1;
    /// A unix-domain stream connection (`transport="unix"`); `ConnState::ino` names its
    /// socket, since no kernel event marks its close.
    pub const UNIX: u8 = 2;
    /// A TLS connection whose plaintext OpenSSL's uprobes see: its turns are the plaintext's
    /// (`SSL_read`, `SSL_write`), its socket events count bytes only.
    pub const TLS: u8 = 4;
}

/// What `TARGETS[pid]` holds (0: not tracked).
pub mod target {
    pub const TRACKED: u8 = 1;
    /// Tracked, and its libssl has the OpenSSL uprobes (`--tls`): its TLS connections wait
    /// for their plaintext instead of counting handshake exchanges. Inherited on fork.
    pub const OPENSSL: u8 = 3;
}

/// `ReqKey::transport`, the `transport` label.
pub mod transport {
    pub const TCP: u8 = 0;
    pub const UNIX: u8 = 1;
    /// Label values, indexed by transport.
    pub const NAMES: [&str; 2] = ["tcp", "unix"];

    /// The transport of a connection with these `conn_flags`.
    #[inline(always)]
    pub const fn of(flags: u8) -> u8 {
        if flags & super::conn_flags::UNIX != 0 {
            UNIX
        } else {
            TCP
        }
    }
}

/// Where a connection is in its request/response turn.
pub mod phase {
    /// Accepted, nothing read yet (or only written).
    pub const IDLE: u8 = 0;
    /// Request bytes read, no response byte written yet: the request is in flight.
    pub const REQUEST: u8 = 1;
    /// Response started; the next successful read starts a new request.
    pub const RESPONSE: u8 = 2;
}

/// The state of one connection's current turn. Only tokens are kept: a method index, a
/// status code, a protocol index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    pub phase: u8,
    /// `http::METHODS` index of the current request.
    pub method: u8,
    /// `http::PROTO_*`, guessed from the connection's first read.
    pub protocol: u8,
    /// `conn_flags::*`.
    pub flags: u8,
    /// Status code of the current response (0 if none or not HTTP).
    pub status: u16,
    /// The local (listening) port; 0 in the syscall hook set.
    pub port: u16,
    /// The process the connection counts for: the last watched process that served it.
    /// 0 while `QUEUED`.
    pub owner: u32,
    /// The network namespace (inode number) of the socket; 0 in the syscall hook set.
    pub netns: u32,
    /// When the request's first byte was read (bpf_ktime_get_ns).
    pub start_ns: u64,
    /// When the connection was last read from: where a request whose start was not seen
    /// (pipelined, or begun in the same read as the previous body's tail) began.
    pub last_read_ns: u64,
    /// First request byte read to first response byte written.
    pub duration_ns: u64,
    /// Bytes read and written in this turn.
    pub rx: u64,
    pub tx: u64,
    /// The socket's inode number (unix-domain connections of the socket-keyed sets): a
    /// `struct sock` freed and reused for another connection has another one.
    pub ino: u64,
}

/// Per-process counters, kept per CPU and summed by userspace. All of them only grow, so the
/// gauges are differences (active = accepted - closed) and need no atomics in the kernel.
#[repr(C)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    pub accepted: u64,
    pub closed: u64,
    /// Requests started (first read after a write, or first read on a connection).
    pub requests: u64,
    /// Requests whose response started (first write after a request).
    pub responses: u64,
    /// Requests that ended without a response (connection closed mid-request).
    pub aborted: u64,
    /// Bytes read from and written to tracked connections.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl ProcStats {
    /// All zero, as a constant (the kernel creates entries from a static, not its stack).
    pub const ZERO: Self = Self {
        accepted: 0,
        closed: 0,
        requests: 0,
        responses: 0,
        aborted: 0,
        rx_bytes: 0,
        tx_bytes: 0,
    };

    pub fn add(&mut self, other: &Self) {
        self.accepted += other.accepted;
        self.closed += other.closed;
        self.requests += other.requests;
        self.responses += other.responses;
        self.aborted += other.aborted;
        self.rx_bytes += other.rx_bytes;
        self.tx_bytes += other.tx_bytes;
    }

    pub fn active(&self) -> u64 {
        self.accepted.saturating_sub(self.closed)
    }

    pub fn in_flight(&self) -> u64 {
        self.requests
            .saturating_sub(self.responses.saturating_add(self.aborted))
    }

    /// The counters of a process that has exited: the kernel closed whatever it still held.
    pub fn finished(mut self) -> Self {
        self.aborted += self.in_flight();
        self.closed = self.accepted;
        self
    }
}

/// Direction of a socket syscall between its sys_enter and sys_exit.
pub mod dir {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    /// The slot holds no syscall in progress.
    pub const NONE: u32 = 2;
    /// `SSL_do_handshake` in progress (a `TlsCall`): no plaintext, only its connection.
    pub const HANDSHAKE: u32 = 3;
}

/// Where a syscall's data is: the shape of its second argument.
pub mod buf_kind {
    /// `void *buf` (read, recvfrom, write, sendto).
    pub const PLAIN: u32 = 0;
    /// `struct iovec *` (readv, writev).
    pub const IOVEC: u32 = 1;
    /// `struct msghdr *` (recvmsg, sendmsg).
    pub const MSGHDR: u32 = 2;
    /// No user buffer (sendfile).
    pub const NONE: u32 = 3;
    /// `struct mmsghdr *` (recvmmsg, sendmmsg): peeked at as its first message's msghdr;
    /// which message an event is cannot be told, so HTTP/2 frames are not walked there.
    pub const MMSGHDR: u32 = 4;
    /// A `struct iovec` array in kernel memory, whose segments are user memory: what an
    /// fexit program finds in a `struct msghdr`'s iterator (`ITER_IOVEC`).
    pub const KERNEL_IOVEC: u32 = 5;
}

/// A read or write on a tracked connection, remembered per thread until the syscall returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingIo {
    pub fd: u32,
    pub dir: u32,
    /// The syscall's buffer argument, shaped as `kind` says.
    pub buf: u64,
    pub kind: u32,
    pub _pad: u32,
}

/// A listening TCP port of a watched process, in its network namespace: connections
/// established on it are served connections (the passive side), which is how the socket
/// hook set tells them from the server's own outbound connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    /// Inode number of the network namespace (as in /proc/PID/ns/net).
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Which syscall's buffer a socket event's data is in, from the syscall number the current
/// task entered the kernel with (x86_64 numbering; the daemon turns register peeking off on
/// other architectures). Anything else (sendfile, splice, io_uring_enter) has no user buffer
/// to peek at.
pub mod x86_64_syscall {
    use super::buf_kind;

    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const RECVMMSG: u64 = 299;
    pub const SENDMMSG: u64 = 307;

    /// The shape of the buffer in the syscall's second argument (`rsi`).
    #[inline(always)]
    pub fn buffer_kind(nr: u64) -> u32 {
        match nr {
            READ | WRITE | SENDTO | RECVFROM => buf_kind::PLAIN,
            READV | WRITEV => buf_kind::IOVEC,
            // An mmsghdr starts with its msghdr: the first message is the one peeked at.
            SENDMSG | RECVMSG => buf_kind::MSGHDR,
            RECVMMSG | SENDMMSG => buf_kind::MMSGHDR,
            _ => buf_kind::NONE,
        }
    }
}

/// Which programs the daemon attaches (`--hooks`), also the `hooks` label of
/// `flyprobe_build_info`.
pub mod hook_set {
    /// Raw socket tracepoints (Linux >= 6.3): nothing on the syscall path.
    pub const SOCKET: u32 = 1;
    /// syscalls:* tracepoints: the fallback for older kernels.
    pub const SYSCALL: u32 = 2;
}

/// Labels of a completed request: the process and the request's tokens.
#[repr(C)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqKey {
    pub tgid: u32,
    pub method: u8,
    /// Status class 1..=5, or 0 (no response, or not HTTP).
    pub status: u8,
    pub protocol: u8,
    /// `transport::*` (absent from ledgers written before it: TCP).
    #[cfg_attr(feature = "user", serde(default))]
    pub transport: u8,
}

/// An open HTTP/2 stream: its connection and id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamKey {
    pub conn: ConnKey,
    pub stream: u32,
    pub _pad: u32,
}

/// A thread's OpenSSL call in progress (`SSL_read[_ex]`, `SSL_write[_ex]`,
/// `SSL_do_handshake`), from its entry to its return, and the TLS connections the thread
/// read: what ties the plaintext to its connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCall {
    /// The `SSL *`.
    pub ssl: u64,
    /// The plaintext buffer.
    pub buf: u64,
    /// The `_ex` functions' `size_t *` byte count; 0 for `SSL_read`/`SSL_write`.
    pub len_ptr: u64,
    /// The TLS connection this call moved bytes on (its socket reads or writes during the
    /// call: a socket BIO); 0 when none did (served from OpenSSL's buffer, or a memory BIO).
    pub conn: ConnKey,
    /// TLS connections this thread read that no call is tied to yet, oldest first
    /// (`untied_len` of them): an unknown `SSL *`'s first read takes the oldest. A memory
    /// BIO is fed from its socket's read before its `SSL_read`, and uvloop runs those
    /// `SSL_read`s in the order it read the sockets, maybe after reading others.
    pub untied: [ConnKey; UNTIED],
    /// The connection of the thread's last socket event that was a read of a TLS connection
    /// in its handshake, or `FOREIGN` when a socket that is no served connection came after:
    /// a memory BIO's `SSL_do_handshake` follows the read that fed it.
    pub last: ConnKey,
    /// Plaintext bytes of the call, for the HTTP/2 walk it tail-calls.
    pub bytes: u64,
    /// `dir::*` while the call runs, `dir::NONE` after its return.
    pub dir: u32,
    /// An `_ex` function: success is 1, the byte count is at `len_ptr`.
    pub ex: u32,
    pub untied_len: u32,
    pub _pad: u32,
}

/// Untied TLS connections a thread remembers (`TlsCall::untied`).
pub const UNTIED: usize = 4;

impl TlsCall {
    /// A read of TLS connection `conn`, which no call is tied to yet: queued, once; the
    /// oldest goes when the queue is full.
    #[inline(always)]
    pub fn queue_untied(&mut self, conn: ConnKey) {
        let mut len = self.untied_len as usize;
        if len > UNTIED {
            len = UNTIED;
        }
        let mut i = 0;
        while i < UNTIED {
            if i < len && self.untied[i] == conn {
                return;
            }
            i += 1;
        }
        if len == UNTIED {
            let mut i = 0;
            while i + 1 < UNTIED {
                self.untied[i] = self.untied[i + 1];
                i += 1;
            }
            self.untied[UNTIED - 1] = conn;
        } else {
            // Written by constant index: `len` is known below UNTIED, but a variable
            // index into the map value is what old verifiers refuse.
            let mut i = 0;
            while i < UNTIED {
                if i == len {
                    self.untied[i] = conn;
                }
                i += 1;
            }
            self.untied_len = len as u32 + 1;
        }
    }

    /// `conn` out of the queue (its handshake tied it to its `SSL *`), the others kept in
    /// order.
    #[inline(always)]
    pub fn remove_untied(&mut self, conn: ConnKey) {
        let mut len = self.untied_len as usize;
        if len > UNTIED {
            len = UNTIED;
        }
        let mut kept = 0;
        let mut i = 0;
        while i < UNTIED {
            let c = self.untied[i];
            self.untied[i] = 0;
            if i < len && c != conn {
                // Written by constant index, as in `queue_untied`.
                let mut j = 0;
                while j < UNTIED {
                    if j == kept {
                        self.untied[j] = c;
                    }
                    j += 1;
                }
                kept += 1;
            }
            i += 1;
        }
        self.untied_len = kept as u32;
    }

    /// The oldest queued connection `usable` accepts, taken out of the queue with the
    /// unusable ones before it (gone, or tied since); 0 when none is.
    #[inline(always)]
    pub fn take_untied(&mut self, usable: impl Fn(ConnKey) -> bool) -> ConnKey {
        let mut len = self.untied_len as usize;
        if len > UNTIED {
            len = UNTIED;
        }
        let mut found = 0;
        let mut taken = len;
        let mut i = 0;
        while i < UNTIED {
            if found == 0 && i < len && usable(self.untied[i]) {
                found = self.untied[i];
                taken = i + 1;
            }
            i += 1;
        }
        // Drop the first `taken` (all of them when none was usable).
        let mut i = 0;
        while i < UNTIED {
            self.untied[i] = if i + taken < UNTIED {
                self.untied[i + taken]
            } else {
                0
            };
            i += 1;
        }
        self.untied_len = (len - taken) as u32;
        found
    }
}

/// `TlsCall::conn`, `TlsCall::last`, an `SSL_CONNS` value: not a served connection (a
/// socket flyprobe does not count: the server's own outbound TLS, a connection it had no
/// room for). Plaintext on it counts nothing.
pub const FOREIGN: ConnKey = u64::MAX;

/// An `SSL *` of a process: the key of the connection it was last seen on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslKey {
    pub ssl: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// An HTTP/2 request waiting for its response headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    /// When the request's HEADERS frame was read.
    pub start_ns: u64,
    /// `http::METHODS` index.
    pub method: u8,
    pub _pad: [u8; 7],
}

/// Histogram bucket bounds for request durations, in ns (0.5 ms to 10 s).
pub const DURATION_BOUNDS_NS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Completed requests with one set of labels (per CPU; summed by userspace). `buckets[i]`
/// counts durations in (bound[i-1], bound[i]]; slower ones are only in `timed`.
#[repr(C)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqStats {
    /// Requests completed (response started) or aborted (closed before any response).
    pub count: u64,
    /// Requests with a duration (the ones whose response started).
    pub timed: u64,
    pub duration_sum_ns: u64,
    pub buckets: [u64; 14],
}

impl ReqStats {
    /// All zero, as a constant (the kernel creates entries from a static, not its stack).
    pub const ZERO: Self = Self {
        count: 0,
        timed: 0,
        duration_sum_ns: 0,
        buckets: [0; 14],
    };

    pub fn add(&mut self, other: &Self) {
        self.count += other.count;
        self.timed += other.timed;
        self.duration_sum_ns += other.duration_sum_ns;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
    }
}

/// What the kernel counts per watched listening port (socket-keyed sets): how long its
/// connections waited for a worker, and the resets on its connections. Per CPU, summed by
/// userspace; written once per connection or reset, never per request.
#[repr(C)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Handshake completed -> a worker's first read, write or close of the connection, for
    /// the connections established while flyprobe watched (`count` = `timed`).
    pub waited: ReqStats,
    /// TCP resets sent on the port's connections (an abort, a close with unread data).
    pub resets_sent: u64,
    /// TCP resets received on them (a client that aborted).
    pub resets_received: u64,
    /// Handshakes completed while the accept queue was full, dropped (`skb:kfree_skb` with
    /// reason TCP_LISTEN_OVERFLOW). The listener's drop counter holds each of them twice
    /// (the overflow, then the packet's discard): the daemon takes them out once.
    pub handshakes_dropped: u64,
}

impl PortStats {
    /// All zero, as a constant (the kernel creates entries from a static, not its stack).
    pub const ZERO: Self = Self {
        waited: ReqStats::ZERO,
        resets_sent: 0,
        resets_received: 0,
        handshakes_dropped: 0,
    };

    pub fn add(&mut self, other: &Self) {
        self.waited.add(&other.waited);
        self.resets_sent += other.resets_sent;
        self.resets_received += other.resets_received;
        self.handshakes_dropped += other.handshakes_dropped;
    }
}

/// One access-log record, sent when a request's turn ends (only with --access-log).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessRecord {
    /// When the turn ended (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub rx: u64,
    pub tx: u64,
    pub tgid: u32,
    pub status: u16,
    pub method: u8,
    pub protocol: u8,
}

/// Process lifecycle, sent through the `EVENTS` ring buffer (rare: fork and exit only).
pub mod event_kind {
    /// A tracked process forked; `pid` is the child's id (a thread's only where the kernel
    /// has no BTF for `task_struct`: the classic lifecycle tracepoints cannot tell).
    pub const FORK: u32 = 1;
    /// A tracked process (its thread-group leader) exited.
    pub const EXIT: u32 = 2;
    /// An untracked process exec'd or started listening: node-wide selectors may want it.
    pub const DISCOVER: u32 = 3;
    /// Label values, indexed by kind - 1.
    pub const NAMES: [&str; 3] = ["fork", "exit", "discover"];
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcEvent {
    pub ts_ns: u64,
    pub kind: u32,
    pub pid: u32,
    /// The parent's TGID for `FORK`; 0 otherwise.
    pub ppid: u32,
    /// For `EXIT`: how the process ended, as far as the kernel saw it.
    pub exit: ExitInfo,
}

/// How a process is ending: the `exit_group` code if it called it, else the last signal
/// sent to it that can kill (ignored-by-default and stop signals are not recorded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    pub flags: u32,
    pub code: u32,
    pub signal: u32,
}

pub mod exit_flags {
    /// The process called exit_group; `code` is its status.
    pub const EXITED: u32 = 1;
    /// A signal that can kill was delivered (or already pending); `signal` is the last.
    pub const SIGNALED: u32 = 2;
}

/// Why an event could not be recorded; indexes the `DROPS` per-CPU array.
pub mod drop_reason {
    pub const CONNECTION_MAP_FULL: u32 = 0;
    pub const TARGET_MAP_FULL: u32 = 1;
    pub const STATS_MAP_FULL: u32 = 2;
    pub const PENDING_MAP_FULL: u32 = 3;
    pub const EVENT_RING_FULL: u32 = 4;
    pub const EXIT_MAP_FULL: u32 = 5;
    pub const REQUEST_MAP_FULL: u32 = 6;
    pub const ACCESS_RING_FULL: u32 = 7;
    pub const DISCOVERY_RING_FULL: u32 = 8;
    pub const LISTEN_MAP_FULL: u32 = 9;
    /// An HTTP/2 connection's frames could not be followed in one direction (more frames in
    /// one buffer than the walk looks at, or unreadable bytes): its streams stop counting.
    pub const H2_FRAMES_LOST: u32 = 10;
    /// An HTTP/2 stream had no room in `STREAMS`: its request counts, its response will not.
    pub const STREAM_MAP_FULL: u32 = 11;
    /// An HTTP/2 connection had no room in `H2_CONNS`: its streams are not counted.
    pub const H2_MAP_FULL: u32 = 12;
    /// An OpenSSL call's plaintext whose connection was not known (no socket event of a
    /// TLS connection on its thread yet): not counted.
    pub const TLS_UNTIED: u32 = 13;
    pub const COUNT: u32 = 14;
    /// Label values, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "connection_map_full",
        "target_map_full",
        "stats_map_full",
        "pending_map_full",
        "event_ring_full",
        "exit_map_full",
        "request_map_full",
        "access_ring_full",
        "discovery_ring_full",
        "listen_map_full",
        "h2_frames_lost",
        "stream_map_full",
        "h2_connection_map_full",
        "tls_untied",
    ];
}

/// Names of maps and load-time globals, so both sides spell them once.
pub mod names {
    pub const TARGETS: &str = "TARGETS";
    pub const CONNS: &str = "CONNS";
    pub const STATS: &str = "STATS";
    pub const DROPS: &str = "DROPS";
    pub const EVENTS: &str = "EVENTS";
    pub const DISCOVERIES: &str = "DISCOVERIES";
    pub const EXITS: &str = "EXITS";
    pub const LINEAGE: &str = "LINEAGE";
    pub const PENDING_IO: &str = "PENDING_IO";
    pub const REQS: &str = "REQS";
    pub const LISTEN_PORTS: &str = "LISTEN_PORTS";
    pub const PORT_STATS: &str = "PORT_STATS";
    pub const DROPPED: &str = "DROPPED";
    pub const PENDING_ACCEPT: &str = "PENDING_ACCEPT";
    pub const ACCESS: &str = "ACCESS";
    pub const STREAMS: &str = "STREAMS";
    pub const H2_CONNS: &str = "H2_CONNS";
    pub const H2_WALK: &str = "H2_WALK";
    pub const FEXIT_RECV_WALK: &str = "FEXIT_RECV_WALK";
    pub const FEXIT_SEND_WALK: &str = "FEXIT_SEND_WALK";
    pub const FEXIT_SENDPAGE_WALK: &str = "FEXIT_SENDPAGE_WALK";
    pub const DATA_WALKS: &str = "DATA_WALKS";
    pub const TLS_CALLS: &str = "TLS_CALLS";
    pub const SSL_CONNS: &str = "SSL_CONNS";
    pub const TLS_H2_WALK: &str = "TLS_H2_WALK";
    pub const TLS_WALKS: &str = "TLS_WALKS";
    /// The program the daemon runs (BPF_PROG_TEST_RUN) to end unix connections whose
    /// socket is gone.
    pub const UNIX_SWEEP: &str = "unix_sweep";
    /// Non-zero when --access-log is on; records are only built then.
    pub const ACCESS_LOG_ENABLED: &str = "ACCESS_LOG_ENABLED";
    /// Non-zero with --tls: TLS connections' socket events feed the OpenSSL uprobes.
    pub const TLS_ENABLED: &str = "TLS_ENABLED";

    /// Offsets into tracepoint records, read from tracefs format files at load time.
    pub const FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
    pub const SIGNAL_SIG_OFFSET: &str = "SIGNAL_SIG_OFFSET";
    pub const SIGNAL_PID_OFFSET: &str = "SIGNAL_PID_OFFSET";
    pub const SIGNAL_RESULT_OFFSET: &str = "SIGNAL_RESULT_OFFSET";

    /// Kernel struct field offsets, read from the kernel's BTF at load time (socket hook set).
    pub const SK_FAMILY_OFFSET: &str = "SK_FAMILY_OFFSET";
    pub const SK_STATE_OFFSET: &str = "SK_STATE_OFFSET";
    pub const SK_NUM_OFFSET: &str = "SK_NUM_OFFSET";
    pub const SK_NET_OFFSET: &str = "SK_NET_OFFSET";
    pub const NET_INUM_OFFSET: &str = "NET_INUM_OFFSET";
    pub const SK_PROTOCOL_OFFSET: &str = "SK_PROTOCOL_OFFSET";
    /// `inet_sock.inet_sport`: the local port of a socket already unhashed (an abort).
    pub const INET_SPORT_OFFSET: &str = "INET_SPORT_OFFSET";
    /// `enum skb_drop_reason`'s SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, from BTF.
    pub const DROP_REASON_LISTEN_OVERFLOW: &str = "DROP_REASON_LISTEN_OVERFLOW";
    /// SKB_DROP_REASON_NOT_SPECIFIED, from BTF.
    pub const DROP_REASON_NOT_SPECIFIED: &str = "DROP_REASON_NOT_SPECIFIED";
    pub const TASK_EXIT_CODE_OFFSET: &str = "TASK_EXIT_CODE_OFFSET";
    pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
    pub const TASK_FLAGS_OFFSET: &str = "TASK_FLAGS_OFFSET";
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
    pub const REGS_ARG1_OFFSET: &str = "REGS_ARG1_OFFSET";
    /// Non-zero when the syscall's buffer may be found through the task's saved registers.
    pub const PEEK_REGS: &str = "PEEK_REGS";
    /// Non-zero when untracked processes' listen() is announced (node-wide selectors).
    pub const ANNOUNCE_LISTEN: &str = "ANNOUNCE_LISTEN";
    /// The fentry set's `struct msghdr` / `struct iov_iter` reads, from BTF.
    pub const MSG_ITER_OFFSET: &str = "MSG_ITER_OFFSET";
    pub const ITER_TYPE_OFFSET: &str = "ITER_TYPE_OFFSET";
    pub const ITER_OFFSET_OFFSET: &str = "ITER_OFFSET_OFFSET";
    pub const ITER_PTR_OFFSET: &str = "ITER_PTR_OFFSET";
    pub const ITER_UBUF: &str = "ITER_UBUF";
    pub const ITER_IOVEC: &str = "ITER_IOVEC";
    /// Unix-domain sockets: `sock.sk_type`, `sock.sk_socket`, `unix_sock.addr`, the inode
    /// number of a `struct socket` (`socket_alloc.vfs_inode.i_ino`), `socket.sk`.
    pub const SK_TYPE_OFFSET: &str = "SK_TYPE_OFFSET";
    pub const SK_SOCKET_OFFSET: &str = "SK_SOCKET_OFFSET";
    pub const UNIX_ADDR_OFFSET: &str = "UNIX_ADDR_OFFSET";
    pub const SOCKET_INO_OFFSET: &str = "SOCKET_INO_OFFSET";
    pub const SOCKET_SK_OFFSET: &str = "SOCKET_SK_OFFSET";
    /// The syscall set's fd -> socket walk: `task_struct.files`, `files_struct.fdt`,
    /// `fdtable.fd`, `file.private_data`.
    pub const TASK_FILES_OFFSET: &str = "TASK_FILES_OFFSET";
    pub const FILES_FDT_OFFSET: &str = "FILES_FDT_OFFSET";
    pub const FDT_FD_OFFSET: &str = "FDT_FD_OFFSET";
    pub const FILE_PRIVATE_DATA_OFFSET: &str = "FILE_PRIVATE_DATA_OFFSET";
}

/// Where syscall tracepoint records keep their arguments and return value (a stable ABI:
/// the daemon checks each attached syscall's format file against it).
pub mod syscall_layout {
    pub const ARG0: usize = 16;
    pub const ARG1: usize = 24;
    pub const RET: usize = 16;

    /// Argument `n`: each takes 8 bytes after the first.
    pub const fn arg(n: usize) -> usize {
        ARG0 + 8 * n
    }
}

/// Slots of the PID-indexed target set: the daemon sizes it to the kernel's pid_max.
pub const DEFAULT_PID_SLOTS: u32 = 32_768;
/// PID_MAX_LIMIT on 64-bit kernels: the target set is never larger.
pub const MAX_PID_SLOTS: u32 = 4 * 1024 * 1024;

/// Default map sizes; userspace may override them at load time.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Per-CPU maps hold a value per possible CPU: their bounds are what keeps kernel memory
/// within a pod's limit on a 64-CPU node (see `probe-user/src/kernel/memory.rs`).
pub const DEFAULT_MAX_PROCESSES: u32 = 8_192;
/// Threads of tracked processes doing socket I/O, one pending-syscall slot each.
pub const PENDING_ENTRIES: u32 = 16_384;
/// `BPF_F_NO_PREALLOC`: a hash map allocates its entries as they are created, so a per-CPU
/// map costs what is in it, not its bound times the CPUs.
pub const NO_PREALLOC: u32 = 1;
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Node-wide discovery announcements (exec, listen of untracked processes) have their own
/// ring: an exec storm on the node must not crowd out the watched processes' fork and exit.
pub const DISCOVERY_BYTES: u32 = 64 * 1024;
pub const ACCESS_BYTES: u32 = 1024 * 1024;
/// Access-log records wake the daemon only once this much is waiting (or by its timer,
/// `ACCESS_POLL_MS`): a wakeup per record is an interrupt per request (measured: +1.8 µs per
/// request in a VM, where the self-IPI exits to the host).
pub const ACCESS_WAKE_BYTES: u64 = ACCESS_BYTES as u64 / 4;
/// How often the daemon drains the access-log ring when nothing woke it.
pub const ACCESS_POLL_MS: u64 = 100;
/// Label combinations (process x method x status x protocol) with counters at once: a
/// worker has a handful (its methods x status classes), so this covers ~1,000 workers.
pub const DEFAULT_MAX_REQUEST_SERIES: u32 = 8_192;
/// Sockets remembered as dropped by a full connection map (socket hook set).
pub const DROPPED_ENTRIES: u32 = 4_096;
/// Listening ports of watched processes (per network namespace).
pub const MAX_LISTEN_PORTS: u32 = 4_096;
/// HTTP/2 connections open at once, node-wide (their frame positions, `h2::H2`, allocated
/// as they come).
pub const MAX_H2_CONNECTIONS: u32 = 16_384;
/// HTTP/2 streams waiting for their response headers, node-wide (an LRU map: the streams a
/// connection left open when it ended are forgotten first).
pub const MAX_STREAMS: u32 = 16_384;
/// OpenSSL connections (`SSL *` -> connection) remembered at once, node-wide (LRU; an entry
/// leaves with `SSL_free`).
pub const MAX_SSL_CONNS: u32 = 16_384;
/// Ports with wait and reset counters (`PortStats`, per CPU): a node's watched servers
/// rarely listen on more.
pub const MAX_PORT_STATS: u32 = 1_024;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, without padding, and valid for any bit pattern.
    unsafe impl aya::Pod for ListenKey {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for ProcStats {}
    unsafe impl aya::Pod for PendingIo {}
    unsafe impl aya::Pod for ProcEvent {}
    unsafe impl aya::Pod for ExitInfo {}
    unsafe impl aya::Pod for ReqKey {}
    unsafe impl aya::Pod for ReqStats {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for AccessRecord {}
    unsafe impl aya::Pod for StreamKey {}
    unsafe impl aya::Pod for h2::H2 {}
    unsafe impl aya::Pod for Stream {}
    unsafe impl aya::Pod for TlsCall {}
    unsafe impl aya::Pod for SslKey {}
}

// No implicit padding anywhere: the sizes are the sums of the fields.
const _: () = assert!(core::mem::size_of::<ConnState>() == 64);
const _: () = assert!(core::mem::size_of::<h2::H2>() == 88);
const _: () = assert!(core::mem::size_of::<StreamKey>() == 16);
const _: () = assert!(core::mem::size_of::<Stream>() == 16);
const _: () = assert!(core::mem::size_of::<ListenKey>() == 8);
const _: () = assert!(core::mem::size_of::<ProcStats>() == 56);
const _: () = assert!(core::mem::size_of::<PendingIo>() == 24);
const _: () = assert!(core::mem::size_of::<ReqKey>() == 8);
const _: () = assert!(core::mem::size_of::<ReqStats>() == 136);
const _: () = assert!(core::mem::size_of::<PortStats>() == 160);
const _: () = assert!(core::mem::size_of::<AccessRecord>() == 40);
const _: () = assert!(core::mem::size_of::<ExitInfo>() == 12);
const _: () = assert!(core::mem::size_of::<ProcEvent>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_ssl_takes_the_oldest_untied_connection_read() {
        let mut call = TlsCall::default();
        // uvloop reads A, B, A again (a second record), C, then runs their SSL_reads.
        for conn in [0xa, 0xb, 0xa, 0xc] {
            call.queue_untied(conn);
        }
        assert_eq!(call.untied_len, 3, "A queued once");
        assert_eq!(call.take_untied(|_| true), 0xa);
        // B was tied meanwhile by its own socket-BIO call: skipped and dropped.
        assert_eq!(call.take_untied(|c| c != 0xb), 0xc);
        assert_eq!((call.untied_len, call.take_untied(|_| true)), (0, 0));
    }

    #[test]
    fn a_connection_its_handshake_tied_leaves_the_queue() {
        let mut call = TlsCall::default();
        for conn in [0xa, 0xb, 0xc] {
            call.queue_untied(conn);
        }
        call.remove_untied(0xb);
        assert_eq!(call.untied_len, 2);
        assert_eq!(call.take_untied(|_| true), 0xa);
        assert_eq!(call.take_untied(|_| true), 0xc);
        call.remove_untied(0xd);
        assert_eq!((call.untied_len, call.untied), (0, [0; UNTIED]));
        for conn in 1..=(UNTIED as u64) {
            call.queue_untied(conn);
        }
        call.remove_untied(1);
        call.remove_untied(UNTIED as u64);
        assert_eq!(call.untied_len as usize, UNTIED - 2);
        assert_eq!(
            (call.take_untied(|_| true), call.take_untied(|_| true)),
            (2, 3)
        );
    }

    #[test]
    fn a_full_untied_queue_forgets_its_oldest() {
        let mut call = TlsCall::default();
        for conn in 1..=(UNTIED as u64 + 2) {
            call.queue_untied(conn);
        }
        assert_eq!(call.untied_len as usize, UNTIED);
        assert_eq!(call.take_untied(|_| true), 3);
        // None usable: the queue empties.
        assert_eq!(call.take_untied(|_| false), 0);
        assert_eq!(call.untied_len, 0);
    }

    #[test]
    fn gauges_are_differences_of_counters() {
        let s = ProcStats {
            accepted: 10,
            closed: 7,
            requests: 20,
            responses: 17,
            aborted: 1,
            ..Default::default()
        };
        assert_eq!(s.active(), 3);
        assert_eq!(s.in_flight(), 2);
    }

    #[test]
    fn a_finished_process_holds_nothing() {
        let s = ProcStats {
            accepted: 5,
            closed: 2,
            requests: 9,
            responses: 7,
            aborted: 0,
            ..Default::default()
        }
        .finished();
        assert_eq!((s.active(), s.in_flight()), (0, 0));
        assert_eq!((s.closed, s.aborted), (5, 2));
    }

    #[test]
    fn syscall_numbers_name_where_the_data_is() {
        use x86_64_syscall::*;
        for nr in [READ, WRITE, SENDTO, RECVFROM] {
            assert_eq!(buffer_kind(nr), buf_kind::PLAIN);
        }
        for nr in [READV, WRITEV] {
            assert_eq!(buffer_kind(nr), buf_kind::IOVEC);
        }
        for nr in [SENDMSG, RECVMSG] {
            assert_eq!(buffer_kind(nr), buf_kind::MSGHDR);
        }
        for nr in [RECVMMSG, SENDMMSG] {
            assert_eq!(buffer_kind(nr), buf_kind::MMSGHDR);
        }
        // sendfile (40), splice (275), io_uring_enter (426): no user buffer in the registers.
        for nr in [40, 275, 426] {
            assert_eq!(buffer_kind(nr), buf_kind::NONE);
        }
    }

    #[test]
    fn drop_reason_names_cover_every_reason() {
        assert_eq!(drop_reason::NAMES.len(), drop_reason::COUNT as usize);
    }
}
