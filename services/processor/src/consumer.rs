//! One shard's consumer loop in group `llm:processors`: read a batch, apply each record exactly
//! once, `XACK` the batch; periodically reclaim entries orphaned by dead consumers, export the
//! group's lag and remove consumers that died long ago.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::ClientUnblockFlag;
use futures::future::join_all;
use service_kit::ops::LoopFlag;
use stream_io::requests::{self, StoredMeta};
use stream_io::{Entry, StreamIoError, groups};
use stream_schema::keys::PROCESSOR_GROUP;
use stream_schema::{EntryId, EventRecord, RedisKey, RequestId, RequestMeta, stats};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::apply::{Applied, Applier, Holder};

/// How often a consumer looks for orphaned entries.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

pub struct ShardConsumer {
    pub shard: u16,
    /// Blocking reads only.
    pub reader: Client,
    pub redis: Pool,
    pub consumer: String,
    pub applier: Applier,
    pub reconciler: crate::quota::Reconciler,
    pub batch: u64,
    pub block_ms: u64,
    /// After a short batch, the loop's next read starts no sooner than this after the last
    /// one began (`processor.gather_ms`).
    pub gather: Duration,
    pub reclaim_idle_ms: u64,
    /// Other consumers idle this long with nothing pending are removed; 0 never.
    pub dead_consumer_ms: u64,
    pub dead_consumers: groups::DeadConsumers,
    /// Metadata of requests seen recently. Written and read only by this shard's loop (the
    /// mutex only satisfies `&self`; it is never held across an await).
    pub metas: Mutex<MetaCache>,
}

/// Metadata of recent requests (`None`: expired or unreadable), so a request's metadata is
/// usually read once (at its `Started` record) for both its key id and, at `Finished`, its
/// quota settlement, where it is forgotten.
///
/// Bounded by age, not only by count: with several processors a request's `Finished` is often
/// delivered to another consumer, so "forget at `Finished`" alone would keep such requests
/// until a count cap pushed them out, and a cap of thousands fills for many minutes. A request
/// still running after [`META_MAX_AGE`] reads its metadata again at `Finished` (one read).
#[derive(Debug, Default)]
pub struct MetaCache {
    metas: HashMap<RequestId, Option<RequestMeta>>,
    /// Insertion order with times; ids forgotten at `Finished` stay here until they age out.
    order: VecDeque<(Instant, RequestId)>,
}

/// How long a request's metadata is remembered.
const META_MAX_AGE: Duration = Duration::from_secs(60);

/// Requests remembered at most per shard, whatever their age (a burst of starts).
const META_CACHE: usize = 4_096;

impl MetaCache {
    fn get(&self, request: &RequestId) -> Option<&Option<RequestMeta>> {
        self.metas.get(request)
    }

    fn insert(&mut self, request: RequestId, meta: Option<RequestMeta>, now: Instant) {
        if self.metas.insert(request, meta).is_none() {
            self.order.push_back((now, request));
        }
        while let Some(&(at, oldest)) = self.order.front() {
            if self.order.len() <= META_CACHE && now.duration_since(at) < META_MAX_AGE {
                break;
            }
            self.order.pop_front();
            self.metas.remove(&oldest);
        }
    }

    fn forget(&mut self, request: &RequestId) {
        // The id stays in `order` until it ages out; removing it there would be O(n).
        self.metas.remove(request);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.metas.len()
    }
}

/// A request's metadata; `None` once it has expired (or cannot be read), and then the request
/// counts under [`stats::UNKNOWN_KEY`] and its quota is not settled.
async fn read_meta(
    client: &Client,
    request: RequestId,
) -> Result<Option<RequestMeta>, StreamIoError> {
    Ok(match requests::load_meta(client, &request).await? {
        StoredMeta::Found(meta) => Some(meta),
        StoredMeta::Missing => None,
        StoredMeta::Undecodable(error) => {
            tracing::warn!(request_id = %request, %error, "undecodable request metadata");
            None
        }
    })
}

/// The key id a request counts under.
fn key_label(meta: Option<&RequestMeta>) -> &str {
    meta.map_or(stats::UNKNOWN_KEY, |meta| stats::key_label(&meta.key_id))
}

impl ShardConsumer {
    fn key(&self) -> RedisKey {
        RedisKey::events_shard(self.shard)
    }

    /// This consumer, as the holder of the entries it was delivered.
    fn holder(&self) -> Holder<'_> {
        Holder {
            group: PROCESSOR_GROUP,
            consumer: &self.consumer,
        }
    }

    /// The `record.apply` span of one record, in the trace of the producer attempt that wrote
    /// it (its `tp` field). Records come one per batch of tokens, not per token, so a span each
    /// stays cheap; without a `tp` (traces off) it is a plain, unexported `tracing` span.
    fn record_span(
        &self,
        id: EntryId,
        record: &EventRecord,
        traceparent: Option<&str>,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            "record.apply",
            shard = self.shard,
            entry_id = %id,
            kind = record.kind(),
            request_id = %record.request_id(),
            outcome = tracing::field::Empty,
        );
        service_kit::telemetry::continue_trace(&span, traceparent);
        span
    }

    /// Metadata of the requests of `records` that count per key (and settle at `Finished`):
    /// from the cache, else one read per request, all issued together.
    async fn metas_for(
        &self,
        client: &Client,
        records: &[(EntryId, EventRecord)],
    ) -> Result<HashMap<RequestId, Option<RequestMeta>>, StreamIoError> {
        let wanted: BTreeSet<RequestId> = records
            .iter()
            .filter(|(_, record)| stats::counts_per_key(record))
            .map(|(_, record)| record.request_id())
            .collect();
        let mut found = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        {
            let cache = self.metas.lock().unwrap_or_else(PoisonError::into_inner);
            for request in wanted {
                match cache.get(&request) {
                    Some(meta) => {
                        found.insert(request, meta.clone());
                    }
                    None => missing.push(request),
                }
            }
        }
        let read = join_all(missing.iter().map(|request| read_meta(client, *request))).await;
        let mut cache = self.metas.lock().unwrap_or_else(PoisonError::into_inner);
        for (request, meta) in missing.into_iter().zip(read) {
            let meta = meta?;
            cache.insert(request, meta.clone(), Instant::now());
            found.insert(request, meta);
        }
        Ok(found)
    }

    /// Applies and acks entries: one script call applies the batch, then one `XACK` (which also
    /// clears the ledger) covers every entry that is done. An entry that cannot be decoded is
    /// acked and counted (it can never succeed); entries whose settlement or apply failed stay
    /// pending and are reclaimed later (the ledger makes the retry safe). Entries another
    /// consumer claimed while this one stalled are neither applied nor acked here: they are
    /// that consumer's now. A record's span ends once its outcome is known: its duration is its
    /// settlement and the batch's apply.
    async fn process(&self, entries: Vec<Entry>) -> Result<(), StreamIoError> {
        let client = self.redis.next();
        let mut done: Vec<EntryId> = Vec::with_capacity(entries.len());
        let mut records = Vec::with_capacity(entries.len());
        let mut spans = Vec::with_capacity(entries.len());
        for entry in entries {
            match EventRecord::decode(&entry.fields) {
                Ok(record) => {
                    spans.push(self.record_span(
                        entry.id,
                        &record,
                        stream_schema::codec::traceparent(&entry.fields),
                    ));
                    records.push((entry.id, record));
                }
                Err(error) => {
                    tracing::warn!(shard = self.shard, id = %entry.id, %error, "undecodable record");
                    metrics::counter!("processor_records_total", "outcome" => "undecodable")
                        .increment(1);
                    done.push(entry.id);
                }
            }
        }
        let metas = match self.metas_for(client, &records).await {
            Ok(metas) => metas,
            Err(error) => {
                // Nothing applied yet: ack only what can never succeed, retry the rest later.
                self.applier
                    .ack(client, self.shard, self.holder(), &done)
                    .await?;
                return Err(error);
            }
        };
        // Settle first: it is idempotent by itself, so a crash before the counters are applied
        // (and the record redelivered) settles nothing twice. A record whose settlement failed
        // is left out of the batch and stays pending.
        let settled = join_all(records.iter().zip(&spans).map(|((_, record), span)| {
            let meta = metas.get(&record.request_id()).and_then(Option::as_ref);
            async move {
                match record {
                    EventRecord::Finished {
                        request_id,
                        completion_tokens,
                        ..
                    } => {
                        self.reconciler
                            .settle(client, request_id, meta, *completion_tokens)
                            .await
                    }
                    _ => Ok(()),
                }
            }
            .instrument(span.clone())
        }))
        .await;
        let now_ms = stream_schema::now_millis();
        let mut failure = None;
        let mut batch = Vec::with_capacity(records.len());
        let mut in_batch = Vec::with_capacity(records.len());
        for (((id, record), settled), span) in records.iter().zip(settled).zip(spans) {
            match settled {
                Ok(()) => {
                    let meta = metas.get(&record.request_id());
                    let key_id = meta.map(|meta| key_label(meta.as_ref()));
                    batch.push(self.applier.counts(self.shard, *id, record, key_id, now_ms));
                    in_batch.push((*id, record, span));
                }
                Err(error) => {
                    span.record("outcome", "failed");
                    failure.get_or_insert(error);
                }
            }
        }
        match self
            .applier
            .apply(client, self.shard, self.holder(), &batch)
            .await
        {
            Ok(applied) => {
                let mut claimed = 0;
                for ((id, record, span), applied) in in_batch.into_iter().zip(applied) {
                    span.record("outcome", applied.outcome());
                    metrics::counter!("processor_records_total", "outcome" => applied.outcome())
                        .increment(1);
                    if applied == Applied::ClaimedElsewhere {
                        // Its new holder applies and acks it.
                        claimed += 1;
                        continue;
                    }
                    if matches!(record, EventRecord::Finished { .. }) {
                        self.metas
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .forget(&record.request_id());
                    }
                    done.push(id);
                }
                if claimed > 0 {
                    tracing::info!(
                        shard = self.shard,
                        count = claimed,
                        "records claimed by another consumer while this one held them"
                    );
                }
            }
            Err(error) => {
                for (_, _, span) in &in_batch {
                    span.record("outcome", "failed");
                }
                failure.get_or_insert(error);
            }
        }
        self.applier
            .ack(client, self.shard, self.holder(), &done)
            .await?;
        failure.map_or(Ok(()), Err)
    }

    /// Exports the group's lag and pending count and removes long-dead consumers. Failures are
    /// logged only: none of this is needed to apply records.
    async fn housekeeping(&self) {
        let client = self.redis.next();
        let key = self.key();
        let shard = self.shard.to_string();
        match groups::group_state(client, &key, PROCESSOR_GROUP).await {
            Ok(Some(state)) => {
                #[expect(clippy::cast_precision_loss, reason = "gauges are f64")]
                {
                    metrics::gauge!("processor_group_pending", "shard" => shard.clone())
                        .set(state.pending as f64);
                    if let Some(lag) = state.lag {
                        metrics::gauge!("processor_group_lag", "shard" => shard).set(lag as f64);
                    }
                }
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(shard = self.shard, %error, "cannot read group state"),
        }
        if self.dead_consumer_ms == 0 {
            return;
        }
        match self
            .dead_consumers
            .remove(
                client,
                &key,
                PROCESSOR_GROUP,
                &self.consumer,
                self.dead_consumer_ms,
            )
            .await
        {
            Ok(removed) => {
                for name in removed {
                    tracing::info!(shard = self.shard, consumer = %name, "removed dead consumer");
                    metrics::counter!("processor_dead_consumers_removed_total").increment(1);
                }
            }
            Err(error) => {
                tracing::warn!(shard = self.shard, %error, "cannot remove dead consumers")
            }
        }
    }

    async fn reclaim(&self) -> Result<(), StreamIoError> {
        let client = self.redis.next();
        let mut cursor = "0-0".to_owned();
        loop {
            let (next, entries) = groups::autoclaim(
                client,
                &self.key(),
                PROCESSOR_GROUP,
                &self.consumer,
                self.reclaim_idle_ms,
                &cursor,
                self.batch,
            )
            .await?;
            if !entries.is_empty() {
                tracing::info!(
                    shard = self.shard,
                    count = entries.len(),
                    "reclaimed orphaned records"
                );
                metrics::counter!("processor_reclaimed_total").increment(entries.len() as u64);
                self.process(entries).await?;
            }
            if next == "0-0" {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One run of the shard's loop, under the supervisor: reads, applies and acks batches until
    /// shutdown, and ends at the first failure (Redis down, the group or stream gone) so the
    /// supervisor restarts it with backoff. `flag` is up from the first good step of the run;
    /// the supervisor lowers it when the run ends. A restart creates the group again (Redis may
    /// have lost it, e.g. a restart without persistence) and reclaims at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, flag: LoopFlag) {
        let key = self.key();
        let mut last_reclaim = Instant::now() - RECLAIM_EVERY;
        if let Err(error) = groups::ensure_group(&self.reader, &key, PROCESSOR_GROUP).await {
            self.failed(&error);
            return;
        }
        while !shutdown.is_cancelled() {
            let step = async {
                if last_reclaim.elapsed() >= RECLAIM_EVERY {
                    last_reclaim = Instant::now();
                    self.reclaim().await?;
                    self.housekeeping().await;
                }
                let read_at = Instant::now();
                let streams = tokio::select! {
                    read = groups::read_new(
                        &self.reader,
                        PROCESSOR_GROUP,
                        &self.consumer,
                        std::slice::from_ref(&key),
                        self.batch,
                        self.block_ms,
                    ) => read?,
                    () = shutdown.cancelled() => {
                        let _ = self.reader.unblock_self(Some(ClientUnblockFlag::Timeout)).await;
                        return Ok(());
                    }
                };
                let mut read = 0;
                for (_, entries) in streams {
                    read += entries.len();
                    // Finish the batch even during shutdown: its effects are applied and acked
                    // together, so nothing is left half-done.
                    self.process(entries).await?;
                }
                // A full batch means more is waiting: read again at once. A short one (paced
                // load) lets the next records gather, so they share one apply.
                if read > 0 && (read as u64) < self.batch && !self.gather.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep_until((read_at + self.gather).into()) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
                Ok::<(), StreamIoError>(())
            };
            match step.await {
                Ok(()) => flag.set(true),
                Err(error) => {
                    self.failed(&error);
                    return;
                }
            }
        }
    }

    fn failed(&self, error: &StreamIoError) {
        tracing::warn!(shard = self.shard, %error, "processing failed; restarting the shard loop");
        metrics::counter!("processor_errors_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meta_cache_forgets_finished_requests_and_others_after_a_minute() {
        let start = Instant::now();
        let mut cache = MetaCache::default();
        for _ in 0..1_000 {
            let request = RequestId::new();
            cache.insert(request, None, start);
            cache.forget(&request);
        }
        assert_eq!(cache.len(), 0, "finished requests leave nothing behind");

        // Requests finished by another processor are never forgotten here: age removes them.
        let unfinished: Vec<RequestId> = (0..100).map(|_| RequestId::new()).collect();
        for request in &unfinished {
            cache.insert(*request, None, start);
        }
        assert_eq!(cache.len(), 100);
        let later = RequestId::new();
        cache.insert(later, None, start + META_MAX_AGE);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&later).is_some());
        assert!(cache.order.len() <= 1, "the order queue ages out too");
    }

    #[test]
    fn the_meta_cache_is_capped_however_young_its_entries() {
        let now = Instant::now();
        let mut cache = MetaCache::default();
        let requests: Vec<RequestId> = (0..META_CACHE + 10).map(|_| RequestId::new()).collect();
        for request in &requests {
            cache.insert(*request, None, now);
        }
        assert_eq!(cache.len(), META_CACHE);
        assert!(cache.get(&requests[9]).is_none(), "the oldest go first");
        assert!(cache.get(&requests[10]).is_some());
    }
}
