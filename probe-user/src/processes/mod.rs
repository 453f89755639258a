//! Processes as /proc shows them: the tree (`tree`), which ones are servers (`selectors`,
//! `sockets`, `server_kind`) and where they run (`containers`, `kubelet`). Reads the host;
//! keeps no state of the daemon's.

pub mod containers;
pub mod kubelet;
pub mod selectors;
pub mod server_kind;
pub mod sockets;
pub mod tree;
