//! HTTP/2 as flyprobe counts it: a request is a stream the client opens with a HEADERS
//! frame; its response is the server's first HEADERS frame on that stream with a final
//! status. The kernel walks each read and write of an h2 connection frame by frame: the
//! 9-byte frame headers, and the first header fields of HEADERS frames for `:method` and
//! `:status`. No other payload byte is looked at, and only those two tokens are kept.
//!
//! HPACK: `:method` and `:status` are found where encoders put them, as a static-table index
//! (`GET` 0x82, `POST` 0x83, statuses 0x88..=0x8e) or as a literal with the static name
//! index and a plain or Huffman-coded value. A value taken from the connection's dynamic
//! table (an encoder that indexed a `PUT` sends the next one as an index above 61) cannot be
//! known without the whole table: it is `OTHER` (method) or 0 (status not known).
//!
//! A frame header or a header field cut by the end of a read or write (or of one of its
//! iovecs) is completed from the next one: the walk keeps the few bytes it needs.
//!
//! The same code runs in the kernel (fixed bounds, no allocation, no panics) and in this
//! crate's tests; [`Frames`] is what it needs from around it.

use crate::{
    buf_kind,
    http::{METHOD_OTHER, is_interim},
};

/// The client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) before its first frame.
pub const PREFACE_LEN: u32 = 24;
/// A frame header: length (24 bits), type, flags, stream id (31 bits).
pub const FRAME_HEADER: u32 = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_RST_STREAM: u8 = 0x3;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Buffers (iovecs) looked at in one `readv`/`writev`/`sendmsg`/`recvmsg`.
pub const MAX_SEGMENTS: u32 = 1024;
/// Header fields looked at to find `:method`: a request's pseudo-header fields (at most
/// four) come first, after any dynamic table size update.
pub const MAX_FIELDS: u32 = 5;
/// Fields looked at to find `:status`: it is the first, after any table size update.
const STATUS_FIELDS: u32 = 2;
/// Bytes of a header block read at once.
pub const WINDOW: usize = 16;

/// One direction of a connection, between reads (or writes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Direction {
    /// Bytes of the current frame (or of the preface) still to come.
    pub need: u32,
    /// The first bytes of a frame header, or of a header field, cut by a buffer's end.
    pub partial: [u8; WINDOW],
    /// How many of `partial` are a frame header's.
    pub partial_len: u8,
    /// Non-zero once the frames could not be followed (more than [`MAX_FRAMES`] in one
    /// buffer, bytes that could not be read): nothing more is counted in this direction.
    pub lost: u8,
    /// How many of `partial` are a header field's (`block_stream`'s).
    pub block_len: u8,
    /// Header fields of that block already passed.
    pub block_fields: u8,
    /// The stream of a HEADERS frame whose block is still being searched for `:method` or
    /// `:status` (0: none).
    pub block_stream: u32,
    /// Bytes of that block to pass before its next field (padding length, priority, a long
    /// field's value).
    pub block_skip: u32,
}

impl H2 {
    /// A connection before its first byte, as a constant (the kernel creates entries from a
    /// static, not its stack).
    pub const ZERO: Self = Self {
        rx: Direction::ZERO,
        tx: Direction::ZERO,
        streams: Streams {
            last_stream: 0,
            opened: 0,
            reset_rx: 0,
            ended_tx: 0,
        },
        flags: 0,
        _pad: [0; 7],
    };
}

impl Direction {
    const ZERO: Self = Self {
        need: 0,
        partial: [0; WINDOW],
        partial_len: 0,
        lost: 0,
        block_len: 0,
        block_fields: 0,
        block_stream: 0,
        block_skip: 0,
    };
}

/// An HTTP/2 connection's frame positions and streams.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2 {
    /// From the client (the server's reads).
    pub rx: Direction,
    /// To the client (the server's writes).
    pub tx: Direction,
    pub streams: Streams,
    /// The connection's `conn_flags` (its transport).
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// An HTTP/2 connection's streams. Each counter is written by one direction's walk only
/// (a server may read and write a connection from two threads at once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    /// The highest stream id the client opened: a HEADERS frame on a stream at or below it
    /// is trailers, not a request.
    pub last_stream: u32,
    /// Streams the client opened (reads).
    pub opened: u32,
    /// Open streams the client reset (reads).
    pub reset_rx: u32,
    /// Open streams the server answered or reset (writes).
    pub ended_tx: u32,
}

impl Streams {
    /// Streams opened and not yet answered or reset: in flight, aborted if the connection
    /// ends.
    pub const fn open(&self) -> u32 {
        self.opened
            .saturating_sub(self.reset_rx)
            .saturating_sub(self.ended_tx)
    }
}

/// What the walk needs from around it: the bytes, and where requests go. In the kernel:
/// `bpf_probe_read_user`, the `STREAMS` map and the per-CPU counters.
pub trait Frames {
    /// Reads `len` (at most [`WINDOW`]) bytes at `addr` into the start of `out`.
    fn read(&mut self, addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool;
    /// The same from kernel memory: an iovec array the kernel copied in
    /// ([`buf_kind::KERNEL_IOVEC`]).
    fn read_kernel(&mut self, addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool;
    /// The client opened `stream` with a request for `method`.
    fn opened(&mut self, stream: u32, method: u8);
    /// The server sent response headers with the final `status` (0 when not known) on
    /// `stream`: true if that answered an open stream (its first response).
    fn responded(&mut self, stream: u32, status: u16) -> bool;
    /// `stream` was reset (RST_STREAM, by either side): true if it was open, and is now
    /// aborted.
    fn reset(&mut self, stream: u32) -> bool;
    /// Runs [`step`] until it says the event is done, at most [`MAX_STEPS`] times. The
    /// kernel runs them in `bpf_loop`, whose body the verifier checks once.
    #[inline(always)]
    fn run(&mut self, w: &mut Walk, d: &mut Direction, s: &mut Streams)
    where
        Self: Sized,
    {
        let mut n = 0;
        while n < STEP_LOOPS && step(w, d, s, self) {
            n += 1;
        }
    }
}

/// Steps of one event's walk: one per frame, per header field looked at, per iovec. An
/// event that needs more (a 64 KiB read of tiny frames) loses the direction.
pub const MAX_STEPS: u32 = 8192;
/// Calls of [`step`] per event: the last one finds the event done.
pub const STEP_LOOPS: u32 = MAX_STEPS + 1;

/// Where an event's bytes are: `addr` shaped as `kind` (`buf_kind`) says; for an iovec
/// array, the bytes start `skip` bytes into its first segment (an fexit program finds the
/// data a call moved part-way into a segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub kind: u32,
    pub addr: u64,
    pub skip: u32,
}

impl Buffer {
    /// `kind` at `addr`, from its start.
    pub const fn at(kind: u32, addr: u64) -> Self {
        Self {
            kind,
            addr,
            skip: 0,
        }
    }
}

/// `ret` bytes were read (`read`) or written on the connection, in `buf`. True if this
/// event lost the direction's frames.
#[inline(always)]
pub fn on_data(h2: &mut H2, read: bool, buf: Buffer, ret: u64, f: &mut impl Frames) -> bool {
    let H2 {
        rx, tx, streams, ..
    } = h2;
    let d = if read { rx } else { tx };
    if d.lost != 0 {
        return false;
    }
    if let Some(mut w) = start(d, streams, read, buf, ret, f) {
        f.run(&mut w, d, streams);
        if !w.done {
            d.lost = 1;
        }
    }
    d.lost != 0
}

/// Where the walk of one event stands between steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// The iovec array (`readv`, `sendmsg`, ...), 0 for one plain buffer.
    iov: u64,
    /// The array is in kernel memory (`buf_kind::KERNEL_IOVEC`).
    kernel: bool,
    /// Bytes of the first segment before the event's.
    skip: u32,
    /// Iovecs taken from it.
    taken: u32,
    /// Bytes of the event in no segment yet.
    left: u32,
    /// The contiguous segment being walked: `len` bytes at `addr`, `off` of them walked.
    addr: u64,
    len: u32,
    off: u32,
    read: bool,
    /// The event is walked to its end.
    pub done: bool,
}

/// The walk of an event, or None when there is nothing to step through (the direction is
/// lost, or the bytes cannot be seen).
#[inline(always)]
fn start(
    d: &mut Direction,
    s: &mut Streams,
    read: bool,
    buf: Buffer,
    ret: u64,
    f: &mut impl Frames,
) -> Option<Walk> {
    if ret > u32::MAX as u64 {
        d.lost = 1;
        return None;
    }
    let ret = ret as u32;
    let mut w = Walk {
        read,
        ..Walk::default()
    };
    match buf.kind {
        buf_kind::PLAIN => {
            w.addr = buf.addr;
            w.len = ret;
        }
        buf_kind::IOVEC => {
            w.iov = buf.addr;
            w.left = ret;
        }
        buf_kind::KERNEL_IOVEC => {
            w.iov = buf.addr;
            w.left = ret;
            w.kernel = true;
            w.skip = buf.skip;
        }
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        buf_kind::MSGHDR => match read_u64(f, buf.addr + 16, false) {
            Some(iov) => {
                w.iov = iov;
                w.left = ret;
            }
            None => {
                d.lost = 1;
                return None;
            }
        },
        _ => {
            // No bytes to see (sendfile, io_uring), or not the ones this event moved
            // (recvmmsg): still in step if they are all inside the current frame (a DATA
            // frame's payload sent from a file).
            if d.block_stream != 0 {
                finish(d, s, read, f, None);
            }
            if d.need >= ret && d.partial_len == 0 {
                d.need -= ret;
            } else {
                d.lost = 1;
            }
            return None;
        }
    }
    Some(w)
}

#[inline(always)]
fn read_u64(f: &mut impl Frames, addr: u64, kernel: bool) -> Option<u64> {
    let mut w = [0u8; WINDOW];
    let read = if kernel {
        f.read_kernel(addr, 8, &mut w)
    } else {
        f.read(addr, 8, &mut w)
    };
    if !read {
        return None;
    }
    Some(u64::from_le_bytes([
        w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
    ]))
}

/// A frame header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    length: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// One step of the walk: the next iovec, one header field of a block being searched, or
/// past the frame in progress to the next frame header. False when the event is done (or
/// the direction lost).
#[inline(always)]
pub fn step(w: &mut Walk, d: &mut Direction, s: &mut Streams, f: &mut impl Frames) -> bool {
    if d.lost != 0 {
        return false;
    }
    if w.off >= w.len {
        // The data fills the iovecs in order: ret bytes over as many as it takes.
        if w.left == 0 {
            w.done = true;
            return false;
        }
        if w.iov == 0 || w.taken >= MAX_SEGMENTS {
            d.lost = 1;
            return false;
        }
        let at = w.iov + 16 * w.taken as u64;
        let (Some(base), Some(len)) = (read_u64(f, at, w.kernel), read_u64(f, at + 8, w.kernel))
        else {
            d.lost = 1;
            return false;
        };
        // The event's bytes start `skip` into the first segment.
        let skip = if w.taken == 0 { w.skip as u64 } else { 0 };
        if len < skip {
            d.lost = 1;
            return false;
        }
        let (base, len) = (base + skip, len - skip);
        let len = if len < w.left as u64 {
            len as u32
        } else {
            w.left
        };
        w.addr = base;
        w.len = len;
        w.off = 0;
        w.left -= len;
        w.taken += 1;
        return true;
    }
    if d.block_stream != 0 {
        block_field(w, d, s, f);
        return true;
    }
    // Past the rest of the frame (or the preface) in progress.
    let left = w.len - w.off;
    if d.need >= left {
        d.need -= left;
        w.off = w.len;
        return true;
    }
    w.off += d.need;
    d.need = 0;
    let Some((header, used)) = frame_header(d, f, w.addr + w.off as u64, w.len - w.off) else {
        // Cut by the end of the segment (its bytes are kept), or not readable (lost).
        w.off = w.len;
        return d.lost == 0;
    };
    w.off += used;
    d.need = header.length;
    // Client streams have odd ids; a client's HEADERS on a stream it opened before are
    // trailers.
    let opens = w.read && header.stream > s.last_stream;
    if header.kind == TYPE_RST_STREAM && header.stream & 1 == 1 && f.reset(header.stream) {
        if w.read {
            s.reset_rx += 1;
        } else {
            s.ended_tx += 1;
        }
    }
    if header.kind == TYPE_HEADERS && header.stream & 1 == 1 && (opens || !w.read) {
        if opens {
            s.last_stream = header.stream;
            s.opened += 1;
        }
        d.block_stream = header.stream;
        d.block_len = 0;
        d.block_fields = 0;
        d.block_skip = 0;
        if header.flags & FLAG_PADDED != 0 {
            d.block_skip += 1;
        }
        if header.flags & FLAG_PRIORITY != 0 {
            d.block_skip += 5;
        }
    }
    true
}

/// The frame header at `addr` (`avail` > 0 bytes there), completing one whose first bytes
/// ended the previous segment: the header and how many of these bytes it used. None when
/// it is cut again (kept) or cannot be read (the direction is lost).
#[inline(always)]
fn frame_header(
    d: &mut Direction,
    f: &mut impl Frames,
    addr: u64,
    avail: u32,
) -> Option<(FrameHeader, u32)> {
    let have = if d.partial_len < 8 {
        d.partial_len as u32
    } else {
        8
    };
    let want = FRAME_HEADER - have;
    let take = if want < avail { want } else { avail };
    let mut w = [0u8; WINDOW];
    if !f.read(addr, take, &mut w) {
        d.lost = 1;
        return None;
    }
    joined(&d.partial, have, &mut w);
    if take < want {
        keep(d, &w);
        d.partial_len = (have + take) as u8;
        return None;
    }
    d.partial_len = 0;
    let header = FrameHeader {
        length: u32::from_be_bytes([0, w[0], w[1], w[2]]),
        kind: w[3],
        flags: w[4],
        stream: u32::from_be_bytes([w[5], w[6], w[7], w[8]]) & 0x7fff_ffff,
    };
    Some((header, take))
}

/// `w` moved up by `have` (less than [`WINDOW`]), after that many `kept` bytes. Done on
/// the window as two numbers, not byte by byte at a variable index: the verifier refuses
/// the stack address the compiler would compute for a byte that is not read.
#[inline(always)]
fn joined(kept: &[u8; WINDOW], have: u32, w: &mut [u8; WINDOW]) {
    if have == 0 || have as usize >= WINDOW {
        return;
    }
    let halves = |b: &[u8; WINDOW]| {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&b[..8]);
        hi.copy_from_slice(&b[8..]);
        (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
    };
    let (lo, hi) = halves(w);
    let (klo, khi) = halves(kept);
    let bits = 8 * have;
    // Little-endian: moving bytes up is shifting left.
    let (mut lo, mut hi) = if bits < 64 {
        (lo << bits, (hi << bits) | (lo >> (64 - bits)))
    } else {
        (0, lo << (bits - 64))
    };
    // The kept bytes below: `have` of them.
    if bits < 64 {
        lo |= klo & ((1u64 << bits) - 1);
    } else {
        lo |= klo;
        hi |= khi & ((1u64 << (bits - 64)) - 1);
    }
    w[..8].copy_from_slice(&lo.to_le_bytes());
    w[8..].copy_from_slice(&hi.to_le_bytes());
}

#[inline(always)]
fn keep(d: &mut Direction, bytes: &[u8; WINDOW]) {
    let mut i = 0;
    while i < d.partial.len() {
        d.partial[i] = bytes[i];
        i += 1;
    }
}

/// One field of the search of `d.block_stream`'s header block for `:method` (reads) or
/// `:status` (writes). The block's frame has `d.need` bytes from here (`w.off`); the field
/// is `d.block_skip` bytes on, after `d.block_len` bytes kept from the previous segment.
#[inline(always)]
fn block_field(w: &mut Walk, d: &mut Direction, s: &mut Streams, f: &mut impl Frames) {
    let read = w.read;
    let here = w.len - w.off;
    let avail = if d.need < here { d.need } else { here };
    // Whether the frame goes on past this segment.
    let more = d.need > avail;
    let limit = if read { MAX_FIELDS } else { STATUS_FIELDS };
    let pos = d.block_skip;
    if d.block_fields as u32 >= limit {
        finish(d, s, read, f, None);
        return;
    }
    if pos >= avail {
        if more {
            // The next field is in the next segment: this one is all the block's.
            d.block_skip = pos - avail;
            d.need -= avail;
            w.off += avail;
        } else {
            finish(d, s, read, f, None);
        }
        return;
    }
    let have = if (d.block_len as usize) < WINDOW {
        d.block_len as u32
    } else {
        WINDOW as u32 - 1
    };
    d.block_len = 0;
    let room = WINDOW as u32 - have;
    let take = if avail - pos < room {
        avail - pos
    } else {
        room
    };
    let mut win = [0u8; WINDOW];
    if !f.read(w.addr + (w.off + pos) as u64, take, &mut win) {
        finish(d, s, read, f, None);
        return;
    }
    joined(&d.partial, have, &mut win);
    let len = have + take;
    match field(&win, len as usize, 0) {
        Field::Short if more && pos + take == avail && len < WINDOW as u32 => {
            // Cut by the segment's end: kept, to be completed by the next one's bytes.
            keep(d, &win);
            d.block_len = len as u8;
            d.block_skip = 0;
            d.need -= avail;
            w.off += avail;
        }
        Field::Method(m) if read => finish(d, s, read, f, Some(m as u16)),
        Field::Status(status) if !read => finish(d, s, read, f, Some(status)),
        // Before `:status`, only a dynamic table size update.
        Field::Skip(bytes) if read || win[0] & 0xe0 == 0x20 => {
            d.block_skip = (pos + bytes).saturating_sub(have);
            d.block_fields += 1;
        }
        _ => finish(d, s, read, f, None),
    }
}

/// The block's search ended: the request opened (with its method, else `OTHER`) or the
/// response given (with its status, else 0: not known).
#[inline(always)]
fn finish(d: &mut Direction, s: &mut Streams, read: bool, f: &mut impl Frames, found: Option<u16>) {
    let stream = d.block_stream;
    d.block_stream = 0;
    d.block_len = 0;
    if read {
        let method = match found {
            Some(m) => m as u8,
            None => METHOD_OTHER,
        };
        f.opened(stream, method);
        return;
    }
    let status = found.unwrap_or(0);
    if !is_interim(status) && f.responded(stream, status) {
        s.ended_tx += 1;
    }
}

/// What one header field of a block says.
enum Field {
    /// `:method`, as an `http::METHODS` index.
    Method(u8),
    /// `:status` (0: not known).
    Status(u16),
    /// Another field, this many bytes long.
    Skip(u32),
    /// Cut short: its bytes go on past the window.
    Short,
    /// Not a field the search can go past (a literal name, a regular header).
    Stop,
}

/// Static-table entries 8..=14: `:status` 200, 204, 206, 304, 400, 404, 500 (`field` has
/// them as constants; the tests encode with this table).
#[cfg(test)]
const STATIC_STATUS: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];

/// The header field at `w[start]` (`len` bytes of `w` are the block's).
#[inline(always)]
fn field(w: &[u8; WINDOW], len: usize, start: usize) -> Field {
    if start >= len {
        return Field::Short;
    }
    let Some(&b) = w.get(start) else {
        return Field::Stop;
    };
    if b & 0x80 != 0 {
        // Indexed: name and value from the table.
        let Some((index, end)) = integer(w, len, start, 7) else {
            return Field::Short;
        };
        return match index {
            2 => Field::Method(1),
            3 => Field::Method(3),
            // Constants, not a table lookup: the index is checked in one register and used
            // in another, which Linux 6.1's verifier does not link (it refused the access).
            8 => Field::Status(200),
            9 => Field::Status(204),
            10 => Field::Status(206),
            11 => Field::Status(304),
            12 => Field::Status(400),
            13 => Field::Status(404),
            14 => Field::Status(500),
            0 => Field::Stop,
            _ => Field::Skip((end - start) as u32),
        };
    }
    if b & 0xe0 == 0x20 {
        // Dynamic table size update.
        return match integer(w, len, start, 5) {
            Some((_, end)) => Field::Skip((end - start) as u32),
            None => Field::Short,
        };
    }
    // A literal: with incremental indexing (01), without (0000) or never indexed (0001).
    let bits = if b & 0x40 != 0 { 6 } else { 4 };
    let Some((name, at)) = integer(w, len, start, bits) else {
        return Field::Short;
    };
    // A regular header's name: the pseudo-header fields have ended.
    if (15..62).contains(&name) {
        return Field::Stop;
    }
    // The name as a string (gRPC's C core sends `:path` so), or its table index.
    let (named, at) = if name == 0 {
        match literal_name(w, len, at) {
            Some(found) => found,
            None => return cut(len),
        }
    } else {
        (name, at)
    };
    let Some(&first) = w.get(at) else {
        return cut(len);
    };
    let huffman = first & 0x80 != 0;
    let Some((vlen, vat)) = integer(w, len, at, 7) else {
        return cut(len);
    };
    match named {
        2 | 8..=14 if vat + vlen as usize > len => cut(len),
        2 => Field::Method(method_value(w, len, vat, vlen, huffman)),
        8..=14 => Field::Status(status_value(w, len, vat, vlen, huffman)),
        _ => Field::Skip(((vat - start) as u32).saturating_add(vlen)),
    }
}

/// A field that goes on past the `len` bytes of the window: to be completed from the next
/// segment when those were all this one had (`Short`), else not followed (`Stop`).
#[inline(always)]
fn cut(len: usize) -> Field {
    if len < WINDOW {
        Field::Short
    } else {
        Field::Stop
    }
}

/// The plain (not Huffman-coded) names the search reads a literal-named field by.
const METHOD_NAME: (u64, u64) = plain(b":method");
const STATUS_NAME: (u64, u64) = plain(b":status");

/// A literal name at `w[at]`: the static index it stands for (2 for `:method`, 8 for
/// `:status`, 0 for any other) and where its value starts; None when it goes on past `len`.
#[inline(always)]
fn literal_name(w: &[u8; WINDOW], len: usize, at: usize) -> Option<(u32, usize)> {
    let huffman = *w.get(at)? & 0x80 != 0;
    let (nlen, nat) = integer(w, len, at, 7)?;
    let end = nat + nlen as usize;
    if end >= len {
        return None;
    }
    let named = if huffman || nlen == 0 || nlen > 8 {
        0
    } else if (packed(w, nat, nlen as usize), nlen as u64) == METHOD_NAME {
        2
    } else if (packed(w, nat, nlen as usize), nlen as u64) == STATUS_NAME {
        8
    } else {
        0
    };
    Some((named, end))
}

/// An HPACK integer with a `bits`-bit prefix at `w[at]`: its value and the index after it;
/// None when it goes on past `len`.
#[inline(always)]
fn integer(w: &[u8; WINDOW], len: usize, at: usize, bits: u32) -> Option<(u32, usize)> {
    let max = (1u32 << bits) - 1;
    if at >= len {
        return None;
    }
    let first = *w.get(at)? as u32 & max;
    if first < max {
        return Some((first, at + 1));
    }
    let mut value = max;
    let mut shift = 0;
    let mut i = at + 1;
    // Up to three continuation bytes: values below 2^21.
    while i < at + 4 {
        if i >= len {
            return None;
        }
        let b = *w.get(i)? as u32;
        value += (b & 0x7f) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            return Some((value, i));
        }
    }
    None
}

/// A `:method` value of `vlen` bytes at `w[at]`. Compared as one number with each known
/// token (plain and Huffman-coded): few branches, which keeps the verifier's work small.
#[inline(always)]
fn method_value(w: &[u8; WINDOW], len: usize, at: usize, vlen: u32, huffman: bool) -> u8 {
    let vlen = vlen as usize;
    if vlen == 0 || vlen > 8 || at + vlen > len {
        return METHOD_OTHER;
    }
    let value = packed(w, at, vlen);
    let table = if huffman {
        &HUFFMAN_METHODS
    } else {
        &PLAIN_METHODS
    };
    let mut k = 0;
    while k < table.len() {
        if table[k] == (value, vlen as u64) {
            return (k + 1) as u8;
        }
        k += 1;
    }
    METHOD_OTHER
}

/// `vlen` (1..=8) bytes at `w[at]` as a little-endian number.
#[inline(always)]
fn packed(w: &[u8; WINDOW], at: usize, vlen: usize) -> u64 {
    let mut value = 0u64;
    let mut i = 0;
    while i < 8 {
        value |= (w[(at + i) & (WINDOW - 1)] as u64) << (8 * i);
        i += 1;
    }
    if vlen < 8 {
        value &= (1u64 << (8 * vlen)) - 1;
    }
    value
}

/// A `:status` value of `vlen` bytes at `w[at]`: three digits, plain or Huffman-coded.
#[inline(always)]
fn status_value(w: &[u8; WINDOW], len: usize, at: usize, vlen: u32, huffman: bool) -> u16 {
    let vlen = vlen as usize;
    if vlen == 0 || vlen > 3 || at + vlen > len {
        return 0;
    }
    let byte = |i: usize| -> u32 {
        if i < vlen {
            w[(at + i) & (WINDOW - 1)] as u32
        } else {
            // Huffman padding is the EOS code's first bits: ones.
            0xff
        }
    };
    let (a, b, c) = (byte(0), byte(1), byte(2));
    if !huffman {
        let digit = |x: u32| x.wrapping_sub(b'0' as u32);
        let (a, b, c) = (digit(a), digit(b), digit(c));
        if vlen != 3 || a > 9 || b > 9 || c > 9 {
            return 0;
        }
        return (a * 100 + b * 10 + c) as u16;
    }
    // Digits are 5-bit (0-2) or 6-bit (3-9) codes: three of them fit in 18 bits.
    let bits = (a << 16) | (b << 8) | c;
    let mut used = 0;
    let mut status = 0u32;
    let mut valid = true;
    let mut i = 0;
    while i < 3 {
        let five = (bits >> (19 - used)) & 0x1f;
        let six = (bits >> (18 - used)) & 0x3f;
        let short = five <= 2;
        valid &= short || (0x19..=0x1f).contains(&six);
        status = status * 10
            + if short {
                five
            } else {
                six.wrapping_sub(0x19 - 3)
            };
        used += if short { 5 } else { 6 };
        i += 1;
    }
    if valid && status >= 100 {
        status as u16
    } else {
        0
    }
}

/// The HPACK Huffman code (RFC 7541, Appendix B) of an upper-case letter: (code, bits).
const fn upper_code(c: u8) -> (u32, u32) {
    match c {
        b'A' => (0x21, 6),
        b'B'..=b'V' => (0x5d + (c - b'B') as u32, 7),
        b'W' => (0xf2, 8),
        b'X' => (0x72, 7),
        b'Y' => (0xf3, 8),
        b'Z' => (0xf4, 8),
        _ => (0, 0),
    }
}

/// The Huffman coding of an upper-case token (at most 8 bytes coded), padded with ones.
pub const fn huffman_upper(token: &[u8]) -> ([u8; 8], usize) {
    let mut out = [0u8; 8];
    let mut acc: u64 = 0;
    let mut bits = 0;
    let mut n = 0;
    let mut i = 0;
    while i < token.len() {
        let (code, len) = upper_code(token[i]);
        acc = (acc << len) | code as u64;
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out[n] = (acc >> bits) as u8;
            n += 1;
        }
        i += 1;
    }
    if bits > 0 {
        out[n] = ((acc << (8 - bits)) as u8) | (0xff >> bits);
        n += 1;
    }
    (out, n)
}

/// A token of at most 8 bytes as a little-endian number, and its length.
const fn plain(token: &[u8]) -> (u64, u64) {
    let mut value = 0u64;
    let mut i = 0;
    while i < token.len() {
        value |= (token[i] as u64) << (8 * i);
        i += 1;
    }
    (value, token.len() as u64)
}

/// A token's Huffman coding as a little-endian number, and its length.
const fn huffman(token: &[u8]) -> (u64, u64) {
    let (code, len) = huffman_upper(token);
    let mut value = 0u64;
    let mut i = 0;
    while i < len {
        value |= (code[i] as u64) << (8 * i);
        i += 1;
    }
    (value, len as u64)
}

/// `http::METHODS[1..=9]`, as plain literals.
const PLAIN_METHODS: [(u64, u64); 9] = [
    plain(b"GET"),
    plain(b"HEAD"),
    plain(b"POST"),
    plain(b"PUT"),
    plain(b"DELETE"),
    plain(b"PATCH"),
    plain(b"OPTIONS"),
    plain(b"CONNECT"),
    plain(b"TRACE"),
];

/// `http::METHODS[1..=9]`, Huffman-coded as an encoder sends them.
const HUFFMAN_METHODS: [(u64, u64); 9] = [
    huffman(b"GET"),
    huffman(b"HEAD"),
    huffman(b"POST"),
    huffman(b"PUT"),
    huffman(b"DELETE"),
    huffman(b"PATCH"),
    huffman(b"OPTIONS"),
    huffman(b"CONNECT"),
    huffman(b"TRACE"),
];

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::BTreeMap, vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;
    use crate::http::{METHODS, status_class};

    /// A server's memory as its reads and writes left it: buffers at addresses, and the
    /// kernel's copies of iovec arrays apart. A read outside them (or of the wrong one)
    /// fails, so the walk must never look past the data it was given.
    #[derive(Default)]
    struct Server {
        memory: Vec<(u64, Vec<u8>)>,
        kernel: Vec<(u64, Vec<u8>)>,
        next: u64,
        h2: H2,
        /// Requests opened, in order: (stream, method).
        opened: Vec<(u32, &'static str)>,
        open: BTreeMap<u32, &'static str>,
        /// Responses: stream -> (method, status).
        responded: BTreeMap<u32, (&'static str, u16)>,
        /// Streams reset while open: stream -> method.
        aborted: BTreeMap<u32, &'static str>,
        lost: u32,
    }

    fn read_from(memory: &[(u64, Vec<u8>)], addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool {
        assert!(len as usize <= WINDOW);
        for (at, bytes) in memory {
            if addr >= *at && addr + len as u64 <= at + bytes.len() as u64 {
                let from = (addr - at) as usize;
                out[..len as usize].copy_from_slice(&bytes[from..from + len as usize]);
                return true;
            }
        }
        false
    }

    impl Frames for Server {
        fn read(&mut self, addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool {
            read_from(&self.memory, addr, len, out)
        }
        fn read_kernel(&mut self, addr: u64, len: u32, out: &mut [u8; WINDOW]) -> bool {
            read_from(&self.kernel, addr, len, out)
        }
        fn opened(&mut self, stream: u32, method: u8) {
            let method = METHODS[method as usize];
            self.opened.push((stream, method));
            self.open.insert(stream, method);
        }
        fn responded(&mut self, stream: u32, status: u16) -> bool {
            match self.open.remove(&stream) {
                Some(method) => {
                    self.responded.insert(stream, (method, status));
                    true
                }
                None => false,
            }
        }
        fn reset(&mut self, stream: u32) -> bool {
            match self.open.remove(&stream) {
                Some(method) => {
                    self.aborted.insert(stream, method);
                    true
                }
                None => false,
            }
        }
    }

    /// How an event's iovecs reach the walk.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Shape {
        /// A user iovec array (readv, writev).
        Iovec,
        /// A user msghdr pointing at one (recvmsg, sendmsg).
        Msghdr,
        /// The kernel's copy of the array, the data starting part-way into its first
        /// segment (what an fexit program finds).
        Kernel,
    }

    impl Server {
        fn place(&mut self, bytes: &[u8]) -> u64 {
            let at = 0x1000 + self.next;
            self.next += bytes.len() as u64 + 0x100;
            self.memory.push((at, bytes.to_vec()));
            at
        }
        fn place_kernel(&mut self, bytes: &[u8]) -> u64 {
            let at = 0xffff_0000_0000_0000 + self.next;
            self.next += bytes.len() as u64 + 0x100;
            self.kernel.push((at, bytes.to_vec()));
            at
        }
        /// One read or write of `bytes`, through `segments` iovecs shaped as `shape` says
        /// (1 segment of a user array: a plain buffer).
        fn event(&mut self, read: bool, bytes: &[u8], segments: usize, shape: Shape) {
            let buf = if segments <= 1 && shape == Shape::Iovec {
                Buffer::at(buf_kind::PLAIN, self.place(bytes))
            } else {
                let n = segments.max(1);
                let step = bytes.len().div_ceil(n).max(1);
                let skip = if shape == Shape::Kernel {
                    1 + bytes.len() % 5
                } else {
                    0
                };
                let mut iov = Vec::new();
                let parts: Vec<&[u8]> = bytes.chunks(step).collect();
                for (k, part) in parts.iter().enumerate() {
                    // Bytes an earlier call moved, before the event's in its first segment.
                    let mut room = if k == 0 { vec![0xdd; skip] } else { Vec::new() };
                    room.extend_from_slice(part);
                    // The last iovec has room to spare, as a read's buffer does: the walk
                    // must stop at the bytes the call moved.
                    if k + 1 == parts.len() {
                        room.extend_from_slice(&[0xee; 7]);
                    }
                    let at = self.place(&room);
                    iov.extend_from_slice(&at.to_le_bytes());
                    iov.extend_from_slice(&(room.len() as u64).to_le_bytes());
                }
                match shape {
                    Shape::Iovec => Buffer::at(buf_kind::IOVEC, self.place(&iov)),
                    Shape::Msghdr => {
                        let iov = self.place(&iov);
                        let mut hdr = vec![0u8; 56];
                        hdr[16..24].copy_from_slice(&iov.to_le_bytes());
                        Buffer::at(buf_kind::MSGHDR, self.place(&hdr))
                    }
                    Shape::Kernel => Buffer {
                        kind: buf_kind::KERNEL_IOVEC,
                        addr: self.place_kernel(&iov),
                        skip: skip as u32,
                    },
                }
            };
            let mut h2 = self.h2;
            let was_lost = if read { h2.rx.lost } else { h2.tx.lost } != 0;
            let lost = on_data(&mut h2, read, buf, bytes.len() as u64, self);
            if lost && !was_lost {
                self.lost += 1;
            }
            self.h2 = h2;
        }
        fn read(&mut self, bytes: &[u8]) -> &mut Self {
            self.event(true, bytes, 1, Shape::Iovec);
            self
        }
        fn write(&mut self, bytes: &[u8]) -> &mut Self {
            self.event(false, bytes, 1, Shape::Iovec);
            self
        }
        fn connected() -> Self {
            let mut s = Self::default();
            s.h2.rx.need = PREFACE_LEN;
            s
        }
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])
    }
    fn data(stream: u32, n: usize) -> Vec<u8> {
        frame(0x0, 0, stream, &vec![b'x'; n])
    }
    fn window_update(stream: u32) -> Vec<u8> {
        frame(0x8, 0, stream, &[0, 1, 0, 0])
    }
    fn headers(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        frame(0x1, flags | END_HEADERS, stream, block)
    }

    /// A string literal, plain or Huffman-coded (upper-case tokens and digits only).
    fn string(value: &str, huffman: bool) -> Vec<u8> {
        let coded = if huffman {
            huffman_test(value)
        } else {
            value.as_bytes().to_vec()
        };
        let mut out = integer_bytes(coded.len() as u32, 7, if huffman { 0x80 } else { 0 });
        out.extend(coded);
        out
    }
    fn integer_bytes(mut v: u32, bits: u32, high: u8) -> Vec<u8> {
        let max = (1u32 << bits) - 1;
        if v < max {
            return vec![high | v as u8];
        }
        let mut out = vec![high | max as u8];
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
        out
    }
    /// The test's own Huffman coder, for letters and digits (RFC 7541, Appendix B).
    fn huffman_test(value: &str) -> Vec<u8> {
        let mut bits: Vec<bool> = Vec::new();
        for c in value.bytes() {
            let (code, len) = match c {
                b'0'..=b'2' => ((c - b'0') as u32, 5),
                b'3'..=b'9' => (0x19 + (c - b'3') as u32, 6),
                _ => upper_code(c),
            };
            for i in (0..len).rev() {
                bits.push(code >> i & 1 == 1);
            }
        }
        while !bits.len().is_multiple_of(8) {
            bits.push(true);
        }
        bits.chunks(8)
            .map(|b| b.iter().fold(0u8, |acc, &bit| acc << 1 | bit as u8))
            .collect()
    }

    /// How a request's `:method` is encoded.
    #[derive(Clone, Copy, Debug)]
    enum MethodField {
        /// The static table entry (GET and POST only).
        Indexed,
        /// A literal with the static name: the representation's first bits, Huffman or not.
        Literal(u8, bool),
        /// From the connection's dynamic table (not knowable): OTHER.
        Dynamic,
        /// A literal with a literal (plain) name, `:method` (methods of up to 6 letters:
        /// the field fits the window read at once).
        LiteralName,
    }

    fn method_field(method: &str, how: MethodField) -> Vec<u8> {
        match how {
            MethodField::Indexed if method == "GET" => vec![0x82],
            MethodField::Indexed if method == "POST" => vec![0x83],
            MethodField::Dynamic => vec![0x80 | 62],
            MethodField::Indexed => {
                let mut f = vec![0x42];
                f.extend(string(method, true));
                f
            }
            MethodField::Literal(first, h) => {
                let mut f = vec![first | 2];
                f.extend(string(method, h));
                f
            }
            MethodField::LiteralName => {
                let mut f = vec![0x40];
                f.extend(string(":method", false));
                f.extend(string(method, false));
                f
            }
        }
    }

    fn request_block(method: &str, how: MethodField, path: &str, order: u8) -> Vec<u8> {
        let mut path_field = vec![0x04];
        if order & 8 != 0 {
            // gRPC's C core: `:path` with a literal name.
            path_field = vec![0x40];
            path_field.extend(string(":path", false));
        }
        path_field.extend(string(path, false));
        let fields = [method_field(method, how), vec![0x86], path_field, {
            let mut f = vec![0x41];
            f.extend(string("localhost:8000", false));
            f
        }];
        let mut block = Vec::new();
        if order & 4 != 0 {
            block.extend([0x3f, 0xe1, 0x1f]); // a dynamic table size update (4096)
        }
        // :method first, or after :scheme and :path, or last of the four.
        let positions: [[usize; 4]; 3] = [[0, 1, 2, 3], [1, 2, 0, 3], [1, 2, 3, 0]];
        for i in positions[(order % 3) as usize] {
            block.extend(&fields[i]);
        }
        // A regular header: user-agent (static name 58).
        block.push(0x40 | 58);
        block.extend(string("flyprobe-test", false));
        block
    }

    fn status_block(status: u16, how: u8) -> Vec<u8> {
        let index = STATIC_STATUS.iter().position(|&s| s == status);
        let mut block = Vec::new();
        if how & 4 != 0 {
            block.extend([0x3f, 0xe1, 0x1f]);
        }
        match (index, how % 4) {
            (Some(i), 0) => block.push(0x88 + i as u8),
            (_, h) => {
                block.push([0x48, 0x08, 0x18, 0x48][h as usize]);
                block.extend(string(&std::format!("{status}"), h != 1));
            }
        }
        block.push(0x40 | 31); // content-type
        block.extend(string("text/plain", false));
        block
    }

    #[test]
    fn huffman_codes_match_an_independent_encoder() {
        // From Python's hpack 4 (`Encoder().encode([(":method", m)], huffman=True)`).
        let expected: [(&[u8], &str); 7] = [
            (b"HEAD", "c7821bff"),
            (b"PUT", "d7c37f"),
            (b"DELETE", "bf833e0df83f"),
            (b"PATCH", "d70efbd8ff"),
            (b"OPTIONS", "d5af7e4d5a777f"),
            (b"CONNECT", "bdab4e9c17b7ff"),
            (b"TRACE", "dfb61bd83f"),
        ];
        for (token, hex) in expected {
            let (code, len) = huffman_upper(token);
            let got: std::string::String = code[..len]
                .iter()
                .map(|b| std::format!("{b:02x}"))
                .collect();
            assert_eq!(got, hex, "{}", std::str::from_utf8(token).unwrap());
        }
        // Statuses as the same encoder sends them: 0x48, length | 0x80, code.
        for (status, code) in [
            (201, &[0x10, 0x03][..]),
            (302, &[0x64, 0x02]),
            (100, &[0x08, 0x01]),
            (503, &[0x6c, 0x0c, 0xff]),
            (299, &[0x13, 0xef, 0xff]),
            (418, &[0x68, 0x2f, 0x7f]),
        ] {
            let mut w = [0u8; WINDOW];
            w[..code.len()].copy_from_slice(code);
            assert_eq!(
                status_value(&w, code.len(), 0, code.len() as u32, true),
                status
            );
            assert_eq!(huffman_test(&std::format!("{status}")), code);
        }
    }

    #[test]
    fn a_stream_opened_by_the_client_is_a_request_its_response_headers_answer_it() {
        let mut s = Server::connected();
        s.write(&settings());
        let mut first = PREFACE.to_vec();
        first.extend(settings());
        first.extend(window_update(0));
        first.extend(headers(
            1,
            END_STREAM,
            &request_block("GET", MethodField::Indexed, "/", 0),
        ));
        s.read(&first);
        assert_eq!(s.opened, vec![(1, "GET")]);
        assert_eq!(s.h2.streams.open(), 1, "in flight");
        let mut reply = headers(1, 0, &status_block(200, 0));
        reply.extend(data(1, 5));
        reply.extend(frame(0x0, END_STREAM, 1, b""));
        s.write(&reply);
        assert_eq!(s.responded.get(&1), Some(&("GET", 200)));
        assert_eq!((s.h2.streams.open(), s.lost), (0, 0));
    }

    #[test]
    fn multiplexed_streams_are_answered_in_any_order_and_trailers_count_once() {
        let mut s = Server::connected();
        let mut reqs = PREFACE.to_vec();
        reqs.extend(settings());
        for (i, m) in ["GET", "POST", "PUT", "DELETE"].iter().enumerate() {
            let how = if i < 2 {
                MethodField::Indexed
            } else {
                MethodField::Literal(0x00, true)
            };
            reqs.extend(headers(
                2 * i as u32 + 1,
                0,
                &request_block(m, how, "/x", i as u8),
            ));
            reqs.extend(data(2 * i as u32 + 1, 3));
        }
        s.read(&reqs);
        assert_eq!(s.h2.streams.open(), 4);
        // Client trailers on stream 3 are not a request.
        s.read(&headers(3, END_STREAM, &[0x40 | 58, 0x01, b'x']));
        assert_eq!(s.opened.len(), 4);
        let mut out = Vec::new();
        for (stream, status) in [(7, 204), (3, 201), (1, 500), (5, 302)] {
            out.extend(headers(stream, 0, &status_block(status, stream as u8)));
            out.extend(data(stream, 10));
            // gRPC-style trailers: no :status, a literal name.
            let mut trailer = vec![0x40, 0x0b];
            trailer.extend(b"grpc-status");
            trailer.extend([0x01, b'0']);
            out.extend(headers(stream, END_STREAM, &trailer));
        }
        s.write(&out);
        let got: Vec<_> = s.responded.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            got,
            vec![
                (1, ("GET", 500)),
                (3, ("POST", 201)),
                (5, ("PUT", 302)),
                (7, ("DELETE", 204))
            ]
        );
        assert_eq!(s.h2.streams.open(), 0);
    }

    #[test]
    fn an_interim_status_leaves_the_stream_open() {
        let mut s = Server::connected();
        let mut r = PREFACE.to_vec();
        r.extend(headers(
            1,
            0,
            &request_block("PUT", MethodField::Literal(0x40, false), "/u", 0),
        ));
        s.read(&r);
        s.write(&headers(1, 0, &status_block(100, 1)));
        assert_eq!(s.h2.streams.open(), 1);
        s.write(&headers(1, END_STREAM, &status_block(201, 2)));
        assert_eq!(s.responded.get(&1), Some(&("PUT", 201)));
    }

    #[test]
    fn a_method_or_status_from_the_dynamic_table_is_not_known() {
        let mut s = Server::connected();
        let mut r = PREFACE.to_vec();
        r.extend(headers(
            1,
            0,
            &request_block("PUT", MethodField::Dynamic, "/", 0),
        ));
        s.read(&r);
        s.write(&headers(1, 0, &[0x80 | 63]));
        assert_eq!(s.responded.get(&1), Some(&("OTHER", 0)));
        assert_eq!(status_class(0), 0);
    }

    #[test]
    fn frame_headers_split_across_reads_and_iovecs_are_followed() {
        let mut bytes = PREFACE.to_vec();
        for i in 0..5u32 {
            bytes.extend(headers(
                2 * i + 1,
                END_STREAM,
                &request_block("GET", MethodField::Indexed, "/", 0),
            ));
        }
        // Every split point, through a plain buffer, through three iovecs (the second read's
        // in a msghdr), and through the kernel's copy of three.
        for cut in 1..bytes.len() {
            for (segments, first, second) in [
                (1, Shape::Iovec, Shape::Iovec),
                (3, Shape::Iovec, Shape::Msghdr),
                (3, Shape::Kernel, Shape::Kernel),
            ] {
                let mut s = Server::connected();
                s.event(true, &bytes[..cut], segments, first);
                s.event(true, &bytes[cut..], segments, second);
                assert_eq!(
                    s.opened.len(),
                    5,
                    "cut at {cut}, {segments} {first:?} iovecs"
                );
                assert_eq!(s.lost, 0);
            }
        }
    }

    #[test]
    fn more_frames_in_one_event_than_the_walk_steps_through_lose_the_direction_once() {
        let mut s = Server::connected();
        let mut r = PREFACE.to_vec();
        for _ in 0..MAX_STEPS + 1 {
            r.extend(window_update(0));
        }
        r.extend(headers(
            1,
            0,
            &request_block("GET", MethodField::Indexed, "/", 0),
        ));
        s.read(&r);
        assert_eq!((s.lost, s.h2.rx.lost), (1, 1));
        s.read(&headers(
            3,
            0,
            &request_block("GET", MethodField::Indexed, "/", 0),
        ));
        assert_eq!(s.lost, 1, "reported once");
        assert!(s.opened.is_empty(), "nothing is counted from lost frames");
    }

    #[test]
    fn bytes_without_a_buffer_keep_step_only_inside_a_frame() {
        let mut s = Server::connected();
        s.write(&frame(0x0, 0, 1, b"")[..]);
        s.write(&[0, 0x10, 0, 0, 0, 0, 0, 0, 1]); // a DATA header announcing 4096 bytes
        let mut h2 = s.h2;
        // sendfile: 4096 bytes of that frame's payload, unseen.
        assert!(!on_data(
            &mut h2,
            false,
            Buffer::at(buf_kind::NONE, 0),
            4096,
            &mut s
        ));
        assert_eq!(h2.tx.need, 0);
        assert!(
            on_data(&mut h2, false, Buffer::at(buf_kind::NONE, 0), 10, &mut s),
            "past the frame: lost"
        );
    }

    /// One request/response exchange of a random connection.
    #[derive(Clone, Debug)]
    struct Exchange {
        method: &'static str,
        how: MethodField,
        order: u8,
        status: u16,
        status_how: u8,
        body: usize,
        interim: bool,
        /// The request target's length: a long one is cut by buffer ends.
        path: usize,
        /// 0: answered; 1: the client resets it before the answer; 2: the server refuses it
        /// (RST_STREAM instead of an answer).
        reset: u8,
        /// The request's HEADERS frame is PADDED (bit 0) and has PRIORITY (bit 1).
        framing: u8,
    }

    fn arb_exchange() -> impl Strategy<Value = Exchange> {
        (
            0..9usize,
            0..6u8,
            0..16u8,
            prop::sample::select(vec![
                200u16, 201, 204, 206, 301, 304, 400, 404, 418, 500, 503,
            ]),
            0..8u8,
            0..300usize,
            any::<bool>(),
            1..300usize,
            prop::sample::select(vec![0u8, 0, 0, 1, 2]),
            0..4u8,
        )
            .prop_map(
                |(m, how, order, status, status_how, body, interim, path, reset, framing)| {
                    let method = METHODS[m + 1];
                    let how = match how {
                        0 if method == "GET" || method == "POST" => MethodField::Indexed,
                        0 | 1 => MethodField::Literal(0x40, true),
                        2 => MethodField::Literal(0x00, false),
                        3 => MethodField::Literal(0x10, true),
                        4 if method.len() <= 6 => MethodField::LiteralName,
                        _ => MethodField::Literal(0x40, false),
                    };
                    Exchange {
                        method,
                        how,
                        order,
                        status,
                        status_how,
                        body,
                        interim,
                        path,
                        reset,
                        framing,
                    }
                },
            )
    }

    /// Random cuts of `bytes` into events, each through 1..=3 iovecs.
    fn events(bytes: &[u8], cuts: &[(usize, u8)]) -> Vec<(Vec<u8>, usize, Shape)> {
        let mut out = Vec::new();
        let mut at = 0;
        for &(size, shape) in cuts {
            if at >= bytes.len() {
                break;
            }
            let end = (at + size).min(bytes.len());
            out.push((
                bytes[at..end].to_vec(),
                1 + (shape % 3) as usize,
                [Shape::Iovec, Shape::Msghdr, Shape::Kernel][(shape / 3) as usize],
            ));
            at = end;
        }
        if at < bytes.len() {
            out.push((bytes[at..].to_vec(), 1, Shape::Iovec));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Requests multiplexed on one connection, answered in reverse, with bodies, window
        /// updates and interim responses, read and written in random pieces: each stream is
        /// one request with its method, answered once with its status.
        #[test]
        fn every_stream_is_one_request_with_its_method_and_status(
            exchanges in prop::collection::vec(arb_exchange(), 1..8),
            rcuts in prop::collection::vec((1..120usize, 0..9u8), 0..12),
            wcuts in prop::collection::vec((1..120usize, 0..9u8), 0..12),
        ) {
            let mut client = PREFACE.to_vec();
            client.extend(settings());
            let mut server = settings();
            server.extend(frame(0x4, 0x1, 0, b""));
            for (i, e) in exchanges.iter().enumerate() {
                let id = 2 * i as u32 + 1;
                let end = if e.body == 0 { END_STREAM } else { 0 };
                let path = std::format!("/{}", "p".repeat(e.path));
                let block = request_block(e.method, e.how, &path, e.order);
                let (mut payload, mut flags) = (Vec::new(), end | END_HEADERS);
                if e.framing & 1 != 0 {
                    payload.push(3);
                    flags |= 0x8;
                }
                if e.framing & 2 != 0 {
                    payload.extend([0, 0, 0, 0, 15]);
                    flags |= 0x20;
                }
                payload.extend(&block);
                if e.framing & 1 != 0 {
                    payload.extend([0; 3]);
                }
                client.extend(frame(0x1, flags, id, &payload));
                if e.body > 0 {
                    client.extend(data(id, e.body));
                    client.extend(frame(0x0, END_STREAM, id, b""));
                }
                if e.reset == 1 {
                    client.extend(frame(0x3, 0, id, &[0, 0, 0, 8]));
                }
            }
            client.extend(window_update(0));
            for (i, e) in exchanges.iter().enumerate().rev() {
                let id = 2 * i as u32 + 1;
                if e.reset == 1 {
                    continue;
                }
                if e.reset == 2 {
                    server.extend(frame(0x3, 0, id, &[0, 0, 0, 7]));
                    continue;
                }
                if e.interim {
                    server.extend(headers(id, 0, &status_block(100, 1)));
                }
                server.extend(headers(id, 0, &status_block(e.status, e.status_how)));
                server.extend(data(id, e.body + 1));
                server.extend(window_update(id));
            }
            let mut s = Server::connected();
            for (bytes, segments, shape) in events(&client, &rcuts) {
                s.event(true, &bytes, segments, shape);
            }
            let cancelled = exchanges.iter().filter(|e| e.reset == 1).count() as u32;
            prop_assert_eq!(s.opened.len(), exchanges.len(), "each stream opened once");
            prop_assert_eq!(s.h2.streams.open(), exchanges.len() as u32 - cancelled);
            for (bytes, segments, shape) in events(&server, &wcuts) {
                s.event(false, &bytes, segments, shape);
            }
            prop_assert_eq!(s.lost, 0);
            prop_assert_eq!(s.h2.streams.open(), 0);
            let want: Vec<_> = exchanges
                .iter()
                .enumerate()
                .filter(|(_, e)| e.reset == 0)
                .map(|(i, e)| (2 * i as u32 + 1, (e.method, e.status)))
                .collect();
            let got: Vec<_> = s.responded.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(got, want);
            let aborted: Vec<_> = exchanges
                .iter()
                .enumerate()
                .filter(|(_, e)| e.reset != 0)
                .map(|(i, e)| (2 * i as u32 + 1, e.method))
                .collect();
            let got: Vec<_> = s.aborted.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(got, aborted, "reset streams are aborted with their methods");
        }

        /// Whatever the bytes, the walk neither panics nor reads outside them.
        #[test]
        fn the_walk_is_total(bytes in prop::collection::vec(any::<u8>(), 0..400), read: bool, segments in 1..4usize, kernel: bool) {
            let mut s = Server::connected();
            let shape = if kernel { Shape::Kernel } else { Shape::Iovec };
            s.event(read, &bytes, segments, shape);
            s.event(!read, &bytes, 1, Shape::Iovec);
        }
    }
}
