//! The OpenAI Chat Completions view of one request's stream entries: a pure state machine from
//! `(entry id, SessionEvent)` to `chat.completion.chunk` SSE messages (and, for `stream:
//! false`, to one `chat.completion` object).
//!
//! Message ids: the `k`-th message an entry produces has the id `<entry id>` when `k` is 0 and
//! `<entry id>:<k>` otherwise, so `Last-Event-ID` names an exact message even when one entry
//! gives several (`complete` gives the finish chunk, the usage chunk and `[DONE]`; the usage
//! chunk's number is kept when it is not sent, so ids do not depend on `include_usage`).
//!
//! Producer failover (`restart`): an OpenAI client cannot drop text it has shown. The view
//! remembers what it sent (content, reasoning, each tool call's id, name and arguments); the
//! new attempt's output is checked against it and suppressed while it reproduces the sent
//! prefix, then continues after it. When the new attempt differs from what was sent (other
//! text, another tool call id, or an answer that ends shorter), the stream ends with an error
//! chunk (`type: server_error`, `code: stream_restarted`), which the SDKs raise.
//!
//! Model: every chunk names the model the client asked for, also after a fallback moved the
//! request to another model (`restart` with `servedBy`). OpenAI's `model` is the model that
//! answered, but a client that asked for `gpt-4` and sees another id mid-stream cannot tell a
//! fallback from a bug; the serving model is in the native `start`/`restart` events.
//!
//! Resume: the view's state depends on every earlier entry of the request, so a resumed stream
//! feeds the request's entries from its `start` and only writes the messages after the resume
//! position (`Position`).

use std::fmt;

use serde_json::{Value, json};
use stream_schema::{EntryId, ErrorCode, FinishReason, SessionEvent, Usage};

use crate::prefix::{Diverged, SentPrefix};

/// One SSE message position: message `part` of the messages of entry `entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub entry: EntryId,
    pub part: u32,
}

impl Position {
    /// Reads `<entry id>` or `<entry id>:<part>` (what the `id:` fields carry).
    pub fn parse(raw: &str) -> Option<Self> {
        let (entry, part) = match raw.split_once(':') {
            Some((entry, part)) => (entry, part.parse().ok()?),
            None => (raw, 0),
        };
        Some(Self {
            entry: EntryId::parse(entry).ok()?,
            part,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.part == 0 {
            write!(f, "{}", self.entry)
        } else {
            write!(f, "{}:{}", self.entry, self.part)
        }
    }
}

/// How the request ended, for the `chat.completion` object.
#[derive(Debug, Clone)]
enum Outcome {
    Finished {
        finish_reason: &'static str,
        usage: Usage,
    },
    /// The `{"error": …}` object the stream ended with.
    Failed { status: u16, error: Value },
}

/// The messages one entry gives, and whether the stream ends after them.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Full SSE messages (`id:` and `data:` lines), already filtered by the resume position.
    pub messages: Vec<String>,
    pub end: bool,
}

/// One completion's view (see the module comment).
#[derive(Debug)]
pub struct CompletionView {
    id: String,
    model: String,
    include_usage: bool,
    /// Messages up to this position were sent on an earlier connection.
    resume: Option<Position>,
    created: u64,
    sent: SentPrefix,
    outcome: Option<Outcome>,
}

/// OpenAI's `finish_reason` for ours. `cancelled` is `stop` (the answer ends where the cancel
/// stopped it) and `rate_limited` (the key's hard token cap) is `length`.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::RateLimited => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
    }
}

fn usage_json(usage: &Usage) -> Value {
    let mut value = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
    });
    if let (Some(reasoning), Some(object)) = (usage.reasoning_tokens, value.as_object_mut()) {
        object.insert(
            "completion_tokens_details".to_owned(),
            json!({ "reasoning_tokens": reasoning }),
        );
    }
    value
}

/// The `{"error": …}` object of a failed request and the HTTP status a non-streaming answer
/// gives it.
fn error_json(code: ErrorCode, message: &str) -> (u16, Value) {
    let (status, kind) = match code {
        ErrorCode::Unauthorized => (401, "authentication_error"),
        ErrorCode::Unavailable => (503, "server_error"),
        _ => (500, "server_error"),
    };
    (
        status,
        json!({ "error": { "message": message, "type": kind, "code": code.as_str() } }),
    )
}

fn diverged_json() -> Value {
    json!({ "error": {
        "message": "the answer changed when another producer took over; retry the request",
        "type": "server_error",
        "code": "stream_restarted",
    } })
}

impl CompletionView {
    pub fn new(id: String, model: String, include_usage: bool, resume: Option<Position>) -> Self {
        Self {
            id,
            model,
            include_usage,
            resume,
            created: 0,
            sent: SentPrefix::default(),
            outcome: None,
        }
    }

    /// The messages of one entry of the request (entries in stream order, from its `start`).
    pub fn feed(&mut self, entry: EntryId, event: &SessionEvent) -> Step {
        if self.outcome.is_some() {
            return Step {
                messages: Vec::new(),
                end: true,
            };
        }
        let (data, end) = match self.data(event) {
            Ok(step) => step,
            Err(Diverged) => {
                let error = diverged_json();
                self.outcome = Some(Outcome::Failed {
                    status: 500,
                    error: error.clone(),
                });
                (vec![Some(error.to_string())], true)
            }
        };
        let mut messages = Vec::with_capacity(data.len());
        for (part, data) in data.into_iter().enumerate() {
            // An empty slot keeps the numbering of the messages after it (the usage chunk's
            // slot: positions do not depend on `include_usage`).
            let Some(data) = data else { continue };
            let position = Position {
                entry,
                part: u32::try_from(part).unwrap_or(u32::MAX),
            };
            if self.resume.is_some_and(|resume| position <= resume) {
                continue;
            }
            messages.push(format!("id: {position}\ndata: {data}\n\n"));
        }
        Step { messages, end }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> String {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        })
        .to_string()
    }

    /// The `data:` payloads of one event, and whether the stream ends after them.
    fn data(&mut self, event: &SessionEvent) -> Result<(Vec<Option<String>>, bool), Diverged> {
        let mut out = Vec::new();
        match event {
            SessionEvent::Start { timestamp, .. } => {
                self.created = timestamp / 1000;
                out.push(Some(
                    self.chunk(json!({ "role": "assistant", "content": "" }), None),
                ));
            }
            SessionEvent::Token { content, .. } => {
                let rest = self.sent.text(content)?;
                if !rest.is_empty() {
                    out.push(Some(self.chunk(json!({ "content": rest }), None)));
                }
            }
            SessionEvent::Reasoning { content, .. } => {
                let rest = self.sent.reasoning(content)?;
                if !rest.is_empty() {
                    out.push(Some(self.chunk(json!({ "reasoning_content": rest }), None)));
                }
            }
            SessionEvent::ToolCall {
                index,
                id,
                name,
                arguments,
                ..
            } => {
                if let Some(delta) =
                    self.tool_call(*index, id.as_ref(), name.as_ref(), arguments)?
                {
                    out.push(Some(self.chunk(json!({ "tool_calls": [delta] }), None)));
                }
            }
            SessionEvent::Restart { .. } => self.sent.restart(),
            SessionEvent::Complete {
                finish_reason: reason,
                usage,
                ..
            } => {
                self.sent.check_complete()?;
                let reason = finish_reason(*reason);
                out.push(Some(self.chunk(json!({}), Some(reason))));
                out.push(self.include_usage.then(|| {
                    json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(usage),
                    })
                    .to_string()
                }));
                out.push(Some("[DONE]".to_owned()));
                self.outcome = Some(Outcome::Finished {
                    finish_reason: reason,
                    usage: *usage,
                });
                return Ok((out, true));
            }
            SessionEvent::Error { code, message, .. } => {
                let (status, error) = error_json(*code, message);
                out.push(Some(error.to_string()));
                self.outcome = Some(Outcome::Failed { status, error });
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }

    /// A tool call fragment: the `tool_calls` delta to send, if any.
    fn tool_call(
        &mut self,
        index: u32,
        id: Option<&String>,
        name: Option<&String>,
        arguments: &str,
    ) -> Result<Option<Value>, Diverged> {
        let Some(fragment) = self.sent.tool_call(index, id, name, arguments)? else {
            return Ok(None);
        };
        if !fragment.first {
            return Ok(Some(
                json!({ "index": index, "function": { "arguments": fragment.arguments } }),
            ));
        }
        // New to the client: its first delta carries the id, type and name.
        let mut function = json!({ "arguments": fragment.arguments });
        let mut delta = json!({ "index": index, "type": "function" });
        if let (Some(name), Some(object)) = (name, function.as_object_mut()) {
            object.insert("name".to_owned(), json!(name));
        }
        if let Some(object) = delta.as_object_mut() {
            if let Some(id) = id {
                object.insert("id".to_owned(), json!(id));
            }
            object.insert("function".to_owned(), function);
        }
        Ok(Some(delta))
    }

    /// The `chat.completion` object (`Ok`) or the error object and its HTTP status (`Err`)
    /// once the request ended; `None` before.
    pub fn completion(&self) -> Option<Result<Value, (u16, Value)>> {
        match self.outcome.as_ref()? {
            Outcome::Failed { status, error } => Some(Err((*status, error.clone()))),
            Outcome::Finished {
                finish_reason,
                usage,
            } => {
                let mut message = json!({ "role": "assistant" });
                let object = message.as_object_mut()?;
                let has_calls = !self.sent.calls().is_empty();
                object.insert(
                    "content".to_owned(),
                    if self.sent.content().is_empty() && has_calls {
                        Value::Null
                    } else {
                        json!(self.sent.content())
                    },
                );
                if !self.sent.reasoning_text().is_empty() {
                    object.insert(
                        "reasoning_content".to_owned(),
                        json!(self.sent.reasoning_text()),
                    );
                }
                if has_calls {
                    let calls: Vec<Value> = self
                        .sent
                        .calls()
                        .values()
                        .map(|call| {
                            json!({
                                "id": call.id,
                                "type": "function",
                                "function": { "name": call.name, "arguments": call.arguments },
                            })
                        })
                        .collect();
                    object.insert("tool_calls".to_owned(), json!(calls));
                }
                Some(Ok(json!({
                    "id": self.id,
                    "object": "chat.completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{
                        "index": 0,
                        "message": message,
                        "finish_reason": finish_reason,
                    }],
                    "usage": usage_json(usage),
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use stream_schema::{ModelId, RequestId, SessionId, UsageSource};

    fn rid() -> RequestId {
        RequestId::new()
    }

    fn entry(ms: u64) -> EntryId {
        EntryId { ms, seq: 0 }
    }

    fn start(request_id: RequestId) -> SessionEvent {
        SessionEvent::Start {
            request_id,
            session_id: SessionId::parse("s").unwrap_or_else(|_| unreachable!()),
            model_id: ModelId::parse("m").unwrap_or_else(|_| unreachable!()),
            attempt: 1,
            timestamp: 1_700_000_000_000,
        }
    }

    fn token(request_id: RequestId, sequence: u64, content: &str) -> SessionEvent {
        SessionEvent::Token {
            request_id,
            sequence,
            content: content.to_owned(),
            timestamp: 0,
        }
    }

    fn reasoning(request_id: RequestId, sequence: u64, content: &str) -> SessionEvent {
        SessionEvent::Reasoning {
            request_id,
            sequence,
            content: content.to_owned(),
            timestamp: 0,
        }
    }

    fn call(
        request_id: RequestId,
        index: u32,
        head: Option<(&str, &str)>,
        arguments: &str,
    ) -> SessionEvent {
        SessionEvent::ToolCall {
            request_id,
            sequence: 0,
            index,
            id: head.map(|(id, _)| id.to_owned()),
            name: head.map(|(_, name)| name.to_owned()),
            arguments: arguments.to_owned(),
            timestamp: 0,
        }
    }

    fn restart(request_id: RequestId) -> SessionEvent {
        SessionEvent::Restart {
            request_id,
            attempt: 2,
            reason: "producer lost".to_owned(),
            served_by: None,
            timestamp: 0,
        }
    }

    fn complete(request_id: RequestId, reason: FinishReason) -> SessionEvent {
        SessionEvent::Complete {
            request_id,
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                source: UsageSource::Counted,
                reasoning_tokens: Some(2),
            },
            timestamp: 0,
        }
    }

    /// Every message of a run of events, numbered by entry.
    fn run(view: &mut CompletionView, events: &[SessionEvent]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, event) in events.iter().enumerate() {
            out.extend(view.feed(entry(i as u64 + 1), event).messages);
        }
        out
    }

    fn view(include_usage: bool) -> CompletionView {
        CompletionView::new("chatcmpl-x".to_owned(), "m".to_owned(), include_usage, None)
    }

    /// The JSON of every `data:` line but `[DONE]`.
    fn payloads(messages: &[String]) -> Vec<Value> {
        messages
            .iter()
            .filter_map(|m| m.split_once("data: ").map(|(_, d)| d.trim_end()))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }

    /// What an SDK accumulates from the deltas: content, reasoning, calls (id, name, args).
    fn accumulate(messages: &[String]) -> (String, String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut thinking = String::new();
        let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
        for chunk in payloads(messages) {
            let delta = &chunk["choices"][0]["delta"];
            content.push_str(delta["content"].as_str().unwrap_or(""));
            thinking.push_str(delta["reasoning_content"].as_str().unwrap_or(""));
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let slot = calls
                    .entry(call["index"].as_u64().unwrap_or(99))
                    .or_default();
                slot.0.push_str(call["id"].as_str().unwrap_or(""));
                slot.1
                    .push_str(call["function"]["name"].as_str().unwrap_or(""));
                slot.2
                    .push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        (content, thinking, calls.into_values().collect())
    }

    #[test]
    fn a_text_answer_is_role_deltas_finish_and_done() {
        let r = rid();
        let mut v = view(false);
        let out = run(
            &mut v,
            &[
                start(r),
                token(r, 1, "Hel"),
                token(r, 2, "lo"),
                complete(r, FinishReason::Stop),
            ],
        );
        assert_eq!(out.len(), 5);
        assert!(out[0].starts_with("id: 1-0\ndata: "));
        let first = &payloads(&out)[0];
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["id"], "chatcmpl-x");
        assert_eq!(first["created"], 1_700_000_000);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(accumulate(&out).0, "Hello");
        assert_eq!(payloads(&out)[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(out[4], "id: 4-0:2\ndata: [DONE]\n\n");
    }

    #[test]
    fn usage_comes_as_its_own_chunk_when_asked_for() {
        let r = rid();
        let mut v = view(true);
        let out = run(&mut v, &[start(r), complete(r, FinishReason::Length)]);
        let chunks = payloads(&out);
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[2]["choices"], json!([]));
        assert_eq!(chunks[2]["usage"]["total_tokens"], 7);
        assert_eq!(
            chunks[2]["usage"]["completion_tokens_details"]["reasoning_tokens"],
            2
        );
        assert!(out[3].ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn tool_calls_and_reasoning_become_their_deltas() {
        let r = rid();
        let mut v = view(false);
        let out = run(
            &mut v,
            &[
                start(r),
                reasoning(r, 1, "think"),
                call(r, 0, Some(("call_1", "get_weather")), "{\"ci"),
                call(r, 0, None, "ty\":1}"),
                call(r, 1, Some(("call_2", "now")), "{}"),
                complete(r, FinishReason::ToolCalls),
            ],
        );
        let (content, thinking, calls) = accumulate(&out);
        assert_eq!(content, "");
        assert_eq!(thinking, "think");
        assert_eq!(
            calls,
            vec![
                (
                    "call_1".to_owned(),
                    "get_weather".to_owned(),
                    "{\"city\":1}".to_owned()
                ),
                ("call_2".to_owned(), "now".to_owned(), "{}".to_owned()),
            ]
        );
        let chunks = payloads(&out);
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["tool_calls"][0]["type"],
            "function"
        );
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "tool_calls");
        let completion = v.completion().and_then(Result::ok).unwrap_or_default();
        let message = &completion["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(message["reasoning_content"], "think");
        assert_eq!(message["tool_calls"][1]["function"]["name"], "now");
        assert_eq!(completion["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_restart_that_reproduces_the_prefix_continues_after_it() {
        let r = rid();
        let mut v = view(false);
        let out = run(
            &mut v,
            &[
                start(r),
                token(r, 1, "Hello "),
                token(r, 2, "wor"),
                restart(r),
                token(r, 1, "Hel"),
                token(r, 2, "lo world"),
                token(r, 3, "!"),
                complete(r, FinishReason::Stop),
            ],
        );
        assert_eq!(accumulate(&out).0, "Hello world!");
        let completion = v.completion().and_then(Result::ok).unwrap_or_default();
        assert_eq!(
            completion["choices"][0]["message"]["content"],
            "Hello world!"
        );
    }

    #[test]
    fn a_restart_that_diverges_ends_with_stream_restarted() {
        let r = rid();
        let mut v = view(false);
        let events = [
            start(r),
            token(r, 1, "Hello"),
            restart(r),
            token(r, 1, "Howdy"),
            token(r, 2, "more"),
        ];
        let mut steps = Vec::new();
        for (i, event) in events.iter().enumerate() {
            steps.push(v.feed(entry(i as u64 + 1), event));
        }
        assert!(steps[3].end);
        let error = &payloads(&steps[3].messages)[0]["error"];
        assert_eq!(error["code"], "stream_restarted");
        assert_eq!(error["type"], "server_error");
        assert!(steps[4].messages.is_empty() && steps[4].end);
        assert_eq!(
            v.completion()
                .and_then(Result::err)
                .map(|(status, _)| status),
            Some(500)
        );
    }

    #[test]
    fn a_restart_that_ends_shorter_diverges() {
        let r = rid();
        let mut v = view(false);
        let out = run(
            &mut v,
            &[
                start(r),
                token(r, 1, "Hello"),
                restart(r),
                token(r, 1, "Hel"),
                complete(r, FinishReason::Stop),
            ],
        );
        assert_eq!(
            payloads(&out).last().map(|c| c["error"]["code"].clone()),
            Some(json!("stream_restarted"))
        );
    }

    #[test]
    fn a_restart_with_another_tool_call_id_diverges() {
        let r = rid();
        let mut v = view(false);
        let out = run(
            &mut v,
            &[
                start(r),
                call(r, 0, Some(("call_1", "f")), "{"),
                restart(r),
                call(r, 0, Some(("call_9", "f")), "{"),
            ],
        );
        assert_eq!(
            payloads(&out).last().map(|c| c["error"]["code"].clone()),
            Some(json!("stream_restarted"))
        );
    }

    #[test]
    fn an_error_event_is_an_error_object_and_ends() {
        let r = rid();
        let mut v = view(false);
        let step_start = v.feed(entry(1), &start(r));
        assert!(!step_start.end);
        let step = v.feed(
            entry(2),
            &SessionEvent::Error {
                request_id: r,
                code: ErrorCode::UpstreamError,
                message: "boom".to_owned(),
                retryable: true,
                timestamp: 0,
            },
        );
        assert!(step.end);
        assert_eq!(step.messages.len(), 1);
        assert!(step.messages[0].starts_with("id: 2-0\n"));
        assert_eq!(
            payloads(&step.messages),
            vec![
                json!({"error": {"message": "boom", "type": "server_error", "code": "upstream_error"}})
            ]
        );
    }

    #[test]
    fn resuming_from_any_message_gives_exactly_the_rest() {
        let r = rid();
        let events = [
            start(r),
            reasoning(r, 1, "hm"),
            token(r, 2, "Hello "),
            call(r, 0, Some(("call_1", "f")), "{}"),
            restart(r),
            reasoning(r, 1, "h"),
            reasoning(r, 2, "m"),
            token(r, 3, "Hello world"),
            call(r, 0, Some(("call_1", "f")), "{}"),
            complete(r, FinishReason::ToolCalls),
        ];
        let full = run(&mut view(true), &events);
        for (cut, message) in full.iter().enumerate() {
            let id = message
                .strip_prefix("id: ")
                .and_then(|rest| rest.split_once('\n'))
                .map(|(id, _)| id)
                .unwrap_or_default();
            let resume = Position::parse(id);
            assert!(resume.is_some(), "{id}");
            let mut resumed =
                CompletionView::new("chatcmpl-x".to_owned(), "m".to_owned(), true, resume);
            assert_eq!(run(&mut resumed, &events), full[cut + 1..].to_vec());
        }
    }

    #[test]
    fn positions_read_what_they_write() {
        for raw in ["5-0", "5-3:2", "170000-12:10"] {
            assert_eq!(
                Position::parse(raw).map(|p| p.to_string()).as_deref(),
                Some(raw)
            );
        }
        assert!(Position::parse("x").is_none());
        assert!(Position::parse("5-0:x").is_none());
    }

    #[test]
    fn chunks_name_the_requested_model_after_a_fallback() {
        let r = rid();
        let mut v = view(false);
        let fallback = SessionEvent::Restart {
            request_id: r,
            attempt: 2,
            reason: "fallback".to_owned(),
            served_by: ModelId::parse("other").ok(),
            timestamp: 0,
        };
        let out = run(
            &mut v,
            &[
                start(r),
                fallback,
                token(r, 1, "Hi"),
                complete(r, FinishReason::Stop),
            ],
        );
        let models: Vec<Value> = payloads(&out).iter().map(|c| c["model"].clone()).collect();
        assert_eq!(models, vec![json!("m"); 3]);
        let completion = v.completion().and_then(Result::ok).unwrap_or_default();
        assert_eq!(completion["model"], "m");
    }

    #[test]
    fn cancelled_finishes_as_stop() {
        assert_eq!(finish_reason(FinishReason::Cancelled), "stop");
        assert_eq!(finish_reason(FinishReason::RateLimited), "length");
    }
}
