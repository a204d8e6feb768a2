//! `POST /v1/messages`: Anthropic's Messages API, streaming (`event:` + `data:` frames:
//! `message_start`, `ping`, `content_block_start` / `_delta` / `_stop`, `message_delta`,
//! `message_stop`, and `error`) and not, with errors in Anthropic's shape
//! (`{"type":"error","error":{"type","message"}}`).
//!
//! The answer is the one `/v1/chat/completions` gives for the same messages
//! (`chat::plan_answer`: the same scenario of reasoning, text and tool calls, the same
//! `[[mock …]]` directives), so a test can compare the two wire formats. The system prompt
//! counts as the first message's content, as it is one for OpenAI.
//!
//! The stream is written block by block: [`Blocks`] opens a content block when the kind of
//! the next piece changes (reasoning is a `thinking` block, text a `text` block, each tool
//! call its own `tool_use` block with its arguments as `input_json_delta`s) and closes it
//! before the next one.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::chat::{Request, plan_answer};
use crate::directive::MidStreamFault;
use crate::error::ApiError;
use crate::scenario::{Finish, Piece, Plan, Playback, Played};
use crate::state::{AppState, Outcome, StreamGuard};

/// Pause before an injected disconnect, so everything sent so far reaches the client first.
const FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// The signature of every thinking block (real ones are opaque too).
const SIGNATURE: &str = "bW9jay1sbG0tdGhpbmtpbmc=";

/// The parts of a Messages request the mock reads; the rest (`temperature`, …) is accepted
/// and ignored.
#[derive(Debug, Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Content>,
    /// Required by Anthropic; a request without it is a 400 there and here.
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// `{"name", "description", "input_schema"}`: only the name matters to the mock.
#[derive(Debug, Deserialize)]
struct Tool {
    name: String,
}

/// `{"type": "auto" | "any" | "tool" | "none", "name"?}`.
#[derive(Debug, Deserialize)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

/// A string or an array of content blocks; only text blocks count for the prompt.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

#[derive(Debug, Deserialize)]
struct ContentBlock {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Blocks(blocks) => blocks.iter().filter_map(|b| b.text.as_deref()).collect(),
        }
    }

    fn has_tool_result(&self) -> bool {
        matches!(self, Self::Blocks(blocks) if blocks.iter().any(|b| b.kind == "tool_result"))
    }
}

impl MessagesRequest {
    /// The tool names the answer's calls use, in turn, and whether the request itself asks
    /// for a call: it declares tools, `tool_choice` is not `none`, and the conversation does
    /// not end with a tool result (then the model answers in text).
    fn tools(&self) -> (Vec<String>, bool) {
        let declared: Vec<String> = self
            .tools
            .iter()
            .flatten()
            .map(|t| t.name.clone())
            .collect();
        let choice = self.tool_choice.as_ref();
        let none = choice.is_some_and(|c| c.kind == "none");
        let names = match choice
            .filter(|c| c.kind == "tool")
            .and_then(|c| c.name.clone())
        {
            Some(name) => vec![name],
            None => declared,
        };
        let after_tool_result = self
            .messages
            .last()
            .is_some_and(|m| m.role == "user" && m.content.has_tool_result());
        let wants_call = !names.is_empty() && !none && !after_tool_result;
        (names, wants_call)
    }
}

/// An error answered before the stream, in Anthropic's shape.
#[derive(Debug)]
pub struct AnthropicError(ApiError);

impl From<ApiError> for AnthropicError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl std::fmt::Display for AnthropicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Anthropic's error `type` for an HTTP status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

impl ResponseError for AnthropicError {
    fn status_code(&self) -> StatusCode {
        self.0.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.0.status);
        if let Some(seconds) = self.0.retry_after {
            response.insert_header((RETRY_AFTER, seconds.to_string()));
        }
        response.json(json!({
            "type": "error",
            "error": {"type": error_type(self.0.status), "message": self.0.message},
        }))
    }
}

/// Anthropic's `stop_reason` for how the scenario ends.
fn stop_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
    }
}

/// What one request will get, decided before the first byte.
#[derive(Debug)]
struct Answer {
    id: String,
    model: String,
    plan: Plan,
    /// `no_usage`: the stream carries no usage at all.
    no_usage: bool,
}

pub async fn messages(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, AnthropicError> {
    state
        .stats
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if !http.headers().contains_key("anthropic-version") {
        return Err(ApiError::bad_request("anthropic-version: header is required").into());
    }
    let request: MessagesRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages: at least one message is required").into());
    }
    if let Some(message) = request
        .messages
        .iter()
        .find(|m| m.role != "user" && m.role != "assistant")
    {
        return Err(
            ApiError::bad_request(format!("messages: unexpected role `{}`", message.role)).into(),
        );
    }
    let Some(max_tokens) = request.max_tokens.filter(|n| *n > 0) else {
        return Err(ApiError::bad_request("max_tokens: field required").into());
    };
    let model = request
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "mock".to_owned());
    let contents: Vec<String> = request
        .system
        .iter()
        .map(Content::text)
        .chain(request.messages.iter().map(|m| m.content.text()))
        .collect();
    let (tool_names, wants_call) = request.tools();
    let planned = plan_answer(
        &state,
        &Request {
            model: &model,
            contents: &contents,
            cap: Some(usize::try_from(max_tokens).unwrap_or(usize::MAX)),
            tool_names,
            wants_call,
        },
    )?;
    let answer = Answer {
        id: message_id(&state),
        model,
        plan: planned.plan,
        no_usage: planned.no_usage,
    };
    if request.stream.unwrap_or(false) {
        Ok(stream_response(answer, &state))
    } else {
        whole_response(answer).await
    }
}

/// `msg_…`, unique per request.
fn message_id(state: &AppState) -> String {
    state.completion_id().replacen("chatcmpl-", "msg_", 1)
}

/// The non-streaming answer: after the same total delay, one `message` object. In-stream
/// faults map to their closest non-streaming equivalent.
async fn whole_response(answer: Answer) -> Result<HttpResponse, AnthropicError> {
    let scenario = &answer.plan.scenario;
    let delay = answer
        .plan
        .delay
        .saturating_mul(u32::try_from(scenario.chunk_count()).unwrap_or(u32::MAX));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match answer.plan.fault {
        Some((_, MidStreamFault::Error)) => {
            return Err(ApiError::injected(StatusCode::INTERNAL_SERVER_ERROR, None).into());
        }
        Some((_, MidStreamFault::Disconnect)) => {
            let abort = futures::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("mock-llm: injected disconnect"))
            });
            return Ok(HttpResponse::Ok()
                .insert_header((CONTENT_TYPE, "application/json"))
                .streaming(abort));
        }
        Some((_, MidStreamFault::Stall)) => std::future::pending::<()>().await,
        None => {}
    }
    let mut content = Vec::new();
    if !scenario.reasoning.is_empty() {
        content.push(
            json!({"type": "thinking", "thinking": scenario.reasoning.concat(),
                            "signature": SIGNATURE}),
        );
    }
    if !scenario.text.is_empty() {
        content.push(json!({"type": "text", "text": scenario.text.concat()}));
    }
    for call in &scenario.tool_calls {
        let input: serde_json::Value =
            serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
    }
    let mut message = json!({
        "id": answer.id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": content,
        "stop_reason": stop_reason(scenario.finish),
        "stop_sequence": null,
    });
    if !answer.no_usage {
        let usage = scenario.usage();
        message["usage"] = json!({
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
        });
    }
    Ok(HttpResponse::Ok().json(message))
}

fn stream_response(answer: Answer, state: &AppState) -> HttpResponse {
    let stream = EventStream {
        guard: StreamGuard::start(Arc::clone(&state.stats)),
        id: answer.id,
        model: answer.model,
        no_usage: answer.no_usage,
        playback: Playback::new(answer.plan),
        phase: Phase::MessageStart,
        blocks: Blocks::default(),
    };
    let body = futures::stream::unfold(stream, |mut stream| async move {
        let item = stream.next_frames().await?;
        Some((item, stream))
    });
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body)
}

/// Where a stream is in Anthropic's event sequence.
#[derive(Debug, Clone, Copy)]
enum Phase {
    MessageStart,
    Ping,
    /// The scenario's pieces, played back.
    Pieces,
    MessageStop,
    End,
}

/// The kind of a content block; a piece of another kind opens a new block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Thinking,
    Text,
    /// Tool call `index` of the answer.
    ToolUse(usize),
}

/// The content blocks of one answer: which one is open, and the next block index.
#[derive(Debug, Default)]
struct Blocks {
    open: Option<(u32, BlockKind)>,
    next_index: u32,
}

impl Blocks {
    /// Appends the frames that put `kind` in an open block (closing another one first), with
    /// `start` as its `content_block`, and returns that block's index.
    fn enter(&mut self, kind: BlockKind, start: serde_json::Value, out: &mut Vec<u8>) -> u32 {
        if let Some((index, open)) = self.open {
            if open == kind {
                return index;
            }
            self.close(out);
        }
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((index, kind));
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        );
        index
    }

    /// Appends the end of the open block, if any: a thinking block's signature, then its
    /// `content_block_stop`.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some((index, kind)) = self.open.take() else {
            return;
        };
        if kind == BlockKind::Thinking {
            delta(
                out,
                index,
                json!({"type": "signature_delta", "signature": SIGNATURE}),
            );
        }
        event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }

    /// Appends the frames of one piece of the answer.
    fn piece(&mut self, piece: Piece<'_>, out: &mut Vec<u8>) {
        match piece {
            Piece::Reasoning(text) => {
                let index = self.enter(
                    BlockKind::Thinking,
                    json!({"type": "thinking", "thinking": ""}),
                    out,
                );
                delta(
                    out,
                    index,
                    json!({"type": "thinking_delta", "thinking": text}),
                );
            }
            Piece::Text(text) => {
                let index = self.enter(BlockKind::Text, json!({"type": "text", "text": ""}), out);
                delta(out, index, json!({"type": "text_delta", "text": text}));
            }
            Piece::ToolCallStart {
                index: call,
                id,
                name,
            } => {
                // Every call is a block of its own, even right after another call.
                self.close(out);
                let index = self.enter(
                    BlockKind::ToolUse(call),
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    out,
                );
                // Anthropic opens a call's input with an empty fragment.
                delta(
                    out,
                    index,
                    json!({"type": "input_json_delta", "partial_json": ""}),
                );
            }
            Piece::ToolCallArguments {
                index: call,
                fragment,
            } => {
                let index = self.enter(
                    BlockKind::ToolUse(call),
                    json!({"type": "tool_use", "input": {}}),
                    out,
                );
                delta(
                    out,
                    index,
                    json!({"type": "input_json_delta", "partial_json": fragment}),
                );
            }
        }
    }
}

/// One streaming answer; dropping it (actix does when the client leaves) counts the end.
struct EventStream {
    id: String,
    model: String,
    no_usage: bool,
    playback: Playback,
    phase: Phase,
    blocks: Blocks,
    guard: StreamGuard,
}

impl EventStream {
    /// The next frames (one or more events), `Err` to abort the connection, or `None` at
    /// the end.
    async fn next_frames(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        let mut out = Vec::with_capacity(256);
        match self.phase {
            Phase::MessageStart => {
                self.phase = Phase::Ping;
                let mut message = json!({
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": self.model,
                    "stop_reason": null,
                    "stop_sequence": null,
                });
                if !self.no_usage {
                    let input = self.playback.plan.scenario.prompt_tokens;
                    message["usage"] = json!({"input_tokens": input, "output_tokens": 1});
                }
                event(
                    &mut out,
                    "message_start",
                    &json!({"type": "message_start", "message": message}),
                );
            }
            Phase::Ping => {
                self.phase = Phase::Pieces;
                event(&mut out, "ping", &json!({"type": "ping"}));
            }
            Phase::Pieces => match self.playback.next().await {
                Played::Piece { piece, .. } => self.blocks.piece(piece, &mut out),
                Played::Fault(fault) => return self.fire(fault).await,
                Played::End => {
                    self.phase = Phase::MessageStop;
                    self.blocks.close(&mut out);
                    let scenario = &self.playback.plan.scenario;
                    let mut message_delta = json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(scenario.finish), "stop_sequence": null},
                    });
                    if !self.no_usage {
                        message_delta["usage"] =
                            json!({"output_tokens": scenario.usage().completion_tokens});
                    }
                    event(&mut out, "message_delta", &message_delta);
                }
            },
            Phase::MessageStop => {
                self.phase = Phase::End;
                self.guard.outcome = Outcome::Completed;
                event(&mut out, "message_stop", &json!({"type": "message_stop"}));
            }
            Phase::End => return None,
        }
        Some(Ok(Bytes::from(out)))
    }

    async fn fire(&mut self, fault: MidStreamFault) -> Option<Result<Bytes, std::io::Error>> {
        self.phase = Phase::End;
        match fault {
            MidStreamFault::Error => {
                self.guard.outcome = Outcome::Aborted;
                // Anthropic's documented mid-stream error: an `error` event, then the end.
                let mut out = Vec::new();
                event(
                    &mut out,
                    "error",
                    &json!({"type": "error", "error": {"type": "overloaded_error",
                            "message": "mock-llm: injected stream error"}}),
                );
                Some(Ok(Bytes::from(out)))
            }
            MidStreamFault::Disconnect => {
                self.guard.outcome = Outcome::Aborted;
                // As for OpenAI: let actix flush what was sent, then drop the connection
                // without the chunked terminator.
                tokio::time::sleep(FLUSH_PAUSE).await;
                Some(Err(std::io::Error::other("mock-llm: injected disconnect")))
            }
            // Until the client leaves; then actix drops this future and the guard counts it.
            MidStreamFault::Stall => std::future::pending().await,
        }
    }
}

/// Appends a `content_block_delta` of block `index`.
fn delta(out: &mut Vec<u8>, index: u32, delta: serde_json::Value) {
    event(
        out,
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": index, "delta": delta}),
    );
}

/// Appends `event: <name>\ndata: <json>\n\n`.
fn event(out: &mut Vec<u8>, name: &str, data: &serde_json::Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Writing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use actix_web::{App, test};
    use service_kit::config::MockLlmSettings;

    use super::*;
    use crate::text;

    const SEED: u64 = 3;

    async fn post(body: serde_json::Value, version: bool) -> (StatusCode, Option<String>, String) {
        let settings = MockLlmSettings {
            addr: "127.0.0.1:0".to_owned(),
            default_tokens: 5,
            token_delay_ms: 0,
            seed: SEED,
        };
        let state = web::Data::new(AppState::new(settings, Arc::default()));
        let app = test::init_service(
            App::new()
                .app_data(state)
                .route("/v1/messages", web::post().to(messages)),
        )
        .await;
        let mut request = test::TestRequest::post().uri("/v1/messages").set_json(body);
        if version {
            request = request.insert_header(("anthropic-version", "2023-06-01"));
        }
        let response = test::call_service(&app, request.to_request()).await;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = test::read_body(response).await;
        (
            status,
            retry_after,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// `(event name, data)` of each frame; checks that `type` repeats the event name.
    fn events(text: &str) -> Vec<(String, serde_json::Value)> {
        text.split("\n\n")
            .filter(|frame| !frame.is_empty())
            .map(|frame| {
                let mut lines = frame.lines();
                let name = lines
                    .next()
                    .and_then(|l| l.strip_prefix("event: "))
                    .unwrap_or_default()
                    .to_owned();
                let data = lines
                    .next()
                    .and_then(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                    .unwrap_or_default();
                assert_eq!(data["type"], name.as_str(), "{frame}");
                (name, data)
            })
            .collect()
    }

    fn request(stream: bool, user: &str) -> serde_json::Value {
        json!({
            "model": "claude-mock",
            "max_tokens": 1024,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": user}],
            "stream": stream,
        })
    }

    #[actix_web::test]
    async fn a_stream_follows_anthropics_event_flow_with_the_deterministic_text() {
        let (status, _, body) = post(request(true, "Tell me a story"), true).await;
        assert_eq!(status, StatusCode::OK);
        let events = events(&body);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec!["message_start", "ping", "content_block_start"];
        expected.extend(["content_block_delta"; 5]);
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        // The system prompt is part of the prompt, as the system message is for OpenAI.
        let prompt = text::prompt_text(["Be brief.", "Tell me a story"]);
        let text: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, d)| d["delta"]["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(text, text::completion_tokens(&prompt, SEED, 5).concat());
        assert_eq!(
            events[0].1["message"]["usage"]["input_tokens"],
            text::count_prompt_tokens(&prompt)
        );
        assert_eq!(
            events[2].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        let delta = &events[events.len() - 2].1;
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert_eq!(delta["usage"]["output_tokens"], 5);
    }

    #[actix_web::test]
    async fn max_tokens_cuts_the_answer_with_stop_reason_max_tokens() {
        let mut body = request(true, "Hi");
        body["max_tokens"] = json!(2);
        let (_, _, body) = post(body, true).await;
        let events = events(&body);
        let deltas = events.iter().filter(|(n, _)| n == "content_block_delta");
        assert_eq!(deltas.count(), 2);
        assert_eq!(
            events[events.len() - 2].1["delta"]["stop_reason"],
            "max_tokens"
        );
    }

    #[actix_web::test]
    async fn an_injected_529_is_an_overloaded_error() {
        let (status, _, body) = post(request(true, "[[mock status=529]] Hi"), true).await;
        assert_eq!(status.as_u16(), 529);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "overloaded_error");
        let (status, retry_after, body) =
            post(request(true, "[[mock status=429 retry_after=2]] Hi"), true).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry_after.as_deref(), Some("2"));
        assert!(body.contains("rate_limit_error"), "{body}");
    }

    #[actix_web::test]
    async fn error_after_sends_an_error_event_and_no_message_stop() {
        let (_, _, body) = post(request(true, "[[mock error_after=2]] Hi"), true).await;
        let events = events(&body);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "error"
            ]
        );
        assert_eq!(events[5].1["error"]["type"], "overloaded_error");
    }

    #[actix_web::test]
    async fn requests_anthropic_refuses_are_400s_in_its_shape() {
        let mut no_max = request(true, "Hi");
        no_max
            .as_object_mut()
            .map(|o| o.remove("max_tokens"))
            .unwrap_or_default();
        let mut bad_role = request(true, "Hi");
        bad_role["messages"] = json!([{"role": "system", "content": "x"}]);
        for (body, version) in [
            (no_max, true),
            (bad_role, true),
            (request(true, "Hi"), false),
        ] {
            let (status, _, body) = post(body, version).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert!(body.contains("invalid_request_error"), "{body}");
        }
    }

    #[actix_web::test]
    async fn a_non_streaming_request_gets_one_message() {
        let (status, _, body) = post(request(false, "Tell me a story"), true).await;
        assert_eq!(status, StatusCode::OK);
        let message: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let prompt = text::prompt_text(["Be brief.", "Tell me a story"]);
        assert_eq!(message["type"], "message");
        assert_eq!(
            message["content"][0]["text"],
            text::completion_tokens(&prompt, SEED, 5).concat()
        );
        assert_eq!(message["stop_reason"], "end_turn");
        assert_eq!(message["usage"]["output_tokens"], 5);
    }

    /// The text of every delta of `kind` (`text`, `thinking`, `partial_json`) in block `index`.
    fn block_text(events: &[(String, serde_json::Value)], index: u64, field: &str) -> String {
        events
            .iter()
            .filter(|(n, d)| n == "content_block_delta" && d["index"] == index)
            .filter_map(|(_, d)| d["delta"][field].as_str())
            .collect()
    }

    #[actix_web::test]
    async fn reasoning_and_tool_calls_are_thinking_and_tool_use_blocks() {
        let mut body = request(true, "Plan a trip [[mock reasoning=3 tools=2 arg_chunk=4]]");
        body["tools"] = json!([{"name": "book_flight", "input_schema": {"type": "object"}}]);
        let (status, _, text) = post(body, true).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let events = events(&text);
        let starts: Vec<&serde_json::Value> = events
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, d)| &d["content_block"])
            .collect();
        let kinds: Vec<&str> = starts.iter().filter_map(|b| b["type"].as_str()).collect();
        assert_eq!(kinds, ["thinking", "tool_use", "tool_use"]);
        let prompt = text::prompt_text([
            "Be brief.",
            "Plan a trip [[mock reasoning=3 tools=2 arg_chunk=4]]",
        ]);
        let shape = crate::scenario::Shape {
            reasoning: 3,
            tool_calls: 2,
            tool_names: vec!["book_flight".to_owned()],
            arg_chunk: 4,
            ..crate::scenario::Shape::default()
        };
        let scenario = crate::scenario::Scenario::plan(&prompt, SEED, &shape);
        assert_eq!(
            block_text(&events, 0, "thinking"),
            scenario.reasoning.concat()
        );
        for (block, call) in scenario.tool_calls.iter().enumerate() {
            let index = block as u64 + 1;
            assert_eq!(starts[block + 1]["id"], call.id.as_str());
            assert_eq!(starts[block + 1]["name"], "book_flight");
            assert_eq!(block_text(&events, index, "partial_json"), call.arguments);
        }
        // Each block closes before the next opens; the thinking block carries a signature.
        let stops = events
            .iter()
            .filter(|(n, _)| n == "content_block_stop")
            .count();
        assert_eq!(stops, 3);
        assert!(
            events
                .iter()
                .any(|(_, d)| d["delta"]["type"] == "signature_delta")
        );
        let delta = &events[events.len() - 2].1;
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    }

    #[actix_web::test]
    async fn after_a_tool_result_the_answer_is_text() {
        let mut body = request(true, "Plan a trip");
        body["tools"] = json!([{"name": "book_flight", "input_schema": {"type": "object"}}]);
        body["messages"] = json!([
            {"role": "user", "content": "Plan a trip"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "book_flight", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "booked"}]},
        ]);
        let (_, _, text) = post(body, true).await;
        let events = events(&text);
        let delta = &events[events.len() - 2].1;
        assert_eq!(delta["delta"]["stop_reason"], "end_turn", "{text}");
        assert!(!text.contains("tool_use\""), "{text}");
    }
}
