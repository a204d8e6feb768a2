//! The claim loop: takes jobs from `llm:requests` in group `llm:producers`, only as many as
//! there are free worker slots, so waiting jobs stay in Redis, not in memory.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::ClientUnblockFlag;
use service_kit::ops::LoopFlag;
use stream_io::groups;
use stream_schema::keys::PRODUCER_GROUP;
use stream_schema::{EntryId, Job, StreamKey};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::worker::{Attempt, AttemptEnd, SharedContext};

/// Most jobs claimed by one read.
const MAX_CLAIM_BATCH: usize = 32;

pub struct Claimer {
    pub ctx: SharedContext,
    /// Blocking reads only; never shared with workers.
    pub reader: Client,
    pub consumer: String,
    pub slots: Arc<Semaphore>,
    pub block_ms: u64,
    pub workers: TaskTracker,
}

impl Claimer {
    pub async fn run(self, shutdown: CancellationToken, flag: LoopFlag) {
        let requests = StreamKey::requests();
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            if let Err(error) = groups::ensure_group(&self.reader, &requests, PRODUCER_GROUP).await
            {
                tracing::warn!(%error, "cannot create the producer group; retrying");
                flag.set(false);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            break;
        }
        while !shutdown.is_cancelled() {
            flag.set(true);
            let first = tokio::select! {
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let mut permits = vec![first];
            while permits.len() < MAX_CLAIM_BATCH {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let read = groups::read_new(
                &self.reader,
                PRODUCER_GROUP,
                &self.consumer,
                std::slice::from_ref(&requests),
                permits.len() as u64,
                self.block_ms,
            );
            let result = tokio::select! {
                result = read => result,
                () = shutdown.cancelled() => {
                    let _ = self.reader.unblock_self(Some(ClientUnblockFlag::Timeout)).await;
                    break;
                }
            };
            match result {
                Ok(streams) => {
                    backoff = Duration::from_millis(100);
                    for (_, entries) in streams {
                        for entry in entries {
                            let Some(permit) = permits.pop() else {
                                tracing::error!("redis returned more jobs than asked for");
                                break;
                            };
                            self.start_worker(entry, permit);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "claiming jobs failed");
                    metrics::counter!("producer_claim_errors_total").increment(1);
                    flag.set(false);
                    drop(permits);
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

    fn start_worker(&self, entry: stream_io::Entry, permit: OwnedSemaphorePermit) {
        let ctx = self.ctx.clone();
        self.workers.spawn(async move {
            let _permit = permit;
            let job = match Job::decode(&entry.fields) {
                Ok(job) => job,
                Err(error) => {
                    // Nobody can ever run it: drop it rather than retry forever.
                    tracing::error!(id = %entry.id, %error, "undecodable job; discarding");
                    metrics::counter!("producer_decode_errors_total").increment(1);
                    let _ = finish_job(&ctx, entry.id).await;
                    return;
                }
            };
            metrics::counter!("producer_jobs_claimed_total").increment(1);
            match Attempt::new(&ctx, &job, 1).run().await {
                AttemptEnd::Done => {
                    if let Err(error) = finish_job(&ctx, entry.id).await {
                        tracing::warn!(request_id = %job.request_id, %error, "cannot ack job");
                    }
                }
                AttemptEnd::RedisFailed(error) => {
                    tracing::warn!(
                        request_id = %job.request_id,
                        %error,
                        "redis failed mid-request; the job stays pending for reclaim"
                    );
                }
            }
        });
    }
}

/// Acks the job and deletes it: its result lives in the session stream, and deleting keeps the
/// job stream as long as the backlog, not as long as history.
async fn finish_job(ctx: &SharedContext, id: EntryId) -> Result<(), stream_io::StreamIoError> {
    let client = ctx.redis.next();
    let key = StreamKey::requests();
    groups::ack(client, key.as_str(), PRODUCER_GROUP, &[id]).await?;
    let _: i64 = client.xdel(key.as_str(), id.to_string()).await?;
    Ok(())
}
