//! One launcher for a whole local system: a Redis (single node, durable node, 3-master cluster,
//! or one the caller already started), mock-llm and any number of gateways, producers and
//! processors from the built binaries, on free loopback ports. Used by the e2e suite and the
//! bench.
//!
//! The caller describes the system with a typed [`service_kit::Settings`]; the launcher fills
//! in what only it knows (Redis URL, ports, API key hashes) and writes each process its own
//! TOML file, so every binary reads and validates a config exactly as in production. Every
//! process it starts is its own child and is killed when the [`Stack`] drops; nothing else is.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use fred::prelude::Client;
use serde_json::Value;
use service_kit::Settings;
use service_kit::config::ApiKeyEntry;

use crate::{
    RedisCluster, RedisServer, ServiceProcess, SseClient, SseConnection, SseEvent, bin_path,
    free_port, wait_for_http_ok,
};

/// How long the client helpers of [`Stack`] wait for a stream to end.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How often a service is tried on a fresh port after losing its port to another process.
const SPAWN_ATTEMPTS: usize = 3;

/// How often a fresh child's sockets are checked while it starts.
const BIND_POLL: Duration = Duration::from_millis(10);

/// Lowercase hex of SHA-256 of `text`: how `auth.api_keys` stores a key (and, for the bench,
/// a made-up LiteLLM master key).
pub fn sha256_hex(text: &str) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
    digest.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The settings as the TOML file a service reads.
pub fn settings_toml(settings: &Settings) -> anyhow::Result<String> {
    toml::to_string(settings).context("serialising the settings as TOML")
}

/// Only the keys of `settings` whose values differ from [`Settings::default`], as TOML: what
/// a report quotes ("every other key at its default").
pub fn non_default_toml(settings: &Settings) -> anyhow::Result<String> {
    let ours = toml::Table::try_from(settings).context("serialising the settings")?;
    let defaults = toml::Table::try_from(Settings::default()).context("serialising defaults")?;
    toml::to_string(&table_diff(&ours, &defaults)).context("serialising the settings diff")
}

/// The entries of `ours` that `defaults` lacks or holds with another value, recursively.
fn table_diff(ours: &toml::Table, defaults: &toml::Table) -> toml::Table {
    let mut out = toml::Table::new();
    for (key, value) in ours {
        match (value, defaults.get(key)) {
            (toml::Value::Table(ours), Some(toml::Value::Table(defaults))) => {
                let nested = table_diff(ours, defaults);
                if !nested.is_empty() {
                    out.insert(key.clone(), toml::Value::Table(nested));
                }
            }
            (value, Some(default)) if value == default => {}
            (value, _) => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

/// The stack's Redis: one node or a cluster.
pub enum StackRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl StackRedis {
    pub fn url(&self) -> String {
        match self {
            Self::Single(node) => node.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    /// The node's port, or the first master's in a cluster.
    pub fn port(&self) -> u16 {
        match self {
            Self::Single(node) => node.port(),
            Self::Cluster(cluster) => cluster.ports().first().copied().unwrap_or_default(),
        }
    }

    /// A fresh client of this Redis (cluster-aware for a cluster).
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
            Self::Cluster(_) => bail!("outage tests use a single node"),
        }
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Single(node) => node.restart().await,
            Self::Cluster(_) => bail!("outage tests use a single node"),
        }
    }
}

/// Where the stack's Redis comes from.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per stack, moved once: boxing would only add noise"
)]
pub enum RedisSource {
    /// A fresh single node without persistence.
    Single,
    /// A fresh single node that fsyncs every write, so its data survives `stop`/`restart`.
    Durable,
    /// A fresh 3-master cluster.
    Cluster,
    /// One the caller started (the stack owns it from now on and kills it on drop).
    Existing(StackRedis),
}

/// What to start, and the settings every process shares.
pub struct StackOptions {
    /// The base configuration. The launcher overwrites `redis.url`, each process's `addr`, the
    /// processors' `consumer_name` (`processor-<i>`) and `mock_llm.addr`; a model whose
    /// `base_url` points at the given `mock_llm.addr` is pointed at the stack's mock-llm.
    pub settings: Settings,
    /// API keys as `(id, plaintext)`: their hashes are added to `auth.api_keys`, and the
    /// first one is the key the client helpers of [`Stack`] send.
    pub api_keys: Vec<(String, String)>,
    pub redis: RedisSource,
    pub gateways: usize,
    pub producers: usize,
    /// At least one is started.
    pub processors: usize,
    /// Extra environment of every service process (e.g. `OTEL_BSP_SCHEDULE_DELAY`).
    pub service_env: Vec<(String, String)>,
    /// How long a service may take to become ready.
    pub ready_timeout: Duration,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            settings: Settings::default(),
            api_keys: Vec::new(),
            redis: RedisSource::Single,
            gateways: 1,
            producers: 1,
            processors: 1,
            service_env: Vec::new(),
            ready_timeout: Duration::from_secs(20),
        }
    }
}

impl StackOptions {
    /// The same options with the settings adjusted by `configure`.
    #[must_use]
    pub fn with_settings(mut self, configure: impl FnOnce(&mut Settings)) -> Self {
        configure(&mut self.settings);
        self
    }
}

/// The binaries the launcher runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    MockLlm,
    Gateway,
    Producer,
    Processor,
}

impl ServiceKind {
    fn binary(self) -> &'static str {
        match self {
            Self::MockLlm => "mock-llm",
            Self::Gateway => "gateway",
            Self::Producer => "producer",
            Self::Processor => "processor",
        }
    }

    /// mock-llm has no readiness beyond being up; the services report `/readyz`.
    fn ready_path(self) -> &'static str {
        match self {
            Self::MockLlm => "/healthz",
            Self::Gateway | Self::Producer | Self::Processor => "/readyz",
        }
    }

    fn addr_of(self, settings: &mut Settings) -> &mut String {
        match self {
            Self::MockLlm => &mut settings.mock_llm.addr,
            Self::Gateway => &mut settings.gateway.addr,
            Self::Producer => &mut settings.producer.addr,
            Self::Processor => &mut settings.processor.addr,
        }
    }
}

/// A spawned binary and the loopback port it serves on.
pub struct Service {
    pub process: ServiceProcess,
    pub port: u16,
}

impl Service {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits until the child holds its port (`true`) or exits first (`false`: most likely
    /// another process took the port after [`free_port`] released it).
    async fn wait_bound(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.process.listens_on(self.port)? {
                return Ok(true);
            }
            if self.process.try_exit_status()?.is_some() {
                return Ok(false);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} did not listen on port {} within {timeout:?}\n{}",
                    self.process.name(),
                    self.port,
                    self.process.log_tail(30).await
                );
            }
            tokio::time::sleep(BIND_POLL).await;
        }
    }

    /// Polls `path` until it answers 2xx; on timeout the error carries the log's tail.
    ///
    /// Only meaningful once the child holds the port ([`Service::wait_bound`]); before that
    /// the answer may come from another process.
    pub async fn wait_ok(&self, path: &str, timeout: Duration) -> anyhow::Result<()> {
        if let Err(error) = wait_for_http_ok(&format!("{}{path}", self.url()), timeout).await {
            bail!(
                "{} not ready: {error}\n{}",
                self.process.name(),
                self.process.log_tail(30).await
            );
        }
        Ok(())
    }
}

/// A running system. Fields hold our own children; dropping the stack kills them.
pub struct Stack {
    pub redis: StackRedis,
    pub mock_llm: Service,
    pub gateways: Vec<Service>,
    pub producers: Vec<Service>,
    /// `processors[0]` is consumer `processor-0`, and so on.
    pub processors: Vec<Service>,
    /// A client for the helpers below (no proxy: everything is on loopback).
    pub http: reqwest::Client,
    /// The settings as launched (Redis URL, mock-llm address, key hashes filled in); each
    /// process got a copy with its own `addr`.
    settings: Settings,
    /// The plaintext key the helpers send.
    api_key: String,
    service_env: Vec<(String, String)>,
    ready_timeout: Duration,
    /// Holds the generated config files for the stack's lifetime.
    config_dir: tempfile::TempDir,
}

impl Stack {
    /// Starts Redis, mock-llm, then the services, and waits until each one is ready.
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        let StackOptions {
            mut settings,
            api_keys,
            redis,
            gateways,
            producers,
            processors,
            service_env,
            ready_timeout,
        } = options;
        let redis = match redis {
            RedisSource::Single => StackRedis::Single(RedisServer::start().await?),
            RedisSource::Durable => StackRedis::Single(RedisServer::start_durable().await?),
            RedisSource::Cluster => StackRedis::Cluster(RedisCluster::start().await?),
            RedisSource::Existing(redis) => redis,
        };
        settings.redis.url = redis.url();
        let mock_port = free_port()?;
        move_mock_llm(&mut settings, mock_port);
        for (id, key) in &api_keys {
            settings.auth.api_keys.push(ApiKeyEntry {
                id: id.clone(),
                sha256: sha256_hex(key),
                ..ApiKeyEntry::default()
            });
        }
        let config_dir = tempfile::tempdir().context("creating a dir for the config files")?;
        // The services' model URLs name mock-llm's port, so it must hold its port before they
        // are configured; on a lost port race it moves, and the models move with it.
        let mock_llm = spawn(
            &config_dir,
            &settings,
            &service_env,
            ServiceKind::MockLlm,
            "mock-llm",
            mock_port,
        )?;
        let mock_llm = hold_port(mock_llm, ready_timeout, || {
            let port = free_port()?;
            move_mock_llm(&mut settings, port);
            spawn(
                &config_dir,
                &settings,
                &service_env,
                ServiceKind::MockLlm,
                "mock-llm",
                port,
            )
        })
        .await?;
        let mut stack = Self {
            mock_llm,
            redis,
            gateways: Vec::new(),
            producers: Vec::new(),
            processors: Vec::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .context("building the HTTP client")?,
            settings,
            api_key: api_keys
                .into_iter()
                .next()
                .map(|(_, key)| key)
                .unwrap_or_default(),
            service_env,
            ready_timeout,
            config_dir,
        };
        // All are spawned before any is awaited: they start up side by side.
        for index in 0..gateways {
            let service = stack.spawn(ServiceKind::Gateway, &format!("gateway-{index}"))?;
            stack.gateways.push(service);
        }
        for index in 0..producers {
            let service = stack.spawn(ServiceKind::Producer, &format!("producer-{index}"))?;
            stack.producers.push(service);
        }
        for index in 0..processors.max(1) {
            let service = stack.spawn(ServiceKind::Processor, &format!("processor-{index}"))?;
            stack.processors.push(service);
        }
        stack
            .mock_llm
            .wait_ok(ServiceKind::MockLlm.ready_path(), ready_timeout)
            .await?;
        let gateways = std::mem::take(&mut stack.gateways);
        stack.gateways = stack.ready(ServiceKind::Gateway, gateways).await?;
        let producers = std::mem::take(&mut stack.producers);
        stack.producers = stack.ready(ServiceKind::Producer, producers).await?;
        let processors = std::mem::take(&mut stack.processors);
        stack.processors = stack.ready(ServiceKind::Processor, processors).await?;
        Ok(stack)
    }

    /// Waits until each of `services` (spawned as `kind`) holds its port and is ready.
    async fn ready(
        &self,
        kind: ServiceKind,
        services: Vec<Service>,
    ) -> anyhow::Result<Vec<Service>> {
        let mut ready = Vec::with_capacity(services.len());
        for service in services {
            let name = service.process.name().to_owned();
            let service =
                hold_port(service, self.ready_timeout, || self.spawn(kind, &name)).await?;
            service
                .wait_ok(kind.ready_path(), self.ready_timeout)
                .await?;
            ready.push(service);
        }
        Ok(ready)
    }

    /// Spawns one more `kind` on a free port with the stack's settings, without waiting for
    /// it. A processor's consumer name is `name`.
    pub fn spawn(&self, kind: ServiceKind, name: &str) -> anyhow::Result<Service> {
        spawn(
            &self.config_dir,
            &self.settings,
            &self.service_env,
            kind,
            name,
            free_port()?,
        )
    }

    /// Another gateway on the same settings and Redis, ready to serve: a fresh process whose
    /// memory has not been shaped by earlier load.
    pub async fn spawn_gateway(&self, name: &str) -> anyhow::Result<Service> {
        let service = hold_port(
            self.spawn(ServiceKind::Gateway, name)?,
            self.ready_timeout,
            || self.spawn(ServiceKind::Gateway, name),
        )
        .await?;
        service
            .wait_ok(ServiceKind::Gateway.ready_path(), self.ready_timeout)
            .await?;
        Ok(service)
    }

    /// The settings as launched (before each process's own `addr`).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The base URL of gateway 0.
    pub fn gateway(&self) -> String {
        self.gateways
            .first()
            .map(Service::url)
            .unwrap_or_else(|| "http://127.0.0.1:0".to_owned())
    }

    /// `http://127.0.0.1:<port>` of gateway `index`.
    pub fn gateway_url(&self, index: usize) -> anyhow::Result<String> {
        self.gateways
            .get(index)
            .map(Service::url)
            .with_context(|| format!("the stack has no gateway {index}"))
    }

    pub async fn redis_client(&self) -> anyhow::Result<Client> {
        self.redis.client().await
    }

    /// `POST /api/chat/start` on gateway `index`; returns status and JSON body.
    pub async fn post_start(&self, index: usize, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/api/chat/start", self.gateway_url(index)?))
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// Starts a chat with model `mock` that must succeed; returns the response body.
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
            .bearer_auth(&self.api_key)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "stream-token: {}",
            response.status()
        );
        let body: Value = response.json().await?;
        body["streamUrl"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("missing string field streamUrl in {body}"))
    }

    /// `POST /api/chat/{id}/cancel` on gateway `index`.
    pub async fn cancel(&self, index: usize, request_id: &str) -> anyhow::Result<u16> {
        let response = self
            .http
            .post(format!(
                "{}/api/chat/{request_id}/cancel",
                self.gateway_url(index)?
            ))
            .bearer_auth(&self.api_key)
            .send()
            .await?;
        Ok(response.status().as_u16())
    }

    /// Opens a stream URL (path and query) on gateway `index`.
    pub async fn open(
        &self,
        index: usize,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<SseConnection> {
        SseClient::connect(&format!("{}{path}", self.gateway_url(index)?), headers).await
    }

    /// Reads a stream on gateway 0 until the server ends it.
    pub async fn read_all(&self, stream_url: &str) -> anyhow::Result<Vec<SseEvent>> {
        self.open(0, stream_url, &[])
            .await?
            .collect_to_end(TIMEOUT)
            .await
    }
}

/// Points mock-llm at `port`, and the models it serves (their `base_url` names its address)
/// with it.
fn move_mock_llm(settings: &mut Settings, port: u16) {
    let (old, new) = (
        format!("http://{}/", settings.mock_llm.addr),
        format!("http://127.0.0.1:{port}/"),
    );
    for model in settings.models.values_mut() {
        if let Some(path) = model.base_url.strip_prefix(&old) {
            model.base_url = format!("{new}{path}");
        }
    }
    settings.mock_llm.addr = format!("127.0.0.1:{port}");
}

/// Waits until `service` holds its port, replacing it by `respawn()` (a fresh port) when it
/// exited first: a port race with a parallel test. A broken config fails every attempt.
async fn hold_port(
    mut service: Service,
    timeout: Duration,
    mut respawn: impl FnMut() -> anyhow::Result<Service>,
) -> anyhow::Result<Service> {
    let mut attempt = 1;
    while !service.wait_bound(timeout).await? {
        if attempt == SPAWN_ATTEMPTS {
            bail!(
                "{} exited before listening, {attempt} times\n{}",
                service.process.name(),
                service.process.log_tail(30).await
            );
        }
        attempt += 1;
        service = respawn()?;
    }
    Ok(service)
}

/// Writes `<name>.toml` (the settings with this process's address) and spawns the binary on it.
fn spawn(
    dir: &tempfile::TempDir,
    settings: &Settings,
    env: &[(String, String)],
    kind: ServiceKind,
    name: &str,
    port: u16,
) -> anyhow::Result<Service> {
    let mut own = settings.clone();
    *kind.addr_of(&mut own) = format!("127.0.0.1:{port}");
    if kind == ServiceKind::Processor {
        own.processor.consumer_name = name.to_owned();
    }
    let path: PathBuf = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, settings_toml(&own)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let args = vec!["--config".to_owned(), path.display().to_string()];
    let process = ServiceProcess::spawn(name, &bin_path(kind.binary())?, &args, env)?;
    Ok(Service { process, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_is_the_hash_sha256sum_prints() {
        assert_eq!(
            sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    /// Every section with non-default values, optional keys set and unset, and a secret.
    fn adjusted() -> Settings {
        let mut settings = Settings::default();
        settings.auth.stream_token_secret = Some("launcher-secret".to_owned().into());
        settings.auth.api_keys.push(ApiKeyEntry {
            id: "test".to_owned(),
            sha256: sha256_hex("sk-test"),
            ..ApiKeyEntry::default()
        });
        settings.limits.keys.insert(
            "test".to_owned(),
            service_kit::config::KeyLimits {
                requests_per_window: Some(3),
                tokens_per_window: None,
            },
        );
        settings.telemetry.otlp_endpoint = Some("http://127.0.0.1:4318/v1/traces".to_owned());
        settings.gateway.cors_allowed_origins = vec!["https://chat.example.com".to_owned()];
        settings.streams.event_shards = 4;
        settings.producer.concurrency = 16;
        settings
    }

    #[test]
    fn written_settings_load_back_and_pass_validation() -> anyhow::Result<()> {
        let settings = adjusted();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, settings_toml(&settings)?)?;
        let loaded = Settings::load_from_vars(Some(&path), Vec::new())?;
        // Nothing lost or changed on the way: the file of the loaded settings is the same.
        assert_eq!(settings_toml(&loaded)?, settings_toml(&settings)?);
        assert_eq!(loaded.limits.requests_per_window_for("test"), 3);
        assert_eq!(loaded.streams.event_shards, 4);
        Ok(())
    }

    #[test]
    fn the_secret_reaches_the_file_but_not_debug_output() -> anyhow::Result<()> {
        let settings = adjusted();
        assert!(settings_toml(&settings)?.contains("launcher-secret"));
        assert!(!format!("{settings:?}").contains("launcher-secret"));
        Ok(())
    }

    #[test]
    fn the_diff_holds_only_changed_keys() -> anyhow::Result<()> {
        let diff: toml::Table = non_default_toml(&adjusted())?.parse()?;
        assert_eq!(diff["streams"].as_table().map(toml::Table::len), Some(1));
        assert_eq!(diff["producer"]["concurrency"].as_integer(), Some(16));
        assert!(!diff.contains_key("processor"));
        assert!(non_default_toml(&Settings::default())?.trim().is_empty());
        Ok(())
    }
}
