//! Owner of the cancel flags `llm:cancel:{session}:request`: the gateway sets one, the producer
//! sees it (inside the fenced append script, and with [`is_requested`] while it waits for the
//! upstream).

use fred::prelude::*;
use stream_schema::keys::FLAG_SET;
use stream_schema::{RedisKey, RequestId, SessionId};

use crate::error::StreamIoError;

/// Asks the producer to stop `request`; the flag expires after `ttl_secs` (the session
/// stream's lifetime: after that there is nothing left to cancel).
pub async fn request(
    client: &Client,
    session: &SessionId,
    request: &RequestId,
    ttl_secs: u64,
) -> Result<(), StreamIoError> {
    let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
    let _: () = client
        .set(
            RedisKey::cancel(session, request).as_str(),
            FLAG_SET,
            Some(Expiration::EX(ttl)),
            None,
            false,
        )
        .await?;
    Ok(())
}

/// Whether a cancel of `request` was asked for.
pub async fn is_requested(
    client: &Client,
    session: &SessionId,
    request: &RequestId,
) -> Result<bool, StreamIoError> {
    Ok(client
        .exists(RedisKey::cancel(session, request).as_str())
        .await?)
}
