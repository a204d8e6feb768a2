//! Redis stream IO on `fred`, in terms of the `stream-schema` types: parsing stream replies,
//! range reads, consumer-group helpers, the fenced session-stream writes, and one owner module
//! per Redis structure that two services share (`api_keys`, `requests`, `quotas`, `cancel`,
//! `idempotency`, `connections`, `session`, `records` for event records and dead letters).
//!
//! **Invariant**: services talk to shared keys only through these modules (the services'
//! `clippy.toml` denies raw fred write commands there).
//!
//! **Invariant**: every write to a session stream after `start` goes through
//! [`session::SessionScripts`], whose scripts check the request's owner attempt atomically, so
//! one request never interleaves two attempts.

pub mod api_keys;
mod call_args;
pub mod cancel;
pub mod connections;
pub mod entry;
pub mod error;
pub mod groups;
pub mod idempotency;
pub mod quotas;
pub mod records;
pub mod requests;
pub mod session;

pub use entry::{Entry, RawEntry, RawStream, parse_entries, parse_xread, parse_xread_frame};
pub use error::StreamIoError;

/// `MAXLEN ~ n`: approximate trimming, which Redis does in whole macro-nodes (cheap).
pub fn approx_cap(maxlen: u64) -> (&'static str, &'static str, i64) {
    ("MAXLEN", "~", i64::try_from(maxlen).unwrap_or(i64::MAX))
}
