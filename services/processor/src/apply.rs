//! Applying event records to the analytics counters exactly once.
//!
//! Delivery is at-least-once (a crash between applying and `XACK` redelivers), so each record
//! is applied by a script that first checks the shard's ledger of applied entry ids and records
//! the id in the same atomic step. The ledger and every counter hash a record touches carry the
//! shard's hash tag `{n}` (a session's records all live in one shard), so one script in one slot
//! updates them all: the totals of the session, the model, the model within the session's
//! tenant and the API key, and the same four for the record's minute. The tenant comes from the
//! session's stored id (`SessionId::tenant`), so records need no tenant field. What the hashes hold (field names, deltas, histogram buckets) is
//! defined once in `stream_schema::stats`, which the gateway reads with.
//!
//! The ledger only has to remember an id while the entry can still be delivered again, that is
//! until it is acknowledged: `XACK` and the removal from the ledger happen in one script (the
//! shard's stream and ledger share the slot), so the ledger holds what is in flight, not a
//! day's traffic. Its time bound (`processor.ledger_ttl_secs`) only clears ids whose entry
//! left the stream unacknowledged (trimmed by its cap while pending).

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::stats;
use stream_schema::{EntryId, EventRecord, ModelId, RedisKey, SessionId};

/// KEYS: ledger, then the counter hashes. ARGV: entry id, now ms, ledger ttl ms, then one TTL in
/// seconds per counter hash (in KEYS order), then field/delta pairs added to every hash.
/// Returns 1 when applied, 0 for a redelivery.
const APPLY: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2] - ARGV[3])
local hashes = #KEYS - 1
for k = 2, #KEYS do
  for i = 4 + hashes, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', KEYS[k], ARGV[k + 2])
end
return 1
";

/// KEYS: the shard's event stream, its ledger. ARGV: the group, then entry ids. Acknowledges the
/// entries and forgets them in the ledger in one step: nothing can deliver an acknowledged
/// entry again, and no crash can separate the two (which would apply a redelivery twice).
const ACK_AND_FORGET: &str = r"
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('ZREM', KEYS[2], unpack(ARGV, 2))
return 1
";

/// How long each kind of counter hash lives.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// An applied id that was never acknowledged (its entry trimmed while pending) leaves the
    /// ledger after this long; acknowledged ids leave at once.
    pub ledger_secs: u64,
    /// Totals expire this long after their last update.
    pub totals_secs: u64,
    /// A minute bucket expires this long after its minute ended.
    pub window_secs: u64,
}

#[derive(Clone)]
pub struct Applier {
    script: Script,
    ack_script: Script,
    retention: Retention,
}

/// The script call for one record.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

fn scope(record: &EventRecord) -> (&SessionId, &ModelId, u64) {
    (record.session_id(), record.model_id(), record.timestamp())
}

impl Applier {
    pub fn new(retention: Retention) -> Self {
        Self {
            script: Script::from_lua(APPLY),
            ack_script: Script::from_lua(ACK_AND_FORGET),
            retention,
        }
    }

    /// The keys and arguments that apply `record` (entry `id` of `shard`) at `now_ms`.
    /// `key_id` is the API key of the record's request; it is used only for records that count
    /// per key (`stats::counts_per_key`).
    pub fn invocation(
        &self,
        shard: u16,
        id: EntryId,
        record: &EventRecord,
        key_id: Option<&str>,
        now_ms: u64,
    ) -> Invocation {
        let (session, model, timestamp) = scope(record);
        let tenant = session.tenant();
        let key_id = key_id.filter(|_| stats::counts_per_key(record));
        let totals_ttl = self.retention.totals_secs.max(1);
        let per_session = stats::counts_per_session(record);
        let mut keys = vec![RedisKey::applied_ledger(shard).to_string()];
        let mut ttls = Vec::new();
        if per_session {
            keys.push(RedisKey::session_stats(shard, session).to_string());
            ttls.push(totals_ttl);
        }
        keys.push(RedisKey::model_stats(shard, model).to_string());
        keys.push(RedisKey::tenant_model_stats(shard, &tenant, model).to_string());
        ttls.extend([totals_ttl, totals_ttl]);
        if let Some(key_id) = key_id {
            keys.push(RedisKey::key_stats(shard, key_id).to_string());
            ttls.push(totals_ttl);
        }
        // The record's minute bucket lives until `window_secs` after that minute ended, counted
        // from the record's own time so a late (reclaimed) record lands where it belongs. A
        // record older than the retention has no window left to count in.
        let minute = stats::minute_of(timestamp);
        let bucket_end_secs = (minute + 1).saturating_mul(60);
        let expires_at = bucket_end_secs.saturating_add(self.retention.window_secs);
        let now_secs = now_ms / 1000;
        if expires_at > now_secs {
            let ttl = expires_at - now_secs;
            if per_session {
                keys.push(RedisKey::session_stats_minute(shard, session, minute).to_string());
                ttls.push(ttl);
            }
            keys.push(RedisKey::model_stats_minute(shard, model, minute).to_string());
            keys.push(
                RedisKey::tenant_model_stats_minute(shard, &tenant, model, minute).to_string(),
            );
            ttls.extend([ttl, ttl]);
            if let Some(key_id) = key_id {
                keys.push(RedisKey::key_stats_minute(shard, key_id, minute).to_string());
                ttls.push(ttl);
            }
        }
        let mut args = vec![
            id.to_string(),
            now_ms.to_string(),
            self.retention.ledger_secs.saturating_mul(1000).to_string(),
        ];
        args.extend(ttls.iter().map(u64::to_string));
        for (name, delta) in stats::deltas(record) {
            args.push(name);
            args.push(delta.to_string());
        }
        Invocation { keys, args }
    }

    /// Applies one record of `shard`; false when it had been applied before.
    pub async fn apply(
        &self,
        client: &Client,
        shard: u16,
        id: EntryId,
        record: &EventRecord,
        key_id: Option<&str>,
    ) -> Result<bool, StreamIoError> {
        let Invocation { keys, args } =
            self.invocation(shard, id, record, key_id, stream_schema::now_millis());
        #[expect(
            clippy::disallowed_methods,
            reason = "the processor alone writes llm:stats (the gateway only reads it, through \
                      stream_schema::stats); not a structure two services write"
        )]
        let applied: Value = self.script.evalsha_with_reload(client, keys, args).await?;
        Ok(applied.as_i64() == Some(1))
    }

    /// Acknowledges `ids` of `shard` in `group` and removes them from the ledger, atomically.
    pub async fn ack(
        &self,
        client: &Client,
        shard: u16,
        group: &str,
        ids: &[EntryId],
    ) -> Result<(), StreamIoError> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys = vec![
            RedisKey::events_shard(shard).to_string(),
            RedisKey::applied_ledger(shard).to_string(),
        ];
        let mut args = Vec::with_capacity(ids.len() + 1);
        args.push(group.to_owned());
        args.extend(ids.iter().map(EntryId::to_string));
        #[expect(
            clippy::disallowed_methods,
            reason = "the ack must be atomic with the processor-owned ledger, so it is one script \
                      in the shard's slot; only the processor group acks llm:events"
        )]
        let _: Value = self
            .ack_script
            .evalsha_with_reload(client, keys, args)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stream_schema::record::FallbackSide;
    use stream_schema::{RequestId, record::Outcome};

    fn applier() -> Applier {
        Applier::new(Retention {
            ledger_secs: 10,
            totals_secs: 100,
            window_secs: 7_200,
        })
    }

    fn started(timestamp: u64) -> Result<EventRecord, stream_schema::IdError> {
        started_in("s", timestamp)
    }

    fn started_in(session: &str, timestamp: u64) -> Result<EventRecord, stream_schema::IdError> {
        Ok(EventRecord::Started {
            request_id: RequestId::new(),
            session_id: SessionId::parse_stored(session)?,
            model_id: ModelId::parse("m")?,
            attempt: 1,
            timestamp,
        })
    }

    #[test]
    fn a_started_record_counts_for_session_model_and_key_in_totals_and_minute()
    -> Result<(), Box<dyn std::error::Error>> {
        let now = 3_600_000 + 30_000;
        let call =
            applier().invocation(2, EntryId::parse("5-0")?, &started(now)?, Some("team"), now);
        assert_eq!(
            call.keys,
            [
                "llm:stats:{2}:applied",
                "llm:stats:{2}:session:s",
                "llm:stats:{2}:model:m",
                "llm:stats:{2}:tenant:default:model:m",
                "llm:stats:{2}:key:team",
                "llm:stats:{2}:m:60:session:s",
                "llm:stats:{2}:m:60:model:m",
                "llm:stats:{2}:m:60:tenant:default:model:m",
                "llm:stats:{2}:m:60:key:team",
            ]
        );
        // id, now, ledger ms, 4 totals TTLs, 4 minute TTLs (minute ends in 30 s, + 2 h).
        assert_eq!(
            call.args,
            [
                "5-0", "3630000", "10000", "100", "100", "100", "100", "7230", "7230", "7230",
                "7230", "requests", "1"
            ]
        );
        Ok(())
    }

    #[test]
    fn a_tenants_record_counts_for_its_tenants_model() -> Result<(), Box<dyn std::error::Error>> {
        let now = 3_600_000;
        let record = started_in("acme/s", now)?;
        let call = applier().invocation(1, EntryId::parse("5-0")?, &record, None, now);
        assert!(
            call.keys
                .contains(&"llm:stats:{1}:tenant:acme:model:m".to_owned())
        );
        assert!(
            call.keys
                .contains(&"llm:stats:{1}:session:acme/s".to_owned())
        );
        assert!(!call.keys.iter().any(|k| k.contains("tenant:default")));
        Ok(())
    }

    #[test]
    fn tokens_records_skip_the_key_and_old_records_skip_the_window()
    -> Result<(), Box<dyn std::error::Error>> {
        let now = 100_000_000;
        let tokens = EventRecord::Tokens {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s")?,
            model_id: ModelId::parse("m")?,
            count: 32,
            timestamp: now,
        };
        let call = applier().invocation(0, EntryId::parse("1-0")?, &tokens, Some("team"), now);
        assert_eq!(call.keys.len(), 7);
        assert!(call.keys.iter().all(|k| !k.contains(":key:")));

        let old = now - 3 * 3_600_000;
        let finished = EventRecord::Finished {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s")?,
            model_id: ModelId::parse("m")?,
            outcome: Outcome::Completed(stream_schema::FinishReason::Stop),
            prompt_tokens: 1,
            completion_tokens: 2,
            ttft_ms: Some(3),
            duration_ms: 4,
            timestamp: old,
        };
        let call = applier().invocation(0, EntryId::parse("1-1")?, &finished, None, now);
        assert_eq!(call.keys.len(), 4);
        assert!(call.keys.iter().all(|k| !k.contains(":m:")));
        Ok(())
    }

    #[test]
    fn a_fallback_counts_for_its_model_only() -> Result<(), Box<dyn std::error::Error>> {
        let now = 3_600_000 + 30_000;
        let record = |side| -> Result<EventRecord, Box<dyn std::error::Error>> {
            Ok(EventRecord::FellBack {
                request_id: RequestId::new(),
                session_id: SessionId::parse("s")?,
                model_id: ModelId::parse("m")?,
                side,
                timestamp: now,
            })
        };
        let to = applier().invocation(
            2,
            EntryId::parse("5-0")?,
            &record(FallbackSide::To)?,
            Some("team"),
            now,
        );
        assert_eq!(
            to.keys,
            [
                "llm:stats:{2}:applied",
                "llm:stats:{2}:model:m",
                "llm:stats:{2}:tenant:default:model:m",
                "llm:stats:{2}:m:60:model:m",
                "llm:stats:{2}:m:60:tenant:default:model:m",
            ]
        );
        // id, now, ledger ms, then one TTL per hash: the deltas follow.
        assert_eq!(to.args[7..], ["requests", "1", "fallback_served", "1"]);
        let from = applier().invocation(
            2,
            EntryId::parse("5-1")?,
            &record(FallbackSide::From)?,
            None,
            now,
        );
        assert_eq!(from.args[7..], ["fell_back", "1"]);
        Ok(())
    }

    /// The ledger holds an id from its apply until its ack, and nothing after: a redelivery
    /// before the ack is still refused, and a day of traffic leaves the ledger empty.
    #[tokio::test]
    async fn the_ledger_forgets_an_id_when_its_entry_is_acknowledged()
    -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let log = stream_io::records::EventLog {
            shards: 8,
            maxlen: 1_000,
        };
        let record = started(stream_schema::now_millis())?;
        let session = SessionId::parse("s")?;
        let shard = stream_schema::keys::event_shard_of(&session, log.shards);
        let stream = log.shard_key(&session);
        let ledger = RedisKey::applied_ledger(shard);
        let group = "llm:processors";
        stream_io::groups::ensure_group(&client, &stream, group).await?;
        let id = log.append(&client, &record, None).await?;
        let read =
            stream_io::groups::read_new(&client, group, "c1", std::slice::from_ref(&stream), 10, 0)
                .await?;
        assert_eq!(read.first().map(|(_, entries)| entries.len()), Some(1));

        let applier = applier();
        assert!(applier.apply(&client, shard, id, &record, None).await?);
        assert!(!applier.apply(&client, shard, id, &record, None).await?);
        let held: u64 = client.zcard(ledger.as_str()).await?;
        assert_eq!(held, 1, "an applied, unacknowledged id stays in the ledger");

        applier.ack(&client, shard, group, &[id]).await?;
        let held: u64 = client.zcard(ledger.as_str()).await?;
        assert_eq!(held, 0, "an acknowledged id leaves the ledger");
        let pending: Value = client.xpending(stream.as_str(), group, ()).await?;
        let pending = pending.into_array();
        assert_eq!(pending.first().and_then(Value::as_i64), Some(0));
        Ok(())
    }
}
