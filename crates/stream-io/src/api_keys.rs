//! Owner of the API key store `llm:keys:{auth}` and its version counter: the gateway's admin
//! endpoints add and revoke keys, every gateway polls the version and reloads the hash when it
//! moved. Each change and its version bump happen in one script (both keys share the `{auth}`
//! slot), so a replica that saw a version also sees the change.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_schema::{DecodeError, RedisKey, StoredApiKey};

use crate::error::StreamIoError;

/// KEYS: the hash, the version. ARGV: key id, record. Adds the record unless the id exists.
const ADD: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
";

/// KEYS: the hash, the version. ARGV: key id, the record the caller read ('' = none), the new
/// record. Replaces the record only if it is still the one the caller read.
const REPLACE: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('INCR', KEYS[2])
return 1
";

/// The key store's scripts.
#[derive(Clone)]
pub struct ApiKeyStore {
    add: Script,
    replace: Script,
}

impl Default for ApiKeyStore {
    fn default() -> Self {
        Self {
            add: Script::from_lua(ADD),
            replace: Script::from_lua(REPLACE),
        }
    }
}

/// One stored key as read: its record, or why it could not be decoded.
pub type Loaded = Vec<(String, Result<StoredApiKey, DecodeError>)>;

impl ApiKeyStore {
    /// Adds `record` under `id`; false when the id is taken (also by a revoked key).
    pub async fn add(
        &self,
        client: &Client,
        id: &str,
        record: &StoredApiKey,
    ) -> Result<bool, StreamIoError> {
        let keys = vec![
            RedisKey::api_keys().to_string(),
            RedisKey::api_keys_version().to_string(),
        ];
        let added: Value = self
            .add
            .evalsha_with_reload(client, keys, vec![id.to_owned(), record.encode()])
            .await?;
        Ok(added.as_i64() == Some(1))
    }

    /// Replaces the record of `id` with `record` if it is still `read` (`None`: no record
    /// yet, e.g. revoking a configured key); false when it changed meanwhile.
    pub async fn replace(
        &self,
        client: &Client,
        id: &str,
        read: Option<&str>,
        record: &StoredApiKey,
    ) -> Result<bool, StreamIoError> {
        let keys = vec![
            RedisKey::api_keys().to_string(),
            RedisKey::api_keys_version().to_string(),
        ];
        let args = vec![
            id.to_owned(),
            read.unwrap_or_default().to_owned(),
            record.encode(),
        ];
        let replaced: Value = self.replace.evalsha_with_reload(client, keys, args).await?;
        Ok(replaced.as_i64() == Some(1))
    }
}

/// The store's version: 0 before the first change.
pub async fn version(client: &Client) -> Result<u64, StreamIoError> {
    let version: Option<u64> = client.get(RedisKey::api_keys_version().as_str()).await?;
    Ok(version.unwrap_or(0))
}

/// The raw record of `id`, as `replace` expects it back.
pub async fn raw(client: &Client, id: &str) -> Result<Option<String>, StreamIoError> {
    Ok(client.hget(RedisKey::api_keys().as_str(), id).await?)
}

/// Every stored key, decoded one by one (a bad record does not hide the others).
pub async fn load(client: &Client) -> Result<Loaded, StreamIoError> {
    let raw: HashMap<String, String> = client.hgetall(RedisKey::api_keys().as_str()).await?;
    Ok(raw
        .into_iter()
        .map(|(id, value)| {
            let record = StoredApiKey::decode(&value);
            (id, record)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use stream_schema::{KeyRole, TenantId};
    use test_support::RedisServer;

    use super::*;

    fn record(revoked: bool) -> anyhow::Result<StoredApiKey> {
        Ok(StoredApiKey {
            sha256: "0f".repeat(32),
            tenant: TenantId::parse("acme")?,
            role: KeyRole::Chat,
            revoked,
            created_at: 1,
        })
    }

    #[tokio::test]
    async fn keys_are_added_once_and_revoked_by_compare_and_set() -> anyhow::Result<()> {
        let redis = RedisServer::start().await?;
        let client = redis.client().await?;
        let store = ApiKeyStore::default();
        assert_eq!(version(&client).await?, 0);
        assert!(store.add(&client, "k1", &record(false)?).await?);
        assert!(!store.add(&client, "k1", &record(false)?).await?);
        assert_eq!(version(&client).await?, 1);

        let read = raw(&client, "k1").await?;
        // A stale read loses; the current one wins and bumps the version.
        assert!(
            !store
                .replace(&client, "k1", Some("stale"), &record(true)?)
                .await?
        );
        assert!(
            store
                .replace(&client, "k1", read.as_deref(), &record(true)?)
                .await?
        );
        assert_eq!(version(&client).await?, 2);
        // A configured key (no record yet) is revoked by writing its first record.
        assert!(store.replace(&client, "cfg", None, &record(true)?).await?);
        let loaded = load(&client).await?;
        assert_eq!(loaded.len(), 2);
        assert!(
            loaded
                .iter()
                .all(|(_, r)| r.as_ref().is_ok_and(|r| r.revoked))
        );
        Ok(())
    }
}
