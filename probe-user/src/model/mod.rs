//! What flyprobe knows: the watched trees and their workers' lifecycle (`watched`,
//! `lifecycle`), the state the daemon keeps behind one lock (`state`), what survives a
//! restart (`persist`), and the one consistent view every scrape and API read is built from
//! (`snapshot`).

pub mod lifecycle;
pub mod persist;
pub mod snapshot;
pub mod state;
pub mod watched;
