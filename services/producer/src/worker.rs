//! One job, one attempt: open the upstream stream (retrying transient failures before the first
//! token), write every token to the session stream (fenced by attempt), write the terminal
//! event, and report compact records for analytics.
//!
//! An attempt ends in one of four ways, and only the first lets the job be acknowledged:
//! it wrote its terminal event ([`AttemptEnd::Done`]); another attempt owns the request
//! ([`AttemptEnd::Fenced`]); it was told to stop because it lost its lease or the producer is
//! shutting down ([`AttemptEnd::Abandoned`]); or Redis failed ([`AttemptEnd::RedisFailed`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::types::chat::FinishReason as OpenAiFinish;
use fred::prelude::*;
use futures::StreamExt;
use stream_io::StreamIoError;
use stream_io::session::{AppendOutcome, RequestStreams, Retention, SessionScripts};
use stream_schema::record::Outcome;
use stream_schema::{EventRecord, FinishReason, Job, RedisKey, SessionEvent, Usage, UsageSource};
use tokio::time::timeout_at;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

use crate::upstream::{Registry, Upstream, UpstreamError};

/// How often a worker checks the cancel key while no token arrives (tokens check it for free).
const CANCEL_POLL: Duration = Duration::from_millis(250);
/// Tokens reported per `tokens` record at most; records are written after their tokens.
const RECORD_BATCH: u32 = 32;
/// Coalesced text is written at once past this size, whatever the window says.
const MAX_COALESCED_BYTES: usize = 16 * 1024;

/// Shared by all workers of a producer.
pub struct WorkerContext {
    pub redis: Pool,
    pub scripts: SessionScripts,
    pub upstreams: Registry,
    pub retention: Retention,
    pub event_shards: u16,
    pub events_maxlen: u64,
    /// `producer.token_coalesce_ms`; zero writes each token as it arrives.
    pub token_coalesce: Duration,
}

/// Shared handle for spawned workers.
pub type SharedContext = Arc<WorkerContext>;

/// Why an attempt stopped without a terminal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Another producer reclaimed the job (this one stalled past its lease).
    LeaseLost,
    /// The shutdown grace period ran out.
    Shutdown,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::LeaseLost => "lease_lost",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Tokens an attempt watches for being told to stop. Cancelled by the lease renewer (this
/// job's lease is gone) and by the application (grace period over); read by the attempt.
#[derive(Clone, Debug, Default)]
pub struct StopSignals {
    pub lease_lost: CancellationToken,
    pub hard_stop: CancellationToken,
}

impl StopSignals {
    async fn stopped(&self) -> StopReason {
        tokio::select! {
            () = self.lease_lost.cancelled() => StopReason::LeaseLost,
            () = self.hard_stop.cancelled() => StopReason::Shutdown,
        }
    }
}

/// How an attempt ended, from the producer's point of view.
#[derive(Debug)]
pub enum AttemptEnd {
    /// The terminal event was written: ack the job.
    Done,
    /// Another attempt owns the request: leave the job to it.
    Fenced,
    /// Told to stop: leave the job pending for whoever holds (or reclaims) its lease.
    Abandoned(StopReason),
    /// Redis failed: leave the job pending so it is reclaimed once its lease runs out.
    RedisFailed(StreamIoError),
}

impl AttemptEnd {
    /// A short name for logs and span fields.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Fenced => "fenced",
            Self::Abandoned(reason) => reason.as_str(),
            Self::RedisFailed(_) => "redis_failed",
        }
    }
}

/// What interrupted a wait.
enum Interrupt {
    Cancelled,
    Stopped(StopReason),
}

#[derive(Default)]
struct Progress {
    /// `token` events written (their `sequence`).
    sequence: u64,
    /// Upstream tokens written (more than `sequence` when tokens are coalesced).
    tokens: u32,
    /// Written tokens not yet reported in a `tokens` record.
    unreported: u32,
    first_token_at: Option<Instant>,
    /// Time spent waiting on the upstream (connecting, between chunks, retry backoff): the
    /// rest of the attempt's duration is the bridge's own overhead.
    upstream_wait: Duration,
}

/// Tokens received but not written yet (coalescing window).
#[derive(Default)]
struct Pending {
    text: String,
    tokens: u32,
    flush_at: Option<tokio::time::Instant>,
}

pub struct Attempt<'a> {
    ctx: &'a WorkerContext,
    job: &'a Job,
    attempt: u32,
    signals: StopSignals,
    streams: RequestStreams,
    shard_key: RedisKey,
    started: Instant,
    /// `producer.attempt`, in the trace of the gateway's `chat.start` (the job's `tp`).
    span: tracing::Span,
}

impl<'a> Attempt<'a> {
    pub fn new(ctx: &'a WorkerContext, job: &'a Job, attempt: u32, signals: StopSignals) -> Self {
        let shard = stream_schema::keys::event_shard_of(&job.session_id, ctx.event_shards);
        let span = tracing::info_span!(
            "producer.attempt",
            request_id = %job.request_id,
            session_id = %job.session_id,
            model_id = %job.model_id,
            attempt,
            tokens = Empty,
            ttft_ms = Empty,
            outcome = Empty,
            end = Empty,
        );
        service_kit::telemetry::continue_trace(&span, job.traceparent.as_deref());
        Self {
            ctx,
            job,
            attempt,
            signals,
            streams: RequestStreams::new(
                &job.session_id,
                &job.model_id,
                &job.request_id,
                ctx.retention,
            ),
            shard_key: RedisKey::events_shard(shard),
            started: Instant::now(),
            span,
        }
    }

    fn client(&self) -> &Client {
        self.ctx.redis.next()
    }

    /// The one place records are written. Each carries the `traceparent` of the span it is
    /// written in (the attempt, or its `llm.call`), so the processor's `record.apply` joins the
    /// request's trace; without trace export there is none and the record is unchanged.
    async fn record_on(&self, client: &Client, record: EventRecord) -> Result<(), StreamIoError> {
        let fields = stream_schema::codec::with_traceparent(
            record.encode(),
            service_kit::telemetry::current_traceparent(),
        );
        let _: String = client
            .xadd(
                self.shard_key.as_str(),
                false,
                stream_io::approx_cap(self.ctx.events_maxlen),
                "*",
                fields,
            )
            .await?;
        Ok(())
    }

    async fn record(&self, record: EventRecord) -> Result<(), StreamIoError> {
        self.record_on(self.client(), record).await
    }

    fn tokens_record(&self, count: u32) -> EventRecord {
        EventRecord::Tokens {
            request_id: self.job.request_id,
            session_id: self.job.session_id.clone(),
            model_id: self.job.model_id.clone(),
            count,
            timestamp: stream_schema::now_millis(),
        }
    }

    async fn report_tokens(&self, progress: &mut Progress) -> Result<(), StreamIoError> {
        if progress.unreported == 0 {
            return Ok(());
        }
        self.record(self.tokens_record(progress.unreported)).await?;
        metrics::counter!("producer_tokens_total").increment(u64::from(progress.unreported));
        progress.unreported = 0;
        Ok(())
    }

    async fn cancelled(&self) -> Result<bool, StreamIoError> {
        let exists: bool = self.client().exists(self.streams.cancel.as_str()).await?;
        Ok(exists)
    }

    /// Runs the attempt to its end, in its `producer.attempt` span.
    pub async fn run(self) -> AttemptEnd {
        let span = self.span.clone();
        self.run_in_span().instrument(span).await
    }

    async fn run_in_span(self) -> AttemptEnd {
        let mut progress = Progress::default();
        let end = self.generate(&mut progress).await;
        // Tokens written before any kind of end are real: report them (best effort once Redis
        // failed; the processor then undercounts rather than double counts).
        if !matches!(end, Ok(AttemptEnd::Done))
            && let Err(error) = self.report_tokens(&mut progress).await
        {
            tracing::debug!(%error, "cannot report the last tokens");
        }
        let end = end.unwrap_or_else(AttemptEnd::RedisFailed);
        // Token writes are summarised on the span (a count), never a span per token.
        self.span.record("tokens", progress.tokens);
        if let Some(first) = progress.first_token_at {
            self.span
                .record("ttft_ms", millis(first.duration_since(self.started)));
        }
        self.span.record("end", end.as_str());
        end
    }

    /// Waits for `work`, but gives up when the request is cancelled (checked every
    /// [`CANCEL_POLL`]) or the attempt is told to stop.
    async fn interruptible<F: Future>(
        &self,
        work: F,
    ) -> Result<Result<F::Output, Interrupt>, StreamIoError> {
        let mut work = std::pin::pin!(work);
        let mut poll = tokio::time::interval(CANCEL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                reason = self.signals.stopped() => return Ok(Err(Interrupt::Stopped(reason))),
                output = &mut work => return Ok(Ok(output)),
                _ = poll.tick() => {
                    if self.cancelled().await? {
                        return Ok(Err(Interrupt::Cancelled));
                    }
                }
            }
        }
    }

    async fn interrupted(
        &self,
        progress: &mut Progress,
        interrupt: Interrupt,
    ) -> Result<AttemptEnd, StreamIoError> {
        match interrupt {
            Interrupt::Cancelled => self.finish(progress, FinishReason::Cancelled, None).await,
            Interrupt::Stopped(reason) => Ok(self.abandon(reason)),
        }
    }

    fn abandon(&self, reason: StopReason) -> AttemptEnd {
        tracing::warn!(
            request_id = %self.job.request_id,
            attempt = self.attempt,
            reason = reason.as_str(),
            "stopping the attempt; the job stays pending for another producer"
        );
        metrics::counter!("producer_attempts_abandoned_total", "reason" => reason.as_str())
            .increment(1);
        AttemptEnd::Abandoned(reason)
    }

    async fn generate(&self, progress: &mut Progress) -> Result<AttemptEnd, StreamIoError> {
        let job = self.job;
        self.record(EventRecord::Started {
            request_id: job.request_id,
            session_id: job.session_id.clone(),
            model_id: job.model_id.clone(),
            attempt: self.attempt,
            timestamp: stream_schema::now_millis(),
        })
        .await?;
        let upstream = match self.ctx.upstreams.get(job.model_id.as_str()) {
            Ok(upstream) => upstream,
            Err(error) => return self.fail(progress, &error).await,
        };
        let _slot = match self.interruptible(upstream.slot()).await? {
            Ok(slot) => slot,
            Err(interrupt) => return self.interrupted(progress, interrupt).await,
        };

        let mut retries = 0_u32;
        loop {
            let call = tracing::info_span!(
                "llm.call",
                model_id = %job.model_id,
                retry = retries,
                ttft_ms = Empty,
                tokens = Empty,
                finish_reason = Empty,
                error_kind = Empty,
            );
            let (call_started, tokens_before, had_first) = (
                Instant::now(),
                progress.tokens,
                progress.first_token_at.is_some(),
            );
            let result = self
                .stream_once(upstream, progress)
                .instrument(call.clone())
                .await;
            call.record("tokens", progress.tokens.saturating_sub(tokens_before));
            if let (false, Some(first)) = (had_first, progress.first_token_at) {
                call.record("ttft_ms", millis(first.duration_since(call_started)));
            }
            let error = match result? {
                Ok(end) => return Ok(end),
                Err(error) => {
                    call.record("error_kind", error.kind());
                    error
                }
            };
            let nothing_written = progress.sequence == 0;
            let policy = upstream.policy;
            if !(nothing_written
                && error.retried_before_first_token()
                && retries < policy.max_retries)
            {
                return self.fail(progress, &error).await;
            }
            retries += 1;
            let delay = policy.backoff(retries);
            let delay = match error.retry_after() {
                // Waiting longer than `retry_max` would hold a slot (and the client) for it:
                // tell the client instead; `retryable` says it may come back later.
                Some(asked) if asked > policy.retry_max => {
                    return self.fail(progress, &error).await;
                }
                Some(asked) => delay.max(asked),
                None => delay,
            };
            tracing::info!(
                request_id = %job.request_id,
                retry = retries,
                delay_ms = millis(delay),
                %error,
                "upstream failed before the first token; retrying"
            );
            metrics::counter!("producer_upstream_retries_total", "kind" => error.kind())
                .increment(1);
            progress.upstream_wait += delay;
            if let Err(interrupt) = self.interruptible(tokio::time::sleep(delay)).await? {
                return self.interrupted(progress, interrupt).await;
            }
        }
    }

    /// One upstream try: `Ok(Err(e))` when the upstream failed (the caller decides whether to
    /// retry), `Ok(Ok(end))` when the attempt ended otherwise.
    async fn stream_once(
        &self,
        upstream: &Upstream,
        progress: &mut Progress,
    ) -> Result<Result<AttemptEnd, UpstreamError>, StreamIoError> {
        let policy = upstream.policy;
        let try_started = tokio::time::Instant::now();
        let first_token_deadline = try_started + policy.first_token_timeout;
        let first_token_timeout = UpstreamError::Timeout {
            phase: "no first token",
            waited_ms: millis(policy.first_token_timeout),
        };
        let opened = self
            .interruptible(timeout_at(first_token_deadline, upstream.open(self.job)))
            .await?;
        let mut stream = match opened {
            Err(interrupt) => return Ok(Ok(self.interrupted(progress, interrupt).await?)),
            Ok(Err(_elapsed)) => return Ok(Err(first_token_timeout)),
            Ok(Ok(Err(error))) => return Ok(Err(error)),
            Ok(Ok(Ok(stream))) => stream,
        };
        progress.upstream_wait += try_started.elapsed();
        metrics::histogram!("producer_upstream_connect_seconds")
            .record(try_started.elapsed().as_secs_f64());

        let coalesce = self.ctx.token_coalesce;
        let mut pending = Pending::default();
        let mut finish: Option<FinishReason> = None;
        let mut usage: Option<(u32, u32)> = None;
        let mut last_chunk_at = tokio::time::Instant::now();
        let mut cancel_poll = tokio::time::interval(CANCEL_POLL);
        cancel_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let receiving_first = progress.sequence == 0 && pending.tokens == 0;
            let deadline = if receiving_first {
                first_token_deadline
            } else {
                last_chunk_at + policy.idle_timeout
            };
            let flush_at = pending.flush_at;
            // Every arm but a stop starts by booking the wait for the upstream.
            let waiting_since = tokio::time::Instant::now();
            let chunk = tokio::select! {
                biased;
                reason = self.signals.stopped() => return Ok(Ok(self.abandon(reason))),
                () = sleep_until_some(flush_at) => {
                    progress.upstream_wait += waiting_since.elapsed();
                    if let Some(refused) = self.flush(progress, &mut pending).await? {
                        return Ok(Ok(self.not_written(progress, refused).await?));
                    }
                    continue;
                }
                chunk = timeout_at(deadline, stream.next()) => {
                    progress.upstream_wait += waiting_since.elapsed();
                    chunk
                }
                _ = cancel_poll.tick() => {
                    progress.upstream_wait += waiting_since.elapsed();
                    if self.cancelled().await? {
                        drop(stream);
                        return Ok(Ok(self.finish(progress, FinishReason::Cancelled, None).await?));
                    }
                    continue;
                }
            };
            // How the stream ended: a finish reason, or the failure that cut it short.
            let ended: Result<FinishReason, UpstreamError> = match chunk {
                Err(_elapsed) if receiving_first => Err(first_token_timeout.clone()),
                Err(_elapsed) => Err(UpstreamError::Timeout {
                    phase: "stalled between tokens",
                    waited_ms: millis(policy.idle_timeout),
                }),
                // async-openai ends a stream that closed without `[DONE]` like a clean one;
                // only the missing finish reason tells that the answer was cut short.
                Ok(None) => finish.ok_or_else(|| {
                    UpstreamError::Stream("the stream ended without a finish reason".to_owned())
                }),
                Ok(Some(Err(error))) => Err(UpstreamError::from_stream(error)),
                Ok(Some(Ok(chunk))) => {
                    last_chunk_at = tokio::time::Instant::now();
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
                        pending.text.push_str(&content);
                        pending.tokens += 1;
                        if coalesce.is_zero() || pending.text.len() >= MAX_COALESCED_BYTES {
                            if let Some(refused) = self.flush(progress, &mut pending).await? {
                                drop(stream);
                                return Ok(Ok(self.not_written(progress, refused).await?));
                            }
                        } else if pending.flush_at.is_none() {
                            pending.flush_at = Some(last_chunk_at + coalesce);
                        }
                        // The request reserved an estimate of tokens, not `maxTokens`: past
                        // its reservation it ends as `rate_limited` (`limits.hard_token_cap`).
                        if let Some(cap) = self.job.token_cap
                            && progress.tokens.saturating_add(pending.tokens) >= cap
                        {
                            drop(stream);
                            if let Some(refused) = self.flush(progress, &mut pending).await? {
                                return Ok(Ok(self.not_written(progress, refused).await?));
                            }
                            metrics::counter!("producer_token_cap_reached_total").increment(1);
                            return Ok(Ok(self
                                .finish(progress, FinishReason::RateLimited, None)
                                .await?));
                        }
                    }
                    continue;
                }
            };
            drop(stream);
            // Whatever ended the stream, tokens already received are real: write them first.
            if let Some(refused) = self.flush(progress, &mut pending).await? {
                return Ok(Ok(self.not_written(progress, refused).await?));
            }
            return Ok(match ended {
                Ok(reason) => {
                    // The current span is the caller's `llm.call`: how the upstream ended.
                    tracing::Span::current().record("finish_reason", reason.as_str());
                    Ok(self.finish(progress, reason, usage).await?)
                }
                Err(error) => Err(error),
            });
        }
    }

    /// Ends the attempt after an append that did not write (fenced or cancelled).
    async fn not_written(
        &self,
        progress: &mut Progress,
        outcome: AppendOutcome,
    ) -> Result<AttemptEnd, StreamIoError> {
        match outcome {
            AppendOutcome::Cancelled => self.finish(progress, FinishReason::Cancelled, None).await,
            AppendOutcome::Fenced | AppendOutcome::Written(_) => Ok(self.fenced()),
        }
    }

    /// Writes the pending text as one `token` event. The `tokens` record of tokens written
    /// *earlier* rides along concurrently on the same connection (fred pipelines commands
    /// issued together), so a token costs one round trip; the record never counts the token it
    /// travels with, which could still be fenced off.
    ///
    /// Returns the outcome when the write was refused (fenced or cancelled): the attempt ends.
    async fn flush(
        &self,
        progress: &mut Progress,
        pending: &mut Pending,
    ) -> Result<Option<AppendOutcome>, StreamIoError> {
        if pending.tokens == 0 {
            pending.flush_at = None;
            return Ok(None);
        }
        let event = SessionEvent::Token {
            request_id: self.job.request_id,
            sequence: progress.sequence + 1,
            content: std::mem::take(&mut pending.text),
            timestamp: stream_schema::now_millis(),
        };
        let tokens = std::mem::take(&mut pending.tokens);
        pending.flush_at = None;
        let client = self.client();
        let append = self
            .ctx
            .scripts
            .append(client, &self.streams, self.attempt, &event, true);
        let outcome = if progress.unreported >= RECORD_BATCH {
            let count = progress.unreported;
            let (appended, recorded) =
                tokio::join!(append, self.record_on(client, self.tokens_record(count)));
            recorded?;
            progress.unreported -= count;
            metrics::counter!("producer_tokens_total").increment(u64::from(count));
            appended?
        } else {
            append.await?
        };
        if !matches!(outcome, AppendOutcome::Written(_)) {
            return Ok(Some(outcome));
        }
        progress.sequence += 1;
        progress.tokens = progress.tokens.saturating_add(tokens);
        progress.unreported += tokens;
        if progress.first_token_at.is_none() {
            progress.first_token_at = Some(Instant::now());
            metrics::histogram!("producer_time_to_first_token_seconds")
                .record(self.started.elapsed().as_secs_f64());
        }
        Ok(None)
    }

    fn fenced(&self) -> AttemptEnd {
        tracing::warn!(
            request_id = %self.job.request_id,
            attempt = self.attempt,
            "another attempt owns this request; stopping"
        );
        metrics::counter!("producer_fenced_total").increment(1);
        AttemptEnd::Fenced
    }

    async fn finish(
        &self,
        progress: &mut Progress,
        reason: FinishReason,
        upstream_usage: Option<(u32, u32)>,
    ) -> Result<AttemptEnd, StreamIoError> {
        let job = self.job;
        let usage = match upstream_usage {
            Some((prompt, completion)) if reason != FinishReason::Cancelled => Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                source: UsageSource::Upstream,
            },
            _ => Usage {
                prompt_tokens: estimate_prompt_tokens(job),
                completion_tokens: progress.tokens,
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
    ) -> Result<AttemptEnd, StreamIoError> {
        tracing::warn!(request_id = %self.job.request_id, %error, "upstream failed");
        metrics::counter!("producer_upstream_errors_total", "kind" => error.kind()).increment(1);
        let code = error.code();
        let event = SessionEvent::Error {
            request_id: self.job.request_id,
            code,
            message: error.to_string(),
            retryable: error.retryable(),
            timestamp: stream_schema::now_millis(),
        };
        let usage = Usage {
            prompt_tokens: 0,
            completion_tokens: progress.tokens,
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
    ) -> Result<AttemptEnd, StreamIoError> {
        let written = self
            .ctx
            .scripts
            .append(self.client(), &self.streams, self.attempt, event, false)
            .await?;
        if !matches!(written, AppendOutcome::Written(_)) {
            return Ok(self.fenced());
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
        self.span.record("outcome", label);
        metrics::counter!("producer_requests_total", "outcome" => label).increment(1);
        metrics::histogram!("producer_request_duration_seconds").record(duration.as_secs_f64());
        // The bridge's own share of the request: everything but waiting on the upstream
        // (Redis writes, encoding, scheduling).
        metrics::histogram!("producer_overhead_seconds").record(
            duration
                .saturating_sub(progress.upstream_wait)
                .as_secs_f64(),
        );
        tracing::info!(
            request_id = %job.request_id,
            session_id = %job.session_id,
            attempt = self.attempt,
            outcome = label,
            tokens = progress.tokens,
            "request finished"
        );
        Ok(AttemptEnd::Done)
    }
}

/// Sleeps until `at`, or forever without one (a `select!` branch that is off).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn millis(duration: Duration) -> u64 {
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
