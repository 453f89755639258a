//! What flyprobe knows: the watched trees (`watched`), each process in them and its role
//! (`members`), workers' lifecycle (`lifecycle`), exited processes' final counters
//! (`retired`), the state the daemon keeps behind one lock (`state`), what survives a
//! restart (`persist`), and the one consistent view every scrape and API read is built from
//! (`snapshot`).

pub mod lifecycle;
pub mod members;
pub mod persist;
pub mod retired;
pub mod snapshot;
pub mod state;
pub mod watched;
