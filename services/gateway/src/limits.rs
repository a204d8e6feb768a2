//! Rate limits, enforced atomically in Redis so N gateway replicas enforce one limit:
//! - requests per window per API key and per session: a sliding log (sorted set of start times);
//! - tokens per window per API key: a reservation in a fixed window (hash field per window),
//!   made at start for `maxTokens` (or the configured estimate) and reconciled by the processor
//!   from the actual usage.
//!
//! The scripts live in `stream_io::quotas` (next to the processor's settlement); this module is
//! the policy: which limits apply to a start, in which order, and what a refusal says.

use fred::prelude::*;
use service_kit::config::LimitsSettings;
use stream_io::StreamIoError;
use stream_io::quotas::Quotas;
use stream_schema::{RedisKey, Reservation, SessionId};

/// A request refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: &'static str,
    /// Whole seconds until the request would be admitted (at least 1).
    pub retry_after_secs: u64,
}

/// Outcome of the checks for one start.
#[derive(Debug)]
pub enum Admission {
    Admitted(Option<Reservation>),
    Refused(Refusal),
}

#[derive(Clone, Default)]
pub struct RateLimiter {
    quotas: Quotas,
}

fn retry_secs(ms: i64) -> u64 {
    u64::try_from(ms.max(1)).unwrap_or(1).div_ceil(1000).max(1)
}

impl RateLimiter {
    /// One sliding-log check: admits and records `member`, or says in how many seconds to
    /// retry.
    pub async fn check_log(
        &self,
        client: &Client,
        key: &RedisKey,
        limit: u32,
        window_ms: u64,
        member: &str,
        now_ms: Option<u64>,
    ) -> Result<Result<(), u64>, StreamIoError> {
        Ok(self
            .quotas
            .check_request_log(client, key, limit, window_ms, member, now_ms)
            .await?
            .map_err(retry_secs))
    }

    /// Forgets a recorded request (a later limit refused it, so it did not count).
    async fn unrecord(&self, client: &Client, key: &RedisKey, member: &str) {
        if let Err(error) = self.quotas.forget_request(client, key, member).await {
            tracing::warn!(%error, "cannot undo a request-log entry");
        }
    }

    /// Reserves `tokens` in the current window, or says in how many seconds the next window
    /// starts.
    pub async fn reserve(
        &self,
        client: &Client,
        key_id: &str,
        limit: u64,
        tokens: u32,
        window_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<Result<Reservation, u64>, StreamIoError> {
        Ok(self
            .quotas
            .reserve_tokens(client, key_id, limit, tokens, window_ms, now_ms)
            .await?
            .map_err(retry_secs))
    }

    /// Every limit that applies to a start, in order: key requests, session requests, key
    /// tokens. A refusal undoes what the earlier checks recorded.
    pub async fn admit(
        &self,
        client: &Client,
        limits: &LimitsSettings,
        key_id: &str,
        session: &SessionId,
        max_tokens: Option<u32>,
        request_member: &str,
    ) -> Result<Admission, StreamIoError> {
        let window_ms = limits.window_secs.saturating_mul(1000);
        let key_log = RedisKey::key_request_log(key_id);
        let session_log = RedisKey::session_request_log(session);
        let key_rpm = limits.requests_per_window_for(key_id);
        if key_rpm > 0
            && let Err(retry) = self
                .check_log(client, &key_log, key_rpm, window_ms, request_member, None)
                .await?
        {
            return Ok(Admission::Refused(Refusal {
                limit: "requests per minute for this API key",
                retry_after_secs: retry,
            }));
        }
        let session_rpm = limits.session_requests_per_window;
        if session_rpm > 0
            && let Err(retry) = self
                .check_log(
                    client,
                    &session_log,
                    session_rpm,
                    window_ms,
                    request_member,
                    None,
                )
                .await?
        {
            if key_rpm > 0 {
                self.unrecord(client, &key_log, request_member).await;
            }
            return Ok(Admission::Refused(Refusal {
                limit: "requests per minute for this session",
                retry_after_secs: retry,
            }));
        }
        let tpm = limits.tokens_per_window_for(key_id);
        if tpm == 0 {
            return Ok(Admission::Admitted(None));
        }
        let tokens = max_tokens.unwrap_or(limits.default_token_estimate);
        match self
            .reserve(client, key_id, tpm, tokens, window_ms, None)
            .await?
        {
            Ok(reservation) => Ok(Admission::Admitted(Some(reservation))),
            Err(retry) => {
                if key_rpm > 0 {
                    self.unrecord(client, &key_log, request_member).await;
                }
                if session_rpm > 0 {
                    self.unrecord(client, &session_log, request_member).await;
                }
                Ok(Admission::Refused(Refusal {
                    limit: "tokens per minute for this API key",
                    retry_after_secs: retry,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_secs(1), 1);
        assert_eq!(retry_secs(999), 1);
        assert_eq!(retry_secs(1_000), 1);
        assert_eq!(retry_secs(1_001), 2);
        assert_eq!(retry_secs(-5), 1);
    }
}
