//! OpenAI-style error responses: `{"error":{"message","type","param","code"}}`, the shape
//! async-openai parses into `ApiError`.

use actix_web::http::StatusCode;
use actix_web::http::header::RETRY_AFTER;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An error answered before any token; the one place statuses and bodies are chosen.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Wrapped<'a> {
    error: Body<'a>,
}

/// The OpenAI error object; also used for in-stream errors.
#[derive(Serialize)]
pub struct Body<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            retry_after: None,
        }
    }

    /// An injected `status=` fault; 429 always gets a `Retry-After` (1 s unless set).
    pub fn injected(status: StatusCode, retry_after: Option<u64>) -> Self {
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS => Some(retry_after.unwrap_or(1)),
            _ => retry_after,
        };
        Self {
            status,
            message: format!("mock-llm: injected {status}"),
            retry_after,
        }
    }

    /// OpenAI's `type` and `code` for a status. A 429 is `requests`/`rate_limit_exceeded`,
    /// never `insufficient_quota` (which async-openai treats as permanent).
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self.status.as_u16() {
            400 | 413 | 422 => ("invalid_request_error", None),
            401 => ("invalid_request_error", Some("invalid_api_key")),
            403 => ("invalid_request_error", Some("permission_denied")),
            404 => ("invalid_request_error", Some("not_found")),
            429 => ("requests", Some("rate_limit_exceeded")),
            503 => ("server_error", Some("service_unavailable")),
            500..=599 => ("server_error", Some("internal_error")),
            _ => ("invalid_request_error", None),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let (kind, code) = self.kind_and_code();
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((RETRY_AFTER, seconds.to_string()));
        }
        response.json(Wrapped {
            error: Body {
                message: &self.message,
                kind,
                param: None,
                code,
            },
        })
    }
}
