//! OpenAI's Chat Completions API on the gateway, read by clients nobody here wrote: the official
//! `openai` Python and npm packages (installed by `scripts/sdk-clients.sh`) stream and fetch
//! completions with text, reasoning and tool calls and raise their own error classes; and
//! resume from any message id gives exactly the remaining chunks.

use std::path::PathBuf;
use tokio::process::Command;

use futures::StreamExt;
use mock_llm::scenario::{Scenario, Shape};
use serde_json::{Value, json};
use service_kit::config::{ApiKeyEntry, KeyLimits};
use test_support::stack::sha256_hex;

use fred::prelude::*;

use crate::stack::{API_KEY, OTHER_API_KEY, Stack, StackOptions, TIMEOUT, expected_text, options};

const TEXT_PROMPT: &str = "Tell me about the sea";
const TOOLS_PROMPT: &str =
    "Think, say, then call [[mock reasoning=3 tokens=4 tools=2 arg_chunk=3]]";

fn tools_scenario() -> Scenario {
    let shape = Shape {
        text_tokens: 4,
        reasoning: 3,
        tool_calls: 2,
        arg_chunk: 3,
        ..Shape::default()
    };
    Scenario::plan(&mock_llm::text::prompt_text([TOOLS_PROMPT]), 0, &shape)
}

/// One SSE message of an OpenAI stream: its `id:` and `data:`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    id: String,
    data: String,
}

/// Reads an event stream response to its end (or `TIMEOUT`), message by message. `stop_after`
/// ends the read early after that many messages (the connection is dropped).
async fn read_messages(
    response: reqwest::Response,
    stop_after: Option<usize>,
) -> anyhow::Result<Vec<Message>> {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut id = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("id: ") {
                    id = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value.to_owned();
                }
            }
            if !data.is_empty() {
                messages.push(Message { id, data });
                if stop_after == Some(messages.len()) {
                    return Ok(messages);
                }
            }
        }
        match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) => anyhow::bail!("no end of stream within {TIMEOUT:?}; got {messages:?}"),
            Ok(None) => return Ok(messages),
            Ok(Some(chunk)) => buffer.push_str(std::str::from_utf8(&chunk?)?),
        }
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

async fn create(
    stack: &Stack,
    body: &Value,
    headers: &[(&str, &str)],
) -> anyhow::Result<reqwest::Response> {
    let mut request = http()?
        .post(format!("{}/v1/chat/completions", stack.gateway()))
        .bearer_auth(API_KEY)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    Ok(response)
}

async fn resume(
    stack: &Stack,
    completion: &str,
    last_event_id: Option<&str>,
) -> anyhow::Result<Vec<Message>> {
    let mut request = http()?
        .get(format!(
            "{}/v1/chat/completions/{completion}/stream?include_usage=true",
            stack.gateway()
        ))
        .bearer_auth(API_KEY);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    read_messages(response, None).await
}

/// Concatenated `content` and `reasoning_content` deltas.
fn deltas(messages: &[Message]) -> (String, String) {
    let mut content = String::new();
    let mut reasoning = String::new();
    for message in messages {
        let chunk: Value = serde_json::from_str(&message.data).unwrap_or_default();
        let delta = &chunk["choices"][0]["delta"];
        content.push_str(delta["content"].as_str().unwrap_or_default());
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
    }
    (content, reasoning)
}

#[tokio::test]
async fn resuming_from_any_message_id_gives_exactly_the_remaining_chunks() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let body = json!({"model": "mock", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": TOOLS_PROMPT}]});
    let response = create(&stack, &body, &[("X-Session-Id", "resume")]).await?;
    let completion = response
        .headers()
        .get("X-Completion-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(completion.starts_with("chatcmpl-"), "{completion:?}");
    let full = read_messages(response, None).await?;

    let scenario = tools_scenario();
    assert_eq!(
        deltas(&full),
        (scenario.text.concat(), scenario.reasoning.concat())
    );
    assert_eq!(full.last().map(|m| m.data.as_str()), Some("[DONE]"));
    let ids: std::collections::BTreeSet<&str> = full.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), full.len(), "message ids are unique");

    // From the start, and after every message: exactly the rest.
    assert_eq!(resume(&stack, &completion, None).await?, full);
    for cut in 0..full.len() {
        let rest = resume(&stack, &completion, Some(&full[cut].id)).await?;
        assert_eq!(rest, full[cut + 1..].to_vec(), "after {}", full[cut].id);
    }
    Ok(())
}

#[tokio::test]
async fn a_dropped_stream_resumes_live_without_a_gap_or_a_repeat() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let prompt = "Take your time [[mock tokens=30 delay_ms=20]]";
    let body = json!({"model": "mock", "stream": true,
        "messages": [{"role": "user", "content": prompt}]});
    let response = create(&stack, &body, &[]).await?;
    let completion = response
        .headers()
        .get("X-Completion-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // The role chunk and a few deltas, then the connection drops mid-answer.
    let head = read_messages(response, Some(4)).await?;
    let last = head.last().map(|m| m.id.clone()).unwrap_or_default();
    let tail = resume(&stack, &completion, Some(&last)).await?;
    assert!(
        tail.len() > 3,
        "the answer was still streaming: {} left",
        tail.len()
    );
    let mut whole = head;
    whole.extend(tail);
    assert_eq!(whole, resume(&stack, &completion, None).await?);
    let shape = Shape {
        text_tokens: 30,
        ..Shape::default()
    };
    let text = Scenario::plan(&mock_llm::text::prompt_text([prompt]), 0, &shape).text;
    assert_eq!(deltas(&whole).0, text.concat());
    Ok(())
}

#[tokio::test]
async fn another_tenants_or_an_unknown_completion_is_not_found() -> anyhow::Result<()> {
    const ACME: &str = "sk-acme-openai";
    const GLOBEX: &str = "sk-globex-openai";
    let stack = Stack::start(options().with_settings(|settings| {
        for (id, key, tenant) in [("acme-1", ACME, "acme"), ("globex-1", GLOBEX, "globex")] {
            settings.auth.api_keys.push(ApiKeyEntry {
                id: id.to_owned(),
                sha256: sha256_hex(key),
                tenant: Some(tenant.to_owned()),
                role: Some("chat".to_owned()),
            });
        }
    }))
    .await?;
    let response = http()?
        .post(format!("{}/v1/chat/completions", stack.gateway()))
        .bearer_auth(ACME)
        .json(&json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let completion = response
        .headers()
        .get("X-Completion-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let get = |id: String, key: &'static str| {
        let url = format!("{}/v1/chat/completions/{id}/stream", stack.gateway());
        async move {
            let response = http()?.get(url).bearer_auth(key).send().await?;
            let status = response.status().as_u16();
            let body: Value = if status == 200 {
                Value::Null
            } else {
                response.json().await?
            };
            anyhow::Ok((status, body))
        }
    };
    // Its own tenant reads it; another tenant gets exactly the answer of an unknown id.
    assert_eq!(get(completion.clone(), ACME).await?.0, 200);
    let other = get(completion, GLOBEX).await?;
    let unknown = get(
        "chatcmpl-01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f".to_owned(),
        GLOBEX,
    )
    .await?;
    assert_eq!(other, unknown);
    assert_eq!(other.0, 404);
    assert_eq!(other.1["error"]["type"], "invalid_request_error");
    assert_eq!(get("not-an-id".to_owned(), GLOBEX).await?.0, 404);
    // A malformed query is a 400 in OpenAI's JSON shape, not the framework's plain text.
    let malformed = http()?
        .get(format!(
            "{}/v1/chat/completions/{}/stream?include_usage=null",
            stack.gateway(),
            "chatcmpl-01936f0e-8d2a-7c3b-9f00-1a2b3c4d5e6f"
        ))
        .bearer_auth(ACME)
        .send()
        .await?;
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await?;
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    Ok(())
}

#[tokio::test]
async fn a_non_streaming_completion_that_runs_too_long_is_a_504_timeout() -> anyhow::Result<()> {
    let stack =
        Stack::start(options().with_settings(|s| s.gateway.completion_timeout_secs = 1)).await?;
    let prompt = "Take all the time [[mock tokens=100 delay_ms=30]]";
    let response = http()?
        .post(format!("{}/v1/chat/completions", stack.gateway()))
        .bearer_auth(API_KEY)
        .json(&json!({"model": "mock", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 504);
    let completion = response
        .headers()
        .get("X-Completion-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    // The request kept running: its whole answer is still there to read.
    let whole = resume(&stack, &completion, None).await?;
    let shape = Shape {
        text_tokens: 100,
        ..Shape::default()
    };
    let text = Scenario::plan(&mock_llm::text::prompt_text([prompt]), 0, &shape).text;
    assert_eq!(deltas(&whole).0, text.concat());
    Ok(())
}

/// Where `scripts/sdk-clients.sh` put the SDKs (or where the environment says they are).
fn sdk_paths() -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/llm-bridge/sdk-clients"))
        .unwrap_or_default();
    let python = std::env::var_os("BRIDGE_SDK_PYTHON")
        .map_or_else(|| root.join("venv/bin/python"), PathBuf::from);
    let node =
        std::env::var_os("BRIDGE_SDK_NODE_DIR").map_or_else(|| root.join("node"), PathBuf::from);
    anyhow::ensure!(
        python.exists() && node.join("node_modules/openai").exists(),
        "the OpenAI SDKs are not installed ({} / {}): run scripts/sdk-clients.sh (make test \
         does) or set BRIDGE_SDK_PYTHON and BRIDGE_SDK_NODE_DIR",
        python.display(),
        node.display()
    );
    Ok((python, node))
}

/// Runs one client script against the stack and returns what it printed.
async fn run_client(mut command: Command, stack: &Stack) -> anyhow::Result<Value> {
    let output = command
        .env("BASE_URL", format!("{}/v1", stack.gateway()))
        .env("API_KEY", API_KEY)
        .env("LIMITED_KEY", OTHER_API_KEY)
        .env("MODEL", "mock")
        .env("TEXT_PROMPT", TEXT_PROMPT)
        .env("TOOLS_PROMPT", TOOLS_PROMPT)
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// What both SDKs must have rebuilt.
fn check_sdk_results(sdk: &str, out: &Value) {
    let text = expected_text(TEXT_PROMPT, 20);
    let scenario = tools_scenario();
    let calls: Vec<Value> = scenario
        .tool_calls
        .iter()
        .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
        .collect();
    assert_eq!(out["text"]["content"], text, "{sdk}: {out}");
    assert_eq!(out["text"]["finish"], "stop", "{sdk}");
    assert_eq!(out["text"]["usage"], 20, "{sdk}");
    assert_eq!(
        out["text"]["ids"].as_array().map(Vec::len),
        Some(1),
        "{sdk}: one completion id"
    );
    assert_eq!(out["tools"]["content"], scenario.text.concat(), "{sdk}");
    assert_eq!(
        out["tools"]["reasoning"],
        scenario.reasoning.concat(),
        "{sdk}"
    );
    assert_eq!(out["tools"]["calls"], json!(calls), "{sdk}");
    assert_eq!(out["tools"]["finish"], "tool_calls", "{sdk}");
    assert_eq!(out["whole_text"]["content"], text, "{sdk}");
    assert_eq!(out["whole_text"]["finish"], "stop", "{sdk}");
    assert_eq!(out["whole_tools"]["calls"], json!(calls), "{sdk}");
    assert_eq!(
        out["whole_tools"]["reasoning"],
        scenario.reasoning.concat(),
        "{sdk}"
    );
    assert!(
        out["models"]
            .as_array()
            .is_some_and(|models| models.contains(&json!("mock"))),
        "{sdk}: {}",
        out["models"]
    );
    assert_eq!(out["unauthorized"], "AuthenticationError", "{sdk}");
    assert_eq!(out["unknown_model"], "NotFoundError", "{sdk}");
    assert_eq!(out["rate_limited"], "RateLimitError", "{sdk}");
}

#[tokio::test]
async fn the_official_openai_sdks_stream_fetch_and_raise_through_the_gateway() -> anyhow::Result<()>
{
    let (python, node) = sdk_paths()?;
    // The second key admits one chat per window: its second request is a 429.
    let stack = Stack::start(options().with_settings(|s| {
        s.limits.window_secs = 600;
        s.limits.keys.insert(
            "other".to_owned(),
            KeyLimits {
                requests_per_window: Some(1),
                ..KeyLimits::default()
            },
        );
    }))
    .await?;
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/clients");

    let mut command = Command::new(&python);
    command.arg(format!("{clients}/openai_client.py"));
    let out = run_client(command, &stack).await?;
    check_sdk_results("python", &out);

    let mut command = Command::new("node");
    command
        .arg(format!("{clients}/openai_client.cjs"))
        .env("NODE_PATH", node.join("node_modules"));
    let out = run_client(command, &stack).await?;
    check_sdk_results("node", &out);
    Ok(())
}

/// Tool calls as an SDK rebuilds them from `tool_calls` deltas: (id, name, arguments) by index.
fn calls_of(messages: &[Message]) -> Vec<(String, String, String)> {
    let mut calls: std::collections::BTreeMap<u64, (String, String, String)> =
        std::collections::BTreeMap::new();
    for message in messages {
        let chunk: Value = serde_json::from_str(&message.data).unwrap_or_default();
        for call in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let slot = calls
                .entry(call["index"].as_u64().unwrap_or(u64::MAX))
                .or_default();
            slot.0.push_str(call["id"].as_str().unwrap_or_default());
            slot.1
                .push_str(call["function"]["name"].as_str().unwrap_or_default());
            slot.2
                .push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    calls.into_values().collect()
}

#[tokio::test]
async fn a_producer_failover_mid_answer_continues_after_what_the_client_has() -> anyhow::Result<()>
{
    let stack = Stack::start(
        StackOptions {
            producers: 2,
            ..options()
        }
        .with_settings(|s| {
            s.producer.lease_ms = 1500;
            s.producer.lease_renew_ms = 300;
            s.producer.reclaim_interval_ms = 250;
        }),
    )
    .await?;
    let prompt = "Survive a crash [[mock reasoning=4 tokens=6 tools=2 arg_chunk=1 delay_ms=10]]";
    let body = json!({"model": "mock", "stream": true,
        "messages": [{"role": "user", "content": prompt}]});
    let response = create(&stack, &body, &[("X-Session-Id", "crash-oai")]).await?;
    let completion = response
        .headers()
        .get("X-Completion-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Into the tool calls (reasoning, text, then arguments one character at a time).
    let head = read_messages(response, Some(20)).await?;
    let holder = crate::producer::job_holder(&stack).await?;
    stack.producers[holder].process.sigkill()?;
    let tail = resume(&stack, &completion, head.last().map(|m| m.id.as_str())).await?;
    let mut whole = head;
    whole.extend(tail);

    // The stream really restarted…
    let redis = stack.redis_client().await?;
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = redis
        .xrange("llm:stream:{crash-oai}:mock", "-", "+", None)
        .await?;
    assert!(
        entries
            .iter()
            .any(|(_, fields)| fields.get("type").map(String::as_str) == Some("restart")),
        "no restart was recorded"
    );
    // …and the client got every piece exactly once, ending normally.
    let shape = Shape {
        text_tokens: 6,
        reasoning: 4,
        tool_calls: 2,
        arg_chunk: 1,
        ..Shape::default()
    };
    let scenario = Scenario::plan(&mock_llm::text::prompt_text([prompt]), 0, &shape);
    assert_eq!(
        deltas(&whole),
        (scenario.text.concat(), scenario.reasoning.concat())
    );
    let planned: Vec<(String, String, String)> = scenario
        .tool_calls
        .iter()
        .map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone()))
        .collect();
    assert_eq!(calls_of(&whole), planned);
    assert_eq!(whole.last().map(|m| m.data.as_str()), Some("[DONE]"));
    Ok(())
}
