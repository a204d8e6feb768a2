//! Owner of the idempotency records `llm:idem:{key:id}:…`: per API key and `Idempotency-Key`,
//! the digest of the first start's body, claimed before anything starts, and that start's
//! response once it succeeded. Hashing the header and comparing bodies is the caller's policy.

use std::collections::HashMap;
use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
use stream_schema::RedisKey;
use stream_schema::idempotency::{F_BODY, F_RESPONSE};

use crate::error::StreamIoError;

/// What claiming an `Idempotency-Key` found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// Nobody used the key before: this start owns it until it records a response or releases.
    Claimed(IdempotencyClaim),
    /// The key is taken: the first start's body digest and, when it succeeded, its response.
    Seen {
        body_digest: Option<String>,
        response: Option<String>,
    },
}

/// A claimed idempotency record, to complete with [`IdempotencyClaim::record`] or give back
/// with [`IdempotencyClaim::release`].
#[derive(Debug)]
pub struct IdempotencyClaim {
    key: RedisKey,
}

/// Claims the record of (`key_id`, `idempotency_key_sha256`) for a body with digest
/// `body_digest`, remembered for `remember_secs`; or reads what an earlier start left there.
pub async fn claim(
    client: &Client,
    key_id: &str,
    idempotency_key_sha256: &str,
    body_digest: &str,
    remember_secs: u64,
) -> Result<ClaimOutcome, StreamIoError> {
    let key = RedisKey::idempotency(key_id, idempotency_key_sha256);
    let ttl = remember_secs.max(1).to_string();
    let reply: Value = CLAIM
        .evalsha_with_reload(
            client,
            vec![key.to_string()],
            vec![F_BODY.to_owned(), body_digest.to_owned(), ttl],
        )
        .await?;
    if reply.as_i64() == Some(1) {
        return Ok(ClaimOutcome::Claimed(IdempotencyClaim { key }));
    }
    let mut seen = field_map(reply)?;
    Ok(ClaimOutcome::Seen {
        body_digest: seen.remove(F_BODY),
        response: seen.remove(F_RESPONSE),
    })
}

/// Claims the record and sets its expiry in one step (a gateway that died between a separate
/// `HSETNX` and `EXPIRE` would leave a record that never expires and blocks its key forever);
/// a taken record answers its fields instead.
const CLAIM_LUA: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return redis.call('HGETALL', KEYS[1])
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::from_lua(CLAIM_LUA));

/// The `HGETALL` reply (field, value, field, value…) as a map.
fn field_map(reply: Value) -> Result<HashMap<String, String>, StreamIoError> {
    let Value::Array(items) = reply else {
        return Err(StreamIoError::Protocol(format!(
            "idempotency claim answered {reply:?}"
        )));
    };
    let mut items = items.into_iter();
    let mut map = HashMap::new();
    while let (Some(field), Some(value)) = (items.next(), items.next()) {
        match (field.into_string(), value.into_string()) {
            (Some(field), Some(value)) => {
                map.insert(field, value);
            }
            _ => {
                return Err(StreamIoError::Protocol(
                    "idempotency record with a non-string field".to_owned(),
                ));
            }
        }
    }
    Ok(map)
}

impl IdempotencyClaim {
    /// Records the response a retried start will get.
    pub async fn record(&self, client: &Client, response: &str) -> Result<(), StreamIoError> {
        let _: () = client
            .hset(self.key.as_str(), (F_RESPONSE, response))
            .await?;
        Ok(())
    }

    /// Gives the key back (the start failed): a retry may try again.
    pub async fn release(&self, client: &Client) -> Result<(), StreamIoError> {
        let _: i64 = client.del(self.key.as_str()).await?;
        Ok(())
    }
}
