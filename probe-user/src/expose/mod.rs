//! What flyprobe serves, each built from a `Snapshot`: Prometheus metrics and OpenMetrics
//! text, the JSON API, the HTTP endpoint with its dashboard and web config, and the access
//! log.

pub mod access_log;
pub mod api;
pub mod endpoint;
pub mod metrics;
pub mod openmetrics;
pub mod web_config;
