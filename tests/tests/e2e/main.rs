//! End-to-end suite: each test starts its own redis-server and the real service binaries
//! (build them first: `cargo build --workspace --bins`), then talks HTTP/SSE like a client.

mod aisdk;
mod analytics;
mod browser;
mod chat_flow;
mod cli;
mod cluster;
mod connection_view;
mod content;
mod delivery;
mod limits;
mod observability;
mod openai_sdk;
mod producer;
mod providers;
mod security;
mod stack;
mod tenants;
mod traces;
