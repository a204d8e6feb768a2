//! The model registry: one async-openai client per configured model, and the streaming call
//! with its errors classified for the client (`retryable`) and for metrics.

use std::collections::HashMap;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionResponseStream, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use service_kit::config::ModelSettings;
use stream_schema::{ChatMessage, Job, Role};

/// Why an upstream call failed, as far as the client and the retry logic care.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, or the connection broke.
    #[error("upstream connection failed: {0}")]
    Connect(String),
    /// The upstream answered with an HTTP error status.
    #[error("upstream returned {status}: {message}")]
    Status { status: u16, message: String },
    /// The stream broke or sent something unreadable.
    #[error("upstream stream failed: {0}")]
    Stream(String),
    #[error("no model `{0}` is configured in this producer")]
    UnknownModel(String),
    #[error("invalid upstream request: {0}")]
    Invalid(String),
}

impl UpstreamError {
    /// Whether the same request may succeed if tried again later.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Stream(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::UnknownModel(_) | Self::Invalid(_) => false,
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
            Self::UnknownModel(_) => "unknown_model",
            Self::Invalid(_) => "invalid",
        }
    }

    fn from_openai(error: OpenAIError) -> Self {
        match error {
            OpenAIError::ApiError(response) => Self::Status {
                status: response.status_code.as_u16(),
                message: response.api_error.message,
            },
            OpenAIError::Reqwest(error) => Self::Connect(error.to_string()),
            OpenAIError::StreamError(error) => Self::Stream(error.to_string()),
            OpenAIError::JSONDeserialize(error, _) => Self::Stream(error.to_string()),
            OpenAIError::InvalidArgument(message) => Self::Invalid(message),
            other => Self::Stream(other.to_string()),
        }
    }

    pub fn from_stream(error: OpenAIError) -> Self {
        match Self::from_openai(error) {
            Self::Connect(message) => Self::Stream(message),
            other => other,
        }
    }
}

struct Upstream {
    client: Client<OpenAIConfig>,
    model: String,
}

/// Clients for every configured model, built once at start.
pub struct Registry {
    models: HashMap<String, Upstream>,
}

impl Registry {
    pub fn new(models: &std::collections::BTreeMap<String, ModelSettings>) -> anyhow::Result<Self> {
        let mut built = HashMap::new();
        for (id, settings) in models {
            // A missing key variable is fine for keyless upstreams (mock-llm, local servers);
            // a provider that needs one answers 401, which the client sees as an error event.
            let key = settings
                .api_key_env
                .as_deref()
                .and_then(|name| std::env::var(name).ok())
                .unwrap_or_default();
            let config = OpenAIConfig::new()
                .with_api_base(settings.base_url.trim_end_matches('/'))
                .with_api_key(key);
            let http = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(settings.request_timeout_secs))
                .build()?;
            built.insert(
                id.clone(),
                Upstream {
                    client: Client::with_config(config).with_http_client(http),
                    model: settings.upstream_model.clone(),
                },
            );
        }
        Ok(Self { models: built })
    }

    /// Opens the upstream stream for a job.
    pub async fn stream(&self, job: &Job) -> Result<ChatCompletionResponseStream, UpstreamError> {
        let upstream = self
            .models
            .get(job.model_id.as_str())
            .ok_or_else(|| UpstreamError::UnknownModel(job.model_id.to_string()))?;
        let request = build_request(&upstream.model, job)?;
        upstream
            .client
            .chat()
            .create_stream(request)
            .await
            .map_err(UpstreamError::from_openai)
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
