//! Tenants: a key sees only its tenant's sessions, and another tenant's session answers exactly
//! as one that does not exist; admin keys manage keys, and a revoked key is refused and its
//! open streams end on every gateway within 5 s.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use service_kit::config::ApiKeyEntry;
use test_support::stack::sha256_hex;
use test_support::wait_until;

use crate::stack::{Stack, StackOptions, TIMEOUT, options, payloads, str_field};

const ACME: &str = "sk-acme-key";
const GLOBEX: &str = "sk-globex-key";
const ADMIN: &str = "sk-admin-key";
/// How long a revocation may take to reach every replica and every open stream.
const REVOCATION_BOUND: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// The suite's options plus a key for tenants `acme` and `globex` and an admin of `ops`.
fn tenant_options() -> StackOptions {
    options().with_settings(|settings| {
        for (id, key, tenant, role) in [
            ("acme-1", ACME, "acme", "chat"),
            ("globex-1", GLOBEX, "globex", "chat"),
            ("ops-admin", ADMIN, "ops", "admin"),
        ] {
            settings.auth.api_keys.push(ApiKeyEntry {
                id: id.to_owned(),
                sha256: sha256_hex(key),
                tenant: Some(tenant.to_owned()),
                role: Some(role.to_owned()),
            });
        }
    })
}

/// A response as a client sees it: status and body bytes.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

/// One API key's calls on one stack.
struct As<'a> {
    stack: &'a Stack,
    key: &'a str,
}

impl<'a> As<'a> {
    fn new(stack: &'a Stack, key: &'a str) -> Self {
        Self { stack, key }
    }

    async fn call(
        &self,
        gateway: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let base = &self
            .stack
            .gateways
            .get(gateway)
            .context("no such gateway")?
            .url();
        let mut request = self
            .stack
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(self.key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        Ok(Answer {
            status: response.status().as_u16(),
            body: response.text().await?,
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.call(0, reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str) -> anyhow::Result<Answer> {
        self.call(0, reqwest::Method::POST, path, None).await
    }

    async fn start_on(&self, gateway: usize, session: &str, prompt: &str) -> anyhow::Result<Value> {
        let answer = self
            .call(
                gateway,
                reqwest::Method::POST,
                "/api/chat/start",
                Some(&json!({"sessionId": session, "modelId": "mock", "prompt": prompt})),
            )
            .await?;
        ensure!(answer.status == 200, "start: {answer:?}");
        answer.json()
    }

    async fn start(&self, session: &str, prompt: &str) -> anyhow::Result<Value> {
        self.start_on(0, session, prompt).await
    }

    /// The session-wide stream URL of `session` (a session token of this key).
    async fn session_stream(&self, session: &str) -> anyhow::Result<String> {
        let answer = self
            .post(&format!("/api/sessions/{session}/stream-token"))
            .await?;
        ensure!(answer.status == 200, "stream-token: {answer:?}");
        Ok(str_field(&answer.json()?, "streamUrl")?.to_owned())
    }

    async fn session_token(&self, session: &str) -> anyhow::Result<String> {
        let answer = self
            .post(&format!("/api/sessions/{session}/stream-token"))
            .await?;
        ensure!(answer.status == 200, "stream-token: {answer:?}");
        Ok(str_field(&answer.json()?, "streamToken")?.to_owned())
    }
}

/// A stream request without an API key (stream tokens only), as status and body.
async fn stream_answer(stack: &Stack, path: &str) -> anyhow::Result<Answer> {
    let response = stack
        .http
        .get(format!("{}{path}", stack.gateway()))
        .send()
        .await?;
    Ok(Answer {
        status: response.status().as_u16(),
        body: response.text().await?,
    })
}

/// The request ids of a list of SSE payloads.
fn request_ids(payloads: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = payloads
        .iter()
        .filter_map(|p| p["requestId"].as_str().map(str::to_owned))
        .collect();
    ids.dedup();
    ids
}

/// A totals counter of one model in a models report.
fn model_field(report: &Value, model: &str, field: &str) -> Option<u64> {
    report["models"]
        .as_array()?
        .iter()
        .find(|m| m["modelId"] == model)?["totals"][field]
        .as_u64()
}

/// `requests` of one model in a models report.
fn model_requests(report: &Value, model: &str) -> Option<u64> {
    model_field(report, model, "requests")
}

#[tokio::test]
async fn two_tenants_share_a_session_id_and_each_sees_only_its_own() -> anyhow::Result<()> {
    let stack = Stack::start(tenant_options()).await?;
    let (acme, globex) = (As::new(&stack, ACME), As::new(&stack, GLOBEX));

    // Both watch session `user_123` of their own tenant from before the first request.
    let mut acme_watch = stack
        .open(0, &acme.session_stream("user_123").await?, &[])
        .await?;
    let mut globex_watch = stack
        .open(0, &globex.session_stream("user_123").await?, &[])
        .await?;

    // At the same time each starts chats in `user_123`: 2 for acme, 1 for globex.
    let (a1, g1) = futures::try_join!(
        acme.start("user_123", "acme one [[mock tokens=5]]"),
        globex.start("user_123", "globex one [[mock tokens=5]]"),
    )?;
    let a2 = acme.start("user_123", "acme two [[mock tokens=5]]").await?;
    for started in [&a1, &a2, &g1] {
        assert_eq!(
            started["sessionId"], "user_123",
            "the client's own id: {started}"
        );
        assert!(str_field(started, "streamUrl")?.starts_with("/api/sse/stream/user_123?"));
    }
    let acme_ids = [str_field(&a1, "requestId")?, str_field(&a2, "requestId")?];
    let globex_id = str_field(&g1, "requestId")?;

    // Each request stream has exactly its own events, its start naming the client's session.
    for (started, prompt) in [(&a1, "acme one"), (&a2, "acme two"), (&g1, "globex one")] {
        let events = payloads(&stack.read_all(str_field(started, "streamUrl")?).await?)?;
        assert_eq!(request_ids(&events), [str_field(started, "requestId")?]);
        assert_eq!(events[0]["type"], "start");
        assert_eq!(events[0]["sessionId"], "user_123");
        assert_eq!(
            crate::stack::text_of(&events),
            crate::stack::expected_text(&format!("{prompt} [[mock tokens=5]]"), 5)
        );
    }

    // Each session-wide stream saw its own tenant's requests and nothing else.
    let terminal = |e: &test_support::SseEvent, id: &str| {
        e.json().is_ok_and(|p| {
            p["requestId"] == id && (p["type"] == "complete" || p["type"] == "error")
        })
    };
    let seen = payloads(
        &acme_watch
            .collect_until(TIMEOUT, |e| terminal(e, acme_ids[1]))
            .await?,
    )?;
    let mut seen_ids = request_ids(&seen);
    seen_ids.sort();
    seen_ids.dedup();
    let mut wanted = acme_ids.map(str::to_owned).to_vec();
    wanted.sort();
    assert_eq!(seen_ids, wanted, "acme's watcher");
    let seen = payloads(
        &globex_watch
            .collect_until(TIMEOUT, |e| terminal(e, globex_id))
            .await?,
    )?;
    assert_eq!(request_ids(&seen), [globex_id], "globex's watcher");

    // Counters: each tenant's session and models count its own requests only; the admin
    // sees the sum globally and each tenant's on request.
    let admin = As::new(&stack, ADMIN);
    let counted = wait_until(TIMEOUT, POLL, || async {
        let acme_session = acme.get("/api/analytics/sessions/user_123").await?.json()?;
        let globex_session = globex
            .get("/api/analytics/sessions/user_123")
            .await?
            .json()?;
        let global = admin.get("/api/analytics/models").await?.json()?;
        let done = acme_session["totals"]["finished"] == 2
            && globex_session["totals"]["finished"] == 1
            && model_field(&global, "mock", "finished") == Some(3);
        if !done {
            anyhow::bail!("not yet: {acme_session} {globex_session} {global}");
        }
        Ok(Some((acme_session, globex_session, global)))
    })
    .await?;
    let (acme_session, globex_session, global) = counted;
    assert_eq!(acme_session["sessionId"], "user_123");
    assert_eq!(acme_session["totals"]["requests"], 2);
    assert_eq!(globex_session["totals"]["requests"], 1);
    assert_eq!(model_requests(&global, "mock"), Some(3));
    assert!(global.get("tenant").is_none(), "{global}");
    let acme_models = acme.get("/api/analytics/models").await?.json()?;
    assert_eq!(acme_models["tenant"], "acme");
    assert_eq!(model_requests(&acme_models, "mock"), Some(2));
    let globex_models = globex.get("/api/analytics/models").await?.json()?;
    assert_eq!(model_requests(&globex_models, "mock"), Some(1));
    let as_admin = admin
        .get("/api/analytics/models?tenant=globex")
        .await?
        .json()?;
    assert_eq!(model_requests(&as_admin, "mock"), Some(1));
    let as_admin = admin
        .get("/api/analytics/sessions/user_123?tenant=acme")
        .await?
        .json()?;
    assert_eq!(as_admin["totals"]["requests"], 2);
    // The default tenant (the suite's key) never used `user_123`.
    let default = As::new(&stack, crate::stack::API_KEY)
        .get("/api/analytics/sessions/user_123")
        .await?
        .json()?;
    assert_eq!(default["totals"]["requests"], 0);
    Ok(())
}

/// What globex gets for everything it can ask about session `secret` and a request id.
async fn globex_view(stack: &Stack, request: &str) -> anyhow::Result<Vec<(String, Answer)>> {
    let globex = As::new(stack, GLOBEX);
    let token = globex.session_token("secret").await?;
    let mut answers = Vec::new();
    for (name, answer) in [
        (
            "connections",
            globex.get("/api/sessions/secret/connections").await?,
        ),
        (
            "session analytics",
            globex
                .get("/api/analytics/sessions/secret?minutes=5")
                .await?,
        ),
        (
            "models analytics",
            globex.get("/api/analytics/models?minutes=5").await?,
        ),
        ("key analytics", globex.get("/api/analytics/key").await?),
        (
            "cancel",
            globex.post(&format!("/api/chat/{request}/cancel")).await?,
        ),
        (
            "request stream",
            stream_answer(
                stack,
                &format!("/api/sse/stream/secret?requestId={request}&token={token}"),
            )
            .await?,
        ),
        (
            "another tenant's analytics",
            globex
                .get("/api/analytics/sessions/secret?tenant=acme")
                .await?,
        ),
    ] {
        answers.push((name.to_owned(), answer));
    }
    Ok(answers)
}

#[tokio::test]
async fn another_tenants_session_answers_exactly_as_one_that_does_not_exist() -> anyhow::Result<()>
{
    let stack = Stack::start(tenant_options()).await?;
    let (acme, globex) = (As::new(&stack, ACME), As::new(&stack, GLOBEX));
    // Globex's view before acme's session exists, for a request id nobody started...
    let unknown = stream_schema::RequestId::new().to_string();
    let before = globex_view(&stack, &unknown).await?;

    // ...then acme uses `secret`: a long request, a watcher on its stream.
    let started = acme
        .start("secret", "acme's plans [[mock tokens=400 delay_ms=5]]")
        .await?;
    let request = str_field(&started, "requestId")?.to_owned();
    let mut watcher = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    watcher.next_event(TIMEOUT).await?;
    wait_until(TIMEOUT, POLL, || async {
        let listed = acme.get("/api/sessions/secret/connections").await?.json()?;
        Ok((listed["connections"].as_array().map(Vec::len) == Some(1)).then_some(()))
    })
    .await?;

    // Globex's view of acme's session and request is byte for byte the "does not exist" one.
    let after = globex_view(&stack, &request).await?;
    for ((name, before), (_, after)) in before.iter().zip(&after) {
        assert_eq!(before, after, "{name}");
    }
    let statuses: Vec<u16> = after.iter().map(|(_, a)| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 404, 404, 403]);

    // A token globex minted for `secret` opens globex's `secret`, not acme's: its session-wide
    // stream stays silent while acme's request streams on.
    let mut globex_watch = stack
        .open(0, &globex.session_stream("secret").await?, &[])
        .await?;
    let acme_events = watcher.collect_to_end(TIMEOUT).await?;
    assert!(
        acme_events.len() > 400,
        "acme's stream: {}",
        acme_events.len()
    );
    let quiet = globex_watch.next_event(Duration::from_millis(500)).await;
    assert!(quiet.is_err(), "globex saw {:?}", quiet);
    // Acme's request token is acme's: on the session-wide stream it opens nothing (it is for one
    // request), and globex cannot use it for any other request.
    let acme_token = str_field(&started, "streamToken")?;
    assert_eq!(
        stream_answer(
            &stack,
            &format!("/api/sse/stream/secret?token={acme_token}")
        )
        .await?
        .status,
        403
    );
    // Acme's request was not cancelled by globex's attempt.
    let last = acme_events.last().context("no events")?.json()?;
    assert_eq!(last["type"], "complete");
    assert_eq!(last["finishReason"], "stop");
    Ok(())
}

/// `POST /api/admin/keys` as `admin` for `tenant`; returns the new key's id and secret.
async fn add_key(admin: &As<'_>, id: &str, tenant: &str) -> anyhow::Result<String> {
    let answer = admin
        .call(
            0,
            reqwest::Method::POST,
            "/api/admin/keys",
            Some(&json!({"id": id, "tenant": tenant})),
        )
        .await?;
    ensure!(answer.status == 201, "add key: {answer:?}");
    Ok(str_field(&answer.json()?, "key")?.to_owned())
}

#[tokio::test]
async fn admins_add_list_and_revoke_keys_and_others_cannot() -> anyhow::Result<()> {
    let stack = Stack::start(tenant_options()).await?;
    let admin = As::new(&stack, ADMIN);
    let acme = As::new(&stack, ACME);

    let secret = add_key(&admin, "acme-2", "acme").await?;
    // The new key works at once on this gateway's next refresh, in its tenant.
    let added = As::new(&stack, &secret);
    wait_until(REVOCATION_BOUND, POLL, || async {
        Ok((added.get("/api/analytics/key").await?.status == 200).then_some(()))
    })
    .await?;
    let started = added.start("shared", "hello [[mock tokens=2]]").await?;
    let acme_view = acme.get("/api/sessions/shared/connections").await?;
    assert_eq!(acme_view.status, 200);
    // Same tenant: acme-1 sees acme-2's session analytics once counted.
    stack.read_all(str_field(&started, "streamUrl")?).await?;
    wait_until(TIMEOUT, POLL, || async {
        let body = acme.get("/api/analytics/sessions/shared").await?.json()?;
        Ok((body["totals"]["requests"] == 1).then_some(()))
    })
    .await?;

    // The listing shows ids, tenants, roles and hash prefixes, never a key or a whole hash.
    let listing = admin.get("/api/admin/keys").await?;
    assert_eq!(listing.status, 200);
    assert!(!listing.body.contains(&secret));
    assert!(!listing.body.contains(&sha256_hex(&secret)));
    assert!(!listing.body.contains(&sha256_hex(ACME)));
    let keys = listing.json()?;
    let entry = keys["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["id"] == "acme-2"))
        .cloned()
        .context("acme-2 not listed")?;
    assert_eq!(entry["tenant"], "acme");
    assert_eq!(entry["role"], "chat");
    assert_eq!(entry["revoked"], false);
    assert_eq!(entry["sha256Prefix"], sha256_hex(&secret)[..8]);

    // Ids are unique forever; unknown ids are 404; non-admins are refused.
    let again = admin
        .call(
            0,
            reqwest::Method::POST,
            "/api/admin/keys",
            Some(&json!({"id": "acme-1", "tenant": "acme"})),
        )
        .await?;
    assert_eq!(again.status, 409);
    let unknown = admin
        .call(0, reqwest::Method::DELETE, "/api/admin/keys/nobody", None)
        .await?;
    assert_eq!(unknown.status, 404);
    for (method, path) in [
        (reqwest::Method::GET, "/api/admin/keys"),
        (reqwest::Method::POST, "/api/admin/keys"),
        (reqwest::Method::DELETE, "/api/admin/keys/acme-2"),
    ] {
        let refused = acme.call(0, method, path, None).await?;
        assert_eq!(refused.status, 403, "{path}");
        assert_eq!(refused.json()?["error"]["code"], "forbidden");
    }

    // Revoking a configured key works too, and is listed.
    let revoked = admin
        .call(0, reqwest::Method::DELETE, "/api/admin/keys/globex-1", None)
        .await?;
    assert_eq!(revoked.status, 200);
    let globex = As::new(&stack, GLOBEX);
    wait_until(REVOCATION_BOUND, POLL, || async {
        Ok((globex.get("/api/analytics/key").await?.status == 401).then_some(()))
    })
    .await?;
    let keys = admin.get("/api/admin/keys").await?.json()?;
    let globex_entry = keys["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["id"] == "globex-1"))
        .cloned()
        .context("globex-1 not listed")?;
    assert_eq!(globex_entry["revoked"], true);
    assert_eq!(globex_entry["source"], "config");
    Ok(())
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_its_streams_end_on_every_gateway_within_5s()
-> anyhow::Result<()> {
    let mut options = tenant_options();
    options.gateways = 2;
    let stack = Stack::start(options).await?;
    let admin = As::new(&stack, ADMIN);
    let secret = add_key(&admin, "doomed", "acme").await?;
    let doomed = As::new(&stack, &secret);
    // Added on gateway 0; gateway 1 accepts it within its refresh.
    wait_until(REVOCATION_BOUND, POLL, || async {
        let answer = doomed
            .call(1, reqwest::Method::GET, "/api/analytics/key", None)
            .await?;
        Ok((answer.status == 200).then_some(()))
    })
    .await?;

    // Open streams on both replicas: a long request's stream and a session-wide one each.
    let mut streams = Vec::new();
    for gateway in 0..2 {
        let started = doomed
            .start_on(
                gateway,
                "busy",
                &format!("long {gateway} [[mock tokens=5000 delay_ms=5]]"),
            )
            .await?;
        let mut request_stream = stack
            .open(gateway, str_field(&started, "streamUrl")?, &[])
            .await?;
        request_stream.next_event(TIMEOUT).await?;
        let session_stream = stack
            .open(gateway, &doomed.session_stream("busy").await?, &[])
            .await?;
        streams.push((gateway, "request", request_stream));
        streams.push((gateway, "session", session_stream));
    }
    // Load: the key keeps starting chats on both replicas until it is refused.
    let load = {
        let stack_http = stack.http.clone();
        let urls: Vec<String> = stack.gateways.iter().map(|g| g.url()).collect();
        let secret = secret.clone();
        tokio::spawn(async move {
            let mut refused_at = [None::<Instant>, None];
            let mut accepted = 0_u32;
            let give_up = Instant::now() + TIMEOUT;
            while refused_at.iter().any(Option::is_none) && Instant::now() < give_up {
                for (index, url) in urls.iter().enumerate() {
                    let status = stack_http
                        .post(format!("{url}/api/chat/start"))
                        .bearer_auth(&secret)
                        .json(&json!({"sessionId": "load", "modelId": "mock",
                            "prompt": "load [[mock tokens=3]]"}))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    match status {
                        200 => accepted += 1,
                        401 => {
                            refused_at[index].get_or_insert_with(Instant::now);
                        }
                        _ => {}
                    }
                }
            }
            (refused_at, accepted)
        })
    };
    // Let the load run a little before the revocation.
    wait_until(TIMEOUT, POLL, || async {
        let body = doomed.get("/api/analytics/key").await?.json()?;
        Ok((body["totals"]["requests"].as_u64() >= Some(4)).then_some(()))
    })
    .await?;

    let minted_before = doomed.session_stream("busy").await?;
    let revoked_at = Instant::now();
    let revoked = admin
        .call(1, reqwest::Method::DELETE, "/api/admin/keys/doomed", None)
        .await?;
    assert_eq!(revoked.status, 200);

    // Every open stream ends with a non-retryable `unauthorized` error within the bound.
    for (gateway, kind, mut stream) in streams {
        let rest = stream
            .collect_to_end(REVOCATION_BOUND + Duration::from_secs(1))
            .await?;
        let ended = revoked_at.elapsed();
        let last = rest
            .last()
            .with_context(|| format!("gateway {gateway} {kind}: no event"))?
            .json()?;
        assert_eq!(last["type"], "error", "gateway {gateway} {kind}: {last}");
        assert_eq!(last["code"], "unauthorized", "gateway {gateway} {kind}");
        assert_eq!(last["retryable"], false, "gateway {gateway} {kind}");
        assert!(
            ended <= REVOCATION_BOUND,
            "gateway {gateway} {kind} ended after {ended:?}"
        );
    }
    let (refused_at, accepted) = load.await?;
    assert!(accepted >= 4, "the load ran: {accepted}");
    for (gateway, at) in refused_at.iter().enumerate() {
        let at = at.with_context(|| format!("gateway {gateway} never refused the key"))?;
        let after = at.saturating_duration_since(revoked_at);
        assert!(
            after <= REVOCATION_BOUND,
            "gateway {gateway} refused after {after:?}"
        );
    }
    // Its stream tokens open nothing any more, on either replica, and it mints no new ones.
    for gateway in 0..2 {
        let response = stack
            .http
            .get(format!("{}{minted_before}", stack.gateways[gateway].url()))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 403, "gateway {gateway}");
        let answer = doomed
            .call(
                gateway,
                reqwest::Method::POST,
                "/api/sessions/busy/stream-token",
                None,
            )
            .await?;
        assert_eq!(answer.status, 401, "gateway {gateway}");
    }
    Ok(())
}

#[tokio::test]
async fn tenants_and_runtime_keys_work_on_a_cluster() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        redis: crate::stack::RedisSource::Cluster,
        ..tenant_options()
    })
    .await?;
    let admin = As::new(&stack, ADMIN);
    // The key store's scripts touch two keys in one slot.
    let secret = add_key(&admin, "acme-cluster", "acme").await?;
    let added = As::new(&stack, &secret);
    wait_until(REVOCATION_BOUND, POLL, || async {
        Ok((added.get("/api/analytics/key").await?.status == 200).then_some(()))
    })
    .await?;
    // A tenant's session keys (`{acme/…}`) and the default tenant's of the same id both work.
    let ours = added.start("on-cluster", "acme [[mock tokens=3]]").await?;
    let theirs = As::new(&stack, crate::stack::API_KEY)
        .start("on-cluster", "default [[mock tokens=3]]")
        .await?;
    for started in [&ours, &theirs] {
        let events = payloads(&stack.read_all(str_field(started, "streamUrl")?).await?)?;
        assert_eq!(request_ids(&events), [str_field(started, "requestId")?]);
        assert_eq!(
            events.last().map(|e| e["type"].clone()),
            Some(json!("complete"))
        );
    }
    let revoked = admin
        .call(
            0,
            reqwest::Method::DELETE,
            "/api/admin/keys/acme-cluster",
            None,
        )
        .await?;
    assert_eq!(revoked.status, 200);
    wait_until(REVOCATION_BOUND, POLL, || async {
        Ok((added.get("/api/analytics/key").await?.status == 401).then_some(()))
    })
    .await?;
    Ok(())
}
