//! flyprobe: watches a server's process tree from the kernel and serves Prometheus metrics.
//!
//! The folders are the pipeline, and imports point down it:
//! - `kernel`: load and attach the eBPF object, read its maps and rings.
//! - `processes`: /proc: process trees, which processes are servers, their containers.
//! - `model`: the watched trees, worker lifecycle, the daemon's state, its snapshot.
//! - `expose`: metrics, the JSON API, the HTTP endpoint and dashboard, the access log.
//! - `daemon`: start-up and the run loop that drives the others.
//!
//! Beside them: `cli` (the command line), `error` (start-up errors and exit codes) and
//! `privileges` (what the daemon keeps after attaching).

pub mod cli;
pub mod daemon;
pub mod error;
pub mod expose;
pub mod kernel;
pub mod model;
pub mod privileges;
pub mod processes;
