//! What every service starts with: settings, logging, the Redis connection, the ops endpoints
//! (`/healthz`, `/readyz`, `/metrics`), the shutdown signal, the command line, and the
//! lifecycle that ties them together (`lifecycle`).

pub mod backoff;
pub mod cli;
pub mod config;
pub mod lifecycle;
pub mod ops;
pub mod redis;
pub mod shutdown;
pub mod supervisor;
pub mod telemetry;

pub use config::{ConfigError, Settings};

/// The consumer name of this process in a consumer group: the configured one, or
/// `<role>-<host>-<pid>` so that every process (and every restart) is its own consumer.
pub fn consumer_name(configured: &str, role: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_owned());
    format!("{role}-{host}-{}", std::process::id())
}
