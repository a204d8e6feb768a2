//! The AI SDK view of one request's stream entries: a pure state machine from `SessionEvent`s
//! to UI message stream parts (protocol v1 of the `ai` package, `uiMessageChunkSchema`), each
//! one SSE message `data: {json}`, ended by `data: [DONE]`.
//!
//! `start` (the request id as `messageId`) and `start-step` open the message; text and
//! reasoning come as blocks (`text-start` / `text-delta` / `text-end` with ids `text-<n>`,
//! likewise `reasoning-<n>`), a block closing when another kind of content begins; a tool call
//! is `tool-input-start` and `tool-input-delta`s, and `tool-input-available` with the arguments
//! parsed as JSON once the request completes (`tool-input-error` when they are not JSON). Then
//! `finish-step` and `finish` (with `finishReason`), or `abort` for a cancelled request, or
//! `error` (`errorText`) for a failed one.
//!
//! Producer failover (`restart`): as the OpenAI view, through `SentPrefix`: the new attempt
//! continues after what the client has, or the stream ends with an `error` part when it
//! diverges. The view has no resume position: the AI SDK resumes by replaying the answer from
//! its `start`.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use stream_schema::{FinishReason, SessionEvent};

use crate::prefix::{Diverged, SentPrefix};

/// The block of content open on the client, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text(u32),
    Reasoning(u32),
}

/// What one entry gives.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Full SSE messages (`data: …\n\n`).
    pub messages: Vec<String>,
    /// The stream ends after them.
    pub end: bool,
}

/// One answer's UI message stream (see the module comment).
#[derive(Debug, Default)]
pub struct UiMessageView {
    message_id: String,
    sent: SentPrefix,
    open: Option<Block>,
    /// Blocks opened so far, numbering the next one's id.
    blocks: u32,
    /// Each tool call's id and name as the client was told, by index.
    calls: BTreeMap<u32, (String, String)>,
    ended: bool,
}

/// The AI SDK's `finishReason` for ours (`cancelled` ends with `abort` instead).
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::RateLimited => "length",
        FinishReason::ContentFilter => "content-filter",
        FinishReason::ToolCalls => "tool-calls",
    }
}

/// One SSE message of the stream.
pub fn message(part: &Value) -> String {
    format!("data: {part}\n\n")
}

/// The end of every UI message stream.
pub const DONE: &str = "data: [DONE]\n\n";

/// The `error` part and the end of the stream, for an end the stream did not record.
pub fn error_end(text: &str) -> String {
    format!(
        "{}{DONE}",
        message(&json!({ "type": "error", "errorText": text }))
    )
}

impl UiMessageView {
    pub fn new(message_id: String) -> Self {
        Self {
            message_id,
            ..Self::default()
        }
    }

    /// The messages of one entry of the request (entries in stream order, from its `start`).
    pub fn feed(&mut self, event: &SessionEvent) -> Step {
        if self.ended {
            return Step {
                messages: Vec::new(),
                end: true,
            };
        }
        let mut parts = Vec::new();
        let end = match self.parts(event, &mut parts) {
            Ok(end) => end,
            Err(Diverged) => {
                parts.push(json!({
                    "type": "error",
                    "errorText": "the answer changed when another producer took over; \
                        send the message again",
                }));
                true
            }
        };
        let mut messages: Vec<String> = parts.iter().map(message).collect();
        if end {
            self.ended = true;
            messages.push(DONE.to_owned());
        }
        Step { messages, end }
    }

    /// Closes the open block, if any.
    fn close(&mut self, parts: &mut Vec<Value>) {
        match self.open.take() {
            Some(Block::Text(n)) => {
                parts.push(json!({ "type": "text-end", "id": format!("text-{n}") }))
            }
            Some(Block::Reasoning(n)) => {
                parts.push(json!({ "type": "reasoning-end", "id": format!("reasoning-{n}") }));
            }
            None => {}
        }
    }

    /// Opens a block of the kind `make` builds, unless one is open; returns its id.
    fn open(&mut self, parts: &mut Vec<Value>, text: bool) -> String {
        let current = match self.open {
            Some(Block::Text(n)) if text => Some(format!("text-{n}")),
            Some(Block::Reasoning(n)) if !text => Some(format!("reasoning-{n}")),
            _ => None,
        };
        if let Some(id) = current {
            return id;
        }
        self.close(parts);
        let n = self.blocks;
        self.blocks += 1;
        let (block, id, kind) = if text {
            (Block::Text(n), format!("text-{n}"), "text-start")
        } else {
            (
                Block::Reasoning(n),
                format!("reasoning-{n}"),
                "reasoning-start",
            )
        };
        self.open = Some(block);
        parts.push(json!({ "type": kind, "id": id }));
        id
    }

    /// The parts of one event; whether the stream ends after them.
    fn parts(&mut self, event: &SessionEvent, parts: &mut Vec<Value>) -> Result<bool, Diverged> {
        match event {
            SessionEvent::Start { .. } => {
                parts.push(json!({ "type": "start", "messageId": self.message_id }));
                parts.push(json!({ "type": "start-step" }));
            }
            SessionEvent::Token { content, .. } => {
                let rest = self.sent.text(content)?;
                if !rest.is_empty() {
                    let id = self.open(parts, true);
                    parts.push(json!({ "type": "text-delta", "id": id, "delta": rest }));
                }
            }
            SessionEvent::Reasoning { content, .. } => {
                let rest = self.sent.reasoning(content)?;
                if !rest.is_empty() {
                    let id = self.open(parts, false);
                    parts.push(json!({ "type": "reasoning-delta", "id": id, "delta": rest }));
                }
            }
            SessionEvent::ToolCall {
                index,
                id,
                name,
                arguments,
                ..
            } => {
                if let Some(fragment) =
                    self.sent
                        .tool_call(*index, id.as_ref(), name.as_ref(), arguments)?
                {
                    if fragment.first {
                        self.close(parts);
                        let call_id = id.clone().unwrap_or_else(|| format!("call_{index}"));
                        let tool = name.clone().unwrap_or_default();
                        parts.push(json!({
                            "type": "tool-input-start", "toolCallId": call_id, "toolName": tool,
                        }));
                        self.calls.insert(*index, (call_id, tool));
                    }
                    if let Some((call_id, _)) = self.calls.get(index)
                        && !fragment.arguments.is_empty()
                    {
                        parts.push(json!({
                            "type": "tool-input-delta", "toolCallId": call_id,
                            "inputTextDelta": fragment.arguments,
                        }));
                    }
                }
            }
            SessionEvent::Restart { .. } => self.sent.restart(),
            SessionEvent::Complete {
                finish_reason: reason,
                ..
            } => {
                self.sent.check_complete()?;
                self.close(parts);
                for (index, call) in self.sent.calls() {
                    let Some((call_id, tool)) = self.calls.get(index) else {
                        continue;
                    };
                    // Arguments of a call without any are an empty object.
                    let raw = if call.arguments.trim().is_empty() {
                        "{}"
                    } else {
                        call.arguments.as_str()
                    };
                    parts.push(match serde_json::from_str::<Value>(raw) {
                        Ok(input) => json!({
                            "type": "tool-input-available", "toolCallId": call_id,
                            "toolName": tool, "input": input,
                        }),
                        Err(error) => json!({
                            "type": "tool-input-error", "toolCallId": call_id,
                            "toolName": tool, "input": call.arguments,
                            "errorText": format!("the arguments are not JSON: {error}"),
                        }),
                    });
                }
                parts.push(json!({ "type": "finish-step" }));
                if *reason == FinishReason::Cancelled {
                    parts.push(json!({ "type": "abort" }));
                } else {
                    parts.push(json!({ "type": "finish", "finishReason": finish_reason(*reason) }));
                }
                return Ok(true);
            }
            SessionEvent::Error { code, message, .. } => {
                self.close(parts);
                parts.push(json!({
                    "type": "error",
                    "errorText": format!("{}: {message}", code.as_str()),
                }));
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stream_schema::{ErrorCode, ModelId, RequestId, SessionId, Usage, UsageSource};

    fn start(r: RequestId) -> SessionEvent {
        SessionEvent::Start {
            request_id: r,
            session_id: SessionId::parse("s").unwrap_or_else(|_| unreachable!()),
            model_id: ModelId::parse("m").unwrap_or_else(|_| unreachable!()),
            attempt: 1,
            timestamp: 0,
        }
    }

    fn token(r: RequestId, content: &str) -> SessionEvent {
        SessionEvent::Token {
            request_id: r,
            sequence: 0,
            content: content.to_owned(),
            timestamp: 0,
        }
    }

    fn reasoning(r: RequestId, content: &str) -> SessionEvent {
        SessionEvent::Reasoning {
            request_id: r,
            sequence: 0,
            content: content.to_owned(),
            timestamp: 0,
        }
    }

    fn call(r: RequestId, index: u32, head: Option<(&str, &str)>, args: &str) -> SessionEvent {
        SessionEvent::ToolCall {
            request_id: r,
            sequence: 0,
            index,
            id: head.map(|(id, _)| id.to_owned()),
            name: head.map(|(_, name)| name.to_owned()),
            arguments: args.to_owned(),
            timestamp: 0,
        }
    }

    fn restart(r: RequestId) -> SessionEvent {
        SessionEvent::Restart {
            request_id: r,
            attempt: 2,
            reason: "lost".to_owned(),
            served_by: None,
            timestamp: 0,
        }
    }

    fn complete(r: RequestId, reason: FinishReason) -> SessionEvent {
        SessionEvent::Complete {
            request_id: r,
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                source: UsageSource::Counted,
                reasoning_tokens: None,
            },
            timestamp: 0,
        }
    }

    /// Every part of a run, as JSON (`[DONE]` as the string "DONE").
    fn run(events: &[SessionEvent]) -> Vec<Value> {
        let mut view = UiMessageView::new("msg-1".to_owned());
        let mut out = Vec::new();
        for event in events {
            for message in view.feed(event).messages {
                let data = message
                    .strip_prefix("data: ")
                    .and_then(|m| m.strip_suffix("\n\n"))
                    .unwrap_or_default();
                out.push(if data == "[DONE]" {
                    json!("DONE")
                } else {
                    serde_json::from_str(data).unwrap_or_default()
                });
            }
        }
        out
    }

    fn types(parts: &[Value]) -> Vec<String> {
        parts
            .iter()
            .map(|p| p["type"].as_str().unwrap_or("DONE").to_owned())
            .collect()
    }

    fn text_of(parts: &[Value], kind: &str) -> String {
        parts
            .iter()
            .filter(|p| p["type"] == kind)
            .filter_map(|p| p["delta"].as_str())
            .collect()
    }

    #[test]
    fn a_text_answer_is_one_text_block_between_start_and_finish() {
        let r = RequestId::new();
        let parts = run(&[
            start(r),
            token(r, "Hel"),
            token(r, "lo"),
            complete(r, FinishReason::Stop),
        ]);
        assert_eq!(
            types(&parts),
            [
                "start",
                "start-step",
                "text-start",
                "text-delta",
                "text-delta",
                "text-end",
                "finish-step",
                "finish",
                "DONE"
            ]
        );
        assert_eq!(parts[0]["messageId"], "msg-1");
        assert_eq!(parts[2]["id"], "text-0");
        assert_eq!(
            parts[3],
            json!({"type": "text-delta", "id": "text-0", "delta": "Hel"})
        );
        assert_eq!(parts[7]["finishReason"], "stop");
        assert_eq!(text_of(&parts, "text-delta"), "Hello");
    }

    #[test]
    fn reasoning_text_and_tool_calls_become_their_parts() {
        let r = RequestId::new();
        let parts = run(&[
            start(r),
            reasoning(r, "hm"),
            token(r, "Hi"),
            call(r, 0, Some(("call_1", "weather")), "{\"ci"),
            call(r, 0, None, "ty\":1}"),
            call(r, 1, Some(("call_2", "now")), ""),
            complete(r, FinishReason::ToolCalls),
        ]);
        assert_eq!(
            types(&parts),
            [
                "start",
                "start-step",
                "reasoning-start",
                "reasoning-delta",
                "reasoning-end",
                "text-start",
                "text-delta",
                "text-end",
                "tool-input-start",
                "tool-input-delta",
                "tool-input-delta",
                "tool-input-start",
                "tool-input-available",
                "tool-input-available",
                "finish-step",
                "finish",
                "DONE"
            ]
        );
        assert_eq!(parts[2]["id"], "reasoning-0");
        assert_eq!(parts[5]["id"], "text-1");
        assert_eq!(
            parts[8],
            json!({"type": "tool-input-start", "toolCallId": "call_1", "toolName": "weather"})
        );
        assert_eq!(parts[10]["inputTextDelta"], "ty\":1}");
        assert_eq!(parts[12]["input"], json!({"city": 1}));
        assert_eq!(parts[13]["input"], json!({}));
        assert_eq!(parts[13]["toolName"], "now");
        assert_eq!(parts[15]["finishReason"], "tool-calls");
    }

    #[test]
    fn arguments_that_are_not_json_are_an_input_error() {
        let r = RequestId::new();
        let parts = run(&[
            start(r),
            call(r, 0, Some(("c", "f")), "{oops"),
            complete(r, FinishReason::ToolCalls),
        ]);
        let error = parts
            .iter()
            .find(|p| p["type"] == "tool-input-error")
            .cloned()
            .unwrap_or_default();
        assert_eq!(error["input"], "{oops");
        assert!(error["errorText"].is_string());
    }

    #[test]
    fn a_cancel_ends_with_abort_and_an_error_with_error() {
        let r = RequestId::new();
        let parts = run(&[
            start(r),
            token(r, "a"),
            complete(r, FinishReason::Cancelled),
        ]);
        assert_eq!(
            types(&parts)[4..],
            ["text-end", "finish-step", "abort", "DONE"]
        );
        let parts = run(&[
            start(r),
            SessionEvent::Error {
                request_id: r,
                code: ErrorCode::UpstreamError,
                message: "boom".to_owned(),
                retryable: true,
                timestamp: 0,
            },
        ]);
        assert_eq!(parts[2]["type"], "error");
        assert_eq!(parts[2]["errorText"], "upstream_error: boom");
        assert_eq!(parts[3], "DONE");
    }

    #[test]
    fn a_failover_that_reproduces_the_prefix_shows_nothing_twice() {
        let r = RequestId::new();
        let parts = run(&[
            start(r),
            token(r, "Hello "),
            token(r, "wor"),
            restart(r),
            token(r, "Hel"),
            token(r, "lo world"),
            token(r, "!"),
            complete(r, FinishReason::Stop),
        ]);
        assert_eq!(text_of(&parts, "text-delta"), "Hello world!");
        assert_eq!(
            parts.iter().filter(|p| p["type"] == "text-start").count(),
            1
        );
        assert_eq!(parts.last(), Some(&json!("DONE")));
    }

    #[test]
    fn a_failover_that_diverges_ends_with_an_error() {
        let r = RequestId::new();
        let mut view = UiMessageView::new("m".to_owned());
        for event in [start(r), token(r, "Hello"), restart(r)] {
            assert!(!view.feed(&event).end);
        }
        let step = view.feed(&token(r, "Howdy"));
        assert!(step.end);
        assert!(step.messages[0].contains("\"type\":\"error\""));
        assert_eq!(step.messages.last().map(String::as_str), Some(DONE));
        assert_eq!(
            view.feed(&token(r, "more")),
            Step {
                messages: Vec::new(),
                end: true
            }
        );
    }
}
