//! Session stream entries: the events a client receives over SSE (SPEC §2 "Event payloads").
//!
//! The same type is encoded to Redis fields (short names, version `v`) and serialized to the
//! client JSON (camelCase, `type` tag).

use serde::Serialize;

use crate::codec::{
    DecodeError, F_VERSION, FieldSink, FieldSource, Fields, Version, bool_field, check_version,
    optional_parsed, parse_bool, parsed, required, string_enum,
};
use crate::ids::{ModelId, RequestId, SessionId};

string_enum! {
    /// Why a request ended without an error.
    pub enum FinishReason {
        Stop = "stop",
        Length = "length",
        Cancelled = "cancelled",
        RateLimited = "rate_limited",
        ContentFilter = "content_filter",
        /// The model asks the application to run the tools of the request's `tool_call`
        /// events (schema version 2).
        ToolCalls = "tool_calls",
    }
}

string_enum! {
    /// Machine-readable cause of an `error` event.
    pub enum ErrorCode {
        /// The upstream LLM failed (connect error, HTTP error, broken stream).
        UpstreamError = "upstream_error",
        /// The upstream did not send a token within its timeout.
        UpstreamTimeout = "upstream_timeout",
        /// The client asked to resume from history that was trimmed or expired.
        HistoryLost = "history_lost",
        /// Redis or another dependency is unreachable; resume later.
        Unavailable = "unavailable",
        /// The request failed too many times and was dead-lettered.
        JobFailed = "job_failed",
        /// A bug or an unexpected state; never caused by the client.
        Internal = "internal",
        /// The API key behind the stream was revoked: the stream ends and must not be retried.
        Unauthorized = "unauthorized",
    }
}

string_enum! {
    /// Where the usage figures of a `complete` event come from.
    pub enum UsageSource {
        /// Reported by the upstream (`stream_options.include_usage`).
        Upstream = "upstream",
        /// The upstream sent none: the producer counted the tokens it streamed.
        Counted = "counted",
    }
}

/// Token usage of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub source: UsageSource,
    /// The part of `completion_tokens` the model spent reasoning, when the upstream reports
    /// it (`completion_tokens_details.reasoning_tokens`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u32>,
}

/// One entry of `llm:stream:{session}:model`, and one SSE `data:` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum SessionEvent {
    /// Written by the gateway when a chat starts, and by nobody else.
    #[serde(rename_all = "camelCase")]
    Start {
        request_id: RequestId,
        session_id: SessionId,
        model_id: ModelId,
        attempt: u32,
        timestamp: u64,
    },
    /// One piece of generated text; `sequence` starts at 1 per attempt, without gaps.
    #[serde(rename_all = "camelCase")]
    Token {
        request_id: RequestId,
        sequence: u64,
        content: String,
        timestamp: u64,
    },
    /// A fragment of a tool call the model makes. Fragments of one call share `index`; `id`
    /// and `name` come with its first fragment only (as the upstream sent them), and the call's
    /// arguments are the concatenation of its fragments' `arguments`, in `sequence` order.
    /// `sequence` is shared with `token` and `reasoning` events.
    #[serde(rename = "tool_call", rename_all = "camelCase")]
    ToolCall {
        request_id: RequestId,
        sequence: u64,
        index: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        arguments: String,
        timestamp: u64,
    },
    /// Reasoning text of a model that thinks before it answers (shown apart from the answer).
    /// `sequence` is shared with `token` and `tool_call` events.
    #[serde(rename_all = "camelCase")]
    Reasoning {
        request_id: RequestId,
        sequence: u64,
        content: String,
        timestamp: u64,
    },
    /// A new attempt began: the client drops the partial text of the earlier attempt. A
    /// producer took over a lost request (`reason: "producer_lost"`), or the request moved to
    /// the next model of its fallback chain before its first token (`reason: "fallback"`).
    #[serde(rename_all = "camelCase")]
    Restart {
        request_id: RequestId,
        attempt: u32,
        reason: String,
        /// The model that serves the request from this attempt on (the `modelId` of `start`
        /// unless the request fell back). Absent in entries written before it existed.
        #[serde(skip_serializing_if = "Option::is_none")]
        served_by: Option<ModelId>,
        timestamp: u64,
    },
    #[serde(rename_all = "camelCase")]
    Complete {
        request_id: RequestId,
        finish_reason: FinishReason,
        usage: Usage,
        timestamp: u64,
    },
    #[serde(rename_all = "camelCase")]
    Error {
        request_id: RequestId,
        code: ErrorCode,
        message: String,
        retryable: bool,
        timestamp: u64,
    },
}

const F_TYPE: &str = "type";
const F_REQUEST: &str = "rid";
const F_SESSION: &str = "sid";
const F_MODEL: &str = "model";
const F_ATTEMPT: &str = "attempt";
const F_SEQ: &str = "seq";
const F_CONTENT: &str = "content";
const F_REASON: &str = "reason";
const F_SERVED_BY: &str = "served";
const F_FINISH: &str = "finish";
const F_PROMPT_TOKENS: &str = "pt";
const F_COMPLETION_TOKENS: &str = "ct";
const F_USAGE_SOURCE: &str = "usrc";
const F_REASONING_TOKENS: &str = "rt";
const F_INDEX: &str = "idx";
const F_CALL_ID: &str = "call";
const F_NAME: &str = "name";
const F_ARGUMENTS: &str = "args";
const F_CODE: &str = "code";
const F_MESSAGE: &str = "msg";
const F_RETRYABLE: &str = "retry";
const F_TIMESTAMP: &str = "ts";

impl SessionEvent {
    pub fn request_id(&self) -> RequestId {
        match self {
            Self::Start { request_id, .. }
            | Self::Token { request_id, .. }
            | Self::ToolCall { request_id, .. }
            | Self::Reasoning { request_id, .. }
            | Self::Restart { request_id, .. }
            | Self::Complete { request_id, .. }
            | Self::Error { request_id, .. } => *request_id,
        }
    }

    /// `complete` and `error` end a request: an SSE response for that request ends after it.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Complete { .. } | Self::Error { .. })
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Start { .. } => "start",
            Self::Token { .. } => "token",
            Self::ToolCall { .. } => "tool_call",
            Self::Reasoning { .. } => "reasoning",
            Self::Restart { .. } => "restart",
            Self::Complete { .. } => "complete",
            Self::Error { .. } => "error",
        }
    }

    /// `sequence` of a content event (`token`, `tool_call`, `reasoning`).
    pub fn sequence(&self) -> Option<u64> {
        match self {
            Self::Token { sequence, .. }
            | Self::ToolCall { sequence, .. }
            | Self::Reasoning { sequence, .. } => Some(*sequence),
            _ => None,
        }
    }

    /// The oldest schema version whose readers understand this event (see
    /// [`crate::SCHEMA_VERSION`]): the kinds and finish reason added in version 2 need it.
    fn version(&self) -> Version {
        match self {
            Self::ToolCall { .. }
            | Self::Reasoning { .. }
            | Self::Complete {
                finish_reason: FinishReason::ToolCalls,
                ..
            } => Version::V2,
            _ => Version::V1,
        }
    }

    /// The SSE `data:` JSON.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail (no maps with non-string keys, no
        // custom serializers that error); an empty object is a safe fallback all the same.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Appends the SSE `data:` JSON (the bytes of [`Self::to_json`]) to `out`: a frame is
    /// written in one buffer, without a string of its own for the JSON.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let start = out.len();
        if serde_json::to_writer(&mut *out, self).is_err() {
            out.truncate(start);
            out.extend_from_slice(b"{}");
        }
    }

    /// Redis fields of this event.
    pub fn encode(&self) -> Fields {
        let mut fields = Fields::new();
        self.write_fields(&mut fields);
        fields
    }

    /// Writes the Redis fields of this event, in order, to `out` (what [`Self::encode`]
    /// collects): a writer that packs them into one buffer allocates nothing per field.
    pub fn write_fields(&self, out: &mut impl FieldSink) {
        out.field(F_VERSION, self.version() as u32);
        out.field(F_TYPE, self.type_name());
        out.field(F_REQUEST, self.request_id());
        match self {
            Self::Start {
                session_id,
                model_id,
                attempt,
                timestamp,
                ..
            } => {
                out.field(F_SESSION, session_id);
                out.field(F_MODEL, model_id);
                out.field(F_ATTEMPT, attempt);
                out.field(F_TIMESTAMP, timestamp);
            }
            Self::Token {
                sequence,
                content,
                timestamp,
                ..
            } => {
                out.field(F_SEQ, sequence);
                out.field(F_CONTENT, content);
                out.field(F_TIMESTAMP, timestamp);
            }
            Self::ToolCall {
                sequence,
                index,
                id,
                name,
                arguments,
                timestamp,
                ..
            } => {
                out.field(F_SEQ, sequence);
                out.field(F_INDEX, index);
                if let Some(id) = id {
                    out.field(F_CALL_ID, id);
                }
                if let Some(name) = name {
                    out.field(F_NAME, name);
                }
                out.field(F_ARGUMENTS, arguments);
                out.field(F_TIMESTAMP, timestamp);
            }
            Self::Reasoning {
                sequence,
                content,
                timestamp,
                ..
            } => {
                out.field(F_SEQ, sequence);
                out.field(F_CONTENT, content);
                out.field(F_TIMESTAMP, timestamp);
            }
            Self::Restart {
                attempt,
                reason,
                served_by,
                timestamp,
                ..
            } => {
                out.field(F_ATTEMPT, attempt);
                out.field(F_REASON, reason);
                if let Some(model) = served_by {
                    out.field(F_SERVED_BY, model);
                }
                out.field(F_TIMESTAMP, timestamp);
            }
            Self::Complete {
                finish_reason,
                usage,
                timestamp,
                ..
            } => {
                out.field(F_FINISH, finish_reason.as_str());
                out.field(F_PROMPT_TOKENS, usage.prompt_tokens);
                out.field(F_COMPLETION_TOKENS, usage.completion_tokens);
                out.field(F_USAGE_SOURCE, usage.source.as_str());
                if let Some(reasoning) = usage.reasoning_tokens {
                    out.field(F_REASONING_TOKENS, reasoning);
                }
                out.field(F_TIMESTAMP, timestamp);
            }
            Self::Error {
                code,
                message,
                retryable,
                timestamp,
                ..
            } => {
                out.field(F_CODE, code.as_str());
                out.field(F_MESSAGE, message);
                out.field(F_RETRYABLE, bool_field(*retryable));
                out.field(F_TIMESTAMP, timestamp);
            }
        }
    }

    pub fn decode<S: FieldSource + ?Sized>(src: &S) -> Result<Self, DecodeError> {
        check_version(src)?;
        let request_id = parsed(src, F_REQUEST)?;
        let timestamp = parsed(src, F_TIMESTAMP)?;
        match required(src, F_TYPE)? {
            "start" => Ok(Self::Start {
                request_id,
                session_id: parsed(src, F_SESSION)?,
                model_id: parsed(src, F_MODEL)?,
                attempt: parsed(src, F_ATTEMPT)?,
                timestamp,
            }),
            "token" => Ok(Self::Token {
                request_id,
                sequence: parsed(src, F_SEQ)?,
                content: required(src, F_CONTENT)?.to_owned(),
                timestamp,
            }),
            "tool_call" => Ok(Self::ToolCall {
                request_id,
                sequence: parsed(src, F_SEQ)?,
                index: parsed(src, F_INDEX)?,
                // Kept exactly as written, an empty string included.
                id: src.field(F_CALL_ID).map(str::to_owned),
                name: src.field(F_NAME).map(str::to_owned),
                arguments: required(src, F_ARGUMENTS)?.to_owned(),
                timestamp,
            }),
            "reasoning" => Ok(Self::Reasoning {
                request_id,
                sequence: parsed(src, F_SEQ)?,
                content: required(src, F_CONTENT)?.to_owned(),
                timestamp,
            }),
            "restart" => Ok(Self::Restart {
                request_id,
                attempt: parsed(src, F_ATTEMPT)?,
                reason: required(src, F_REASON)?.to_owned(),
                served_by: optional_parsed(src, F_SERVED_BY)?,
                timestamp,
            }),
            "complete" => Ok(Self::Complete {
                request_id,
                finish_reason: parsed(src, F_FINISH)?,
                usage: Usage {
                    prompt_tokens: parsed(src, F_PROMPT_TOKENS)?,
                    completion_tokens: parsed(src, F_COMPLETION_TOKENS)?,
                    source: parsed(src, F_USAGE_SOURCE)?,
                    reasoning_tokens: optional_parsed(src, F_REASONING_TOKENS)?,
                },
                timestamp,
            }),
            "error" => Ok(Self::Error {
                request_id,
                code: parsed(src, F_CODE)?,
                message: required(src, F_MESSAGE)?.to_owned(),
                retryable: parse_bool(src, F_RETRYABLE)?,
                timestamp,
            }),
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_owned(fields: Fields) -> Vec<(String, String)> {
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn samples() -> Result<Vec<SessionEvent>, crate::IdError> {
        let request_id = RequestId::new();
        Ok(vec![
            SessionEvent::Start {
                request_id,
                session_id: SessionId::parse("user_123")?,
                model_id: ModelId::parse("gpt-4")?,
                attempt: 1,
                timestamp: 1_703_123_456_789,
            },
            SessionEvent::Token {
                request_id,
                sequence: 1,
                content: " Once\nupon \"a\" time ✨".to_owned(),
                timestamp: 1_703_123_456_790,
            },
            SessionEvent::Restart {
                request_id,
                attempt: 2,
                reason: "producer_lost".to_owned(),
                served_by: None,
                timestamp: 3,
            },
            SessionEvent::Restart {
                request_id,
                attempt: 3,
                reason: "fallback".to_owned(),
                served_by: Some(ModelId::parse("claude")?),
                timestamp: 3,
            },
            SessionEvent::Complete {
                request_id,
                finish_reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 9,
                    completion_tokens: 412,
                    source: UsageSource::Upstream,
                    reasoning_tokens: None,
                },
                timestamp: 4,
            },
            SessionEvent::Error {
                request_id,
                code: ErrorCode::UpstreamError,
                message: "upstream returned 500".to_owned(),
                retryable: true,
                timestamp: 5,
            },
            SessionEvent::ToolCall {
                request_id,
                sequence: 2,
                index: 1,
                id: Some("call_1".to_owned()),
                name: Some("get_weather".to_owned()),
                arguments: "{\"ci".to_owned(),
                timestamp: 6,
            },
            SessionEvent::ToolCall {
                request_id,
                sequence: 3,
                index: 1,
                id: None,
                name: None,
                arguments: "ty\": \"Paris ✨\"}".to_owned(),
                timestamp: 7,
            },
            SessionEvent::Reasoning {
                request_id,
                sequence: 4,
                content: "The user asks…\n".to_owned(),
                timestamp: 8,
            },
            SessionEvent::Complete {
                request_id,
                finish_reason: FinishReason::ToolCalls,
                usage: Usage {
                    prompt_tokens: 9,
                    completion_tokens: 30,
                    source: UsageSource::Upstream,
                    reasoning_tokens: Some(12),
                },
                timestamp: 9,
            },
        ])
    }

    #[test]
    fn every_event_round_trips_through_redis_fields() -> Result<(), Box<dyn std::error::Error>> {
        for event in samples()? {
            let decoded = SessionEvent::decode(&as_owned(event.encode()))?;
            assert_eq!(decoded, event);
        }
        Ok(())
    }

    /// `write_json` appends exactly the bytes of `to_json`, after what the buffer held.
    #[test]
    fn write_json_appends_the_bytes_of_to_json() -> Result<(), Box<dyn std::error::Error>> {
        for event in samples()? {
            let mut out = b"data: ".to_vec();
            event.write_json(&mut out);
            assert_eq!(out, format!("data: {}", event.to_json()).into_bytes());
        }
        Ok(())
    }

    #[test]
    fn client_json_follows_the_spec() -> Result<(), Box<dyn std::error::Error>> {
        let events = samples()?;
        let start: serde_json::Value = serde_json::from_str(&events[0].to_json())?;
        assert_eq!(start["type"], "start");
        assert_eq!(start["sessionId"], "user_123");
        assert_eq!(start["modelId"], "gpt-4");
        assert_eq!(start["attempt"], 1);
        let restart: serde_json::Value = serde_json::from_str(&events[2].to_json())?;
        assert!(restart.get("servedBy").is_none(), "{restart}");
        let fallback: serde_json::Value = serde_json::from_str(&events[3].to_json())?;
        assert_eq!(fallback["servedBy"], "claude");
        let complete: serde_json::Value = serde_json::from_str(&events[4].to_json())?;
        assert_eq!(complete["finishReason"], "stop");
        assert_eq!(complete["usage"]["promptTokens"], 9);
        assert_eq!(complete["usage"]["completionTokens"], 412);
        let error: serde_json::Value = serde_json::from_str(&events[5].to_json())?;
        assert_eq!(error["code"], "upstream_error");
        assert_eq!(error["retryable"], true);
        assert!(complete["usage"].get("reasoningTokens").is_none());

        let first: serde_json::Value = serde_json::from_str(&events[6].to_json())?;
        assert_eq!(first["type"], "tool_call");
        assert_eq!(first["index"], 1);
        assert_eq!(first["id"], "call_1");
        assert_eq!(first["name"], "get_weather");
        assert_eq!(first["arguments"], "{\"ci");
        let later: serde_json::Value = serde_json::from_str(&events[7].to_json())?;
        assert!(later.get("id").is_none() && later.get("name").is_none());
        let reasoning: serde_json::Value = serde_json::from_str(&events[8].to_json())?;
        assert_eq!(reasoning["type"], "reasoning");
        assert_eq!(reasoning["sequence"], 4);
        let tool_calls: serde_json::Value = serde_json::from_str(&events[9].to_json())?;
        assert_eq!(tool_calls["finishReason"], "tool_calls");
        assert_eq!(tool_calls["usage"]["reasoningTokens"], 12);
        Ok(())
    }

    #[test]
    fn only_what_a_version_1_reader_would_misread_is_written_as_version_2()
    -> Result<(), Box<dyn std::error::Error>> {
        let version = |event: &SessionEvent| {
            event
                .encode()
                .into_iter()
                .find(|(k, _)| *k == "v")
                .map(|(_, v)| v)
                .unwrap_or_default()
        };
        let events = samples()?;
        let versions: Vec<String> = events.iter().map(version).collect();
        assert_eq!(versions, ["1", "1", "1", "1", "1", "1", "2", "2", "2", "2"]);
        // A complete event written by the previous release (no `rt`) still decodes.
        let mut old = as_owned(events[4].encode());
        old.retain(|(k, _)| k != "rt");
        assert_eq!(SessionEvent::decode(&old)?, events[4]);
        Ok(())
    }

    #[test]
    fn decode_errors_are_typed() -> Result<(), Box<dyn std::error::Error>> {
        let token = as_owned(samples()?[1].encode());

        let mut missing = token.clone();
        missing.retain(|(k, _)| k != "seq");
        assert_eq!(
            SessionEvent::decode(&missing),
            Err(DecodeError::MissingField("seq"))
        );

        let mut wrong_type = token.clone();
        for (k, v) in &mut wrong_type {
            if k == "seq" {
                *v = "first".to_owned();
            }
        }
        assert!(matches!(
            SessionEvent::decode(&wrong_type),
            Err(DecodeError::InvalidField { field: "seq", .. })
        ));

        let mut future = token.clone();
        for (k, v) in &mut future {
            if k == "v" {
                *v = "3".to_owned();
            }
        }
        assert_eq!(
            SessionEvent::decode(&future),
            Err(DecodeError::UnknownVersion("3".to_owned()))
        );

        let mut unknown = token;
        for (k, v) in &mut unknown {
            if k == "type" {
                *v = "telepathy".to_owned();
            }
        }
        assert_eq!(
            SessionEvent::decode(&unknown),
            Err(DecodeError::UnknownType("telepathy".to_owned()))
        );
        Ok(())
    }
}
