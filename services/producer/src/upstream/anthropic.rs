//! The Anthropic Messages adapter: `POST {base_url}/messages` with `stream: true` on reqwest,
//! its server-sent events parsed by `eventsource-stream`, and the mapping of Anthropic's event
//! sequence to the producer's [`Delta`]s. No Anthropic shape leaves this module.
//!
//! Anthropic streams an answer as content blocks, each opened by `content_block_start`, grown by
//! `content_block_delta`s and closed by `content_block_stop`, between `message_start` (input
//! usage) and `message_delta` (stop reason, output usage) + `message_stop`. A block is text,
//! a tool call (`tool_use`, its input streamed as JSON fragments) or reasoning (`thinking`).
//! Tool calls are numbered by their position among the answer's `tool_use` blocks, the
//! `index` OpenAI-style clients expect, not by the block index (text blocks count there too).

use std::collections::HashMap;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use service_kit::config::ModelSettings;
use stream_schema::message::{
    ContentPart, MessageContent, ResponseFormat, ToolChoice, ToolChoiceMode,
};
use stream_schema::{ChatMessage, FinishReason, Job, Role};

use super::{Delta, DeltaStream, UpstreamError, error_message, truncate};

/// One configured Anthropic model: where to send requests, with which headers.
pub struct Messages {
    http: reqwest::Client,
    /// `{base_url}/messages`.
    url: String,
    /// The `x-api-key` value; empty for keyless upstreams (mock-llm).
    key: String,
    version: String,
    model: String,
    default_max_tokens: u32,
}

impl Messages {
    pub fn new(settings: &ModelSettings, http: reqwest::Client, key: String) -> Self {
        Self {
            http,
            url: format!("{}/messages", settings.base_url.trim_end_matches('/')),
            key,
            version: settings.anthropic_version.clone(),
            model: settings.upstream_model.clone(),
            default_max_tokens: settings.default_max_tokens,
        }
    }

    /// Sends the request once and returns the open stream of deltas.
    pub async fn open(&self, job: &Job) -> Result<DeltaStream, UpstreamError> {
        let body = request_body(&self.model, self.default_max_tokens, job)?;
        let mut request = self
            .http
            .post(&self.url)
            .header("anthropic-version", &self.version)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if !self.key.is_empty() {
            request = request.header("x-api-key", &self.key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            // Seconds only, as for OpenAI; Anthropic sends that form.
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.bytes().await.unwrap_or_default();
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                // `{"type":"error","error":{"type":…,"message":…}}`: the same `error.message`
                // path as OpenAI's body.
                message: truncate(error_message(&body)),
                retry_after,
            });
        }
        let mut decoder = Decoder::default();
        let events = response.bytes_stream().eventsource();
        Ok(Box::pin(events.flat_map(move |event| {
            let deltas = match event {
                Ok(event) => decoder.event(&event.data),
                Err(error) => vec![Err(UpstreamError::Stream(error.to_string()))],
            };
            futures::stream::iter(deltas)
        })))
    }
}

/// The Messages request of a job. OpenAI's shapes become Anthropic's: system messages the
/// top-level `system`; content parts text and image blocks; an assistant's `tool_calls`
/// `tool_use` blocks; `tool` messages `tool_result` blocks of a user turn (consecutive results
/// share one turn, as Anthropic requires); `tools` with their JSON schema as `input_schema`;
/// `tool_choice` `required` as `any`; `stop` as `stop_sequences`. `max_tokens` is required by
/// the API. `seed` has no Anthropic equivalent and is left out; a JSON `response_format`
/// cannot be expressed, so such a request is refused rather than answered in another form.
fn request_body(
    model: &str,
    default_max_tokens: u32,
    job: &Job,
) -> Result<serde_json::Value, UpstreamError> {
    let system: Vec<String> = job
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(ChatMessage::text_content)
        .collect();
    let mut messages: Vec<serde_json::Value> = Vec::new();
    for message in job.messages.iter().filter(|m| m.role != Role::System) {
        match message.role {
            Role::System => {}
            Role::User => messages.push(json!({"role": "user", "content": content(message)})),
            Role::Assistant => {
                let mut blocks = match content(message) {
                    serde_json::Value::String(text) if text.is_empty() => Vec::new(),
                    serde_json::Value::String(text) => vec![json!({"type": "text", "text": text})],
                    serde_json::Value::Array(blocks) => blocks,
                    _ => Vec::new(),
                };
                for call in &message.tool_calls {
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": tool_input(&call.function.arguments)?,
                    }));
                }
                messages.push(json!({"role": "assistant", "content": blocks}));
            }
            Role::Tool => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id.clone().unwrap_or_default(),
                    "content": message.text_content(),
                });
                // Results of one turn's calls go back together, in one user turn.
                match messages.last_mut() {
                    Some(last) if is_tool_results(last) => {
                        if let Some(blocks) = last["content"].as_array_mut() {
                            blocks.push(result);
                        }
                    }
                    _ => messages.push(json!({"role": "user", "content": [result]})),
                }
            }
        }
    }
    if messages.is_empty() {
        return Err(UpstreamError::Invalid(
            "an Anthropic request needs at least one user or assistant message".to_owned(),
        ));
    }
    let mut body = json!({
        "model": model,
        "max_tokens": job.max_tokens.unwrap_or(default_max_tokens),
        "messages": messages,
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if let Some(temperature) = job.temperature {
        body["temperature"] = json!(temperature);
    }
    let options = &job.options;
    if let Some(top_p) = options.top_p {
        body["top_p"] = json!(top_p);
    }
    if !options.stop.is_empty() {
        body["stop_sequences"] = json!(options.stop);
    }
    if !options.tools.is_empty() {
        let tools: Vec<serde_json::Value> = options
            .tools
            .iter()
            .map(|tool| {
                let mut out = json!({
                    "name": tool.function.name,
                    "input_schema": tool
                        .function
                        .parameters
                        .clone()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                });
                if let Some(description) = &tool.function.description {
                    out["description"] = json!(description);
                }
                out
            })
            .collect();
        body["tools"] = json!(tools);
    }
    if let Some(choice) = &options.tool_choice {
        body["tool_choice"] = match choice {
            ToolChoice::Mode(ToolChoiceMode::None) => json!({"type": "none"}),
            ToolChoice::Mode(ToolChoiceMode::Auto) => json!({"type": "auto"}),
            ToolChoice::Mode(ToolChoiceMode::Required) => json!({"type": "any"}),
            ToolChoice::Function(named) => json!({"type": "tool", "name": named.function.name}),
        };
    }
    match &options.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(_) => {
            return Err(UpstreamError::Invalid(
                "response_format json_object / json_schema has no Anthropic Messages equivalent"
                    .to_owned(),
            ));
        }
    }
    Ok(body)
}

/// A message's content for Anthropic: its string, or its parts as text and image blocks.
fn content(message: &ChatMessage) -> serde_json::Value {
    match &message.content {
        None => json!(""),
        Some(MessageContent::Text(text)) => json!(text),
        Some(MessageContent::Parts(parts)) => json!(
            parts
                .iter()
                .map(|part| match part {
                    ContentPart::Text { text } => json!({"type": "text", "text": text}),
                    ContentPart::ImageUrl { image_url } => image(&image_url.url),
                })
                .collect::<Vec<_>>()
        ),
    }
}

/// An image block: a `data:` URL as base64 source, anything else as a URL source.
fn image(url: &str) -> serde_json::Value {
    let data = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"));
    match data {
        Some((media_type, data)) => json!({"type": "image", "source": {
            "type": "base64", "media_type": media_type, "data": data}}),
        None => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

/// A call's arguments as the `input` object Anthropic wants (empty arguments are `{}`).
fn tool_input(arguments: &str) -> Result<serde_json::Value, UpstreamError> {
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(arguments).map_err(|e| {
        UpstreamError::Invalid(format!("tool call arguments are not a JSON object: {e}"))
    })
}

fn is_tool_results(message: &serde_json::Value) -> bool {
    message["role"] == "user"
        && message["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().all(|b| b["type"] == "tool_result"))
}

/// The `data:` object of an Anthropic stream event; its `type` repeats the SSE event name.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<UsageBody>,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorBody,
    },
    /// Anthropic may add event types; unknown ones are ignored, as its docs ask.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<UsageBody>,
}

#[derive(Debug, Default, Deserialize)]
struct UsageBody {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
}

impl UsageBody {
    /// Every input token the request was billed for, cached or not.
    fn prompt_tokens(&self) -> Option<u32> {
        let input = self.input_tokens?;
        Some(
            input
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0)),
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    /// `redacted_thinking`, server tools and whatever comes next: nothing a client reads.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    /// `signature_delta` (the thinking block's signature) and unknown kinds.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// What an open content block is, by its block index.
#[derive(Debug, Clone, Copy)]
enum OpenBlock {
    Text,
    /// A `tool_use` block and its position among the answer's tool calls.
    ToolUse(u32),
    Thinking,
    Ignored,
}

/// The state of one stream's mapping: open blocks, counted tool calls, what `message_start`
/// and `message_delta` said.
#[derive(Debug, Default)]
struct Decoder {
    blocks: HashMap<u32, OpenBlock>,
    tool_calls: u32,
    prompt_tokens: Option<u32>,
    stop_reason: Option<String>,
}

impl Decoder {
    /// The deltas of one event's `data:`; an `error` event or unreadable data breaks the
    /// stream like a dropped connection.
    fn event(&mut self, data: &str) -> Vec<Result<Delta, UpstreamError>> {
        let event = match serde_json::from_str::<Event>(data) {
            Ok(event) => event,
            Err(error) => {
                return vec![Err(UpstreamError::Stream(truncate(format!(
                    "unreadable Anthropic event: {error}"
                ))))];
            }
        };
        let delta = match event {
            Event::MessageStart { message } => {
                self.prompt_tokens = message.usage.as_ref().and_then(UsageBody::prompt_tokens);
                None
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => self.start_block(index, content_block),
            Event::ContentBlockDelta { index, delta } => self.block_delta(index, delta),
            Event::ContentBlockStop { index } => {
                self.blocks.remove(&index);
                None
            }
            Event::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                // `output_tokens` is cumulative; newer API versions repeat the input counts.
                usage.and_then(|usage| {
                    let prompt_tokens = usage.prompt_tokens().or(self.prompt_tokens)?;
                    Some(Delta::Usage {
                        prompt_tokens,
                        completion_tokens: usage.output_tokens?,
                        // Anthropic counts thinking in `output_tokens` without a breakdown.
                        reasoning_tokens: None,
                    })
                })
            }
            // The answer is complete only here: a stream cut after `message_delta` is broken.
            Event::MessageStop => Some(Delta::Finish(finish_reason(self.stop_reason.as_deref()))),
            Event::Ping | Event::Unknown => None,
            Event::Error { error } => {
                return vec![Err(UpstreamError::Stream(truncate(format!(
                    "{}: {}",
                    error.kind, error.message
                ))))];
            }
        };
        delta.into_iter().map(Ok).collect()
    }

    fn start_block(&mut self, index: u32, block: Block) -> Option<Delta> {
        let (open, delta) = match block {
            Block::Text { text } => (
                OpenBlock::Text,
                (!text.is_empty()).then_some(Delta::Text(text)),
            ),
            Block::ToolUse { id, name } => {
                let position = self.tool_calls;
                self.tool_calls += 1;
                let delta = Delta::ToolCall {
                    index: position,
                    id: Some(id),
                    name: Some(name),
                    arguments_fragment: String::new(),
                };
                (OpenBlock::ToolUse(position), Some(delta))
            }
            Block::Thinking { thinking } => (
                OpenBlock::Thinking,
                (!thinking.is_empty()).then_some(Delta::Reasoning(thinking)),
            ),
            Block::Other => (OpenBlock::Ignored, None),
        };
        self.blocks.insert(index, open);
        delta
    }

    fn block_delta(&self, index: u32, delta: BlockDelta) -> Option<Delta> {
        let block = self.blocks.get(&index).copied()?;
        match (block, delta) {
            (OpenBlock::Text, BlockDelta::TextDelta { text }) if !text.is_empty() => {
                Some(Delta::Text(text))
            }
            (OpenBlock::ToolUse(position), BlockDelta::InputJsonDelta { partial_json })
                if !partial_json.is_empty() =>
            {
                Some(Delta::ToolCall {
                    index: position,
                    id: None,
                    name: None,
                    arguments_fragment: partial_json,
                })
            }
            (OpenBlock::Thinking, BlockDelta::ThinkingDelta { thinking })
                if !thinking.is_empty() =>
            {
                Some(Delta::Reasoning(thinking))
            }
            _ => None,
        }
    }
}

/// Anthropic's `stop_reason` in the bridge's terms.
fn finish_reason(stop_reason: Option<&str>) -> FinishReason {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("refusal") => FinishReason::ContentFilter,
        Some("tool_use") => FinishReason::ToolCalls,
        // `end_turn`, `stop_sequence`, `pause_turn`.
        _ => FinishReason::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stream_schema::ChatOptions;

    /// Runs recorded stream text through the same SSE parser and mapping as a live stream,
    /// cut into small chunks so events span reads.
    async fn deltas_of(text: &str) -> Vec<Result<Delta, String>> {
        let chunks: Vec<Result<bytes::Bytes, std::convert::Infallible>> = text
            .as_bytes()
            .chunks(7)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        let mut events = futures::stream::iter(chunks).eventsource();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => out.extend(
                    decoder
                        .event(&event.data)
                        .into_iter()
                        .map(|d| d.map_err(|e| e.to_string())),
                ),
                Err(error) => out.push(Err(error.to_string())),
            }
        }
        out
    }

    /// Anthropic's documented example of a streamed text answer.
    const TEXT_STREAM: &str = r#"event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-1", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}

event: message_stop
data: {"type": "message_stop"}

"#;

    #[tokio::test]
    async fn a_text_answer_becomes_text_usage_and_finish() {
        assert_eq!(
            deltas_of(TEXT_STREAM).await,
            vec![
                Ok(Delta::Text("Hello".to_owned())),
                Ok(Delta::Text("!".to_owned())),
                Ok(Delta::Usage {
                    prompt_tokens: 25,
                    completion_tokens: 15,
                    reasoning_tokens: None,
                }),
                Ok(Delta::Finish(FinishReason::Stop)),
            ]
        );
    }

    /// Anthropic's documented tool-use example: text, then a tool call whose input arrives in
    /// fragments, ending with `stop_reason: tool_use`.
    const TOOL_STREAM: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-opus-4-1","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let's check the weather."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02","name":"get_time","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

    fn tool(index: u32, id: Option<&str>, name: Option<&str>, fragment: &str) -> Delta {
        Delta::ToolCall {
            index,
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            arguments_fragment: fragment.to_owned(),
        }
    }

    #[tokio::test]
    async fn tool_use_blocks_become_tool_calls_numbered_among_themselves() {
        assert_eq!(
            deltas_of(TOOL_STREAM).await,
            vec![
                Ok(Delta::Text("Okay, let's check the weather.".to_owned())),
                Ok(tool(
                    0,
                    Some("toolu_01T1x1fJ34qAmk2tNTrN7Up6"),
                    Some("get_weather"),
                    ""
                )),
                Ok(tool(0, None, None, "{\"location\":")),
                Ok(tool(0, None, None, " \"San Francisco, CA\"}")),
                Ok(tool(1, Some("toolu_02"), Some("get_time"), "")),
                Ok(tool(1, None, None, "{}")),
                Ok(Delta::Usage {
                    prompt_tokens: 472,
                    completion_tokens: 89,
                    reasoning_tokens: None,
                }),
                Ok(Delta::Finish(FinishReason::ToolCalls)),
            ]
        );
    }

    /// Extended thinking: the thinking block streams reasoning, its signature is dropped.
    const THINKING_STREAM: &str = r#"event: message_start
data: {"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me solve this step by step:\n\n1. First break down 27 * 453"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: content_block_start
data: {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "27 * 453 = 12,231"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 1}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"output_tokens": 100}}

event: message_stop
data: {"type": "message_stop"}

"#;

    #[tokio::test]
    async fn thinking_blocks_become_reasoning() {
        assert_eq!(
            deltas_of(THINKING_STREAM).await,
            vec![
                Ok(Delta::Reasoning(
                    "Let me solve this step by step:\n\n1. First break down 27 * 453".to_owned()
                )),
                Ok(Delta::Text("27 * 453 = 12,231".to_owned())),
                Ok(Delta::Usage {
                    prompt_tokens: 15,
                    completion_tokens: 100,
                    reasoning_tokens: None,
                }),
                Ok(Delta::Finish(FinishReason::Length)),
            ]
        );
    }

    #[tokio::test]
    async fn an_error_event_breaks_the_stream() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n\
                    event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
        let deltas = deltas_of(text).await;
        assert_eq!(deltas.len(), 1, "{deltas:?}");
        let error = deltas[0].as_ref().err().cloned().unwrap_or_default();
        assert!(error.contains("overloaded_error: Overloaded"), "{error}");
    }

    #[tokio::test]
    async fn a_stream_cut_before_message_stop_has_no_finish() {
        let cut = TEXT_STREAM
            .split("event: message_stop")
            .next()
            .unwrap_or_default();
        let deltas = deltas_of(cut).await;
        assert!(
            !deltas.iter().any(|d| matches!(d, Ok(Delta::Finish(_)))),
            "{deltas:?}"
        );
    }

    #[tokio::test]
    async fn unknown_events_and_blocks_are_ignored() {
        let text = "event: future_event\ndata: {\"type\":\"future_event\",\"x\":1}\n\n\
                    event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"redacted_thinking\",\"data\":\"abc\"}}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\n";
        assert!(deltas_of(text).await.is_empty());
    }

    #[test]
    fn system_messages_go_to_system_and_max_tokens_is_always_set() -> anyhow::Result<()> {
        let mut job = crate::worker::testing::job()?;
        job.messages = vec![
            ChatMessage::text(Role::System, "Be brief."),
            ChatMessage::text(Role::User, "Hi"),
            ChatMessage::text(Role::Assistant, "Hello"),
        ];
        let body = request_body("claude", 512, &job)?;
        assert_eq!(body["system"], "Be brief.");
        assert_eq!(body["max_tokens"], 512);
        assert_eq!(body["stream"], true);
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}])
        );
        job.max_tokens = Some(7);
        assert_eq!(request_body("claude", 512, &job)?["max_tokens"], 7);
        Ok(())
    }

    #[test]
    fn tool_calls_results_tools_and_images_take_anthropics_shapes() -> anyhow::Result<()> {
        let mut job = crate::worker::testing::job()?;
        let messages = json!([
            {"role": "user", "content": [
                {"type": "text", "text": "What is here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
            {"role": "assistant", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "look", "arguments": "{\"at\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "tool", "tool_call_id": "call_2", "content": "a dog"},
        ]);
        job.messages = serde_json::from_value(messages)?;
        job.options = ChatOptions {
            tools: serde_json::from_value(json!([{"type": "function", "function": {
                "name": "look", "description": "Look",
                "parameters": {"type": "object", "properties": {"at": {"type": "integer"}}}}}]))?,
            tool_choice: Some(ToolChoice::Mode(ToolChoiceMode::Required)),
            stop: vec!["END".to_owned()],
            top_p: Some(0.5),
            ..ChatOptions::default()
        };
        let body = request_body("claude", 512, &job)?;
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "look", "input": {"at": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "look", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "a dog"}]},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"name": "look", "description": "Look", "input_schema":
                {"type": "object", "properties": {"at": {"type": "integer"}}}}])
        );
        assert_eq!(body["tool_choice"], json!({"type": "any"}));
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["top_p"], 0.5);

        job.options = ChatOptions {
            response_format: Some(ResponseFormat::JsonObject),
            ..ChatOptions::default()
        };
        assert!(matches!(
            request_body("claude", 512, &job),
            Err(UpstreamError::Invalid(_))
        ));
        Ok(())
    }
}
