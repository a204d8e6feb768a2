//! The token sink of one attempt: where the answer's content goes (text, tool-call fragments,
//! reasoning). It owns batching and coalescing (`producer.token_coalesce_ms`), the fenced
//! appends to the session stream (through `stream_io::session`) and the attempt's analytics
//! records (through `stream_io::records`).
//!
//! **Adaptive batching, no timer**: every delta becomes one event (one stream entry, one
//! `sequence`), held in the sink's batch. The worker writes the batch as soon as the upstream
//! has nothing more waiting ([`TokenSink::write_batch`]): a lone token goes out at once, and the
//! tokens that arrived while an append was in flight (the worker reads no upstream while it
//! awaits Redis) go together in the next one, one fenced script call for all of them. A full
//! batch ([`MAX_BATCH_EVENTS`], [`MAX_BATCH_BYTES`]) is written by [`TokenSink::push`] itself.
//!
//! Coalescing, off by default, is the other, timed, mechanism: it merges deltas into one event
//! until its window is over ([`TokenSink::flush_at`]), the buffer is full, or the next delta is
//! of another kind. It merges consecutive deltas of the same kind only: text with text,
//! reasoning with reasoning, and argument fragments of the same tool call (same `index`) that
//! carry no `id` or `name` of their own. A delta of another kind or call, or one that opens a
//! call, first closes what is buffered, so every event holds one kind, one call, and
//! `id`/`name` exactly where the upstream sent them. A closed event joins the batch.
//!
//! Every delta counts as one token (`sequence` counts events, `tokens` counts deltas): the
//! first content of any kind is the first token (time to first token, retries before it), and
//! tool-call fragments and reasoning count toward the hard token cap and the `tokens` records.

use std::sync::Arc;
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
/// Coalesced text is closed into one event past this size, whatever the window says.
const MAX_COALESCED_BYTES: usize = 16 * 1024;
/// Events of one batch at most: a full batch is written at once. Below the script's own limit
/// ([`stream_io::session::MAX_BATCH_EVENTS`]); a script blocks Redis while it runs, so a call
/// stays short.
pub const MAX_BATCH_EVENTS: usize = 128;
/// Content bytes of one batch at most, for the same reason.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

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

/// One content delta of the answer, as the sink writes it: one upstream delta, one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Answer text (a `token` event).
    Text(String),
    /// Reasoning text (a `reasoning` event).
    Reasoning(String),
    /// A tool-call fragment (a `tool_call` event).
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
}

/// The kind of what the buffer holds; deltas merge only within one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Text,
    Reasoning,
    /// One tool call; `id` and `name` of the fragment that began the buffer.
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
    },
}

impl Content {
    /// The kind and the text it adds to a buffer.
    fn split(self) -> (Kind, String) {
        match self {
            Self::Text(text) => (Kind::Text, text),
            Self::Reasoning(text) => (Kind::Reasoning, text),
            Self::ToolCall {
                index,
                id,
                name,
                arguments,
            } => (Kind::ToolCall { index, id, name }, arguments),
        }
    }
}

/// Content received but not written yet, and when it must be. Pure state: the coalescing
/// decision, testable without Redis.
#[derive(Debug, Default)]
struct Coalescer {
    /// `producer.token_coalesce_ms`; zero writes each delta as it arrives.
    window: Duration,
    /// What `text` is; `None` while the buffer is empty.
    kind: Option<Kind>,
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

    /// Whether `content` may join the buffer without the buffer being written first: an empty
    /// buffer takes anything; text joins text, reasoning joins reasoning; a tool-call fragment
    /// joins fragments of the same call (`index`) unless it carries an `id` or `name` (which
    /// must stay on the event the upstream sent them with).
    fn accepts(&self, content: &Content) -> bool {
        match (&self.kind, content) {
            (None, _)
            | (Some(Kind::Text), Content::Text(_))
            | (Some(Kind::Reasoning), Content::Reasoning(_)) => true,
            (
                Some(Kind::ToolCall { index: held, .. }),
                Content::ToolCall {
                    index,
                    id: None,
                    name: None,
                    ..
                },
            ) => held == index,
            _ => false,
        }
    }

    /// Buffers one delta received at `now`; true when the buffer must be written now. The
    /// caller writes the buffer first when [`Coalescer::accepts`] refuses the delta
    /// ([`TokenSink::push`] does): pushed anyway, it would join the held kind.
    fn push(&mut self, content: Content, now: tokio::time::Instant) -> bool {
        let (kind, text) = content.split();
        if self.kind.is_none() {
            self.kind = Some(kind);
        }
        self.text.push_str(&text);
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

    /// The buffered content and its token count, if any; closes the window either way.
    fn take(&mut self) -> Option<(Kind, String, u32)> {
        self.flush_at = None;
        let kind = self.kind.take()?;
        Some((
            kind,
            std::mem::take(&mut self.text),
            std::mem::take(&mut self.tokens),
        ))
    }
}

/// One closed event waiting in the batch: its kind, content, deltas, and when it was closed
/// (its `timestamp`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ready {
    kind: Kind,
    text: String,
    tokens: u32,
    at: u64,
}

/// Closed events not written yet, in order. Pure state, testable without Redis.
#[derive(Debug, Default)]
struct Batch {
    events: Vec<Ready>,
    tokens: u32,
    bytes: usize,
}

impl Batch {
    fn add(&mut self, (kind, text, tokens): (Kind, String, u32), at: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
        self.bytes += text.len();
        self.events.push(Ready {
            kind,
            text,
            tokens,
            at,
        });
    }

    /// Whether the batch must be written before it takes more.
    fn full(&self) -> bool {
        self.events.len() >= MAX_BATCH_EVENTS || self.bytes >= MAX_BATCH_BYTES
    }

    fn take(&mut self) -> Vec<Ready> {
        self.tokens = 0;
        self.bytes = 0;
        std::mem::take(&mut self.events)
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
    streams: Arc<RequestStreams>,
    events: EventLog,
    /// The open event of the coalescing window (empty while coalescing is off).
    pending: Coalescer,
    /// Closed events waiting to be written, in one script call.
    batch: Batch,
    /// Content events written (`token`, `tool_call`, `reasoning`: their shared `sequence`).
    sequence: u64,
    /// Upstream deltas written (more than `sequence` when deltas are coalesced).
    tokens: u32,
    /// The reasoning part of `tokens`.
    reasoning_tokens: u32,
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
            streams: Arc::new(RequestStreams::new(
                &job.session_id,
                &job.model_id,
                &job.request_id,
                ctx.retention,
            )),
            events: ctx.event_log(),
            pending: Coalescer::new(ctx.token_coalesce),
            batch: Batch::default(),
            sequence: 0,
            tokens: 0,
            reasoning_tokens: 0,
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

    /// True until a content event was written.
    pub fn nothing_written(&self) -> bool {
        self.sequence == 0
    }

    /// True until a token was received (written, batched or buffered): the first-token
    /// deadline applies.
    pub fn receiving_first(&self) -> bool {
        self.sequence == 0 && self.batch.tokens == 0 && self.pending.tokens == 0
    }

    /// Whether closed events wait in the batch: the worker writes them
    /// ([`TokenSink::write_batch`]) once the upstream has nothing more ready.
    pub fn has_batch(&self) -> bool {
        !self.batch.events.is_empty()
    }

    /// Upstream tokens written to the session stream.
    pub fn written_tokens(&self) -> u32 {
        self.tokens
    }

    /// Reasoning deltas written (the reasoning part of [`TokenSink::written_tokens`]).
    pub fn written_reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    /// Upstream tokens received: written plus batched plus buffered (what the token cap
    /// counts).
    pub fn received_tokens(&self) -> u32 {
        self.tokens
            .saturating_add(self.batch.tokens)
            .saturating_add(self.pending.tokens)
    }

    pub fn first_token_at(&self) -> Option<Instant> {
        self.first_token_at
    }

    /// When buffered text must be written; `None` when nothing waits.
    pub fn flush_at(&self) -> Option<tokio::time::Instant> {
        self.pending.flush_at
    }

    /// Takes one delta of the answer into the batch (or the coalescing window). Writes only
    /// when the batch is full; otherwise the worker writes it ([`TokenSink::write_batch`]) once
    /// the upstream has nothing more ready.
    pub async fn push(&mut self, content: Content) -> Result<Write, StreamIoError> {
        if !self.pending.accepts(&content) {
            self.close_pending();
        }
        if self.pending.push(content, tokio::time::Instant::now()) {
            self.close_pending();
        }
        if self.batch.full() {
            return self.write_batch().await;
        }
        Ok(Write::Accepted)
    }

    /// Closes the coalescing window's event, if any, into the batch.
    fn close_pending(&mut self) {
        if let Some(event) = self.pending.take() {
            self.batch.add(event, stream_schema::now_millis());
        }
    }

    /// Writes everything held: the coalescing window's event and the batch (nothing when both
    /// are empty).
    pub async fn flush(&mut self) -> Result<Write, StreamIoError> {
        self.close_pending();
        self.write_batch().await
    }

    /// Writes the batch's events in one fenced script call (nothing when it is empty); an open
    /// coalescing window stays open. The `tokens` record of tokens written *earlier* rides
    /// along concurrently on the same connection (fred pipelines commands issued together), so
    /// a batch costs one round trip; the record never counts the tokens it travels with, which
    /// could still be fenced off.
    pub async fn write_batch(&mut self) -> Result<Write, StreamIoError> {
        let tokens = self.batch.tokens;
        let ready = self.batch.take();
        if ready.is_empty() {
            return Ok(Write::Accepted);
        }
        let request_id = self.job.request_id;
        let mut reasoning = 0_u32;
        let events: Vec<SessionEvent> = (self.sequence + 1..)
            .zip(ready)
            .map(|(sequence, ready)| {
                let Ready {
                    kind,
                    text,
                    tokens,
                    at: timestamp,
                } = ready;
                match kind {
                    Kind::Text => SessionEvent::Token {
                        request_id,
                        sequence,
                        content: text,
                        timestamp,
                    },
                    Kind::Reasoning => {
                        reasoning = reasoning.saturating_add(tokens);
                        SessionEvent::Reasoning {
                            request_id,
                            sequence,
                            content: text,
                            timestamp,
                        }
                    }
                    Kind::ToolCall { index, id, name } => SessionEvent::ToolCall {
                        request_id,
                        sequence,
                        index,
                        id,
                        name,
                        arguments: text,
                        timestamp,
                    },
                }
            })
            .collect();
        let count = events.len();
        let client = self.ctx.redis.next();
        let append = self
            .ctx
            .appender
            .append(&self.streams, self.attempt, events, true);
        let outcome = if self.unreported >= RECORD_BATCH {
            let count = self.unreported;
            let record = self.tokens_record(count);
            let (appended, recorded) = tokio::join!(append, self.record_on(client, &record));
            recorded?;
            self.unreported -= count;
            self.ctx.write_metrics.tokens.increment(u64::from(count));
            appended?
        } else {
            append.await?
        };
        match outcome {
            AppendOutcome::Written(_) => {}
            AppendOutcome::Fenced => return Ok(Write::Fenced),
            AppendOutcome::Cancelled => return Ok(Write::Cancelled),
        }
        self.ctx.write_metrics.append_batches.increment(1);
        self.sequence += count as u64;
        self.tokens = self.tokens.saturating_add(tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(reasoning);
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
        self.ctx
            .write_metrics
            .tokens
            .increment(u64::from(self.unreported));
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
            .appender
            .append(&self.streams, self.attempt, vec![event.clone()], false)
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

    fn text(t: &str) -> Content {
        Content::Text(t.to_owned())
    }

    fn fragment(index: u32, opens: Option<(&str, &str)>, arguments: &str) -> Content {
        Content::ToolCall {
            index,
            id: opens.map(|(id, _)| id.to_owned()),
            name: opens.map(|(_, name)| name.to_owned()),
            arguments: arguments.to_owned(),
        }
    }

    #[test]
    fn without_a_window_every_token_is_written_at_once() {
        let mut pending = Coalescer::new(Duration::ZERO);
        let now = tokio::time::Instant::now();
        assert!(pending.push(text("a"), now));
        assert_eq!(pending.take(), Some((Kind::Text, "a".to_owned(), 1)));
        assert_eq!(pending.take(), None);
    }

    #[test]
    fn the_window_opens_with_its_first_token_and_is_not_pushed_back() {
        let mut pending = Coalescer::new(Duration::from_millis(20));
        let base = tokio::time::Instant::now();
        assert!(!pending.push(text("a"), base));
        assert!(!pending.push(text("b"), at(base, 15)));
        assert_eq!(pending.flush_at, Some(at(base, 20)));

        assert_eq!(pending.take(), Some((Kind::Text, "ab".to_owned(), 2)));
        assert_eq!(pending.flush_at, None);
        assert!(!pending.push(text("c"), at(base, 30)));
        assert_eq!(pending.flush_at, Some(at(base, 50)));
    }

    #[test]
    fn a_full_buffer_is_written_before_its_window_ends() {
        let mut pending = Coalescer::new(Duration::from_secs(60));
        let now = tokio::time::Instant::now();
        let chunk = "x".repeat(1024);
        let pushes = (0..16)
            .map(|_| pending.push(text(&chunk), now))
            .collect::<Vec<_>>();
        assert_eq!(pushes.iter().filter(|&&now| now).count(), 1);
        assert_eq!(pushes.last(), Some(&true));
        let (kind, text, tokens) = pending.take().unwrap_or((Kind::Text, String::new(), 0));
        assert_eq!(kind, Kind::Text);
        assert_eq!((text.len(), tokens), (MAX_COALESCED_BYTES, 16));
    }

    #[test]
    fn only_the_same_kind_and_the_same_tool_call_merge() {
        let mut pending = Coalescer::new(Duration::from_secs(60));
        let now = tokio::time::Instant::now();
        // A call's opening fragment begins a buffer; its later fragments join it.
        assert!(pending.accepts(&fragment(0, Some(("call_a", "f")), "")));
        pending.push(fragment(0, Some(("call_a", "f")), ""), now);
        assert!(pending.accepts(&fragment(0, None, "{\"a\"")));
        pending.push(fragment(0, None, "{\"a\""), now);
        pending.push(fragment(0, None, ":1}"), now);
        // Never across kinds, calls, or onto a fragment that opens (or re-opens) a call.
        assert!(!pending.accepts(&text("hi")));
        assert!(!pending.accepts(&Content::Reasoning("hm".to_owned())));
        assert!(!pending.accepts(&fragment(1, None, "x")));
        assert!(!pending.accepts(&fragment(0, Some(("call_b", "g")), "")));
        assert!(!pending.accepts(&Content::ToolCall {
            index: 0,
            id: None,
            name: Some("f".to_owned()),
            arguments: String::new(),
        }));
        let kind = Kind::ToolCall {
            index: 0,
            id: Some("call_a".to_owned()),
            name: Some("f".to_owned()),
        };
        assert_eq!(pending.take(), Some((kind, "{\"a\":1}".to_owned(), 3)));

        // Reasoning merges with reasoning only; an empty buffer takes anything.
        assert!(pending.accepts(&fragment(3, None, "x")));
        pending.push(Content::Reasoning("think".to_owned()), now);
        assert!(pending.accepts(&Content::Reasoning(" more".to_owned())));
        assert!(!pending.accepts(&text("answer")));
        assert!(!pending.accepts(&fragment(0, None, "x")));
        // Text merges with text only.
        pending.take();
        pending.push(text("a"), now);
        assert!(pending.accepts(&text("b")));
        assert!(!pending.accepts(&fragment(0, None, "x")));
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

        use crate::sink::{Content, Fallback, MAX_BATCH_EVENTS, Terminal, TokenSink, Write};
        use crate::worker::testing::{Env, job};

        #[tokio::test]
        async fn coalesced_tokens_are_one_event_and_records_follow_the_end() -> anyhow::Result<()> {
            let env = Env::start(Duration::from_secs(60)).await?;
            let job = job()?;
            env.start_request(&job).await?;
            let mut sink = TokenSink::new(&env.ctx, &job, 1, Instant::now());

            for token in ["a", "b", "c"] {
                assert_eq!(
                    sink.push(Content::Text(token.to_owned())).await?,
                    Write::Accepted
                );
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
                reasoning_tokens: None,
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
        async fn each_kind_and_each_tool_call_is_its_own_event_in_one_sequence()
        -> anyhow::Result<()> {
            let env = Env::start(Duration::from_secs(60)).await?;
            let job = job()?;
            env.start_request(&job).await?;
            let mut sink = TokenSink::new(&env.ctx, &job, 1, Instant::now());
            let call =
                |index: u32, opens: Option<(&str, &str)>, arguments: &str| Content::ToolCall {
                    index,
                    id: opens.map(|(id, _)| id.to_owned()),
                    name: opens.map(|(_, name)| name.to_owned()),
                    arguments: arguments.to_owned(),
                };
            let deltas = [
                Content::Reasoning("Let me".to_owned()),
                Content::Reasoning(" think".to_owned()),
                Content::Text("Sure".to_owned()),
                call(0, Some(("call_a", "f")), ""),
                call(0, None, "{\"x\""),
                call(0, None, ":1}"),
                call(1, Some(("call_b", "g")), "{"),
                call(1, None, "}"),
            ];
            for delta in deltas {
                assert_eq!(sink.push(delta).await?, Write::Accepted);
            }
            assert_eq!(sink.flush().await?, Write::Accepted);

            let events = env.events(&job).await?;
            let sequences: Vec<Option<u64>> =
                events[1..].iter().map(SessionEvent::sequence).collect();
            assert_eq!(sequences, [Some(1), Some(2), Some(3), Some(4)]);
            assert!(
                matches!(&events[1], SessionEvent::Reasoning { content, .. } if content == "Let me think")
            );
            assert!(matches!(&events[2], SessionEvent::Token { content, .. } if content == "Sure"));
            assert!(
                matches!(&events[3], SessionEvent::ToolCall { index: 0, id: Some(id), name: Some(name), arguments, .. }
                if id == "call_a" && name == "f" && arguments == "{\"x\":1}")
            );
            assert!(
                matches!(&events[4], SessionEvent::ToolCall { index: 1, id: Some(id), arguments, .. }
                if id == "call_b" && arguments == "{}")
            );
            assert_eq!(sink.written_tokens(), 8);
            Ok(())
        }

        #[tokio::test]
        async fn a_full_batch_is_written_by_push_in_one_call() -> anyhow::Result<()> {
            let env = Env::start(Duration::ZERO).await?;
            let job = job()?;
            env.start_request(&job).await?;
            let scripts = env.calls("evalsha").await?;
            let mut sink = TokenSink::new(&env.ctx, &job, 1, Instant::now());

            for n in 1..MAX_BATCH_EVENTS {
                assert_eq!(
                    sink.push(Content::Text(format!("{n} "))).await?,
                    Write::Accepted
                );
            }
            assert_eq!(
                sink.written_tokens(),
                0,
                "nothing written before the batch is full"
            );
            assert!(sink.has_batch());
            let last = Content::Text(format!("{MAX_BATCH_EVENTS} "));
            assert_eq!(sink.push(last).await?, Write::Accepted);

            assert!(!sink.has_batch());
            assert_eq!(env.calls("evalsha").await? - scripts, 1);
            let events = env.events(&job).await?;
            assert_eq!(events.len(), 1 + MAX_BATCH_EVENTS);
            for (n, event) in (1_u64..).zip(&events[1..]) {
                assert!(
                    matches!(event, SessionEvent::Token { sequence, content, .. }
                        if *sequence == n && *content == format!("{n} ")),
                    "{event:?}"
                );
            }
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

            assert_eq!(
                sink.push(Content::Text("late".to_owned())).await?,
                Write::Accepted,
                "batched, not written yet"
            );
            assert_eq!(sink.write_batch().await?, Write::Fenced);
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
            assert_eq!(
                sink.push(Content::Text("hi".to_owned())).await?,
                Write::Accepted
            );
            assert_eq!(sink.write_batch().await?, Write::Accepted);
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
