//! A whole local system for one test: its own redis-server and the real service binaries on
//! free loopback ports, configured through one TOML file like production. Everything it starts
//! is killed when the `Stack` is dropped.

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use serde_json::Value;
use test_support::{
    RedisCluster, RedisServer, ServiceProcess, SseClient, SseConnection, SseEvent, bin_path,
    free_port, wait_for_http_ok,
};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The API key every stack accepts (id `test`), and a second one (id `other`).
pub const API_KEY: &str = "sk-test-key";
pub const OTHER_API_KEY: &str = "sk-other-key";

fn sha256_hex(text: &str) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
    digest.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// What to start.
pub struct StackOptions {
    pub gateways: usize,
    pub producers: usize,
    /// Appended to the generated config (extra keys for existing sections must go through
    /// `gateway_toml` etc. because TOML forbids repeating a table).
    pub gateway_toml: String,
    pub streams_toml: String,
    /// Extra keys for the `[producer]` section.
    pub producer_toml: String,
    /// Extra keys for every `[models.*]` section (timeouts, retry policy).
    pub models_toml: String,
    /// Keys of the `[limits]` section (rate limits); `[limits.keys.*]` tables may follow.
    pub limits_toml: String,
    pub token_delay_ms: u64,
    /// Redis fsyncs every write, so its data survives a stop/restart (outage tests).
    pub durable_redis: bool,
    /// Processors to start (at least 1); consumer names are `processor-<i>`.
    pub processors: usize,
    /// Extra keys for the `[processor]` section.
    pub processor_toml: String,
    /// A 3-master Redis Cluster instead of a single node.
    pub cluster: bool,
    /// Keys of the `[telemetry]` section (OTLP export in trace tests).
    pub telemetry_toml: String,
    /// Extra environment of every service process (e.g. `OTEL_BSP_SCHEDULE_DELAY`).
    pub service_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            gateways: 1,
            producers: 1,
            gateway_toml: String::new(),
            streams_toml: String::new(),
            producer_toml: String::new(),
            models_toml: String::new(),
            limits_toml: String::new(),
            token_delay_ms: 1,
            durable_redis: false,
            processors: 1,
            processor_toml: String::new(),
            cluster: false,
            telemetry_toml: String::new(),
            service_env: Vec::new(),
        }
    }
}

pub struct Stack {
    pub redis: TestRedis,
    pub gateways: Vec<Service>,
    pub producers: Vec<Service>,
    pub processor: Service,
    /// Processors beyond the first (`StackOptions::processors`), `processor-1` onwards.
    pub extra_processors: Vec<Service>,
    pub mock_llm: Service,
    pub http: reqwest::Client,
    /// Holds the generated config file for the stack's lifetime.
    _config_dir: tempfile::TempDir,
}

/// The stack's Redis: one node or a cluster.
pub enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl TestRedis {
    pub fn url(&self) -> String {
        match self {
            Self::Single(node) => node.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        match self {
            Self::Single(node) => node.client().await,
            Self::Cluster(cluster) => cluster.client().await,
        }
    }

    /// Kills the node (outage tests run on a single node).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Single(node) => node.stop().await,
            Self::Cluster(_) => anyhow::bail!("outage tests use a single node"),
        }
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Single(node) => node.restart().await,
            Self::Cluster(_) => anyhow::bail!("outage tests use a single node"),
        }
    }
}

pub struct Service {
    pub process: ServiceProcess,
    pub port: u16,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> anyhow::Result<Self> {
        let redis = if options.cluster {
            TestRedis::Cluster(RedisCluster::start().await?)
        } else if options.durable_redis {
            TestRedis::Single(RedisServer::start_durable().await?)
        } else {
            TestRedis::Single(RedisServer::start().await?)
        };
        let config_dir = tempfile::tempdir()?;
        let mock_port = free_port()?;
        let gateway_ports = (0..options.gateways)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let producer_ports = (0..options.producers)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let processor_port = free_port()?;
        let config = format!(
            r#"
[redis]
url = "{redis}"

[models.mock]
base_url = "http://127.0.0.1:{mock_port}/v1"
upstream_model = "mock"
{models}

[models."gpt-4"]
base_url = "http://127.0.0.1:{mock_port}/v1"
upstream_model = "mock-gpt-4"
{models}

[streams]
event_shards = 4
{streams}

[auth]
stream_token_secret = "e2e-shared-secret"
api_keys = [{{ id = "test", sha256 = "{key_hash}" }}, {{ id = "other", sha256 = "{other_hash}" }}]

[mock_llm]
addr = "127.0.0.1:{mock_port}"
token_delay_ms = {delay}
default_tokens = 20

[producer]
concurrency = 16
claim_block_ms = 500
{producer}

[processor]
block_ms = 500
{processor}

[gateway]
{gateway}

[limits]
{limits}

[telemetry]
{telemetry}
"#,
            redis = redis.url(),
            key_hash = sha256_hex(API_KEY),
            other_hash = sha256_hex(OTHER_API_KEY),
            streams = options.streams_toml,
            delay = options.token_delay_ms,
            gateway = options.gateway_toml,
            limits = options.limits_toml,
            producer = options.producer_toml,
            models = options.models_toml,
            processor = options.processor_toml,
            telemetry = options.telemetry_toml,
        );
        let config_path = config_dir.path().join("bridge.toml");
        std::fs::write(&config_path, config)?;
        let args = vec!["--config".to_owned(), config_path.display().to_string()];
        let spawn = |name: &str, binary: &str, mut env: Vec<(String, String)>| {
            env.extend(options.service_env.iter().cloned());
            ServiceProcess::spawn(name, &bin_path(binary)?, &args, &env)
        };
        let addr = |key: &str, port: u16| vec![(key.to_owned(), format!("127.0.0.1:{port}"))];

        let mock_llm = Service {
            process: spawn("mock-llm", "mock-llm", vec![])?,
            port: mock_port,
        };
        let mut gateways = Vec::new();
        for (i, port) in gateway_ports.into_iter().enumerate() {
            gateways.push(Service {
                process: spawn(
                    &format!("gateway-{i}"),
                    "gateway",
                    addr("BRIDGE__GATEWAY__ADDR", port),
                )?,
                port,
            });
        }
        let mut producers = Vec::new();
        for (i, port) in producer_ports.into_iter().enumerate() {
            producers.push(Service {
                process: spawn(
                    &format!("producer-{i}"),
                    "producer",
                    addr("BRIDGE__PRODUCER__ADDR", port),
                )?,
                port,
            });
        }
        let spawn_processor = |index: usize, port: u16| -> anyhow::Result<Service> {
            let mut env = addr("BRIDGE__PROCESSOR__ADDR", port);
            env.push((
                "BRIDGE__PROCESSOR__CONSUMER_NAME".to_owned(),
                format!("processor-{index}"),
            ));
            let name = if index == 0 {
                "processor".to_owned()
            } else {
                format!("processor-{index}")
            };
            Ok(Service {
                process: spawn(&name, "processor", env)?,
                port,
            })
        };
        let processor = spawn_processor(0, processor_port)?;
        let mut extra_processors = Vec::new();
        for index in 1..options.processors.max(1) {
            extra_processors.push(spawn_processor(index, free_port()?)?);
        }
        let stack = Self {
            redis,
            gateways,
            producers,
            processor,
            extra_processors,
            mock_llm,
            http: reqwest::Client::builder().no_proxy().build()?,
            _config_dir: config_dir,
        };
        stack.wait_ready().await?;
        Ok(stack)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for_http_ok(&format!("{}/healthz", self.mock_llm.url()), TIMEOUT)
            .await
            .context("mock-llm not healthy")?;
        for service in self
            .gateways
            .iter()
            .chain(&self.producers)
            .chain(std::iter::once(&self.processor))
            .chain(&self.extra_processors)
        {
            if let Err(error) =
                wait_for_http_ok(&format!("{}/readyz", service.url()), TIMEOUT).await
            {
                anyhow::bail!(
                    "{} not ready: {error}\n{}",
                    service.process.name(),
                    service.process.log_tail(30).await
                );
            }
        }
        Ok(())
    }

    pub fn gateway(&self) -> String {
        self.gateways[0].url()
    }

    pub async fn redis_client(&self) -> anyhow::Result<Client> {
        self.redis.client().await
    }

    /// `POST /api/chat/start` on gateway `index`; returns status and JSON body.
    pub async fn post_start(&self, index: usize, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/api/chat/start", self.gateways[index].url()))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// Starts a chat that must succeed; returns the response body.
    pub async fn start_chat(&self, session: &str, prompt: &str) -> anyhow::Result<Value> {
        let (status, body) = self
            .post_start(
                0,
                &serde_json::json!({"sessionId": session, "modelId": "mock", "prompt": prompt}),
            )
            .await?;
        anyhow::ensure!(status == 200, "start failed: {status} {body}");
        Ok(body)
    }

    /// A URL for every stream of `session` (a session-scoped stream token).
    pub async fn session_stream(&self, session: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!(
                "{}/api/sessions/{session}/stream-token",
                self.gateway()
            ))
            .bearer_auth(API_KEY)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "stream-token: {}",
            response.status()
        );
        let body: Value = response.json().await?;
        Ok(str_field(&body, "streamUrl")?.to_owned())
    }

    /// `POST /api/chat/{id}/cancel` on gateway `index` with the test key.
    pub async fn cancel(&self, index: usize, request_id: &str) -> anyhow::Result<u16> {
        let response = self
            .http
            .post(format!(
                "{}/api/chat/{request_id}/cancel",
                self.gateways[index].url()
            ))
            .bearer_auth(API_KEY)
            .send()
            .await?;
        Ok(response.status().as_u16())
    }

    /// Opens the chat's stream URL on gateway `index`.
    pub async fn open(
        &self,
        index: usize,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<SseConnection> {
        SseClient::connect(&format!("{}{path}", self.gateways[index].url()), headers).await
    }

    /// Reads a request's stream on gateway 0 until the server ends it.
    pub async fn read_all(&self, stream_url: &str) -> anyhow::Result<Vec<SseEvent>> {
        self.open(0, stream_url, &[])
            .await?
            .collect_to_end(TIMEOUT)
            .await
    }
}

/// The text mock-llm generates for a single-prompt chat of `tokens` tokens with seed 0.
pub fn expected_text(prompt: &str, tokens: usize) -> String {
    mock_llm::text::completion_tokens(&mock_llm::text::prompt_text([prompt]), 0, tokens).concat()
}

/// The JSON of each event.
pub fn payloads(events: &[SseEvent]) -> anyhow::Result<Vec<Value>> {
    events.iter().map(SseEvent::json).collect()
}

/// Concatenated token contents.
pub fn text_of(payloads: &[Value]) -> String {
    payloads
        .iter()
        .filter(|p| p["type"] == "token")
        .filter_map(|p| p["content"].as_str())
        .collect()
}

pub fn str_field<'a>(value: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    value[name]
        .as_str()
        .with_context(|| format!("missing string field {name} in {value}"))
}
