//! The OpenAPI description of the gateway, served at `GET /openapi.json`.
//!
//! Generated from the code: every handler carries a `#[utoipa::path]` attribute next to its
//! body, and the request/response types derive `ToSchema` (the event payloads and ids in
//! `stream-schema` behind its `utoipa` feature, the ops endpoints in `service_kit::ops` behind
//! its `openapi` feature). This module only lists them. **Invariant**: every route registered in
//! `lib.rs` (`routes` and the ops endpoints) is listed in `ApiDoc`; `tests/api` checks that every
//! documented operation is served, and `scripts/schemathesis.sh` checks the answers against it.

use std::sync::LazyLock;

use actix_web::dev::ResourceDef;
use actix_web::{HttpResponse, web};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::state::SharedState;
use crate::{chat, page, sessions, streams};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Redis Streams LLM Bridge gateway",
        description = "Start chats, stream their tokens over SSE, cancel them. Errors are always \
            `{\"error\": {\"code\", \"message\"}}` with the status of the operation's responses.",
    ),
    paths(
        chat::start,
        chat::cancel,
        streams::stream,
        sessions::stream_token,
        sessions::connections,
        chat::models,
        crate::openai::routes::completions,
        crate::openai::routes::resume,
        crate::openai::routes::models,
        crate::aisdk::routes::chat,
        crate::aisdk::routes::resume,
        crate::aisdk::routes::stop,
        crate::analytics::session,
        crate::analytics::models,
        crate::analytics::own_key,
        crate::admin::create,
        crate::admin::list,
        crate::admin::revoke,
        page::index,
        page::aisdk,
        serve,
        service_kit::ops::healthz,
        service_kit::ops::readyz,
        service_kit::ops::metrics_text,
    ),
    // Not referenced by a JSON body (SSE data is text), so listed by hand: clients parse each
    // `data:` line as one of these.
    components(schemas(stream_schema::SessionEvent)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "chat", description = "Start and cancel chats; the configured models"),
        (name = "stream", description = "Server-Sent Events of a session; each `data:` is a \
            `SessionEvent`"),
        (name = "sessions", description = "Session-wide stream tokens and open connections"),
        (name = "analytics", description = "Counters written by the processor, per tenant"),
        (name = "admin", description = "API key management (admin keys only)"),
        (name = "openai", description = "OpenAI Chat Completions over the same streams: point \
            an OpenAI SDK's base URL at `/v1`. Errors here are OpenAI's \
            `{\"error\": {\"message\", \"type\", \"code\"}}`"),
        (name = "aisdk", description = "The AI SDK's UI message stream (v1) over the same \
            streams: `useChat` with `DefaultChatTransport({ api: '<gateway>/api/chat' })` and \
            `resume: true`. The chat id is the session"),
        (name = "ops", description = "Health, readiness, metrics and this document"),
        (name = "page", description = "The demo chat pages"),
    ),
)]
pub struct ApiDoc;

/// The two ways to authenticate: an API key for the API, a stream token for SSE.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`auth.api_keys`). On the SSE endpoint: a stream token \
                         instead, for clients that can set headers.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "streamToken",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "The `streamToken` of a start or stream-token response (EventSource cannot \
                 set headers).",
            ))),
        );
    }
}

/// Built once: the document does not change while the process runs.
static DOCUMENT: LazyLock<serde_json::Value> = LazyLock::new(|| {
    // Serializing plain data cannot fail; `null` would show at once in every test if it did.
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    camel_case_links(&mut document);
    document
});

/// utoipa 5 writes the fields of a Link Object in snake case (`operation_id`); OpenAPI names
/// them `operationId`, `operationRef` and `requestBody`, and tools ignore links without them.
fn camel_case_links(document: &mut serde_json::Value) {
    let Some(paths) = document
        .get_mut("paths")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|item| item.values_mut());
    let responses = operations
        .filter_map(|operation| operation.get_mut("responses"))
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|responses| responses.values_mut());
    let links = responses
        .filter_map(|response| response.get_mut("links"))
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|links| links.values_mut())
        .filter_map(serde_json::Value::as_object_mut);
    for link in links {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(value) = link.remove(snake) {
                link.insert(camel.to_owned(), value);
            }
        }
    }
}

/// Each documented path (as an actix pattern: both use `{name}` segments) with its methods.
static METHODS: LazyLock<Vec<(ResourceDef, Vec<&'static str>)>> = LazyLock::new(|| {
    ApiDoc::openapi()
        .paths
        .paths
        .iter()
        .map(|(path, item)| {
            let operations = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
                ("HEAD", &item.head),
                ("OPTIONS", &item.options),
                ("TRACE", &item.trace),
            ];
            let methods = operations
                .into_iter()
                .filter(|(_, operation)| operation.is_some())
                .map(|(method, _)| method)
                .collect();
            (ResourceDef::new(path.as_str()), methods)
        })
        .collect()
});

/// The methods the API has for `path`, when it has the path at all. Used to answer a request
/// that no route matched: `405` with `Allow` for a known path, `404` otherwise. Routes are
/// registered with `cfg.route`, whose method guard makes a wrong method miss the path entirely;
/// the document knows every route (invariant above), so it can tell the two apart.
pub fn allowed_methods(path: &str) -> Option<Vec<&'static str>> {
    METHODS
        .iter()
        .find(|(pattern, _)| pattern.is_match(path))
        .map(|(_, methods)| methods.clone())
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "ops", operation_id = "openApiDocument",
    responses((status = 200, description = "The OpenAPI description of this API",
        content_type = "application/json", body = serde_json::Value)),
)]
pub async fn serve(state: web::Data<SharedState>) -> HttpResponse {
    HttpResponse::Ok().json(for_models(state.models.keys()))
}

/// The document with `modelId` of a start body narrowed to this gateway's configured models
/// (only known at run time), so clients and generated tests know which ids are accepted.
pub fn for_models<'a>(models: impl Iterator<Item = &'a String>) -> serde_json::Value {
    let mut document = DOCUMENT.clone();
    if let Some(model) =
        document.pointer_mut("/components/schemas/StartChatBody/properties/modelId")
    {
        *model = serde_json::json!({
            "type": "string",
            "enum": models.collect::<Vec<_>>(),
            "description": "A model configured on this gateway (`GET /api/models`); any other \
                id is `404 unknown_model`.",
        });
    }
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_bodies_name_the_configured_models() {
        let models = ["gpt-4".to_owned(), "mock".to_owned()];
        let document = for_models(models.iter());
        let model = &document["components"]["schemas"]["StartChatBody"]["properties"]["modelId"];
        assert_eq!(model["enum"], serde_json::json!(["gpt-4", "mock"]));
        // Elsewhere (events, responses) a model id stays the general `ModelId`.
        assert!(document["components"]["schemas"]["ModelId"]["pattern"].is_string());
    }

    #[test]
    fn links_name_operations_that_exist() -> Result<(), Box<dyn std::error::Error>> {
        let doc = &*DOCUMENT;
        let mut ids = Vec::new();
        let mut targets = Vec::new();
        for item in doc["paths"].as_object().ok_or("no paths")?.values() {
            for operation in item.as_object().ok_or("bad path item")?.values() {
                ids.extend(operation["operationId"].as_str());
                for response in operation["responses"].as_object().into_iter().flatten() {
                    for link in response.1["links"].as_object().into_iter().flatten() {
                        let target = link.1["operationId"].as_str();
                        targets.push(target.ok_or(format!("link {} has no operationId", link.0))?);
                    }
                }
            }
        }
        assert!(!targets.is_empty());
        for target in targets {
            assert!(ids.contains(&target), "no operation {target}");
        }
        Ok(())
    }

    #[test]
    fn every_operation_documents_its_errors_with_the_error_body()
    -> Result<(), Box<dyn std::error::Error>> {
        let doc = serde_json::to_value(ApiDoc::openapi())?;
        let paths = doc["paths"].as_object().ok_or("no paths")?;
        // `/readyz` answers its own readiness body with 503 too.
        for (path, item) in paths.iter().filter(|(path, _)| *path != "/readyz") {
            for (method, operation) in item.as_object().ok_or("bad path item")? {
                let responses = operation["responses"].as_object().ok_or("no responses")?;
                // The OpenAI routes answer errors in OpenAI's shape.
                let body = if path.starts_with("/v1/") {
                    "#/components/schemas/OpenAiErrorBody"
                } else {
                    "#/components/schemas/ErrorBody"
                };
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"], body,
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Routes registered in `routes()` but not documented yet. Analytics: remove each path here
    /// once its handler has `#[utoipa::path]` and is listed in `ApiDoc`.
    const UNDOCUMENTED: &[&str] = &[];

    #[test]
    fn every_route_in_lib_rs_is_documented() -> Result<(), Box<dyn std::error::Error>> {
        // Actix has no route table to ask, so read the path literals of `routes()` itself.
        let source = include_str!("lib.rs");
        let body = source
            .split("pub fn routes(")
            .nth(1)
            .and_then(|rest| rest.split("\n}\n").next())
            .ok_or("no `pub fn routes(` in lib.rs")?;
        let paths: Vec<&str> = body
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|literal| literal.starts_with('/'))
            .collect();
        assert!(paths.len() >= 7, "found only {paths:?}");
        let doc = ApiDoc::openapi();
        for path in paths {
            let documented = doc.paths.paths.contains_key(path);
            assert!(
                documented || UNDOCUMENTED.contains(&path),
                "route {path} is not in ApiDoc"
            );
            assert!(
                !(documented && UNDOCUMENTED.contains(&path)),
                "{path} is documented now: remove it from UNDOCUMENTED"
            );
        }
        Ok(())
    }

    #[test]
    fn security_schemes_cover_every_reference() -> Result<(), Box<dyn std::error::Error>> {
        let doc = serde_json::to_value(ApiDoc::openapi())?;
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .ok_or("no security schemes")?;
        for item in doc["paths"].as_object().ok_or("no paths")?.values() {
            for operation in item.as_object().ok_or("bad path item")?.values() {
                for requirement in operation["security"].as_array().into_iter().flatten() {
                    for name in requirement.as_object().ok_or("bad requirement")?.keys() {
                        assert!(schemes.contains_key(name), "{name}");
                    }
                }
            }
        }
        Ok(())
    }
}
