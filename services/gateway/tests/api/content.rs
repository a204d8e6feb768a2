//! `POST /api/chat/start` with what chat APIs accept besides a prompt: every role, content
//! parts, tools and the sampling options reach the job unchanged; each kind of bad input is a
//! `400`/`413` with SPEC's error body that names what is wrong, and writes nothing.

use anyhow::ensure;
use fred::prelude::*;
use fred::types::Value as RedisValue;
use serde_json::{Value, json};
use stream_schema::{Job, RedisKey};

use crate::helpers::{API_KEY, Answer, TestApp, refused_cleanly};

async fn post(app: &TestApp, body: &Value) -> anyhow::Result<Answer> {
    let response = app
        .http
        .post(app.url("/api/chat/start"))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await?;
    Answer::read(response).await
}

fn start(fields: Value) -> Value {
    let mut body = json!({"sessionId": "content", "modelId": "mock"});
    if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
        body.extend(fields.clone());
    }
    body
}

fn tool(name: &str) -> Value {
    json!({"type": "function", "function": {"name": name, "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
}

#[test]
fn a_full_chat_request_reaches_the_job_unchanged() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "high"}}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]);
    let body = start(json!({
        "messages": messages,
        "tools": [tool("get_weather")],
        "toolChoice": "auto",
        "responseFormat": {"type": "json_object"},
        "temperature": 0.5, "topP": 0.9, "stop": "END", "seed": 7, "maxTokens": 100,
    }));

    let answer = app.block_on(post(&app, &body))?;

    ensure!(answer.status == 200, "{answer:?}");
    let entries: RedisValue =
        app.block_on(
            app.redis
                .xrange(RedisKey::requests().as_str(), "-", "+", None),
        )?;
    let entries = stream_io::parse_entries(entries)?;
    ensure!(entries.len() == 1, "{entries:?}");
    let job = Job::decode(&entries[0].fields)?;
    let mut sent = messages.clone();
    // `content: null` means no content: the job leaves it out.
    if let Some(assistant) = sent[2].as_object_mut() {
        assistant.remove("content");
    }
    ensure!(
        serde_json::to_value(&job.messages)? == sent,
        "{:?}",
        job.messages
    );
    ensure!(serde_json::to_value(&job.options.tools)? == json!([tool("get_weather")]));
    ensure!(serde_json::to_value(&job.options.tool_choice)? == json!("auto"));
    ensure!(serde_json::to_value(&job.options.response_format)? == json!({"type": "json_object"}));
    ensure!(job.options.top_p == Some(0.9));
    ensure!(job.options.stop == ["END"]);
    ensure!(job.options.seed == Some(7));
    ensure!(job.max_tokens == Some(100) && job.temperature == Some(0.5));
    ensure!(entries[0].fields.iter().any(|(k, v)| k == "v" && v == "2"));
    Ok(())
}

#[test]
fn openai_spellings_of_the_options_are_accepted_too() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    let body = start(json!({
        "prompt": "hi", "tools": [tool("f")],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {}}},
        "top_p": 0.5, "max_tokens": 20,
    }));
    let answer = app.block_on(post(&app, &body))?;
    ensure!(answer.status == 200, "{answer:?}");
    Ok(())
}

#[test]
fn each_kind_of_bad_chat_input_is_refused_by_name_and_writes_nothing() -> anyhow::Result<()> {
    let app = TestApp::start_with(|s| {
        s.limits.max_tools = 2;
        s.limits.max_tools_bytes = 600;
    })?;
    let user = json!({"role": "user", "content": "hi"});
    let cases = [
        (
            json!({"messages": [user, {"role": "robot", "content": "x"}]}),
            400,
            "invalid_request",
            "messages[1]: unknown variant `robot`",
        ),
        (
            json!({"messages": [user, {"role": "tool", "content": "42"}]}),
            400,
            "invalid_request",
            "messages[1]: a tool message needs tool_call_id",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}),
            400,
            "invalid_request",
            "tool_call_id belongs on tool messages",
        ),
        (
            json!({"messages": [{"role": "assistant"}]}),
            400,
            "invalid_request",
            "messages[0]: assistant messages need content",
        ),
        (
            json!({"messages": [{"role": "system", "content": [{"type": "image_url",
                "image_url": {"url": "https://x/y.png"}}]}]}),
            400,
            "invalid_request",
            "image_url parts belong in user messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            400,
            "invalid_request",
            "messages[0]",
        ),
        (
            json!({"prompt": "hi", "tools": [tool("a"), tool("b"), tool("c")]}),
            400,
            "invalid_request",
            "at most 2 tools",
        ),
        (
            json!({"prompt": "hi", "tools": [{"type": "function", "function": {"name": "a",
                "description": "x".repeat(700)}}]}),
            413,
            "payload_too_large",
            "the tools are over 600 bytes",
        ),
        (
            json!({"prompt": "hi", "tools": [tool("has space")]}),
            400,
            "invalid_request",
            "tool name `has space`",
        ),
        (
            json!({"prompt": "hi", "tools": [tool("a"), tool("a")]}),
            400,
            "invalid_request",
            "declared twice",
        ),
        (
            json!({"prompt": "hi", "tools": [{"type": "retrieval"}]}),
            400,
            "invalid_request",
            "tools[0]",
        ),
        (
            json!({"prompt": "hi", "toolChoice": "required"}),
            400,
            "invalid_request",
            "tool_choice needs tools",
        ),
        (
            json!({"prompt": "hi", "tools": [tool("a")],
                "toolChoice": {"type": "function", "function": {"name": "b"}}}),
            400,
            "invalid_request",
            "not among tools",
        ),
        (
            json!({"prompt": "hi", "responseFormat": {"type": "yaml"}}),
            400,
            "invalid_request",
            "response_format",
        ),
        (
            json!({"prompt": "hi", "topP": 1.5}),
            400,
            "invalid_request",
            "topP must be between 0 and 1",
        ),
        (
            json!({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "invalid_request",
            "at most 4 stop sequences",
        ),
        (
            json!({"prompt": "hi", "messages": [user]}),
            400,
            "invalid_request",
            "not both",
        ),
    ];
    for (fields, status, code, message) in cases {
        let body = start(fields.clone());
        app.block_on(async {
            let writes_before = app.writes().await?;
            let answer = post(&app, &body).await?;
            let refused = refused_cleanly(&app, &answer, &writes_before).await?;
            ensure!(answer.status == status, "{fields}: {answer:?}");
            ensure!(refused.as_deref() == Some(code), "{fields}: {answer:?}");
            let text = answer.json()?["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            ensure!(
                text.contains(message),
                "{fields}: `{text}` lacks `{message}`"
            );
            anyhow::Ok(())
        })?;
    }
    Ok(())
}
