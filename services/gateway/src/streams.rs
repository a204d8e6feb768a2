//! `GET /api/sse/stream/{sessionId}`: SSE delivery of a session's events (SPEC §2).
//!
//! Each connection gets one delivery task: it first reads the history it missed with `XRANGE`
//! (late join, `Last-Event-ID` resume), then takes live frames from its hub subscription,
//! dropping any id it already sent. It takes every frame the hub queued at once and writes
//! them to the response body ([`crate::body`]) together, which hands all that is queued to the
//! HTTP writer as one chunk. Both queues are bounded in bytes (the body's at
//! [`BODY_BYTES`], the hub's at `gateway.sse_buffer_bytes`), so a slow client is cut off and
//! resumes instead of growing memory.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use crate::body::BodyWriter;
use crate::chat::request_meta;
use crate::connections::ConnectionGuard;
use crate::error::{ApiError, ErrorBody};
use crate::hub::{Batch, Closed, Frame, Subscription};
use crate::state::{DeliveryMetrics, SharedState};
use crate::stream_token::{Claims, TokenError};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use fred::prelude::Client;
use stream_io::session::{Trimmed, entry_exists, last_entry_id, range_after, trimmed};
use stream_schema::{
    ConnectionId, EntryId, ErrorCode, ModelId, RedisKey, RequestId, SessionCursor, SessionEvent,
    SessionId,
};

/// Entries per `XRANGE` page while catching up.
const CATCH_UP_PAGE: u64 = 256;
/// Bytes queued between the delivery task and the HTTP response writer before the task waits
/// (at most `gateway.sse_write_timeout_ms`) for the client to take some.
const BODY_BYTES: usize = 16 * 1024;

/// Where one stream of the connection starts.
pub(crate) struct Plan {
    pub key: RedisKey,
    pub model: ModelId,
    pub after: EntryId,
}

/// Where a client resumes (`Last-Event-ID` or `lastEventId`).
#[derive(Debug, Clone)]
pub enum Resume {
    /// After this entry id: every request-scoped stream, and a session-wide one over one model.
    Entry(EntryId),
    /// A session-wide stream over several models: after each model stream's own position.
    Cursor(SessionCursor),
}

/// An authorized reader of `GET /api/sse/stream/{sessionId}`, as a handler argument: the
/// session (path), the request (`requestId`) and the resume position (`Last-Event-ID` or
/// `lastEventId`), parsed in that order (`400` on the first malformed one), then the stream
/// token checked against them (`401`/`403`). A handler that takes it reads only what the token
/// grants: `session` is the stored id of the path's session in the token's tenant.
pub struct StreamAccess {
    pub session: SessionId,
    pub request: Option<RequestId>,
    pub resume: Option<Resume>,
    /// The API key whose token opened the stream (`None` only with anonymous access): the
    /// stream ends when that key is revoked.
    pub key_id: Option<String>,
    /// The `connectionId` query: the id the start answer named for this connection.
    pub connection: Option<ConnectionId>,
}

impl actix_web::FromRequest for StreamAccess {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(Self::extract(req))
    }
}

impl StreamAccess {
    fn extract(req: &HttpRequest) -> Result<Self, ApiError> {
        let Some(state) = req.app_data::<web::Data<SharedState>>() else {
            tracing::error!("the gateway state is not registered with the app");
            return Err(ApiError::Internal);
        };
        // Decoded exactly as `web::Path` would (the same deserializer).
        let raw_session: String = req
            .match_info()
            .load()
            .map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
        let session = SessionId::parse(&raw_session)
            .map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
        let query = parse_query(req)?;
        let request = query
            .get("requestId")
            .map(|raw| RequestId::parse(raw))
            .transpose()
            .map_err(|_| ApiError::InvalidRequest("requestId is not a request id".to_owned()))?;
        let resume = resume_id(req, &query)?;
        let connection = query
            .get("connectionId")
            .map(|raw| ConnectionId::parse(raw))
            .transpose()
            .map_err(|_| {
                ApiError::InvalidRequest("connectionId is not a connection id".to_owned())
            })?;
        let claims = authorize(state, req, &query, &session, request.as_ref())?;
        let (session, key_id) = match claims {
            Some(claims) => (
                SessionId::scoped(&claims.tenant, &session),
                Some(claims.key_id),
            ),
            None => (session, None),
        };
        Ok(Self {
            session,
            request,
            resume,
            key_id,
            connection,
        })
    }
}

fn parse_query(req: &HttpRequest) -> Result<HashMap<String, String>, ApiError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))
}

fn resume_id(
    req: &HttpRequest,
    query: &HashMap<String, String>,
) -> Result<Option<Resume>, ApiError> {
    let header = req
        .headers()
        .get("Last-Event-ID")
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| ApiError::InvalidRequest("Last-Event-ID is not text".to_owned()))?;
    match header.or_else(|| query.get("lastEventId").cloned()) {
        None => Ok(None),
        Some(raw) if raw.is_empty() => Ok(None),
        Some(raw) if SessionCursor::looks_like(&raw) => SessionCursor::parse(&raw)
            .map(|cursor| Some(Resume::Cursor(cursor)))
            .map_err(|_| {
                ApiError::InvalidRequest(
                    "Last-Event-ID is not a session cursor (model=id,…)".to_owned(),
                )
            }),
        Some(raw) => EntryId::parse(&raw)
            .map(|id| Some(Resume::Entry(id)))
            .map_err(|_| {
                ApiError::InvalidRequest("Last-Event-ID is not a stream entry id".to_owned())
            }),
    }
}

/// The events of a session (or of one request) as Server-Sent Events.
#[utoipa::path(
    get, path = "/api/sse/stream/{sessionId}", tag = "stream", operation_id = "streamEvents",
    params(
        ("sessionId" = SessionId, Path),
        ("requestId" = Option<RequestId>, Query, description = "Only this request's events, \
            from its `start` (late join); the response ends after its `complete` or `error`. \
            Without it: every request of the session from now on, and the response does not \
            end."),
        ("connectionId" = Option<String>, Query, nullable = false,
            pattern = r"^sse_[0-9a-f]{32}$",
            description = "The `connectionId` of the start answer (its `streamUrl` carries \
            it): this connection is listed under it, unless another open connection holds it \
            (then it gets a fresh id)."),
        ("lastEventId" = Option<String>, Query, nullable = false,
            pattern = r"^([0-9]{1,19}(-[0-9]{1,19})?|[A-Za-z0-9_.:-]{1,64}=[0-9]{1,19}-[0-9]{1,19}(,[A-Za-z0-9_.:-]{1,64}=[0-9]{1,19}-[0-9]{1,19})*)?$",
            description = "Resume after this event id, for clients that cannot set \
            `Last-Event-ID`; the header wins when both are given. An entry id, or on a \
            session-wide stream over several models the cursor its events carry \
            (`model=id,…`)."),
        ("Last-Event-ID" = Option<String>, Header, nullable = false,
            pattern = r"^([0-9]{1,19}(-[0-9]{1,19})?|[A-Za-z0-9_.:-]{1,64}=[0-9]{1,19}-[0-9]{1,19}(,[A-Za-z0-9_.:-]{1,64}=[0-9]{1,19}-[0-9]{1,19})*)?$",
            description = "Resume after this event id (what EventSource sends on reconnect): \
            an entry id, or a session cursor (`model=id,…`)."),
    ),
    responses(
        (status = 200, description = "An endless or request-long event stream. Each message is \
            `id: <stream entry id>` and `data: <SessionEvent JSON>` (no `event:` field), plus \
            `: ping` comments when idle. On a session-wide stream over several models, `id:` \
            is a cursor instead: `<modelId>=<entry id>` of each model stream, joined by `,` (a \
            model not named: none seen yet); resuming with it is exact across the models. An \
            `error` event with code `history_lost` (and no `id:`) means the events after the \
            resume id are gone; one with code `unauthorized` (not retryable) that the token's API \
            key was revoked.",
            content_type = "text/event-stream", body = String, headers(
                ("Cache-Control" = String, description = "`no-cache`"),
                ("X-Accel-Buffering" = String, description = "`no`: proxies must not buffer"),
            )),
        (status = 400, description = "`invalid_session_id`, or `invalid_request` (requestId, \
            connectionId or Last-Event-ID malformed)", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no stream token, or not a valid one \
            (malformed, expired, bad signature, another session)", body = ErrorBody),
        (status = 403, description = "`forbidden`: a valid token for another request (or a \
            request's token without `requestId`: it opens that request only), or its API key \
            was revoked", body = ErrorBody),
        (status = 404, description = "`not_found`: no such request in this session",
            body = ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("streamToken" = []), ("bearer" = [])),
)]
pub async fn stream(
    state: web::Data<SharedState>,
    access: StreamAccess,
) -> Result<HttpResponse, ApiError> {
    let StreamAccess {
        session,
        request,
        resume,
        key_id,
        connection,
    } = access;
    let client = state.client();

    let mut plans = Vec::new();
    let mut parent_trace = None;
    match request {
        Some(request_id) => {
            let meta = request_meta(client, &request_id)
                .await?
                .filter(|meta| meta.session_id == session)
                .ok_or_else(|| {
                    ApiError::NotFound("unknown requestId for this session".to_owned())
                })?;
            parent_trace.clone_from(&meta.traceparent);
            let from_start = meta.start_entry.predecessor();
            let after = match &resume {
                None => from_start,
                Some(Resume::Entry(id)) => *id,
                Some(Resume::Cursor(cursor)) => match cursor.position(&meta.model_id) {
                    EntryId::ZERO => from_start,
                    id => id,
                },
            };
            plans.push(Plan {
                key: RedisKey::session(&meta.session_id, &meta.model_id),
                model: meta.model_id.clone(),
                after,
            });
        }
        None => {
            for model in state.models.values() {
                let key = RedisKey::session(&session, model);
                let after = match &resume {
                    Some(Resume::Entry(id)) => *id,
                    Some(Resume::Cursor(cursor)) => cursor.position(model),
                    None => last_entry_id(client, &key).await?.unwrap_or(EntryId::ZERO),
                };
                plans.push(Plan {
                    key,
                    model: model.clone(),
                    after,
                });
            }
        }
    }

    let history_lost = match &resume {
        Some(_) => history_lost(client, &plans).await?,
        None => false,
    };

    if history_lost {
        let event = SessionEvent::Error {
            request_id: request.unwrap_or_default(),
            code: ErrorCode::HistoryLost,
            message: "the events after Last-Event-ID were trimmed or expired".to_owned(),
            retryable: false,
            timestamp: stream_schema::now_millis(),
        };
        let body = futures::stream::once(async move { Ok::<_, Infallible>(unnumbered(&event)) });
        return Ok(sse_response().streaming(body));
    }
    // Several model streams in one response: each event's `id:` is the cursor over all.
    let cursor = (request.is_none() && plans.len() > 1).then(|| {
        let mut cursor = SessionCursor::default();
        for plan in &plans {
            cursor.advance(&plan.model, plan.after);
        }
        cursor
    });
    let span = tracing::info_span!("sse.deliver", session_id = %session, request_id = ?request);
    if let Some(traceparent) = parent_trace {
        service_kit::telemetry::continue_trace(&span, Some(&traceparent));
    }
    let body = spawn_delivery(
        &state,
        Reader {
            session,
            request,
            key_id,
            connection,
            cursor,
        },
        plans,
        Native,
        span,
    )
    .await?;
    Ok(sse_response().streaming(body))
}

/// The headers of every event-stream response.
pub(crate) fn sse_response() -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Ok();
    response
        .insert_header(("Content-Type", "text/event-stream"))
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"));
    response
}

/// Who reads a delivery: the stored session, the one request it is limited to (if any), the
/// API key whose revocation ends it, the `connectionId` it asked for, and (a session-wide
/// stream over several models) the cursor it resumes from.
pub(crate) struct Reader {
    pub session: SessionId,
    pub request: Option<RequestId>,
    pub key_id: Option<String>,
    pub connection: Option<ConnectionId>,
    pub cursor: Option<SessionCursor>,
}

/// Delivers one request's entries from its `start` through `dialect` (the OpenAI and AI SDK
/// views replay a request from its start). `key_id` is the key whose revocation ends the
/// stream (default: the key that started the request); the request's trace continues in `span`.
pub(crate) async fn spawn_request_delivery<D: Dialect>(
    state: &SharedState,
    request_id: RequestId,
    meta: &stream_schema::job::RequestMeta,
    key_id: Option<String>,
    dialect: D,
    span: tracing::Span,
) -> Result<impl futures::Stream<Item = Result<Bytes, Infallible>> + use<D>, ApiError> {
    let plan = Plan {
        key: RedisKey::session(&meta.session_id, &meta.model_id),
        model: meta.model_id.clone(),
        after: meta.start_entry.predecessor(),
    };
    if let Some(traceparent) = &meta.traceparent {
        service_kit::telemetry::continue_trace(&span, Some(traceparent));
    }
    let reader = Reader {
        session: meta.session_id.clone(),
        request: Some(request_id),
        key_id: key_id.or_else(|| Some(meta.key_id.clone())),
        connection: None,
        cursor: None,
    };
    spawn_delivery(state, reader, vec![plan], dialect, span).await
}

/// Registers a connection, spawns its delivery task and returns the response body it feeds.
pub(crate) async fn spawn_delivery<D: Dialect>(
    state: &SharedState,
    reader: Reader,
    plans: Vec<Plan>,
    dialect: D,
    span: tracing::Span,
) -> Result<impl futures::Stream<Item = Result<Bytes, Infallible>> + use<D>, ApiError> {
    let (body, stream) = crate::body::channel(BODY_BYTES);
    let guard = state
        .connections
        .register(reader.session.clone(), reader.request, reader.connection)
        .await?;
    tracing::debug!(connection_id = %guard.connection_id, session_id = %reader.session, "sse connected");
    let delivery = Delivery {
        state: state.clone(),
        body,
        guard,
        request: reader.request,
        key_id: reader.key_id,
        cursor: reader.cursor,
        dialect,
    };
    let task = tracing::Instrument::instrument(delivery.run(plans), span);
    // What each open connection's task holds for its whole life (issue #18's memory per idle
    // client), visible with `RUST_LOG=gateway=trace`.
    tracing::trace!(task_bytes = std::mem::size_of_val(&task), "delivery task");
    state.lifecycle.spawn(task);
    Ok(stream)
}

/// How a delivery writes events: the native SSE of `/api/sse/stream` or another API's view of
/// the same entries (OpenAI chunks). The catch-up/live seam, dedup, keepalive, stall and
/// revocation handling are the delivery's; a dialect only turns entries into bytes.
pub(crate) trait Dialect: Send + 'static {
    /// The bytes for one stream entry (nothing for an entry the dialect does not show), and
    /// whether the response ends after them (besides the request's terminal event).
    fn render(&mut self, frame: &Frame) -> Rendered;
    /// A message for an end the stream itself did not record (overflow, outage, revocation).
    fn closing(&mut self, event: &SessionEvent) -> Bytes;
    /// The first bytes of the response (they flush the headers), if any.
    fn preamble(&self) -> Option<Bytes> {
        Some(Bytes::from_static(b"retry: 1000\n\n"))
    }
    /// What an idle stream sends every `gateway.keepalive_secs`, if anything.
    fn ping(&self) -> Option<Bytes> {
        Some(Bytes::from_static(b": ping\n\n"))
    }
}

/// What a dialect makes of one entry.
pub(crate) struct Rendered {
    pub bytes: Option<Bytes>,
    /// The dialect ends the response here (for example after a diverging failover).
    pub end: bool,
}

/// `/api/sse/stream`: every entry as `id:` and its event JSON, prepared once by the hub.
struct Native;

impl Dialect for Native {
    fn render(&mut self, frame: &Frame) -> Rendered {
        Rendered {
            bytes: Some(frame.bytes.clone()),
            end: false,
        }
    }

    fn closing(&mut self, event: &SessionEvent) -> Bytes {
        unnumbered(event)
    }
}

/// Whether a client resuming after each plan's position missed an entry. Exact for the
/// retention of `START` (which records what it removes in `max-deleted-entry-id`): a client
/// whose own entry went but nothing after it resumes normally. A position that is neither in a
/// stream nor at its recorded edge was removed some other way (an operator's `XTRIM`), and
/// counts as lost, as does a position whose streams are all gone (expired).
async fn history_lost(client: &Client, plans: &[Plan]) -> Result<bool, ApiError> {
    let mut missing = 0;
    let mut at_edge = false;
    for plan in plans {
        match trimmed(client, &plan.key).await? {
            Trimmed::Missing => missing += 1,
            state if state.lost_after(plan.after) => return Ok(true),
            Trimmed::UpTo(edge) => at_edge |= edge == plan.after,
        }
    }
    if missing == plans.len() {
        return Ok(true);
    }
    if at_edge {
        return Ok(false);
    }
    for plan in plans {
        if entry_exists(client, &plan.key, plan.after).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks the stream token (`token` query or `Authorization: Bearer`): 401 when it is not a
/// valid token, 403 when it is valid for another request (or the session-wide stream) or its
/// API key was revoked or moved to another tenant. `None`: anonymous access, no token.
fn authorize(
    state: &SharedState,
    req: &HttpRequest,
    query: &HashMap<String, String>,
    session: &SessionId,
    request: Option<&RequestId>,
) -> Result<Option<Claims>, ApiError> {
    let token = query
        .get("token")
        .cloned()
        .or_else(|| crate::auth::bearer(req));
    let Some(token) = token else {
        if state.api_keys.allows_anonymous() {
            return Ok(None);
        }
        return Err(ApiError::Unauthorized(
            "a stream token is required (token query or Authorization: Bearer)".to_owned(),
        ));
    };
    let now = stream_schema::now_millis() / 1000;
    match state.stream_tokens.verify(&token, session, request, now) {
        Ok(claims)
            if state
                .api_keys
                .caller_of(&claims.key_id)
                .is_some_and(|caller| caller.tenant == claims.tenant) =>
        {
            Ok(Some(claims))
        }
        Ok(_) => Err(ApiError::Forbidden(
            "the API key of this token was revoked".to_owned(),
        )),
        Err(TokenError::WrongScope) => Err(ApiError::Forbidden(TokenError::WrongScope.to_string())),
        Err(error) => Err(ApiError::Unauthorized(error.to_string())),
    }
}

/// An SSE message without `id:`, for events that are not stream entries (`history_lost`,
/// `unavailable`): the client's `Last-Event-ID` stays on the last real entry.
fn unnumbered(event: &SessionEvent) -> Bytes {
    Bytes::from(format!("data: {}\n\n", event.to_json()))
}

/// Why a delivery ended.
enum End {
    /// The requested request completed or failed.
    Finished,
    ClientGone,
    /// The client took nothing for `gateway.sse_write_timeout_ms` while frames waited.
    Stalled,
    Shutdown,
    Closed(Closed),
    /// The API key of the stream's token was revoked.
    Revoked,
}

struct Delivery<D> {
    state: SharedState,
    dialect: D,
    body: BodyWriter,
    guard: ConnectionGuard,
    request: Option<RequestId>,
    /// The key whose token opened the stream; see `StreamAccess::key_id`.
    key_id: Option<String>,
    /// A session-wide stream over several models: where the client stands in each, sent as
    /// every event's `id:` instead of the entry id.
    cursor: Option<SessionCursor>,
}

/// One model stream the connection follows live.
struct Feed {
    subscription: Subscription,
    model: ModelId,
    /// Last id delivered (or skipped) of this stream.
    last: EntryId,
}

impl<D: Dialect> Delivery<D> {
    async fn run(mut self, plans: Vec<Plan>) {
        let end = self.deliver(plans).await;
        let request_id = self.request.unwrap_or_default();
        let closing = match end {
            End::Closed(Closed::Overflow) => Some(SessionEvent::Error {
                request_id,
                code: ErrorCode::Unavailable,
                message: "the client fell too far behind; resume with Last-Event-ID".to_owned(),
                retryable: true,
                timestamp: stream_schema::now_millis(),
            }),
            End::Closed(Closed::Unavailable) => Some(SessionEvent::Error {
                request_id,
                code: ErrorCode::Unavailable,
                message: "the event store is unavailable; resume with Last-Event-ID".to_owned(),
                retryable: true,
                timestamp: stream_schema::now_millis(),
            }),
            End::Stalled => {
                metrics::counter!("gateway_sse_stalled_total").increment(1);
                tracing::debug!(connection_id = %self.guard.connection_id, "sse client stalled");
                None
            }
            End::Revoked => Some(SessionEvent::Error {
                request_id,
                code: ErrorCode::Unauthorized,
                message: "the API key of this stream was revoked".to_owned(),
                retryable: false,
                timestamp: stream_schema::now_millis(),
            }),
            End::Finished | End::ClientGone | End::Shutdown => None,
        };
        if let Some(event) = closing {
            // Best effort: a client this far behind may not read it, and that is fine.
            let closing = self.dialect.closing(&event);
            let _ = self.body.push(closing);
        }
        tracing::debug!(connection_id = %self.guard.connection_id, "sse ended");
    }

    /// Hands bytes to the response writer, then waits for room if its queue is full.
    async fn send(&mut self, bytes: Bytes) -> Result<(), End> {
        self.body.push(bytes).map_err(|_| End::ClientGone)?;
        self.room().await
    }

    /// Waits until the response writer's queue has room. Only when it is full (the client's
    /// TCP window is full) does this wait, and not longer than the write timeout: a client that
    /// stopped reading must not hold a task, a subscription and its queued frames forever.
    async fn room(&mut self) -> Result<(), End> {
        let mut room = std::pin::pin!(self.body.room());
        if let Poll::Ready(room) = futures::poll!(room.as_mut()) {
            return room.map_err(|_| End::ClientGone);
        }
        let timeout = Duration::from_millis(self.state.settings.gateway.sse_write_timeout_ms);
        tokio::select! {
            room = room => room.map_err(|_| End::ClientGone),
            () = tokio::time::sleep(timeout) => Err(End::Stalled),
            () = self.state.shutdown.cancelled() => Err(End::Shutdown),
        }
    }

    /// Queues a frame of `model`'s stream unless already sent or filtered (the caller waits
    /// for room); tells whether the request ended.
    fn offer(
        &mut self,
        model: &ModelId,
        last: &mut EntryId,
        frame: &Frame,
        counts: &mut Counts,
    ) -> Result<bool, End> {
        if frame.id <= *last {
            return Ok(false);
        }
        *last = frame.id;
        if self.request.is_some_and(|r| r != frame.event.request_id()) {
            return Ok(false);
        }
        let rendered = self.dialect.render(frame);
        if let Some(bytes) = rendered.bytes {
            let bytes = match &mut self.cursor {
                None => bytes,
                Some(cursor) => {
                    cursor.advance(model, frame.id);
                    with_id(&cursor.to_string(), &bytes)
                }
            };
            self.body.push(bytes).map_err(|_| End::ClientGone)?;
        }
        counts.events += 1;
        if let SessionEvent::Token { timestamp, .. } = frame.event.as_ref() {
            counts.tokens += 1;
            // Producer write to gateway send, on two hosts' clocks (NTP keeps them close).
            let lag_ms = stream_schema::now_millis().saturating_sub(*timestamp);
            self.state.delivery.lag.record(lag_ms as f64 / 1000.0);
        }
        Ok(rendered.end || (self.request.is_some() && frame.event.is_terminal()))
    }

    /// Sends the entries after `last` up to `until` (or to the end of the stream) from Redis;
    /// tells whether the request ended.
    async fn catch_up(
        &mut self,
        key: &RedisKey,
        model: &ModelId,
        last: &mut EntryId,
        until: Option<EntryId>,
    ) -> Result<bool, End> {
        let client = self.state.client().clone();
        let until = until.unwrap_or(EntryId {
            ms: u64::MAX,
            seq: u64::MAX,
        });
        while *last < until {
            let page = range_after(&client, key, *last, CATCH_UP_PAGE)
                .await
                .map_err(|error| {
                    tracing::warn!(%error, "catch-up read failed");
                    End::Closed(Closed::Unavailable)
                })?;
            let full = page.len() as u64 == CATCH_UP_PAGE;
            for entry in page {
                if entry.id > until {
                    return Ok(false);
                }
                let event = match SessionEvent::decode(&entry.fields) {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(%key, id = %entry.id, %error, "skipping undecodable entry");
                        metrics::counter!("gateway_decode_errors_total").increment(1);
                        *last = entry.id;
                        continue;
                    }
                };
                let mut counts = Counts::default();
                let finished = self.offer(model, last, &Frame::new(entry.id, event), &mut counts);
                counts.flush(&self.guard, &self.state.delivery);
                if finished? {
                    return Ok(true);
                }
                self.room().await?;
            }
            if !full {
                break;
            }
        }
        Ok(false)
    }

    async fn deliver(&mut self, plans: Vec<Plan>) -> End {
        // `retry:` sets EventSource's reconnect delay; it also flushes the headers at once.
        if let Some(preamble) = self.dialect.preamble()
            && let Err(end) = self.send(preamble).await
        {
            return end;
        }
        let mut feeds = Vec::with_capacity(plans.len());
        for plan in plans {
            let mut last = plan.after;
            // History first, straight from Redis, before joining the live feed: a client far
            // behind would otherwise pile live entries up in its queue while it catches up.
            // Boxed: the catch-up's futures (Redis reads) are large and needed only while
            // catching up, and the task keeps the space of its largest state for its whole
            // life; an idle connection should not pay for them.
            match Box::pin(self.catch_up(&plan.key, &plan.model, &mut last, None)).await {
                Ok(true) => return End::Finished,
                Ok(false) => {}
                Err(end) => return end,
            }
            let subscription = self.state.hub.subscribe(&plan.key, last, self.request);
            // What arrived between the read above and the subscription.
            if subscription.catch_up_to.is_some() {
                match Box::pin(self.catch_up(
                    &plan.key,
                    &plan.model,
                    &mut last,
                    subscription.catch_up_to,
                ))
                .await
                {
                    Ok(true) => return End::Finished,
                    Ok(false) => {}
                    Err(end) => return end,
                }
            }
            feeds.push(Feed {
                subscription,
                model: plan.model,
                last,
            });
        }

        let keys = self.state.clone();
        let revoked = revocation(&keys, self.key_id.clone());
        tokio::pin!(revoked);
        let keepalive = Duration::from_secs(self.state.settings.gateway.keepalive_secs.max(1));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Frames taken from a subscription; emptied before each take, its buffer reused.
        let mut batch = VecDeque::new();
        // Made once, not per frame: a fresh `cancelled()` future joins and leaves the shutdown
        // token's waiter list (a mutex every connection shares) on each poll and drop, twice
        // per token and client.
        let shutdown = self.state.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        loop {
            let next = next_batch(&feeds, &mut batch);
            let (index, taken) = tokio::select! {
                taken = next => taken,
                _ = ping.tick() => {
                    if let Some(ping) = self.dialect.ping()
                        && let Err(end) = self.send(ping).await
                    {
                        return end;
                    }
                    continue;
                }
                () = self.body.closed() => return End::ClientGone,
                () = &mut shutdown => return End::Shutdown,
                () = &mut revoked => return End::Revoked,
            };
            match taken {
                Batch::Frames => {
                    let feed = &mut feeds[index];
                    let mut counts = Counts::default();
                    let mut finished = Ok(false);
                    for frame in batch.drain(..) {
                        finished = self.offer(&feed.model, &mut feed.last, &frame, &mut counts);
                        if !matches!(finished, Ok(false)) {
                            break;
                        }
                    }
                    batch.clear();
                    counts.flush(&self.guard, &self.state.delivery);
                    match finished {
                        Ok(true) => return End::Finished,
                        Ok(false) => {}
                        Err(end) => return end,
                    }
                    if let Err(end) = self.room().await {
                        return end;
                    }
                }
                Batch::Closed(reason) => return End::Closed(reason),
            }
        }
    }
}

/// What a batch of offers delivered, added to the counters once per batch rather than per
/// frame.
#[derive(Default)]
struct Counts {
    events: u64,
    tokens: u64,
}

impl Counts {
    fn flush(&self, guard: &ConnectionGuard, metrics: &DeliveryMetrics) {
        if self.events > 0 {
            guard.events_sent.fetch_add(self.events, Ordering::Relaxed);
            metrics.events.increment(self.events);
        }
        if self.tokens > 0 {
            metrics.tokens.increment(self.tokens);
        }
    }
}

/// Resolves when `key_id` stops being an active key (never for an anonymous stream): the
/// gateway's key refresh announces every change of the keys.
async fn revocation(state: &SharedState, key_id: Option<String>) {
    let Some(key_id) = key_id else {
        return std::future::pending().await;
    };
    let mut changes = state.api_keys.changes();
    loop {
        if !state.api_keys.has_id(&key_id) {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// A frame's bytes with another `id:` line: the hub encodes each frame once with its entry id,
/// and a connection that sends cursors swaps only that line.
fn with_id(id: &str, frame: &Bytes) -> Bytes {
    let data = frame
        .iter()
        .position(|&b| b == b'\n')
        .map_or(&frame[..], |newline| &frame[newline + 1..]);
    let mut bytes = Vec::with_capacity(id.len() + 5 + data.len());
    bytes.extend_from_slice(b"id: ");
    bytes.extend_from_slice(id.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(data);
    Bytes::from(bytes)
}

/// The next batch of any of the connection's subscriptions, with its index.
async fn next_batch(feeds: &[Feed], into: &mut VecDeque<Frame>) -> (usize, Batch) {
    futures::future::poll_fn(|cx| {
        for (index, feed) in feeds.iter().enumerate() {
            if let Poll::Ready(batch) = feed.subscription.poll_take(cx, into) {
                return Poll::Ready((index, batch));
            }
        }
        Poll::Pending
    })
    .await
}
