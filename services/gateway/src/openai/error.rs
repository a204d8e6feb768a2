//! Errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`, so that the OpenAI SDKs
//! raise their usual exception types. Statuses and headers are those of `ApiError`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;

/// An `ApiError` answered in OpenAI's shape.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct OpenAiError(#[from] pub ApiError);

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// For humans; never contains a prompt, token or key.
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The bridge's error code (`ApiError` codes, as in `ErrorBody`).
    #[schema(value_type = String)]
    pub code: &'static str,
}

/// OpenAI's `type` for an error of this status.
fn kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        // The native response carries the headers (Retry-After, Allow); only the body changes.
        let native = self.0.error_response();
        let mut response = HttpResponse::build(native.status());
        for (name, value) in native.headers() {
            if name != actix_web::http::header::CONTENT_TYPE {
                response.insert_header((name.clone(), value.clone()));
            }
        }
        response.json(OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.0.to_string(),
                kind: kind(native.status()),
                code: self.0.code(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn errors_have_openai_shape_status_and_headers() -> Result<(), Box<dyn std::error::Error>>
    {
        let response = OpenAiError(ApiError::RateLimited {
            message: "over".to_owned(),
            retry_after_secs: 7,
        })
        .error_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers().get("Retry-After").map(|v| v.as_bytes()),
            Some(&b"7"[..])
        );
        let body = actix_web::body::to_bytes(response.into_body())
            .await
            .map_err(|_| "unreadable body")?;
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "over", "type": "rate_limit_error", "code": "rate_limited"}})
        );
        for (error, kind) in [
            (
                ApiError::Unauthorized(String::new()),
                "authentication_error",
            ),
            (
                ApiError::UnknownModel("x".to_owned()),
                "invalid_request_error",
            ),
            (ApiError::Unavailable, "server_error"),
        ] {
            assert_eq!(super::kind(error.status_code()), kind);
        }
        Ok(())
    }
}
