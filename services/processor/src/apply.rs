//! Applying event records to the analytics counters exactly once.
//!
//! Delivery is at-least-once (a crash between applying and `XACK` redelivers), so records are
//! applied by a script that first checks the shard's ledger of applied entry ids and records
//! the ids in the same atomic step. One script call applies a whole batch of a shard's records:
//! it sums what the new records add to each counter hash and increments every hash field and
//! refreshes every TTL once per batch, so counters shared by many records (a model's, a
//! tenant's, the minute's) cost a few commands per batch instead of a few per record. The ledger and every counter hash a record touches carry the
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

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::stats;
use stream_schema::{EntryId, EventRecord, ModelId, RedisKey, SessionId};

/// KEYS: the ledger, then the counter hashes of the batch, each once. ARGV: now ms, ledger ttl
/// ms, one TTL in seconds per counter hash (in KEYS order), the number of records, then per
/// record: its entry id, how many hashes it counts in and their KEYS indexes, how many deltas
/// it adds and the field/delta pairs (added to each of its hashes). Returns per record 1 when
/// applied, 0 for a redelivery (already in the ledger, or twice in this batch).
const APPLY: &str = r"
local hashes = #KEYS - 1
local count = tonumber(ARGV[3 + hashes])
local pos = 4 + hashes
local records, ids = {}, {}
for r = 1, count do
  local record = {id = ARGV[pos], hashes = {}}
  local refs = tonumber(ARGV[pos + 1])
  pos = pos + 2
  for i = 1, refs do
    record.hashes[i] = tonumber(ARGV[pos])
    pos = pos + 1
  end
  record.deltas = tonumber(ARGV[pos])
  record.first = pos + 1
  pos = record.first + 2 * record.deltas
  records[r] = record
  ids[r] = record.id
end
-- unpack has a stack limit (8,000 values): ledger commands go in chunks of 1,000 records.
local seen = {}
for i = 1, count, 1000 do
  local last = math.min(i + 999, count)
  local part = redis.call('ZMSCORE', KEYS[1], unpack(ids, i, last))
  for j = i, last do seen[j] = part[j - i + 1] end
end
local result, ledger, fresh, sums, touched = {}, {}, {}, {}, {}
for r = 1, count do
  local record = records[r]
  if seen[r] or fresh[record.id] then
    result[r] = 0
  else
    result[r] = 1
    fresh[record.id] = true
    ledger[#ledger + 1] = ARGV[1]
    ledger[#ledger + 1] = record.id
    for _, k in ipairs(record.hashes) do
      local fields = sums[k]
      if not fields then
        fields = {}
        sums[k] = fields
        touched[#touched + 1] = k
      end
      for d = 0, record.deltas - 1 do
        local at = record.first + 2 * d
        fields[ARGV[at]] = (fields[ARGV[at]] or 0) + tonumber(ARGV[at + 1])
      end
    end
  end
end
for i = 1, #ledger, 2000 do
  redis.call('ZADD', KEYS[1], unpack(ledger, i, math.min(i + 1999, #ledger)))
end
if #ledger > 0 then
  for _, k in ipairs(touched) do
    for field, delta in pairs(sums[k]) do
      -- As an integer: a Lua number would reach Redis as '%.14g' text, not an integer.
      redis.call('HINCRBY', KEYS[k], field, string.format('%d', delta))
    end
    redis.call('EXPIRE', KEYS[k], ARGV[k + 1])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
return result
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

/// What one record adds to the counters.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordCounts {
    pub id: EntryId,
    /// The counter hashes it counts in, each with the TTL (seconds) it gets.
    pub hashes: Vec<(String, u64)>,
    /// Field/delta pairs added to each of its hashes.
    pub deltas: Vec<(String, i64)>,
}

/// The script call for a batch of records.
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

    /// What `record` (entry `id` of `shard`) adds to which counter hashes, at `now_ms`.
    /// `key_id` is the API key of the record's request; it is used only for records that count
    /// per key (`stats::counts_per_key`).
    pub fn counts(
        &self,
        shard: u16,
        id: EntryId,
        record: &EventRecord,
        key_id: Option<&str>,
        now_ms: u64,
    ) -> RecordCounts {
        let (session, model, timestamp) = scope(record);
        let tenant = session.tenant();
        let key_id = key_id.filter(|_| stats::counts_per_key(record));
        let totals_ttl = self.retention.totals_secs.max(1);
        let per_session = stats::counts_per_session(record);
        let mut hashes = Vec::with_capacity(8);
        if per_session {
            hashes.push((
                RedisKey::session_stats(shard, session).to_string(),
                totals_ttl,
            ));
        }
        hashes.push((RedisKey::model_stats(shard, model).to_string(), totals_ttl));
        hashes.push((
            RedisKey::tenant_model_stats(shard, &tenant, model).to_string(),
            totals_ttl,
        ));
        if let Some(key_id) = key_id {
            hashes.push((RedisKey::key_stats(shard, key_id).to_string(), totals_ttl));
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
                hashes.push((
                    RedisKey::session_stats_minute(shard, session, minute).to_string(),
                    ttl,
                ));
            }
            hashes.push((
                RedisKey::model_stats_minute(shard, model, minute).to_string(),
                ttl,
            ));
            hashes.push((
                RedisKey::tenant_model_stats_minute(shard, &tenant, model, minute).to_string(),
                ttl,
            ));
            if let Some(key_id) = key_id {
                hashes.push((
                    RedisKey::key_stats_minute(shard, key_id, minute).to_string(),
                    ttl,
                ));
            }
        }
        RecordCounts {
            id,
            hashes,
            deltas: stats::deltas(record),
        }
    }

    /// The script call that applies `batch` (records of `shard`) at `now_ms`: each counter
    /// hash named once, however many records count in it.
    pub fn invocation(&self, shard: u16, batch: &[RecordCounts], now_ms: u64) -> Invocation {
        let mut keys = vec![RedisKey::applied_ledger(shard).to_string()];
        let mut ttls = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut records = vec![batch.len().to_string()];
        for record in batch {
            records.push(record.id.to_string());
            records.push(record.hashes.len().to_string());
            for (key, ttl) in &record.hashes {
                let at = *index.entry(key.as_str()).or_insert_with(|| {
                    keys.push(key.clone());
                    ttls.push(*ttl);
                    keys.len()
                });
                records.push(at.to_string());
            }
            records.push(record.deltas.len().to_string());
            for (field, delta) in &record.deltas {
                records.push(field.clone());
                records.push(delta.to_string());
            }
        }
        let mut args = Vec::with_capacity(2 + ttls.len() + records.len());
        args.push(now_ms.to_string());
        args.push(self.retention.ledger_secs.saturating_mul(1000).to_string());
        args.extend(ttls.iter().map(u64::to_string));
        args.extend(records);
        Invocation { keys, args }
    }

    /// Applies a batch of records of `shard` in one script call; per record, false when it had
    /// been applied before.
    pub async fn apply(
        &self,
        client: &Client,
        shard: u16,
        batch: &[RecordCounts],
    ) -> Result<Vec<bool>, StreamIoError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let Invocation { keys, args } = self.invocation(shard, batch, stream_schema::now_millis());
        #[expect(
            clippy::disallowed_methods,
            reason = "the processor alone writes llm:stats (the gateway only reads it, through \
                      stream_schema::stats); not a structure two services write"
        )]
        let applied: Value = self.script.evalsha_with_reload(client, keys, args).await?;
        let applied: Vec<bool> = applied
            .into_array()
            .iter()
            .map(|flag| flag.as_i64() == Some(1))
            .collect();
        if applied.len() != batch.len() {
            return Err(StreamIoError::Protocol(format!(
                "the apply script answered {} flags for {} records",
                applied.len(),
                batch.len()
            )));
        }
        Ok(applied)
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
        let applier = applier();
        let counts = applier.counts(2, EntryId::parse("5-0")?, &started(now)?, Some("team"), now);
        let call = applier.invocation(2, &[counts], now);
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
        // now, ledger ms, 4 totals TTLs, 4 minute TTLs (minute ends in 30 s, + 2 h), then one
        // record: its id, its 8 hashes by KEYS index, its one delta.
        assert_eq!(
            call.args,
            [
                "3630000", "10000", "100", "100", "100", "100", "7230", "7230", "7230", "7230",
                "1", "5-0", "8", "2", "3", "4", "5", "6", "7", "8", "9", "1", "requests", "1"
            ]
        );
        Ok(())
    }

    #[test]
    fn a_tenants_record_counts_for_its_tenants_model() -> Result<(), Box<dyn std::error::Error>> {
        let now = 3_600_000;
        let record = started_in("acme/s", now)?;
        let counts = applier().counts(1, EntryId::parse("5-0")?, &record, None, now);
        let call = applier().invocation(1, &[counts], now);
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
        let call = applier().counts(0, EntryId::parse("1-0")?, &tokens, Some("team"), now);
        assert_eq!(call.hashes.len(), 6);
        assert!(call.hashes.iter().all(|(k, _)| !k.contains(":key:")));

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
        let call = applier().counts(0, EntryId::parse("1-1")?, &finished, None, now);
        assert_eq!(call.hashes.len(), 3);
        assert!(call.hashes.iter().all(|(k, _)| !k.contains(":m:")));
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
        let to = applier().counts(
            2,
            EntryId::parse("5-0")?,
            &record(FallbackSide::To)?,
            Some("team"),
            now,
        );
        let hashes: Vec<&str> = to.hashes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            hashes,
            [
                "llm:stats:{2}:model:m",
                "llm:stats:{2}:tenant:default:model:m",
                "llm:stats:{2}:m:60:model:m",
                "llm:stats:{2}:m:60:tenant:default:model:m",
            ]
        );
        let deltas = |counts: &RecordCounts| -> Vec<(String, i64)> { counts.deltas.clone() };
        assert_eq!(
            deltas(&to),
            [
                ("requests".to_owned(), 1),
                ("fallback_served".to_owned(), 1)
            ]
        );
        let from = applier().counts(
            2,
            EntryId::parse("5-1")?,
            &record(FallbackSide::From)?,
            None,
            now,
        );
        assert_eq!(deltas(&from), [("fell_back".to_owned(), 1)]);
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
        let batch = [applier.counts(shard, id, &record, None, stream_schema::now_millis())];
        assert_eq!(applier.apply(&client, shard, &batch).await?, [true]);
        assert_eq!(applier.apply(&client, shard, &batch).await?, [false]);
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

    #[test]
    fn a_batch_names_each_shared_hash_once() -> Result<(), Box<dyn std::error::Error>> {
        let now = 3_600_000 + 30_000;
        let applier = applier();
        let batch = [
            applier.counts(2, EntryId::parse("5-0")?, &started_in("a", now)?, None, now),
            applier.counts(2, EntryId::parse("5-1")?, &started_in("b", now)?, None, now),
        ];
        let call = applier.invocation(2, &batch, now);
        // The ledger, a's six hashes, and only b's own two (its session's totals and minute).
        assert_eq!(call.keys.len(), 1 + 6 + 2);
        let unique: std::collections::BTreeSet<&String> = call.keys.iter().collect();
        assert_eq!(unique.len(), call.keys.len());
        // b's record refers to the shared model hashes by the indexes a introduced.
        let b = call
            .args
            .iter()
            .position(|a| a == "5-1")
            .ok_or("b's record is in the call")?;
        assert_eq!(call.args[b + 1..b + 8], ["6", "8", "3", "4", "9", "6", "7"]);
        Ok(())
    }

    /// One script call applies what every new record of the batch adds, skips what the ledger
    /// already holds and an id given twice, and says which was which.
    #[tokio::test]
    async fn a_batch_adds_every_new_record_once() -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let applier = applier();
        let now = stream_schema::now_millis();
        let tokens = |session: &str, count| -> Result<EventRecord, stream_schema::IdError> {
            Ok(EventRecord::Tokens {
                request_id: RequestId::new(),
                session_id: SessionId::parse_stored(session)?,
                model_id: ModelId::parse("m")?,
                count,
                timestamp: now,
            })
        };
        let first = [
            applier.counts(3, EntryId::parse("1-0")?, &tokens("a", 5)?, None, now),
            applier.counts(3, EntryId::parse("1-1")?, &tokens("b", 7)?, None, now),
        ];
        assert_eq!(applier.apply(&client, 3, &first).await?, [true, true]);
        let second = [
            applier.counts(3, EntryId::parse("1-1")?, &tokens("b", 7)?, None, now),
            applier.counts(3, EntryId::parse("1-2")?, &tokens("a", 11)?, None, now),
            applier.counts(3, EntryId::parse("1-2")?, &tokens("a", 11)?, None, now),
        ];
        assert_eq!(
            applier.apply(&client, 3, &second).await?,
            [false, true, false]
        );

        let field = |key: RedisKey| {
            let client = client.clone();
            async move {
                let value: Option<i64> = client.hget(key.as_str(), "tokens_streamed").await?;
                Ok::<_, fred::error::Error>(value)
            }
        };
        let model = ModelId::parse("m")?;
        assert_eq!(field(RedisKey::model_stats(3, &model)).await?, Some(23));
        let a = SessionId::parse_stored("a")?;
        let b = SessionId::parse_stored("b")?;
        assert_eq!(field(RedisKey::session_stats(3, &a)).await?, Some(16));
        assert_eq!(field(RedisKey::session_stats(3, &b)).await?, Some(7));
        let minute = stats::minute_of(now);
        assert_eq!(
            field(RedisKey::model_stats_minute(3, &model, minute)).await?,
            Some(23)
        );
        let ttl: i64 = client
            .ttl(RedisKey::model_stats(3, &model).as_str())
            .await?;
        assert!(ttl > 0 && ttl <= 100, "totals carry their TTL: {ttl}");
        Ok(())
    }

    /// Lua's `unpack` stops at 8,000 values: a batch far above the default size still applies
    /// every record once.
    #[tokio::test]
    async fn a_batch_past_luas_unpack_limit_applies_every_record_once()
    -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let applier = applier();
        let now = stream_schema::now_millis();
        let session = SessionId::parse_stored("big")?;
        let model = ModelId::parse("m")?;
        let batch = (0..4_500)
            .map(|i| -> Result<RecordCounts, Box<dyn std::error::Error>> {
                let record = EventRecord::Tokens {
                    request_id: RequestId::new(),
                    session_id: session.clone(),
                    model_id: model.clone(),
                    count: 1,
                    timestamp: now,
                };
                Ok(applier.counts(5, EntryId::parse(&format!("7-{i}"))?, &record, None, now))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let applied = applier.apply(&client, 5, &batch).await?;
        assert!(applied.iter().all(|a| *a) && applied.len() == 4_500);
        let again = applier.apply(&client, 5, &batch).await?;
        assert!(again.iter().all(|a| !*a));
        let total: Option<i64> = client
            .hget(
                RedisKey::session_stats(5, &session).as_str(),
                "tokens_streamed",
            )
            .await?;
        assert_eq!(total, Some(4_500));
        Ok(())
    }
}
