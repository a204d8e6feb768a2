//! One shard's consumer loop in group `llm:processors`: read a batch, apply each record exactly
//! once, `XACK` the batch; periodically reclaim entries orphaned by dead consumers.

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::ClientUnblockFlag;
use service_kit::ops::LoopFlag;
use stream_io::{Entry, StreamIoError, groups};
use stream_schema::keys::PROCESSOR_GROUP;
use stream_schema::{EntryId, EventRecord, StreamKey};
use tokio_util::sync::CancellationToken;

use crate::apply::Applier;

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
    pub reclaim_idle_ms: u64,
}

impl ShardConsumer {
    fn key(&self) -> StreamKey {
        StreamKey::events_shard(self.shard)
    }

    /// Applies and acks entries; an entry that cannot be decoded is acked and counted (it can
    /// never succeed), a Redis failure leaves the rest pending.
    async fn process(&self, entries: Vec<Entry>) -> Result<(), StreamIoError> {
        let client = self.redis.next();
        let mut done: Vec<EntryId> = Vec::with_capacity(entries.len());
        for entry in entries {
            match EventRecord::decode(&entry.fields) {
                Ok(record) => {
                    // Settle first: it is idempotent by itself, so a crash before the counters
                    // are applied (and the record redelivered) settles nothing twice.
                    if let EventRecord::Finished {
                        request_id,
                        completion_tokens,
                        ..
                    } = &record
                    {
                        self.reconciler
                            .settle(client, request_id, *completion_tokens)
                            .await?;
                    }
                    let applied = self
                        .applier
                        .apply(client, self.shard, entry.id, &record)
                        .await?;
                    let outcome = if applied { "applied" } else { "duplicate" };
                    metrics::counter!("processor_records_total", "outcome" => outcome).increment(1);
                }
                Err(error) => {
                    tracing::warn!(shard = self.shard, id = %entry.id, %error, "undecodable record");
                    metrics::counter!("processor_records_total", "outcome" => "undecodable")
                        .increment(1);
                }
            }
            done.push(entry.id);
        }
        groups::ack(client, self.key().as_str(), PROCESSOR_GROUP, &done).await
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

    pub async fn run(self, shutdown: CancellationToken, flag: LoopFlag) {
        let key = self.key();
        let mut backoff = Duration::from_millis(100);
        let mut last_reclaim = Instant::now() - RECLAIM_EVERY;
        while !shutdown.is_cancelled() {
            let step = async {
                groups::ensure_group(&self.reader, &key, PROCESSOR_GROUP).await?;
                if last_reclaim.elapsed() >= RECLAIM_EVERY {
                    last_reclaim = Instant::now();
                    self.reclaim().await?;
                }
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
                for (_, entries) in streams {
                    // Finish the batch even during shutdown: its effects are applied and acked
                    // together, so nothing is left half-done.
                    self.process(entries).await?;
                }
                Ok::<(), StreamIoError>(())
            };
            match step.await {
                Ok(()) => {
                    flag.set(true);
                    backoff = Duration::from_millis(100);
                }
                Err(error) => {
                    tracing::warn!(shard = self.shard, %error, "processing failed; retrying");
                    metrics::counter!("processor_errors_total").increment(1);
                    flag.set(false);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        flag.set(false);
    }
}
