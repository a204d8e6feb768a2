//! `POST /v1/chat/completions`: the OpenAI request and the plan derived from it (text, length,
//! reasoning, tool calls, faults); `openai` encodes the answer.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::Deserialize;

use crate::directive::Directives;
use crate::error::ApiError;
use crate::openai;
use crate::scenario::{DEFAULT_ARG_CHUNK, Plan, Scenario, Shape};
use crate::state::AppState;
use crate::text;

/// The parts of an OpenAI chat request the mock reads; everything else (`temperature`,
/// `response_format`, …) is accepted and ignored, since the answer is deterministic.
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
    #[serde(default)]
    tools: Option<Vec<RequestTool>>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Content>,
}

/// `{"type": "function", "function": {"name": …}}`: only the name matters to the mock.
#[derive(Debug, Deserialize)]
struct RequestTool {
    function: RequestFunction,
}

#[derive(Debug, Deserialize)]
struct RequestFunction {
    name: String,
}

impl ChatRequest {
    /// The tool names the answer's calls use, in turn, and whether the request itself asks
    /// for a call: it declares tools, `tool_choice` is not `"none"`, and the conversation does
    /// not end with a tool result (then the model answers in text).
    fn tools(&self) -> (Vec<String>, bool) {
        let declared: Vec<String> = self
            .tools
            .iter()
            .flatten()
            .map(|t| t.function.name.clone())
            .collect();
        let chosen = self
            .tool_choice
            .as_ref()
            .and_then(|c| c["function"]["name"].as_str())
            .map(str::to_owned);
        let none = self.tool_choice.as_ref().and_then(|c| c.as_str()) == Some("none");
        let after_tool_result =
            self.messages.last().and_then(|m| m.role.as_deref()) == Some("tool");
        let names = match chosen {
            Some(name) => vec![name],
            None => declared,
        };
        let wants_call = !names.is_empty() && !none && !after_tool_result;
        (names, wants_call)
    }
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

/// An answer and how the OpenAI encoder frames it.
#[derive(Debug)]
pub struct Answer {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub plan: Plan,
    /// `stream_options.include_usage` (and no `no_usage` directive).
    pub include_usage: bool,
    /// `no_usage`: never any usage, not even in a whole response.
    pub no_usage: bool,
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

    let contents: Vec<String> = request
        .messages
        .iter()
        .map(|m| m.content.as_ref().map(Content::text).unwrap_or_default())
        .collect();
    let cap = [request.max_completion_tokens, request.max_tokens]
        .into_iter()
        .flatten()
        .min()
        .map(|cap| usize::try_from(cap).unwrap_or(usize::MAX));
    let (tool_names, request_wants_call) = request.tools();
    let planned = plan_answer(
        &state,
        &Request {
            model: &model,
            contents: &contents,
            cap,
            tool_names,
            wants_call: request_wants_call,
        },
    )?;
    let include_usage = !planned.no_usage
        && request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    let answer = Answer {
        id: state.completion_id(),
        model,
        created: openai::unix_time().as_secs(),
        plan: planned.plan,
        include_usage,
        no_usage: planned.no_usage,
    };

    if request.stream.unwrap_or(false) {
        Ok(openai::stream_response(answer, &state))
    } else {
        openai::whole_response(answer).await
    }
}

/// What the planner needs of a request, whatever its wire format.
pub struct Request<'a> {
    /// The model name (its `mock:k=v,…` directives apply first).
    pub model: &'a str,
    /// Every message's text, in order (a system prompt first).
    pub contents: &'a [String],
    /// `max_tokens`: caps the answer text.
    pub cap: Option<usize>,
    /// Names of the declared tools (or the one the request forces), used in turn.
    pub tool_names: Vec<String>,
    /// Whether the request itself asks for a tool call.
    pub wants_call: bool,
}

/// A planned answer, and whether usage is suppressed.
pub struct Planned {
    pub plan: Plan,
    /// `no_usage`: never any usage.
    pub no_usage: bool,
}

/// The answer to a request, from its directives: an injected status fails here; otherwise
/// the scenario (text, reasoning, tool calls), its delay and its in-stream fault. Shared by
/// every wire format, so each tells the same answer.
pub fn plan_answer(state: &AppState, request: &Request<'_>) -> Result<Planned, ApiError> {
    let mut directives = Directives::default();
    directives
        .apply_model(request.model)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    for content in request.contents {
        directives
            .apply_content(content)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let prompt = text::prompt_text(request.contents);

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
    let tool_calls = directives.tools.unwrap_or(usize::from(request.wants_call));
    // An answer with tool calls has no text unless `tokens=` asks for some.
    let wanted = match (directives.tokens, tool_calls) {
        (Some(tokens), _) => tokens,
        (None, 0) => settings.default_tokens,
        (None, _) => 0,
    };
    // `max_tokens` caps the text; reasoning and tool calls are planned whole.
    let (count, truncated) = match request.cap {
        Some(cap) if cap < wanted => (cap, true),
        _ => (wanted, false),
    };
    let seed = directives.seed.unwrap_or(settings.seed);
    let shape = Shape {
        text_tokens: count,
        truncated,
        reasoning: directives.reasoning.unwrap_or(0),
        tool_calls,
        tool_names: request.tool_names.clone(),
        arg_chunk: directives.arg_chunk.unwrap_or(DEFAULT_ARG_CHUNK),
    };
    Ok(Planned {
        plan: Plan {
            scenario: Scenario::plan(&prompt, seed, &shape),
            delay: Duration::from_millis(directives.delay_ms.unwrap_or(settings.token_delay_ms)),
            stamp: directives.stamp,
            fault: directives.mid_stream_fault().filter(|_| fault_fires),
        },
        no_usage: directives.no_usage,
    })
}
