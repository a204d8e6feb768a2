//! The processor as a library on port 0 against a real redis-server: its lifecycle as seen
//! from `/readyz` and `/metrics`.

// Tests break Redis state on purpose (a shard key of the wrong type) with raw commands; the
// rule that services write shared keys only through stream_io holds for the service code.
#![expect(
    clippy::disallowed_methods,
    reason = "tests set up broken Redis state directly"
)]

mod gather;
mod lifecycle;
