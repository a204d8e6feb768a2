//! The upstream adapter: one async-openai client per configured model (any OpenAI-compatible
//! base URL), its timeouts, retry policy and concurrency limit, and the streaming call, whose
//! chunks leave this module as domain [`Delta`]s and whose errors are classified for the client
//! (`retryable`), the retry logic and metrics. No async-openai type leaves this module.
//!
//! async-openai's default HTTP path retries 429/5xx/connect errors by itself with its own
//! backoff. The producer owns that policy (it must see every failure to keep `retryable` honest
//! and to stop retrying when a request is cancelled), so each client gets [`UpstreamHttp`]: a
//! plain tower service without retries, which also keeps what async-openai's error type drops,
//! the `Retry-After` header of an error response.
//!
//! Chunks are read with async-openai's "bring your own type" stream (`create_stream_byot`)
//! into [`StreamChunk`], not into its typed `CreateChatCompletionStreamResponse`: that type has
//! no field for the reasoning deltas of OpenAI-compatible reasoning servers
//! (`delta.reasoning_content`, `delta.reasoning`) and would drop them silently, and it refuses
//! a chunk with a finish reason it does not know. async-openai still sends the request, parses
//! the SSE and ends the stream at `[DONE]`.
//!
//! A model whose `provider` is `anthropic` is served by [`anthropic`] instead; [`Upstream`]
//! dispatches, so the worker never knows which API it talks to.

mod anthropic;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use futures::{Stream, StreamExt};
use service_kit::config::{ModelSettings, Provider};
use stream_schema::{ErrorCode, FinishReason, Job, ModelId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod request;

/// Longest upstream error text carried into an `error` event (bodies can be whole HTML pages).
const MAX_ERROR_TEXT: usize = 300;

/// One piece of a streamed answer, in the producer's terms. Only the first choice of a chunk
/// is read (the producer asks for one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Answer text (never empty).
    Text(String),
    /// A fragment of a tool call; fragments of one call share `index`, and `id`/`name` come
    /// with its first fragment. Never empty: a fragment without id, name and arguments is
    /// dropped.
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments_fragment: String,
    },
    /// Reasoning text of a reasoning model (never empty).
    Reasoning(String),
    /// Token counts as the upstream reports them (the last chunk, with `include_usage`).
    Usage {
        prompt_tokens: u32,
        completion_tokens: u32,
        /// The reasoning part of `completion_tokens`, when reported.
        reasoning_tokens: Option<u32>,
    },
    /// Why the model stopped. The stream may still carry a usage chunk after it.
    Finish(FinishReason),
}

/// An open upstream answer: deltas in order, or the error that broke it. The stream ends when
/// the upstream closed it (with or without a finish reason: the caller tells which).
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, UpstreamError>> + Send>>;

/// Why an upstream call failed, as far as the client and the retry logic care.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, or the connection broke before the response began.
    #[error("upstream connection failed: {0}")]
    Connect(String),
    /// The upstream answered with an HTTP error status.
    #[error("upstream returned {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// The response's `Retry-After`, when it had one (seconds form).
        retry_after: Option<Duration>,
    },
    /// The stream broke, sent something unreadable, or ended without a finish reason.
    #[error("upstream stream failed: {0}")]
    Stream(String),
    /// No token within `first_token_timeout_ms`, or silence past `idle_timeout_ms`.
    #[error("upstream sent nothing for {waited_ms} ms ({phase})")]
    Timeout { phase: &'static str, waited_ms: u64 },
    #[error("no model `{0}` is configured in this producer")]
    UnknownModel(String),
    #[error("invalid upstream request: {0}")]
    Invalid(String),
}

impl UpstreamError {
    /// Whether the same request may succeed if the client tries again later.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Stream(_) | Self::Timeout { .. } => true,
            Self::Status { status, .. } => transient_status(*status),
            Self::UnknownModel(_) | Self::Invalid(_) => false,
        }
    }

    /// Whether the producer retries it itself, when it happens before the first token was
    /// written (connect errors, 429, 5xx, and a stream that broke before any token). Timeouts
    /// are not retried: the time is already spent, and another wait of the same length would
    /// hold the client for minutes.
    pub fn retried_before_first_token(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Stream(_) => true,
            Self::Status { status, .. } => transient_status(*status),
            Self::Timeout { .. } | Self::UnknownModel(_) | Self::Invalid(_) => false,
        }
    }

    /// How long the upstream asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The `code` of the client's `error` event.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Timeout { .. } => ErrorCode::UpstreamTimeout,
            _ => ErrorCode::UpstreamError,
        }
    }

    /// Label for the `producer_upstream_errors_total` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status { status, .. } if *status >= 500 => "server_error",
            Self::Status { .. } => "client_error",
            Self::Stream(_) => "stream",
            Self::Timeout { .. } => "timeout",
            Self::UnknownModel(_) => "unknown_model",
            Self::Invalid(_) => "invalid",
        }
    }

    fn from_openai(error: OpenAIError) -> Self {
        match error {
            OpenAIError::Boxed(boxed) => match boxed.downcast::<HttpStatusError>() {
                Ok(status) => Self::Status {
                    status: status.status,
                    message: status.message,
                    retry_after: status.retry_after,
                },
                Err(other) => Self::Stream(other.to_string()),
            },
            // Not reached with `UpstreamHttp` (it reports statuses itself); kept for clarity.
            OpenAIError::ApiError(response) => Self::Status {
                status: response.status_code.as_u16(),
                message: truncate(response.api_error.message),
                retry_after: None,
            },
            OpenAIError::Reqwest(error) => Self::Connect(error.to_string()),
            OpenAIError::StreamError(error) => Self::Stream(error.to_string()),
            // An in-stream `{"error": …}` object arrives as a chunk that does not parse.
            OpenAIError::JSONDeserialize(_, content) => {
                Self::Stream(truncate(error_message(content.as_bytes())))
            }
            OpenAIError::InvalidArgument(message) => Self::Invalid(message),
            other => Self::Stream(other.to_string()),
        }
    }

    /// An error read from an open stream: the connection was up, so a reqwest error is the
    /// stream breaking, not a failed connect.
    fn from_stream(error: OpenAIError) -> Self {
        match Self::from_openai(error) {
            Self::Connect(message) => Self::Stream(message),
            other => other,
        }
    }
}

/// 408, 429 and every 5xx may pass if tried again.
fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The message of an OpenAI error body (`{"error": {"message": …}}`), else the text itself.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// A non-success HTTP response, with the header async-openai's `ApiError` does not keep.
#[derive(Debug, thiserror::Error)]
#[error("upstream returned {status}: {message}")]
pub struct HttpStatusError {
    pub status: u16,
    pub message: String,
    pub retry_after: Option<Duration>,
}

/// The HTTP transport of every model client: one try per call, no retries, and error
/// responses turned into [`HttpStatusError`] with their `Retry-After`.
#[derive(Clone, Debug)]
pub struct UpstreamHttp {
    http: reqwest::Client,
}

type HttpFuture = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

impl tower::Service<HttpRequestFactory> for UpstreamHttp {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let http = self.http.clone();
        Box::pin(async move {
            let request = factory.build().await?;
            let response = http.execute(request).await?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            // Seconds only; the HTTP-date form is rare for APIs and falls back to our backoff.
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.bytes().await.unwrap_or_default();
            Err(OpenAIError::Boxed(Box::new(HttpStatusError {
                status: status.as_u16(),
                message: truncate(error_message(&body)),
                retry_after,
            })))
        })
    }
}

/// How the producer treats one model's upstream.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Policy {
    fn from_settings(settings: &ModelSettings) -> Self {
        Self {
            first_token_timeout: Duration::from_millis(settings.first_token_timeout_ms),
            idle_timeout: Duration::from_millis(settings.idle_timeout_ms),
            max_retries: settings.max_retries,
            retry_base: Duration::from_millis(settings.retry_base_ms),
            retry_max: Duration::from_millis(settings.retry_max_ms),
        }
    }

    /// Delay before retry number `retry` (1-based): `base · 2^(retry-1)` capped at `retry_max`,
    /// of which the upper half is random ("equal jitter"), so producers that failed together
    /// do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1_u32 << retry.saturating_sub(1).min(20));
        let capped = exp.min(self.retry_max);
        let half = capped / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let jitter = if jitter_ms == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(rand::random_range(0..=jitter_ms))
        };
        half + jitter
    }
}

/// The client of one model, by the API it speaks.
enum Api {
    OpenAi {
        client: Client<OpenAIConfig>,
        model: String,
    },
    Anthropic(anthropic::Messages),
}

/// One configured model.
pub struct Upstream {
    api: Api,
    pub policy: Policy,
    /// `models.<id>.max_concurrency` permits; `None` when unlimited. Held by a worker for the
    /// whole upstream call.
    limit: Option<Arc<Semaphore>>,
    /// `models.<id>.fallbacks`: where a request this model cannot serve goes next, in order.
    pub fallbacks: Vec<ModelId>,
}

impl Upstream {
    /// Waits for a free concurrency permit of this model (immediately when unlimited).
    pub async fn concurrency_permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.limit {
            Some(limit) => limit.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Sends the request once and returns the open stream of deltas.
    pub async fn open(&self, job: &Job) -> Result<DeltaStream, UpstreamError> {
        let (client, model) = match &self.api {
            Api::OpenAi { client, model } => (client, model),
            Api::Anthropic(messages) => return messages.open(job).await,
        };
        let request = request::build(model, job)?;
        let chunks = client
            .chat()
            .create_stream_byot::<_, StreamChunk>(request)
            .await
            .map_err(UpstreamError::from_openai)?;
        Ok(Box::pin(chunks.flat_map(|chunk| {
            let deltas = match chunk.map_err(UpstreamError::from_stream).and_then(deltas) {
                Ok(deltas) => deltas.into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            };
            futures::stream::iter(deltas)
        })))
    }
}

/// One `chat.completion.chunk`: only what the producer reads, every part optional, so that
/// OpenAI-compatible servers that leave fields out (or add their own) still parse.
#[derive(Debug, Default, serde::Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<StreamUsage>,
    /// An in-stream error object (`{"error": {"message": …}}`) instead of a chunk.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct StreamChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: StreamDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct StreamDelta {
    #[serde(default)]
    content: Option<String>,
    /// Reasoning as DeepSeek, vLLM (older releases) and others send it.
    #[serde(default)]
    reasoning_content: Option<String>,
    /// Reasoning as OpenRouter, Ollama and newer vLLM releases send it.
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallChunk>>,
}

#[derive(Debug, serde::Deserialize)]
struct ToolCallChunk {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionChunk>,
}

#[derive(Debug, serde::Deserialize)]
struct FunctionChunk {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct StreamUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, serde::Deserialize)]
struct CompletionTokensDetails {
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}

/// The deltas of one chunk, in the order the producer applies them: usage, then the first
/// choice's finish reason, reasoning, text and tool-call fragments. Empty text and reasoning,
/// and tool-call fragments that carry nothing, are dropped; an in-stream error object is the
/// stream's failure.
fn deltas(chunk: StreamChunk) -> Result<Vec<Delta>, UpstreamError> {
    if let Some(error) = chunk.error {
        let message = error["message"]
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err(UpstreamError::Stream(truncate(message)));
    }
    let mut out = Vec::new();
    if let Some(usage) = chunk.usage {
        out.push(Delta::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            reasoning_tokens: usage
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens),
        });
    }
    for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
        if let Some(reason) = choice.finish_reason {
            out.push(Delta::Finish(map_finish(&reason)));
        }
        let delta = choice.delta;
        // A server that sends both spellings sends the same text twice: take one.
        if let Some(reasoning) = delta
            .reasoning_content
            .filter(|r| !r.is_empty())
            .or(delta.reasoning.filter(|r| !r.is_empty()))
        {
            out.push(Delta::Reasoning(reasoning));
        }
        if let Some(content) = delta.content.filter(|c| !c.is_empty()) {
            out.push(Delta::Text(content));
        }
        for call in delta.tool_calls.unwrap_or_default() {
            let (name, arguments) = match call.function {
                Some(function) => (function.name, function.arguments.unwrap_or_default()),
                None => (None, String::new()),
            };
            if call.id.is_none() && name.is_none() && arguments.is_empty() {
                continue;
            }
            out.push(Delta::ToolCall {
                index: call.index,
                id: call.id,
                name,
                arguments_fragment: arguments,
            });
        }
    }
    Ok(out)
}

/// OpenAI's finish reasons; a value it does not document (some compatible servers send their
/// own, e.g. `eos`) is a normal stop.
fn map_finish(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        "tool_calls" => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// Clients for every configured model, built once at start.
pub struct Registry {
    models: HashMap<String, Upstream>,
}

impl Registry {
    pub fn new(models: &BTreeMap<String, ModelSettings>) -> anyhow::Result<Self> {
        let mut built = HashMap::new();
        for (id, settings) in models {
            // A missing key variable is fine for keyless upstreams (mock-llm, local servers);
            // a provider that needs one answers 401, which the client sees as an error event.
            let key = settings
                .api_key_env
                .as_deref()
                .and_then(|name| std::env::var(name).ok())
                .unwrap_or_default();
            let http = reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
                .timeout(Duration::from_secs(settings.request_timeout_secs))
                .build()?;
            let api = match settings.provider {
                Provider::OpenAi => {
                    let config = OpenAIConfig::new()
                        .with_api_base(settings.base_url.trim_end_matches('/'))
                        .with_api_key(key);
                    Api::OpenAi {
                        client: Client::with_config(config)
                            .with_http_service(UpstreamHttp { http }),
                        model: settings.upstream_model.clone(),
                    }
                }
                Provider::Anthropic => {
                    Api::Anthropic(anthropic::Messages::new(settings, http, key))
                }
            };
            built.insert(
                id.clone(),
                Upstream {
                    api,
                    policy: Policy::from_settings(settings),
                    limit: (settings.max_concurrency > 0)
                        .then(|| Arc::new(Semaphore::new(settings.max_concurrency))),
                    fallbacks: settings
                        .fallbacks
                        .iter()
                        .map(|id| ModelId::parse(id))
                        .collect::<Result<_, _>>()?,
                },
            );
        }
        Ok(Self { models: built })
    }

    pub fn get(&self, model: &str) -> Result<&Upstream, UpstreamError> {
        self.models
            .get(model)
            .ok_or_else(|| UpstreamError::UnknownModel(model.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            first_token_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_retries: 3,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1_000),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = policy();
        for _ in 0..50 {
            let first = p.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = p.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = p.backoff(30);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1_000));
        }
    }

    #[test]
    fn only_transient_failures_are_retried_or_retryable() {
        let status = |status| UpstreamError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        assert!(status(429).retried_before_first_token());
        assert!(status(503).retried_before_first_token());
        assert!(!status(400).retried_before_first_token());
        assert!(!status(401).retryable());
        assert!(status(500).retryable());
        let timeout = UpstreamError::Timeout {
            phase: "idle",
            waited_ms: 1,
        };
        assert!(timeout.retryable());
        assert!(!timeout.retried_before_first_token());
        assert_eq!(timeout.code(), ErrorCode::UpstreamTimeout);
    }

    #[test]
    fn error_text_is_the_api_message_and_bounded() {
        assert_eq!(
            error_message(br#"{"error":{"message":"slow down","type":"rate_limit"}}"#),
            "slow down"
        );
        assert_eq!(error_message(b" plain text "), "plain text");
        let long = truncate("é".repeat(400));
        assert!(long.len() <= MAX_ERROR_TEXT + '…'.len_utf8());
    }

    fn chunk(json: serde_json::Value) -> anyhow::Result<StreamChunk> {
        let base = serde_json::json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        });
        let mut merged = base;
        if let (Some(into), Some(from)) = (merged.as_object_mut(), json.as_object()) {
            into.extend(from.clone());
        }
        Ok(serde_json::from_value(merged)?)
    }

    fn deltas_of(json: serde_json::Value) -> anyhow::Result<Vec<Delta>> {
        Ok(deltas(chunk(json)?)?)
    }

    #[test]
    fn a_chunk_becomes_deltas_of_its_first_choice_only() -> anyhow::Result<()> {
        let deltas = deltas_of(serde_json::json!({
            "choices": [
                {"index": 1, "delta": {"content": "other"}, "finish_reason": null},
                {"index": 0, "delta": {"role": "assistant", "content": "Hi",
                    "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{\"a\""}}]},
                 "finish_reason": "tool_calls"},
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }))?;
        assert_eq!(
            deltas,
            vec![
                Delta::Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5,
                    reasoning_tokens: None,
                },
                Delta::Finish(FinishReason::ToolCalls),
                Delta::Text("Hi".to_owned()),
                Delta::ToolCall {
                    index: 0,
                    id: Some("call_1".to_owned()),
                    name: Some("f".to_owned()),
                    arguments_fragment: "{\"a\"".to_owned(),
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn tool_call_fragments_keep_index_id_and_name_exactly() -> anyhow::Result<()> {
        let deltas = deltas_of(serde_json::json!({
            "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 1, "id": "call_b", "type": "function",
                    "function": {"name": "lookup", "arguments": ""}},
                {"index": 0, "function": {"arguments": "\"x\": \"é\""}},
                {"index": 2, "function": {"arguments": ""}},
            ]}, "finish_reason": null}],
        }))?;
        assert_eq!(
            deltas,
            vec![
                Delta::ToolCall {
                    index: 1,
                    id: Some("call_b".to_owned()),
                    name: Some("lookup".to_owned()),
                    arguments_fragment: String::new(),
                },
                Delta::ToolCall {
                    index: 0,
                    id: None,
                    name: None,
                    arguments_fragment: "\"x\": \"é\"".to_owned(),
                },
            ],
            "an empty fragment of nothing is dropped"
        );
        Ok(())
    }

    #[test]
    fn reasoning_comes_from_either_spelling_and_its_tokens_from_usage() -> anyhow::Result<()> {
        let delta = |body: serde_json::Value| {
            deltas_of(serde_json::json!({
                "choices": [{"index": 0, "delta": body, "finish_reason": null}],
            }))
        };
        assert_eq!(
            delta(serde_json::json!({"reasoning_content": "Hmm", "content": ""}))?,
            vec![Delta::Reasoning("Hmm".to_owned())]
        );
        assert_eq!(
            delta(serde_json::json!({"reasoning": "So", "content": "A"}))?,
            vec![
                Delta::Reasoning("So".to_owned()),
                Delta::Text("A".to_owned())
            ]
        );
        assert_eq!(
            delta(serde_json::json!({"reasoning_content": "Same", "reasoning": "Same"}))?,
            vec![Delta::Reasoning("Same".to_owned())],
            "sent in both spellings, taken once"
        );
        assert!(delta(serde_json::json!({"reasoning_content": null, "reasoning": ""}))?.is_empty());
        let usage = deltas_of(serde_json::json!({
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 50, "total_tokens": 53,
                "completion_tokens_details": {"reasoning_tokens": 32}},
        }))?;
        assert_eq!(
            usage,
            vec![Delta::Usage {
                prompt_tokens: 3,
                completion_tokens: 50,
                reasoning_tokens: Some(32),
            }]
        );
        Ok(())
    }

    #[test]
    fn an_in_stream_error_object_fails_the_stream() -> anyhow::Result<()> {
        let error = deltas(chunk(serde_json::json!({
            "error": {"message": "overloaded", "type": "server_error"},
        }))?);
        assert!(
            matches!(&error, Err(UpstreamError::Stream(message)) if message == "overloaded"),
            "{error:?}"
        );
        Ok(())
    }

    #[test]
    fn empty_text_and_role_only_chunks_carry_no_delta() -> anyhow::Result<()> {
        let role_only = serde_json::json!({
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": null}],
        });
        assert!(deltas_of(role_only)?.is_empty());
        let length = serde_json::json!({
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        });
        assert_eq!(
            deltas_of(length)?,
            vec![Delta::Finish(FinishReason::Length)]
        );
        let unknown = serde_json::json!({
            "choices": [{"index": 0, "delta": {}, "finish_reason": "eos"}],
        });
        assert_eq!(deltas_of(unknown)?, vec![Delta::Finish(FinishReason::Stop)]);
        Ok(())
    }
}
