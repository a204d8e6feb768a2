//! Token-quota reconciliation: a start reserved `maxTokens` (or an estimate) against its API
//! key's window; when the request finishes, the processor gives back what it did not use (or
//! charges what it used beyond). Exactly once: a marker per request, set in the same script.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::job::RequestMeta;
use stream_schema::{RedisKey, RequestId};

/// KEYS: quota hash, done marker. ARGV: window index, delta, marker ttl (s).
/// Returns 1 when applied, 0 when this request was reconciled before.
const RECONCILE: &str = r"
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
end
return 1
";

#[derive(Clone)]
pub struct Reconciler {
    script: Script,
    /// How long reconciliation markers live: past two windows a refund has nothing to adjust.
    marker_ttl_secs: u64,
}

impl Reconciler {
    pub fn new(window_secs: u64) -> Self {
        Self {
            script: Script::from_lua(RECONCILE),
            marker_ttl_secs: window_secs.saturating_mul(4).max(60),
        }
    }

    /// Settles the reservation of a finished request that produced `completion_tokens`.
    /// Requests without a reservation (no token limit, or metadata expired) are skipped.
    pub async fn settle(
        &self,
        client: &Client,
        request_id: &RequestId,
        completion_tokens: u32,
    ) -> Result<(), StreamIoError> {
        let fields: HashMap<String, String> = client
            .hgetall(RedisKey::request_meta(request_id).as_str())
            .await?;
        if fields.is_empty() {
            return Ok(());
        }
        let meta = match RequestMeta::decode(&fields) {
            Ok(meta) => meta,
            Err(error) => {
                tracing::warn!(%request_id, %error, "undecodable request metadata; quota not settled");
                return Ok(());
            }
        };
        let Some(reservation) = meta.reservation else {
            return Ok(());
        };
        let delta = i64::from(completion_tokens) - i64::from(reservation.tokens);
        let keys = vec![
            RedisKey::token_quota(&meta.key_id).to_string(),
            RedisKey::quota_reconciled(&meta.key_id, request_id).to_string(),
        ];
        let args = vec![
            reservation.window.to_string(),
            delta.to_string(),
            self.marker_ttl_secs.to_string(),
        ];
        let _: Value = self.script.evalsha_with_reload(client, keys, args).await?;
        Ok(())
    }
}
