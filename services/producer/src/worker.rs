//! One job, one attempt: the policy. Opens the upstream answer (retrying transient failures
//! before the first token, with backoff and `Retry-After`), applies the first-token and idle
//! deadlines, the hard token cap, cancel and stop signals, and decides the terminal event. What
//! the upstream sends arrives as `upstream::Delta`s; every write goes through the attempt's
//! `sink::TokenSink`.
//!
//! An attempt ends in one of four ways, and only the first lets the job be acknowledged:
//! it wrote its terminal event ([`AttemptEnd::Done`]); another attempt owns the request
//! ([`AttemptEnd::Fenced`]); it was told to stop because it lost its lease or the producer is
//! shutting down ([`AttemptEnd::Abandoned`]); or Redis failed ([`AttemptEnd::RedisFailed`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures::{FutureExt, StreamExt};
use stream_io::StreamIoError;
use stream_io::records::EventLog;
use stream_io::session::{Retention, SessionScripts};
use stream_schema::record::Outcome;
use stream_schema::{FinishReason, Job, SessionEvent, Usage, UsageSource};
use tokio::time::timeout_at;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

use crate::appends::Appender;
use crate::sink::{Content, Fallback, Terminal, TokenSink, Write};
use crate::upstream::{Delta, DeltaStream, Policy, Registry, Upstream, UpstreamError};

/// How often a worker checks the cancel key while no token arrives (tokens check it for free).
const CANCEL_POLL: Duration = Duration::from_millis(250);

/// Shared by all workers of a producer.
pub struct WorkerContext {
    pub redis: Pool,
    /// The fenced appends of content and terminal events, combined across requests.
    pub appender: Appender,
    pub scripts: SessionScripts,
    pub upstreams: Registry,
    pub retention: Retention,
    pub event_shards: u16,
    pub events_maxlen: u64,
    /// `producer.token_coalesce_ms`; zero writes each token as it arrives.
    pub token_coalesce: Duration,
    pub write_metrics: WriteMetrics,
}

/// The counters every content write adds to, looked up in the recorder once rather than per
/// write (hashing the name and reading the registry, per batch and request).
pub struct WriteMetrics {
    pub append_batches: metrics::Counter,
    pub tokens: metrics::Counter,
}

impl WriteMetrics {
    /// Handles from the recorder installed now (install it first).
    pub fn register() -> Self {
        Self {
            append_batches: metrics::counter!("producer_append_batches_total"),
            tokens: metrics::counter!("producer_tokens_total"),
        }
    }
}

impl WorkerContext {
    /// Where this producer's event records go.
    pub fn event_log(&self) -> EventLog {
        EventLog {
            shards: self.event_shards,
            maxlen: self.events_maxlen,
        }
    }
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

/// A wait that the attempt may have to give up (see [`Attempt::interruptible`]).
enum Wait<T> {
    Ready(T),
    Interrupted(Interrupt),
}

/// What happens next while an upstream answer streams: the one thing the attempt's loop
/// branches on.
enum Step {
    /// A piece of the answer arrived.
    Delta(Delta),
    /// The upstream closed the stream (cleanly or not: a missing finish reason tells).
    StreamEnded,
    /// The sink's coalescing window is over: write what it holds.
    FlushDue,
    /// The sink holds a batch and the upstream has nothing more ready: write the batch.
    WriteBatch,
    /// The client cancelled the request (seen by the cancel poll).
    Cancelled,
    /// The attempt was told to stop (lease lost, or shutdown).
    Stopped(StopReason),
    /// No token within the first-token timeout of this try.
    FirstTokenTimeout,
    /// Silence between tokens past the idle timeout.
    IdleTimeout,
    /// The stream broke or carried an error.
    UpstreamFailed(UpstreamError),
}

/// What reading an upstream answer waits on besides the stream, kept for the whole try.
struct Waits<'a, S> {
    /// The attempt's stop signals.
    stopped: std::pin::Pin<&'a mut S>,
    /// The first token's or the idle timeout, moved along as tokens arrive.
    deadline: std::pin::Pin<&'a mut tokio::time::Sleep>,
    /// The request's cancel flag, read when no append has read it for a while.
    cancel_poll: &'a mut tokio::time::Interval,
}

/// How one upstream try ended.
enum TryEnd {
    /// The attempt ended (terminal event written, fenced, or abandoned).
    Ended(AttemptEnd),
    /// The upstream failed: the caller decides whether to retry.
    Failed(UpstreamError),
}

/// How serving the request from one model ended.
enum Served {
    /// The attempt ended (terminal event written, fenced, or abandoned).
    Ended(AttemptEnd),
    /// The model failed, its retries spent (or not allowed): fall back, or fail.
    Failed(UpstreamError),
}

/// What an attempt accumulates besides its writes (those are counted by its sink).
struct Run<'a> {
    sink: TokenSink<'a>,
    /// Time spent waiting on the upstream (connecting, between chunks, retry backoff): the
    /// rest of the attempt's duration is the bridge's own overhead.
    upstream_wait: Duration,
}

pub struct Attempt<'a> {
    ctx: &'a WorkerContext,
    job: &'a Job,
    attempt: u32,
    signals: StopSignals,
    started: Instant,
    /// `producer.attempt`, in the trace of the gateway's `chat.start` (the job's `tp`).
    span: tracing::Span,
}

impl<'a> Attempt<'a> {
    pub fn new(ctx: &'a WorkerContext, job: &'a Job, attempt: u32, signals: StopSignals) -> Self {
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
            started: Instant::now(),
            span,
        }
    }

    async fn cancelled(&self) -> Result<bool, StreamIoError> {
        stream_io::cancel::is_requested(
            self.ctx.redis.next(),
            &self.job.session_id,
            &self.job.request_id,
        )
        .await
    }

    /// Runs the attempt to its end, in its `producer.attempt` span.
    pub async fn run(self) -> AttemptEnd {
        let span = self.span.clone();
        self.run_in_span().instrument(span).await
    }

    async fn run_in_span(self) -> AttemptEnd {
        let mut run = Run {
            sink: TokenSink::new(self.ctx, self.job, self.attempt, self.started),
            upstream_wait: Duration::ZERO,
        };
        let end = self.generate(&mut run).await;
        // Tokens written before any kind of end are real: report them (best effort once Redis
        // failed; the processor then undercounts rather than double counts).
        if !matches!(end, Ok(AttemptEnd::Done))
            && let Err(error) = run.sink.report_tokens().await
        {
            tracing::debug!(%error, "cannot report the last tokens");
        }
        let end = end.unwrap_or_else(AttemptEnd::RedisFailed);
        // Token writes are summarised on the span (a count), never a span per token.
        self.span.record("tokens", run.sink.written_tokens());
        if let Some(first) = run.sink.first_token_at() {
            self.span
                .record("ttft_ms", millis(first.duration_since(self.started)));
        }
        self.span.record("end", end.as_str());
        end
    }

    /// Waits for `work`, but gives up when the request is cancelled (checked every
    /// [`CANCEL_POLL`]) or the attempt is told to stop.
    async fn interruptible<F: Future>(&self, work: F) -> Result<Wait<F::Output>, StreamIoError> {
        let mut work = std::pin::pin!(work);
        let mut poll = tokio::time::interval(CANCEL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                reason = self.signals.stopped() => {
                    return Ok(Wait::Interrupted(Interrupt::Stopped(reason)));
                }
                output = &mut work => return Ok(Wait::Ready(output)),
                _ = poll.tick() => {
                    if self.cancelled().await? {
                        return Ok(Wait::Interrupted(Interrupt::Cancelled));
                    }
                }
            }
        }
    }

    async fn interrupted(
        &self,
        run: &mut Run<'_>,
        interrupt: Interrupt,
    ) -> Result<AttemptEnd, StreamIoError> {
        match interrupt {
            Interrupt::Cancelled => self.finish(run, FinishReason::Cancelled, None).await,
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

    async fn generate(&self, run: &mut Run<'_>) -> Result<AttemptEnd, StreamIoError> {
        run.sink.record_started().await?;
        let mut upstream = match self.ctx.upstreams.get(self.job.model_id.as_str()) {
            Ok(upstream) => upstream,
            Err(error) => return self.fail(run, &error).await,
        };
        // Only the requested model's chain is followed, never a fallback's own.
        let mut fallbacks = upstream.fallbacks.iter();
        loop {
            let error = match self.serve(upstream, run).await? {
                Served::Ended(end) => return Ok(end),
                Served::Failed(error) => error,
            };
            // Before the first token, a retryable failure that outlived this model's retries
            // moves the request to the next model of its chain; after it, never.
            let next = match (run.sink.nothing_written() && error.retryable())
                .then(|| fallbacks.next())
                .flatten()
            {
                Some(next) => next,
                None => return self.fail(run, &error).await,
            };
            let next_upstream = match self.ctx.upstreams.get(next.as_str()) {
                Ok(next_upstream) => next_upstream,
                Err(unknown) => return self.fail(run, &unknown).await,
            };
            tracing::warn!(
                request_id = %self.job.request_id,
                from = %run.sink.served(),
                to = %next,
                %error,
                "upstream failed before the first token; falling back"
            );
            metrics::counter!(
                "producer_fallbacks_total",
                "from" => run.sink.served().to_string(),
                "to" => next.to_string()
            )
            .increment(1);
            match run.sink.fall_back(next).await? {
                Fallback::Moved => upstream = next_upstream,
                Fallback::Fenced => return Ok(self.fenced()),
            }
        }
    }

    /// Serves the request from one model: its concurrency permit, then tries with retries
    /// and backoff before the first token. Ends the attempt, or says how the model failed.
    async fn serve(&self, upstream: &Upstream, run: &mut Run<'_>) -> Result<Served, StreamIoError> {
        let job = self.job;
        let _permit = match self.interruptible(upstream.concurrency_permit()).await? {
            Wait::Ready(permit) => permit,
            Wait::Interrupted(interrupt) => {
                return Ok(Served::Ended(self.interrupted(run, interrupt).await?));
            }
        };

        let mut retries = 0_u32;
        loop {
            let call = tracing::info_span!(
                "llm.call",
                model_id = %run.sink.served(),
                retry = retries,
                ttft_ms = Empty,
                tokens = Empty,
                finish_reason = Empty,
                error_kind = Empty,
            );
            let (call_started, tokens_before, had_first) = (
                Instant::now(),
                run.sink.written_tokens(),
                run.sink.first_token_at().is_some(),
            );
            let ended = self
                .stream_once(upstream, run)
                .instrument(call.clone())
                .await?;
            call.record(
                "tokens",
                run.sink.written_tokens().saturating_sub(tokens_before),
            );
            if let (false, Some(first)) = (had_first, run.sink.first_token_at()) {
                call.record("ttft_ms", millis(first.duration_since(call_started)));
            }
            let error = match ended {
                TryEnd::Ended(end) => return Ok(Served::Ended(end)),
                TryEnd::Failed(error) => {
                    call.record("error_kind", error.kind());
                    error
                }
            };
            let policy = upstream.policy;
            if !(run.sink.nothing_written()
                && error.retried_before_first_token()
                && retries < policy.max_retries)
            {
                return Ok(Served::Failed(error));
            }
            retries += 1;
            let delay = policy.backoff(retries);
            let delay = match error.retry_after() {
                // Waiting longer than `retry_max` would hold a permit (and the client) for it:
                // tell the client instead; `retryable` says it may come back later.
                Some(asked) if asked > policy.retry_max => {
                    return Ok(Served::Failed(error));
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
            run.upstream_wait += delay;
            if let Wait::Interrupted(interrupt) =
                self.interruptible(tokio::time::sleep(delay)).await?
            {
                return Ok(Served::Ended(self.interrupted(run, interrupt).await?));
            }
        }
    }

    /// One upstream try, from opening the stream to the end of the attempt or the upstream's
    /// failure.
    async fn stream_once(
        &self,
        upstream: &Upstream,
        run: &mut Run<'_>,
    ) -> Result<TryEnd, StreamIoError> {
        let policy = upstream.policy;
        let try_started = tokio::time::Instant::now();
        let first_token_deadline = try_started + policy.first_token_timeout;
        let opened = self
            .interruptible(timeout_at(first_token_deadline, upstream.open(self.job)))
            .await?;
        let stream = match opened {
            Wait::Interrupted(interrupt) => {
                return Ok(TryEnd::Ended(self.interrupted(run, interrupt).await?));
            }
            Wait::Ready(Err(_elapsed)) => return Ok(TryEnd::Failed(no_first_token(policy))),
            Wait::Ready(Ok(Err(error))) => return Ok(TryEnd::Failed(error)),
            Wait::Ready(Ok(Ok(stream))) => stream,
        };
        run.upstream_wait += try_started.elapsed();
        metrics::histogram!("producer_upstream_connect_seconds")
            .record(try_started.elapsed().as_secs_f64());
        self.consume(stream, policy, first_token_deadline, run)
            .await
    }

    /// Reads an open upstream answer to the end of the attempt or the upstream's failure,
    /// writing its content through the sink.
    async fn consume(
        &self,
        mut stream: DeltaStream,
        policy: Policy,
        first_token_deadline: tokio::time::Instant,
        run: &mut Run<'_>,
    ) -> Result<TryEnd, StreamIoError> {
        let mut finish: Option<FinishReason> = None;
        let mut usage: Option<Usage> = None;
        let mut last_delta_at = tokio::time::Instant::now();
        let mut cancel_poll = tokio::time::interval(CANCEL_POLL);
        cancel_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once per try, not per token: a new stop future registers a waiter on the
        // shutdown token that every attempt shares (a lock), and a new timeout registers a
        // timer, each removed again when the token arrives.
        let mut waits = Waits {
            stopped: std::pin::pin!(self.signals.stopped()),
            deadline: std::pin::pin!(tokio::time::sleep_until(first_token_deadline)),
            cancel_poll: &mut cancel_poll,
        };
        loop {
            let receiving_first = run.sink.receiving_first();
            let deadline = if receiving_first {
                first_token_deadline
            } else {
                last_delta_at + policy.idle_timeout
            };
            let step = self
                .next_step(&mut stream, run, deadline, receiving_first, &mut waits)
                .await?;
            // How the stream ended: a finish reason, or the failure that cut it short.
            let ended: Result<FinishReason, UpstreamError> = match step {
                Step::Stopped(reason) => return Ok(TryEnd::Ended(self.abandon(reason))),
                Step::Cancelled => {
                    drop(stream);
                    let end = self.finish(run, FinishReason::Cancelled, None).await?;
                    return Ok(TryEnd::Ended(end));
                }
                Step::FlushDue | Step::WriteBatch => {
                    let written = if matches!(step, Step::FlushDue) {
                        run.sink.flush().await?
                    } else {
                        run.sink.write_batch().await?
                    };
                    if let Some(end) = self.refused(run, written).await? {
                        return Ok(TryEnd::Ended(end));
                    }
                    // The append just checked the cancel flag: the poll need not, for a while.
                    waits.cancel_poll.reset();
                    continue;
                }
                Step::Delta(delta) => {
                    last_delta_at = tokio::time::Instant::now();
                    let content = match delta {
                        Delta::Text(text) => Content::Text(text),
                        Delta::Reasoning(text) => Content::Reasoning(text),
                        Delta::ToolCall {
                            index,
                            id,
                            name,
                            arguments_fragment,
                        } => Content::ToolCall {
                            index,
                            id,
                            name,
                            arguments: arguments_fragment,
                        },
                        Delta::Usage {
                            prompt_tokens,
                            completion_tokens,
                            reasoning_tokens,
                        } => {
                            usage = Some(Usage {
                                prompt_tokens,
                                completion_tokens,
                                source: UsageSource::Upstream,
                                reasoning_tokens,
                            });
                            continue;
                        }
                        Delta::Finish(reason) => {
                            finish = Some(reason);
                            continue;
                        }
                    };
                    let written = run.sink.push(content).await?;
                    if let Some(end) = self.refused(run, written).await? {
                        return Ok(TryEnd::Ended(end));
                    }
                    // The request reserved an estimate of tokens, not `maxTokens`: past its
                    // reservation it ends as `rate_limited` (`limits.hard_token_cap`).
                    if let Some(cap) = self.job.token_cap
                        && run.sink.received_tokens() >= cap
                    {
                        drop(stream);
                        let written = run.sink.flush().await?;
                        if let Some(end) = self.refused(run, written).await? {
                            return Ok(TryEnd::Ended(end));
                        }
                        metrics::counter!("producer_token_cap_reached_total").increment(1);
                        let end = self.finish(run, FinishReason::RateLimited, None).await?;
                        return Ok(TryEnd::Ended(end));
                    }
                    continue;
                }
                // async-openai ends a stream that closed without `[DONE]` like a clean one;
                // only the missing finish reason tells that the answer was cut short.
                Step::StreamEnded => finish.ok_or_else(|| {
                    UpstreamError::Stream("the stream ended without a finish reason".to_owned())
                }),
                Step::FirstTokenTimeout => Err(no_first_token(policy)),
                Step::IdleTimeout => Err(UpstreamError::Timeout {
                    phase: "stalled between tokens",
                    waited_ms: millis(policy.idle_timeout),
                }),
                Step::UpstreamFailed(error) => Err(error),
            };
            drop(stream);
            // Whatever ended the stream, tokens already received are real: write them first.
            let written = run.sink.flush().await?;
            if let Some(end) = self.refused(run, written).await? {
                return Ok(TryEnd::Ended(end));
            }
            return Ok(match ended {
                Ok(reason) => {
                    // The current span is the caller's `llm.call`: how the upstream ended.
                    tracing::Span::current().record("finish_reason", reason.as_str());
                    TryEnd::Ended(self.finish(run, reason, usage).await?)
                }
                Err(error) => TryEnd::Failed(error),
            });
        }
    }

    /// Waits for the next thing the attempt must react to. Every step but a stop books the
    /// wait as time spent on the upstream.
    async fn next_step(
        &self,
        stream: &mut DeltaStream,
        run: &mut Run<'_>,
        deadline: tokio::time::Instant,
        receiving_first: bool,
        waits: &mut Waits<'_, impl Future<Output = StopReason>>,
    ) -> Result<Step, StreamIoError> {
        if run.sink.has_batch() {
            // Adaptive batching: what the upstream sent while the last append was in flight
            // is ready now and joins the batch; once nothing more is, the batch is written.
            if let Some(reason) = waits.stopped.as_mut().now_or_never() {
                return Ok(Step::Stopped(reason));
            }
            return Ok(match stream.next().now_or_never() {
                None => Step::WriteBatch,
                Some(next) => Self::step_of(next),
            });
        }
        let flush_at = run.sink.flush_at();
        // Moving a timer later only marks it (it is re-filed when it fires), so the idle
        // deadline follows each token cheaply; an earlier one (the first token's timeout
        // giving way to a shorter idle timeout) is re-filed at once.
        if waits.deadline.deadline() != deadline {
            waits.deadline.as_mut().reset(deadline);
        }
        loop {
            let waiting_since = tokio::time::Instant::now();
            tokio::select! {
                biased;
                reason = waits.stopped.as_mut() => return Ok(Step::Stopped(reason)),
                () = sleep_until_some(flush_at) => {
                    run.upstream_wait += waiting_since.elapsed();
                    return Ok(Step::FlushDue);
                }
                // Before the deadline: what arrived by then is taken, as a timeout would.
                next = stream.next() => {
                    run.upstream_wait += waiting_since.elapsed();
                    return Ok(Self::step_of(next));
                }
                () = waits.deadline.as_mut() => {
                    run.upstream_wait += waiting_since.elapsed();
                    return Ok(if receiving_first {
                        Step::FirstTokenTimeout
                    } else {
                        Step::IdleTimeout
                    });
                }
                _ = waits.cancel_poll.tick() => {
                    run.upstream_wait += waiting_since.elapsed();
                    if self.cancelled().await? {
                        return Ok(Step::Cancelled);
                    }
                }
            }
        }
    }

    /// The step of what the upstream stream yielded.
    fn step_of(next: Option<Result<Delta, UpstreamError>>) -> Step {
        match next {
            None => Step::StreamEnded,
            Some(Ok(delta)) => Step::Delta(delta),
            Some(Err(error)) => Step::UpstreamFailed(error),
        }
    }

    /// Ends the attempt when a write was refused (fenced or cancelled); `None` goes on.
    async fn refused(
        &self,
        run: &mut Run<'_>,
        written: Write,
    ) -> Result<Option<AttemptEnd>, StreamIoError> {
        Ok(match written {
            Write::Accepted => None,
            Write::Cancelled => Some(self.finish(run, FinishReason::Cancelled, None).await?),
            Write::Fenced => Some(self.fenced()),
        })
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
        run: &mut Run<'_>,
        reason: FinishReason,
        upstream_usage: Option<Usage>,
    ) -> Result<AttemptEnd, StreamIoError> {
        let job = self.job;
        let usage = match upstream_usage {
            Some(usage) if reason != FinishReason::Cancelled => usage,
            _ => Usage {
                prompt_tokens: estimate_prompt_tokens(job),
                completion_tokens: run.sink.written_tokens(),
                source: UsageSource::Counted,
                reasoning_tokens: Some(run.sink.written_reasoning_tokens())
                    .filter(|&reasoning| reasoning > 0),
            },
        };
        let event = SessionEvent::Complete {
            request_id: job.request_id,
            finish_reason: reason,
            usage,
            timestamp: stream_schema::now_millis(),
        };
        self.terminal(run, &event, Outcome::Completed(reason), usage)
            .await
    }

    async fn fail(
        &self,
        run: &mut Run<'_>,
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
            completion_tokens: run.sink.written_tokens(),
            source: UsageSource::Counted,
            reasoning_tokens: None,
        };
        self.terminal(run, &event, Outcome::Failed(code), usage)
            .await
    }

    async fn terminal(
        &self,
        run: &mut Run<'_>,
        event: &SessionEvent,
        outcome: Outcome,
        usage: Usage,
    ) -> Result<AttemptEnd, StreamIoError> {
        let duration = match run.sink.terminal(event, outcome, usage).await? {
            Terminal::Written { duration } => duration,
            Terminal::Fenced => return Ok(self.fenced()),
        };
        let label = match outcome {
            Outcome::Completed(reason) => reason.as_str(),
            Outcome::Failed(code) => code.as_str(),
        };
        self.span.record("outcome", label);
        metrics::counter!("producer_requests_total", "outcome" => label).increment(1);
        metrics::histogram!("producer_request_duration_seconds").record(duration.as_secs_f64());
        // The bridge's own share of the request: everything but waiting on the upstream
        // (Redis writes, encoding, scheduling).
        metrics::histogram!("producer_overhead_seconds")
            .record(duration.saturating_sub(run.upstream_wait).as_secs_f64());
        let job = self.job;
        tracing::info!(
            request_id = %job.request_id,
            session_id = %job.session_id,
            attempt = run.sink.attempt(),
            served_by = %run.sink.served(),
            outcome = label,
            tokens = run.sink.written_tokens(),
            "request finished"
        );
        Ok(AttemptEnd::Done)
    }
}

/// The failure of a try that got no token within the first-token timeout.
fn no_first_token(policy: Policy) -> UpstreamError {
    UpstreamError::Timeout {
        phase: "no first token",
        waited_ms: millis(policy.first_token_timeout),
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

/// Words of the prompt: a rough count for when the upstream reports no usage.
fn estimate_prompt_tokens(job: &Job) -> u32 {
    let words: usize = job
        .messages
        .iter()
        .map(|m| m.text_content().split_whitespace().count())
        .sum();
    u32::try_from(words).unwrap_or(u32::MAX)
}

/// A worker context on a real redis-server, for the tests of the attempt's parts.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use fred::prelude::*;
    use fred::types::{InfoKind, Value};
    use service_kit::config::RedisSettings;
    use stream_io::session::{RequestStreams, Retention, SessionScripts};
    use stream_schema::{ChatMessage, Job, ModelId, RedisKey, RequestId, Role, SessionEvent};
    use test_support::RedisServer;

    use super::WorkerContext;
    use crate::appends::Appender;
    use crate::upstream::Registry;

    pub struct Env {
        /// Kept for its lifetime: dropping it stops the server.
        pub _redis: RedisServer,
        pub ctx: WorkerContext,
    }

    impl Env {
        pub async fn start(token_coalesce: Duration) -> anyhow::Result<Self> {
            let redis = RedisServer::start().await?;
            let settings = RedisSettings {
                url: redis.url(),
                ..RedisSettings::default()
            };
            let pool = service_kit::redis::pool(&settings)?;
            service_kit::redis::start(&pool, &settings).await;
            let ctx = WorkerContext {
                appender: Appender::new(
                    pool.clone(),
                    SessionScripts::default(),
                    true,
                    tokio_util::task::TaskTracker::new(),
                ),
                redis: pool,
                scripts: SessionScripts::default(),
                upstreams: Registry::new(&BTreeMap::new())?,
                retention: Retention { ttl_secs: 600 },
                event_shards: 2,
                events_maxlen: 1_000,
                token_coalesce,
                write_metrics: super::WriteMetrics::register(),
            };
            Ok(Self { _redis: redis, ctx })
        }

        pub fn client(&self) -> &Client {
            self.ctx.redis.next()
        }

        pub fn streams(&self, job: &Job) -> RequestStreams {
            RequestStreams::new(
                &job.session_id,
                &job.model_id,
                &job.request_id,
                self.ctx.retention,
            )
        }

        /// What the gateway does at start: owner = 1 and the `start` event.
        pub async fn start_request(&self, job: &Job) -> anyhow::Result<()> {
            let streams = self.streams(job);
            let start = SessionEvent::Start {
                request_id: job.request_id,
                session_id: job.session_id.clone(),
                model_id: job.model_id.clone(),
                attempt: 1,
                timestamp: 1,
            };
            self.ctx
                .scripts
                .start(
                    self.client(),
                    &streams.stream,
                    &streams.owner,
                    &start,
                    self.ctx.retention,
                )
                .await?;
            Ok(())
        }

        /// Every entry of `key`, oldest first.
        pub async fn entries(&self, key: &RedisKey) -> anyhow::Result<Vec<stream_io::Entry>> {
            let reply: Value = self.client().xrange(key.as_str(), "-", "+", None).await?;
            Ok(stream_io::parse_entries(reply)?)
        }

        /// The session stream of `job`, decoded.
        pub async fn events(&self, job: &Job) -> anyhow::Result<Vec<SessionEvent>> {
            let entries = self.entries(&self.streams(job).stream).await?;
            Ok(entries
                .iter()
                .map(|entry| SessionEvent::decode(&entry.fields))
                .collect::<Result<_, _>>()?)
        }

        /// Successful calls of `command` (lower case) so far, from `INFO commandstats`:
        /// script-internal calls count, as in the benchmark; failed ones do not (the
        /// `NOSCRIPT` of a script's first call, which loads it).
        pub async fn calls(&self, command: &str) -> anyhow::Result<u64> {
            let info: String = self.client().info(Some(InfoKind::CommandStats)).await?;
            let prefix = format!("cmdstat_{command}:");
            let Some(stats) = info
                .lines()
                .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
            else {
                return Ok(0);
            };
            let field = |name: &str| -> anyhow::Result<u64> {
                Ok(stats
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                    .map_or(Ok(0), str::parse)?)
            };
            Ok(field("calls")?.saturating_sub(field("failed_calls")?))
        }

        /// The records of `job`'s shard, decoded.
        pub async fn records(&self, job: &Job) -> anyhow::Result<Vec<stream_schema::EventRecord>> {
            let key = self.ctx.event_log().shard_key(&job.session_id);
            let entries = self.entries(&key).await?;
            Ok(entries
                .iter()
                .map(|entry| stream_schema::EventRecord::decode(&entry.fields))
                .collect::<Result<_, _>>()?)
        }
    }

    pub fn job() -> anyhow::Result<Job> {
        Ok(Job {
            request_id: RequestId::new(),
            session_id: stream_schema::SessionId::parse("session-1")?,
            model_id: ModelId::parse("mock")?,
            messages: vec![ChatMessage::text(Role::User, "hello there")],
            max_tokens: None,
            temperature: None,
            options: stream_schema::ChatOptions::default(),
            enqueued_at: 1,
            traceparent: None,
            token_cap: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use stream_schema::{FinishReason, SessionEvent};

    use super::testing::{Env, job};
    use super::{Attempt, AttemptEnd, Run, StopSignals, TryEnd};
    use crate::sink::TokenSink;
    use crate::upstream::{Delta, DeltaStream, Policy, UpstreamError};

    fn policy() -> Policy {
        Policy {
            first_token_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_retries: 0,
            retry_base: Duration::from_millis(10),
            retry_max: Duration::from_millis(10),
        }
    }

    fn text(t: &str) -> Result<Delta, UpstreamError> {
        Ok(Delta::Text(t.to_owned()))
    }

    /// Runs one attempt's `consume` over `stream` to its end.
    async fn consume(env: &Env, job: &stream_schema::Job, stream: DeltaStream) -> AttemptEnd {
        let attempt = Attempt::new(&env.ctx, job, 1, StopSignals::default());
        let mut run = Run {
            sink: TokenSink::new(&env.ctx, job, 1, Instant::now()),
            upstream_wait: Duration::ZERO,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        match attempt.consume(stream, policy(), deadline, &mut run).await {
            Ok(TryEnd::Ended(end)) => end,
            Ok(TryEnd::Failed(error)) => AttemptEnd::RedisFailed(
                stream_io::StreamIoError::Protocol(format!("upstream failed: {error}")),
            ),
            Err(error) => AttemptEnd::RedisFailed(error),
        }
    }

    fn contents(events: &[SessionEvent]) -> Vec<(u64, String)> {
        events
            .iter()
            .filter_map(|event| match event {
                SessionEvent::Token {
                    sequence, content, ..
                } => Some((*sequence, content.clone())),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn tokens_already_waiting_are_one_script_call_and_one_entry_each() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;
        let (scripts, xadds) = (env.calls("evalsha").await?, env.calls("xadd").await?);

        // Every delta is ready at once: all five wait while the first poll reads them.
        let deltas = ["a", "b", "c", "d", "e"].map(text);
        let finish = [Ok(Delta::Finish(FinishReason::Stop))];
        let stream = futures::stream::iter(deltas.into_iter().chain(finish)).boxed();
        let end = consume(&env, &job, stream).await;

        assert!(matches!(end, AttemptEnd::Done), "{end:?}");
        let events = env.events(&job).await?;
        assert_eq!(
            contents(&events),
            [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")].map(|(n, t)| (n, t.to_owned()))
        );
        assert!(matches!(events.last(), Some(SessionEvent::Complete { .. })));
        // One call for the five tokens, one for `complete`.
        assert_eq!(env.calls("evalsha").await? - scripts, 2);
        // Five token entries and `complete`; the `tokens` and `finish` records.
        assert_eq!(env.calls("xadd").await? - xadds, 6 + 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_lone_token_is_written_at_once_and_later_ones_batch() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;
        let scripts = env.calls("evalsha").await?;
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let worker = consume(&env, &job, rx.boxed());
        let driver = async {
            tx.unbounded_send(text("first"))?;
            // No timer holds it: the token reaches the stream while the upstream is silent.
            let deadline = Instant::now() + Duration::from_secs(10);
            while contents(&env.events(&job).await?).is_empty() {
                anyhow::ensure!(Instant::now() < deadline, "the lone token was not written");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for t in ["x", "y", "z"] {
                tx.unbounded_send(text(t))?;
            }
            tx.unbounded_send(Ok(Delta::Finish(FinishReason::Stop)))?;
            drop(tx);
            anyhow::Ok(())
        };
        let (end, driven) = tokio::join!(worker, driver);
        driven?;
        assert!(matches!(end, AttemptEnd::Done), "{end:?}");
        let events = env.events(&job).await?;
        assert_eq!(
            contents(&events),
            [(1, "first"), (2, "x"), (3, "y"), (4, "z")].map(|(n, t)| (n, t.to_owned()))
        );
        // `first` alone, the three that were waiting together, then `complete`.
        assert_eq!(env.calls("evalsha").await? - scripts, 3);
        Ok(())
    }

    #[tokio::test]
    async fn a_fenced_attempt_writes_nothing_of_its_batch() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;
        let restart = SessionEvent::Restart {
            request_id: job.request_id,
            attempt: 2,
            reason: "test".to_owned(),
            served_by: None,
            timestamp: 1,
        };
        env.ctx
            .scripts
            .take_over(env.client(), &env.streams(&job), 1, &restart)
            .await?;
        let xadds = env.calls("xadd").await?;

        let stream = futures::stream::iter(["a", "b", "c"].map(text)).boxed();
        let end = consume(&env, &job, stream).await;

        assert!(matches!(end, AttemptEnd::Fenced), "{end:?}");
        assert_eq!(
            env.events(&job).await?.len(),
            2,
            "`start` and `restart` only"
        );
        assert_eq!(env.calls("xadd").await? - xadds, 0, "no entry, no record");
        Ok(())
    }

    #[tokio::test]
    async fn a_cancel_refuses_the_whole_batch_and_ends_the_request() -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let job = job()?;
        env.start_request(&job).await?;
        stream_io::cancel::request(env.client(), &job.session_id, &job.request_id, 60).await?;

        let stream = futures::stream::iter(["a", "b", "c"].map(text)).boxed();
        let end = consume(&env, &job, stream).await;

        assert!(matches!(end, AttemptEnd::Done), "{end:?}");
        let events = env.events(&job).await?;
        assert!(contents(&events).is_empty(), "{events:?}");
        assert!(
            matches!(
                events.last(),
                Some(SessionEvent::Complete {
                    finish_reason: FinishReason::Cancelled,
                    ..
                })
            ),
            "{events:?}"
        );
        Ok(())
    }
}
