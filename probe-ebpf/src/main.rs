//! flyprobe's kernel programs (no kprobes). Three hook sets share the request logic; the
//! daemon attaches one:
//! - fentry (where the kernel allows BPF trampolines): `tcp_calls`, fexit on tcp_recvmsg and
//!   tcp_sendmsg, with the socket set's connection programs;
//! - socket (Linux >= 6.3): `sockets`, raw tracepoints on the socket layer, connections
//!   keyed by the kernel socket;
//! - syscall (the fallback): `connections` (accept/close) and `io` (the read and write
//!   syscall families), connections keyed by (process, fd).
//!
//! Shared:
//! - `io::transfer`: the request/response turn;
//! - `requests`: what a turn records (labelled counts, durations, the access log);
//! - `lifecycle`: fork extends the target set in the kernel, exit ends a process;
//! - `discovery`: exec and listen of untracked processes, for node-wide selectors;
//! - `unix`: unix-domain stream connections in the socket-keyed sets;
//! - `ports`: per watched listening port, the wait for a worker and the resets;
//! - `tls`: uprobes on OpenSSL, whose plaintext moves a TLS connection's turns.
#![no_std]
#![no_main]

mod connections;
mod discovery;
mod io;
mod lifecycle;
mod maps;
mod ports;
mod record;
mod requests;
mod sockets;
mod tcp_calls;
mod tls;
mod unix;

/// Does nothing: `cargo xtask bench` attaches it beside the real programs (hidden flag
/// `--calibration-probe`) to measure what an empty program costs on this machine, the floor
/// under every per-hook figure.
#[aya_ebpf::macros::tracepoint]
pub fn calibration(_ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
