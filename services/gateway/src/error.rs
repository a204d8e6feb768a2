//! API errors and their one mapping to HTTP statuses and JSON bodies (SPEC §2):
//! `{"error": {"code": "...", "message": "..."}}`, never an empty or HTML body.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response (and the schema `/openapi.json` gives for it).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable; one of a fixed set (`ApiError::CODES`).
    #[schema(schema_with = code_schema)]
    pub code: &'static str,
    /// For humans; never contains a prompt, token or key.
    pub message: String,
}

/// `code` as a closed enum, so clients (and schemathesis) know every value.
fn code_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ApiError::CODES.iter().copied()))
        .examples([serde_json::json!("invalid_request")])
        .build()
}

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
    /// The path exists, with these other methods (sent as the `Allow` header).
    #[error("this path only allows {}", .0.join(", "))]
    MethodNotAllowed(Vec<&'static str>),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// An `Idempotency-Key` reused with another body, or while its first start runs.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// The resource exists already (an API key id that is taken).
    #[error("{0}")]
    Conflict(String),
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
    /// Every value `code()` returns (the `code` enum of the API description).
    pub const CODES: &'static [&'static str] = &[
        "invalid_json",
        "invalid_request",
        "invalid_session_id",
        "unknown_model",
        "not_found",
        "method_not_allowed",
        "payload_too_large",
        "idempotency_conflict",
        "conflict",
        "unauthorized",
        "forbidden",
        "rate_limited",
        "unavailable",
        "internal",
    ];

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidSessionId(_) => "invalid_session_id",
            Self::UnknownModel(_) => "unknown_model",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::IdempotencyConflict(_) => "idempotency_conflict",
            Self::Conflict(_) => "conflict",
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
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::IdempotencyConflict(_) | Self::Conflict(_) => StatusCode::CONFLICT,
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
        if let Self::MethodNotAllowed(allowed) = self {
            response.insert_header(("Allow", allowed.join(", ")));
        }
        response.json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every variant. The exhaustive match makes a new variant fail to compile
    /// here until it is added, and with it to `CODES`.
    fn one_of_each() -> Vec<ApiError> {
        let all = vec![
            ApiError::InvalidJson(String::new()),
            ApiError::InvalidRequest(String::new()),
            ApiError::InvalidSessionId(String::new()),
            ApiError::UnknownModel(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed(vec!["GET"]),
            ApiError::PayloadTooLarge(String::new()),
            ApiError::IdempotencyConflict(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::Unauthorized(String::new()),
            ApiError::Forbidden(String::new()),
            ApiError::RateLimited {
                message: String::new(),
                retry_after_secs: 1,
            },
            ApiError::Unavailable,
            ApiError::Internal,
        ];
        for error in &all {
            match error {
                ApiError::InvalidJson(_)
                | ApiError::InvalidRequest(_)
                | ApiError::InvalidSessionId(_)
                | ApiError::UnknownModel(_)
                | ApiError::NotFound(_)
                | ApiError::MethodNotAllowed(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::IdempotencyConflict(_)
                | ApiError::Conflict(_)
                | ApiError::Unauthorized(_)
                | ApiError::Forbidden(_)
                | ApiError::RateLimited { .. }
                | ApiError::Unavailable
                | ApiError::Internal => {}
            }
        }
        all
    }

    #[test]
    fn codes_lists_every_code_once() {
        let codes: Vec<&str> = one_of_each().iter().map(ApiError::code).collect();
        assert_eq!(codes, ApiError::CODES);
    }

    #[actix_web::test]
    async fn error_bodies_are_code_and_message() -> Result<(), Box<dyn std::error::Error>> {
        let response = ApiError::UnknownModel("gpt-9".to_owned()).error_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = actix_web::body::to_bytes(response.into_body())
            .await
            .map_err(|_| "unreadable body")?;
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(json["error"]["code"], "unknown_model");
        assert_eq!(json["error"]["message"], "model `gpt-9` is not configured");
        Ok(())
    }
}

/// The `401` of every endpoint that takes an API key, for the OpenAPI document (one wording).
#[derive(utoipa::IntoResponses)]
pub enum ApiKeyRefused {
    #[response(
        status = 401,
        description = "`unauthorized`: missing or invalid API key"
    )]
    Unauthorized(ErrorBody),
}

/// The `503` of every endpoint that needs Redis, for the OpenAPI document (one wording).
#[derive(utoipa::IntoResponses)]
pub enum RedisUnavailable {
    #[response(
        status = 503,
        description = "`unavailable`: Redis is unreachable",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    Unavailable(ErrorBody),
}
