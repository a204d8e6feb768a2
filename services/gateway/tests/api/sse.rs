//! `GET /api/sse/stream/{sessionId}` with arbitrary session ids, query strings, tokens and
//! resume ids.

use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use fred::prelude::*;
use gateway::stream_token::{Scope, TokenError};
use proptest::prelude::*;
use stream_schema::{EntryId, RequestId, SessionCursor, SessionId, TenantId};

use crate::helpers::{API_KEY, Answer, KEY_ID, Tally, TestApp, content_type, encode, now_secs};
use crate::sessions::{leaves_the_route, raw_session_id};

/// The session of the one request the test starts (no producer runs: it never ends).
const KNOWN_SESSION: &str = "known";

#[derive(Debug, Clone)]
enum RequestChoice {
    Known,
    Unknown,
    Raw(String),
}

#[derive(Debug, Clone)]
enum TokenChoice {
    None,
    /// A session token for the path's session.
    Session,
    /// A request token for the queried request (or the known one).
    Request,
    /// A request token for another request of the session.
    OtherRequest,
    /// A session token for another session.
    OtherSession,
    Expired,
    /// A valid session token with one character changed.
    Tampered(prop::sample::Index),
    Raw(String),
}

#[derive(Debug, Clone)]
struct Input {
    session: String,
    request: Option<RequestChoice>,
    token: TokenChoice,
    /// The token as `Authorization: Bearer` instead of the `token` query.
    token_as_bearer: bool,
    /// `lastEventId` query and `Last-Event-ID` header.
    resume_query: Option<String>,
    resume_header: Option<String>,
    /// Unrelated query pairs (keys that the gateway does not read).
    junk: Vec<(String, String)>,
}

fn resume_id() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| format!("{ms}-{seq}")),
        1 => "[0-9]{1,22}",
        1 => Just(String::new()),
        2 => "[ -~]{0,24}",
        2 => session_cursor(),
    ]
}

/// A session cursor (`model=id,…`), well or badly formed: printable text without `,` and `=`
/// stands in for a bad model or id.
fn session_cursor() -> impl Strategy<Value = String> {
    let model = prop_oneof![3 => "[a-z][a-z0-9._:-]{0,8}", 1 => "[ -+\\--<>-~]{0,4}"];
    let id = prop_oneof![
        3 => (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| format!("{ms}-{seq}")),
        1 => "[ -+\\--<>-~]{0,6}",
    ];
    prop::collection::vec((model, id), 1..4).prop_map(|pairs| {
        pairs
            .iter()
            .map(|(model, id)| format!("{model}={id}"))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// Whether the gateway must accept `raw` as a resume position: a session cursor when it is
/// written as one, else a stream entry id (SPEC §2).
fn valid_resume(raw: &str) -> bool {
    if SessionCursor::looks_like(raw) {
        SessionCursor::parse(raw).is_ok()
    } else {
        EntryId::parse(raw).is_ok()
    }
}

fn input() -> impl Strategy<Value = Input> {
    let session = prop_oneof![
        2 => Just(KNOWN_SESSION.to_owned()),
        3 => raw_session_id(),
    ];
    let request = prop::option::weighted(
        0.6,
        prop_oneof![
            2 => Just(RequestChoice::Known),
            2 => Just(RequestChoice::Unknown),
            1 => any::<String>().prop_map(RequestChoice::Raw),
        ],
    );
    let token = prop_oneof![
        1 => Just(TokenChoice::None),
        3 => Just(TokenChoice::Session),
        3 => Just(TokenChoice::Request),
        1 => Just(TokenChoice::OtherRequest),
        1 => Just(TokenChoice::OtherSession),
        1 => Just(TokenChoice::Expired),
        1 => any::<prop::sample::Index>().prop_map(TokenChoice::Tampered),
        1 => "[ -~]{0,60}".prop_map(TokenChoice::Raw),
    ];
    let junk = prop::collection::vec(("X[a-z]{0,4}", any::<String>()), 0..3);
    (
        session,
        request,
        token,
        prop::bool::weighted(0.3),
        prop::option::weighted(0.3, resume_id()),
        prop::option::weighted(0.3, resume_id()),
        junk,
    )
        .prop_map(
            |(session, request, token, token_as_bearer, resume_query, resume_header, junk)| Input {
                session,
                request,
                token,
                token_as_bearer,
                resume_query,
                resume_header,
                junk,
            },
        )
}

/// Starts the request every case can refer to.
async fn start_known_request(app: &TestApp) -> anyhow::Result<RequestId> {
    let response = app
        .http
        .post(app.url("/api/chat/start"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({
            "sessionId": KNOWN_SESSION, "modelId": "mock", "prompt": "hello"
        }))
        .send()
        .await?;
    let json: serde_json::Value = response.json().await?;
    let id = json["requestId"]
        .as_str()
        .ok_or_else(|| anyhow!("no requestId in {json}"))?;
    RequestId::parse(id).context("requestId")
}

/// The token text a choice stands for, signed like the gateway signs.
fn token_text(
    app: &TestApp,
    choice: &TokenChoice,
    session: &SessionId,
    request: RequestId,
) -> Option<String> {
    let now = now_secs();
    let tokens = &app.tokens;
    Some(match choice {
        TokenChoice::None => return None,
        TokenChoice::Session => tokens.issue(
            &TenantId::default_tenant(),
            session,
            Scope::Session,
            KEY_ID,
            now,
        ),
        TokenChoice::Request => tokens.issue(
            &TenantId::default_tenant(),
            session,
            Scope::Request(request),
            KEY_ID,
            now,
        ),
        TokenChoice::OtherRequest => tokens.issue(
            &TenantId::default_tenant(),
            session,
            Scope::Request(RequestId::new()),
            KEY_ID,
            now,
        ),
        TokenChoice::OtherSession => {
            let other = if session.as_str() == "other" {
                "another"
            } else {
                "other"
            };
            tokens.issue(
                &TenantId::default_tenant(),
                &SessionId::parse(other).ok()?,
                Scope::Session,
                KEY_ID,
                now,
            )
        }
        TokenChoice::Expired => tokens.issue(
            &TenantId::default_tenant(),
            session,
            Scope::Session,
            KEY_ID,
            now - 7_200,
        ),
        TokenChoice::Tampered(index) => {
            let mut chars: Vec<char> = tokens
                .issue(
                    &TenantId::default_tenant(),
                    session,
                    Scope::Session,
                    KEY_ID,
                    now,
                )
                .chars()
                .collect();
            let at = index.index(chars.len());
            chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
            chars.into_iter().collect()
        }
        TokenChoice::Raw(text) => text.clone(),
    })
}

/// What the gateway must answer, from the rules of SPEC §2 (validation, then the token, then
/// the request's existence). `None`: a stream.
fn expected(
    app: &TestApp,
    input: &Input,
    token: Option<&str>,
    request: Option<&str>,
    known: RequestId,
) -> Option<&'static str> {
    if leaves_the_route(&input.session) {
        return Some("not_found");
    }
    let Ok(session) = SessionId::parse(&input.session) else {
        return Some("invalid_session_id");
    };
    let request = match request.map(RequestId::parse) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return Some("invalid_request"),
    };
    let resume = input
        .resume_header
        .as_ref()
        .or(input.resume_query.as_ref())
        .filter(|raw| !raw.is_empty());
    if resume.is_some_and(|raw| !valid_resume(raw)) {
        return Some("invalid_request");
    }
    let Some(token) = token else {
        return Some("unauthorized");
    };
    match app
        .tokens
        .verify(token, &session, request.as_ref(), now_secs())
    {
        Ok(_) => {}
        Err(TokenError::WrongScope) => return Some("forbidden"),
        Err(_) => return Some("unauthorized"),
    }
    match request {
        Some(id) if id != known || session.as_str() != KNOWN_SESSION => Some("not_found"),
        _ => None,
    }
}

async fn check(app: &TestApp, tally: &Tally, input: Input, known: RequestId) -> anyhow::Result<()> {
    let session_for_tokens =
        SessionId::parse(&input.session).or_else(|_| SessionId::parse(KNOWN_SESSION))?;
    let request = input.request.as_ref().map(|choice| match choice {
        RequestChoice::Known => known.to_string(),
        RequestChoice::Unknown => RequestId::new().to_string(),
        RequestChoice::Raw(raw) => raw.clone(),
    });
    let token_request = request
        .as_deref()
        .and_then(|r| RequestId::parse(r).ok())
        .unwrap_or(known);
    let token = token_text(app, &input.token, &session_for_tokens, token_request);
    // A bearer value the HTTP client cannot send as a header goes in the query instead.
    let as_bearer = input.token_as_bearer
        && token.as_deref().is_some_and(|t| {
            reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).is_ok()
        });
    // How the gateway reads a bearer header: trimmed, and nothing when empty.
    let effective_token = match (&token, as_bearer) {
        (Some(t), true) if t.trim().is_empty() => None,
        (Some(t), true) => Some(t.trim().to_owned()),
        (t, _) => t.clone(),
    };

    let mut query = Vec::new();
    if let Some(request) = &request {
        query.push(format!("requestId={}", encode(request)));
    }
    if let (Some(token), false) = (&token, as_bearer) {
        query.push(format!("token={}", encode(token)));
    }
    if let Some(resume) = &input.resume_query {
        query.push(format!("lastEventId={}", encode(resume)));
    }
    for (key, value) in &input.junk {
        query.push(format!("{key}={}", encode(value)));
    }
    let path = format!(
        "/api/sse/stream/{}?{}",
        encode(&input.session),
        query.join("&")
    );
    let mut builder = app.http.get(app.url(&path));
    if let (Some(token), true) = (&token, as_bearer) {
        builder = builder.header("Authorization", format!("Bearer {token}"));
    }
    let mut input = input;
    if let Some(resume) = input.resume_header.take() {
        // HTTP drops a header value's surrounding blanks: what the gateway reads.
        let resume = resume.trim_matches([' ', '\t']).to_owned();
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&resume) {
            builder = builder.header("Last-Event-ID", value);
            input.resume_header = Some(resume);
        }
    }

    let want = expected(
        app,
        &input,
        effective_token.as_deref(),
        request.as_deref(),
        known,
    );
    let writes_before = app.writes().await?;
    let response = builder.send().await?;
    if response.status() == 200 {
        ensure!(want.is_none(), "expected {want:?}, got a stream for {path}");
        ensure!(
            content_type(&response) == "text/event-stream",
            "{:?}",
            response.headers()
        );
        ensure!(
            response
                .headers()
                .get("Cache-Control")
                .and_then(|v| v.to_str().ok())
                == Some("no-cache"),
            "{:?}",
            response.headers()
        );
        drop(response);
        tally.record("stream");
        // The connection was registered in the shared view; wait until its removal is written
        // so the next case measures its own writes only. The gateway lists it until its
        // removal is queued, and the view writer's backlog counts it until it is written.
        wait_for_no_connections(app, &input.session).await?;
        app.wait_for_view_written().await?;
        return app.settle().await;
    }
    let answer = Answer::read(response).await?;
    let code = crate::helpers::refused_cleanly(app, &answer, &writes_before).await?;
    ensure!(
        code.as_deref() == want,
        "expected {want:?}, got {answer:?} for {path}"
    );
    tally.record(code.unwrap_or_default());
    Ok(())
}

async fn wait_for_no_connections(app: &TestApp, session: &str) -> anyhow::Result<()> {
    let url = app.url(&format!("/api/sessions/{}/connections", encode(session)));
    test_support::wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let json: serde_json::Value = app
                .http
                .get(&url)
                .bearer_auth(API_KEY)
                .send()
                .await?
                .json()
                .await?;
            Ok(json["connections"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(()))
        },
    )
    .await
}

#[test]
fn sse_refuses_bad_input_with_the_right_json_4xx_and_writes_nothing() -> anyhow::Result<()> {
    // Short connection TTL: a connection whose removal raced its own registration (both are
    // background writes) leaves the shared view within 2 s instead of 15.
    let app = TestApp::start_with(|settings| {
        settings.gateway.connection_ttl_secs = 2;
        settings.gateway.connection_heartbeat_secs = 1;
    })?;
    let known = app.block_on(start_known_request(&app))?;
    app.block_on(app.settle())?;
    let tally = Tally::default();
    app.check_all(input(), |input| {
        app.block_on(check(&app, &tally, input, known))
    })?;
    // `forbidden` (a valid token of another request) is too rare a draw to require in 96
    // cases; when drawn it is checked like the rest, and the e2e security suite checks it
    // deterministically.
    tally.require(&[
        "stream",
        "invalid_session_id",
        "invalid_request",
        "unauthorized",
        "not_found",
    ])
}

#[test]
fn the_view_backlog_counts_a_connection_change_until_redis_has_it() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    app.block_on(async {
        let session = SessionId::parse("backlog")?;
        let token = app.tokens.issue(
            &TenantId::default_tenant(),
            &session,
            Scope::Session,
            KEY_ID,
            now_secs(),
        );
        let listed = || stream_io::connections::list(&app.redis, &session);
        app.wait_for_view_written().await?;
        // Redis holds every write (reads go on) until unpaused: the connection's registration
        // stays queued in the gateway.
        let pause: String = app
            .redis
            .custom(fred::cmd!("CLIENT"), vec!["PAUSE", "20000", "WRITE"])
            .await?;
        ensure!(pause == "OK", "CLIENT PAUSE answered {pause}");
        let url = app.url(&format!("/api/sse/stream/backlog?token={}", encode(&token)));
        let stream = tokio::spawn(app.http.get(url).send());
        test_support::wait_until(
            Duration::from_secs(10),
            Duration::from_millis(10),
            || async { Ok((app.view_backlog().await? >= 1.0).then_some(())) },
        )
        .await
        .context("the registration never showed in the backlog")?;
        ensure!(listed().await?.is_empty(), "written while Redis was paused");

        let _: String = app
            .redis
            .custom(fred::cmd!("CLIENT"), vec!["UNPAUSE"])
            .await?;
        app.wait_for_view_written().await?;
        let view = listed().await?;
        ensure!(view.len() == 1, "backlog 0 but the view lists {view:?}");

        // The client leaves: once the gateway no longer lists it and the backlog is 0, the
        // view has no entry either.
        let response = stream.await??;
        ensure!(response.status() == 200, "{}", response.status());
        drop(response);
        wait_for_no_connections(&app, session.as_str()).await?;
        app.wait_for_view_written().await?;
        let view = listed().await?;
        ensure!(
            view.is_empty(),
            "backlog 0 but the view still lists {view:?}"
        );
        Ok(())
    })
}
