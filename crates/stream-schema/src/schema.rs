//! OpenAPI schemas of the validated ids (feature `utoipa`, for the gateway's `/openapi.json`).
//!
//! Written by hand rather than derived: the derive would describe the inner `String`/`Uuid`
//! and lose the charset and length rules that `parse` enforces, which are exactly what an API
//! client (and schemathesis) must know.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::ids::{ModelId, RequestId, SessionId};

/// A string of 1..=max chars of `[A-Za-z0-9_.:-]`, as `check_token` accepts.
fn token(max: usize, description: &str, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(format!("^[A-Za-z0-9_.:-]{{1,{max}}}$")))
        .description(Some(description))
        .examples([serde_json::json!(example)])
        .into()
}

impl PartialSchema for SessionId {
    fn schema() -> RefOr<Schema> {
        token(
            SessionId::MAX_LEN,
            "A client's session; part of Redis keys, hence the strict charset.",
            "user_123",
        )
    }
}

impl ToSchema for SessionId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("SessionId")
    }
}

impl PartialSchema for ModelId {
    fn schema() -> RefOr<Schema> {
        token(
            ModelId::MAX_LEN,
            "A configured model id (see `GET /api/models`).",
            "gpt-4",
        )
    }
}

impl ToSchema for ModelId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ModelId")
    }
}

impl PartialSchema for RequestId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::Custom("uuid".to_owned())))
            // Only the hyphenated spelling parses (one request, one spelling in keys).
            .pattern(Some(
                "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
            ))
            .description(Some("A chat request (UUIDv7, hyphenated)."))
            .examples([serde_json::json!("01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f")])
            .into()
    }
}

impl ToSchema for RequestId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RequestId")
    }
}
