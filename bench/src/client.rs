//! The load generator's clients: concurrent streams that each run one chat after another
//! through a target (the bridge, mock-llm directly, or LiteLLM), timing every token; and
//! mostly idle session-wide SSE clients for the memory figure.
//!
//! Every token carries mock-llm's send time in its content (`[[mock stamp=1]]` appends
//! `|<Unix µs>`), and every path forwards content unchanged, so one clock measures all paths:
//! per-token latency = receive time − send time, both read from the system clock of this one
//! machine.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Deserialize;

use crate::stack::API_KEY;

/// Where the chats go.
#[derive(Debug, Clone)]
pub enum Target {
    /// `POST /api/chat/start` on the gateway, then the request's SSE stream.
    Bridge { gateway: String },
    /// An OpenAI-compatible streaming endpoint (mock-llm itself, or a proxy in front of it).
    OpenAi {
        base: String,
        model: String,
        key: String,
    },
}

/// The shape of every chat of one load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// mock-llm's delay before each token (0 = as fast as the path takes them).
    pub delay_ms: u64,
    pub tokens_per_chat: usize,
}

/// Shared between the chat loops and the runner that samples them.
#[derive(Debug, Default)]
pub struct Counters {
    /// Chats the gateway accepted (`POST /api/chat/start` answered 2xx).
    pub started: AtomicU64,
    /// Tokens received, whenever.
    pub tokens: AtomicU64,
    /// Chats that ended with their terminal event.
    pub chats: AtomicU64,
    /// Failed chats (HTTP errors, error events, broken streams).
    pub errors: AtomicU64,
    /// Chats with a gap over [`STALL_GAP`] between two of their tokens, while recording.
    pub stalled: AtomicU64,
    /// Tokens without a readable stamp (would mean a path altered the content).
    pub unstamped: AtomicU64,
    /// Set by the runner during the measurement window: only then are samples kept.
    pub recording: AtomicBool,
    /// Set by the runner at the end of the window: loops finish their chat and stop.
    pub stop: AtomicBool,
    /// Samples of all loops, flushed at the end of each chat (and when a loop is aborted).
    pub samples: Mutex<Samples>,
}

/// Latency samples in microseconds.
#[derive(Debug, Default)]
pub struct Samples {
    /// receive − send of every token after the first of its chat.
    pub token_us: Vec<i64>,
    /// Chat start (before the first request) → first token received.
    pub ttft_us: Vec<i64>,
}

/// Per-loop samples, moved into [`Counters::samples`] on flush and on drop (an aborted loop
/// still contributes what it measured, so aborting the slowest chats biases nothing).
struct LocalSamples {
    counters: Arc<Counters>,
    samples: Samples,
}

impl LocalSamples {
    fn flush(&mut self) {
        if self.samples.token_us.is_empty() && self.samples.ttft_us.is_empty() {
            return;
        }
        let mut shared = self
            .counters
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shared.token_us.append(&mut self.samples.token_us);
        shared.ttft_us.append(&mut self.samples.ttft_us);
    }
}

impl Drop for LocalSamples {
    fn drop(&mut self) {
        self.flush();
    }
}

/// An HTTP client for many concurrent streams to loopback servers.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        // Below the servers' keep-alive (5 s in actix-web and uvicorn): a pooled connection
        // is dropped here before the server closes it, never reused while its close is in
        // flight (a start or cancel then failed with "error sending request").
        .pool_idle_timeout(Duration::from_secs(4))
        .build()
        .context("building the HTTP client")
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The prompt of chat `chat` on loop `stream`: distinct text, the load's shape, and `stamp`.
fn prompt(run: &str, stream: usize, chat: u64, load: Load) -> String {
    format!(
        "Benchmark {run} stream {stream} chat {chat}. [[mock tokens={} delay_ms={} stamp=1]]",
        load.tokens_per_chat, load.delay_ms
    )
}

/// The first chat of loop `stream` of `streams` is cut to a share of the full length, spread
/// evenly over the loops, so chats end and restart uniformly over time instead of all at once.
pub fn first_chat(load: Load, stream: usize, streams: usize) -> Load {
    let share = (stream + 1) as f64 / streams.max(1) as f64;
    let tokens = (load.tokens_per_chat as f64 * share).ceil() as usize;
    Load {
        tokens_per_chat: tokens.clamp(2, load.tokens_per_chat.max(2)),
        ..load
    }
}

/// Runs one chat loop until `counters.stop`; starts after `start_delay` (staggering) with a
/// `first` chat that may be shorter than the others.
#[expect(clippy::too_many_arguments, reason = "one call site, all plain values")]
pub async fn chat_loop(
    http: reqwest::Client,
    target: Target,
    run: String,
    stream: usize,
    first: Load,
    load: Load,
    start_delay: Duration,
    counters: Arc<Counters>,
) {
    tokio::time::sleep(start_delay).await;
    let mut local = LocalSamples {
        counters: Arc::clone(&counters),
        samples: Samples::default(),
    };
    let mut chat = 0_u64;
    while !counters.stop.load(Ordering::Relaxed) {
        chat += 1;
        let load = if chat == 1 { first } else { load };
        let prompt = prompt(&run, stream, chat, load);
        let result = match &target {
            Target::Bridge { gateway } => {
                let session = format!("{run}_{stream}");
                bridge_chat(
                    &http, gateway, &session, &prompt, load, &counters, &mut local,
                )
                .await
            }
            Target::OpenAi { base, model, key } => {
                let endpoint = Endpoint { base, model, key };
                openai_chat(&http, &endpoint, &prompt, load, &counters, &mut local).await
            }
        };
        local.flush();
        match result {
            Ok(()) => {
                counters.chats.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                let errors = counters.errors.fetch_add(1, Ordering::Relaxed);
                if errors < 5 {
                    eprintln!("bench: chat failed: {error:#}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A gap between two tokens of one chat longer than this counts the chat as stalled (pacing
/// is at most 50 ms per token in every scenario).
pub const STALL_GAP: Duration = Duration::from_secs(1);

/// Times the tokens of one chat.
struct ChatClock {
    started: Instant,
    /// When the previous token arrived.
    last: Option<Instant>,
    /// Whether this chat was already counted as stalled.
    stalled: bool,
    /// Whether the chat started inside the window (its TTFT counts).
    record_ttft: bool,
    tokens: u64,
}

impl ChatClock {
    fn start(counters: &Counters) -> Self {
        Self {
            started: Instant::now(),
            last: None,
            stalled: false,
            record_ttft: counters.recording.load(Ordering::Relaxed),
            tokens: 0,
        }
    }

    /// One token event with `content`, received at `received` (monotonic) / `received_us`
    /// (Unix). An event may carry several tokens (the producer's `token_coalesce_ms`): each
    /// stamp in the text is one token.
    fn token(
        &mut self,
        content: &str,
        received: Instant,
        received_us: i64,
        counters: &Counters,
        local: &mut LocalSamples,
    ) {
        if self.tokens == 0 && self.record_ttft {
            local
                .samples
                .ttft_us
                .push(micros(received.duration_since(self.started)));
        }
        let recording = counters.recording.load(Ordering::Relaxed);
        if let Some(last) = self.last.replace(received)
            && !self.stalled
            && recording
            && received.duration_since(last) > STALL_GAP
        {
            self.stalled = true;
            counters.stalled.fetch_add(1, Ordering::Relaxed);
        }
        let stamps = stamps(content);
        if stamps.is_empty() {
            counters.unstamped.fetch_add(1, Ordering::Relaxed);
        }
        let count = stamps.len().max(1) as u64;
        for sent_us in stamps {
            // The chat's first token is timed by TTFT, not here.
            if self.tokens > 0 && recording {
                local.samples.token_us.push(received_us - sent_us);
            }
            self.tokens += 1;
        }
        if self.tokens == 0 {
            self.tokens = 1;
        }
        counters.tokens.fetch_add(count, Ordering::Relaxed);
    }
}

/// The send times (Unix µs) that mock-llm's `stamp=1` appended to each token of `content`
/// (`" word|1700000000000000 next|1700000000000123"`).
fn stamps(content: &str) -> Vec<i64> {
    content
        .split('|')
        .skip(1)
        .filter_map(|segment| {
            let digits = segment
                .find(|c: char| !c.is_ascii_digit())
                .map_or(segment, |end| &segment[..end]);
            digits.parse().ok()
        })
        .collect()
}

/// Splits a byte stream into SSE events and hands each `data:` payload to `on_data` with the
/// arrival time of the network read that completed it. `on_data` returns `true` to stop.
async fn read_sse(
    response: reqwest::Response,
    mut on_data: impl FnMut(&[u8], Instant, i64) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the stream")?;
        let (received, received_us) = (Instant::now(), unix_micros());
        buffer.extend_from_slice(&chunk);
        let mut consumed = 0;
        while let Some(end) = find(&buffer[consumed..], b"\n\n") {
            let event = &buffer[consumed..consumed + end];
            consumed += end + 2;
            for line in event.split(|b| *b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    let data = data.strip_prefix(b" ").unwrap_or(data);
                    if on_data(data, received, received_us)? {
                        return Ok(());
                    }
                }
            }
        }
        buffer.drain(..consumed);
    }
    bail!("the stream ended before its last event")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[derive(Deserialize)]
struct BridgeEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StartResponse {
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(rename = "streamUrl")]
    stream_url: String,
}

async fn bridge_chat(
    http: &reqwest::Client,
    gateway: &str,
    session: &str,
    prompt: &str,
    load: Load,
    counters: &Counters,
    local: &mut LocalSamples,
) -> anyhow::Result<()> {
    let mut clock = ChatClock::start(counters);
    let response = http
        .post(format!("{gateway}/api/chat/start"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({
            "sessionId": session,
            "modelId": "mock",
            "prompt": prompt,
            "maxTokens": load.tokens_per_chat,
        }))
        .send()
        .await
        .context("POST /api/chat/start")?;
    let status = response.status();
    if !status.is_success() {
        bail!("chat start answered {status}: {}", response.text().await?);
    }
    let started: StartResponse = response.json().await.context("chat start body")?;
    counters.started.fetch_add(1, Ordering::Relaxed);
    let response = http
        .get(format!("{gateway}{}", started.stream_url))
        .send()
        .await
        .context("GET the SSE stream")?;
    if !response.status().is_success() {
        bail!("SSE answered {}", response.status());
    }
    let mut failed = None;
    let mut stopped = false;
    read_sse(response, |data, received, received_us| {
        if counters.stop.load(Ordering::Relaxed) {
            stopped = true;
            return Ok(true);
        }
        let event: BridgeEvent<'_> = serde_json::from_slice(data).context("bridge event JSON")?;
        match event.kind.as_ref() {
            "token" => {
                let content = event.content.unwrap_or_default();
                clock.token(&content, received, received_us, counters, local);
                Ok(false)
            }
            "complete" => Ok(true),
            "error" => {
                failed = Some(String::from_utf8_lossy(data).into_owned());
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await?;
    if stopped {
        // The window is over: end the generation too (a client that merely leaves does not),
        // so the next measurement starts on a quiet system.
        let cancel = http
            .post(format!("{gateway}/api/chat/{}/cancel", started.request_id))
            .bearer_auth(API_KEY)
            .send()
            .await;
        if let Err(error) = cancel {
            eprintln!("bench: cancel failed: {error}");
        }
        return Ok(());
    }
    match failed {
        Some(event) => bail!("error event: {event}"),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    delta: Delta<'a>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

/// Where an OpenAI-compatible chat goes.
struct Endpoint<'a> {
    base: &'a str,
    model: &'a str,
    key: &'a str,
}

async fn openai_chat(
    http: &reqwest::Client,
    endpoint: &Endpoint<'_>,
    prompt: &str,
    load: Load,
    counters: &Counters,
    local: &mut LocalSamples,
) -> anyhow::Result<()> {
    let mut clock = ChatClock::start(counters);
    let response = http
        .post(format!("{}/v1/chat/completions", endpoint.base))
        .bearer_auth(endpoint.key)
        .json(&serde_json::json!({
            "model": endpoint.model,
            "stream": true,
            "max_tokens": load.tokens_per_chat,
            "messages": [{"role": "user", "content": prompt}],
        }))
        .send()
        .await
        .context("POST /v1/chat/completions")?;
    let status = response.status();
    if !status.is_success() {
        bail!("completions answered {status}: {}", response.text().await?);
    }
    let mut failed = None;
    read_sse(response, |data, received, received_us| {
        // The window is over: leaving ends the generation on these paths.
        if data == b"[DONE]" || counters.stop.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let chunk: Chunk<'_> = serde_json::from_slice(data).context("chunk JSON")?;
        if let Some(error) = chunk.error {
            failed = Some(error.to_string());
            return Ok(true);
        }
        for choice in chunk.choices {
            if let Some(content) = choice.delta.content.filter(|c| !c.is_empty()) {
                clock.token(&content, received, received_us, counters, local);
            }
        }
        Ok(false)
    })
    .await?;
    match failed {
        Some(error) => bail!("in-stream error: {error}"),
        None => Ok(()),
    }
}

/// Opens `count` session-wide SSE streams (one session each, `prefix_<i>`) on the gateway and
/// keeps them open without reading; returns them once every response has its headers.
pub async fn open_idle(
    http: &reqwest::Client,
    gateway: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<reqwest::Response>> {
    let opened = futures::stream::iter(range)
        .map(|i| async move {
            let session = format!("{prefix}_{i}");
            let token: serde_json::Value = http
                .post(format!("{gateway}/api/sessions/{session}/stream-token"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .context("POST stream-token")?
                .error_for_status()?
                .json()
                .await?;
            let url = token["streamUrl"]
                .as_str()
                .context("stream-token without streamUrl")?;
            let response = http
                .get(format!("{gateway}{url}"))
                .send()
                .await
                .context("GET session stream")?
                .error_for_status()?;
            anyhow::Ok(response)
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    opened.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_carry_the_shape_and_the_stamp_directive() {
        let load = Load {
            delay_ms: 20,
            tokens_per_chat: 100,
        };
        let text = prompt("r1", 2, 7, load);
        assert!(text.contains("[[mock tokens=100 delay_ms=20 stamp=1]]"));
        assert!(text.contains("stream 2 chat 7"));
        let lengths: Vec<usize> = (0..4)
            .map(|i| first_chat(load, i, 4).tokens_per_chat)
            .collect();
        assert_eq!(lengths, vec![25, 50, 75, 100]);
    }

    #[test]
    fn every_stamp_in_a_token_event_counts() {
        assert_eq!(stamps(" the|1700000000000000"), vec![1_700_000_000_000_000]);
        assert_eq!(
            stamps("Once|1700000000000000 upon|1700000000000123"),
            vec![1_700_000_000_000_000, 1_700_000_000_000_123]
        );
        assert!(stamps("plain text").is_empty());
    }

    #[test]
    fn bridge_events_parse_borrowed() -> anyhow::Result<()> {
        let event: BridgeEvent<'_> = serde_json::from_slice(
            br#"{"type":"token","requestId":"x","sequence":2,"content":" the|1700000000000000","timestamp":1}"#,
        )?;
        assert_eq!(event.kind, "token");
        assert_eq!(event.content.as_deref(), Some(" the|1700000000000000"));
        Ok(())
    }
}
