//! Drains the kernel's lifecycle ring buffer (fork and exit of tracked processes).

use std::{mem::size_of, ptr};

use aya::maps::{MapData, RingBuf};
use probe_common::ProcEvent;
use tokio::io::{Interest, unix::AsyncFd};

use crate::state::Shared;

pub async fn pump(ring: RingBuf<MapData>, state: Shared) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
    loop {
        let mut guard = ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(event) = decode::<ProcEvent>(&item) {
                state.on_event(event);
            }
        }
        guard.clear_ready();
    }
}

/// A record from a kernel ring buffer, if it is long enough.
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    // SAFETY: T is plain old data; the length is checked, alignment is not needed.
    (bytes.len() >= size_of::<T>())
        .then(|| unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
