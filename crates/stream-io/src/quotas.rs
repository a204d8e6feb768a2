//! Owner of the rate-limit and token-quota structures, writers side by side:
//! - `llm:rl:{key:id}` and `llm:rl:{session}:session`: sliding logs of request start times
//!   (sorted sets), checked and extended by the gateway;
//! - `llm:quota:{key:id}`: tokens reserved per fixed window (hash field = window index), reserved
//!   by the gateway at start and settled by the processor from the actual usage, exactly once
//!   per request thanks to a marker `llm:quota:{key:id}:done:request` set in the same script.
//!
//! Scripts read the clock with Redis `TIME`, so every gateway replica agrees on windows; tests
//! pass an explicit `now_ms` to check window logic deterministically.

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_schema::keys::FLAG_SET;
use stream_schema::{RedisKey, RequestId, Reservation};

use crate::error::StreamIoError;

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
-- Keep the current and previous window only: settlement may still refund the latter.
if redis.call('HLEN', KEYS[1]) > 2 then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(field) < index - 1 then redis.call('HDEL', KEYS[1], field) end
  end
end
redis.call('PEXPIRE', KEYS[1], window * 2)
return {1, index}
";

/// KEYS: quota hash, done marker. ARGV: window index, delta, marker ttl (s), marker value.
/// Returns 1 when applied, 0 when this request was settled before. A window that is gone
/// (expired, or trimmed by a later reservation) has nothing left to adjust.
const SETTLE: &str = r"
if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'EX', ARGV[3]) then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
end
return 1
";

/// The quota scripts, loaded once per process.
#[derive(Clone)]
pub struct Quotas {
    request_log: Script,
    reserve_tokens: Script,
    settle: Script,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            request_log: Script::from_lua(REQUEST_LOG),
            reserve_tokens: Script::from_lua(RESERVE_TOKENS),
            settle: Script::from_lua(SETTLE),
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

fn now_arg(now_ms: Option<u64>) -> String {
    now_ms.map(|n| n.to_string()).unwrap_or_default()
}

impl Quotas {
    /// One sliding-log check of `log` (a `RedisKey::key_request_log` or
    /// `RedisKey::session_request_log`): admits and records `member`, or answers the
    /// milliseconds until the log admits one more. `now_ms: None` reads Redis's clock.
    pub async fn check_request_log(
        &self,
        client: &Client,
        log: &RedisKey,
        limit: u32,
        window_ms: u64,
        member: &str,
        now_ms: Option<u64>,
    ) -> Result<Result<(), i64>, StreamIoError> {
        let args = vec![
            now_arg(now_ms),
            window_ms.to_string(),
            limit.to_string(),
            member.to_owned(),
        ];
        let reply: Value = self
            .request_log
            .evalsha_with_reload(client, vec![log.to_string()], args)
            .await?;
        Ok(match pair(reply)? {
            (1, _) => Ok(()),
            (_, retry_ms) => Err(retry_ms),
        })
    }

    /// Forgets a recorded request (a later limit refused it, so it does not count).
    pub async fn forget_request(
        &self,
        client: &Client,
        log: &RedisKey,
        member: &str,
    ) -> Result<(), StreamIoError> {
        let _: i64 = client.zrem(log.as_str(), member).await?;
        Ok(())
    }

    /// Reserves `tokens` of API key `key_id`'s `limit` in the current window, or answers the
    /// milliseconds until the next window starts. `now_ms: None` reads Redis's clock.
    pub async fn reserve_tokens(
        &self,
        client: &Client,
        key_id: &str,
        limit: u64,
        tokens: u32,
        window_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<Result<Reservation, i64>, StreamIoError> {
        let args = vec![
            now_arg(now_ms),
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
            (_, retry_ms) => Err(retry_ms),
        })
    }

    /// Settles `request`'s `reservation` against the `completion_tokens` it produced: gives
    /// back what it did not use (or charges what it used beyond), once. The marker that makes
    /// it once lives `marker_ttl_secs`. Returns false when the request was settled before.
    pub async fn settle(
        &self,
        client: &Client,
        key_id: &str,
        request: &RequestId,
        reservation: Reservation,
        completion_tokens: u32,
        marker_ttl_secs: u64,
    ) -> Result<bool, StreamIoError> {
        let delta = i64::from(completion_tokens) - i64::from(reservation.tokens);
        let keys = vec![
            RedisKey::token_quota(key_id).to_string(),
            RedisKey::quota_reconciled(key_id, request).to_string(),
        ];
        let args = vec![
            reservation.window.to_string(),
            delta.to_string(),
            marker_ttl_secs.to_string(),
            FLAG_SET.to_owned(),
        ];
        let applied: Value = self.settle.evalsha_with_reload(client, keys, args).await?;
        Ok(applied.as_i64() == Some(1))
    }
}
