//! API keys kept in Redis (`llm:keys:{auth}`), so keys are added and revoked while gateways run:
//! one hash field per key id, holding what a gateway needs to authenticate a request.
//!
//! The secret itself is never stored: only its SHA-256, as in the config file.

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, string_enum};
use crate::ids::TenantId;

string_enum! {
    /// What a key may do. `chat` starts, streams and cancels its tenant's chats and reads its
    /// tenant's analytics; `admin` can do that too, and reads every tenant's analytics and
    /// manages keys.
    pub enum KeyRole {
        Chat = "chat",
        Admin = "admin",
    }
}

/// Version of the stored record; a record with another one is skipped (and logged) by readers.
const RECORD_VERSION: u32 = 1;

/// One key's record: the value of its field in `llm:keys:{auth}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredApiKey {
    /// Lowercase hex SHA-256 of the key.
    pub sha256: String,
    pub tenant: TenantId,
    pub role: KeyRole,
    /// A revoked key stays listed (its id is never reused) but authenticates nothing.
    pub revoked: bool,
    /// Unix ms.
    pub created_at: u64,
}

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    #[serde(flatten)]
    record: T,
}

impl StoredApiKey {
    pub fn encode(&self) -> String {
        serde_json::to_string(&Versioned {
            v: RECORD_VERSION,
            record: self,
        })
        .unwrap_or_default()
    }

    pub fn decode(raw: &str) -> Result<Self, DecodeError> {
        let versioned: Versioned<serde_json::Value> =
            serde_json::from_str(raw).map_err(|e| DecodeError::InvalidField {
                field: "key",
                reason: e.to_string(),
            })?;
        if versioned.v != RECORD_VERSION {
            return Err(DecodeError::UnknownVersion(versioned.v.to_string()));
        }
        let record: Self =
            serde_json::from_value(versioned.record).map_err(|e| DecodeError::InvalidField {
                field: "key",
                reason: e.to_string(),
            })?;
        if record.sha256.len() != 64 || !record.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DecodeError::InvalidField {
                field: "sha256",
                reason: "not 64 hex digits".to_owned(),
            });
        }
        Ok(record)
    }
}

/// Whether `id` is a valid key id: 1–64 of `[A-Za-z0-9_-]` (what the config accepts too).
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_bad_ones_are_errors() -> Result<(), Box<dyn std::error::Error>> {
        let record = StoredApiKey {
            sha256: "ab".repeat(32),
            tenant: TenantId::parse("acme")?,
            role: KeyRole::Chat,
            revoked: false,
            created_at: 7,
        };
        assert_eq!(StoredApiKey::decode(&record.encode())?, record);
        assert!(StoredApiKey::decode("{").is_err());
        assert!(StoredApiKey::decode(&record.encode().replace("\"v\":1", "\"v\":9")).is_err());
        assert!(StoredApiKey::decode(&record.encode().replace("acme", "a/b")).is_err());
        assert!(StoredApiKey::decode(&record.encode().replace("abab", "zz")).is_err());
        Ok(())
    }
}
