//! One job, one attempt: open the upstream stream, write every token to the session stream
//! (fenced by attempt), write the terminal event, and report compact records for analytics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::types::chat::FinishReason as OpenAiFinish;
use fred::prelude::*;
use futures::StreamExt;
use stream_io::StreamIoError;
use stream_io::session::{AppendOutcome, RequestStreams, Retention, SessionScripts};
use stream_schema::record::Outcome;
use stream_schema::{
    ErrorCode, EventRecord, FinishReason, Job, SessionEvent, StreamKey, Usage, UsageSource,
};

use crate::upstream::{Registry, UpstreamError};

/// How often a worker checks the cancel key while no token arrives (tokens check it for free).
const CANCEL_POLL: Duration = Duration::from_millis(250);
/// Tokens reported per `tokens` record at most; records are written after their tokens.
const RECORD_BATCH: u32 = 32;

/// Shared by all workers of a producer.
pub struct WorkerContext {
    pub redis: Pool,
    pub scripts: SessionScripts,
    pub upstreams: Registry,
    pub retention: Retention,
    pub event_shards: u16,
    pub events_maxlen: u64,
}

/// How an attempt ended, from the producer's point of view.
#[derive(Debug)]
pub enum AttemptEnd {
    /// A terminal event was written (or the request was taken over): ack the job.
    Done,
    /// Redis failed: leave the job pending so it is retried or reclaimed.
    RedisFailed(StreamIoError),
}

struct Progress {
    sequence: u64,
    unreported: u32,
    first_token_at: Option<Instant>,
}

pub struct Attempt<'a> {
    ctx: &'a WorkerContext,
    job: &'a Job,
    attempt: u32,
    streams: RequestStreams,
    shard_key: StreamKey,
    started: Instant,
}

impl<'a> Attempt<'a> {
    pub fn new(ctx: &'a WorkerContext, job: &'a Job, attempt: u32) -> Self {
        let shard = stream_schema::keys::event_shard_of(&job.session_id, ctx.event_shards);
        Self {
            ctx,
            job,
            attempt,
            streams: RequestStreams::new(
                &job.session_id,
                &job.model_id,
                &job.request_id,
                ctx.retention,
            ),
            shard_key: StreamKey::events_shard(shard),
            started: Instant::now(),
        }
    }

    fn client(&self) -> &Client {
        self.ctx.redis.next()
    }

    async fn record(&self, record: EventRecord) -> Result<(), StreamIoError> {
        let _: String = self
            .client()
            .xadd(
                self.shard_key.as_str(),
                false,
                stream_io::approx_cap(self.ctx.events_maxlen),
                "*",
                record.encode(),
            )
            .await?;
        Ok(())
    }

    async fn report_tokens(&self, progress: &mut Progress) -> Result<(), StreamIoError> {
        if progress.unreported == 0 {
            return Ok(());
        }
        self.record(EventRecord::Tokens {
            request_id: self.job.request_id,
            session_id: self.job.session_id.clone(),
            model_id: self.job.model_id.clone(),
            count: progress.unreported,
            timestamp: stream_schema::now_millis(),
        })
        .await?;
        metrics::counter!("producer_tokens_total").increment(u64::from(progress.unreported));
        progress.unreported = 0;
        Ok(())
    }

    async fn cancelled(&self) -> Result<bool, StreamIoError> {
        let exists: bool = self.client().exists(self.streams.cancel.as_str()).await?;
        Ok(exists)
    }

    /// Runs the attempt to its end.
    pub async fn run(self) -> AttemptEnd {
        match self.generate().await {
            Ok(()) => AttemptEnd::Done,
            Err(error) => AttemptEnd::RedisFailed(error),
        }
    }

    async fn generate(&self) -> Result<(), StreamIoError> {
        let job = self.job;
        self.record(EventRecord::Started {
            request_id: job.request_id,
            session_id: job.session_id.clone(),
            model_id: job.model_id.clone(),
            attempt: self.attempt,
            timestamp: stream_schema::now_millis(),
        })
        .await?;
        let mut progress = Progress {
            sequence: 0,
            unreported: 0,
            first_token_at: None,
        };

        let upstream_started = Instant::now();
        let mut stream = match self.ctx.upstreams.stream(job).await {
            Ok(stream) => stream,
            Err(error) => return self.fail(&mut progress, &error).await,
        };
        metrics::histogram!("producer_upstream_connect_seconds")
            .record(upstream_started.elapsed().as_secs_f64());

        let mut finish: Option<FinishReason> = None;
        let mut usage: Option<(u32, u32)> = None;
        let mut cancel_poll = tokio::time::interval(CANCEL_POLL);
        cancel_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let chunk = tokio::select! {
                chunk = stream.next() => chunk,
                _ = cancel_poll.tick() => {
                    if self.cancelled().await? {
                        drop(stream);
                        return self.finish(&mut progress, FinishReason::Cancelled, None).await;
                    }
                    continue;
                }
            };
            let chunk = match chunk {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(error)) => {
                    drop(stream);
                    return self
                        .fail(&mut progress, &UpstreamError::from_stream(error))
                        .await;
                }
            };
            if let Some(reported) = chunk.usage {
                usage = Some((reported.prompt_tokens, reported.completion_tokens));
            }
            for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
                if let Some(reason) = choice.finish_reason {
                    finish = Some(map_finish(reason));
                }
                let Some(content) = choice.delta.content.filter(|c| !c.is_empty()) else {
                    continue;
                };
                let event = SessionEvent::Token {
                    request_id: job.request_id,
                    sequence: progress.sequence + 1,
                    content,
                    timestamp: stream_schema::now_millis(),
                };
                match self
                    .ctx
                    .scripts
                    .append(self.client(), &self.streams, self.attempt, &event, true)
                    .await?
                {
                    AppendOutcome::Written(_) => {
                        progress.sequence += 1;
                        if progress.first_token_at.is_none() {
                            progress.first_token_at = Some(Instant::now());
                            metrics::histogram!("producer_time_to_first_token_seconds")
                                .record(self.started.elapsed().as_secs_f64());
                        }
                        progress.unreported += 1;
                        if progress.unreported >= RECORD_BATCH {
                            self.report_tokens(&mut progress).await?;
                        }
                    }
                    AppendOutcome::Fenced => return self.fenced(&mut progress).await,
                    AppendOutcome::Cancelled => {
                        drop(stream);
                        return self
                            .finish(&mut progress, FinishReason::Cancelled, None)
                            .await;
                    }
                }
            }
        }
        match finish {
            Some(reason) => self.finish(&mut progress, reason, usage).await,
            // async-openai ends a stream that closed without `[DONE]` like a clean one; only
            // the missing finish reason tells that the answer was cut short.
            None => {
                let error =
                    UpstreamError::Stream("the stream ended without a finish reason".to_owned());
                self.fail(&mut progress, &error).await
            }
        }
    }

    async fn fenced(&self, progress: &mut Progress) -> Result<(), StreamIoError> {
        tracing::warn!(
            request_id = %self.job.request_id,
            attempt = self.attempt,
            "another attempt owns this request; stopping"
        );
        metrics::counter!("producer_fenced_total").increment(1);
        // The tokens written before the fence are real; report them, nothing else.
        self.report_tokens(progress).await
    }

    async fn finish(
        &self,
        progress: &mut Progress,
        reason: FinishReason,
        upstream_usage: Option<(u32, u32)>,
    ) -> Result<(), StreamIoError> {
        let job = self.job;
        let usage = match upstream_usage {
            Some((prompt, completion)) if reason != FinishReason::Cancelled => Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                source: UsageSource::Upstream,
            },
            _ => Usage {
                prompt_tokens: estimate_prompt_tokens(job),
                completion_tokens: u32::try_from(progress.sequence).unwrap_or(u32::MAX),
                source: UsageSource::Counted,
            },
        };
        let event = SessionEvent::Complete {
            request_id: job.request_id,
            finish_reason: reason,
            usage,
            timestamp: stream_schema::now_millis(),
        };
        self.terminal(progress, &event, Outcome::Completed(reason), usage)
            .await
    }

    async fn fail(
        &self,
        progress: &mut Progress,
        error: &UpstreamError,
    ) -> Result<(), StreamIoError> {
        tracing::warn!(request_id = %self.job.request_id, %error, "upstream failed");
        metrics::counter!("producer_upstream_errors_total", "kind" => error.kind()).increment(1);
        let code = ErrorCode::UpstreamError;
        let event = SessionEvent::Error {
            request_id: self.job.request_id,
            code,
            message: error.to_string(),
            retryable: error.retryable(),
            timestamp: stream_schema::now_millis(),
        };
        let usage = Usage {
            prompt_tokens: 0,
            completion_tokens: u32::try_from(progress.sequence).unwrap_or(u32::MAX),
            source: UsageSource::Counted,
        };
        self.terminal(progress, &event, Outcome::Failed(code), usage)
            .await
    }

    async fn terminal(
        &self,
        progress: &mut Progress,
        event: &SessionEvent,
        outcome: Outcome,
        usage: Usage,
    ) -> Result<(), StreamIoError> {
        let written = self
            .ctx
            .scripts
            .append(self.client(), &self.streams, self.attempt, event, false)
            .await?;
        if written == AppendOutcome::Fenced {
            return self.fenced(progress).await;
        }
        self.report_tokens(progress).await?;
        let job = self.job;
        let duration = self.started.elapsed();
        self.record(EventRecord::Finished {
            request_id: job.request_id,
            session_id: job.session_id.clone(),
            model_id: job.model_id.clone(),
            outcome,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            ttft_ms: progress
                .first_token_at
                .map(|t| millis(t.duration_since(self.started))),
            duration_ms: millis(duration),
            timestamp: stream_schema::now_millis(),
        })
        .await?;
        let label = match outcome {
            Outcome::Completed(reason) => reason.as_str(),
            Outcome::Failed(code) => code.as_str(),
        };
        metrics::counter!("producer_requests_total", "outcome" => label).increment(1);
        metrics::histogram!("producer_request_duration_seconds").record(duration.as_secs_f64());
        tracing::info!(
            request_id = %job.request_id,
            session_id = %job.session_id,
            outcome = label,
            tokens = progress.sequence,
            "request finished"
        );
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn map_finish(reason: OpenAiFinish) -> FinishReason {
    match reason {
        OpenAiFinish::Length => FinishReason::Length,
        OpenAiFinish::ContentFilter => FinishReason::ContentFilter,
        OpenAiFinish::Stop | OpenAiFinish::ToolCalls | OpenAiFinish::FunctionCall => {
            FinishReason::Stop
        }
    }
}

/// Words of the prompt: a rough count for when the upstream reports no usage.
fn estimate_prompt_tokens(job: &Job) -> u32 {
    let words: usize = job
        .messages
        .iter()
        .map(|m| m.content.split_whitespace().count())
        .sum();
    u32::try_from(words).unwrap_or(u32::MAX)
}

/// Shared handle for spawned workers.
pub type SharedContext = Arc<WorkerContext>;
