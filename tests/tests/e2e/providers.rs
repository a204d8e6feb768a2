//! Upstream providers and fallback chains through the real binaries: a model that speaks
//! Anthropic's Messages API (mock-llm's `/v1/messages`) streams the same events as an
//! OpenAI-format one, with the same retry rules; a model that keeps failing before its first
//! token hands the request to its fallback, and the stream and analytics say who served it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use service_kit::config::{ModelSettings, Provider};
use test_support::wait_until;

use crate::stack::{API_KEY, Stack, TIMEOUT, options, payloads, str_field, text_of};

const POLL: Duration = Duration::from_millis(100);

/// A model served by the stack's mock-llm (the launcher points this base URL at it).
fn mock_model(provider: Provider, upstream_model: &str) -> ModelSettings {
    ModelSettings {
        provider,
        base_url: "http://127.0.0.1:8090/v1".to_owned(),
        upstream_model: upstream_model.to_owned(),
        max_retries: 2,
        retry_base_ms: 20,
        retry_max_ms: 100,
        ..ModelSettings::default()
    }
}

/// The default stack plus `claude` (Anthropic format), `flaky` (OpenAI format, answers 503
/// to everything, falls back to `claude`) and `breaks` (a stream error after two tokens,
/// falls back to `mock`).
async fn start() -> anyhow::Result<Stack> {
    let options = options().with_settings(|settings| {
        settings.models.insert(
            "claude".to_owned(),
            mock_model(Provider::Anthropic, "claude-mock"),
        );
        let mut flaky = mock_model(Provider::OpenAi, "mock:status=503");
        flaky.fallbacks = vec!["claude".to_owned()];
        settings.models.insert("flaky".to_owned(), flaky);
        let mut breaks = mock_model(Provider::OpenAi, "mock:error_after=2");
        breaks.fallbacks = vec!["mock".to_owned()];
        settings.models.insert("breaks".to_owned(), breaks);
    });
    Stack::start(options).await
}

/// Starts a chat on `model` and reads its whole stream.
async fn chat(
    stack: &Stack,
    session: &str,
    model: &str,
    body: Value,
) -> anyhow::Result<Vec<Value>> {
    let mut request = body;
    request["sessionId"] = json!(session);
    request["modelId"] = json!(model);
    let (status, started) = stack.post_start(0, &request).await?;
    anyhow::ensure!(status == 200, "start failed: {status} {started}");
    payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

async fn mock_requests(stack: &Stack) -> anyhow::Result<u64> {
    let stats: Value = stack
        .http
        .get(format!("{}/_mock/stats", stack.mock_llm.url()))
        .send()
        .await?
        .json()
        .await?;
    stats["requests"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no request count in {stats}"))
}

#[tokio::test]
async fn an_anthropic_upstream_streams_the_same_events_as_an_openai_one() -> anyhow::Result<()> {
    let stack = start().await?;
    // A system message: Anthropic gets it as `system`, and the answer is the same.
    let body = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about rivers [[mock tokens=15]]"},
    ]});
    let openai = chat(&stack, "via_openai", "mock", body.clone()).await?;
    let anthropic = chat(&stack, "via_anthropic", "claude", body).await?;

    assert_eq!(types(&anthropic), types(&openai));
    let expected = mock_llm::text::completion_tokens(
        &mock_llm::text::prompt_text(["Be brief.", "Tell me about rivers [[mock tokens=15]]"]),
        0,
        15,
    )
    .concat();
    assert_eq!(text_of(&anthropic), expected);
    assert_eq!(text_of(&openai), expected);
    let (a, o) = (
        anthropic.last().cloned().unwrap_or_default(),
        openai.last().cloned().unwrap_or_default(),
    );
    assert_eq!(a["type"], "complete", "{a}");
    assert_eq!(a["finishReason"], o["finishReason"]);
    // Usage comes from Anthropic's `message_start` (input) and `message_delta` (output).
    assert_eq!(a["usage"], o["usage"]);
    assert_eq!(a["usage"]["source"], "upstream");
    assert_eq!(a["usage"]["completionTokens"], 15);

    // `max_tokens` is Anthropic's stop reason `max_tokens`: finish `length`.
    let capped = chat(
        &stack,
        "capped",
        "claude",
        json!({"prompt": "Long story", "maxTokens": 4}),
    )
    .await?;
    let complete = capped.last().cloned().unwrap_or_default();
    assert_eq!(complete["finishReason"], "length", "{complete}");
    assert_eq!(complete["usage"]["completionTokens"], 4);
    Ok(())
}

/// What a client rebuilds from a stream: answer text, reasoning, and each tool call by index
/// (`id`, `name`, concatenated `arguments`).
fn rebuilt(events: &[Value]) -> (String, String, BTreeMap<u64, (String, String, String)>) {
    let mut reasoning = String::new();
    let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
    for event in events {
        match event["type"].as_str() {
            Some("reasoning") => reasoning.push_str(event["content"].as_str().unwrap_or_default()),
            Some("tool_call") => {
                let call = calls
                    .entry(event["index"].as_u64().unwrap_or(u64::MAX))
                    .or_default();
                if let Some(id) = event["id"].as_str() {
                    call.0 = id.to_owned();
                }
                if let Some(name) = event["name"].as_str() {
                    call.1 = name.to_owned();
                }
                call.2
                    .push_str(event["arguments"].as_str().unwrap_or_default());
            }
            _ => {}
        }
    }
    (text_of(events), reasoning, calls)
}

#[tokio::test]
async fn tool_calls_and_reasoning_from_anthropic_rebuild_like_openais() -> anyhow::Result<()> {
    let stack = start().await?;
    // Tools declared in the request reach both APIs in their own shape; the mock calls them.
    let body = json!({
        "messages": [{"role": "user", "content": "Plan a trip [[mock reasoning=4 tools=2 arg_chunk=3]]"}],
        "tools": [{"type": "function", "function": {"name": "book_flight",
            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}],
    });
    let openai = chat(&stack, "tools_openai", "mock", body.clone()).await?;
    let anthropic = chat(&stack, "tools_anthropic", "claude", body).await?;

    let (text, reasoning, calls) = rebuilt(&anthropic);
    assert_eq!(
        (text.clone(), reasoning.clone(), calls.clone()),
        rebuilt(&openai)
    );
    assert!(text.is_empty(), "{text}");
    assert!(!reasoning.is_empty());
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.values().all(|(id, name, arguments)| !id.is_empty()
        && name == "book_flight"
        && serde_json::from_str::<Value>(arguments).is_ok()));
    let (a, o) = (
        anthropic.last().cloned().unwrap_or_default(),
        openai.last().cloned().unwrap_or_default(),
    );
    assert_eq!(a["finishReason"], "tool_calls", "{a}");
    assert_eq!(o["finishReason"], "tool_calls", "{o}");
    assert_eq!(
        a["usage"]["completionTokens"],
        o["usage"]["completionTokens"]
    );
    Ok(())
}

#[tokio::test]
async fn an_overloaded_anthropic_upstream_is_retried() -> anyhow::Result<()> {
    let stack = start().await?;
    let before = mock_requests(&stack).await?;
    let events = chat(
        &stack,
        "overloaded",
        "claude",
        json!({"prompt": "Busy? [[mock status=529 fail_times=1 tokens=5]]"}),
    )
    .await?;
    assert_eq!(
        types(&events),
        [
            "start", "token", "token", "token", "token", "token", "complete"
        ]
    );
    assert_eq!(events[6]["finishReason"], "stop");
    // One 529, one success: the producer retried once.
    assert_eq!(mock_requests(&stack).await? - before, 2);
    Ok(())
}

#[tokio::test]
async fn a_refused_anthropic_request_is_an_error_event_without_retries() -> anyhow::Result<()> {
    let stack = start().await?;
    let before = mock_requests(&stack).await?;
    let events = chat(
        &stack,
        "refused",
        "claude",
        json!({"prompt": "Bad [[mock status=400]]"}),
    )
    .await?;
    assert_eq!(types(&events), ["start", "error"]);
    let error = &events[1];
    assert_eq!(error["code"], "upstream_error");
    assert_eq!(error["retryable"], false);
    assert!(str_field(error, "message")?.contains("400"), "{error}");
    assert_eq!(mock_requests(&stack).await? - before, 1);
    Ok(())
}

#[tokio::test]
async fn a_failing_model_falls_back_and_analytics_count_the_serving_model() -> anyhow::Result<()> {
    let stack = start().await?;
    let events = chat(
        &stack,
        "fallback",
        "flaky",
        json!({"prompt": "Who answers? [[mock tokens=6]]"}),
    )
    .await?;

    // The request starts on `flaky`, then a restart says `claude` serves it.
    assert_eq!(events[0]["type"], "start");
    assert_eq!(events[0]["modelId"], "flaky");
    let restart = &events[1];
    assert_eq!(restart["type"], "restart", "{restart}");
    assert_eq!(restart["reason"], "fallback");
    assert_eq!(restart["servedBy"], "claude");
    assert_eq!(restart["attempt"], 2);
    assert_eq!(
        text_of(&events),
        crate::stack::expected_text("Who answers? [[mock tokens=6]]", 6)
    );
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["finishReason"], "stop");

    let models = wait_until(TIMEOUT, POLL, || async {
        let body = analytics_models(&stack).await?;
        let claude = model_totals(&body, "claude")?;
        Ok((claude["finished"] == 1).then_some(body))
    })
    .await?;
    let claude = model_totals(&models, "claude")?;
    assert_eq!(claude["requests"], 1, "{claude}");
    assert_eq!(claude["fallbackServed"], 1, "{claude}");
    assert_eq!(claude["completionTokens"], 6, "{claude}");
    assert_eq!(claude["finishes"]["stop"], 1, "{claude}");
    let flaky = model_totals(&models, "flaky")?;
    assert_eq!(flaky["requests"], 1, "{flaky}");
    assert_eq!(flaky["fellBack"], 1, "{flaky}");
    assert_eq!(flaky["finished"], 0, "{flaky}");
    assert_eq!(flaky["completionTokens"], 0, "{flaky}");
    Ok(())
}

#[tokio::test]
async fn after_the_first_token_a_failure_does_not_fall_back() -> anyhow::Result<()> {
    let stack = start().await?;
    let events = chat(
        &stack,
        "no_switch",
        "breaks",
        json!({"prompt": "Half an answer [[mock tokens=6]]"}),
    )
    .await?;
    assert_eq!(types(&events), ["start", "token", "token", "error"]);
    assert!(events.iter().all(|e| e["type"] != "restart"));
    Ok(())
}

async fn analytics_models(stack: &Stack) -> anyhow::Result<Value> {
    let response = stack
        .http
        .get(format!("{}/api/analytics/models", stack.gateway()))
        .bearer_auth(API_KEY)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    anyhow::ensure!(status == 200, "analytics: {status} {body}");
    Ok(body)
}

fn model_totals<'a>(body: &'a Value, model: &str) -> anyhow::Result<&'a Value> {
    body["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["modelId"] == model))
        .map(|m| &m["totals"])
        .ok_or_else(|| anyhow::anyhow!("model {model} missing in {body}"))
}
