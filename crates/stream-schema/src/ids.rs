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

/// A tenant: the owner of sessions. Every API key belongs to one; 1–64 chars of
/// `[A-Za-z0-9_-]` (no `/`, `.` or `:`, so it can prefix a session id, sit in a stream token
/// and in a stats key name without ambiguity).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    pub const MAX_LEN: usize = 64;
    /// The tenant of keys configured without one. Its sessions keep their plain ids in Redis,
    /// so data written before tenants existed stays readable.
    pub const DEFAULT: &'static str = "default";

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token(raw, Self::MAX_LEN, "A-Z a-z 0-9 _ -", |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
        })?;
        Ok(Self(raw.to_owned()))
    }

    pub fn default_tenant() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A session. Two forms share this type:
/// - a client's id, as clients name it (SPEC §2): 1–128 chars of `[A-Za-z0-9_.:-]`, what
///   [`SessionId::parse`] accepts. No braces, so it cannot break the `{…}` hash tag it is
///   placed in.
/// - the stored id the gateway derives from (tenant, client id) with [`SessionId::scoped`]:
///   the client id itself for the default tenant, `<tenant>/<client id>` for any other. `/`
///   is in no client id, so the mapping is injective: two tenants' `user_123` never share a
///   key, and no client can name another tenant's session. Every Redis key, job, record and
///   metadata hash holds the stored form; `FromStr` and `Deserialize` (which read stored
///   values) accept both forms, client input must go through `parse`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    /// Longest client id.
    pub const MAX_LEN: usize = 128;
    /// Separates the tenant from the client id in a stored id.
    const TENANT_SEPARATOR: char = '/';

    /// A client's session id: 1–128 chars of `[A-Za-z0-9_.:-]`.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token(raw, Self::MAX_LEN, "A-Z a-z 0-9 _ . : -", |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
        })?;
        Ok(Self(raw.to_owned()))
    }

    /// A stored id: a client id, or `<tenant>/<client id>` of a tenant other than the default.
    pub fn parse_stored(raw: &str) -> Result<Self, IdError> {
        match raw.split_once(Self::TENANT_SEPARATOR) {
            None => Self::parse(raw),
            Some((tenant, client)) => {
                let tenant = TenantId::parse(tenant)?;
                let client = Self::parse(client)?;
                if tenant.is_default() {
                    // The default tenant's ids are stored plain: one id, one spelling.
                    return Err(IdError::Charset {
                        allowed: "A-Z a-z 0-9 _ . : - (the default tenant has no prefix)",
                    });
                }
                Ok(Self::scoped(&tenant, &client))
            }
        }
    }

    /// The stored id of `client` (a client's id, from `parse`) in `tenant`.
    pub fn scoped(tenant: &TenantId, client: &SessionId) -> Self {
        let client = client.client();
        if tenant.is_default() {
            return Self(client.to_owned());
        }
        Self(format!("{tenant}{}{client}", Self::TENANT_SEPARATOR))
    }

    /// The tenant of a stored id (`default` for a plain one).
    pub fn tenant(&self) -> TenantId {
        TenantId(
            self.0
                .split_once(Self::TENANT_SEPARATOR)
                .map_or(TenantId::DEFAULT, |(tenant, _)| tenant)
                .to_owned(),
        )
    }

    /// The id as its client names it (a stored id without its tenant).
    pub fn client(&self) -> &str {
        self.0
            .split_once(Self::TENANT_SEPARATOR)
            .map_or(self.0.as_str(), |(_, client)| client)
    }

    /// The client's id as a `SessionId` (what responses and events echo).
    pub fn client_id(&self) -> SessionId {
        Self(self.client().to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SessionId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse_stored(s)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse_stored(&raw).map_err(serde::de::Error::custom)
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
display_as_str!(ModelId, TenantId);

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
    fn tenants_never_share_a_stored_session_id() -> Result<(), IdError> {
        let client = SessionId::parse("user_123")?;
        let acme = TenantId::parse("acme")?;
        let default = TenantId::default_tenant();
        let scoped = SessionId::scoped(&acme, &client);
        assert_eq!(scoped.as_str(), "acme/user_123");
        assert_eq!(SessionId::scoped(&default, &client).as_str(), "user_123");
        assert_eq!(scoped.tenant(), acme);
        assert_eq!(scoped.client(), "user_123");
        assert_eq!(SessionId::scoped(&default, &client).tenant(), default);
        // Stored ids read back; clients cannot name them.
        assert_eq!("acme/user_123".parse::<SessionId>()?, scoped);
        assert!(SessionId::parse("acme/user_123").is_err());
        // One spelling per id: no prefix for the default tenant, one tenant at most.
        for bad in ["default/x", "a/b/c", "/x", "a/", "a.b/x", "a/{x}"] {
            assert!(SessionId::parse_stored(bad).is_err(), "{bad:?} accepted");
        }
        // Scoping an already scoped id keeps its client part only.
        assert_eq!(SessionId::scoped(&acme, &scoped), scoped);
        Ok(())
    }

    proptest::proptest! {
        /// Any (tenant, client id) pair has one stored id, which reads back to that pair:
        /// two different pairs never share a stored id.
        #[test]
        fn scoping_is_injective(
            tenant in "[A-Za-z0-9_-]{1,64}",
            client in "[A-Za-z0-9_.:-]{1,128}",
            other_tenant in "[A-Za-z0-9_-]{1,64}",
            other_client in "[A-Za-z0-9_.:-]{1,128}",
        ) {
            let pair = |t: &str, c: &str| -> Result<SessionId, IdError> {
                Ok(SessionId::scoped(&TenantId::parse(t)?, &SessionId::parse(c)?))
            };
            let stored = pair(&tenant, &client)?;
            let read: SessionId = stored.as_str().parse()?;
            proptest::prop_assert_eq!(&read, &stored);
            proptest::prop_assert_eq!(read.tenant(), TenantId::parse(&tenant)?);
            proptest::prop_assert_eq!(read.client(), client.as_str());
            let other = pair(&other_tenant, &other_client)?;
            proptest::prop_assert_eq!(
                stored == other,
                tenant == other_tenant && client == other_client
            );
        }
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
