//! The AI SDK's UI message stream on the gateway (`/api/chat`), read by the published `ai` npm
//! package (installed by `scripts/sdk-clients.sh`): its transport sends a message and reads
//! text, reasoning and tool calls; reconnects mid-answer and gets the whole answer once; finds
//! nothing to resume after the end; a stop ends the stream with `abort`. And the one source of
//! truth: a chat started through one API (native, OpenAI, AI SDK) is watched through another.

use std::path::PathBuf;

use mock_llm::scenario::{Scenario, Shape};
use serde_json::{Value, json};
use tokio::process::Command;

use fred::prelude::*;

use crate::stack::{
    API_KEY, Stack, StackOptions, TIMEOUT, expected_text, options, payloads, str_field, text_of,
};

const TEXT_PROMPT: &str = "Tell me about the sea";
const TOOLS_PROMPT: &str =
    "Think, say, then call [[mock reasoning=3 tokens=4 tools=2 arg_chunk=3]]";
const SLOW_PROMPT: &str = "Take your time [[mock tokens=40 delay_ms=25]]";

fn scenario(prompt: &str, shape: &Shape) -> Scenario {
    Scenario::plan(&mock_llm::text::prompt_text([prompt]), 0, shape)
}

fn tools_scenario() -> Scenario {
    scenario(
        TOOLS_PROMPT,
        &Shape {
            text_tokens: 4,
            reasoning: 3,
            tool_calls: 2,
            arg_chunk: 3,
            ..Shape::default()
        },
    )
}

fn slow_text() -> String {
    scenario(
        SLOW_PROMPT,
        &Shape {
            text_tokens: 40,
            ..Shape::default()
        },
    )
    .text
    .concat()
}

/// Where `scripts/sdk-clients.sh` put the npm packages (or where the environment says).
fn node_dir() -> anyhow::Result<PathBuf> {
    let root = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/llm-bridge/sdk-clients"))
        .unwrap_or_default();
    let node =
        std::env::var_os("BRIDGE_SDK_NODE_DIR").map_or_else(|| root.join("node"), PathBuf::from);
    anyhow::ensure!(
        node.join("node_modules/ai").exists(),
        "the `ai` npm package is not installed in {}: run scripts/sdk-clients.sh (make test \
         does) or set BRIDGE_SDK_NODE_DIR",
        node.display()
    );
    Ok(node)
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

/// A UI message stream being read: its parts so far (`[DONE]` as the string "DONE").
struct Parts {
    response: reqwest::Response,
    buffer: String,
    parts: Vec<Value>,
}

impl Parts {
    fn new(response: reqwest::Response) -> anyhow::Result<Self> {
        anyhow::ensure!(
            response
                .headers()
                .get("x-vercel-ai-ui-message-stream")
                .is_some_and(|v| v == "v1"),
            "not a UI message stream: {:?}",
            response.headers()
        );
        Ok(Self {
            response,
            buffer: String::new(),
            parts: Vec::new(),
        })
    }

    /// Reads until `[DONE]`, or until `count` parts arrived.
    async fn read(&mut self, count: Option<usize>) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                for line in block.lines() {
                    match line.strip_prefix("data: ") {
                        Some("[DONE]") => {
                            self.parts.push(json!("DONE"));
                            return Ok(());
                        }
                        Some(data) => self.parts.push(serde_json::from_str(data)?),
                        None => {}
                    }
                }
                if count.is_some_and(|count| self.parts.len() >= count) {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => anyhow::bail!("no [DONE] within {TIMEOUT:?}; got {:?}", self.parts),
                Ok(Ok(None)) => anyhow::bail!("the stream ended without [DONE]: {:?}", self.parts),
                Ok(Ok(Some(chunk))) => self.buffer.push_str(std::str::from_utf8(&chunk)?),
                Ok(Err(error)) => return Err(error.into()),
            }
        }
    }
}

/// The parts of a UI message stream, to its `[DONE]`.
async fn read_parts(response: reqwest::Response) -> anyhow::Result<Vec<Value>> {
    let mut parts = Parts::new(response)?;
    parts.read(None).await?;
    Ok(parts.parts)
}

fn text_deltas(parts: &[Value]) -> String {
    deltas(parts, "text-delta")
}

fn deltas(parts: &[Value], kind: &str) -> String {
    parts
        .iter()
        .filter(|p| p["type"] == kind)
        .filter_map(|p| p["delta"].as_str())
        .collect()
}

#[tokio::test]
async fn the_ai_sdk_transport_reads_resumes_and_stops_answers() -> anyhow::Result<()> {
    let node = node_dir()?;
    let stack = Stack::start(options()).await?;
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/aisdk_client.cjs");
    let output = Command::new("node")
        .arg(client)
        .env("NODE_PATH", node.join("node_modules"))
        .env("GATEWAY", stack.gateway())
        .env("API_KEY", API_KEY)
        .env("MODEL", "mock")
        .env("TEXT_PROMPT", TEXT_PROMPT)
        .env("TOOLS_PROMPT", TOOLS_PROMPT)
        .env("SLOW_PROMPT", SLOW_PROMPT)
        .env("CHAT_PREFIX", "sdk")
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "aisdk_client failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout)?;

    // Text: the message the package built is mock-llm's answer, in one text part.
    assert_eq!(out["text"]["text"], expected_text(TEXT_PROMPT, 20), "{out}");
    assert_eq!(out["text"]["textParts"], 1);
    let types = &out["text"]["types"];
    assert_eq!(types[0], "start");
    assert_eq!(types[1], "start-step");
    let n = types.as_array().map_or(0, Vec::len);
    assert_eq!(types[n - 2], "finish-step");
    assert_eq!(types[n - 1], "finish");

    // Reasoning and tool calls, their inputs parsed from the streamed arguments.
    let planned = tools_scenario();
    assert_eq!(out["tools"]["text"], planned.text.concat());
    assert_eq!(out["tools"]["reasoning"], planned.reasoning.concat());
    let calls: Vec<Value> = planned
        .tool_calls
        .iter()
        .map(|c| {
            json!({"id": c.id, "name": c.name,
                "input": serde_json::from_str::<Value>(&c.arguments).unwrap_or_default(),
                "state": "input-available"})
        })
        .collect();
    assert_eq!(out["tools"]["tools"], json!(calls), "{out}");

    // The reconnect mid-answer got the whole answer, once, from its start.
    let head = out["head"].as_array().map_or(0, Vec::len);
    assert!(head > 3, "the first connection read {head} chunks");
    assert_eq!(out["resumed"]["text"], slow_text(), "{out}");
    assert_eq!(out["resumed"]["textParts"], 1);
    assert_eq!(out["resumed"]["types"][0], "start");
    assert_eq!(out["afterEnd"], "none", "204 once the answer ended");

    // Stop: accepted, and the stream ends with `abort`.
    assert_eq!(out["stopStatus"], 202);
    let stopped = out["stopped"].as_array().cloned().unwrap_or_default();
    assert_eq!(stopped.last(), Some(&json!("abort")), "{out}");

    // Refusals: the transport raises with the gateway's error body.
    for refusal in [&out["unauthorized"], &out["unauthorizedResume"]] {
        let body: Value = serde_json::from_str(refusal.as_str().unwrap_or_default())?;
        assert_eq!(body["error"]["code"], "unauthorized", "{refusal}");
    }
    Ok(())
}

#[tokio::test]
async fn a_chat_started_through_any_api_is_watched_through_the_others() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let http = http()?;

    // Started through /api/chat, watched through the native SSE endpoint.
    let response = http
        .post(format!("{}/api/chat", stack.gateway()))
        .bearer_auth(API_KEY)
        .json(
            &json!({"id": "via-aisdk", "model": "mock", "trigger": "submit-message",
            "messages": [{"id": "u1", "role": "user",
                "parts": [{"type": "text", "text": TEXT_PROMPT}]}]}),
        )
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let parts = read_parts(response).await?;
    let request_id = str_field(&parts[0], "messageId")?.to_owned();
    let url = format!(
        "{}&requestId={request_id}",
        stack.session_stream("via-aisdk").await?
    );
    let native = payloads(&stack.read_all(&url).await?)?;
    let text = expected_text(TEXT_PROMPT, 20);
    assert_eq!(text_of(&native), text);
    assert_eq!(text_deltas(&parts), text);

    // Started through /v1/chat/completions (streaming), watched through the native endpoint.
    let response = http
        .post(format!("{}/v1/chat/completions", stack.gateway()))
        .bearer_auth(API_KEY)
        .header("X-Session-Id", "via-openai")
        .json(&json!({"model": "mock", "stream": true,
            "messages": [{"role": "user", "content": TEXT_PROMPT}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let completion = response
        .headers()
        .get("X-Completion-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let request_id = completion
        .strip_prefix("chatcmpl-")
        .ok_or_else(|| anyhow::anyhow!("completion id {completion:?}"))?;
    let url = format!(
        "{}&requestId={request_id}",
        stack.session_stream("via-openai").await?
    );
    assert_eq!(text_of(&payloads(&stack.read_all(&url).await?)?), text);
    drop(response);

    // Started natively, watched through /api/chat/{id}/stream while it runs.
    let started = stack.start_chat("via-native", SLOW_PROMPT).await?;
    let resume = |key: &'static str| {
        http.get(format!("{}/api/chat/via-native/stream", stack.gateway()))
            .bearer_auth(key)
            .send()
    };
    let response = resume(API_KEY).await?;
    assert_eq!(response.status(), 200);
    let parts = read_parts(response).await?;
    assert_eq!(parts[0]["messageId"], started["requestId"]);
    assert_eq!(text_deltas(&parts), slow_text());
    assert_eq!(parts[parts.len() - 2]["type"], "finish");
    // Nothing runs any more: 204.
    assert_eq!(resume(API_KEY).await?.status(), 204);
    let stop = http
        .post(format!("{}/api/chat/via-native/stop", stack.gateway()))
        .bearer_auth(API_KEY)
        .send()
        .await?;
    assert_eq!(stop.status(), 204);
    Ok(())
}

#[tokio::test]
async fn another_tenant_sees_no_running_answer() -> anyhow::Result<()> {
    const GLOBEX: &str = "sk-globex-aisdk";
    let stack = Stack::start(options().with_settings(|settings| {
        settings
            .auth
            .api_keys
            .push(service_kit::config::ApiKeyEntry {
                id: "globex-1".to_owned(),
                sha256: test_support::stack::sha256_hex(GLOBEX),
                tenant: Some("globex".to_owned()),
                role: Some("chat".to_owned()),
            });
    }))
    .await?;
    let http = http()?;
    stack.start_chat("shared-id", SLOW_PROMPT).await?;
    let url = format!("{}/api/chat/shared-id", stack.gateway());
    // The default tenant's answer runs; for globex the same chat id has none.
    let other = http
        .get(format!("{url}/stream"))
        .bearer_auth(GLOBEX)
        .send()
        .await?;
    assert_eq!(other.status(), 204);
    let stop = http
        .post(format!("{url}/stop"))
        .bearer_auth(GLOBEX)
        .send()
        .await?;
    assert_eq!(stop.status(), 204);
    let own = http
        .get(format!("{url}/stream"))
        .bearer_auth(API_KEY)
        .send()
        .await?;
    assert_eq!(own.status(), 200);
    assert_eq!(text_deltas(&read_parts(own).await?), slow_text());
    let unauthorized = http.get(format!("{url}/stream")).send().await?;
    assert_eq!(unauthorized.status(), 401);
    Ok(())
}

#[tokio::test]
async fn a_producer_failover_mid_answer_shows_nothing_twice() -> anyhow::Result<()> {
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
    let response = http()?
        .post(format!("{}/api/chat", stack.gateway()))
        .bearer_auth(API_KEY)
        .json(&json!({"id": "crash-ui", "model": "mock",
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": prompt}]}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let mut parts = Parts::new(response)?;
    // Into the tool calls (reasoning, text, then arguments one character at a time).
    parts.read(Some(20)).await?;
    let holder = crate::producer::job_holder(&stack).await?;
    stack.producers[holder].process.sigkill()?;
    // The same connection goes on through the takeover.
    parts.read(None).await?;
    let parts = parts.parts;

    let redis = stack.redis_client().await?;
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = redis
        .xrange("llm:stream:{crash-ui}:mock", "-", "+", None)
        .await?;
    assert!(
        entries
            .iter()
            .any(|(_, fields)| fields.get("type").map(String::as_str) == Some("restart")),
        "no restart was recorded"
    );
    let planned = scenario(
        prompt,
        &Shape {
            text_tokens: 6,
            reasoning: 4,
            tool_calls: 2,
            arg_chunk: 1,
            ..Shape::default()
        },
    );
    assert_eq!(text_deltas(&parts), planned.text.concat());
    assert_eq!(
        deltas(&parts, "reasoning-delta"),
        planned.reasoning.concat()
    );
    let calls: Vec<Value> = planned
        .tool_calls
        .iter()
        .map(|c| {
            json!([
                c.id,
                c.name,
                serde_json::from_str::<Value>(&c.arguments).unwrap_or_default()
            ])
        })
        .collect();
    let available: Vec<Value> = parts
        .iter()
        .filter(|p| p["type"] == "tool-input-available")
        .map(|p| json!([p["toolCallId"], p["toolName"], p["input"]]))
        .collect();
    assert_eq!(available, calls);
    let starts = parts
        .iter()
        .filter(|p| p["type"] == "tool-input-start")
        .count();
    assert_eq!(starts, planned.tool_calls.len(), "each call opened once");
    let n = parts.len();
    assert_eq!(parts[n - 2]["type"], "finish", "{parts:?}");
    Ok(())
}
