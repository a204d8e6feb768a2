//! Compact records of `llm:events:{n}`: what the processor counts. One session's records all
//! go to one shard (`keys::event_shard_of`).

use crate::codec::{
    DecodeError, FieldSource, Fields, Version, check_version, optional_parsed, parsed, required,
    string_enum, version_field_for,
};
use crate::event::{ErrorCode, FinishReason};
use crate::ids::{ModelId, RequestId, SessionId};

/// How a request attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed(FinishReason),
    Failed(ErrorCode),
}

string_enum! {
    /// Which end of a fallback a [`EventRecord::FellBack`] record counts.
    pub enum FallbackSide {
        /// The model that could not serve the request.
        From = "from",
        /// The model the request moved to.
        To = "to",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventRecord {
    /// A producer began an attempt.
    Started {
        request_id: RequestId,
        session_id: SessionId,
        model_id: ModelId,
        attempt: u32,
        timestamp: u64,
    },
    /// `count` tokens were written to the session stream. Every content delta the upstream
    /// sent counts as one: answer text, tool-call argument fragments and reasoning alike (all
    /// are completion tokens the model generated and the upstream bills).
    Tokens {
        request_id: RequestId,
        session_id: SessionId,
        model_id: ModelId,
        count: u32,
        timestamp: u64,
    },
    /// The request ended (the terminal event was written).
    Finished {
        request_id: RequestId,
        session_id: SessionId,
        model_id: ModelId,
        outcome: Outcome,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// Start of the attempt to its first token; none when no token came.
        ttft_ms: Option<u64>,
        duration_ms: u64,
        timestamp: u64,
    },
    /// The request moved along its fallback chain before its first token: written once for
    /// the model it left (`From`) and once for the model it moved to (`To`). It counts for that
    /// model only (the session and the API key still have one request).
    FellBack {
        request_id: RequestId,
        session_id: SessionId,
        model_id: ModelId,
        side: FallbackSide,
        timestamp: u64,
    },
}

const F_KIND: &str = "k";
const F_REQUEST: &str = "rid";
const F_SESSION: &str = "sid";
const F_MODEL: &str = "model";
const F_ATTEMPT: &str = "attempt";
const F_COUNT: &str = "n";
const F_FINISH: &str = "finish";
const F_CODE: &str = "code";
const F_PROMPT_TOKENS: &str = "pt";
const F_COMPLETION_TOKENS: &str = "ct";
const F_TTFT: &str = "ttft";
const F_DURATION: &str = "dur";
const F_TIMESTAMP: &str = "ts";
const F_SIDE: &str = "side";

impl EventRecord {
    pub fn request_id(&self) -> RequestId {
        match self {
            Self::Started { request_id, .. }
            | Self::Tokens { request_id, .. }
            | Self::Finished { request_id, .. }
            | Self::FellBack { request_id, .. } => *request_id,
        }
    }

    /// The record's kind as written in field `k`: `start`, `tokens`, `finish` or `fallback`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started { .. } => "start",
            Self::Tokens { .. } => "tokens",
            Self::Finished { .. } => "finish",
            Self::FellBack { .. } => "fallback",
        }
    }

    /// The session of the record's request.
    pub fn session_id(&self) -> &SessionId {
        match self {
            Self::Started { session_id, .. }
            | Self::Tokens { session_id, .. }
            | Self::Finished { session_id, .. }
            | Self::FellBack { session_id, .. } => session_id,
        }
    }

    /// The model the record counts for.
    pub fn model_id(&self) -> &ModelId {
        match self {
            Self::Started { model_id, .. }
            | Self::Tokens { model_id, .. }
            | Self::Finished { model_id, .. }
            | Self::FellBack { model_id, .. } => model_id,
        }
    }

    /// When the record was written (Unix ms).
    pub fn timestamp(&self) -> u64 {
        match self {
            Self::Started { timestamp, .. }
            | Self::Tokens { timestamp, .. }
            | Self::Finished { timestamp, .. }
            | Self::FellBack { timestamp, .. } => *timestamp,
        }
    }

    /// The oldest schema version whose readers understand this record: the `tool_calls`
    /// finish reason and the `fallback` kind need version 2.
    fn version(&self) -> Version {
        match self {
            Self::Finished {
                outcome: Outcome::Completed(FinishReason::ToolCalls),
                ..
            }
            | Self::FellBack { .. } => Version::V2,
            _ => Version::V1,
        }
    }

    pub fn encode(&self) -> Fields {
        let mut f = vec![
            version_field_for(self.version()),
            (F_KIND, self.kind().to_owned()),
            (F_REQUEST, self.request_id().to_string()),
            (F_SESSION, self.session_id().to_string()),
            (F_MODEL, self.model_id().to_string()),
            (F_TIMESTAMP, self.timestamp().to_string()),
        ];
        match self {
            Self::Started { attempt, .. } => f.push((F_ATTEMPT, attempt.to_string())),
            Self::Tokens { count, .. } => f.push((F_COUNT, count.to_string())),
            Self::Finished {
                outcome,
                prompt_tokens,
                completion_tokens,
                ttft_ms,
                duration_ms,
                ..
            } => {
                match outcome {
                    Outcome::Completed(reason) => f.push((F_FINISH, reason.as_str().to_owned())),
                    Outcome::Failed(code) => f.push((F_CODE, code.as_str().to_owned())),
                }
                f.push((F_PROMPT_TOKENS, prompt_tokens.to_string()));
                f.push((F_COMPLETION_TOKENS, completion_tokens.to_string()));
                if let Some(ttft) = ttft_ms {
                    f.push((F_TTFT, ttft.to_string()));
                }
                f.push((F_DURATION, duration_ms.to_string()));
            }
            Self::FellBack { side, .. } => f.push((F_SIDE, side.as_str().to_owned())),
        }
        f
    }

    pub fn decode<S: FieldSource + ?Sized>(src: &S) -> Result<Self, DecodeError> {
        check_version(src)?;
        let request_id = parsed(src, F_REQUEST)?;
        let session_id = parsed(src, F_SESSION)?;
        let model_id = parsed(src, F_MODEL)?;
        let timestamp = parsed(src, F_TIMESTAMP)?;
        match required(src, F_KIND)? {
            "start" => Ok(Self::Started {
                request_id,
                session_id,
                model_id,
                attempt: parsed(src, F_ATTEMPT)?,
                timestamp,
            }),
            "tokens" => Ok(Self::Tokens {
                request_id,
                session_id,
                model_id,
                count: parsed(src, F_COUNT)?,
                timestamp,
            }),
            "finish" => {
                let outcome = match (src.field(F_FINISH), src.field(F_CODE)) {
                    (Some(_), None) => Outcome::Completed(parsed(src, F_FINISH)?),
                    (None, Some(_)) => Outcome::Failed(parsed(src, F_CODE)?),
                    _ => {
                        return Err(DecodeError::InvalidField {
                            field: F_FINISH,
                            reason: "exactly one of `finish` and `code` must be set".to_owned(),
                        });
                    }
                };
                Ok(Self::Finished {
                    request_id,
                    session_id,
                    model_id,
                    outcome,
                    prompt_tokens: parsed(src, F_PROMPT_TOKENS)?,
                    completion_tokens: parsed(src, F_COMPLETION_TOKENS)?,
                    ttft_ms: optional_parsed(src, F_TTFT)?,
                    duration_ms: parsed(src, F_DURATION)?,
                    timestamp,
                })
            }
            "fallback" => Ok(Self::FellBack {
                request_id,
                session_id,
                model_id,
                side: parsed(src, F_SIDE)?,
                timestamp,
            }),
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let request_id = RequestId::new();
        let session_id = SessionId::parse("s")?;
        let model_id = ModelId::parse("m")?;
        let records = [
            EventRecord::Started {
                request_id,
                session_id: session_id.clone(),
                model_id: model_id.clone(),
                attempt: 1,
                timestamp: 1,
            },
            EventRecord::Tokens {
                request_id,
                session_id: session_id.clone(),
                model_id: model_id.clone(),
                count: 3,
                timestamp: 2,
            },
            EventRecord::Finished {
                request_id,
                session_id: session_id.clone(),
                model_id: model_id.clone(),
                outcome: Outcome::Completed(FinishReason::Cancelled),
                prompt_tokens: 4,
                completion_tokens: 5,
                ttft_ms: Some(6),
                duration_ms: 7,
                timestamp: 8,
            },
            EventRecord::FellBack {
                request_id,
                session_id: session_id.clone(),
                model_id: model_id.clone(),
                side: FallbackSide::To,
                timestamp: 11,
            },
            EventRecord::Finished {
                request_id,
                session_id,
                model_id,
                outcome: Outcome::Failed(ErrorCode::UpstreamTimeout),
                prompt_tokens: 0,
                completion_tokens: 0,
                ttft_ms: None,
                duration_ms: 9,
                timestamp: 10,
            },
        ];
        for record in records {
            let owned: Vec<(String, String)> = record
                .encode()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            assert_eq!(EventRecord::decode(&owned)?, record);
        }
        Ok(())
    }
}
