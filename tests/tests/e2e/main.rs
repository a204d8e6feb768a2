//! End-to-end suite: each test starts its own redis-server and the real service binaries
//! (build them first: `cargo build --workspace --bins`), then talks HTTP/SSE like a client.

mod chat_flow;
mod delivery;
mod limits;
mod security;
mod stack;
