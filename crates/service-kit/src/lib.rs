//! What every service starts with: settings, logging, the Redis connection, the ops endpoints
//! (`/healthz`, `/readyz`, `/metrics`) and the shutdown signal.

pub mod cli;
pub mod config;
pub mod ops;
pub mod redis;
pub mod shutdown;
pub mod telemetry;

pub use config::{ConfigError, Settings};
