//! The system under test: its own `redis-server`, mock-llm and the three bridge services
//! (release binaries), started by test-support's launcher from typed settings (each reads a
//! TOML file like production); and, for `--peers`, a LiteLLM proxy pointed at the same
//! mock-llm. Everything started here is a child of the
//! benchmark and is killed when its handle drops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fred::prelude::*;
use fred::types::InfoKind;
use service_kit::Settings;
use test_support::stack::{RedisSource, Service, StackOptions, StackRedis, non_default_toml};
use test_support::{RedisServer, ServiceProcess, free_port, sha256_hex, wait_for_http_ok};

use crate::probe;

/// The API key the benchmark's gateway accepts (id `bench`).
pub const API_KEY: &str = "sk-bench-key";
/// How long a service may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// LiteLLM imports a lot of Python before it listens.
const LITELLM_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Redis, mock-llm, one gateway, producer and processor, started by test-support's launcher.
pub struct Stack {
    /// The launched system; its processes are our children, killed when it drops.
    pub bridge: test_support::Stack,
    /// A client of our own for `INFO` (its commands are not the bridge's; the few it sends
    /// are subtracted where it matters).
    pub redis_client: Client,
    pub redis_pid: u32,
    /// The configuration keys that differ from the defaults, quoted in the report.
    pub config: String,
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(1, |_| {}).await
    }

    /// As [`Stack::start`], with `processors` processors (consumers `processor-0`, …) and
    /// `adjust` applied to the bench settings last.
    pub async fn start_with(
        processors: usize,
        adjust: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        let redis = RedisServer::start()
            .await
            .context("starting redis-server")?;
        let redis_client = redis.client().await?;
        let redis_pid: u32 = probe::info_field(&redis_client, InfoKind::Server, "process_id")
            .await?
            .parse()
            .context("parsing Redis process_id")?;
        let mut settings = Settings::default();
        settings.models.retain(|id, _| id == "mock");
        settings.auth.stream_token_secret = Some("bench-shared-secret".to_owned().into());
        settings.telemetry.log_level = "warn".to_owned();
        // Above the largest number of concurrent streams in the matrix.
        settings.producer.concurrency = 2048;
        adjust(&mut settings);
        let bridge = test_support::Stack::start(StackOptions {
            settings,
            api_keys: vec![("bench".to_owned(), API_KEY.to_owned())],
            redis: RedisSource::Existing(StackRedis::Single(redis)),
            ready_timeout: READY_TIMEOUT,
            processors,
            ..StackOptions::default()
        })
        .await?;
        let config = non_default_toml(bridge.settings())?;
        Ok(Self {
            bridge,
            redis_client,
            redis_pid,
            config,
        })
    }

    // The launcher starts at least one of each, so index 0 exists.
    pub fn gateway(&self) -> &Service {
        &self.bridge.gateways[0]
    }

    pub fn producer(&self) -> &Service {
        &self.bridge.producers[0]
    }

    pub fn processor(&self) -> &Service {
        &self.bridge.processors[0]
    }

    pub fn mock_llm(&self) -> &Service {
        &self.bridge.mock_llm
    }

    /// The port of the stack's Redis (for `MONITOR`, `redis-benchmark` and connection counts).
    pub fn redis_port(&self) -> u16 {
        self.bridge.redis.port()
    }

    /// Another gateway on the same config and Redis, on its own port, ready to serve: a fresh
    /// process whose memory has not been shaped by earlier load.
    pub async fn spawn_gateway(&self, name: &str) -> anyhow::Result<Service> {
        self.bridge.spawn_gateway(name).await
    }

    /// The bridge's own services, by name, for CPU accounting.
    pub fn bridge_pids(&self) -> [(&'static str, u32); 3] {
        [
            ("gateway", self.gateway().pid()),
            ("producer", self.producer().pid()),
            ("processor", self.processor().pid()),
        ]
    }

    /// Streams mock-llm is serving right now.
    pub async fn mock_active_streams(&self, http: &reqwest::Client) -> anyhow::Result<u64> {
        let stats: serde_json::Value = http
            .get(format!("{}/_mock/stats", self.mock_llm().url()))
            .send()
            .await?
            .json()
            .await?;
        stats["active_streams"]
            .as_u64()
            .context("mock-llm stats without active_streams")
    }

    /// Waits until mock-llm serves no stream (the previous load has drained), at most
    /// `timeout`; returns whether it did.
    pub async fn wait_idle(&self, http: &reqwest::Client, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.mock_active_streams(http).await, Ok(0)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// A LiteLLM proxy (one worker, logging off) in front of the stack's mock-llm.
pub struct LiteLlm {
    pub service: Service,
    /// The proxy's master key, made up per run (LiteLLM refuses to start without one).
    pub key: String,
    pub version: String,
    pub config: String,
    _dir: tempfile::TempDir,
}

impl LiteLlm {
    /// The venv `scripts/bench.sh --peers` creates.
    pub fn default_venv() -> Option<PathBuf> {
        std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache/llm-bridge/venv-litellm"))
    }

    pub async fn start(venv: &Path, mock_port: u16) -> anyhow::Result<Self> {
        let binary = venv.join("bin/litellm");
        if !binary.is_file() {
            bail!(
                "{} not found; `make bench-peers` installs litellm[proxy] there",
                binary.display()
            );
        }
        let version = probe::command_line(
            &venv.join("bin/python").display().to_string(),
            &[
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            None,
        );
        let dir = tempfile::tempdir().context("creating a temp dir for LiteLLM")?;
        let config = format!(
            r"model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: none
litellm_settings:
  set_verbose: false
  turn_off_message_logging: true
  telemetry: false
  request_timeout: 600
"
        );
        let path = dir.path().join("litellm.yaml");
        std::fs::write(&path, &config).with_context(|| format!("writing {}", path.display()))?;
        let port = free_port()?;
        let key = format!(
            "sk-{}",
            sha256_hex(&format!(
                "{:?} {}",
                std::time::SystemTime::now(),
                std::process::id()
            ))
        );
        let args = [
            "--config".to_owned(),
            path.display().to_string(),
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--num_workers".to_owned(),
            "1".to_owned(),
        ];
        let env = [
            ("LITELLM_MASTER_KEY".to_owned(), key.clone()),
            ("LITELLM_LOG".to_owned(), "ERROR".to_owned()),
            ("LITELLM_TELEMETRY".to_owned(), "False".to_owned()),
            ("DISABLE_ADMIN_UI".to_owned(), "True".to_owned()),
            ("NO_DOCS".to_owned(), "True".to_owned()),
            // Use the model cost map shipped in the package instead of fetching one.
            ("LITELLM_LOCAL_MODEL_COST_MAP".to_owned(), "True".to_owned()),
        ];
        let process = ServiceProcess::spawn("litellm", &binary, &args, &env)?;
        let service = Service { process, port };
        if let Err(error) = wait_for_http_ok(
            &format!("{}/health/liveliness", service.url()),
            LITELLM_READY_TIMEOUT,
        )
        .await
        {
            bail!(
                "LiteLLM did not become ready: {error}\n{}",
                service.process.log_tail(30).await
            );
        }
        Ok(Self {
            service,
            key,
            version,
            config,
            _dir: dir,
        })
    }
}
