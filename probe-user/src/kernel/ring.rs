//! Records of the kernel's ring buffers.

use std::{mem::size_of, ptr};

/// A record from a kernel ring buffer, if it is long enough.
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    // SAFETY: T is plain old data; the length is checked, alignment is not needed.
    (bytes.len() >= size_of::<T>())
        .then(|| unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
