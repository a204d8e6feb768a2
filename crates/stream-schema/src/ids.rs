//! Validated identifiers. A value of these types is safe to place inside a Redis key.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be 1 to {max} characters long")]
    Length { max: usize },
    #[error("may only contain {allowed}")]
    Charset { allowed: &'static str },
    #[error("not a stream entry id (expected <ms>-<seq>)")]
    EntryId,
    #[error("not a request id (expected a UUID)")]
    RequestId,
}

fn check_token(
    raw: &str,
    max: usize,
    allowed: &'static str,
    ok: fn(char) -> bool,
) -> Result<(), IdError> {
    if raw.is_empty() || raw.len() > max {
        return Err(IdError::Length { max });
    }
    if !raw.chars().all(ok) {
        return Err(IdError::Charset { allowed });
    }
    Ok(())
}

/// A client's session: 1–128 chars of `[A-Za-z0-9_.:-]` (SPEC §2). No braces, so it cannot break
/// the `{…}` hash tag it is placed in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token(raw, Self::MAX_LEN, "A-Z a-z 0-9 _ . : -", |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
        })?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A configured model's id as clients name it (`gpt-4`): 1–64 chars of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ModelId(String);

impl ModelId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token(raw, Self::MAX_LEN, "A-Z a-z 0-9 _ . : -", |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
        })?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One chat request: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(uuid::Uuid);

impl RequestId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        // Only the hyphenated form, so one request has exactly one spelling in keys.
        if raw.len() != 36 {
            return Err(IdError::RequestId);
        }
        uuid::Uuid::parse_str(raw)
            .map(Self)
            .map_err(|_| IdError::RequestId)
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    )*};
}
display_as_str!(SessionId, ModelId);

impl FromStr for RequestId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// A Redis stream entry id `<ms>-<seq>`; the SSE `id:` of every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    /// Sorts before every real entry: reading "after ZERO" reads a stream from its start.
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    /// The greatest id that sorts before `self`: reading "after" it includes `self`.
    pub fn predecessor(self) -> Self {
        match (self.ms, self.seq) {
            (0, 0) => Self::ZERO,
            (ms, 0) => Self {
                ms: ms - 1,
                seq: u64::MAX,
            },
            (ms, seq) => Self { ms, seq: seq - 1 },
        }
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let (ms, seq) = match raw.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (raw, "0"),
        };
        let ms = ms.parse().map_err(|_| IdError::EntryId)?;
        let seq = seq.parse().map_err(|_| IdError::EntryId)?;
        Ok(Self { ms, seq })
    }
}

impl Ord for EntryId {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.seq).cmp(&(other.ms, other.seq))
    }
}

impl PartialOrd for EntryId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_follow_the_spec_charset() {
        assert!(SessionId::parse("user_123").is_ok());
        assert!(SessionId::parse("a.b:c-d_e").is_ok());
        assert!(SessionId::parse(&"x".repeat(128)).is_ok());
        for bad in ["", "a b", "a{b}", "a}", "ü", "a/b", "a\nb"] {
            assert!(SessionId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            SessionId::parse(&"x".repeat(129)),
            Err(IdError::Length { max: 128 })
        );
    }

    #[test]
    fn entry_ids_order_numerically() -> Result<(), IdError> {
        let a = EntryId::parse("999-5")?;
        let b = EntryId::parse("1000-0")?;
        assert!(a < b);
        assert_eq!(b.to_string(), "1000-0");
        assert_eq!(EntryId::parse("42")?, EntryId { ms: 42, seq: 0 });
        assert!(EntryId::parse("1-x").is_err());
        assert!(EntryId::parse("-1").is_err());
        assert_eq!(EntryId::parse("5-1")?.predecessor(), EntryId::parse("5-0")?);
        assert!(EntryId::parse("5-0")?.predecessor() < EntryId::parse("5-0")?);
        assert!(EntryId::parse("4-99")? < EntryId::parse("5-0")?.predecessor());
        Ok(())
    }

    #[test]
    fn request_ids_round_trip_only_in_hyphenated_form() -> Result<(), IdError> {
        let id = RequestId::new();
        assert_eq!(RequestId::parse(&id.to_string())?, id);
        assert!(RequestId::parse(&id.to_string().replace('-', "")).is_err());
        assert!(RequestId::parse("not-a-uuid").is_err());
        Ok(())
    }
}
