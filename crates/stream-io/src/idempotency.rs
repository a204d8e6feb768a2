//! Owner of the idempotency records `llm:idem:{key:id}:…`: per API key and `Idempotency-Key`,
//! the digest of the first start's body, claimed before anything starts, and that start's
//! response once it succeeded. Hashing the header and comparing bodies is the caller's policy.

use std::collections::HashMap;

use fred::prelude::*;
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
    let claimed: bool = client.hsetnx(key.as_str(), F_BODY, body_digest).await?;
    if claimed {
        let ttl = i64::try_from(remember_secs).unwrap_or(i64::MAX);
        let _: () = client.expire(key.as_str(), ttl, None).await?;
        return Ok(ClaimOutcome::Claimed(IdempotencyClaim { key }));
    }
    let mut seen: HashMap<String, String> = client.hgetall(key.as_str()).await?;
    Ok(ClaimOutcome::Seen {
        body_digest: seen.remove(F_BODY),
        response: seen.remove(F_RESPONSE),
    })
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
