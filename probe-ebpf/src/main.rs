//! flyprobe's kernel programs: tracepoints only (no kprobes, no BTF), so they load on any
//! kernel from 5.8 (ring buffer) on. Grouped by event family:
//! - `connections`: accept/accept4 exit starts a connection, close ends it;
//! - `io`: the read and write syscall families drive the request/response turn;
//! - `requests`: what a turn records (labelled counts, durations, the access log);
//! - `lifecycle`: fork extends the target set in the kernel, exit ends a process.
#![no_std]
#![no_main]

mod connections;
mod io;
mod lifecycle;
mod maps;
mod record;
mod requests;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
