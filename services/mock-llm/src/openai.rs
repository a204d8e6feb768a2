//! The OpenAI wire format of an answer: the `chat.completion.chunk` SSE stream (a role chunk,
//! one chunk per [`Piece`], the finish chunk, the usage chunk, `[DONE]`) or one
//! `chat.completion` object. Reasoning goes in `delta.reasoning_content` (as DeepSeek, vLLM
//! and others send it), tool calls in `delta.tool_calls` as OpenAI streams them: the first
//! chunk of a call carries `index`, `id`, `type` and `function.name` with empty arguments,
//! later chunks `index` and an arguments fragment.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use bytes::Bytes;
use serde::Serialize;

use crate::chat::Answer;
use crate::directive::MidStreamFault;
use crate::error::{self, ApiError};
use crate::scenario::{Piece, Playback, Played, Usage};
use crate::state::{AppState, Outcome, StreamGuard};

/// Pause before an injected disconnect, so everything sent so far reaches the client first.
const FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// The non-streaming answer: after the same total delay, one `chat.completion` object.
/// In-stream faults map to their closest non-streaming equivalent.
pub async fn whole_response(answer: Answer) -> Result<HttpResponse, ApiError> {
    let plan = &answer.plan;
    let scenario = &plan.scenario;
    let chunks = scenario.pieces().len();
    let delay = plan
        .delay
        .saturating_mul(u32::try_from(chunks).unwrap_or(u32::MAX));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match plan.fault {
        Some((_, MidStreamFault::Error)) => {
            return Err(ApiError::injected(StatusCode::INTERNAL_SERVER_ERROR, None));
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
    let usage = (!answer.no_usage).then(|| WireUsage::of(scenario.usage()));
    let mut message = serde_json::json!({
        "role": "assistant",
        "content": scenario.text.concat(),
        "refusal": null,
    });
    if !scenario.reasoning.is_empty() {
        message["reasoning_content"] = scenario.reasoning.concat().into();
    }
    if !scenario.tool_calls.is_empty() {
        message["tool_calls"] = scenario
            .tool_calls
            .iter()
            .map(|call| {
                serde_json::json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                })
            })
            .collect();
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": answer.id,
        "object": "chat.completion",
        "created": answer.created,
        "model": answer.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": scenario.finish.openai(),
        }],
        "usage": usage,
    })))
}

pub fn stream_response(answer: Answer, state: &AppState) -> HttpResponse {
    let stream = ChunkStream {
        guard: StreamGuard::start(Arc::clone(&state.stats)),
        meta: Meta {
            id: answer.id,
            model: answer.model,
            created: answer.created,
            include_usage: answer.include_usage,
        },
        playback: Playback::new(answer.plan),
        phase: Phase::Role,
    };
    let body = futures::stream::unfold(stream, |mut stream| async move {
        let item = stream.next_frame().await?;
        Some((item, stream))
    });
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body)
}

/// Where a stream is in OpenAI's chunk sequence.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Role,
    /// The scenario's chunks, played back.
    Pieces,
    Usage,
    Done,
    End,
}

/// What every chunk of one completion repeats.
struct Meta {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

/// One streaming completion; dropping it (actix does when the client leaves) counts the end.
struct ChunkStream {
    meta: Meta,
    playback: Playback,
    phase: Phase,
    guard: StreamGuard,
}

impl ChunkStream {
    /// The next SSE frame, `Err` to abort the connection, or `None` at the end.
    async fn next_frame(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        match self.phase {
            Phase::Role => {
                self.phase = Phase::Pieces;
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                };
                Some(self.meta.chunk(delta, None, None))
            }
            Phase::Pieces => {
                let meta = &self.meta;
                match self.playback.next().await {
                    Played::Piece { piece, sent_at_us } => {
                        Some(meta.chunk(delta_of(piece), None, Some(sent_at_us)))
                    }
                    Played::Fault(fault) => self.fire(fault).await,
                    Played::End => {
                        self.phase = if self.meta.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                        let finish = Some(self.playback.plan.scenario.finish.openai());
                        Some(self.meta.chunk(Delta::default(), finish, None))
                    }
                }
            }
            Phase::Usage => {
                self.phase = Phase::Done;
                let chunk = Chunk {
                    id: &self.meta.id,
                    object: "chat.completion.chunk",
                    created: self.meta.created,
                    model: &self.meta.model,
                    choices: &[],
                    usage: Some(Some(WireUsage::of(self.playback.plan.scenario.usage()))),
                    x_mock_sent_at_us: None,
                };
                Some(frame(&chunk))
            }
            Phase::Done => {
                self.phase = Phase::End;
                self.guard.outcome = Outcome::Completed;
                Some(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
            }
            Phase::End => None,
        }
    }

    async fn fire(&mut self, fault: MidStreamFault) -> Option<Result<Bytes, std::io::Error>> {
        match fault {
            MidStreamFault::Error => {
                self.phase = Phase::End;
                self.guard.outcome = Outcome::Aborted;
                let body = error::Body {
                    message: "mock-llm: injected stream error",
                    kind: "server_error",
                    param: None,
                    code: Some("stream_error"),
                };
                Some(frame(&serde_json::json!({ "error": body })))
            }
            MidStreamFault::Disconnect => {
                self.phase = Phase::End;
                self.guard.outcome = Outcome::Aborted;
                // Returning `Pending` once lets actix flush what is buffered (headers and the
                // tokens so far); an immediate `Err` would drop them with the connection and
                // the client would see a failed request instead of a broken stream.
                tokio::time::sleep(FLUSH_PAUSE).await;
                // An `Err` body item makes actix drop the connection without the chunked
                // terminator: the client sees a truncated body, like a crashed upstream.
                Some(Err(std::io::Error::other("mock-llm: injected disconnect")))
            }
            // Until the client leaves; then actix drops this future and the guard counts it.
            MidStreamFault::Stall => std::future::pending().await,
        }
    }
}

/// The `delta` of one content chunk.
fn delta_of(piece: Piece<'_>) -> Delta<'_> {
    match piece {
        Piece::Text(text) => Delta {
            content: Some(text),
            ..Delta::default()
        },
        Piece::Reasoning(text) => Delta {
            reasoning_content: Some(text),
            ..Delta::default()
        },
        Piece::ToolCallStart { index, id, name } => Delta {
            tool_calls: Some([ToolCallChunk {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionChunk {
                    name: Some(name),
                    arguments: "",
                },
            }]),
            ..Delta::default()
        },
        Piece::ToolCallArguments { index, fragment } => Delta {
            tool_calls: Some([ToolCallChunk {
                index,
                id: None,
                kind: None,
                function: FunctionChunk {
                    name: None,
                    arguments: fragment,
                },
            }]),
            ..Delta::default()
        },
    }
}

impl Meta {
    fn chunk(
        &self,
        delta: Delta<'_>,
        finish_reason: Option<&str>,
        x_mock_sent_at_us: Option<u64>,
    ) -> Result<Bytes, std::io::Error> {
        let choice = Choice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        };
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: std::slice::from_ref(&choice),
            // OpenAI: with include_usage, every other chunk carries `"usage": null`.
            usage: self.include_usage.then_some(None),
            x_mock_sent_at_us,
        };
        frame(&chunk)
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct CompletionDetails {
    reasoning_tokens: u32,
}

impl WireUsage {
    fn of(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            completion_tokens_details: (usage.reasoning_tokens > 0).then_some(CompletionDetails {
                reasoning_tokens: usage.reasoning_tokens,
            }),
        }
    }
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    /// Absent, `null`, or the totals: OpenAI distinguishes all three.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<WireUsage>>,
    /// When the mock sent this token (Unix µs); benchmarks subtract it from arrival time.
    #[serde(skip_serializing_if = "Option::is_none")]
    x_mock_sent_at_us: Option<u64>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallChunk<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallChunk<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    function: FunctionChunk<'a>,
}

#[derive(Serialize)]
struct FunctionChunk<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// `data: <json>\n\n`.
fn frame(value: &impl Serialize) -> Result<Bytes, std::io::Error> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut buf, value)?;
    buf.extend_from_slice(b"\n\n");
    Ok(Bytes::from(buf))
}

pub fn unix_time() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
