//! `POST /v1/chat/completions`, `GET /v1/chat/completions/{id}/stream` and `GET /v1/models`:
//! OpenAI's Chat Completions API over the same start path and the same Redis streams as the
//! native API.

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use stream_schema::job::RequestMeta;
use stream_schema::{RedisKey, RequestId, SessionEvent};
use tokio::sync::oneshot;
use utoipa::ToSchema;

use super::chunks::{CompletionView, Position};
use super::error::{OpenAiError, OpenAiErrorBody};
use crate::auth::Caller;
use crate::chat::{request_meta, start_counted};
use crate::error::ApiError;
use crate::hub::Frame;
use crate::state::SharedState;
use crate::streams::{Dialect, Rendered, spawn_request_delivery, sse_response};

/// The header naming the session of a completion (the conversation it belongs to).
const SESSION_HEADER: &str = "X-Session-Id";
/// The response header with the completion id (`chatcmpl-<requestId>`).
const COMPLETION_HEADER: &str = "X-Completion-Id";
const ID_PREFIX: &str = "chatcmpl-";

/// What the OpenAI body says beyond the native start body.
#[derive(Debug, Clone, Copy, Default)]
struct Delivery {
    stream: bool,
    include_usage: bool,
}

/// The OpenAI request body, for the API description. The body is read as the native start
/// body (`StartChatBody`) after this mapping: `model` is `modelId`; the session is the
/// `X-Session-Id` header, else `user`, else a new one per request; `max_completion_tokens` is
/// `max_tokens`. Other OpenAI fields (`logprobs`, `presence_penalty`, …) are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ChatCompletionBody {
    /// A configured model id (`GET /v1/models`), else `404`.
    model: String,
    /// As in `POST /api/chat/start`.
    #[schema(value_type = Vec<stream_schema::ChatMessage>)]
    messages: Vec<Value>,
    /// `true`: `chat.completion.chunk` events; `false` (default): one `chat.completion`.
    stream: Option<bool>,
    /// `{"include_usage": true}` adds a usage chunk before `[DONE]`.
    #[schema(value_type = Option<Object>)]
    stream_options: Option<Value>,
    /// The session when no `X-Session-Id` header is given (1–128 of `[A-Za-z0-9_.:-]`).
    user: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[schema(value_type = Option<Vec<stream_schema::message::Tool>>)]
    tools: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
    #[schema(value_type = Option<Object>)]
    response_format: Option<Value>,
    #[schema(value_type = Option<Object>)]
    stop: Option<Value>,
    seed: Option<i64>,
    /// Only 1 is supported.
    n: Option<u32>,
}

/// Turns an OpenAI body into a `/api/chat/start` body.
fn native_body(
    body: &[u8],
    session_header: Option<&str>,
    idempotency_key: Option<&str>,
) -> Result<(Vec<u8>, Delivery), ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".to_owned(),
        ));
    };
    let stream = match object.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "stream must be a boolean".to_owned(),
            ));
        }
    };
    let include_usage = match object.remove("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(include)) => *include,
            Some(_) => {
                return Err(ApiError::InvalidRequest(
                    "stream_options.include_usage must be a boolean".to_owned(),
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "stream_options must be an object".to_owned(),
            ));
        }
    };
    match object.remove("n") {
        None | Some(Value::Null) => {}
        Some(n) if n == json!(1) => {}
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "only n = 1 is supported".to_owned(),
            ));
        }
    }
    let model = match object.remove("model") {
        Some(Value::String(model)) => model,
        _ => return Err(ApiError::InvalidRequest("model is required".to_owned())),
    };
    let user = match object.remove("user") {
        Some(Value::String(user)) => Some(user),
        _ => None,
    };
    if let Some(max) = object.remove("max_completion_tokens")
        && !object.contains_key("max_tokens")
    {
        object.insert("max_tokens".to_owned(), max);
    }
    // The native spellings are not part of this API: a client cannot name another session or
    // give a prompt besides the messages through them.
    for native in [
        "sessionId",
        "modelId",
        "prompt",
        "maxTokens",
        "toolChoice",
        "responseFormat",
        "topP",
    ] {
        object.remove(native);
    }
    let session = match (session_header, user) {
        (Some(header), _) => header.to_owned(),
        (None, Some(user)) => user,
        // A retried request with the same Idempotency-Key must name the same session to be the
        // same body; otherwise every request is its own session.
        (None, None) => match idempotency_key {
            Some(key) => format!(
                "idem-{}",
                &hex::encode(Sha256::digest(key.as_bytes()))[..32]
            ),
            None => format!("oai-{}", uuid::Uuid::new_v4().simple()),
        },
    };
    object.insert("sessionId".to_owned(), Value::String(session));
    object.insert("modelId".to_owned(), Value::String(model));
    let native = serde_json::to_vec(&Value::Object(object)).map_err(|_| ApiError::Internal)?;
    Ok((
        native,
        Delivery {
            stream,
            include_usage,
        },
    ))
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a str>, ApiError> {
    req.headers()
        .get(name)
        .map(|value| value.to_str())
        .transpose()
        .map_err(|_| ApiError::InvalidRequest(format!("{name} is not text")))
}

/// The parts of a start response this API uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartedIds {
    request_id: RequestId,
    session_id: String,
}

/// Creates a chat completion through the bridge.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai", operation_id = "createChatCompletion",
    request_body(content = ChatCompletionBody, content_type = "application/json"),
    params(
        ("X-Session-Id" = Option<String>, Header, description = "The session (conversation) \
            of the completion; else `user`, else a new session per request"),
        ("Idempotency-Key" = Option<String>, Header, description = "As for \
            `POST /api/chat/start`"),
    ),
    responses(
        (status = 200, description = "`stream: true`: `text/event-stream` of \
            `chat.completion.chunk` objects (the role chunk, `content`, `reasoning_content` and \
            `tool_calls` deltas, the finish chunk, the usage chunk with \
            `stream_options.include_usage`), then `data: [DONE]`. Every message has an `id:` \
            for `GET /v1/chat/completions/{id}/stream`. An `error` mid-stream is \
            `data: {\"error\": {…}}` and ends the stream (`code: stream_restarted` when a \
            producer failover changed the answer). `stream: false`: one `chat.completion` \
            object.",
            content_type = "text/event-stream", body = String, headers(
                ("X-Completion-Id" = String, description = "The completion id \
                    (`chatcmpl-<requestId>`), also the `id` of every chunk"),
                ("X-Session-Id" = String, description = "The session the completion ran in"),
            )),
        (status = 400, description = "`invalid_json`, `invalid_request` or \
            `invalid_session_id` (as for `/api/chat/start`)", body = OpenAiErrorBody),
        (status = 401, description = "`unauthorized`: missing or invalid API key",
            body = OpenAiErrorBody),
        (status = 404, description = "`unknown_model`", body = OpenAiErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = OpenAiErrorBody),
        (status = 413, description = "`payload_too_large`", body = OpenAiErrorBody),
        (status = 429, description = "`rate_limited`", body = OpenAiErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until a retry can be admitted"))),
        (status = 500, description = "`stream: false` only: the request failed upstream",
            body = OpenAiErrorBody),
        (status = 504, description = "`stream: false` only: `timeout`, the request did not \
            end within `gateway.completion_timeout_secs`; it keeps running (read it with \
            `GET /v1/chat/completions/{id}/stream`, the id in `X-Completion-Id`)",
            body = OpenAiErrorBody),
        (status = 503, description = "`unavailable`: Redis is unreachable",
            body = OpenAiErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn completions(
    state: web::Data<SharedState>,
    caller: Result<Caller, ApiError>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, OpenAiError> {
    let session_header = header(&req, SESSION_HEADER)?.map(str::to_owned);
    let idempotency_key = header(&req, "Idempotency-Key")?.map(str::to_owned);
    let mut delivery = Delivery::default();
    let json = start_counted(&state, caller, &req, payload, |body| {
        let (native, asked) =
            native_body(body, session_header.as_deref(), idempotency_key.as_deref())?;
        delivery = asked;
        Ok(native)
    })
    .await?;
    let ids: StartedIds = serde_json::from_str(&json).map_err(|error| {
        tracing::error!(%error, "unreadable start response");
        ApiError::Internal
    })?;
    let meta = request_meta(state.client(), &ids.request_id)
        .await?
        .ok_or(ApiError::Internal)?;
    let completion_id = format!("{ID_PREFIX}{}", ids.request_id);
    let view = CompletionView::new(
        completion_id.clone(),
        meta.model_id.to_string(),
        delivery.include_usage,
        None,
    );
    if delivery.stream {
        let body = open(&state, ids.request_id, &meta, OpenAiStream { view }).await?;
        return Ok(sse_response()
            .insert_header((COMPLETION_HEADER, completion_id))
            .insert_header((SESSION_HEADER, ids.session_id))
            .streaming(body));
    }
    let (done_tx, done_rx) = oneshot::channel();
    let body = open(
        &state,
        ids.request_id,
        &meta,
        Collect {
            view,
            done: Some(done_tx),
        },
    )
    .await?;
    // The delivery runs while its body is held; the answer is the collected completion.
    let timeout = std::time::Duration::from_secs(state.settings.gateway.completion_timeout_secs);
    let outcome = tokio::time::timeout(timeout, done_rx).await;
    drop(body);
    let mut response = match outcome {
        Ok(Ok(Ok(completion))) => HttpResponse::Ok().json(completion),
        Ok(Ok(Err((status, error)))) => HttpResponse::build(
            actix_web::http::StatusCode::from_u16(status)
                .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
        )
        .json(error),
        Ok(Err(_)) => return Err(ApiError::Unavailable.into()),
        Err(_) => HttpResponse::GatewayTimeout().json(json!({ "error": {
            "message": format!(
                "the completion did not end within {} s; it keeps running: read it with \
                 GET /v1/chat/completions/{completion_id}/stream",
                timeout.as_secs()
            ),
            "type": "server_error",
            "code": "timeout",
        } })),
    };
    let headers = response.headers_mut();
    if let (Ok(id), Ok(session)) = (
        actix_web::http::header::HeaderValue::from_str(&completion_id),
        actix_web::http::header::HeaderValue::from_str(&ids.session_id),
    ) {
        headers.insert(
            actix_web::http::header::HeaderName::from_static("x-completion-id"),
            id,
        );
        headers.insert(
            actix_web::http::header::HeaderName::from_static("x-session-id"),
            session,
        );
    }
    Ok(response)
}

/// Starts the delivery of one request's entries, from its `start`, through `dialect`.
async fn open<D: Dialect>(
    state: &SharedState,
    request_id: RequestId,
    meta: &RequestMeta,
    dialect: D,
) -> Result<impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + use<D>, ApiError>
{
    let span = tracing::info_span!("openai.deliver", request_id = %request_id);
    spawn_request_delivery(state, request_id, meta, None, dialect, span).await
}

/// `stream: true`: the chunks of `CompletionView`.
struct OpenAiStream {
    view: CompletionView,
}

impl Dialect for OpenAiStream {
    fn render(&mut self, frame: &Frame) -> Rendered {
        let step = self.view.feed(frame.id, &frame.event);
        Rendered {
            bytes: (!step.messages.is_empty()).then(|| Bytes::from(step.messages.concat())),
            end: step.end,
        }
    }

    fn closing(&mut self, event: &SessionEvent) -> Bytes {
        Bytes::from(format!("data: {}\n\n", closing_error(event)))
    }

    // Comment lines without the blank line that ends a message: the OpenAI Python SDK keeps
    // the last `id:` and turns any later blank line into an empty event it fails to parse
    // (and no `retry:` for the same reason).
    fn preamble(&self) -> Option<Bytes> {
        Some(Bytes::from_static(b": stream\n"))
    }

    fn ping(&self) -> Option<Bytes> {
        Some(Bytes::from_static(b": ping\n"))
    }
}

/// The `{"error": …}` of an end the stream did not record (overflow, outage, revocation).
fn closing_error(event: &SessionEvent) -> Value {
    let (code, message) = match event {
        SessionEvent::Error { code, message, .. } => (code.as_str(), message.as_str()),
        _ => ("internal", "the stream ended"),
    };
    json!({ "error": { "message": message, "type": "server_error", "code": code } })
}

/// `stream: false`: nothing is written; the view's result goes to the waiting handler.
struct Collect {
    view: CompletionView,
    done: Option<oneshot::Sender<Result<Value, (u16, Value)>>>,
}

impl Dialect for Collect {
    fn render(&mut self, frame: &Frame) -> Rendered {
        let step = self.view.feed(frame.id, &frame.event);
        if step.end
            && let (Some(done), Some(result)) = (self.done.take(), self.view.completion())
        {
            let _ = done.send(result);
        }
        Rendered {
            bytes: None,
            end: step.end,
        }
    }

    fn closing(&mut self, event: &SessionEvent) -> Bytes {
        if let Some(done) = self.done.take() {
            let _ = done.send(Err((503, closing_error(event))));
        }
        Bytes::new()
    }

    fn preamble(&self) -> Option<Bytes> {
        None
    }

    fn ping(&self) -> Option<Bytes> {
        None
    }
}

#[derive(Debug, Deserialize)]
pub struct ResumeQuery {
    include_usage: Option<bool>,
}

/// Resumes (or watches) a streaming completion.
#[utoipa::path(
    get, path = "/v1/chat/completions/{id}/stream", tag = "openai",
    operation_id = "resumeChatCompletion",
    params(
        ("id" = String, Path, description = "The completion id (`X-Completion-Id`, the chunks' \
            `id`)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id:` of the last message \
            received: the stream continues with exactly the messages after it; without it the \
            whole completion from its role chunk"),
        ("include_usage" = Option<bool>, Query, description = "Send the usage chunk (as \
            `stream_options.include_usage`)"),
    ),
    responses(
        (status = 200, description = "The chunks after `Last-Event-ID`, then live ones, as for \
            `POST /v1/chat/completions` with `stream: true`",
            content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`: Last-Event-ID is not a message id, \
            or the query is malformed", body = OpenAiErrorBody),
        (status = 401, description = "`unauthorized`: missing or invalid API key",
            body = OpenAiErrorBody),
        (status = 404, description = "`not_found`: no such completion for this tenant, or its \
            events expired", body = OpenAiErrorBody),
        (status = 503, description = "`unavailable`: Redis is unreachable",
            body = OpenAiErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn resume(
    state: web::Data<SharedState>,
    caller: Result<Caller, ApiError>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, OpenAiError> {
    let caller = caller?;
    // Parsed here, not by the `web::Query` extractor, whose refusal is plain text.
    let query = web::Query::<ResumeQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))?;
    let unknown = || ApiError::NotFound("unknown completion id".to_owned());
    let request_id = path
        .strip_prefix(ID_PREFIX)
        .and_then(|raw| RequestId::parse(raw).ok())
        .ok_or_else(unknown)?;
    let resume = match header(&req, "Last-Event-ID")? {
        None | Some("") => None,
        Some(raw) => Some(Position::parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest("Last-Event-ID is not a message id".to_owned())
        })?),
    };
    // Another tenant's completion answers exactly as an unknown one.
    let meta = request_meta(state.client(), &request_id)
        .await?
        .filter(|meta| meta.session_id.tenant() == caller.tenant)
        .ok_or_else(unknown)?;
    // The view is rebuilt from the request's first entry: without it the chunks cannot be.
    let key = RedisKey::session(&meta.session_id, &meta.model_id);
    if !stream_io::session::entry_exists(state.client(), &key, meta.start_entry)
        .await
        .map_err(ApiError::from)?
    {
        return Err(ApiError::NotFound("the events of this completion expired".to_owned()).into());
    }
    let completion_id = format!("{ID_PREFIX}{request_id}");
    let view = CompletionView::new(
        completion_id.clone(),
        meta.model_id.to_string(),
        query.include_usage.unwrap_or(false),
        resume,
    );
    let body = open(&state, request_id, &meta, OpenAiStream { view }).await?;
    Ok(sse_response()
        .insert_header((COMPLETION_HEADER, completion_id))
        .streaming(body))
}

/// `GET /v1/models`: OpenAI's list shape.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OpenAiModelList {
    #[schema(value_type = String, example = "list")]
    object: &'static str,
    data: Vec<OpenAiModel>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OpenAiModel {
    /// A valid `model` for `POST /v1/chat/completions`.
    #[schema(example = "gpt-4")]
    id: String,
    #[schema(value_type = String, example = "model")]
    object: &'static str,
    /// Always 0: the bridge does not know when a model was made.
    created: u64,
    #[schema(value_type = String, example = "llm-bridge")]
    owned_by: &'static str,
}

/// The configured models, as OpenAI lists them. Needs no key, like `GET /api/models`.
#[utoipa::path(
    get, path = "/v1/models", tag = "openai", operation_id = "listOpenAiModels",
    responses((status = 200, description = "The configured models", body = OpenAiModelList)),
)]
pub async fn models(state: web::Data<SharedState>) -> HttpResponse {
    let data = state
        .models
        .keys()
        .map(|id| OpenAiModel {
            id: id.clone(),
            object: "model",
            created: 0,
            owned_by: "llm-bridge",
        })
        .collect();
    HttpResponse::Ok().json(OpenAiModelList {
        object: "list",
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stream_schema::EntryId;

    fn native(body: Value, header: Option<&str>) -> Result<(Value, Delivery), ApiError> {
        let (bytes, delivery) = native_body(body.to_string().as_bytes(), header, None)?;
        Ok((serde_json::from_slice(&bytes).unwrap_or_default(), delivery))
    }

    #[test]
    fn the_body_maps_to_a_native_start() -> Result<(), ApiError> {
        let (body, delivery) = native(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                "stream_options": {"include_usage": true}, "user": "u1",
                "max_completion_tokens": 5, "sessionId": "other"}),
            None,
        )?;
        assert!(delivery.stream && delivery.include_usage);
        assert_eq!(body["modelId"], "m");
        assert_eq!(body["sessionId"], "u1");
        assert_eq!(body["max_tokens"], 5);
        assert!(body.get("stream").is_none() && body.get("model").is_none());
        Ok(())
    }

    #[test]
    fn the_session_header_wins_and_no_session_is_a_fresh_one() -> Result<(), ApiError> {
        let (body, _) = native(json!({"model": "m", "user": "u1"}), Some("s1"))?;
        assert_eq!(body["sessionId"], "s1");
        let (a, delivery) = native(json!({"model": "m"}), None)?;
        let (b, _) = native(json!({"model": "m"}), None)?;
        assert_ne!(a["sessionId"], b["sessionId"]);
        assert!(!delivery.stream);
        Ok(())
    }

    #[test]
    fn malformed_bodies_are_refused_by_name() {
        let err = |body: &str| {
            native_body(body.as_bytes(), None, None)
                .err()
                .map(|e| e.code())
        };
        assert_eq!(err("{"), Some("invalid_json"));
        assert_eq!(err("[]"), Some("invalid_request"));
        assert_eq!(err(r#"{"messages": []}"#), Some("invalid_request"));
        assert_eq!(
            err(r#"{"model": "m", "stream": "yes"}"#),
            Some("invalid_request")
        );
        assert_eq!(err(r#"{"model": "m", "n": 2}"#), Some("invalid_request"));
    }

    #[test]
    fn a_retried_request_with_an_idempotency_key_names_the_same_session() -> Result<(), ApiError> {
        let body = br#"{"model": "m"}"#;
        let (a, _) = native_body(body, None, Some("k1"))?;
        let (b, _) = native_body(body, None, Some("k1"))?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn entry_ids_are_positions() {
        let id = EntryId { ms: 5, seq: 1 };
        assert_eq!(
            Position::parse(&id.to_string()),
            Some(Position { entry: id, part: 0 })
        );
    }
}
