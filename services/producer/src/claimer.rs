//! Taking jobs: orphaned ones whose lease ran out (`XAUTOCLAIM`), and new ones from
//! `llm:requests` in group `llm:producers` (`XREADGROUP`). Both take only as many jobs as there
//! are free worker permits, so waiting jobs stay in Redis, not in memory.
//!
//! The [`Dispatcher`] starts a worker per claimed job; what a reclaimed job needs, and how a
//! job is settled when its worker ends, is `recovery`'s.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::ClientUnblockFlag;
use service_kit::backoff::Backoff;
use service_kit::ops::LoopFlag;
use stream_io::groups;
use stream_schema::keys::PRODUCER_GROUP;
use stream_schema::{Job, RedisKey};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::lease::Leases;
use crate::recovery::{Reclaimed, Recovery, Settle};
use crate::worker::{Attempt, AttemptEnd, SharedContext, StopSignals};

/// Most jobs claimed by one read.
const MAX_CLAIM_BATCH: usize = 32;
/// `XAUTOCLAIM` pages scanned per reclaim round at most (each scans up to 10 × COUNT entries).
const MAX_RECLAIM_PAGES: usize = 10;

/// How a job came to this producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// First delivery: the gateway made attempt 1 its owner.
    New,
    /// Its lease ran out with another (or an earlier) worker.
    Reclaimed,
}

impl Claim {
    fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Reclaimed => "reclaimed",
        }
    }
}

/// Starts workers for claimed jobs and settles each job when its worker ends. Shared by the
/// claim and reclaim loops.
pub struct Dispatcher {
    pub ctx: SharedContext,
    pub consumer: String,
    /// Worker permits (`producer.concurrency`); a job is claimed only with one in hand.
    pub worker_permits: Arc<Semaphore>,
    pub leases: Arc<Leases>,
    pub workers: TaskTracker,
    /// Cancelled when the shutdown grace period is over: workers stop without a terminal event.
    pub hard_stop: CancellationToken,
    pub max_attempts: u32,
    /// `streams.requests_maxlen`, also the cap of the dead-letter stream.
    pub dead_maxlen: u64,
}

impl Dispatcher {
    fn start(
        self: &Arc<Self>,
        entry: stream_io::Entry,
        permit: OwnedSemaphorePermit,
        claim: Claim,
    ) {
        let Some(lease_lost) = self.leases.acquire(entry.id) else {
            // Already running here (our renewal slipped past the lease and we reclaimed our own
            // job): the running worker keeps it, and its renewal fixes the idle time.
            return;
        };
        // A child per job: an attempt polls its stop signals on every token, and checking a
        // token locks its node; the shared token's lock would be taken by every attempt.
        let signals = StopSignals {
            lease_lost,
            hard_stop: self.hard_stop.child_token(),
        };
        let this = Arc::clone(self);
        self.workers.spawn(async move {
            let _permit = permit;
            let _in_flight = InFlight::enter();
            let id = entry.id;
            metrics::counter!("producer_jobs_claimed_total", "claim" => claim.as_str())
                .increment(1);
            let settle = this.run_job(entry, claim, signals).await;
            if settle == Settle::Finish
                && let Err(error) = this.recovery().finish_job(id).await
            {
                // It stays pending; whoever reclaims it finds the owner `done` and acks it.
                tracing::warn!(%id, %error, "cannot acknowledge a finished job");
            }
            this.leases.release(id);
        });
    }

    /// The recovery decisions, over this dispatcher's settings.
    fn recovery(&self) -> Recovery<'_> {
        Recovery {
            ctx: &self.ctx,
            consumer: &self.consumer,
            max_attempts: self.max_attempts,
            dead_maxlen: self.dead_maxlen,
        }
    }

    async fn run_job(&self, entry: stream_io::Entry, claim: Claim, signals: StopSignals) -> Settle {
        let job = match Job::decode(&entry.fields) {
            Ok(job) => job,
            Err(error) => {
                // Nobody can ever run it: dead-letter it rather than retry forever.
                tracing::error!(id = %entry.id, %error, "undecodable job");
                metrics::counter!("producer_decode_errors_total").increment(1);
                return self
                    .recovery()
                    .dead_letter(&entry, None, format!("undecodable: {error}"), 0)
                    .await;
            }
        };
        // The claim joins the request's trace: a new job's span marks how long it queued; a
        // reclaimed job's covers the take-over (or the dead-lettering) too.
        let claim_span = tracing::info_span!(
            "job.claim",
            job_entry = %entry.id,
            claim = claim.as_str(),
            request_id = %job.request_id,
            session_id = %job.session_id,
            queued_ms = stream_schema::now_millis().saturating_sub(job.enqueued_at),
            attempt = tracing::field::Empty,
        );
        service_kit::telemetry::continue_trace(&claim_span, job.traceparent.as_deref());
        let attempt = match claim {
            Claim::New => 1,
            Claim::Reclaimed => match self
                .recovery()
                .reclaim(&entry, &job)
                .instrument(claim_span.clone())
                .await
            {
                Ok(Reclaimed::Run(attempt)) => attempt,
                Ok(Reclaimed::Settled(settle)) => return settle,
                Err(error) => {
                    tracing::warn!(request_id = %job.request_id, %error, "cannot reclaim job");
                    return Settle::Leave;
                }
            },
        };
        claim_span.record("attempt", attempt);
        drop(claim_span);
        let end = Attempt::new(&self.ctx, &job, attempt, signals).run().await;
        if let AttemptEnd::RedisFailed(error) = &end {
            tracing::warn!(
                request_id = %job.request_id,
                %error,
                "redis failed mid-request; the job is reclaimed once its lease runs out"
            );
        }
        Settle::after(&end)
    }

    /// Up to `MAX_CLAIM_BATCH` permits: at least one (waiting for it), then whatever is free.
    fn free_permits(&self, mut permits: Vec<OwnedSemaphorePermit>) -> Vec<OwnedSemaphorePermit> {
        while permits.len() < MAX_CLAIM_BATCH {
            match self.worker_permits.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        permits
    }
}

/// Counts a running worker in `producer_in_flight` (the autoscaling signal: requests being
/// generated now) for as long as it lives; dropping it, also when the worker panics, uncounts it.
struct InFlight;

impl InFlight {
    const GAUGE: &'static str = "producer_in_flight";

    fn enter() -> Self {
        metrics::gauge!(Self::GAUGE).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(Self::GAUGE).decrement(1.0);
    }
}

/// The claim loop: with free worker permits in hand, first takes over jobs whose lease ran out (every
/// `reclaim_interval`), then reads new jobs with the permits left. One loop owns the permits, so a
/// blocking read never starves the reclaim of permits, and older (reclaimed) work goes first.
#[derive(Clone)]
pub struct Claimer {
    pub dispatcher: Arc<Dispatcher>,
    /// Blocking reads only; never shared with workers.
    pub reader: Client,
    pub block_ms: u64,
    pub lease: Duration,
    pub reclaim_interval: Duration,
}

impl Claimer {
    pub async fn run(self, shutdown: CancellationToken, flag: LoopFlag) {
        let requests = RedisKey::requests();
        let dispatcher = &self.dispatcher;
        let mut backoff = Backoff::default();
        // The group exists as far as this loop knows; a `NOGROUP` reply clears it.
        let mut group_ready = false;
        // A read blocks no longer than the reclaim interval, so reclaiming stays on time.
        let block_ms = self
            .block_ms
            .min(crate::worker::millis(self.reclaim_interval))
            .max(1);
        let mut reclaim = Reclaim::new(self.lease);
        let mut next_reclaim = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if !group_ready {
                // From the start of the stream (`0`), so a job enqueued while the group was
                // missing is read, not skipped.
                match groups::ensure_group(&self.reader, &requests, PRODUCER_GROUP).await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        tracing::warn!(%error, "cannot create the producer group; retrying");
                        flag.set(false);
                        if !backoff.wait(&shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            flag.set(true);
            let first = tokio::select! {
                permit = dispatcher.worker_permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let mut permits = dispatcher.free_permits(vec![first]);
            if tokio::time::Instant::now() >= next_reclaim {
                next_reclaim = tokio::time::Instant::now() + self.reclaim_interval;
                permits = reclaim.run(dispatcher, permits).await;
                if permits.is_empty() {
                    continue;
                }
            }
            let read = groups::read_new(
                &self.reader,
                PRODUCER_GROUP,
                &dispatcher.consumer,
                std::slice::from_ref(&requests),
                permits.len() as u64,
                block_ms,
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
                    backoff.reset();
                    for (_, entries) in streams {
                        for entry in entries {
                            let Some(permit) = permits.pop() else {
                                tracing::error!("redis returned more jobs than asked for");
                                break;
                            };
                            dispatcher.start(entry, permit, Claim::New);
                        }
                    }
                }
                Err(error) => {
                    if error.is_missing_group() {
                        tracing::warn!(%error, "the producer group is gone (Redis lost its data?); recreating it");
                        group_ready = false;
                    } else {
                        tracing::warn!(%error, "claiming jobs failed");
                    }
                    metrics::counter!("producer_claim_errors_total").increment(1);
                    flag.set(false);
                    drop(permits);
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                }
            }
        }
        flag.set(false);
    }
}

/// The `XAUTOCLAIM` scan of the pending list.
struct Reclaim {
    min_idle_ms: u64,
    /// Where the scan goes on next round; `0-0` starts over.
    cursor: String,
}

impl Reclaim {
    fn new(lease: Duration) -> Self {
        Self {
            min_idle_ms: crate::worker::millis(lease),
            cursor: "0-0".to_owned(),
        }
    }

    /// Takes over up to `permits.len()` jobs whose lease ran out; returns the unused permits.
    async fn run(
        &mut self,
        dispatcher: &Arc<Dispatcher>,
        mut permits: Vec<OwnedSemaphorePermit>,
    ) -> Vec<OwnedSemaphorePermit> {
        let requests = RedisKey::requests();
        for _ in 0..MAX_RECLAIM_PAGES {
            if permits.is_empty() {
                break;
            }
            let page = groups::autoclaim(
                dispatcher.ctx.redis.next(),
                &requests,
                PRODUCER_GROUP,
                &dispatcher.consumer,
                self.min_idle_ms,
                &self.cursor,
                permits.len() as u64,
            )
            .await;
            let (next, entries) = match page {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "reclaiming jobs failed");
                    metrics::counter!("producer_claim_errors_total").increment(1);
                    break;
                }
            };
            for entry in entries {
                if dispatcher.leases.contains(entry.id) {
                    // Ours already (our renewal slipped past the lease): keep running it.
                    continue;
                }
                let Some(permit) = permits.pop() else {
                    // More entries than asked for cannot happen; if it did, the rest stay
                    // pending with us, unrenewed, and come back after another lease.
                    break;
                };
                tracing::info!(id = %entry.id, "reclaiming a job whose lease ran out");
                dispatcher.start(entry, permit, Claim::Reclaimed);
            }
            let done = next == "0-0";
            self.cursor = next;
            if done {
                break;
            }
        }
        permits
    }
}
