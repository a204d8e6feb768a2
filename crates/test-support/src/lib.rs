//! Helpers for integration and end-to-end tests (and the bench): real `redis-server` instances
//! (single node and a 3-master cluster), spawned service binaries with captured logs, one
//! launcher for a whole stack from typed settings, condition waits and an SSE client.
//!
//! Everything here returns `anyhow::Result` so a test can `?` its way through setup and get a
//! message that says which step failed. Every process a helper starts is our own child and is
//! killed when its handle drops, also when the test panics.

pub mod http;
pub mod process;
pub mod redis;
pub mod sockets;
pub mod sse;
pub mod stack;

pub use http::{metric_sample, wait_for_http_ok, wait_until};
pub use process::{ServiceProcess, bin_path, find_on_path, free_port};
pub use redis::{
    GroupConsumer, RedisCluster, RedisServer, command_calls, connect_client, group_consumers,
};
pub use sse::{SseClient, SseConnection, SseEvent};
pub use stack::{RedisSource, Service, ServiceKind, Stack, StackOptions, StackRedis, sha256_hex};
