//! Fuzzing the stream-entry codecs with proptest: decoding arbitrary or corrupted field maps
//! never panics (readers log, count and skip a bad entry), and every valid entry round-trips.
//!
//! Entries come from Redis, written by other processes and other versions: the decoders must
//! treat them as untrusted input.

use std::collections::HashMap;
use std::fmt::Debug;

use proptest::prelude::*;
use proptest::sample::Index;
use stream_schema::job::{RequestMeta, Reservation};
use stream_schema::message::{FunctionDefinition, Tool, ToolType};
use stream_schema::record::Outcome;
use stream_schema::{
    ChatMessage, ChatOptions, DeadLetter, EntryId, ErrorCode, EventRecord, FinishReason, Job,
    ModelId, RequestId, Role, SessionEvent, SessionId, Usage, UsageSource,
};

/// Every field name any entry type uses, so arbitrary maps hit real fields often.
const FIELD_NAMES: &[&str] = &[
    "v",
    "type",
    "rid",
    "sid",
    "model",
    "attempt",
    "seq",
    "content",
    "reason",
    "finish",
    "pt",
    "ct",
    "usrc",
    "code",
    "msg",
    "retry",
    "ts",
    "rt",
    "idx",
    "call",
    "name",
    "args",
    "msgs",
    "max_tokens",
    "temperature",
    "tools",
    "tool_choice",
    "rfmt",
    "top_p",
    "stop",
    "seed",
    "start",
    "key",
    "qwin",
    "qtok",
    "tp",
    "k",
    "n",
    "ttft",
    "dur",
    "src",
    "attempts",
    "consumer",
    "job",
];

/// Values of every shape a field may hold, and some it may not.
const VALUE_WORDS: &[&str] = &[
    "1",
    "0",
    "2",
    "",
    "start",
    "token",
    "restart",
    "complete",
    "error",
    "tool_call",
    "reasoning",
    "tool_calls",
    "tokens",
    "finish",
    "stop",
    "length",
    "cancelled",
    "upstream_error",
    "history_lost",
    "upstream",
    "counted",
    "user",
    "[]",
    "[{\"role\":\"user\",\"content\":\"hi\"}]",
    "{}",
    "NaN",
    "inf",
    "-1",
    "18446744073709551616",
    "4294967296",
    "5-1",
    "0-0",
];

/// 512 cases per property (a few seconds); `PROPTEST_CASES` overrides it for a longer run.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig {
        // Regression files would land in the source tree; a failure prints its input.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 512;
    }
    config
}

// ---- valid values --------------------------------------------------------------------------

fn request_id() -> impl Strategy<Value = RequestId> {
    any::<u128>().prop_filter_map("a request id", |n| {
        RequestId::parse(&uuid::Uuid::from_u128(n).hyphenated().to_string()).ok()
    })
}

fn session_id() -> impl Strategy<Value = SessionId> {
    "[A-Za-z0-9_.:-]{1,128}".prop_filter_map("a session id", |s| SessionId::parse(&s).ok())
}

fn model_id() -> impl Strategy<Value = ModelId> {
    "[A-Za-z0-9_.:-]{1,64}".prop_filter_map("a model id", |s| ModelId::parse(&s).ok())
}

fn entry_id() -> impl Strategy<Value = EntryId> {
    (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| EntryId { ms, seq })
}

fn one_of<T: Copy + Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(all)
}

/// A non-empty `traceparent`: an empty one is written as absent.
fn traceparent() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[ -~]{1,60}")
}

fn session_event() -> impl Strategy<Value = SessionEvent> {
    prop_oneof![
        (
            request_id(),
            session_id(),
            model_id(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(|(request_id, session_id, model_id, attempt, timestamp)| {
                SessionEvent::Start {
                    request_id,
                    session_id,
                    model_id,
                    attempt,
                    timestamp,
                }
            }),
        (request_id(), any::<u64>(), any::<String>(), any::<u64>()).prop_map(
            |(request_id, sequence, content, timestamp)| SessionEvent::Token {
                request_id,
                sequence,
                content,
                timestamp,
            }
        ),
        (
            (request_id(), any::<u64>(), any::<u32>()),
            prop::option::of(any::<String>()),
            prop::option::of(any::<String>()),
            any::<String>(),
            any::<u64>()
        )
            .prop_map(
                |((request_id, sequence, index), id, name, arguments, timestamp)| {
                    SessionEvent::ToolCall {
                        request_id,
                        sequence,
                        index,
                        id,
                        name,
                        arguments,
                        timestamp,
                    }
                }
            ),
        (request_id(), any::<u64>(), any::<String>(), any::<u64>()).prop_map(
            |(request_id, sequence, content, timestamp)| SessionEvent::Reasoning {
                request_id,
                sequence,
                content,
                timestamp,
            }
        ),
        (request_id(), any::<u32>(), any::<String>(), any::<u64>()).prop_map(
            |(request_id, attempt, reason, timestamp)| SessionEvent::Restart {
                request_id,
                attempt,
                reason,
                served_by: None,
                timestamp,
            }
        ),
        (
            request_id(),
            one_of(FinishReason::ALL),
            (any::<(u32, u32)>(), prop::option::of(any::<u32>())),
            one_of(UsageSource::ALL),
            any::<u64>()
        )
            .prop_map(
                |(
                    request_id,
                    finish_reason,
                    ((prompt, completion), reasoning),
                    source,
                    timestamp,
                )| {
                    SessionEvent::Complete {
                        request_id,
                        finish_reason,
                        usage: Usage {
                            prompt_tokens: prompt,
                            completion_tokens: completion,
                            source,
                            reasoning_tokens: reasoning,
                        },
                        timestamp,
                    }
                }
            ),
        (
            request_id(),
            one_of(ErrorCode::ALL),
            any::<String>(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(request_id, code, message, retryable, timestamp)| {
                SessionEvent::Error {
                    request_id,
                    code,
                    message,
                    retryable,
                    timestamp,
                }
            }),
    ]
}

fn job() -> impl Strategy<Value = Job> {
    let message = (
        one_of(Role::ALL),
        any::<String>(),
        prop::option::of("[a-z_]{1,8}"),
    )
        .prop_map(|(role, content, call_id)| ChatMessage {
            tool_call_id: call_id,
            ..ChatMessage::text(role, content)
        });
    let tool = ("[A-Za-z0-9_-]{1,64}", prop::option::of(any::<String>())).prop_map(
        |(name, description)| Tool {
            kind: ToolType::Function,
            function: FunctionDefinition {
                name,
                description,
                parameters: Some(serde_json::json!({"type": "object"})),
                strict: None,
            },
        },
    );
    let options = (
        prop::collection::vec(tool, 0..3),
        prop::option::of(any::<f32>().prop_filter("not NaN", |t| !t.is_nan())),
        prop::collection::vec(any::<String>(), 0..3),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(tools, top_p, stop, seed)| ChatOptions {
            tools,
            top_p,
            stop,
            seed,
            ..ChatOptions::default()
        });
    (
        (request_id(), session_id(), model_id()),
        prop::collection::vec(message, 0..5),
        prop::option::of(any::<u32>()),
        // NaN never equals itself; every other float (infinities included) round-trips.
        prop::option::of(any::<f32>().prop_filter("not NaN", |t| !t.is_nan())),
        (any::<u64>(), prop::option::of(any::<u32>())),
        traceparent(),
        options,
    )
        .prop_map(
            |(
                (request_id, session_id, model_id),
                messages,
                max_tokens,
                temperature,
                (at, cap),
                tp,
                options,
            )| {
                Job {
                    request_id,
                    session_id,
                    model_id,
                    messages,
                    max_tokens,
                    temperature,
                    options,
                    enqueued_at: at,
                    traceparent: tp,
                    token_cap: cap,
                }
            },
        )
}

fn request_meta() -> impl Strategy<Value = RequestMeta> {
    (
        session_id(),
        model_id(),
        entry_id(),
        any::<String>(),
        prop::option::of(any::<(u64, u32)>()),
        traceparent(),
    )
        .prop_map(
            |(session_id, model_id, start_entry, key_id, reservation, traceparent)| RequestMeta {
                session_id,
                model_id,
                start_entry,
                key_id,
                reservation: reservation.map(|(window, tokens)| Reservation { window, tokens }),
                traceparent,
            },
        )
}

fn event_record() -> impl Strategy<Value = EventRecord> {
    let ids = || (request_id(), session_id(), model_id());
    let outcome = prop_oneof![
        one_of(FinishReason::ALL).prop_map(Outcome::Completed),
        one_of(ErrorCode::ALL).prop_map(Outcome::Failed),
    ];
    prop_oneof![
        (ids(), any::<u32>(), any::<u64>()).prop_map(
            |((request_id, session_id, model_id), attempt, timestamp)| EventRecord::Started {
                request_id,
                session_id,
                model_id,
                attempt,
                timestamp,
            }
        ),
        (ids(), any::<u32>(), any::<u64>()).prop_map(
            |((request_id, session_id, model_id), count, timestamp)| EventRecord::Tokens {
                request_id,
                session_id,
                model_id,
                count,
                timestamp,
            }
        ),
        (
            ids(),
            outcome,
            any::<(u32, u32)>(),
            prop::option::of(any::<u64>()),
            any::<(u64, u64)>()
        )
            .prop_map(
                |((request_id, session_id, model_id), outcome, tokens, ttft_ms, times)| {
                    EventRecord::Finished {
                        request_id,
                        session_id,
                        model_id,
                        outcome,
                        prompt_tokens: tokens.0,
                        completion_tokens: tokens.1,
                        ttft_ms,
                        duration_ms: times.0,
                        timestamp: times.1,
                    }
                }
            ),
    ]
}

fn dead_letter() -> impl Strategy<Value = DeadLetter> {
    (
        entry_id(),
        prop::option::of(request_id()),
        any::<String>(),
        any::<u32>(),
        any::<String>(),
        any::<u64>(),
        prop::collection::btree_map(any::<String>(), any::<String>(), 0..4),
    )
        .prop_map(
            |(job_entry, request_id, reason, attempts, consumer, timestamp, job_fields)| {
                DeadLetter {
                    job_entry,
                    request_id,
                    reason,
                    attempts,
                    consumer,
                    timestamp,
                    job_fields,
                }
            },
        )
}

// ---- decoding anything ---------------------------------------------------------------------

type Pairs = Vec<(String, String)>;

fn owned(fields: stream_schema::Fields) -> Pairs {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Decodes `pairs` as every entry type, from both field sources a reader uses (a stream read's
/// pair list, where the first of a repeated name wins, and a hash map). Only panics matter.
fn decode_as_everything(pairs: &Pairs) {
    let map: HashMap<String, String> = pairs.iter().cloned().collect();
    let _ = SessionEvent::decode(pairs);
    let _ = SessionEvent::decode(&map);
    let _ = Job::decode(pairs);
    let _ = Job::decode(&map);
    let _ = EventRecord::decode(pairs);
    let _ = EventRecord::decode(&map);
    let _ = RequestMeta::decode(pairs);
    let _ = RequestMeta::decode(&map);
    let _ = DeadLetter::decode(pairs);
    let _ = DeadLetter::decode(&map);
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => one_of(FIELD_NAMES).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => one_of(VALUE_WORDS).prop_map(str::to_owned),
        2 => "-?[0-9]{1,25}(\\.[0-9]{0,5})?",
        1 => request_id().prop_map(|id| id.to_string()),
        1 => "[A-Za-z0-9_.:{}-]{0,130}",
        2 => any::<String>(),
    ]
}

fn arbitrary_pairs() -> impl Strategy<Value = Pairs> {
    // `v` = "1" most of the time, so decoding gets past the version check.
    let version = prop_oneof![
        4 => Just(Some("1".to_owned())),
        1 => prop::option::of(field_value()),
    ];
    (
        version,
        prop::collection::vec((field_name(), field_value()), 0..16),
    )
        .prop_map(|(version, mut pairs)| {
            if let Some(v) = version {
                pairs.insert(0, ("v".to_owned(), v));
            }
            pairs
        })
}

/// One change to a field list, as a corrupting writer, a truncated entry or a newer schema
/// version might make.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(Index),
    Replace(Index, String),
    Rename(Index, String),
    /// The same name again with another value, before the original.
    Shadow(Index, String),
    SwapValues(Index, Index),
    Truncate(Index, Index),
    Add(String, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Remove),
        (any::<Index>(), field_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        (any::<Index>(), field_name()).prop_map(|(i, n)| Mutation::Rename(i, n)),
        (any::<Index>(), field_value()).prop_map(|(i, v)| Mutation::Shadow(i, v)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapValues(a, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, at)| Mutation::Truncate(i, at)),
        (field_name(), field_value()).prop_map(|(n, v)| Mutation::Add(n, v)),
    ]
}

fn mutate(pairs: &mut Pairs, mutation: &Mutation) {
    if pairs.is_empty() {
        if let Mutation::Add(name, value) = mutation {
            pairs.push((name.clone(), value.clone()));
        }
        return;
    }
    let len = pairs.len();
    match mutation {
        Mutation::Remove(i) => {
            pairs.remove(i.index(len));
        }
        Mutation::Replace(i, value) => pairs[i.index(len)].1.clone_from(value),
        Mutation::Rename(i, name) => pairs[i.index(len)].0.clone_from(name),
        Mutation::Shadow(i, value) => {
            let name = pairs[i.index(len)].0.clone();
            pairs.insert(i.index(len), (name, value.clone()));
        }
        Mutation::SwapValues(a, b) => {
            let (a, b) = (a.index(len), b.index(len));
            let value = pairs[a].1.clone();
            pairs[a].1 = std::mem::replace(&mut pairs[b].1, value);
        }
        Mutation::Truncate(i, at) => {
            let value = &mut pairs[i.index(len)].1;
            let mut cut = at.index(value.len() + 1);
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
        }
        Mutation::Add(name, value) => pairs.push((name.clone(), value.clone())),
    }
}

/// The encoding of any valid entry.
fn valid_encoding() -> impl Strategy<Value = Pairs> {
    prop_oneof![
        session_event().prop_map(|e| owned(e.encode())),
        job().prop_map(|j| owned(j.encode())),
        event_record().prop_map(|r| owned(r.encode())),
        request_meta().prop_map(|m| owned(m.encode())),
        dead_letter().prop_map(|d| owned(d.encode())),
    ]
}

/// Whatever a decoder accepts, it reads back the same after one more encode: a corrupted entry
/// is either refused or taken for one definite value, never half-read.
fn assert_stable<T: Debug>(
    decoded: Result<T, stream_schema::DecodeError>,
    encode: impl Fn(&T) -> stream_schema::Fields,
    decode: impl Fn(&Pairs) -> Result<T, stream_schema::DecodeError>,
) -> Result<(), TestCaseError> {
    if let Ok(value) = decoded {
        let once = encode(&value);
        let again = decode(&owned(once.clone())).map_err(|e| {
            TestCaseError::fail(format!("re-encoding {value:?} does not decode: {e}"))
        })?;
        prop_assert_eq!(encode(&again), once);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn session_events_round_trip(event in session_event()) {
        let fields = owned(event.encode());
        prop_assert_eq!(SessionEvent::decode(&fields), Ok(event.clone()));
        let map: HashMap<String, String> = fields.into_iter().collect();
        prop_assert_eq!(SessionEvent::decode(&map), Ok(event.clone()));
        // The SSE `data:` is one JSON object tagged with the event's type.
        let json: serde_json::Value = serde_json::from_str(&event.to_json())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(json["type"].as_str(), Some(event.type_name()));
    }

    #[test]
    fn jobs_round_trip(job in job()) {
        prop_assert_eq!(Job::decode(&owned(job.encode())), Ok(job));
    }

    #[test]
    fn request_metas_round_trip(meta in request_meta()) {
        prop_assert_eq!(RequestMeta::decode(&owned(meta.encode())), Ok(meta));
    }

    #[test]
    fn event_records_round_trip(record in event_record()) {
        prop_assert_eq!(EventRecord::decode(&owned(record.encode())), Ok(record));
    }

    #[test]
    fn dead_letters_round_trip(dead in dead_letter()) {
        prop_assert_eq!(DeadLetter::decode(&owned(dead.encode())), Ok(dead));
    }

    #[test]
    fn arbitrary_field_maps_never_panic(pairs in arbitrary_pairs()) {
        decode_as_everything(&pairs);
    }

    #[test]
    fn corrupted_entries_are_refused_or_read_whole(
        mut pairs in valid_encoding(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        for mutation in &mutations {
            mutate(&mut pairs, mutation);
        }
        decode_as_everything(&pairs);
        assert_stable(SessionEvent::decode(&pairs), SessionEvent::encode, SessionEvent::decode)?;
        assert_stable(Job::decode(&pairs), Job::encode, Job::decode)?;
        assert_stable(EventRecord::decode(&pairs), EventRecord::encode, EventRecord::decode)?;
        assert_stable(RequestMeta::decode(&pairs), RequestMeta::encode, RequestMeta::decode)?;
        assert_stable(DeadLetter::decode(&pairs), DeadLetter::encode, DeadLetter::decode)?;
    }
}
