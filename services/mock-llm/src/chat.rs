//! `POST /v1/chat/completions`: the OpenAI request, the plan derived from it (text, length,
//! faults), and the `chat.completion.chunk` SSE stream or `chat.completion` object.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::{HttpResponse, web};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::directive::{Directives, MidStreamFault};
use crate::error::{self, ApiError};
use crate::state::{AppState, Outcome, StreamGuard};
use crate::text;

/// The parts of an OpenAI chat request the mock reads; everything else (`temperature`, tools,
/// roles, …) is accepted and ignored, since the text is deterministic.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Content>,
}

/// OpenAI allows a plain string or an array of parts; only text parts count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Pause before an injected disconnect, so everything sent so far reaches the client first.
const FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// What one request will get, decided before the first byte.
#[derive(Debug)]
struct Plan {
    id: String,
    model: String,
    created: u64,
    tokens: Vec<String>,
    finish_reason: &'static str,
    prompt_tokens: u32,
    delay: Duration,
    include_usage: bool,
    /// `stamp=1`: each token's content ends with `|<send time, Unix µs>`.
    stamp: bool,
    /// The in-stream fault, when one fires for this request.
    fault: Option<(usize, MidStreamFault)>,
}

impl Plan {
    fn usage(&self) -> Usage {
        let completion_tokens = u32::try_from(self.tokens.len()).unwrap_or(u32::MAX);
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

pub async fn chat_completions(
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    state
        .stats
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty"));
    }
    let model = request
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "mock".to_owned());

    let mut directives = Directives::default();
    directives
        .apply_model(&model)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let contents: Vec<String> = request
        .messages
        .iter()
        .map(|m| m.content.as_ref().map(Content::text).unwrap_or_default())
        .collect();
    for content in &contents {
        directives
            .apply_content(content)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let prompt = text::prompt_text(&contents);

    // `fail_times` turns a fault off after the first N identical requests (retries succeed).
    let fault_fires = match directives.fail_times {
        Some(times) if directives.has_fault() => {
            state.should_fail(format!("{}\n{prompt}", directives.fault_key()), times)
        }
        _ => true,
    };
    if fault_fires && let Some(status) = directives.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        tracing::debug!(%status, "mock: injected status");
        return Err(ApiError::injected(status, directives.retry_after));
    }

    let settings = &state.settings;
    let wanted = directives.tokens.unwrap_or(settings.default_tokens);
    let cap = [request.max_completion_tokens, request.max_tokens]
        .into_iter()
        .flatten()
        .min()
        .map(|cap| usize::try_from(cap).unwrap_or(usize::MAX));
    let (count, finish_reason) = match cap {
        Some(cap) if cap < wanted => (cap, "length"),
        _ => (wanted, "stop"),
    };
    let seed = directives.seed.unwrap_or(settings.seed);
    let include_usage = !directives.no_usage
        && request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    let plan = Plan {
        id: state.completion_id(),
        model,
        created: unix_time().as_secs(),
        tokens: text::completion_tokens(&prompt, seed, count),
        finish_reason,
        prompt_tokens: text::count_prompt_tokens(&prompt),
        delay: Duration::from_millis(directives.delay_ms.unwrap_or(settings.token_delay_ms)),
        include_usage,
        stamp: directives.stamp,
        fault: directives.mid_stream_fault().filter(|_| fault_fires),
    };

    if request.stream.unwrap_or(false) {
        Ok(stream_response(plan, &state))
    } else {
        whole_response(plan, directives.no_usage).await
    }
}

/// The non-streaming answer: after the same total delay, one `chat.completion` object.
/// In-stream faults map to their closest non-streaming equivalent.
async fn whole_response(plan: Plan, no_usage: bool) -> Result<HttpResponse, ApiError> {
    let delay = plan
        .delay
        .saturating_mul(u32::try_from(plan.tokens.len()).unwrap_or(u32::MAX));
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
    let usage = (!no_usage).then(|| plan.usage());
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": plan.tokens.concat(), "refusal": null},
            "logprobs": null,
            "finish_reason": plan.finish_reason,
        }],
        "usage": usage,
    })))
}

fn stream_response(plan: Plan, state: &AppState) -> HttpResponse {
    let stream = ChunkStream {
        guard: StreamGuard::start(Arc::clone(&state.stats)),
        plan,
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
    /// Next token to send.
    Token(usize),
    Finish,
    Usage,
    Done,
    End,
}

/// One streaming completion; dropping it (actix does when the client leaves) counts the end.
struct ChunkStream {
    plan: Plan,
    phase: Phase,
    guard: StreamGuard,
}

impl ChunkStream {
    /// The next SSE frame, `Err` to abort the connection, or `None` at the end.
    async fn next_frame(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            match self.phase {
                Phase::Role => {
                    self.phase = Phase::Token(0);
                    let delta = Delta {
                        role: Some("assistant"),
                        content: Some(""),
                    };
                    return Some(self.chunk(delta, None, None));
                }
                Phase::Token(index) => {
                    // A fault past the end fires after the last token, so it always fires.
                    if let Some((at, fault)) = self.plan.fault
                        && index == at.min(self.plan.tokens.len())
                    {
                        return self.fire(fault).await;
                    }
                    if index >= self.plan.tokens.len() {
                        self.phase = Phase::Finish;
                        continue;
                    }
                    if !self.plan.delay.is_zero() {
                        tokio::time::sleep(self.plan.delay).await;
                    }
                    self.phase = Phase::Token(index + 1);
                    let sent_at = u64::try_from(unix_time().as_micros()).unwrap_or(u64::MAX);
                    let token = self.plan.tokens.get(index).map(String::as_str);
                    let stamped = token
                        .filter(|_| self.plan.stamp)
                        .map(|token| format!("{token}|{sent_at}"));
                    let delta = Delta {
                        role: None,
                        content: stamped.as_deref().or(token),
                    };
                    return Some(self.chunk(delta, None, Some(sent_at)));
                }
                Phase::Finish => {
                    self.phase = if self.plan.include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    let finish = Some(self.plan.finish_reason);
                    return Some(self.chunk(Delta::default(), finish, None));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let chunk = Chunk {
                        id: &self.plan.id,
                        object: "chat.completion.chunk",
                        created: self.plan.created,
                        model: &self.plan.model,
                        choices: &[],
                        usage: Some(Some(self.plan.usage())),
                        x_mock_sent_at_us: None,
                    };
                    return Some(frame(&chunk));
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    self.guard.outcome = Outcome::Completed;
                    return Some(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                }
                Phase::End => return None,
            }
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
            id: &self.plan.id,
            object: "chat.completion.chunk",
            created: self.plan.created,
            model: &self.plan.model,
            choices: std::slice::from_ref(&choice),
            // OpenAI: with include_usage, every other chunk carries `"usage": null`.
            usage: self.plan.include_usage.then_some(None),
            x_mock_sent_at_us,
        };
        frame(&chunk)
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
    usage: Option<Option<Usage>>,
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
}

/// `data: <json>\n\n`.
fn frame(value: &impl Serialize) -> Result<Bytes, std::io::Error> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut buf, value)?;
    buf.extend_from_slice(b"\n\n");
    Ok(Bytes::from(buf))
}

fn unix_time() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
