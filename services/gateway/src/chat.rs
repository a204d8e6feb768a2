//! `POST /api/chat/start`, `POST /api/chat/{requestId}/cancel` and `GET /api/models`.

use actix_web::{HttpRequest, HttpResponse, web};
use fred::prelude::*;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use stream_io::requests::StoredMeta;
use stream_io::session::RequestStreams;
use stream_schema::job::RequestMeta;
use stream_schema::message::{ResponseFormat, Stop, Tool, ToolChoice};
use stream_schema::{
    ChatMessage, ChatOptions, ConnectionId, ErrorCode, Job, ModelId, RequestId, Reservation, Role,
    SessionEvent, SessionId, TenantId,
};
use tracing::Instrument;
use utoipa::ToSchema;

use crate::auth::{Caller, KeyId};
use crate::error::{ApiError, ErrorBody};
use crate::idempotency::{self, Idempotency};
use crate::limits::Admission;
use crate::state::{AppState, SharedState};
use crate::stream_token::Scope;

/// A chat to start: one prompt (or a conversation) for one model in one session. Field names
/// are camelCase; the OpenAI spellings (`tool_choice`, `response_format`, `top_p`,
/// `max_tokens`) are accepted too, and message objects keep OpenAI's field names.
// Every field is an `Option` so that a missing one is reported by name (`400`) rather than as a
// generic JSON error; the `#[schema]` attributes say what is required.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({
    "sessionId": "user_123",
    "modelId": "gpt-4",
    "prompt": "Tell me a story about a dragon"
}))]
pub(crate) struct StartChatBody {
    /// Anything but 1–128 chars of `[A-Za-z0-9_.:-]` is `400 invalid_session_id`.
    #[schema(required = true, value_type = SessionId)]
    session_id: Option<String>,
    /// Must be a configured model (`GET /api/models`), else `404 unknown_model`.
    #[schema(required = true, value_type = ModelId)]
    model_id: Option<String>,
    /// One user message. Give either `prompt` or `messages`, not both, and not only
    /// whitespace (`400 invalid_request`).
    prompt: Option<String>,
    /// The conversation, instead of `prompt`, in OpenAI's shape: roles `system`, `user`,
    /// `assistant` (with `tool_calls`) and `tool` (with `tool_call_id`); content a string or
    /// parts (`text`, `image_url` in user messages), passed through as given. An unknown role
    /// or part, a `tool` message without `tool_call_id`, or a message without content is
    /// `400 invalid_request` naming the message (`messages[2]: …`).
    #[schema(min_items = 1, value_type = Option<Vec<ChatMessage>>)]
    messages: Option<Vec<serde_json::Value>>,
    /// Upper bound on generated tokens: 1 to `limits.max_tokens_cap` (32768 by default).
    #[schema(minimum = 1)]
    #[serde(alias = "max_tokens")]
    max_tokens: Option<u32>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    temperature: Option<f32>,
    /// Functions the model may call (at most `limits.max_tools`, 128 by default, else `400`;
    /// at most `limits.max_tools_bytes` of JSON, else `413`). Names are 1-64 characters of
    /// `[A-Za-z0-9_-]`, distinct. The calls stream as `tool_call` events.
    #[schema(value_type = Option<Vec<Tool>>)]
    tools: Option<Vec<serde_json::Value>>,
    /// `"none"`, `"auto"`, `"required"`, or `{"type": "function", "function": {"name": …}}`
    /// naming one of `tools`.
    #[schema(value_type = Option<ToolChoice>)]
    #[serde(alias = "tool_choice")]
    tool_choice: Option<serde_json::Value>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"name": …, "schema": {…}, "strict": true}}`.
    #[schema(value_type = Option<ResponseFormat>)]
    #[serde(alias = "response_format")]
    response_format: Option<serde_json::Value>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    #[serde(alias = "top_p")]
    top_p: Option<f32>,
    /// Up to 4 sequences where the model stops: a string or a list.
    #[schema(value_type = Option<Stop>)]
    stop: Option<serde_json::Value>,
    /// Best-effort determinism, for upstreams that support it.
    seed: Option<i64>,
}

/// A start request that passed validation: every value is safe to use in keys and jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct StartChat {
    pub session_id: SessionId,
    pub model_id: ModelId,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub options: ChatOptions,
}

/// Reads one part of the body that was kept as JSON so that its error names where it is.
fn typed<T: serde::de::DeserializeOwned>(
    what: &str,
    value: serde_json::Value,
) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| ApiError::InvalidRequest(format!("{what}: {e}")))
}

impl StartChat {
    /// Parses and validates a start body against the configured limits and models.
    pub fn parse(body: &[u8], state: &AppState) -> Result<Self, ApiError> {
        let limits = &state.settings.limits;
        // Syntax first: reading straight into the struct stops at the first wrong type, so
        // `0:` would be `invalid_request` instead of malformed JSON.
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| ApiError::InvalidJson(e.to_string()))?;
        // Serde also reads a struct from a JSON array (`["s", "mock", "hi"]`); only the
        // documented object form is the API.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::InvalidRequest(
                "the body must be a JSON object".to_owned(),
            ));
        }
        let body: StartChatBody =
            serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        let raw_session = body
            .session_id
            .ok_or_else(|| ApiError::InvalidSessionId("is required".to_owned()))?;
        let session_id = SessionId::parse(&raw_session)
            .map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
        let raw_model = body
            .model_id
            .ok_or_else(|| ApiError::InvalidRequest("modelId is required".to_owned()))?;
        let model_id = state
            .models
            .get(&raw_model)
            .cloned()
            .ok_or(ApiError::UnknownModel(truncate(&raw_model, 64)))?;
        let messages = match (body.prompt, body.messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::InvalidRequest(
                    "give either prompt or messages, not both".to_owned(),
                ));
            }
            (Some(prompt), None) => vec![ChatMessage::text(Role::User, prompt)],
            (None, Some(messages)) => {
                // Counted before they are read: a huge list is refused without the work.
                if messages.len() > limits.max_messages {
                    return Err(ApiError::PayloadTooLarge(format!(
                        "at most {} messages",
                        limits.max_messages
                    )));
                }
                let mut typed_messages = Vec::with_capacity(messages.len());
                for (i, message) in messages.into_iter().enumerate() {
                    let message: ChatMessage = typed(&format!("messages[{i}]"), message)?;
                    message
                        .check()
                        .map_err(|e| ApiError::InvalidRequest(format!("messages[{i}]: {e}")))?;
                    typed_messages.push(message);
                }
                typed_messages
            }
            (None, None) => {
                return Err(ApiError::InvalidRequest(
                    "prompt or messages is required".to_owned(),
                ));
            }
        };
        if messages.iter().all(ChatMessage::is_blank) {
            return Err(ApiError::InvalidRequest("the prompt is empty".to_owned()));
        }
        let prompt_bytes: usize = messages.iter().map(ChatMessage::size).sum();
        if prompt_bytes > limits.max_prompt_bytes {
            return Err(ApiError::PayloadTooLarge(format!(
                "the prompt is over {} bytes",
                limits.max_prompt_bytes
            )));
        }
        if let Some(max_tokens) = body.max_tokens
            && (max_tokens == 0 || max_tokens > limits.max_tokens_cap)
        {
            return Err(ApiError::InvalidRequest(format!(
                "maxTokens must be between 1 and {}",
                limits.max_tokens_cap
            )));
        }
        if let Some(temperature) = body.temperature
            && !(0.0..=2.0).contains(&temperature)
        {
            return Err(ApiError::InvalidRequest(
                "temperature must be between 0 and 2".to_owned(),
            ));
        }
        let options = ChatOptions {
            tools: tools(body.tools, limits)?,
            tool_choice: body
                .tool_choice
                .map(|choice| typed::<ToolChoice>("tool_choice", choice))
                .transpose()?,
            response_format: body
                .response_format
                .map(|format| typed::<ResponseFormat>("response_format", format))
                .transpose()?,
            top_p: body.top_p,
            stop: body
                .stop
                .map(|stop| typed::<Stop>("stop", stop))
                .transpose()?
                .map(Stop::into_vec)
                .unwrap_or_default(),
            seed: body.seed,
        };
        options
            .check()
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        Ok(Self {
            session_id,
            model_id,
            messages,
            max_tokens: body.max_tokens,
            temperature: body.temperature,
            options,
        })
    }
}

/// The request's tools within `limits.max_tools` (`400`, as chat APIs answer) and
/// `limits.max_tools_bytes` of JSON (`413`, like every other size limit).
fn tools(
    tools: Option<Vec<serde_json::Value>>,
    limits: &service_kit::config::LimitsSettings,
) -> Result<Vec<Tool>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > limits.max_tools {
        return Err(ApiError::InvalidRequest(format!(
            "at most {} tools",
            limits.max_tools
        )));
    }
    let bytes: usize = tools.iter().map(|tool| tool.to_string().len()).sum();
    if bytes > limits.max_tools_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the tools are over {} bytes",
            limits.max_tools_bytes
        )));
    }
    tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| typed(&format!("tools[{i}]"), tool))
        .collect()
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Reads the body up to the configured limit: a larger body is 413 before it is buffered.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidRequest(format!("reading body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "the body is over {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StartChatResponse {
    request_id: RequestId,
    /// The id of the SSE connection opened with `streamUrl` (which carries it): that
    /// connection is listed under it in `GET /api/sessions/{sessionId}/connections`. A second
    /// connection with the same URL while the first is open gets a fresh id; a reconnect after
    /// it closed gets this one back.
    #[schema(value_type = String, example = "sse_01936f0e8d2a7c3b9f001a2b3c4d5e6f")]
    connection_id: ConnectionId,
    session_id: SessionId,
    model_id: ModelId,
    /// Always `connected`.
    #[schema(value_type = String, example = "connected")]
    status: &'static str,
    /// Relative URL of this request's event stream, token included.
    #[schema(
        example = "/api/sse/stream/user_123?requestId=01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f&token=k1.1703127056.team-a.01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f.c2ln"
    )]
    stream_url: String,
    /// Opens this request's stream (`token` query or `Authorization: Bearer`) until it expires.
    stream_token: String,
}

/// Starts a chat: validates the body, applies the rate limits, writes the request's `start`
/// event and queues the job for a producer.
#[utoipa::path(
    post, path = "/api/chat/start", tag = "chat", operation_id = "startChat",
    request_body(content = StartChatBody, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Optional, 1-255 visible \
        ASCII characters: a retried start with the same key and body returns the same response \
        and starts nothing new")),
    responses(
        (status = 200, description = "Queued; open `streamUrl` for its events",
            body = StartChatResponse, links(
                ("cancel" = (operation_id = "cancelChat",
                    parameters(("requestId" = "$response.body#/requestId")))),
                ("sessionStreamToken" = (operation_id = "issueSessionStreamToken",
                    parameters(("sessionId" = "$response.body#/sessionId")))),
                ("connections" = (operation_id = "listSessionConnections",
                    parameters(("sessionId" = "$response.body#/sessionId")))),
            )),
        (status = 400, description = "`invalid_json` (malformed JSON), `invalid_request` (wrong \
            field types, no or empty prompt, both prompt and messages, an unknown role or \
            content part, a tool message without tool_call_id, more than `limits.max_tools` \
            tools, an invalid or duplicate tool name, a toolChoice naming no declared tool, \
            maxTokens, temperature or topP out of range, more than 4 stop sequences) or \
            `invalid_session_id`", body = ErrorBody),
        crate::error::ApiKeyRefused,
        (status = 404, description = "`unknown_model`: modelId is not configured",
            body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the Idempotency-Key was used with \
            another body, or its first start is still running", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: body, prompt, message count or tools \
            size over the configured limits", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over a request or token limit of the API \
            key or session", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until a retry can be admitted"))),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn start(
    state: web::Data<SharedState>,
    key: Result<Caller, ApiError>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let json = start_counted(&state, key, &req, payload, |body| Ok(body.to_vec())).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(json))
}

/// The one start path of every API that starts chats (`/api/chat/start`,
/// `/v1/chat/completions`): `native` turns the request body into a `/api/chat/start` body
/// (its errors count as refused starts), after which auth, limits, quotas, idempotency and
/// tenant rules apply exactly alike. Returns the start response JSON.
pub(crate) async fn start_counted(
    state: &AppState,
    key: Result<Caller, ApiError>,
    req: &HttpRequest,
    payload: web::Payload,
    native: impl FnOnce(&[u8]) -> Result<Vec<u8>, ApiError>,
) -> Result<String, ApiError> {
    let started = start_chat(state, key, req, payload, native).await;
    // The one place that counts starts, by outcome.
    let outcome = match &started {
        Ok(Started::New(_)) => "started",
        Ok(Started::Replayed(_)) => "replayed",
        Err(Counted::Yes(error)) => error.code(),
        Err(Counted::No(_)) => "",
    };
    if !outcome.is_empty() {
        metrics::counter!("gateway_chats_started_total", "outcome" => outcome).increment(1);
    }
    match started {
        Ok(Started::New(json) | Started::Replayed(json)) => Ok(json),
        Err(Counted::Yes(error) | Counted::No(error)) => Err(error),
    }
}

/// A start's response JSON.
enum Started {
    New(String),
    /// The stored response of an earlier start with the same `Idempotency-Key`.
    Replayed(String),
}

/// A failed start, and whether `gateway_chats_started_total` counts it: errors reading the
/// body or the `Idempotency-Key` are not starts and are not counted.
enum Counted {
    Yes(ApiError),
    No(ApiError),
}

async fn start_chat(
    state: &AppState,
    caller: Result<Caller, ApiError>,
    req: &HttpRequest,
    payload: web::Payload,
    native: impl FnOnce(&[u8]) -> Result<Vec<u8>, ApiError>,
) -> Result<Started, Counted> {
    let caller = caller.map_err(Counted::Yes)?;
    let key = caller.key.clone();
    let body = read_body(payload, state.settings.limits.max_body_bytes)
        .await
        .map_err(Counted::No)?;
    let body = native(&body).map_err(Counted::Yes)?;
    let mut chat = StartChat::parse(&body, state).map_err(Counted::Yes)?;
    // From here on the session is the tenant's: every key, job and record holds the stored
    // id; the client sees its own id in the response and the `start` event.
    let client_session = chat.session_id.clone();
    chat.session_id = caller.session(&client_session);
    let span = tracing::info_span!(
        "chat.start",
        session_id = %chat.session_id,
        model_id = %chat.model_id,
        key_id = %key.0
    );
    // A retried start with the same Idempotency-Key and body gets the first response and
    // starts nothing (nor counts against the rate limits).
    let claim = match idempotency::header(req).map_err(Counted::No)? {
        None => None,
        Some(idempotency_key) => {
            match idempotency::begin(state.client(), &key.0, &idempotency_key, &body)
                .await
                .map_err(Counted::No)?
            {
                Idempotency::Replay(response) => return Ok(Started::Replayed(response)),
                Idempotency::Fresh(claim) => Some(claim),
            }
        }
    };
    let result = match admit(state, &chat, &key).instrument(span.clone()).await {
        Ok(reservation) => {
            enqueue(
                state,
                chat,
                key,
                (&caller.tenant, client_session),
                reservation,
            )
            .instrument(span)
            .await
        }
        Err(error) => Err(error),
    };
    let response = result.and_then(|response| {
        serde_json::to_string(&response).map_err(|error| {
            tracing::error!(%error, "cannot serialize a start response");
            ApiError::Internal
        })
    });
    if let Some(claim) = claim {
        match &response {
            Ok(json) => claim
                .complete(state.client(), json)
                .await
                .map_err(Counted::Yes)?,
            Err(_) => claim.release(state.client()).await,
        }
    }
    response.map(Started::New).map_err(Counted::Yes)
}

/// Applies the rate limits; a refusal is `429 rate_limited` with an honest `Retry-After`.
async fn admit(
    state: &AppState,
    chat: &StartChat,
    key: &KeyId,
) -> Result<Option<Reservation>, ApiError> {
    let limits = &state.settings.limits;
    let tpm = limits.tokens_per_window_for(&key.0);
    if tpm > 0 && u64::from(chat.max_tokens.unwrap_or(limits.default_token_estimate)) > tpm {
        return Err(ApiError::InvalidRequest(format!(
            "maxTokens is larger than this API key's limit of {tpm} tokens per window"
        )));
    }
    let member = uuid::Uuid::now_v7().to_string();
    match state
        .limiter
        .admit(
            state.client(),
            limits,
            &key.0,
            &chat.session_id,
            chat.max_tokens,
            &member,
        )
        .await?
    {
        Admission::Admitted(reservation) => Ok(reservation),
        Admission::Refused(refusal) => {
            tracing::info!(key_id = %key.0, session_id = %chat.session_id, limit = refusal.limit, "rate limited");
            Err(ApiError::RateLimited {
                message: format!("over the {}", refusal.limit),
                retry_after_secs: refusal.retry_after_secs,
            })
        }
    }
}

/// `chat.session_id` is the stored id; `client` is the caller's tenant and its own id of the
/// session, what the response and the `start` event show.
async fn enqueue(
    state: &AppState,
    chat: StartChat,
    key: KeyId,
    client: (&TenantId, SessionId),
    reservation: Option<Reservation>,
) -> Result<StartChatResponse, ApiError> {
    let (tenant, client_session) = client;
    let request_id = RequestId::new();
    let now = stream_schema::now_millis();
    let retention = state.retention();
    let streams = RequestStreams::new(&chat.session_id, &chat.model_id, &request_id, retention);
    let client = state.client();

    let start = SessionEvent::Start {
        request_id,
        session_id: client_session.clone(),
        model_id: chat.model_id.clone(),
        attempt: 1,
        timestamp: now,
    };
    let start_entry = state
        .scripts
        .start(client, &streams.stream, &streams.owner, &start, retention)
        .await?;

    let meta = RequestMeta {
        session_id: chat.session_id.clone(),
        model_id: chat.model_id.clone(),
        start_entry,
        key_id: key.0.clone(),
        reservation,
        traceparent: service_kit::telemetry::current_traceparent(),
    };
    let job = Job {
        request_id,
        session_id: chat.session_id.clone(),
        model_id: chat.model_id.clone(),
        messages: chat.messages,
        max_tokens: chat.max_tokens,
        temperature: chat.temperature,
        options: chat.options,
        enqueued_at: now,
        traceparent: service_kit::telemetry::current_traceparent(),
        token_cap: reservation
            .filter(|_| chat.max_tokens.is_none() && state.settings.limits.hard_token_cap)
            .map(|r| r.tokens),
    };
    let queued = stream_io::requests::enqueue(
        client,
        &meta,
        &job,
        retention.ttl_secs,
        state.settings.streams.requests_maxlen,
    )
    .await;
    if let Err(error) = queued
        && !queued_after_all(client, &request_id, &error).await
    {
        // The start event is out but no producer will ever see the job: end the stream so a
        // waiting client is not left hanging.
        let failed = SessionEvent::Error {
            request_id,
            code: ErrorCode::Unavailable,
            message: "the request could not be queued".to_owned(),
            retryable: true,
            timestamp: stream_schema::now_millis(),
        };
        let _ = state
            .scripts
            .append(client, &streams, 1, &failed, false)
            .await;
        return Err(error.into());
    }

    tracing::info!(
        session_id = %chat.session_id,
        model_id = %chat.model_id,
        request_id = %request_id,
        key_id = %key.0,
        "chat started"
    );
    let stream_token = state.stream_tokens.issue(
        tenant,
        &client_session,
        Scope::Request(request_id),
        &key.0,
        now / 1000,
    );
    // Tokens are URL-safe (base64url, digits, ids of [A-Za-z0-9_-], '.'): no escaping needed.
    let connection_id = ConnectionId::new();
    let stream_url = format!(
        "/api/sse/stream/{client_session}?requestId={request_id}&connectionId={connection_id}&token={stream_token}"
    );
    Ok(StartChatResponse {
        request_id,
        connection_id,
        session_id: client_session,
        model_id: chat.model_id,
        status: "connected",
        stream_url,
        stream_token,
    })
}

/// Whether a job whose enqueue failed with `error` is queued all the same: a reply that timed
/// out may belong to a pipeline Redis ran. Answering 503 (and ending the stream) then would
/// leave a request running that its client was told had failed, and analytics counting a
/// start that never finishes. When Redis cannot say, the start fails as before.
async fn queued_after_all(
    client: &Client,
    request_id: &RequestId,
    error: &stream_io::StreamIoError,
) -> bool {
    match stream_io::requests::meta_exists(client, request_id).await {
        Ok(true) => {
            tracing::warn!(%request_id, %error, "the enqueue reply was lost, but the job is queued");
            metrics::counter!("gateway_enqueue_replies_lost_total").increment(1);
            true
        }
        Ok(false) | Err(_) => false,
    }
}

/// Looks up a request's session and model from its id.
pub async fn request_meta(
    client: &Client,
    request_id: &RequestId,
) -> Result<Option<RequestMeta>, ApiError> {
    match stream_io::requests::load_meta(client, request_id).await? {
        StoredMeta::Found(meta) => Ok(Some(meta)),
        StoredMeta::Missing => Ok(None),
        StoredMeta::Undecodable(error) => {
            tracing::error!(%request_id, %error, "undecodable request metadata");
            Err(ApiError::Internal)
        }
    }
}

/// What `POST /api/chat/{requestId}/cancel` answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CancelResponse {
    request_id: RequestId,
    /// Always `cancelling`: the stream ends with `complete`/`cancelled` within about 1 s.
    #[schema(value_type = String, example = "cancelling")]
    status: &'static str,
}

/// Asks the producer to stop a request (only the API key that started it may: key ids are
/// unique across tenants, so another tenant's request answers exactly as an unknown one).
#[utoipa::path(
    post, path = "/api/chat/{requestId}/cancel", tag = "chat", operation_id = "cancelChat",
    params(("requestId" = String, Path, description = "The `requestId` of a start response")),
    responses(
        (status = 202, description = "Cancel requested", body = CancelResponse),
        crate::error::ApiKeyRefused,
        (status = 404, description = "`not_found`: no such request for this API key (also for \
            ids that are not request ids)", body = ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn cancel(
    state: web::Data<SharedState>,
    key_id: KeyId,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let request_id =
        RequestId::parse(&path).map_err(|_| ApiError::NotFound("unknown requestId".to_owned()))?;
    let client = state.client();
    // Another key's request is reported as unknown: its existence is not leaked.
    let meta = request_meta(client, &request_id)
        .await?
        .filter(|meta| meta.key_id == key_id.0)
        .ok_or_else(|| ApiError::NotFound("unknown requestId".to_owned()))?;
    stream_io::cancel::request(
        client,
        &meta.session_id,
        &request_id,
        state.settings.streams.session_ttl_secs,
    )
    .await?;
    tracing::info!(%request_id, session_id = %meta.session_id, "cancel requested");
    Ok(HttpResponse::Accepted().json(CancelResponse {
        request_id,
        status: "cancelling",
    }))
}

/// What `GET /api/models` answers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ModelList {
    models: Vec<ModelInfo>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ModelInfo {
    /// A valid `modelId` for `POST /api/chat/start`.
    #[schema(example = "gpt-4")]
    id: String,
}

/// The configured models. Needs no key: model ids are not secret and the demo page lists them.
#[utoipa::path(
    get, path = "/api/models", tag = "chat", operation_id = "listModels",
    responses((status = 200, description = "The configured models", body = ModelList)),
)]
pub async fn models(state: web::Data<SharedState>) -> HttpResponse {
    let models = state
        .models
        .keys()
        .map(|id| ModelInfo { id: id.clone() })
        .collect();
    HttpResponse::Ok().json(ModelList { models })
}
