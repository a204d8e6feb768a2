//! Applying event records to the analytics counters exactly once.
//!
//! Delivery is at-least-once (a crash between applying and `XACK` redelivers), so records are
//! applied by a script that first checks the shard's ledger of applied entry ids and records
//! the ids in the same atomic step. One script call applies a whole batch of a shard's records:
//! it sums what the new records add to each counter hash, then adds to each hash once per batch
//! (one `HINCRBY` for a single field; one `HMGET` and one `HSET` for several) and refreshes its
//! TTL: counters shared by many records (a model's, a tenant's, the minute's) cost at most three
//! commands per batch, not one per field and record. The ledger and every counter hash a record
//! touches carry the shard's hash tag `{n}` (a session's records all live in one shard), so one
//! script in one slot updates them all: the totals of the session, the model, the model within
//! the session's tenant and the API key, and the same four for the record's minute. The tenant
//! comes from the session's stored id (`SessionId::tenant`), so records need no tenant field.
//! What the hashes hold (field names, deltas, histogram buckets) is defined once in
//! `stream_schema::stats`, which the gateway reads with.
//!
//! The ledger only has to remember an id while the entry can still be delivered again, that is
//! until it is acknowledged: `XACK` and the removal from the ledger happen in one script (the
//! shard's stream and ledger share the slot), so the ledger holds what is in flight, not a
//! day's traffic. Its time bound (`processor.ledger_ttl_secs`) only clears ids whose entry
//! left the stream unacknowledged (trimmed by its cap while pending).
//!
//! Because the ledger forgets at the ack, both scripts act only on entries still pending to the
//! calling consumer. Otherwise a consumer that stalled past `processor.reclaim_idle_ms` while
//! holding a batch would count it again after another consumer claimed, applied and acked it,
//! and its ack (`XACK` ignores who holds an entry) could end a claimed entry before the new
//! holder applied it.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::stats;
use stream_schema::{EntryId, EventRecord, ModelId, RedisKey, SessionId};

/// KEYS: the ledger, the shard's event stream, then the counter hashes of the batch, each once.
/// ARGV: now ms, ledger ttl ms, the group, the consumer, the batch's lowest and highest entry
/// ids, one TTL in seconds per counter hash (in KEYS order), the number of records, then per
/// record: its entry id, how many hashes it counts in and their KEYS indexes, how many deltas
/// it adds and the field/delta pairs (added to each of its hashes). Returns per record 1 when
/// applied, 0 for a redelivery (already in the ledger, or twice in this batch), 2 when the entry
/// is no longer pending to this consumer (another one claimed it, and may have applied and
/// acked it, which cleared the ledger; its new owner applies it).
const APPLY: &str = r"
local hashes = #KEYS - 2
local count = tonumber(ARGV[7 + hashes])
local pos = 8 + hashes
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
-- Only entries still pending to this consumer are ours to apply: a consumer that stalled past
-- the reclaim time may hold a batch that another consumer has claimed since. The range may
-- hold more of its pending entries than the batch (a failed batch's), so its count is unbounded.
local owned = {}
for _, pending in ipairs(redis.call('XPENDING', KEYS[2], ARGV[3], ARGV[5], ARGV[6], '2147483647', ARGV[4])) do
  owned[pending[1]] = true
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
  if not owned[record.id] then
    result[r] = 2
  elseif seen[r] or fresh[record.id] then
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
-- A hash the batch adds one field to gets one HINCRBY; one it adds more to is read and written
-- in two commands (HMGET, HSET) however many: a finished chat adds about ten fields to each of
-- up to eight hashes. A value too long to be exact as a Lua number (above 15 digits; Lua's
-- numbers are doubles) or not a number at all is left to HINCRBY, which keeps it exact (or
-- fails the batch, as it always did).
if #ledger > 0 then
  for _, k in ipairs(touched) do
    local names, deltas = {}, {}
    for field, delta in pairs(sums[k]) do
      names[#names + 1] = field
      deltas[#deltas + 1] = delta
    end
    if #names == 1 then
      -- As an integer: a Lua number would reach Redis as '%.14g' text, not an integer.
      redis.call('HINCRBY', KEYS[k], names[1], string.format('%d', deltas[1]))
      names = {}
    end
    for i = 1, #names, 1000 do
      local last = math.min(i + 999, #names)
      local current = redis.call('HMGET', KEYS[k], unpack(names, i, last))
      local set = {}
      for j = i, last do
        local old = current[j - i + 1]
        local value = old and tonumber(old)
        if old and (not value or #old > 15) then
          redis.call('HINCRBY', KEYS[k], names[j], string.format('%d', deltas[j]))
        else
          set[#set + 1] = names[j]
          set[#set + 1] = string.format('%d', (value or 0) + deltas[j])
        end
      end
      if #set > 0 then redis.call('HSET', KEYS[k], unpack(set)) end
    end
    redis.call('EXPIRE', KEYS[k], ARGV[k + 4])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
return result
";

/// KEYS: the shard's event stream, its ledger. ARGV: the group, the consumer, the lowest and
/// highest of the ids, then the entry ids. Acknowledges those of the entries still pending to
/// this consumer and forgets them in the ledger in one step: nothing can deliver an
/// acknowledged entry again, and no crash can separate the two (which would apply a redelivery
/// twice). An entry another consumer claimed is left to it: `XACK` ignores the owner, so acking
/// it here would end it before its new owner applied it, and forgetting it would let that owner
/// apply it a second time. Returns how many entries it acknowledged.
const ACK_AND_FORGET: &str = r"
local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
local owned = {}
for _, entry in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], '2147483647', ARGV[2])) do
  if wanted[entry[1]] then owned[#owned + 1] = entry[1] end
end
-- unpack has a stack limit (8,000 values): chunks of 1,000 ids.
for i = 1, #owned, 1000 do
  local last = math.min(i + 999, #owned)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(owned, i, last))
  redis.call('ZREM', KEYS[2], unpack(owned, i, last))
end
return #owned
";

/// The consumer a batch was delivered to. It applies and acknowledges only the entries still
/// pending to it: one that stalled longer than the reclaim time may find that another
/// consumer has claimed them since.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub group: &'a str,
    pub consumer: &'a str,
}

/// The lowest and highest of `ids`, as the range an `XPENDING` over them reads.
fn id_range(ids: impl Iterator<Item = EntryId>) -> Option<(EntryId, EntryId)> {
    ids.fold(None, |range, id| match range {
        None => Some((id, id)),
        Some((low, high)) => Some((low.min(id), high.max(id))),
    })
}

/// What the apply script did with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Counted now.
    Counted,
    /// Counted before: a redelivery, or an id given twice.
    Duplicate,
    /// No longer pending to this consumer: another one claimed it and counts it.
    ClaimedElsewhere,
}

impl Applied {
    /// The `outcome` label of `processor_records_total` and of the record's span.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Counted => "applied",
            Self::Duplicate => "duplicate",
            Self::ClaimedElsewhere => "claimed_elsewhere",
        }
    }
}

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

    /// The script call that applies `batch` (records of `shard` delivered to `holder`) at
    /// `now_ms`: each counter hash named once, however many records count in it.
    pub fn invocation(
        &self,
        shard: u16,
        holder: Holder<'_>,
        batch: &[RecordCounts],
        now_ms: u64,
    ) -> Invocation {
        let mut keys = vec![
            RedisKey::applied_ledger(shard).to_string(),
            RedisKey::events_shard(shard).to_string(),
        ];
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
        let (low, high) = id_range(batch.iter().map(|record| record.id))
            .unwrap_or((EntryId::ZERO, EntryId::ZERO));
        let mut args = Vec::with_capacity(6 + ttls.len() + records.len());
        args.push(now_ms.to_string());
        args.push(self.retention.ledger_secs.saturating_mul(1000).to_string());
        args.push(holder.group.to_owned());
        args.push(holder.consumer.to_owned());
        args.push(low.to_string());
        args.push(high.to_string());
        args.extend(ttls.iter().map(u64::to_string));
        args.extend(records);
        Invocation { keys, args }
    }

    /// Applies a batch of records of `shard`, delivered to `holder`, in one script call; says
    /// per record what became of it.
    pub async fn apply(
        &self,
        client: &Client,
        shard: u16,
        holder: Holder<'_>,
        batch: &[RecordCounts],
    ) -> Result<Vec<Applied>, StreamIoError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let Invocation { keys, args } =
            self.invocation(shard, holder, batch, stream_schema::now_millis());
        #[expect(
            clippy::disallowed_methods,
            reason = "the processor alone writes llm:stats (the gateway only reads it, through \
                      stream_schema::stats); not a structure two services write"
        )]
        let answer: Value = self.script.evalsha_with_reload(client, keys, args).await?;
        let applied = answer
            .into_array()
            .iter()
            .map(|flag| match flag.as_i64() {
                Some(1) => Ok(Applied::Counted),
                Some(0) => Ok(Applied::Duplicate),
                Some(2) => Ok(Applied::ClaimedElsewhere),
                _ => Err(StreamIoError::Protocol(format!(
                    "the apply script answered {flag:?} for a record"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if applied.len() != batch.len() {
            return Err(StreamIoError::Protocol(format!(
                "the apply script answered {} flags for {} records",
                applied.len(),
                batch.len()
            )));
        }
        Ok(applied)
    }

    /// Acknowledges those of `ids` (of `shard`) still pending to `holder` and removes them from
    /// the ledger, atomically; returns how many it acknowledged.
    pub async fn ack(
        &self,
        client: &Client,
        shard: u16,
        holder: Holder<'_>,
        ids: &[EntryId],
    ) -> Result<u64, StreamIoError> {
        let Some((low, high)) = id_range(ids.iter().copied()) else {
            return Ok(0);
        };
        let keys = vec![
            RedisKey::events_shard(shard).to_string(),
            RedisKey::applied_ledger(shard).to_string(),
        ];
        let mut args = Vec::with_capacity(ids.len() + 4);
        args.push(holder.group.to_owned());
        args.push(holder.consumer.to_owned());
        args.push(low.to_string());
        args.push(high.to_string());
        args.extend(ids.iter().map(EntryId::to_string));
        #[expect(
            clippy::disallowed_methods,
            reason = "the ack must be atomic with the processor-owned ledger, so it is one script \
                      in the shard's slot; only the processor group acks llm:events"
        )]
        let acked: u64 = self
            .ack_script
            .evalsha_with_reload(client, keys, args)
            .await?;
        Ok(acked)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use stream_schema::record::FallbackSide;
    use stream_schema::{RequestId, record::Outcome};

    const GROUP: &str = "llm:processors";
    const HOLDER: Holder<'static> = Holder {
        group: GROUP,
        consumer: "c1",
    };

    fn applier() -> Applier {
        Applier::new(Retention {
            ledger_secs: 10,
            totals_secs: 100,
            window_secs: 7_200,
        })
    }

    /// Appends `n` entries to shard `shard`'s stream and delivers them to `consumer`: entries
    /// pending to it, as the scripts require of what it applies and acks.
    async fn deliver(
        client: &Client,
        shard: u16,
        consumer: &str,
        n: u64,
    ) -> Result<Vec<EntryId>, Box<dyn std::error::Error>> {
        let stream = RedisKey::events_shard(shard);
        stream_io::groups::ensure_group(client, &stream, GROUP).await?;
        for _ in 0..n {
            #[expect(
                clippy::disallowed_methods,
                reason = "placeholder entries: the scripts read only their ids and who holds them"
            )]
            let _: String = client
                .xadd(stream.as_str(), false, None, "*", ("field", "value"))
                .await?;
        }
        let read = stream_io::groups::read_new(
            client,
            GROUP,
            consumer,
            std::slice::from_ref(&stream),
            n,
            0,
        )
        .await?;
        let ids: Vec<EntryId> = read
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .map(|entry| entry.id)
            .collect();
        assert_eq!(ids.len() as u64, n, "every appended entry was delivered");
        Ok(ids)
    }

    /// Another consumer takes `ids` over (as `XAUTOCLAIM` does once they are idle long enough).
    async fn claim(
        client: &Client,
        shard: u16,
        consumer: &str,
        ids: &[EntryId],
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (_, taken) = stream_io::groups::autoclaim(
            client,
            &RedisKey::events_shard(shard),
            GROUP,
            consumer,
            0,
            "0-0",
            100,
        )
        .await?;
        let taken: Vec<EntryId> = taken.into_iter().map(|entry| entry.id).collect();
        assert_eq!(taken, ids, "{consumer} claimed the entries");
        Ok(())
    }

    /// The tokens counted for model `m` in `shard`.
    async fn model_tokens(
        client: &Client,
        shard: u16,
    ) -> Result<Option<i64>, Box<dyn std::error::Error>> {
        let model = ModelId::parse("m")?;
        let key = RedisKey::model_stats(shard, &model);
        Ok(client.hget(key.as_str(), "tokens_streamed").await?)
    }

    fn tokens(count: u32, now: u64) -> Result<EventRecord, stream_schema::IdError> {
        Ok(EventRecord::Tokens {
            request_id: RequestId::new(),
            session_id: SessionId::parse_stored("s")?,
            model_id: ModelId::parse("m")?,
            count,
            timestamp: now,
        })
    }

    /// A consumer stalled past the reclaim time while holding a record; another claimed,
    /// applied and acknowledged it (which cleared the ledger). The stalled one, resumed, must
    /// not count it again.
    #[tokio::test]
    async fn a_record_claimed_and_acknowledged_by_another_consumer_counts_once()
    -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let applier = applier();
        let now = stream_schema::now_millis();
        let ids = deliver(&client, 4, "c1", 1).await?;
        let batch: Vec<RecordCounts> = ids
            .iter()
            .map(|id| Ok(applier.counts(4, *id, &tokens(5, now)?, None, now)))
            .collect::<Result<_, stream_schema::IdError>>()?;

        claim(&client, 4, "c2", &ids).await?;
        let c2 = Holder {
            group: GROUP,
            consumer: "c2",
        };
        assert_eq!(
            applier.apply(&client, 4, c2, &batch).await?,
            [Applied::Counted]
        );
        assert_eq!(applier.ack(&client, 4, c2, &ids).await?, 1);

        assert_eq!(
            applier.apply(&client, 4, HOLDER, &batch).await?,
            [Applied::ClaimedElsewhere]
        );
        assert_eq!(applier.ack(&client, 4, HOLDER, &ids).await?, 0);
        assert_eq!(model_tokens(&client, 4).await?, Some(5));
        Ok(())
    }

    /// A consumer applied a record and stalled before its ack; another claimed it. The stalled
    /// one's ack must leave it to its new holder: acking it (and clearing the ledger) would let
    /// that holder count it a second time.
    #[tokio::test]
    async fn a_stalled_consumers_ack_leaves_a_claimed_record_to_its_new_holder()
    -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let applier = applier();
        let now = stream_schema::now_millis();
        let ids = deliver(&client, 4, "c1", 2).await?;
        let batch: Vec<RecordCounts> = ids
            .iter()
            .map(|id| Ok(applier.counts(4, *id, &tokens(5, now)?, None, now)))
            .collect::<Result<_, stream_schema::IdError>>()?;
        assert_eq!(
            applier.apply(&client, 4, HOLDER, &batch).await?,
            [Applied::Counted, Applied::Counted]
        );

        claim(&client, 4, "c2", &ids).await?;
        assert_eq!(applier.ack(&client, 4, HOLDER, &ids).await?, 0);
        let held: u64 = client.zcard(RedisKey::applied_ledger(4).as_str()).await?;
        assert_eq!(held, 2, "the ledger still remembers the claimed records");

        let c2 = Holder {
            group: GROUP,
            consumer: "c2",
        };
        assert_eq!(
            applier.apply(&client, 4, c2, &batch).await?,
            [Applied::Duplicate, Applied::Duplicate]
        );
        assert_eq!(applier.ack(&client, 4, c2, &ids).await?, 2);
        assert_eq!(model_tokens(&client, 4).await?, Some(10));
        Ok(())
    }

    /// The ack leaves alone an entry of the holder's own that it was not asked to ack (one
    /// whose apply failed stays pending for a retry), even inside the range it reads.
    #[tokio::test]
    async fn the_ack_takes_only_the_ids_it_is_given() -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let ids = deliver(&client, 6, "c1", 3).await?;
        let chosen = [ids[0], ids[2]];
        assert_eq!(applier().ack(&client, 6, HOLDER, &chosen).await?, 2);
        let pending: Value = client
            .xpending(RedisKey::events_shard(6).as_str(), GROUP, ("-", "+", 10))
            .await?;
        let left: Vec<String> = pending
            .into_array()
            .into_iter()
            .filter_map(|entry| entry.into_array().into_iter().next()?.into_string())
            .collect();
        assert_eq!(left, [ids[1].to_string()]);
        Ok(())
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
        let call = applier.invocation(2, HOLDER, &[counts], now);
        assert_eq!(
            call.keys,
            [
                "llm:stats:{2}:applied",
                "llm:events:{2}",
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
        // now, ledger ms, the holder, the batch's id range, 4 totals TTLs, 4 minute TTLs
        // (minute ends in 30 s, + 2 h), then one record: its id, its 8 hashes by KEYS index,
        // its one delta.
        assert_eq!(
            call.args,
            [
                "3630000", "10000", GROUP, "c1", "5-0", "5-0", "100", "100", "100", "100", "7230",
                "7230", "7230", "7230", "1", "5-0", "8", "3", "4", "5", "6", "7", "8", "9", "10",
                "1", "requests", "1"
            ]
        );
        Ok(())
    }

    #[test]
    fn a_tenants_record_counts_for_its_tenants_model() -> Result<(), Box<dyn std::error::Error>> {
        let now = 3_600_000;
        let record = started_in("acme/s", now)?;
        let counts = applier().counts(1, EntryId::parse("5-0")?, &record, None, now);
        let call = applier().invocation(1, HOLDER, &[counts], now);
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
        stream_io::groups::ensure_group(&client, &stream, GROUP).await?;
        let id = log.append(&client, &record, None).await?;
        let read =
            stream_io::groups::read_new(&client, GROUP, "c1", std::slice::from_ref(&stream), 10, 0)
                .await?;
        assert_eq!(read.first().map(|(_, entries)| entries.len()), Some(1));

        let applier = applier();
        let batch = [applier.counts(shard, id, &record, None, stream_schema::now_millis())];
        assert_eq!(
            applier.apply(&client, shard, HOLDER, &batch).await?,
            [Applied::Counted]
        );
        assert_eq!(
            applier.apply(&client, shard, HOLDER, &batch).await?,
            [Applied::Duplicate]
        );
        let held: u64 = client.zcard(ledger.as_str()).await?;
        assert_eq!(held, 1, "an applied, unacknowledged id stays in the ledger");

        assert_eq!(applier.ack(&client, shard, HOLDER, &[id]).await?, 1);
        let held: u64 = client.zcard(ledger.as_str()).await?;
        assert_eq!(held, 0, "an acknowledged id leaves the ledger");
        let pending: Value = client.xpending(stream.as_str(), GROUP, ()).await?;
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
        let call = applier.invocation(2, HOLDER, &batch, now);
        // The ledger, the stream, a's six hashes, and only b's own two (its session's totals
        // and minute).
        assert_eq!(call.keys.len(), 2 + 6 + 2);
        let unique: std::collections::BTreeSet<&String> = call.keys.iter().collect();
        assert_eq!(unique.len(), call.keys.len());
        // b's record refers to the shared model hashes by the indexes a introduced.
        // (The last "5-1": the first is the top of the batch's id range.)
        let b = call
            .args
            .iter()
            .rposition(|a| a == "5-1")
            .ok_or("b's record is in the call")?;
        assert_eq!(
            call.args[b + 1..b + 8],
            ["6", "9", "4", "5", "10", "7", "8"]
        );
        // The range the script checks ownership over covers both.
        assert_eq!(call.args[4..6], ["5-0", "5-1"]);
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
        let [id0, id1, id2] = <[EntryId; 3]>::try_from(deliver(&client, 3, "c1", 3).await?)
            .map_err(|ids| format!("delivered {ids:?}"))?;
        let first = [
            applier.counts(3, id0, &tokens("a", 5)?, None, now),
            applier.counts(3, id1, &tokens("b", 7)?, None, now),
        ];
        assert_eq!(
            applier.apply(&client, 3, HOLDER, &first).await?,
            [Applied::Counted, Applied::Counted]
        );
        let second = [
            applier.counts(3, id1, &tokens("b", 7)?, None, now),
            applier.counts(3, id2, &tokens("a", 11)?, None, now),
            applier.counts(3, id2, &tokens("a", 11)?, None, now),
        ];
        assert_eq!(
            applier.apply(&client, 3, HOLDER, &second).await?,
            [Applied::Duplicate, Applied::Counted, Applied::Duplicate]
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

    /// A finished chat, which adds eleven fields to each of its hashes.
    fn finished_in(session: &SessionId, now: u64) -> Result<EventRecord, stream_schema::IdError> {
        Ok(EventRecord::Finished {
            request_id: RequestId::new(),
            session_id: session.clone(),
            model_id: ModelId::parse("m")?,
            outcome: Outcome::Completed(stream_schema::FinishReason::Stop),
            prompt_tokens: 3,
            completion_tokens: 5,
            ttft_ms: Some(7),
            duration_ms: 40,
            timestamp: now,
        })
    }

    /// A hash the batch adds several fields to costs `HMGET`, `HSET` and `EXPIRE`, however
    /// many fields; one it adds a single field to, `HINCRBY` and `EXPIRE`.
    #[tokio::test]
    async fn each_counter_hash_costs_at_most_three_commands_per_batch()
    -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let applier = applier();
        let now = stream_schema::now_millis();
        let session = SessionId::parse_stored("costs")?;
        let ids = deliver(&client, 2, "c1", 2).await?;
        let finished = applier.counts(2, ids[0], &finished_in(&session, now)?, None, now);
        let tokens = applier.counts(2, ids[1], &tokens(4, now)?, None, now);
        // Session, model and the tenant's model, totals and minute: six hashes each.
        assert_eq!((finished.hashes.len(), finished.deltas.len()), (6, 11));
        let calls = |before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str| {
            after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
        };

        let before = test_support::command_calls(&client).await?;
        applier.apply(&client, 2, HOLDER, &[finished]).await?;
        let after = test_support::command_calls(&client).await?;
        for (name, expected) in [("hmget", 6), ("hset", 6), ("expire", 6), ("hincrby", 0)] {
            assert_eq!(
                calls(&before, &after, name),
                expected,
                "{name} for eleven fields"
            );
        }
        let before = after;
        applier.apply(&client, 2, HOLDER, &[tokens]).await?;
        let after = test_support::command_calls(&client).await?;
        for (name, expected) in [("hmget", 0), ("hset", 0), ("expire", 6), ("hincrby", 6)] {
            assert_eq!(
                calls(&before, &after, name),
                expected,
                "{name} for one field"
            );
        }
        let model = ModelId::parse("m")?;
        let totals: HashMap<String, i64> = client
            .hgetall(RedisKey::model_stats(2, &model).as_str())
            .await?;
        assert_eq!(totals.get("finished"), Some(&1));
        assert_eq!(totals.get("duration_ms_sum"), Some(&40));
        assert_eq!(totals.get("tokens_streamed"), Some(&4));
        Ok(())
    }

    /// The script adds several fields to a hash by reading and writing them (HMGET, HSET), in
    /// Lua numbers, doubles: a counter too long for one to hold exactly is added to by
    /// `HINCRBY`, so it stays exact; one that is not a number fails the batch, as `HINCRBY`
    /// always did, rather than being overwritten.
    #[tokio::test]
    async fn counters_past_what_a_lua_number_holds_stay_exact()
    -> Result<(), Box<dyn std::error::Error>> {
        let server = test_support::RedisServer::start().await?;
        let client = server.client().await?;
        let applier = applier();
        let now = stream_schema::now_millis();
        let session = SessionId::parse_stored("exact")?;
        let model = ModelId::parse("m")?;
        let session_key = RedisKey::session_stats(6, &session);
        let model_key = RedisKey::model_stats(6, &model);
        // 2^53 + 1: the first integer a double cannot hold.
        #[expect(
            clippy::disallowed_methods,
            reason = "a counter set up as a long-running deployment would have it"
        )]
        let () = client
            .hset(
                session_key.as_str(),
                ("duration_ms_sum", "9007199254740993"),
            )
            .await?;
        let [first, second] = <[EntryId; 2]>::try_from(deliver(&client, 6, "c1", 2).await?)
            .map_err(|ids| format!("delivered {ids:?}"))?;
        let batch = [applier.counts(6, first, &finished_in(&session, now)?, None, now)];
        assert_eq!(
            applier.apply(&client, 6, HOLDER, &batch).await?,
            [Applied::Counted]
        );
        let field = |key: &RedisKey, name: &'static str| {
            let (client, key) = (client.clone(), key.clone());
            async move {
                let value: Option<String> = client.hget(key.as_str(), name).await?;
                Ok::<_, fred::error::Error>(value)
            }
        };
        assert_eq!(
            field(&session_key, "duration_ms_sum").await?.as_deref(),
            Some("9007199254741033")
        );
        assert_eq!(field(&session_key, "finished").await?.as_deref(), Some("1"));
        assert_eq!(
            field(&model_key, "duration_ms_sum").await?.as_deref(),
            Some("40")
        );

        #[expect(
            clippy::disallowed_methods,
            reason = "a counter corrupted by hand, to see the batch refused"
        )]
        let () = client
            .hset(model_key.as_str(), ("finished", "many"))
            .await?;
        let batch = [applier.counts(6, second, &finished_in(&session, now)?, None, now)];
        assert!(
            applier.apply(&client, 6, HOLDER, &batch).await.is_err(),
            "a value that is not a number is not overwritten"
        );
        assert_eq!(
            field(&model_key, "finished").await?.as_deref(),
            Some("many")
        );
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
        let ids = deliver(&client, 5, "c1", 4_500).await?;
        let batch: Vec<RecordCounts> = ids
            .iter()
            .map(|id| {
                let record = EventRecord::Tokens {
                    request_id: RequestId::new(),
                    session_id: session.clone(),
                    model_id: model.clone(),
                    count: 1,
                    timestamp: now,
                };
                applier.counts(5, *id, &record, None, now)
            })
            .collect();
        let applied = applier.apply(&client, 5, HOLDER, &batch).await?;
        assert!(applied.iter().all(|a| *a == Applied::Counted) && applied.len() == 4_500);
        let again = applier.apply(&client, 5, HOLDER, &batch).await?;
        assert!(again.iter().all(|a| *a == Applied::Duplicate));
        let total: Option<i64> = client
            .hget(
                RedisKey::session_stats(5, &session).as_str(),
                "tokens_streamed",
            )
            .await?;
        assert_eq!(total, Some(4_500));
        assert_eq!(applier.ack(&client, 5, HOLDER, &ids).await?, 4_500);
        let held: u64 = client.zcard(RedisKey::applied_ledger(5).as_str()).await?;
        assert_eq!(held, 0, "every acknowledged id leaves the ledger");
        Ok(())
    }
}
