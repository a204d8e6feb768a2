//! The session resources: `POST /api/sessions/{sessionId}/stream-token` (a token for every
//! stream of a session) and `GET /api/sessions/{sessionId}/connections` (its open SSE
//! connections across every gateway replica).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use stream_schema::{ConnectionInfo, SessionId};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;
use crate::stream_token::Scope;

/// What `POST /api/sessions/{sessionId}/stream-token` answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionTokenResponse {
    session_id: SessionId,
    /// Opens any stream of the session until it expires.
    stream_token: String,
    /// Relative URL of the session's stream (every request from now on), token included.
    stream_url: String,
}

/// `POST /api/sessions/{sessionId}/stream-token`: a token that opens any stream of the session
/// (a watcher of a whole session, a second tab). The session is the caller's tenant's: a
/// session id names no other tenant's session, so minting is safe by construction.
#[utoipa::path(
    post, path = "/api/sessions/{sessionId}/stream-token", tag = "sessions",
    operation_id = "issueSessionStreamToken",
    params(("sessionId" = SessionId, Path)),
    responses(
        (status = 200, description = "A session-wide stream token", body = SessionTokenResponse),
        (status = 400, description = "`invalid_session_id`", body = ErrorBody),
        crate::error::ApiKeyRefused,
    ),
    security(("bearer" = [])),
)]
pub async fn stream_token(
    state: web::Data<SharedState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = SessionId::parse(&path).map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
    let now = stream_schema::now_millis() / 1000;
    let token =
        state
            .stream_tokens
            .issue(&caller.tenant, &session, Scope::Session, &caller.key.0, now);
    Ok(HttpResponse::Ok().json(SessionTokenResponse {
        stream_url: format!("/api/sse/stream/{session}?token={token}"),
        session_id: session,
        stream_token: token,
    }))
}

/// What `GET /api/sessions/{sessionId}/connections` answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionConnections {
    session_id: SessionId,
    /// Oldest first.
    connections: Vec<ConnectionInfo>,
}

/// The open SSE connections of a session of the caller's tenant, across every gateway replica.
#[utoipa::path(
    get, path = "/api/sessions/{sessionId}/connections", tag = "sessions",
    operation_id = "listSessionConnections",
    params(("sessionId" = SessionId, Path)),
    responses(
        (status = 200, description = "Open connections on live gateways: a closed one leaves \
            at once, a dead gateway's after `gateway.connection_ttl_secs`",
            body = SessionConnections),
        (status = 400, description = "`invalid_session_id`", body = ErrorBody),
        crate::error::ApiKeyRefused,
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn connections(
    state: web::Data<SharedState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = SessionId::parse(&path).map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
    let mut connections = state
        .connections
        .for_session(&caller.session(&session))
        .await?;
    // The view holds stored ids; the caller knows the session by its own.
    for connection in &mut connections {
        connection.session_id = connection.session_id.client_id();
    }
    Ok(HttpResponse::Ok().json(SessionConnections {
        session_id: session,
        connections,
    }))
}
