//! Path parameters: `POST /api/chat/{requestId}/cancel`,
//! `POST /api/sessions/{sessionId}/stream-token` and `GET /api/sessions/{sessionId}/connections`
//! with arbitrary ids.

use anyhow::ensure;
use proptest::prelude::*;
use stream_schema::SessionId;

use crate::helpers::{API_KEY, Answer, TestApp, encode, refused_cleanly};

/// Strings that are sometimes valid session ids, sometimes close, sometimes anything.
pub fn raw_session_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9_.:-]{1,128}",
        1 => "[A-Za-z0-9_.:-]{129,140}",
        1 => "[A-Za-z0-9_.:{}/ %+-]{0,20}",
        1 => Just(String::new()),
        1 => prop_oneof![Just(".".to_owned()), Just("..".to_owned())],
        3 => any::<String>(),
    ]
}

/// What a client sees for a path whose segment is `raw`: dot segments are resolved by the URL
/// (RFC 3986) and an empty segment matches no route; both leave the API's paths (404).
pub fn leaves_the_route(raw: &str) -> bool {
    matches!(raw, "" | "." | "..")
}

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    StreamToken,
    Connections,
}

async fn check_session_path(
    app: &TestApp,
    endpoint: Endpoint,
    raw: String,
    with_key: bool,
) -> anyhow::Result<()> {
    let writes_before = app.writes().await?;
    let segment = encode(&raw);
    let mut request = match endpoint {
        Endpoint::StreamToken => app
            .http
            .post(app.url(&format!("/api/sessions/{segment}/stream-token"))),
        Endpoint::Connections => app
            .http
            .get(app.url(&format!("/api/sessions/{segment}/connections"))),
    };
    if with_key {
        request = request.bearer_auth(API_KEY);
    }
    let answer = Answer::read(request.send().await?).await?;
    let code = refused_cleanly(app, &answer, &writes_before).await?;

    if leaves_the_route(&raw) {
        ensure!(code.as_deref() == Some("not_found"), "{answer:?}");
    } else if !with_key {
        ensure!(code.as_deref() == Some("unauthorized"), "{answer:?}");
    } else if SessionId::parse(&raw).is_ok() {
        ensure!(answer.status == 200, "a valid session id: {answer:?}");
        let json = answer.json()?;
        ensure!(json["sessionId"] == raw.as_str(), "{json}");
        match endpoint {
            Endpoint::StreamToken => ensure!(json["streamToken"].is_string(), "{json}"),
            Endpoint::Connections => ensure!(json["connections"].is_array(), "{json}"),
        }
    } else {
        ensure!(code.as_deref() == Some("invalid_session_id"), "{answer:?}");
    }
    // Neither endpoint writes, whatever the input: a token is only signed, a listing only read.
    ensure!(
        app.writes().await?.since(&writes_before)? == 0,
        "{endpoint:?} wrote to Redis"
    );
    Ok(())
}

#[test]
fn session_paths_accept_exactly_the_valid_session_ids() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    let endpoint = prop_oneof![Just(Endpoint::StreamToken), Just(Endpoint::Connections)];
    let with_key = prop::bool::weighted(0.85);
    app.check_all(
        (endpoint, raw_session_id(), with_key),
        |(endpoint, raw, with_key)| app.block_on(check_session_path(&app, endpoint, raw, with_key)),
    )
}

fn raw_request_id() -> impl Strategy<Value = String> {
    prop_oneof![
        // Well-formed ids of requests that do not exist (upper case included: it parses).
        3 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string()),
        1 => any::<u128>()
            .prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string().to_uppercase()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).simple().to_string()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).braced().to_string()),
        1 => "[0-9a-f-]{30,40}",
        3 => any::<String>(),
    ]
}

async fn check_cancel(app: &TestApp, raw: String, with_key: bool) -> anyhow::Result<()> {
    let writes_before = app.writes().await?;
    let mut request = app
        .http
        .post(app.url(&format!("/api/chat/{}/cancel", encode(&raw))));
    if with_key {
        request = request.bearer_auth(API_KEY);
    }
    let answer = Answer::read(request.send().await?).await?;
    let code = refused_cleanly(app, &answer, &writes_before).await?;
    // Nothing was ever started here, so no id names a request: 401 without a key, else 404
    // (a malformed id is "unknown" too, so its existence is never hinted at).
    if with_key || leaves_the_route(&raw) {
        ensure!(code.as_deref() == Some("not_found"), "{answer:?}");
    } else {
        ensure!(code.as_deref() == Some("unauthorized"), "{answer:?}");
    }
    Ok(())
}

#[test]
fn cancel_of_an_unknown_or_malformed_request_id_is_404_and_writes_nothing() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    app.check_all(
        (raw_request_id(), prop::bool::weighted(0.85)),
        |(raw, with_key)| app.block_on(check_cancel(&app, raw, with_key)),
    )
}
