//! API errors and their one mapping to HTTP statuses and JSON bodies (SPEC §2):
//! `{"error": {"code": "...", "message": "..."}}`, never an empty or HTML body.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("sessionId {0}")]
    InvalidSessionId(String),
    #[error("model `{0}` is not configured")]
    UnknownModel(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("a dependency is unavailable; retry shortly")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidSessionId(_) => "invalid_session_id",
            Self::UnknownModel(_) => "unknown_model",
            Self::NotFound(_) => "not_found",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Maps a Redis failure: outages are 503, anything else is a bug (500) and is logged.
    pub fn from_redis(error: &stream_io::StreamIoError) -> Self {
        if error.is_unavailable() {
            tracing::warn!(%error, "redis unavailable");
            Self::Unavailable
        } else {
            tracing::error!(%error, "redis call failed");
            Self::Internal
        }
    }
}

impl From<fred::error::Error> for ApiError {
    fn from(error: fred::error::Error) -> Self {
        Self::from_redis(&stream_io::StreamIoError::Redis(error))
    }
}

impl From<stream_io::StreamIoError> for ApiError {
    fn from(error: stream_io::StreamIoError) -> Self {
        Self::from_redis(&error)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidRequest(_) | Self::InvalidSessionId(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::UnknownModel(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let Self::RateLimited {
            retry_after_secs, ..
        } = self
        {
            response.insert_header(("Retry-After", retry_after_secs.to_string()));
        }
        if matches!(self, Self::Unavailable) {
            response.insert_header(("Retry-After", "1"));
        }
        response.json(serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        }))
    }
}
