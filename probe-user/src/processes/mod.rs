//! Processes as /proc shows them: the tree (`tree`), which ones are servers (`selectors`,
//! `sockets`, `server_kind`), where they run (`containers`, `kubelet`), and their network
//! namespace's own counters (`netstat`). Reads the host; keeps no state of the daemon's.

pub mod containers;
pub mod kubelet;
pub mod netstat;
pub mod selectors;
pub mod server_kind;
pub mod sockets;
pub mod tree;
