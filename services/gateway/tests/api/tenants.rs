//! Tenants never cross: random sequences of calls by keys of several tenants, on a small pool
//! of session ids that every tenant uses, checked against a model of who started what. A call
//! about another tenant's request answers exactly like one about a request that never existed,
//! and Redis holds each tenant's requests under its own session keys only.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use service_kit::config::ApiKeyEntry;
use stream_schema::{ModelId, RedisKey, SessionEvent, SessionId, TenantId};
use test_support::SseClient;

use crate::helpers::{API_KEY, Answer, TestApp};

/// The keys of the property: the suite's key (default tenant) and one key each of `a` and `b`.
const TENANTS: [(&str, &str); 3] = [
    ("default", API_KEY),
    ("a", "sk-tenant-a"),
    ("b", "sk-tenant-b"),
];
/// Session ids every tenant uses.
const SESSIONS: usize = 2;
/// Cases and calls per case: enough to mix every call with every tenant, within ~20 s on 2 cores.
const CASES: u32 = 64;
const MAX_CALLS: usize = 12;

#[derive(Debug, Clone)]
enum Call {
    Start {
        tenant: usize,
        session: usize,
    },
    /// `request` picks one of the requests started so far (by any tenant), or an unknown id.
    Cancel {
        tenant: usize,
        request: usize,
    },
    /// The request stream through a session token of `tenant` for `session`.
    Stream {
        tenant: usize,
        session: usize,
        request: usize,
    },
    Connections {
        tenant: usize,
        session: usize,
    },
}

fn call() -> impl Strategy<Value = Call> {
    let tenant = 0..TENANTS.len();
    let session = 0..SESSIONS;
    prop_oneof![
        3 => (tenant.clone(), session.clone())
            .prop_map(|(tenant, session)| Call::Start { tenant, session }),
        2 => (tenant.clone(), any::<usize>())
            .prop_map(|(tenant, request)| Call::Cancel { tenant, request }),
        3 => (tenant.clone(), session.clone(), any::<usize>())
            .prop_map(|(tenant, session, request)| Call::Stream { tenant, session, request }),
        1 => (tenant, session)
            .prop_map(|(tenant, session)| Call::Connections { tenant, session }),
    ]
}

/// A started request, as the model knows it.
#[derive(Debug, Clone)]
struct Started {
    id: String,
    tenant: usize,
    session: usize,
}

/// One case: its own session names (cases share the gateway and its Redis).
struct Case<'a> {
    app: &'a TestApp,
    sessions: Vec<String>,
    started: Vec<Started>,
}

impl Case<'_> {
    async fn call(
        &self,
        method: reqwest::Method,
        tenant: usize,
        path: &str,
    ) -> anyhow::Result<Answer> {
        let response = self
            .app
            .http
            .request(method, self.app.url(path))
            .bearer_auth(TENANTS[tenant].1)
            .send()
            .await?;
        Answer::read(response).await
    }

    /// `request` as an index into the started requests, or (one time in `len + 1`) an id
    /// nobody started.
    fn pick(&self, request: usize) -> Option<&Started> {
        self.started.get(request % (self.started.len() + 1))
    }

    async fn run(&mut self, call: &Call) -> anyhow::Result<()> {
        match *call {
            Call::Start { tenant, session } => {
                let name = &self.sessions[session];
                let response = self
                    .app
                    .http
                    .post(self.app.url("/api/chat/start"))
                    .bearer_auth(TENANTS[tenant].1)
                    .json(
                        &serde_json::json!({"sessionId": name, "modelId": "mock", "prompt": "hi"}),
                    )
                    .send()
                    .await?;
                let answer = Answer::read(response).await?;
                ensure!(answer.status == 200, "start: {answer:?}");
                let body = answer.json()?;
                ensure!(body["sessionId"] == name.as_str(), "{body}");
                let id = body["requestId"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no requestId"))?;
                self.started.push(Started {
                    id: id.to_owned(),
                    tenant,
                    session,
                });
            }
            Call::Cancel { tenant, request } => {
                let target = self.pick(request).cloned();
                let id = target.as_ref().map_or_else(
                    || stream_schema::RequestId::new().to_string(),
                    |s| s.id.clone(),
                );
                let answer = self
                    .call(
                        reqwest::Method::POST,
                        tenant,
                        &format!("/api/chat/{id}/cancel"),
                    )
                    .await?;
                let mine = target.is_some_and(|s| s.tenant == tenant);
                if mine {
                    ensure!(answer.status == 202, "own cancel: {answer:?}");
                } else {
                    // Byte for byte the answer for an id that does not exist.
                    let unknown = self
                        .call(
                            reqwest::Method::POST,
                            tenant,
                            &format!("/api/chat/{}/cancel", stream_schema::RequestId::new()),
                        )
                        .await?;
                    ensure!(
                        (answer.status, &answer.body) == (unknown.status, &unknown.body),
                        "not yours {answer:?} vs unknown {unknown:?}"
                    );
                    ensure!(answer.status == 404, "{answer:?}");
                }
            }
            Call::Stream {
                tenant,
                session,
                request,
            } => {
                let name = &self.sessions[session];
                let token = self
                    .call(
                        reqwest::Method::POST,
                        tenant,
                        &format!("/api/sessions/{name}/stream-token"),
                    )
                    .await?
                    .json()?["streamToken"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("no streamToken"))?;
                let target = self.pick(request).cloned();
                let id = target.as_ref().map_or_else(
                    || stream_schema::RequestId::new().to_string(),
                    |s| s.id.clone(),
                );
                let url = self.app.url(&format!(
                    "/api/sse/stream/{name}?requestId={id}&token={token}"
                ));
                let ours = target.is_some_and(|s| s.tenant == tenant && s.session == session);
                if ours {
                    let mut stream = SseClient::connect(&url, &[]).await?;
                    ensure!(stream.status() == 200, "own stream: {}", stream.status());
                    let first = stream
                        .next_event(Duration::from_secs(5))
                        .await?
                        .context("the stream ended")?
                        .json()?;
                    ensure!(first["type"] == "start", "{first}");
                    ensure!(first["requestId"] == id.as_str(), "{first}");
                    ensure!(first["sessionId"] == name.as_str(), "{first}");
                } else {
                    let answer = Answer::read(self.app.http.get(&url).send().await?).await?;
                    let unknown_url = self.app.url(&format!(
                        "/api/sse/stream/{name}?requestId={}&token={token}",
                        stream_schema::RequestId::new()
                    ));
                    let unknown =
                        Answer::read(self.app.http.get(&unknown_url).send().await?).await?;
                    ensure!(
                        (answer.status, &answer.body) == (unknown.status, &unknown.body),
                        "not yours {answer:?} vs unknown {unknown:?}"
                    );
                    ensure!(answer.status == 404, "{answer:?}");
                }
            }
            Call::Connections { tenant, session } => {
                let name = &self.sessions[session];
                let body = self
                    .call(
                        reqwest::Method::GET,
                        tenant,
                        &format!("/api/sessions/{name}/connections"),
                    )
                    .await?
                    .json()?;
                ensure!(body["sessionId"] == name.as_str(), "{body}");
                let own: BTreeSet<&str> = self
                    .started
                    .iter()
                    .filter(|s| s.tenant == tenant && s.session == session)
                    .map(|s| s.id.as_str())
                    .collect();
                for connection in body["connections"].as_array().into_iter().flatten() {
                    ensure!(connection["sessionId"] == name.as_str(), "{connection}");
                    let request = connection["requestId"].as_str().unwrap_or_default();
                    ensure!(
                        own.contains(request),
                        "another tenant's connection: {connection}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Redis: each (tenant, session) stream holds exactly the starts of its own requests.
    async fn check_redis(&self) -> anyhow::Result<()> {
        let model = ModelId::parse("mock")?;
        for (tenant, (name, _)) in TENANTS.iter().enumerate() {
            let tenant_id = TenantId::parse(name)?;
            for (session, client) in self.sessions.iter().enumerate() {
                let stored = SessionId::scoped(&tenant_id, &SessionId::parse(client)?);
                let key = RedisKey::session(&stored, &model);
                let entries = stream_io::session::range_after(
                    &self.app.redis,
                    &key,
                    stream_schema::EntryId::ZERO,
                    1_000,
                )
                .await?;
                let mut seen = BTreeSet::new();
                for entry in entries {
                    if let SessionEvent::Start { request_id, .. } =
                        SessionEvent::decode(&entry.fields)?
                    {
                        seen.insert(request_id.to_string());
                    }
                }
                let expected: BTreeSet<String> = self
                    .started
                    .iter()
                    .filter(|s| s.tenant == tenant && s.session == session)
                    .map(|s| s.id.clone())
                    .collect();
                ensure!(seen == expected, "{key}: {seen:?} != {expected:?}");
            }
        }
        Ok(())
    }
}

#[test]
fn random_calls_of_several_tenants_never_cross() -> anyhow::Result<()> {
    let app = TestApp::start_with(|settings| {
        for (tenant, key) in &TENANTS[1..] {
            settings.auth.api_keys.push(ApiKeyEntry {
                id: format!("key-{tenant}"),
                sha256: gateway::auth::hash_key(key),
                tenant: Some((*tenant).to_owned()),
                ..ApiKeyEntry::default()
            });
        }
    })?;
    let cases = AtomicU64::new(0);
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new(config)
        .run(&prop::collection::vec(call(), 1..=MAX_CALLS), |calls| {
            let case = cases.fetch_add(1, Ordering::Relaxed);
            let checked = app.block_on(async {
                let mut state = Case {
                    app: &app,
                    sessions: (0..SESSIONS).map(|s| format!("c{case}.s{s}")).collect(),
                    started: Vec::new(),
                };
                for call in &calls {
                    state.run(call).await.with_context(|| format!("{call:?}"))?;
                }
                state.check_redis().await
            });
            checked.map_err(|error| TestCaseError::fail(format!("{error:#}")))
        })
        .map_err(|error| anyhow!("{error}"))?;
    Ok(())
}
