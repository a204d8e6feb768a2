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
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
    CreateChatCompletionStreamResponse, FinishReason as OpenAiFinish,
};
use futures::{Stream, StreamExt};
use service_kit::config::{ModelSettings, Provider};
use stream_schema::{ChatMessage, ErrorCode, FinishReason, Job, ModelId, Role};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest upstream error text carried into an `error` event (bodies can be whole HTML pages).
const MAX_ERROR_TEXT: usize = 300;

/// One piece of a streamed answer, in the producer's terms. Only the first choice of a chunk
/// is read (the producer asks for one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Answer text (never empty).
    Text(String),
    /// A fragment of a tool call; fragments of one call share `index`, and `id`/`name` come
    /// with its first fragment. Not forwarded to clients yet.
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments_fragment: String,
    },
    /// Reasoning text of a reasoning model. No upstream produces it yet.
    Reasoning(String),
    /// Token counts as the upstream reports them (the last chunk, with `include_usage`).
    Usage {
        prompt_tokens: u32,
        completion_tokens: u32,
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
        let request = build_request(model, job)?;
        let chunks = client
            .chat()
            .create_stream(request)
            .await
            .map_err(UpstreamError::from_openai)?;
        Ok(Box::pin(chunks.flat_map(|chunk| {
            let deltas = match chunk {
                Ok(chunk) => deltas(chunk).into_iter().map(Ok).collect(),
                Err(error) => vec![Err(UpstreamError::from_stream(error))],
            };
            futures::stream::iter(deltas)
        })))
    }
}

/// The deltas of one chunk, in the order the producer applies them: usage, then the first
/// choice's finish reason, text and tool-call fragments. Empty text is dropped.
fn deltas(chunk: CreateChatCompletionStreamResponse) -> Vec<Delta> {
    let mut out = Vec::new();
    if let Some(usage) = chunk.usage {
        out.push(Delta::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        });
    }
    for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
        if let Some(reason) = choice.finish_reason {
            out.push(Delta::Finish(map_finish(reason)));
        }
        if let Some(content) = choice.delta.content.filter(|c| !c.is_empty()) {
            out.push(Delta::Text(content));
        }
        for call in choice.delta.tool_calls.unwrap_or_default() {
            let (name, arguments) = match call.function {
                Some(function) => (function.name, function.arguments.unwrap_or_default()),
                None => (None, String::new()),
            };
            out.push(Delta::ToolCall {
                index: call.index,
                id: call.id,
                name,
                arguments_fragment: arguments,
            });
        }
    }
    out
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

fn to_openai(message: &ChatMessage) -> ChatCompletionRequestMessage {
    let content = message.content.clone();
    match message.role {
        Role::System => ChatCompletionRequestSystemMessage {
            content: content.into(),
            name: None,
        }
        .into(),
        Role::User => ChatCompletionRequestUserMessage {
            content: content.into(),
            name: None,
        }
        .into(),
        Role::Assistant => ChatCompletionRequestAssistantMessage {
            content: Some(content.into()),
            ..Default::default()
        }
        .into(),
    }
}

fn build_request(model: &str, job: &Job) -> Result<CreateChatCompletionRequest, UpstreamError> {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(model)
        .messages(job.messages.iter().map(to_openai).collect::<Vec<_>>())
        .stream(true)
        // Always ask for usage; when the upstream ignores it the producer counts tokens.
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            ..Default::default()
        });
    if let Some(max_tokens) = job.max_tokens {
        // `max_tokens` (not `max_completion_tokens`): it is what most OpenAI-compatible
        // servers read.
        args.max_tokens(max_tokens);
    }
    if let Some(temperature) = job.temperature {
        args.temperature(temperature);
    }
    args.build()
        .map_err(|e| UpstreamError::Invalid(e.to_string()))
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

    fn chunk(json: serde_json::Value) -> anyhow::Result<CreateChatCompletionStreamResponse> {
        let base = serde_json::json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        });
        let mut merged = base;
        if let (Some(into), Some(from)) = (merged.as_object_mut(), json.as_object()) {
            into.extend(from.clone());
        }
        Ok(serde_json::from_value(merged)?)
    }

    #[test]
    fn a_chunk_becomes_deltas_of_its_first_choice_only() -> anyhow::Result<()> {
        let deltas = deltas(chunk(serde_json::json!({
            "choices": [
                {"index": 1, "delta": {"content": "other"}, "finish_reason": null},
                {"index": 0, "delta": {"role": "assistant", "content": "Hi",
                    "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{\"a\""}}]},
                 "finish_reason": "tool_calls"},
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }))?);
        assert_eq!(
            deltas,
            vec![
                Delta::Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5
                },
                Delta::Finish(FinishReason::Stop),
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
    fn empty_text_and_role_only_chunks_carry_no_delta() -> anyhow::Result<()> {
        let role_only = chunk(serde_json::json!({
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": null}],
        }))?;
        assert!(deltas(role_only).is_empty());
        let length = chunk(serde_json::json!({
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        }))?;
        assert_eq!(deltas(length), vec![Delta::Finish(FinishReason::Length)]);
        Ok(())
    }
}
