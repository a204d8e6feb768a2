//! Rate limits, enforced atomically in Redis so N gateway replicas enforce one limit:
//! - requests per window per API key and per session: a sliding log (sorted set of start times);
//! - tokens per window per API key: a reservation in a fixed window (hash field per window),
//!   made at start for `maxTokens` (or the configured estimate) and reconciled by the processor
//!   from the actual usage.
//!
//! Scripts read the clock with Redis `TIME`, so every replica agrees on windows; tests pass an
//! explicit `now` to check window logic deterministically.

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use service_kit::config::LimitsSettings;
use stream_io::StreamIoError;
use stream_schema::{RedisKey, Reservation, SessionId};

/// KEYS: log. ARGV: now_ms ('' = Redis TIME), window_ms, limit, member.
/// Returns {1, 0} when admitted, {0, retry_after_ms} when full.
const REQUEST_LOG: &str = r"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return {1, 0}
";

/// KEYS: quota hash. ARGV: now_ms ('' = Redis TIME), window_ms, limit, tokens.
/// Returns {1, window index} when reserved, {0, retry_after_ms} when the window is full.
const RESERVE_TOKENS: &str = r"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local index = math.floor(now / window)
local used = tonumber(redis.call('HGET', KEYS[1], index) or '0')
if used + tokens > limit then
  return {0, (index + 1) * window - now}
end
redis.call('HINCRBY', KEYS[1], index, tokens)
-- Keep the current and previous window only: reconciliation may still refund the latter.
if redis.call('HLEN', KEYS[1]) > 2 then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(field) < index - 1 then redis.call('HDEL', KEYS[1], field) end
  end
end
redis.call('PEXPIRE', KEYS[1], window * 2)
return {1, index}
";

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

#[derive(Clone)]
pub struct RateLimiter {
    request_log: Script,
    reserve_tokens: Script,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            request_log: Script::from_lua(REQUEST_LOG),
            reserve_tokens: Script::from_lua(RESERVE_TOKENS),
        }
    }
}

fn pair(value: Value) -> Result<(i64, i64), StreamIoError> {
    let items = value.into_array();
    match (
        items.first().and_then(Value::as_i64),
        items.get(1).and_then(Value::as_i64),
    ) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(StreamIoError::Protocol(
            "rate-limit script reply".to_owned(),
        )),
    }
}

fn retry_secs(ms: i64) -> u64 {
    u64::try_from(ms.max(1)).unwrap_or(1).div_ceil(1000).max(1)
}

impl RateLimiter {
    /// One sliding-log check: admits and records `member`, or says when to retry.
    pub async fn check_log(
        &self,
        client: &Client,
        key: &RedisKey,
        limit: u32,
        window_ms: u64,
        member: &str,
        now_ms: Option<u64>,
    ) -> Result<Result<(), u64>, StreamIoError> {
        let args = vec![
            now_ms.map(|n| n.to_string()).unwrap_or_default(),
            window_ms.to_string(),
            limit.to_string(),
            member.to_owned(),
        ];
        let reply: Value = self
            .request_log
            .evalsha_with_reload(client, vec![key.to_string()], args)
            .await?;
        Ok(match pair(reply)? {
            (1, _) => Ok(()),
            (_, retry_ms) => Err(retry_secs(retry_ms)),
        })
    }

    /// Forgets a recorded request (a later limit refused it, so it did not count).
    async fn unrecord(&self, client: &Client, key: &RedisKey, member: &str) {
        let removed: Result<i64, _> = client.zrem(key.as_str(), member).await;
        if let Err(error) = removed {
            tracing::warn!(%error, "cannot undo a request-log entry");
        }
    }

    /// Reserves `tokens` in the current window, or says when the next window starts.
    pub async fn reserve(
        &self,
        client: &Client,
        key_id: &str,
        limit: u64,
        tokens: u32,
        window_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<Result<Reservation, u64>, StreamIoError> {
        let args = vec![
            now_ms.map(|n| n.to_string()).unwrap_or_default(),
            window_ms.to_string(),
            limit.to_string(),
            tokens.to_string(),
        ];
        let key = RedisKey::token_quota(key_id);
        let reply: Value = self
            .reserve_tokens
            .evalsha_with_reload(client, vec![key.to_string()], args)
            .await?;
        Ok(match pair(reply)? {
            (1, window) => Ok(Reservation {
                window: u64::try_from(window).unwrap_or(0),
                tokens,
            }),
            (_, retry_ms) => Err(retry_secs(retry_ms)),
        })
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
        let key_rpm = limits.requests_per_window(key_id);
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
        let session_rpm = limits.session_requests_per_minute;
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
        let tpm = limits.tokens_per_window(key_id);
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
