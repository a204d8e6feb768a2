//! Recovery and settlement of jobs: what a producer does with a job whose lease ran out, and
//! with a job once its worker ends. The code follows ARCHITECTURE.md's "Lease and fencing
//! protocol": a reclaimed job is judged by its owner key (`llm:owner:{session}:request`):
//!
//! - `done` → acknowledge it (the last worker wrote the end but died before `XACK`);
//! - missing → dead-letter it (the request's stream expired: nobody is left to answer);
//! - attempt *n* ≥ `producer.max_attempts` → `give_up` (owner `done` + `error job_failed`)
//!   and dead-letter it;
//! - otherwise `TAKE_OVER` (owner *n* → *n + 1* + `restart`) and run attempt *n + 1*.
//!
//! Only an attempt that wrote its terminal event (or a dead-lettered job) is acknowledged and
//! deleted ([`Settle::Finish`]); every other job stays pending for whoever owns or reclaims it.

use std::collections::BTreeMap;

use fred::prelude::*;
use stream_io::session::{OwnerState, RequestStreams, TakeOver};
use stream_io::{Entry, StreamIoError, records};
use stream_schema::record::Outcome;
use stream_schema::{DeadLetter, EntryId, ErrorCode, EventRecord, Job, SessionEvent};

use crate::worker::{AttemptEnd, WorkerContext};

/// The `reason` of the `restart` event of a reclaimed job.
const RESTART_REASON: &str = "producer_lost";

/// What to do with a job's entry once its worker is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// It ended (or was dead-lettered): acknowledge and delete it.
    Finish,
    /// Someone else owns it, or it must be reclaimed later: leave it pending.
    Leave,
}

impl Settle {
    /// How an attempt's end settles its job: only an attempt that wrote its terminal event
    /// finishes it.
    pub fn after(end: &AttemptEnd) -> Self {
        match end {
            AttemptEnd::Done => Self::Finish,
            AttemptEnd::Fenced | AttemptEnd::Abandoned(_) | AttemptEnd::RedisFailed(_) => {
                Self::Leave
            }
        }
    }

    /// A take-over that found the owner moved: done means the request ended; anything else
    /// means another producer runs it now.
    fn after_lost(state: OwnerState) -> Self {
        match state {
            OwnerState::Done => Self::Finish,
            OwnerState::Attempt(_) | OwnerState::Missing => Self::Leave,
        }
    }
}

/// What a reclaimed job needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reclaimed {
    /// This producer took the request over: run this attempt.
    Run(u32),
    /// Nothing to run: settle the job.
    Settled(Settle),
}

/// The recovery decisions of one producer, over its shared worker context.
pub struct Recovery<'a> {
    pub ctx: &'a WorkerContext,
    /// This producer's consumer name, recorded in dead letters.
    pub consumer: &'a str,
    /// `producer.max_attempts`.
    pub max_attempts: u32,
    /// `streams.requests_maxlen`, also the cap of the dead-letter stream.
    pub dead_maxlen: u64,
}

impl Recovery<'_> {
    /// Decides what a reclaimed job needs by its owner key, and takes the request over when
    /// it needs a new attempt.
    pub async fn reclaim(&self, entry: &Entry, job: &Job) -> Result<Reclaimed, StreamIoError> {
        let client = self.ctx.redis.next();
        let streams = RequestStreams::new(
            &job.session_id,
            &job.model_id,
            &job.request_id,
            self.ctx.retention,
        );
        match stream_io::session::owner_state(client, &streams.owner).await? {
            OwnerState::Done => {
                tracing::info!(request_id = %job.request_id, "reclaimed job had already ended");
                Ok(Reclaimed::Settled(Settle::Finish))
            }
            OwnerState::Missing => {
                let reason = "expired: the request's stream and owner key are gone".to_owned();
                Ok(Reclaimed::Settled(
                    self.dead_letter(entry, Some(job), reason, 0).await,
                ))
            }
            OwnerState::Attempt(current) if current >= self.max_attempts => {
                self.give_up(client, &streams, entry, job, current).await
            }
            OwnerState::Attempt(current) => self.take_over(client, &streams, job, current).await,
        }
    }

    /// Ends a request that kept failing: owner `done` + `error job_failed`, a `finish` record,
    /// and the job to `llm:dead`.
    async fn give_up(
        &self,
        client: &Client,
        streams: &RequestStreams,
        entry: &Entry,
        job: &Job,
        current: u32,
    ) -> Result<Reclaimed, StreamIoError> {
        let message = format!(
            "the request was given up after {current} attempts (producers kept failing on it)"
        );
        let failed = SessionEvent::Error {
            request_id: job.request_id,
            code: ErrorCode::JobFailed,
            message,
            retryable: false,
            timestamp: stream_schema::now_millis(),
        };
        let settle = match self
            .ctx
            .scripts
            .give_up(client, streams, current, &failed)
            .await?
        {
            TakeOver::Taken(_) => {
                self.record_poisoned(job, client).await?;
                let reason = format!("attempts_exhausted: {current} attempts");
                self.dead_letter(entry, Some(job), reason, current).await
            }
            TakeOver::Lost(state) => Settle::after_lost(state),
        };
        Ok(Reclaimed::Settled(settle))
    }

    /// Moves the owner from `current` to `current + 1` with a `restart` event.
    async fn take_over(
        &self,
        client: &Client,
        streams: &RequestStreams,
        job: &Job,
        current: u32,
    ) -> Result<Reclaimed, StreamIoError> {
        let restart = SessionEvent::Restart {
            request_id: job.request_id,
            attempt: current + 1,
            reason: RESTART_REASON.to_owned(),
            // A new attempt starts from the requested model, the head of its fallback chain.
            served_by: Some(job.model_id.clone()),
            timestamp: stream_schema::now_millis(),
        };
        Ok(
            match self
                .ctx
                .scripts
                .take_over(client, streams, current, &restart)
                .await?
            {
                TakeOver::Taken(_) => {
                    tracing::info!(
                        request_id = %job.request_id,
                        attempt = current + 1,
                        "took over a job whose producer was lost"
                    );
                    metrics::counter!("producer_restarts_total").increment(1);
                    Reclaimed::Run(current + 1)
                }
                TakeOver::Lost(state) => Reclaimed::Settled(Settle::after_lost(state)),
            },
        )
    }

    /// The `finish` record of a given-up request, so analytics count it as failed.
    async fn record_poisoned(&self, job: &Job, client: &Client) -> Result<(), StreamIoError> {
        let record = EventRecord::Finished {
            request_id: job.request_id,
            session_id: job.session_id.clone(),
            model_id: job.model_id.clone(),
            outcome: Outcome::Failed(ErrorCode::JobFailed),
            prompt_tokens: 0,
            completion_tokens: 0,
            ttft_ms: None,
            duration_ms: 0,
            timestamp: stream_schema::now_millis(),
        };
        // In the `job.claim` span of the take-over, like the worker's records.
        self.ctx
            .event_log()
            .append(
                client,
                &record,
                service_kit::telemetry::current_traceparent(),
            )
            .await?;
        Ok(())
    }

    /// Moves a job to `llm:dead`; it is then acknowledged and deleted like a finished one.
    pub async fn dead_letter(
        &self,
        entry: &Entry,
        job: Option<&Job>,
        reason: String,
        attempts: u32,
    ) -> Settle {
        tracing::error!(id = %entry.id, %reason, "dead-lettering job");
        metrics::counter!("producer_dead_letters_total").increment(1);
        let dead = DeadLetter {
            job_entry: entry.id,
            request_id: job.map(|j| j.request_id),
            reason,
            attempts,
            consumer: self.consumer.to_owned(),
            timestamp: stream_schema::now_millis(),
            job_fields: entry.fields.iter().cloned().collect::<BTreeMap<_, _>>(),
        };
        match records::dead_letter(self.ctx.redis.next(), self.dead_maxlen, &dead).await {
            Ok(_) => Settle::Finish,
            Err(error) => {
                // Keep the job pending: the next reclaim dead-letters it again.
                tracing::warn!(id = %entry.id, %error, "cannot write the dead letter");
                Settle::Leave
            }
        }
    }

    /// Acks the job and deletes it: its result lives in the session stream, and deleting keeps
    /// the job stream as long as the backlog, not as long as history.
    pub async fn finish_job(&self, id: EntryId) -> Result<(), StreamIoError> {
        stream_io::requests::delete_job(self.ctx.redis.next(), id).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use stream_io::Entry;
    use stream_schema::{EntryId, ErrorCode, EventRecord, Job, RedisKey, SessionEvent};

    use super::{Reclaimed, Recovery, Settle};
    use crate::worker::testing::{Env, job};

    fn recovery(env: &Env) -> Recovery<'_> {
        Recovery {
            ctx: &env.ctx,
            consumer: "producer-test",
            max_attempts: 3,
            dead_maxlen: 100,
        }
    }

    fn entry(job: &Job) -> anyhow::Result<Entry> {
        Ok(Entry {
            id: EntryId::parse("7-0")?,
            fields: job
                .encode()
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
        })
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "the test forges an owner state that no code path writes directly"
    )]
    async fn set_owner(env: &Env, job: &Job, value: &str) -> anyhow::Result<()> {
        use fred::prelude::*;
        let owner = env.streams(job).owner;
        let _: () = env
            .client()
            .set(owner.as_str(), value, None, None, false)
            .await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_live_attempt_is_taken_over_as_the_next_one() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;

        let reclaimed = recovery(&env).reclaim(&entry(&job)?, &job).await?;

        assert_eq!(reclaimed, Reclaimed::Run(2));
        let events = env.events(&job).await?;
        assert!(matches!(
            events.last(),
            Some(SessionEvent::Restart { attempt: 2, .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn a_finished_request_is_only_acknowledged() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;
        set_owner(&env, &job, stream_io::session::OWNER_DONE).await?;

        let reclaimed = recovery(&env).reclaim(&entry(&job)?, &job).await?;

        assert_eq!(reclaimed, Reclaimed::Settled(Settle::Finish));
        assert_eq!(env.events(&job).await?.len(), 1, "nothing after `start`");
        assert!(env.entries(&RedisKey::dead_letter()).await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn an_expired_request_is_dead_lettered() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;

        let reclaimed = recovery(&env).reclaim(&entry(&job)?, &job).await?;

        assert_eq!(reclaimed, Reclaimed::Settled(Settle::Finish));
        let dead = env.entries(&RedisKey::dead_letter()).await?;
        assert_eq!(dead.len(), 1);
        let dead = stream_schema::DeadLetter::decode(&dead[0].fields)?;
        assert_eq!((dead.request_id, dead.attempts), (Some(job.request_id), 0));
        Ok(())
    }

    #[tokio::test]
    async fn a_request_out_of_attempts_is_given_up_and_dead_lettered() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;
        set_owner(&env, &job, "3").await?;

        let reclaimed = recovery(&env).reclaim(&entry(&job)?, &job).await?;

        assert_eq!(reclaimed, Reclaimed::Settled(Settle::Finish));
        assert!(matches!(
            env.events(&job).await?.last(),
            Some(SessionEvent::Error {
                code: ErrorCode::JobFailed,
                retryable: false,
                ..
            })
        ));
        assert!(matches!(
            env.records(&job).await?.as_slice(),
            [EventRecord::Finished { .. }]
        ));
        let dead = env.entries(&RedisKey::dead_letter()).await?;
        assert_eq!(
            stream_schema::DeadLetter::decode(&dead[0].fields)?.attempts,
            3
        );
        Ok(())
    }
}
