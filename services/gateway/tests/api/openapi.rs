//! The served OpenAPI document matches the routes: every documented operation is served, and
//! a documented path with another method is `405` with `Allow`.

use anyhow::{anyhow, ensure};

use crate::helpers::{Answer, TestApp};

/// A path with a plausible value in each `{parameter}`.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment {
            "{sessionId}" => "user_123",
            "{requestId}" => "01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f",
            "{keyId}" => "team-a",
            "{id}" => "chatcmpl-01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn every_documented_operation_is_served() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    app.block_on(async {
        let doc: serde_json::Value = app
            .http
            .get(app.url("/openapi.json"))
            .send()
            .await?
            .json()
            .await?;
        ensure!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "{doc}"
        );
        let paths = doc["paths"]
            .as_object()
            .ok_or_else(|| anyhow!("no paths"))?;
        ensure!(paths.len() >= 10, "only {} paths documented", paths.len());
        for (template, item) in paths {
            ensure!(!template.contains('{') || concrete(template) != *template);
            let path = concrete(template);
            ensure!(!path.contains('{'), "unknown parameter in {template}");
            let item = item
                .as_object()
                .ok_or_else(|| anyhow!("bad item {template}"))?;
            for method in item.keys() {
                let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?;
                // No credentials: every operation answers something of its own (401, 404 for
                // an unknown request, 200), never the router's "no such endpoint" or 405.
                let response = app
                    .http
                    .request(method.clone(), app.url(&path))
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let documented = item[&method.as_str().to_lowercase()]["responses"]
                    .get(status.to_string())
                    .is_some();
                ensure!(documented, "{method} {path} answered undocumented {status}");
                if status == 404 {
                    let body = Answer::read(response).await?.json()?;
                    ensure!(
                        body["error"]["message"] != "no such endpoint",
                        "{method} {path} is not served"
                    );
                }
                ensure!(status != 405, "{method} {path} is not served");
            }
        }
        Ok(())
    })
}

#[test]
fn another_method_on_a_documented_path_is_405_with_allow() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    app.block_on(async {
        for (method, path, allow) in [
            (reqwest::Method::GET, "/api/chat/start", "POST"),
            (reqwest::Method::DELETE, "/api/sse/stream/user_123", "GET"),
            (reqwest::Method::PUT, "/healthz", "GET"),
            (
                reqwest::Method::GET,
                "/api/chat/01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f/cancel",
                "POST",
            ),
        ] {
            let response = app
                .http
                .request(method.clone(), app.url(path))
                .send()
                .await?;
            ensure!(
                response.status() == 405,
                "{method} {path}: {}",
                response.status()
            );
            let allowed = response
                .headers()
                .get("Allow")
                .and_then(|v| v.to_str().ok());
            ensure!(allowed == Some(allow), "{method} {path}: Allow {allowed:?}");
            let answer = Answer::read(response).await?;
            ensure!(answer.error_code()? == "method_not_allowed", "{answer:?}");
        }
        let answer = Answer::read(app.http.get(app.url("/api/nothing/here")).send().await?).await?;
        ensure!(
            answer.status == 404 && answer.error_code()? == "not_found",
            "{answer:?}"
        );
        Ok(())
    })
}

/// The fields that tell which model served a request are in the document clients generate
/// from: `servedBy` on the `restart` event, `fellBack` / `fallbackServed` in the analytics.
#[test]
fn the_serving_model_fields_are_documented() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    app.block_on(async {
        let doc = app
            .http
            .get(app.url("/openapi.json"))
            .send()
            .await?
            .text()
            .await?;
        for field in ["servedBy", "fellBack", "fallbackServed"] {
            ensure!(doc.contains(&format!("\"{field}\"")), "{field} missing");
        }
        Ok(())
    })
}

#[test]
fn the_document_describes_tool_calls_reasoning_and_the_chat_request_fields() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    let doc: serde_json::Value = app.block_on(async {
        anyhow::Ok(
            app.http
                .get(app.url("/openapi.json"))
                .send()
                .await?
                .json()
                .await?,
        )
    })?;
    let schemas = &doc["components"]["schemas"];
    let events = schemas["SessionEvent"]["oneOf"]
        .as_array()
        .ok_or_else(|| anyhow!("SessionEvent is not a oneOf: {}", schemas["SessionEvent"]))?;
    let event = |kind: &str| {
        events
            .iter()
            .find(|e| e["properties"]["type"]["enum"][0] == kind)
            .cloned()
            .ok_or_else(|| anyhow!("no `{kind}` event documented"))
    };
    let tool_call = event("tool_call")?;
    for field in ["sequence", "index", "id", "name", "arguments"] {
        ensure!(
            tool_call["properties"].get(field).is_some(),
            "tool_call lacks {field}"
        );
    }
    ensure!(event("reasoning")?["properties"].get("content").is_some());
    let finish = schemas["FinishReason"].to_string();
    ensure!(finish.contains("tool_calls"), "{finish}");
    ensure!(
        schemas["Usage"]["properties"]
            .get("reasoningTokens")
            .is_some()
    );
    let body = &schemas["StartChatBody"]["properties"];
    for field in [
        "messages",
        "tools",
        "toolChoice",
        "responseFormat",
        "topP",
        "stop",
        "seed",
        "maxTokens",
    ] {
        ensure!(body.get(field).is_some(), "StartChatBody lacks {field}");
    }
    let roles = schemas["Role"].to_string();
    ensure!(roles.contains("\"tool\""), "{roles}");
    for schema in [
        "ChatMessage",
        "Tool",
        "ToolChoice",
        "ResponseFormat",
        "ContentPart",
    ] {
        ensure!(schemas.get(schema).is_some(), "{schema} is not documented");
    }
    Ok(())
}
