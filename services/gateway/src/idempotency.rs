//! `Idempotency-Key` on chat start (SPEC §2): a retried start with the same key and body
//! returns the same response and starts nothing new.
//!
//! Per API key and Idempotency-Key, Redis keeps the body's digest (claimed before anything
//! starts) and, once the start succeeded, its response (`stream_io::idempotency` owns that
//! record). A retry with the same body gets the stored response; a different body, or a retry
//! while the first is still in flight, gets `409 idempotency_conflict`. A failed start releases
//! the key.

use actix_web::HttpRequest;
use fred::prelude::*;
use sha2::{Digest, Sha256};
use stream_io::idempotency::{self as record, ClaimOutcome, IdempotencyClaim};

use crate::error::ApiError;

/// How long a key is remembered.
const REMEMBER_SECS: u64 = 24 * 3_600;
/// Longest accepted header value.
const MAX_LEN: usize = 255;

/// What to do with a start.
pub enum Idempotency {
    /// First time this key is seen: go on, then record the outcome with the claim.
    Fresh(Claim),
    /// Seen and completed before with the same body: answer with this JSON.
    Replay(String),
}

/// A claimed key, to complete or release.
pub struct Claim(IdempotencyClaim);

/// The `Idempotency-Key` header, if any (400 when it is not 1–255 visible ASCII characters).
pub fn header(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= MAX_LEN && v.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "Idempotency-Key must be 1 to {MAX_LEN} visible ASCII characters"
            ))
        })?;
    Ok(Some(value.to_owned()))
}

fn conflict(message: &str) -> ApiError {
    ApiError::IdempotencyConflict(message.to_owned())
}

/// Claims `idempotency_key` for this API key and body, or finds its earlier outcome.
pub async fn begin(
    client: &Client,
    key_id: &str,
    idempotency_key: &str,
    body: &[u8],
) -> Result<Idempotency, ApiError> {
    let key_digest = hex::encode(Sha256::digest(idempotency_key));
    let digest = hex::encode(Sha256::digest(body));
    match record::claim(client, key_id, &key_digest, &digest, REMEMBER_SECS).await? {
        ClaimOutcome::Claimed(claim) => Ok(Idempotency::Fresh(Claim(claim))),
        ClaimOutcome::Seen {
            body_digest,
            response,
        } => {
            if body_digest.as_deref() != Some(digest.as_str()) {
                return Err(conflict(
                    "this Idempotency-Key was used with a different request body",
                ));
            }
            response.map(Idempotency::Replay).ok_or_else(|| {
                conflict("a request with this Idempotency-Key is still being started")
            })
        }
    }
}

impl Claim {
    /// Records the response a retry will get.
    pub async fn complete(&self, client: &Client, response: &str) -> Result<(), ApiError> {
        self.0.record(client, response).await?;
        Ok(())
    }

    /// The start failed: a retry may try again.
    pub async fn release(&self, client: &Client) {
        if let Err(error) = self.0.release(client).await {
            tracing::warn!(%error, "cannot release an Idempotency-Key; it expires by itself");
        }
    }
}
