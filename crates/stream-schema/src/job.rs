//! Job entries of `llm:requests`: what the gateway asks a producer to generate.

use crate::codec::{
    DecodeError, FieldSource, Fields, Version, check_version, optional_parsed, parsed, required,
    version_field, version_field_for,
};
use crate::ids::{ModelId, RequestId, SessionId};
pub use crate::message::{ChatMessage, ChatOptions, Role};

/// A chat request waiting for a producer.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub request_id: RequestId,
    pub session_id: SessionId,
    pub model_id: ModelId,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// Tools, `tool_choice`, `response_format`, `top_p`, `stop`, `seed` (schema version 2).
    pub options: ChatOptions,
    /// Unix ms when the gateway enqueued the job.
    pub enqueued_at: u64,
    /// W3C trace context of the gateway's `chat.start` span (when traces are exported).
    pub traceparent: Option<String>,
    /// Most tokens the request may produce before it ends as `rate_limited`: its token
    /// reservation, when that was an estimate (no `maxTokens`) and `limits.hard_token_cap` is on.
    pub token_cap: Option<u32>,
}

const F_REQUEST: &str = "rid";
const F_SESSION: &str = "sid";
const F_MODEL: &str = "model";
const F_MESSAGES: &str = "msgs";
const F_MAX_TOKENS: &str = "max_tokens";
const F_TEMPERATURE: &str = "temperature";
const F_ENQUEUED_AT: &str = "ts";
const F_TOKEN_CAP: &str = "cap";
const F_TOOLS: &str = "tools";
const F_TOOL_CHOICE: &str = "tool_choice";
const F_RESPONSE_FORMAT: &str = "rfmt";
const F_TOP_P: &str = "top_p";
const F_STOP: &str = "stop";
const F_SEED: &str = "seed";

/// A value as JSON; the types here hold strings, numbers and JSON values only, so it always
/// serializes (the fallback is never reached).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn optional_json<T, S>(src: &S, name: &'static str) -> Result<Option<T>, DecodeError>
where
    T: serde::de::DeserializeOwned,
    S: FieldSource + ?Sized,
{
    src.field(name)
        .map(|text| {
            serde_json::from_str(text).map_err(|e| DecodeError::InvalidField {
                field: name,
                reason: e.to_string(),
            })
        })
        .transpose()
}

impl Job {
    /// The oldest schema version whose readers carry everything this job asks for: a
    /// version-1 producer would drop tools or options silently, or fail on new messages.
    fn version(&self) -> Version {
        if !self.options.is_empty() || self.messages.iter().any(ChatMessage::needs_v2) {
            Version::V2
        } else {
            Version::V1
        }
    }

    pub fn encode(&self) -> Fields {
        let mut f = vec![
            version_field_for(self.version()),
            (F_REQUEST, self.request_id.to_string()),
            (F_SESSION, self.session_id.to_string()),
            (F_MODEL, self.model_id.to_string()),
            (
                F_MESSAGES,
                // A Vec of plain structs always serializes.
                serde_json::to_string(&self.messages).unwrap_or_else(|_| "[]".to_owned()),
            ),
            (F_ENQUEUED_AT, self.enqueued_at.to_string()),
        ];
        if let Some(max_tokens) = self.max_tokens {
            f.push((F_MAX_TOKENS, max_tokens.to_string()));
        }
        if let Some(temperature) = self.temperature {
            f.push((F_TEMPERATURE, temperature.to_string()));
        }
        if let Some(cap) = self.token_cap {
            f.push((F_TOKEN_CAP, cap.to_string()));
        }
        let options = &self.options;
        if !options.tools.is_empty() {
            f.push((F_TOOLS, json(&options.tools)));
        }
        if let Some(choice) = &options.tool_choice {
            f.push((F_TOOL_CHOICE, json(choice)));
        }
        if let Some(format) = &options.response_format {
            f.push((F_RESPONSE_FORMAT, json(format)));
        }
        if let Some(top_p) = options.top_p {
            f.push((F_TOP_P, top_p.to_string()));
        }
        if !options.stop.is_empty() {
            f.push((F_STOP, json(&options.stop)));
        }
        if let Some(seed) = options.seed {
            f.push((F_SEED, seed.to_string()));
        }
        crate::codec::with_traceparent(f, self.traceparent.clone())
    }

    pub fn decode<S: FieldSource + ?Sized>(src: &S) -> Result<Self, DecodeError> {
        check_version(src)?;
        let messages = serde_json::from_str(required(src, F_MESSAGES)?).map_err(|e| {
            DecodeError::InvalidField {
                field: F_MESSAGES,
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            request_id: parsed(src, F_REQUEST)?,
            session_id: parsed(src, F_SESSION)?,
            model_id: parsed(src, F_MODEL)?,
            messages,
            max_tokens: optional_parsed(src, F_MAX_TOKENS)?,
            temperature: optional_parsed(src, F_TEMPERATURE)?,
            options: ChatOptions {
                tools: optional_json(src, F_TOOLS)?.unwrap_or_default(),
                tool_choice: optional_json(src, F_TOOL_CHOICE)?,
                response_format: optional_json(src, F_RESPONSE_FORMAT)?,
                top_p: optional_parsed(src, F_TOP_P)?,
                stop: optional_json(src, F_STOP)?.unwrap_or_default(),
                seed: optional_parsed(src, F_SEED)?,
            },
            enqueued_at: parsed(src, F_ENQUEUED_AT)?,
            traceparent: crate::codec::traceparent(src).map(str::to_owned),
            token_cap: optional_parsed(src, F_TOKEN_CAP)?,
        })
    }
}

/// What `llm:request:{requestId}` holds: how to find a request's stream from its id alone
/// (cancel and per-request SSE only know the request id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMeta {
    pub session_id: SessionId,
    pub model_id: ModelId,
    /// Entry id of the request's `start` event: a late client reads from here.
    pub start_entry: crate::EntryId,
    /// Id of the API key that started the request: only it may cancel the request.
    pub key_id: String,
    /// Tokens reserved against the key's token quota, and in which window (index of
    /// `limits.window_secs` windows since the epoch): the processor gives back what the
    /// request did not use.
    pub reservation: Option<Reservation>,
    /// Trace context of the request's `chat.start` span: SSE delivery joins that trace.
    pub traceparent: Option<String>,
}

/// A token reservation made at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub window: u64,
    pub tokens: u32,
}

impl RequestMeta {
    pub fn encode(&self) -> Fields {
        let mut f = vec![
            version_field(),
            (F_SESSION, self.session_id.to_string()),
            (F_MODEL, self.model_id.to_string()),
            ("start", self.start_entry.to_string()),
            ("key", self.key_id.clone()),
        ];
        if let Some(reservation) = self.reservation {
            f.push(("qwin", reservation.window.to_string()));
            f.push(("qtok", reservation.tokens.to_string()));
        }
        crate::codec::with_traceparent(f, self.traceparent.clone())
    }

    pub fn decode<S: FieldSource + ?Sized>(src: &S) -> Result<Self, DecodeError> {
        check_version(src)?;
        Ok(Self {
            session_id: parsed(src, F_SESSION)?,
            model_id: parsed(src, F_MODEL)?,
            start_entry: parsed(src, "start")?,
            key_id: required(src, "key")?.to_owned(),
            reservation: match (optional_parsed(src, "qwin")?, optional_parsed(src, "qtok")?) {
                (Some(window), Some(tokens)) => Some(Reservation { window, tokens }),
                _ => None,
            },
            traceparent: crate::codec::traceparent(src).map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(f: Fields) -> Vec<(String, String)> {
        f.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn jobs_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let job = Job {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s1")?,
            model_id: ModelId::parse("mock")?,
            messages: vec![
                ChatMessage::text(Role::System, "be brief"),
                ChatMessage::text(Role::User, "Tell me a story about a dragon"),
            ],
            max_tokens: Some(64),
            temperature: Some(0.5),
            options: ChatOptions::default(),
            enqueued_at: 17,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
            token_cap: Some(1_024),
        };
        assert_eq!(Job::decode(&owned(job.encode()))?, job);

        let bare = Job {
            max_tokens: None,
            temperature: None,
            traceparent: None,
            token_cap: None,
            ..job
        };
        assert_eq!(Job::decode(&owned(bare.encode()))?, bare);
        Ok(())
    }

    fn version_of(fields: &[(String, String)]) -> &str {
        fields
            .iter()
            .find(|(k, _)| k == "v")
            .map_or("", |(_, v)| v.as_str())
    }

    #[test]
    fn a_job_with_tools_and_structured_messages_round_trips_as_version_2()
    -> Result<(), Box<dyn std::error::Error>> {
        let messages: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]))?;
        let options = ChatOptions {
            tools: serde_json::from_value(serde_json::json!([{"type": "function",
                "function": {"name": "f", "parameters": {"type": "object"}}}]))?,
            tool_choice: Some(serde_json::from_value(serde_json::json!("required"))?),
            response_format: Some(serde_json::from_value(serde_json::json!({
                "type": "json_schema", "json_schema": {"name": "s", "schema": {}}}))?),
            top_p: Some(0.9),
            stop: vec!["END".to_owned()],
            seed: Some(-7),
        };
        let job = Job {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s1")?,
            model_id: ModelId::parse("mock")?,
            messages,
            max_tokens: None,
            temperature: None,
            options,
            enqueued_at: 1,
            traceparent: None,
            token_cap: None,
        };
        let fields = owned(job.encode());
        assert_eq!(version_of(&fields), "2");
        assert_eq!(Job::decode(&fields)?, job);

        // A plain text chat stays version 1, readable by the previous release.
        let plain = Job {
            messages: vec![ChatMessage::text(Role::User, "hi")],
            options: ChatOptions::default(),
            ..job
        };
        let fields = owned(plain.encode());
        assert_eq!(version_of(&fields), "1");
        let msgs = fields
            .iter()
            .find(|(k, _)| k == "msgs")
            .map(|(_, v)| v.as_str());
        assert_eq!(msgs, Some(r#"[{"role":"user","content":"hi"}]"#));
        Ok(())
    }

    #[test]
    fn a_job_with_broken_messages_is_a_typed_error() -> Result<(), Box<dyn std::error::Error>> {
        let job = Job {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s1")?,
            model_id: ModelId::parse("mock")?,
            messages: vec![],
            max_tokens: None,
            temperature: None,
            options: ChatOptions::default(),
            enqueued_at: 1,
            traceparent: None,
            token_cap: None,
        };
        let mut fields = owned(job.encode());
        for (k, v) in &mut fields {
            if k == "msgs" {
                *v = "{not json".to_owned();
            }
        }
        assert!(matches!(
            Job::decode(&fields),
            Err(DecodeError::InvalidField { field: "msgs", .. })
        ));
        Ok(())
    }

    #[test]
    fn request_meta_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let meta = RequestMeta {
            session_id: SessionId::parse("s1")?,
            model_id: ModelId::parse("mock")?,
            start_entry: crate::EntryId::parse("17-3")?,
            key_id: "team-a".to_owned(),
            reservation: Some(Reservation {
                window: 29_000_000,
                tokens: 64,
            }),
            traceparent: None,
        };
        assert_eq!(RequestMeta::decode(&owned(meta.encode()))?, meta);
        Ok(())
    }
}
