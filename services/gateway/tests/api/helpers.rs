//! A gateway on port 0 with its own `redis-server`, driven from one runtime for all cases of a
//! property, and the checks every property shares.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use fred::prelude::*;
use fred::types::InfoKind;
use gateway::error::ApiError;
use gateway::stream_token::StreamTokens;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use service_kit::config::ApiKeyEntry;
use stream_schema::{GatewayId, RedisKey};
use test_support::RedisServer;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The API key the gateway accepts (id [`KEY_ID`]).
pub const API_KEY: &str = "sk-proptest";
pub const KEY_ID: &str = "test";
/// Stream-token secret of the gateway: the tests sign their own valid tokens with it.
pub const SECRET: &str = "proptest-secret";
/// Small limits so generated bodies reach them (`413`) without megabytes of input.
pub const MAX_BODY_BYTES: usize = 4096;
pub const MAX_PROMPT_BYTES: usize = 2048;
pub const MAX_MESSAGES: usize = 8;

/// Cases per property: enough to hit every branch of the input handling, few enough for a fast
/// suite on 2 cores. `PROPTEST_CASES` overrides it for a longer local run.
const CASES: u32 = 96;

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    /// A client of the gateway's Redis, for the write counter and assertions.
    pub redis: Client,
    /// Signs tokens exactly like the gateway (same kid and secret).
    pub tokens: StreamTokens,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    // Dropped after the gateway stopped (see `Drop`), and the runtime last.
    _redis_server: RedisServer,
    runtime: Runtime,
}

impl TestApp {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {})
    }

    /// Like [`TestApp::start`], with settings changed by `configure` first.
    pub fn start_with(configure: impl FnOnce(&mut service_kit::Settings)) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the test runtime")?;
        let (redis_server, redis, shutdown, server, port) = runtime.block_on(async {
            let redis_server = RedisServer::start().await?;
            let mut settings = service_kit::Settings::default();
            settings.redis.url = redis_server.url();
            settings.gateway.addr = "127.0.0.1:0".to_owned();
            settings.auth.api_keys = vec![ApiKeyEntry {
                id: KEY_ID.to_owned(),
                sha256: gateway::auth::hash_key(API_KEY),
                ..ApiKeyEntry::default()
            }];
            settings.auth.stream_token_secret = Some(SECRET.to_owned().into());
            settings.limits.max_body_bytes = MAX_BODY_BYTES;
            settings.limits.max_prompt_bytes = MAX_PROMPT_BYTES;
            settings.limits.max_messages = MAX_MESSAGES;
            configure(&mut settings);
            let shutdown = CancellationToken::new();
            let app = gateway::Application::build(settings, shutdown.clone())
                .await
                .context("building the gateway")?;
            let port = app.port();
            let server = tokio::spawn(app.run_until_stopped());
            let redis = redis_server.client().await?;
            anyhow::Ok((redis_server, redis, shutdown, server, port))
        })?;
        let settings = service_kit::Settings::default();
        let app = Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()?,
            redis,
            tokens: StreamTokens::new(
                settings.auth.stream_token_kid,
                SECRET.to_owned().into(),
                None,
                settings.auth.stream_token_ttl_secs,
            ),
            shutdown,
            server: Some(server),
            _redis_server: redis_server,
            runtime,
        };
        let ready = format!("{}/readyz", app.base);
        app.block_on(test_support::wait_for_http_ok(
            &ready,
            Duration::from_secs(20),
        ))?;
        // The gateway announces itself (its liveness key and its entry in `llm:gateways`) on
        // its first heartbeat, in the background; cases that count writes start after that.
        app.block_on(test_support::wait_until(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async { Ok(app.writes().await?.heartbeat.map(|_| ())) },
        ))
        .context("the gateway never announced itself in Redis")?;
        Ok(app)
    }

    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    /// Redis's count of data changes since the last save (the server never saves, `--save ""`,
    /// so every write of any kind raises it), with the gateway's liveness heartbeat: the one
    /// write the gateway makes on a timer (`connection_heartbeat_secs`), whatever requests do.
    pub async fn writes(&self) -> anyhow::Result<Writes> {
        // The test's own Redis serves one gateway: the one entry of `llm:gateways` names it.
        let gateways: Vec<String> = self.redis.hkeys(RedisKey::gateways().as_str()).await?;
        // The change count and the heartbeat are read in one transaction: a renewal falling
        // between two separate reads would count as a change and not as a renewal.
        let trx = self.redis.multi();
        let _: () = trx.info(Some(InfoKind::Persistence)).await?;
        if let Some(id) = gateways.first() {
            let alive = RedisKey::gateway_alive(&GatewayId::from_stored(id));
            let _: () = trx.get(alive.as_str()).await?;
        }
        let mut replies = trx.exec::<Vec<Value>>(true).await?.into_iter();
        let info: String = replies
            .next()
            .ok_or_else(|| anyhow!("no INFO reply in the transaction"))?
            .convert()?;
        let heartbeat: Option<String> = match replies.next() {
            Some(value) => value.convert()?,
            None => None,
        };
        let changes = info
            .lines()
            .find_map(|line| line.strip_prefix("rdb_changes_since_last_save:"))
            .ok_or_else(|| anyhow!("no rdb_changes_since_last_save in INFO persistence"))?
            .trim()
            .parse()
            .context("rdb_changes_since_last_save")?;
        Ok(Writes { changes, heartbeat })
    }

    /// The gateway's `gateway_connection_view_backlog` gauge: connection-view changes queued
    /// and not yet written. 0 before the first change.
    pub async fn view_backlog(&self) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        const GAUGE: &str = "gateway_connection_view_backlog";
        match test_support::metric_sample(&text, GAUGE) {
            Some(value) => Ok(value),
            None => {
                // Absent is 0; present but unreadable is an error, not 0.
                ensure!(
                    !text
                        .lines()
                        .any(|line| line.starts_with(&format!("{GAUGE} "))),
                    "{GAUGE} is not a number: {text}"
                );
                Ok(0.0)
            }
        }
    }

    /// Waits until the gateway's view writer has written every change it was given.
    pub async fn wait_for_view_written(&self) -> anyhow::Result<()> {
        test_support::wait_until(
            Duration::from_secs(20),
            Duration::from_millis(10),
            || async { Ok((self.view_backlog().await? == 0.0).then_some(())) },
        )
        .await
    }

    /// Waits until background writes of an accepted request (the connection view of an SSE
    /// client that just left) are over, so the next case starts from a quiet Redis.
    pub async fn settle(&self) -> anyhow::Result<()> {
        let mut last = self.writes().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(Duration::from_millis(40)).await;
            let now = self.writes().await?;
            if now.since(&last)? == 0 {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "Redis kept being written to for 5 s after a request"
            );
            last = now;
        }
    }

    /// Runs `check` on [`CASES`] generated inputs (shrinking a failure to a minimal one).
    pub fn check_all<S>(
        &self,
        strategy: S,
        check: impl Fn(S::Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>
    where
        S: Strategy,
        S::Value: Debug,
    {
        let mut config = Config {
            // Regression files would land in the source tree; a failure prints its input.
            failure_persistence: None,
            ..Config::default()
        };
        if std::env::var_os("PROPTEST_CASES").is_none() {
            config.cases = CASES;
        }
        let mut runner = TestRunner::new(config);
        runner
            .run(&strategy, |input| {
                check(input).map_err(|error| TestCaseError::fail(format!("{error:#}")))
            })
            .map_err(|error| anyhow!("{error}"))
    }
}

/// A reading of [`TestApp::writes`].
pub struct Writes {
    changes: u64,
    /// The liveness key's value: the time of its last renewal, so a new value is one more
    /// renewal.
    heartbeat: Option<String>,
}

impl Writes {
    /// Data changes between `before` and this reading, not counting a heartbeat renewal (one
    /// `SET`) that happened in between. A case lasts far less than the heartbeat period (1 s at
    /// the least), so at most one renewal falls between two readings of one case.
    pub fn since(&self, before: &Writes) -> anyhow::Result<u64> {
        let changes = self
            .changes
            .checked_sub(before.changes)
            .context("Redis's change count went backwards")?;
        let renewed = before.heartbeat.is_some() && self.heartbeat != before.heartbeat;
        Ok(changes.saturating_sub(u64::from(renewed)))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await });
        }
    }
}

/// A whole (non-streaming) answer.
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) {:?}",
            self.status,
            self.content_type,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status().as_u16();
        let content_type = content_type(&response);
        let body = response.bytes().await.context("reading the body")?.to_vec();
        Ok(Self {
            status,
            content_type,
            body,
        })
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "{} answered a body that is not JSON: {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The code of a `{"error": {"code", "message"}}` body; fails for any other body.
    pub fn error_code(&self) -> anyhow::Result<String> {
        ensure!(
            self.content_type.starts_with("application/json"),
            "{} answered with content type {:?}",
            self.status,
            self.content_type
        );
        let json = self.json()?;
        let code = json["error"]["code"]
            .as_str()
            .ok_or_else(|| anyhow!("no error.code in {json}"))?;
        ensure!(
            json["error"]["message"].is_string(),
            "no error.message in {json}"
        );
        ensure!(
            ApiError::CODES.contains(&code),
            "error code {code:?} is not one of ApiError::CODES"
        );
        Ok(code.to_owned())
    }
}

pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The checks every answer to a generated input must pass: never a 5xx; a 4xx is a JSON error
/// with a known code and wrote nothing to Redis (`writes_before` is the counter before the
/// request). Returns the error code of a 4xx.
pub async fn refused_cleanly(
    app: &TestApp,
    answer: &Answer,
    writes_before: &Writes,
) -> anyhow::Result<Option<String>> {
    ensure!(
        answer.status < 500,
        "server error {}: {:?}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    if answer.status < 400 {
        return Ok(None);
    }
    let code = answer.error_code()?;
    let written = app.writes().await?.since(writes_before)?;
    ensure!(
        written == 0,
        "a refused request ({} {code}) wrote to Redis ({written} changes)",
        answer.status,
    );
    Ok(Some(code))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the gateway sees exactly
/// `raw` after decoding (a `/` stays inside the segment, `#` and `?` stay data).
pub fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Seconds since the epoch, for issuing tokens.
pub fn now_secs() -> u64 {
    stream_schema::now_millis() / 1000
}

/// Counts the outcomes of a property's cases, so a test can require that its generators reach
/// every branch (a property that only ever met `400` would prove little).
#[derive(Default)]
pub struct Tally(std::sync::Mutex<std::collections::BTreeMap<String, u32>>);

impl Tally {
    pub fn record(&self, outcome: impl Into<String>) {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry(outcome.into()).or_default() += 1;
    }

    /// Fails unless every outcome in `wanted` happened at least once.
    pub fn require(&self, wanted: &[&str]) -> anyhow::Result<()> {
        let counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let missing: Vec<&&str> = wanted
            .iter()
            .filter(|w| !counts.contains_key(**w))
            .collect();
        ensure!(
            missing.is_empty(),
            "outcomes never reached: {missing:?} (reached: {counts:?})"
        );
        Ok(())
    }
}
