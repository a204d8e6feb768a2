//! Applying event records to the counters exactly once.
//!
//! Delivery is at-least-once (a crash between applying and `XACK` redelivers), so each record
//! is applied by a script that first checks the shard's ledger of applied entry ids and records
//! the id in the same atomic step. The ledger and the counters of the shard share its slot.

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::record::Outcome;
use stream_schema::{EntryId, EventRecord, StreamKey};

/// KEYS: ledger, session stats, model stats. ARGV: entry id, now ms, ledger ttl ms, stats ttl s,
/// then field/delta pairs. Returns 1 when applied, 0 for a redelivery.
const APPLY: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2] - ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
";

/// Counter field names of the stats hashes (`GET /api/analytics/...` reads them).
pub mod field {
    pub const REQUESTS: &str = "requests";
    pub const RESTARTS: &str = "restarts";
    pub const TOKENS: &str = "tokens_streamed";
    pub const PROMPT_TOKENS: &str = "prompt_tokens";
    pub const COMPLETION_TOKENS: &str = "completion_tokens";
    pub const FINISHED: &str = "finished";
    pub const TTFT_MS_SUM: &str = "ttft_ms_sum";
    pub const TTFT_COUNT: &str = "ttft_count";
    pub const DURATION_MS_SUM: &str = "duration_ms_sum";
}

/// The counter deltas a record stands for.
pub fn deltas(record: &EventRecord) -> Vec<(String, i64)> {
    use field::*;
    match record {
        EventRecord::Started { attempt, .. } => {
            let name = if *attempt <= 1 { REQUESTS } else { RESTARTS };
            vec![(name.to_owned(), 1)]
        }
        EventRecord::Tokens { count, .. } => vec![(TOKENS.to_owned(), i64::from(*count))],
        EventRecord::Finished {
            outcome,
            prompt_tokens,
            completion_tokens,
            ttft_ms,
            duration_ms,
            ..
        } => {
            let outcome_field = match outcome {
                Outcome::Completed(reason) => format!("finish:{reason}"),
                Outcome::Failed(code) => format!("error:{code}"),
            };
            let mut d = vec![
                (FINISHED.to_owned(), 1),
                (outcome_field, 1),
                (PROMPT_TOKENS.to_owned(), i64::from(*prompt_tokens)),
                (COMPLETION_TOKENS.to_owned(), i64::from(*completion_tokens)),
                (
                    DURATION_MS_SUM.to_owned(),
                    i64::try_from(*duration_ms).unwrap_or(i64::MAX),
                ),
            ];
            if let Some(ttft) = ttft_ms {
                d.push((
                    TTFT_MS_SUM.to_owned(),
                    i64::try_from(*ttft).unwrap_or(i64::MAX),
                ));
                d.push((TTFT_COUNT.to_owned(), 1));
            }
            d
        }
    }
}

#[derive(Clone)]
pub struct Applier {
    script: Script,
    pub ledger_ttl_ms: u64,
    pub stats_ttl_secs: u64,
}

impl Applier {
    pub fn new(ledger_ttl_secs: u64, stats_ttl_secs: u64) -> Self {
        Self {
            script: Script::from_lua(APPLY),
            ledger_ttl_ms: ledger_ttl_secs.saturating_mul(1000),
            stats_ttl_secs,
        }
    }

    /// Applies one record of `shard`; false when it had been applied before.
    pub async fn apply(
        &self,
        client: &Client,
        shard: u16,
        id: EntryId,
        record: &EventRecord,
    ) -> Result<bool, StreamIoError> {
        let (session, model) = match record {
            EventRecord::Started {
                session_id,
                model_id,
                ..
            }
            | EventRecord::Tokens {
                session_id,
                model_id,
                ..
            }
            | EventRecord::Finished {
                session_id,
                model_id,
                ..
            } => (session_id, model_id),
        };
        let keys = vec![
            StreamKey::applied_ledger(shard).to_string(),
            StreamKey::session_stats(shard, session).to_string(),
            StreamKey::model_stats(shard, model).to_string(),
        ];
        let mut args = vec![
            id.to_string(),
            stream_schema::now_millis().to_string(),
            self.ledger_ttl_ms.to_string(),
            self.stats_ttl_secs.to_string(),
        ];
        for (name, delta) in deltas(record) {
            args.push(name);
            args.push(delta.to_string());
        }
        let applied: Value = self.script.evalsha_with_reload(client, keys, args).await?;
        Ok(applied.as_i64() == Some(1))
    }
}
