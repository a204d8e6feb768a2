//! Job entries of `llm:requests`: what the gateway asks a producer to generate.

use serde::{Deserialize, Serialize};

use crate::codec::{
    DecodeError, FieldSource, Fields, check_version, optional_parsed, parsed, required,
    string_enum, version_field,
};
use crate::ids::{ModelId, RequestId, SessionId};

string_enum! {
    /// Author of a chat message.
    pub enum Role {
        System = "system",
        User = "user",
        Assistant = "assistant",
    }
}

/// One message of the conversation sent upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// A chat request waiting for a producer.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub request_id: RequestId,
    pub session_id: SessionId,
    pub model_id: ModelId,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
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

impl Job {
    pub fn encode(&self) -> Fields {
        let mut f = vec![
            version_field(),
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
                ChatMessage {
                    role: Role::System,
                    content: "be brief".to_owned(),
                },
                ChatMessage {
                    role: Role::User,
                    content: "Tell me a story about a dragon".to_owned(),
                },
            ],
            max_tokens: Some(64),
            temperature: Some(0.5),
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

    #[test]
    fn a_job_with_broken_messages_is_a_typed_error() -> Result<(), Box<dyn std::error::Error>> {
        let job = Job {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s1")?,
            model_id: ModelId::parse("mock")?,
            messages: vec![],
            max_tokens: None,
            temperature: None,
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
