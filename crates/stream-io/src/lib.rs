//! Redis stream IO on `fred`, in terms of the `stream-schema` types: parsing stream replies,
//! range reads, consumer-group helpers, the fenced session-stream writes and the event-record
//! and dead-letter appends.
//!
//! **Invariant**: every write to a session stream after `start` goes through
//! [`session::SessionScripts`], whose scripts check the request's owner attempt atomically, so
//! one request never interleaves two attempts.

pub mod entry;
pub mod error;
pub mod groups;
pub mod records;
pub mod session;

pub use entry::{Entry, parse_entries, parse_xread};
pub use error::StreamIoError;

/// `MAXLEN ~ n`: approximate trimming, which Redis does in whole macro-nodes (cheap).
pub fn approx_cap(maxlen: u64) -> (&'static str, &'static str, i64) {
    ("MAXLEN", "~", i64::try_from(maxlen).unwrap_or(i64::MAX))
}
