//! `POST /api/chat`, `GET /api/chat/{id}/stream` and `POST /api/chat/{id}/stop`: the AI SDK's
//! chat transport (`useChat` with `DefaultChatTransport`, `resume: true`) over the same start
//! path and the same Redis streams as the native API. The chat id is the session.

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stream_schema::job::RequestMeta;
use stream_schema::{RequestId, SessionEvent, SessionId};
use utoipa::ToSchema;

use super::messages::native_body;
use super::parts::{UiMessageView, error_end};
use crate::auth::Caller;
use crate::chat::{request_meta, start_counted};
use crate::error::{ApiError, ErrorBody};
use crate::hub::Frame;
use crate::state::{AppState, SharedState};
use crate::streams::{Dialect, Rendered, spawn_request_delivery, sse_response};

/// The headers of a UI message stream (the `ai` package's `UI_MESSAGE_STREAM_HEADERS`).
fn ui_stream_response() -> actix_web::HttpResponseBuilder {
    let mut response = sse_response();
    response.insert_header(("x-vercel-ai-ui-message-stream", "v1"));
    response
}

/// The body `useChat`'s default transport sends, for the API description. It is read as a
/// `POST /api/chat/start` body after the mapping of `aisdk::messages`: `id` is the session,
/// `model` (else `gateway.default_model`, else the first configured model) the model; the other fields of the transport's
/// `body` are ignored except the start options (`maxTokens`, `temperature`, `tools`,
/// `toolChoice`, `responseFormat`, `topP`, `stop`, `seed`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct UiChatBody {
    /// The chat id: the session (1–128 of `[A-Za-z0-9_.:-]`, else `400 invalid_session_id`).
    id: String,
    /// UI messages (`id`, `role`, `parts`). `text` parts are the content, `file` parts with
    /// an image media type images of a user message; an assistant message's `tool-*` and
    /// `dynamic-tool` parts with their input become tool calls, and their outputs `tool`
    /// messages; `reasoning` and other parts are not sent to the model.
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Value>,
    /// `submit-message` or `regenerate-message` (the messages already end where the answer
    /// goes).
    trigger: Option<String>,
    /// Ignored: the answer's message id is its request id.
    message_id: Option<String>,
    /// A configured model id, else `404 unknown_model`; default: `gateway.default_model`, else the first configured model.
    model: Option<String>,
}

/// The parts of a start response this API uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartedIds {
    request_id: RequestId,
}

/// Starts an answer of a chat and streams it as UI message parts.
#[utoipa::path(
    post, path = "/api/chat", tag = "aisdk", operation_id = "aiSdkChat",
    request_body(content = UiChatBody, content_type = "application/json"),
    responses(
        (status = 200, description = "A UI message stream (v1): `data: {part}` messages — \
            `start` (`messageId`: the request id), `start-step`, `text-start`/`text-delta`/\
            `text-end`, `reasoning-start`/`reasoning-delta`/`reasoning-end`, \
            `tool-input-start`/`tool-input-delta`/`tool-input-available`, `finish-step`, \
            `finish` (`finishReason`), or `abort` (stopped) or `error` (`errorText`) — then \
            `data: [DONE]`. Closing the connection does not stop the answer: \
            `GET /api/chat/{id}/stream` picks it up.",
            content_type = "text/event-stream", body = String, headers(
                ("x-vercel-ai-ui-message-stream" = String, description = "`v1`"),
                ("Cache-Control" = String, description = "`no-cache`"),
                ("X-Accel-Buffering" = String, description = "`no`: proxies must not buffer"),
            )),
        (status = 400, description = "`invalid_json`, `invalid_request` (no messages, an \
            unknown role, a bad trigger, and the checks of `/api/chat/start`) or \
            `invalid_session_id` (the chat id)", body = ErrorBody),
        crate::error::ApiKeyRefused,
        (status = 404, description = "`unknown_model`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until a retry can be admitted"))),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn chat(
    state: web::Data<SharedState>,
    caller: Result<Caller, ApiError>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let key_id = caller.as_ref().ok().map(|caller| caller.key.0.clone());
    let default_model = state
        .settings
        .gateway
        .default_model
        .clone()
        .or_else(|| state.models.keys().next().cloned());
    let json = start_counted(&state, caller, &req, payload, |body| {
        native_body(body, default_model.as_deref())
    })
    .await?;
    let ids: StartedIds = serde_json::from_str(&json).map_err(|error| {
        tracing::error!(%error, "unreadable start response");
        ApiError::Internal
    })?;
    let meta = request_meta(state.client(), &ids.request_id)
        .await?
        .ok_or(ApiError::Internal)?;
    let body = open(&state, ids.request_id, &meta, key_id).await?;
    Ok(ui_stream_response().streaming(body))
}

/// The chat's answer still running, if any, with its metadata (of the caller's tenant only:
/// the session is scoped to it).
async fn active(
    state: &AppState,
    session: &SessionId,
) -> Result<Option<(RequestId, RequestMeta)>, ApiError> {
    let Some(request) =
        stream_io::session::active_request(state.client(), session, state.models.values()).await?
    else {
        return Ok(None);
    };
    Ok(request_meta(state.client(), &request)
        .await?
        .filter(|meta| &meta.session_id == session)
        .map(|meta| (request, meta)))
}

fn chat_session(caller: &Caller, raw: &str) -> Result<SessionId, ApiError> {
    let client = SessionId::parse(raw).map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
    Ok(caller.session(&client))
}

/// Resumes a chat's running answer (what `useChat` with `resume: true` calls on load).
#[utoipa::path(
    get, path = "/api/chat/{id}/stream", tag = "aisdk", operation_id = "aiSdkResumeChat",
    params(("id" = String, Path, description = "The chat id (the session)")),
    responses(
        (status = 200, description = "The running answer from its `start`, then live, as for \
            `POST /api/chat`", content_type = "text/event-stream", body = String),
        (status = 204, description = "The chat has no running answer (none, finished, or \
            another tenant's)"),
        (status = 400, description = "`invalid_session_id`", body = ErrorBody),
        crate::error::ApiKeyRefused,
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn resume(
    state: web::Data<SharedState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = chat_session(&caller, &path)?;
    let Some((request, meta)) = active(&state, &session).await? else {
        return Ok(HttpResponse::NoContent().finish());
    };
    let body = open(&state, request, &meta, Some(caller.key.0.clone())).await?;
    Ok(ui_stream_response().streaming(body))
}

/// What `POST /api/chat/{id}/stop` answers when it stopped an answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StopResponse {
    request_id: RequestId,
    /// Always `cancelling`: the answer's streams end with `abort` within about 1 s.
    #[schema(value_type = String, example = "cancelling")]
    status: &'static str,
}

/// Stops a chat's running answer (the cancel of `POST /api/chat/{requestId}/cancel`; only the
/// API key that started it may).
#[utoipa::path(
    post, path = "/api/chat/{id}/stop", tag = "aisdk", operation_id = "aiSdkStopChat",
    params(("id" = String, Path, description = "The chat id (the session)")),
    responses(
        (status = 202, description = "Cancel requested: the answer's streams end with `abort`",
            body = StopResponse),
        (status = 204, description = "Nothing to stop: no running answer of this API key in \
            the chat"),
        (status = 400, description = "`invalid_session_id`", body = ErrorBody),
        crate::error::ApiKeyRefused,
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn stop(
    state: web::Data<SharedState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = chat_session(&caller, &path)?;
    let Some((request, meta)) = active(&state, &session)
        .await?
        .filter(|(_, meta)| meta.key_id == caller.key.0)
    else {
        return Ok(HttpResponse::NoContent().finish());
    };
    stream_io::cancel::request(
        state.client(),
        &meta.session_id,
        &request,
        state.settings.streams.session_ttl_secs,
    )
    .await?;
    tracing::info!(request_id = %request, session_id = %session, "stop requested");
    Ok(HttpResponse::Accepted().json(StopResponse {
        request_id: request,
        status: "cancelling",
    }))
}

/// Starts the delivery of one request's entries, from its `start`, as UI message parts.
async fn open(
    state: &SharedState,
    request_id: RequestId,
    meta: &RequestMeta,
    key_id: Option<String>,
) -> Result<impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + use<>, ApiError>
{
    let view = UiMessageView::new(request_id.to_string());
    let span = tracing::info_span!("aisdk.deliver", request_id = %request_id);
    spawn_request_delivery(state, request_id, meta, key_id, UiStream { view }, span).await
}

/// The UI message stream of `UiMessageView`.
struct UiStream {
    view: UiMessageView,
}

impl Dialect for UiStream {
    fn render(&mut self, frame: &Frame) -> Rendered {
        let step = self.view.feed(&frame.event);
        Rendered {
            bytes: (!step.messages.is_empty()).then(|| Bytes::from(step.messages.concat())),
            end: step.end,
        }
    }

    fn closing(&mut self, event: &SessionEvent) -> Bytes {
        let text = match event {
            SessionEvent::Error { code, message, .. } => format!("{}: {message}", code.as_str()),
            _ => "the stream ended".to_owned(),
        };
        Bytes::from(error_end(&text))
    }

    // A comment: it flushes the headers, and the client's parser ignores it.
    fn preamble(&self) -> Option<Bytes> {
        Some(Bytes::from_static(b": stream\n\n"))
    }
}
