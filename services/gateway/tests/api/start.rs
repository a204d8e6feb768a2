//! `POST /api/chat/start` with arbitrary bodies and credentials.

use anyhow::ensure;
use fred::prelude::*;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use stream_schema::RedisKey;

use crate::helpers::{API_KEY, Answer, MAX_BODY_BYTES, Tally, TestApp, refused_cleanly};

/// Any JSON value, a few levels deep.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", serde_json::Number::from_f64)
            .prop_map(Value::Number),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn session_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[A-Za-z0-9_.:-]{1,128}".prop_map(Value::from),
        1 => "[A-Za-z0-9_.:-]{129,140}".prop_map(Value::from),
        2 => any::<String>().prop_map(Value::from),
        1 => json_value(),
    ]
}

fn model_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => Just(Value::from("mock")),
        2 => Just(Value::from("gpt-4")),
        2 => any::<String>().prop_map(Value::from),
        1 => json_value(),
    ]
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[a-z ]{0,40}".prop_map(Value::from),
        1 => "[ \t\n]{0,5}".prop_map(Value::from),
        // Past the prompt (2 KiB) and body (4 KiB) limits of the test gateway.
        1 => "\\PC{0,3000}".prop_map(Value::from),
        1 => json_value(),
    ]
}

fn messages() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        Just(Value::from("system")),
        Just(Value::from("user")),
        Just(Value::from("assistant")),
        json_value(),
    ];
    let message = (
        prop::option::weighted(0.9, role),
        prop::option::weighted(0.9, text()),
    )
        .prop_map(|(role, content)| {
            let mut object = Map::new();
            object.extend(role.map(|r| ("role".to_owned(), r)));
            object.extend(content.map(|c| ("content".to_owned(), c)));
            Value::Object(object)
        });
    prop_oneof![
        4 => prop::collection::vec(message, 0..12).prop_map(Value::Array),
        1 => json_value(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => (0_i64..40_000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        2 => (-1.0_f64..3.0)
            .prop_filter_map("finite", serde_json::Number::from_f64)
            .prop_map(Value::Number),
        1 => json_value(),
    ]
}

/// Objects shaped like a start body, each field valid, wrong or absent.
fn start_object() -> impl Strategy<Value = Value> {
    let field = |s: BoxedStrategy<Value>| prop::option::weighted(0.8, s);
    (
        field(session_id().boxed()),
        field(model_id().boxed()),
        prop::option::weighted(0.6, text()),
        prop::option::weighted(0.4, messages()),
        prop::option::weighted(0.3, number()),
        prop::option::weighted(0.3, number()),
        prop::option::weighted(0.1, (any::<String>(), json_value())),
    )
        .prop_map(
            |(session, model, prompt, messages, max_tokens, temperature, extra)| {
                let mut object = Map::new();
                let fields = [
                    ("sessionId", session),
                    ("modelId", model),
                    ("prompt", prompt),
                    ("messages", messages),
                    ("maxTokens", max_tokens),
                    ("temperature", temperature),
                ];
                for (name, value) in fields {
                    object.extend(value.map(|v| (name.to_owned(), v)));
                }
                object.extend(extra);
                Value::Object(object)
            },
        )
}

/// A body the gateway must accept.
fn valid_object() -> impl Strategy<Value = Value> {
    (
        "[A-Za-z0-9_.:-]{1,128}",
        prop_oneof![Just("mock"), Just("gpt-4")],
        "[a-z]{1,10}( [a-z]{1,10}){0,10}",
    )
        .prop_map(|(session, model, prompt)| {
            json!({"sessionId": session, "modelId": model, "prompt": prompt})
        })
}

#[derive(Debug, Clone)]
enum Auth {
    Valid,
    Missing,
    Header(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Accepted,
    /// Only the general checks: the right answer depends on details the test does not model.
    Any,
}

#[derive(Debug, Clone)]
struct Input {
    body: Vec<u8>,
    expect: Expect,
    auth: Auth,
    content_type: Option<&'static str>,
}

fn input() -> impl Strategy<Value = Input> {
    let to_bytes = |value: Value| value.to_string().into_bytes();
    let body = prop_oneof![
        2 => valid_object().prop_map(move |v| (to_bytes(v), Expect::Accepted)),
        1 => (valid_object(), any::<String>()).prop_map(move |(mut v, model)| {
            v["modelId"] = Value::from(model);
            (to_bytes(v), Expect::Any)
        }),
        6 => start_object().prop_map(move |v| (to_bytes(v), Expect::Any)),
        2 => json_value().prop_map(move |v| (to_bytes(v), Expect::Any)),
        // A valid body's values as an array: serde could read it positionally into the struct.
        1 => valid_object().prop_map(move |v| {
            let fields = ["sessionId", "modelId", "prompt"].map(|f| v[f].clone());
            (to_bytes(Value::Array(fields.to_vec())), Expect::Any)
        }),
        // Valid bodies cut short: malformed JSON.
        1 => (valid_object(), any::<prop::sample::Index>()).prop_map(move |(v, cut)| {
            let mut bytes = to_bytes(v);
            bytes.truncate(cut.index(bytes.len()));
            (bytes, Expect::Any)
        }),
        2 => prop::collection::vec(any::<u8>(), 0..6000).prop_map(|b| (b, Expect::Any)),
    ];
    let auth = prop_oneof![
        8 => Just(Auth::Valid),
        1 => Just(Auth::Missing),
        1 => "[ -~]{0,40}".prop_map(Auth::Header),
    ];
    let content_type = prop_oneof![
        Just(Some("application/json")),
        Just(None),
        Just(Some("text/plain")),
    ];
    (body, auth, content_type).prop_map(|((body, expect), auth, content_type)| Input {
        body,
        expect,
        auth,
        content_type,
    })
}

/// Whether a raw `Authorization` header carries the test key (as the gateway reads it).
fn authenticates(header: &str) -> bool {
    header.split_once(' ').is_some_and(|(scheme, value)| {
        scheme.eq_ignore_ascii_case("bearer") && value.trim() == API_KEY
    })
}

async fn check(app: &TestApp, tally: &Tally, input: Input) -> anyhow::Result<()> {
    let requests = RedisKey::requests();
    let writes_before = app.writes().await?;
    let queued_before: u64 = app.redis.xlen(requests.as_str()).await?;

    let mut request = app
        .http
        .post(app.url("/api/chat/start"))
        .body(input.body.clone());
    let authorized = match &input.auth {
        Auth::Valid => {
            request = request.bearer_auth(API_KEY);
            true
        }
        Auth::Missing => false,
        Auth::Header(value) => {
            request = request.header("Authorization", value.as_str());
            authenticates(value)
        }
    };
    if let Some(content_type) = input.content_type {
        request = request.header("Content-Type", content_type);
    }
    let answer = Answer::read(request.send().await?).await?;
    let code = refused_cleanly(app, &answer, &writes_before).await?;

    let parsed = serde_json::from_slice::<Value>(&input.body);
    if !authorized {
        ensure!(code.as_deref() == Some("unauthorized"), "{answer:?}");
    } else if input.body.len() > MAX_BODY_BYTES {
        ensure!(code.as_deref() == Some("payload_too_large"), "{answer:?}");
    } else if parsed.is_err() {
        ensure!(code.as_deref() == Some("invalid_json"), "{answer:?}");
    } else if parsed.as_ref().is_ok_and(|v| !v.is_object()) {
        ensure!(answer.status == 400, "a non-object body: {answer:?}");
    } else if input.expect == Expect::Accepted {
        ensure!(answer.status == 200, "a valid body: {answer:?}");
    }

    tally.record(code.clone().unwrap_or_else(|| "started".to_owned()));
    let queued_after: u64 = app.redis.xlen(requests.as_str()).await?;
    if answer.status == 200 {
        let json = answer.json()?;
        let sent = parsed?;
        ensure!(json["sessionId"] == sent["sessionId"], "{json}");
        ensure!(json["modelId"] == sent["modelId"], "{json}");
        for field in ["requestId", "streamToken", "streamUrl", "connectionId"] {
            ensure!(json[field].is_string(), "no {field} in {json}");
        }
        ensure!(queued_after == queued_before + 1, "a start queued no job");
    } else {
        ensure!(
            [400, 401, 404, 413].contains(&answer.status),
            "undocumented status: {answer:?}"
        );
        ensure!(
            queued_after == queued_before,
            "a refused start queued a job"
        );
    }
    Ok(())
}

#[test]
fn start_refuses_every_bad_body_with_a_json_4xx_and_writes_nothing() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    let tally = Tally::default();
    app.check_all(input(), |input| app.block_on(check(&app, &tally, input)))?;
    tally.require(&[
        "started",
        "invalid_json",
        "invalid_request",
        "invalid_session_id",
        "unknown_model",
        "payload_too_large",
        "unauthorized",
    ])
}
