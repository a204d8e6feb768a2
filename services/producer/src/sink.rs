//! The token sink of one attempt: where answer text goes. It owns coalescing
//! (`producer.token_coalesce_ms`), the fenced appends to the session stream (through
//! `stream_io::session`) and the attempt's analytics records (through `stream_io::records`).
//!
//! It is the one place that decides when buffered text is written: at once, when the window
//! is over ([`TokenSink::flush_at`]), or when the buffer is full. The worker only tells it that
//! the window's time came or that the answer ended ([`TokenSink::flush`]).

use std::time::{Duration, Instant};

use fred::prelude::*;
use stream_io::StreamIoError;
use stream_io::records::EventLog;
use stream_io::session::{AppendOutcome, RequestStreams, TakeOver};
use stream_schema::record::{FallbackSide, Outcome};
use stream_schema::{EventRecord, Job, ModelId, SessionEvent, Usage};

use crate::worker::{WorkerContext, millis};

/// Tokens reported per `tokens` record at most; records are written after their tokens.
const RECORD_BATCH: u32 = 32;
/// Coalesced text is written at once past this size, whatever the window says.
const MAX_COALESCED_BYTES: usize = 16 * 1024;

/// What a write (or a decision not to write yet) left the attempt with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Written, or kept for a later flush: go on.
    Accepted,
    /// Another attempt owns the request: stop, writing nothing more.
    Fenced,
    /// The request was cancelled: stop generating and end it as cancelled.
    Cancelled,
}

/// How a terminal write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// The terminal event and the `finish` record are written; `duration` is the attempt's.
    Written { duration: Duration },
    /// Another attempt owns the request: nothing was written.
    Fenced,
}

/// The `reason` of the `restart` that moves a request to its next fallback model.
pub const FALLBACK_REASON: &str = "fallback";

/// How a move to a fallback model went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The `restart` is written: the sink now writes as the next attempt, for the new model.
    Moved,
    /// Another attempt owns the request: nothing was written.
    Fenced,
}

/// Text received but not written yet, and when it must be. Pure state: the coalescing
/// decision, testable without Redis.
#[derive(Debug, Default)]
struct Coalescer {
    /// `producer.token_coalesce_ms`; zero writes each token as it arrives.
    window: Duration,
    text: String,
    tokens: u32,
    flush_at: Option<tokio::time::Instant>,
}

impl Coalescer {
    fn new(window: Duration) -> Self {
        Self {
            window,
            ..Self::default()
        }
    }

    /// Buffers one token received at `now`; true when the buffer must be written now.
    fn push(&mut self, text: &str, now: tokio::time::Instant) -> bool {
        self.text.push_str(text);
        self.tokens += 1;
        if self.window.is_zero() || self.text.len() >= MAX_COALESCED_BYTES {
            return true;
        }
        // The window opens with its first token: later tokens never push the write back.
        if self.flush_at.is_none() {
            self.flush_at = Some(now + self.window);
        }
        false
    }

    /// The buffered text and its token count, if any; closes the window either way.
    fn take(&mut self) -> Option<(String, u32)> {
        self.flush_at = None;
        if self.tokens == 0 {
            return None;
        }
        Some((
            std::mem::take(&mut self.text),
            std::mem::take(&mut self.tokens),
        ))
    }
}

/// One attempt's writer. Created by the worker for each attempt, used only by it.
pub struct TokenSink<'a> {
    ctx: &'a WorkerContext,
    job: &'a Job,
    /// The attempt this sink writes as; a fallback moves it on by one.
    attempt: u32,
    /// The model serving the request, whose analytics the records count in: the job's model
    /// until a fallback.
    served: ModelId,
    streams: RequestStreams,
    events: EventLog,
    pending: Coalescer,
    /// `token` events written (their `sequence`).
    sequence: u64,
    /// Upstream tokens written (more than `sequence` when tokens are coalesced).
    tokens: u32,
    /// Written tokens not yet reported in a `tokens` record.
    unreported: u32,
    /// The start of the attempt: the origin of `ttft_ms` and `duration_ms`.
    started: Instant,
    first_token_at: Option<Instant>,
}

impl<'a> TokenSink<'a> {
    pub fn new(ctx: &'a WorkerContext, job: &'a Job, attempt: u32, started: Instant) -> Self {
        Self {
            ctx,
            job,
            attempt,
            served: job.model_id.clone(),
            streams: RequestStreams::new(
                &job.session_id,
                &job.model_id,
                &job.request_id,
                ctx.retention,
            ),
            events: ctx.event_log(),
            pending: Coalescer::new(ctx.token_coalesce),
            sequence: 0,
            tokens: 0,
            unreported: 0,
            started,
            first_token_at: None,
        }
    }

    /// The attempt the sink writes as.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The model serving the request.
    pub fn served(&self) -> &ModelId {
        &self.served
    }

    /// Moves the request to model `to` before its first token: appends a `restart` of the
    /// next attempt that says `servedBy: to` (fenced: only if this attempt still owns the
    /// request), then the two `fallback` records. Later writes are the new attempt's and
    /// count for `to`.
    pub async fn fall_back(&mut self, to: &ModelId) -> Result<Fallback, StreamIoError> {
        let next = self.attempt.saturating_add(1);
        let restart = SessionEvent::Restart {
            request_id: self.job.request_id,
            attempt: next,
            reason: FALLBACK_REASON.to_owned(),
            served_by: Some(to.clone()),
            timestamp: stream_schema::now_millis(),
        };
        let taken = self
            .ctx
            .scripts
            .take_over(self.ctx.redis.next(), &self.streams, self.attempt, &restart)
            .await?;
        if !matches!(taken, TakeOver::Taken(_)) {
            return Ok(Fallback::Fenced);
        }
        self.attempt = next;
        let from = std::mem::replace(&mut self.served, to.clone());
        for (model_id, side) in [(from, FallbackSide::From), (to.clone(), FallbackSide::To)] {
            self.record(&EventRecord::FellBack {
                request_id: self.job.request_id,
                session_id: self.job.session_id.clone(),
                model_id,
                side,
                timestamp: stream_schema::now_millis(),
            })
            .await?;
        }
        Ok(Fallback::Moved)
    }

    /// True until a `token` event was written.
    pub fn nothing_written(&self) -> bool {
        self.sequence == 0
    }

    /// True until a token was received (written or buffered): the first-token deadline
    /// applies.
    pub fn receiving_first(&self) -> bool {
        self.sequence == 0 && self.pending.tokens == 0
    }

    /// Upstream tokens written to the session stream.
    pub fn written_tokens(&self) -> u32 {
        self.tokens
    }

    /// Upstream tokens received: written plus buffered (what the token cap counts).
    pub fn received_tokens(&self) -> u32 {
        self.tokens.saturating_add(self.pending.tokens)
    }

    pub fn first_token_at(&self) -> Option<Instant> {
        self.first_token_at
    }

    /// When buffered text must be written; `None` when nothing waits.
    pub fn flush_at(&self) -> Option<tokio::time::Instant> {
        self.pending.flush_at
    }

    /// Takes one token of answer text: writes it now, or buffers it for the window.
    pub async fn push(&mut self, text: &str) -> Result<Write, StreamIoError> {
        if self.pending.push(text, tokio::time::Instant::now()) {
            return self.flush().await;
        }
        Ok(Write::Accepted)
    }

    /// Writes the buffered text as one `token` event (nothing when the buffer is empty). The
    /// `tokens` record of tokens written *earlier* rides along concurrently on the same
    /// connection (fred pipelines commands issued together), so a token costs one round trip;
    /// the record never counts the token it travels with, which could still be fenced off.
    pub async fn flush(&mut self) -> Result<Write, StreamIoError> {
        let Some((content, tokens)) = self.pending.take() else {
            return Ok(Write::Accepted);
        };
        let event = SessionEvent::Token {
            request_id: self.job.request_id,
            sequence: self.sequence + 1,
            content,
            timestamp: stream_schema::now_millis(),
        };
        let client = self.ctx.redis.next();
        let append = self
            .ctx
            .scripts
            .append(client, &self.streams, self.attempt, &event, true);
        let outcome = if self.unreported >= RECORD_BATCH {
            let count = self.unreported;
            let record = self.tokens_record(count);
            let (appended, recorded) = tokio::join!(append, self.record_on(client, &record));
            recorded?;
            self.unreported -= count;
            metrics::counter!("producer_tokens_total").increment(u64::from(count));
            appended?
        } else {
            append.await?
        };
        match outcome {
            AppendOutcome::Written(_) => {}
            AppendOutcome::Fenced => return Ok(Write::Fenced),
            AppendOutcome::Cancelled => return Ok(Write::Cancelled),
        }
        self.sequence += 1;
        self.tokens = self.tokens.saturating_add(tokens);
        self.unreported += tokens;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
            metrics::histogram!("producer_time_to_first_token_seconds")
                .record(self.started.elapsed().as_secs_f64());
        }
        Ok(Write::Accepted)
    }

    /// Writes the `start` record of the attempt.
    pub async fn record_started(&self) -> Result<(), StreamIoError> {
        let job = self.job;
        self.record(&EventRecord::Started {
            request_id: job.request_id,
            session_id: job.session_id.clone(),
            model_id: job.model_id.clone(),
            attempt: self.attempt,
            timestamp: stream_schema::now_millis(),
        })
        .await
    }

    /// Reports written tokens not yet in a `tokens` record.
    pub async fn report_tokens(&mut self) -> Result<(), StreamIoError> {
        if self.unreported == 0 {
            return Ok(());
        }
        self.record(&self.tokens_record(self.unreported)).await?;
        metrics::counter!("producer_tokens_total").increment(u64::from(self.unreported));
        self.unreported = 0;
        Ok(())
    }

    /// Writes the request's terminal `event` (fenced, without a cancel check), then the last
    /// `tokens` record and the `finish` record. Records follow the event: analytics count only
    /// what the session stream holds.
    pub async fn terminal(
        &mut self,
        event: &SessionEvent,
        outcome: Outcome,
        usage: Usage,
    ) -> Result<Terminal, StreamIoError> {
        let written = self
            .ctx
            .scripts
            .append(
                self.ctx.redis.next(),
                &self.streams,
                self.attempt,
                event,
                false,
            )
            .await?;
        if !matches!(written, AppendOutcome::Written(_)) {
            return Ok(Terminal::Fenced);
        }
        self.report_tokens().await?;
        let job = self.job;
        let duration = self.started.elapsed();
        self.record(&EventRecord::Finished {
            request_id: job.request_id,
            session_id: job.session_id.clone(),
            model_id: self.served.clone(),
            outcome,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            ttft_ms: self
                .first_token_at
                .map(|t| millis(t.duration_since(self.started))),
            duration_ms: millis(duration),
            timestamp: stream_schema::now_millis(),
        })
        .await?;
        Ok(Terminal::Written { duration })
    }

    fn tokens_record(&self, count: u32) -> EventRecord {
        EventRecord::Tokens {
            request_id: self.job.request_id,
            session_id: self.job.session_id.clone(),
            model_id: self.served.clone(),
            count,
            timestamp: stream_schema::now_millis(),
        }
    }

    /// Every record carries the `traceparent` of the span it is written in (the attempt, or
    /// its `llm.call`), so the processor's `record.apply` joins the request's trace; without
    /// trace export there is none and the record is unchanged.
    async fn record_on(&self, client: &Client, record: &EventRecord) -> Result<(), StreamIoError> {
        self.events
            .append(
                client,
                record,
                service_kit::telemetry::current_traceparent(),
            )
            .await?;
        Ok(())
    }

    async fn record(&self, record: &EventRecord) -> Result<(), StreamIoError> {
        self.record_on(self.ctx.redis.next(), record).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: tokio::time::Instant, ms: u64) -> tokio::time::Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn without_a_window_every_token_is_written_at_once() {
        let mut pending = Coalescer::new(Duration::ZERO);
        let now = tokio::time::Instant::now();
        assert!(pending.push("a", now));
        assert_eq!(pending.take(), Some(("a".to_owned(), 1)));
        assert_eq!(pending.take(), None);
    }

    #[test]
    fn the_window_opens_with_its_first_token_and_is_not_pushed_back() {
        let mut pending = Coalescer::new(Duration::from_millis(20));
        let base = tokio::time::Instant::now();
        assert!(!pending.push("a", base));
        assert!(!pending.push("b", at(base, 15)));
        assert_eq!(pending.flush_at, Some(at(base, 20)));

        assert_eq!(pending.take(), Some(("ab".to_owned(), 2)));
        assert_eq!(pending.flush_at, None);
        assert!(!pending.push("c", at(base, 30)));
        assert_eq!(pending.flush_at, Some(at(base, 50)));
    }

    #[test]
    fn a_full_buffer_is_written_before_its_window_ends() {
        let mut pending = Coalescer::new(Duration::from_secs(60));
        let now = tokio::time::Instant::now();
        let chunk = "x".repeat(1024);
        let pushes = (0..16)
            .map(|_| pending.push(&chunk, now))
            .collect::<Vec<_>>();
        assert_eq!(pushes.iter().filter(|&&now| now).count(), 1);
        assert_eq!(pushes.last(), Some(&true));
        let (text, tokens) = pending.take().unwrap_or_default();
        assert_eq!((text.len(), tokens), (MAX_COALESCED_BYTES, 16));
    }

    #[test]
    fn taking_an_empty_buffer_closes_the_window_and_writes_nothing() {
        let mut pending = Coalescer::new(Duration::from_millis(20));
        assert_eq!(pending.take(), None);
        assert_eq!(pending.flush_at, None);
    }

    mod redis {
        use std::time::{Duration, Instant};

        use stream_schema::{
            EventRecord, FinishReason, SessionEvent, Usage, UsageSource, record::Outcome,
        };

        use stream_schema::record::FallbackSide;

        use crate::sink::{Fallback, Terminal, TokenSink, Write};
        use crate::worker::testing::{Env, job};

        #[tokio::test]
        async fn coalesced_tokens_are_one_event_and_records_follow_the_end() -> anyhow::Result<()> {
            let env = Env::start(Duration::from_secs(60)).await?;
            let job = job()?;
            env.start_request(&job).await?;
            let mut sink = TokenSink::new(&env.ctx, &job, 1, Instant::now());

            for token in ["a", "b", "c"] {
                assert_eq!(sink.push(token).await?, Write::Accepted);
            }
            assert!(sink.flush_at().is_some());
            assert_eq!(
                env.events(&job).await?.len(),
                1,
                "only `start` before the flush"
            );
            assert_eq!(sink.flush().await?, Write::Accepted);
            assert_eq!(sink.flush_at(), None);
            let usage = Usage {
                prompt_tokens: 2,
                completion_tokens: 3,
                source: UsageSource::Counted,
            };
            let complete = SessionEvent::Complete {
                request_id: job.request_id,
                finish_reason: FinishReason::Stop,
                usage,
                timestamp: 1,
            };
            let end = sink
                .terminal(&complete, Outcome::Completed(FinishReason::Stop), usage)
                .await?;

            assert!(matches!(end, Terminal::Written { .. }));
            let events = env.events(&job).await?;
            assert_eq!(events.len(), 3);
            assert!(matches!(
                &events[1],
                SessionEvent::Token { sequence: 1, content, .. } if content == "abc"
            ));
            assert_eq!(events[2], complete);
            let records = env.records(&job).await?;
            assert_eq!(records.len(), 2);
            assert!(matches!(records[0], EventRecord::Tokens { count: 3, .. }));
            assert!(matches!(
                records[1],
                EventRecord::Finished {
                    completion_tokens: 3,
                    ttft_ms: Some(_),
                    ..
                }
            ));
            Ok(())
        }

        #[tokio::test]
        async fn a_fenced_attempt_writes_neither_tokens_nor_records() -> anyhow::Result<()> {
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
            let mut sink = TokenSink::new(&env.ctx, &job, 1, Instant::now());

            assert_eq!(sink.push("late").await?, Write::Fenced);
            sink.report_tokens().await?;

            assert_eq!(sink.written_tokens(), 0);
            assert_eq!(
                env.events(&job).await?.len(),
                2,
                "`start` and `restart` only"
            );
            assert!(env.records(&job).await?.is_empty());
            Ok(())
        }

        #[tokio::test]
        async fn a_fallback_restarts_as_the_next_attempt_for_the_new_model() -> anyhow::Result<()> {
            let env = Env::start(Duration::ZERO).await?;
            let job = job()?;
            env.start_request(&job).await?;
            let claude = stream_schema::ModelId::parse("claude")?;
            let mut sink = TokenSink::new(&env.ctx, &job, 1, Instant::now());

            assert_eq!(sink.fall_back(&claude).await?, Fallback::Moved);
            assert_eq!(sink.push("hi").await?, Write::Accepted);
            sink.report_tokens().await?;

            let events = env.events(&job).await?;
            assert!(
                matches!(
                    &events[1],
                    SessionEvent::Restart { attempt: 2, reason, served_by: Some(model), .. }
                        if reason == "fallback" && *model == claude
                ),
                "{events:?}"
            );
            assert!(matches!(events[2], SessionEvent::Token { sequence: 1, .. }));
            let records = env.records(&job).await?;
            let sides: Vec<_> = records
                .iter()
                .filter_map(|r| match r {
                    EventRecord::FellBack { model_id, side, .. } => {
                        Some((model_id.to_string(), *side))
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(
                sides,
                [
                    ("mock".to_owned(), FallbackSide::From),
                    ("claude".to_owned(), FallbackSide::To)
                ]
            );
            assert!(
                matches!(records.last(), Some(EventRecord::Tokens { model_id, count: 1, .. }) if *model_id == claude),
                "{records:?}"
            );
            Ok(())
        }

        #[tokio::test]
        async fn a_fallback_of_a_fenced_attempt_writes_nothing() -> anyhow::Result<()> {
            let env = Env::start(Duration::ZERO).await?;
            let job = job()?;
            env.start_request(&job).await?;
            let mut stale = TokenSink::new(&env.ctx, &job, 1, Instant::now());
            let mut current = TokenSink::new(&env.ctx, &job, 1, Instant::now());
            let claude = stream_schema::ModelId::parse("claude")?;
            assert_eq!(current.fall_back(&claude).await?, Fallback::Moved);

            assert_eq!(stale.fall_back(&claude).await?, Fallback::Fenced);
            assert_eq!(
                env.events(&job).await?.len(),
                2,
                "`start` and one `restart`"
            );
            assert_eq!(
                env.records(&job).await?.len(),
                2,
                "the first fallback's records"
            );
            Ok(())
        }
    }
}
