//! Typed settings for every service, loaded once at start from defaults, an optional TOML file
//! and `BRIDGE__<SECTION>__<KEY>` environment overrides (SPEC §5).
//!
//! One file configures all services (it is also the Kubernetes ConfigMap), so every binary
//! parses and validates the whole file: a typo in any section stops every service at start.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why settings could not be loaded; the message always names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub redis: RedisSettings,
    /// Models clients may ask for, by the `modelId` of the API.
    pub models: BTreeMap<String, ModelSettings>,
    pub auth: AuthSettings,
    pub limits: LimitsSettings,
    pub streams: StreamsSettings,
    pub telemetry: TelemetrySettings,
    pub gateway: GatewaySettings,
    pub producer: ProducerSettings,
    pub processor: ProcessorSettings,
    pub mock_llm: MockLlmSettings,
}

impl Default for Settings {
    fn default() -> Self {
        let mut models = BTreeMap::new();
        // The local system runs with no API key: both default models are served by mock-llm.
        for (id, upstream) in [("mock", "mock"), ("gpt-4", "mock-gpt-4")] {
            models.insert(
                id.to_owned(),
                ModelSettings {
                    base_url: "http://127.0.0.1:8090/v1".to_owned(),
                    upstream_model: upstream.to_owned(),
                    ..ModelSettings::default()
                },
            );
        }
        Self {
            redis: RedisSettings::default(),
            models,
            auth: AuthSettings::default(),
            limits: LimitsSettings::default(),
            streams: StreamsSettings::default(),
            telemetry: TelemetrySettings::default(),
            gateway: GatewaySettings::default(),
            producer: ProducerSettings::default(),
            processor: ProcessorSettings::default(),
            mock_llm: MockLlmSettings::default(),
        }
    }
}

/// `[redis]`: where every service finds Redis.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://`, `rediss://` (TLS) or `redis-cluster://host:port?node=host:port…`.
    /// May carry `user:password@`; it is never printed.
    pub url: String,
    /// Connections in the pool that serves request handlers (blocking reads get their own).
    pub pool_size: usize,
    /// A command that takes longer fails, so API calls answer 503 instead of hanging. At most
    /// [`MAX_COMMAND_TIMEOUT_MS`]: SPEC promises a 503 within 2 s when Redis is unreachable.
    pub command_timeout_ms: u64,
    /// Time allowed to establish a connection.
    pub connect_timeout_ms: u64,
}

/// Upper bound of `redis.command_timeout_ms`. A handler answers 503 when its first Redis command
/// fails, which takes this long when Redis is unreachable; the rest of the 2 s that SPEC allows
/// is margin for the reconnect attempt and the response.
pub const MAX_COMMAND_TIMEOUT_MS: u64 = 1_500;

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            pool_size: 4,
            // Below SPEC's 2 s for a 503: a handler's first command fails within this.
            command_timeout_ms: 1_500,
            connect_timeout_ms: 2_000,
        }
    }
}

impl RedisSettings {
    /// Whether `url` names a Redis Cluster (`redis-cluster://` or `rediss-cluster://`).
    pub fn is_cluster(&self) -> bool {
        self.url.starts_with("redis-cluster://") || self.url.starts_with("rediss-cluster://")
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

/// The URL with any password replaced, for logs and debug output.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // set_password only fails for URLs that cannot carry one, which this one does.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparsable url>".to_owned(),
    }
}

/// Which wire API a model's upstream speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI Chat Completions (`POST {base_url}/chat/completions`): OpenAI and every
    /// OpenAI-compatible server (vLLM, Ollama, LiteLLM, mock-llm).
    #[default]
    OpenAi,
    /// Anthropic Messages (`POST {base_url}/messages`, `x-api-key`, `anthropic-version`).
    Anthropic,
}

/// `[models.<id>]`: one upstream model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// The API the upstream speaks: `openai` (the default) or `anthropic`.
    pub provider: Provider,
    /// API base, e.g. `http://127.0.0.1:8090/v1`, `https://api.openai.com/v1` or
    /// `https://api.anthropic.com/v1`.
    pub base_url: String,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Name of the environment variable holding the provider key (never the key itself).
    pub api_key_env: Option<String>,
    /// Upper bound on the whole upstream request, first byte to last.
    pub request_timeout_secs: u64,
    /// Time allowed to open the TCP (and TLS) connection to the upstream.
    pub connect_timeout_ms: u64,
    /// Time from sending a request (each try) to its first generated token; past it the request
    /// ends with an `upstream_timeout` error.
    pub first_token_timeout_ms: u64,
    /// Longest silence allowed between two stream chunks once tokens flow; past it the request
    /// ends with an `upstream_timeout` error (tokens already written stay readable).
    pub idle_timeout_ms: u64,
    /// Most requests this producer sends to this model at once; 0 means only
    /// `producer.concurrency` limits them.
    pub max_concurrency: usize,
    /// Retries of a request that failed before its first token with a connect error, 429 or
    /// 5xx. 0 disables retrying.
    pub max_retries: u32,
    /// First retry delay; each retry doubles it (with jitter) up to `retry_max_ms`.
    pub retry_base_ms: u64,
    /// Longest delay between two tries. A `Retry-After` longer than this is not waited for: the
    /// request ends at once with a retryable error instead of holding a concurrency permit.
    pub retry_max_ms: u64,
    /// Models (ids of this table) that serve a request this model cannot: when a request fails
    /// before its first token with a retryable error and its retries are spent, it moves to the
    /// next model of this list, in order. Only this model's list is followed (not the
    /// fallbacks' own lists).
    pub fallbacks: Vec<String>,
    /// `max_tokens` sent when the request says no `maxTokens` and the API requires one
    /// (Anthropic).
    pub default_max_tokens: u32,
    /// The `anthropic-version` header of an `anthropic` model.
    pub anthropic_version: String,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            provider: Provider::OpenAi,
            base_url: String::new(),
            upstream_model: String::new(),
            api_key_env: None,
            request_timeout_secs: 600,
            connect_timeout_ms: 5_000,
            first_token_timeout_ms: 60_000,
            idle_timeout_ms: 30_000,
            max_concurrency: 0,
            max_retries: 3,
            retry_base_ms: 250,
            retry_max_ms: 10_000,
            fallbacks: Vec::new(),
            default_max_tokens: 4_096,
            anthropic_version: "2023-06-01".to_owned(),
        }
    }
}

/// `[auth]`: API keys for the API and the secret that signs stream tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Development only: accept API calls without a key. The gateway logs a warning at start.
    pub allow_anonymous: bool,
    /// Accepted API keys, stored as hashes: `{ id = "team-a", sha256 = "<hex of SHA-256(key)>" }`.
    /// The id names the key in logs, analytics and limits.
    pub api_keys: Vec<ApiKeyEntry>,
    /// A file with more keys, one `id:sha256hex` per line (`#` comments): mount a Kubernetes
    /// Secret here.
    pub api_keys_file: Option<String>,
    /// HMAC-SHA256 secret that signs stream tokens; every gateway replica needs the same one.
    /// Without it each replica makes up its own (tokens then only work on that replica).
    #[serde(
        serialize_with = "serialize_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub stream_token_secret: Option<secrecy::SecretString>,
    /// Key id of `stream_token_secret`, carried in tokens so a rotated secret can be told apart.
    pub stream_token_kid: String,
    /// The secret being rotated out: tokens it signed stay valid until they expire.
    #[serde(
        serialize_with = "serialize_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub previous_stream_token_secret: Option<secrecy::SecretString>,
    pub previous_stream_token_kid: String,
    /// Lifetime of a stream token.
    pub stream_token_ttl_secs: u64,
    /// How often each gateway checks the key store in Redis (keys added or revoked while
    /// running); a revocation takes effect on every replica within about this long.
    pub key_refresh_ms: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            api_keys: Vec::new(),
            api_keys_file: None,
            stream_token_secret: None,
            stream_token_kid: "k1".to_owned(),
            previous_stream_token_secret: None,
            previous_stream_token_kid: "k0".to_owned(),
            stream_token_ttl_secs: 3_600,
            key_refresh_ms: 1_000,
        }
    }
}

/// Writes a secret's value, so a typed `Settings` can be saved as the config file a service
/// reads (the test and bench launcher does). `SecretString` serialises nothing by itself, and
/// its `Debug` stays redacted: this is the only way out, and only through a serializer.
fn serialize_secret<S: serde::Serializer>(
    secret: &Option<secrecy::SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret;
    match secret {
        Some(secret) => serializer.serialize_some(secret.expose_secret()),
        None => serializer.serialize_none(),
    }
}

/// One accepted API key, by the hash of its value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub id: String,
    pub sha256: String,
    /// The tenant whose sessions the key sees (1-64 of A-Z a-z 0-9 - _); `default` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `chat` (the default) or `admin` (every tenant's analytics, key management).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// `[limits]`: input bounds the gateway enforces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest prompt: the bytes of every message's text, image URLs, tool calls and ids.
    pub max_prompt_bytes: usize,
    /// Most messages in one request.
    pub max_messages: usize,
    /// Most `tools` in one request (OpenAI accepts 128).
    pub max_tools: usize,
    /// Largest `tools` list, in bytes of its JSON (names, descriptions, parameter schemas).
    pub max_tools_bytes: usize,
    /// Largest `maxTokens` a client may ask for.
    pub max_tokens_cap: u32,
    /// Length of the rate-limit window in seconds (a minute; tests shorten it).
    pub window_secs: u64,
    /// Chat starts per window per API key; 0 = unlimited. `keys.<id>` overrides it. Accepts
    /// the old name `requests_per_minute` (the window is `window_secs`, not always a minute).
    #[serde(alias = "requests_per_minute")]
    pub requests_per_window: u32,
    /// Chat starts per window per session (across all keys); 0 = unlimited.
    #[serde(alias = "session_requests_per_minute")]
    pub session_requests_per_window: u32,
    /// Completion tokens per window per API key; 0 = unlimited. `keys.<id>` overrides it.
    /// A start reserves `maxTokens` (or `default_token_estimate`); the processor gives back
    /// what the request did not use.
    #[serde(alias = "tokens_per_minute")]
    pub tokens_per_window: u64,
    /// Tokens reserved for a request that does not say `maxTokens`.
    pub default_token_estimate: u32,
    /// End a request with `finishReason: "rate_limited"` when it streams more tokens than it
    /// reserved (only possible when the reservation was the estimate).
    pub hard_token_cap: bool,
    /// Per-key overrides, by API key id.
    pub keys: BTreeMap<String, KeyLimits>,
}

/// `[limits.keys.<id>]`: limits of one API key; unset fields use the defaults above.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyLimits {
    #[serde(alias = "requests_per_minute")]
    pub requests_per_window: Option<u32>,
    #[serde(alias = "tokens_per_minute")]
    pub tokens_per_window: Option<u64>,
}

impl LimitsSettings {
    /// Requests per window for an API key (0 = unlimited).
    pub fn requests_per_window_for(&self, key_id: &str) -> u32 {
        self.keys
            .get(key_id)
            .and_then(|k| k.requests_per_window)
            .unwrap_or(self.requests_per_window)
    }

    /// Tokens per window for an API key (0 = unlimited).
    pub fn tokens_per_window_for(&self, key_id: &str) -> u64 {
        self.keys
            .get(key_id)
            .and_then(|k| k.tokens_per_window)
            .unwrap_or(self.tokens_per_window)
    }
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_prompt_bytes: 256 * 1024,
            max_messages: 256,
            max_tools: 128,
            max_tools_bytes: 256 * 1024,
            max_tokens_cap: 32_768,
            window_secs: 60,
            requests_per_window: 0,
            session_requests_per_window: 0,
            tokens_per_window: 0,
            default_token_estimate: 1_024,
            hard_token_cap: true,
            keys: BTreeMap::new(),
        }
    }
}

/// `[streams]`: retention and sharding of the Redis streams.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsSettings {
    /// Approximate cap of the job stream.
    pub requests_maxlen: u64,
    /// Approximate cap of each event shard.
    pub events_maxlen: u64,
    /// Number of `llm:events:{n}` shards.
    pub event_shards: u16,
    /// A session stream expires this long after its last request started or ended; when a
    /// request starts, entries older than twice this are trimmed (by age, never by count, so
    /// no entry of a running request or of one within its TTL is lost). A request must finish
    /// within this time.
    pub session_ttl_secs: u64,
}

impl Default for StreamsSettings {
    fn default() -> Self {
        Self {
            requests_maxlen: 100_000,
            events_maxlen: 1_000_000,
            event_shards: 8,
            session_ttl_secs: 3_600,
        }
    }
}

/// `[telemetry]`: logs and traces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Log filter directive, e.g. `info` or `gateway=debug,info`; `RUST_LOG` wins. It filters
    /// logs only: exported traces keep every info span whatever it says.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces`. Unset (the
    /// default) exports nothing and costs nothing.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (the default) or `http/json`.
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces sampled, 0.0–1.0; a sampled parent's children are always kept.
    pub sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The most HTTP workers actix-web runs (it refuses more).
pub const MAX_HTTP_WORKERS: usize = 512;

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Listen address of the HTTP API, SSE and demo page.
    pub addr: String,
    /// Seconds between `: ping` comments on an idle SSE stream.
    pub keepalive_secs: u64,
    /// Bytes an SSE client may fall behind before it is disconnected (it resumes from Redis).
    pub sse_buffer_bytes: usize,
    /// An SSE client that takes nothing for this long while frames wait for it (its TCP window
    /// is full: it stopped reading) is disconnected: its delivery task, hub subscription and
    /// queued frames are freed, and it resumes from Redis with `Last-Event-ID` when it reads
    /// again.
    pub sse_write_timeout_ms: u64,
    /// Most entries one multiplexed `XREAD` returns per stream.
    pub reader_batch: u64,
    /// How long the multiplexed reader blocks in one `XREAD`.
    pub reader_block_ms: u64,
    /// How often the gateway renews its one liveness key in the shared (Redis) connection view
    /// (and writes the event counts of connections that sent events; idle ones cost nothing).
    pub connection_heartbeat_secs: u64,
    /// The liveness key's TTL: a gateway that stops renewing it (it died) has its connections
    /// leave the shared view after this long. Must exceed the heartbeat interval.
    pub connection_ttl_secs: u64,
    /// The multiplexed reader reads a stream when its writes announce themselves (Pub/Sub,
    /// `SPUBLISH` in the writing script), and reads every followed stream at least this often:
    /// the safety net for a lost announcement. Its former name, `cluster_poll_ms` (when only
    /// a cluster used announcements), is still accepted.
    #[serde(alias = "cluster_poll_ms")]
    pub reader_sweep_ms: u64,
    /// A single node: while the gateway follows at most this many streams, its reader blocks
    /// in one `XREAD` over all of them (each entry arrives with the read's reply); above, it
    /// reads only the streams whose writes were announced (Redis's cost then grows with the
    /// streams written, not the streams followed). `0`: always announcements. A value above
    /// any stream count keeps the blocking read, e.g. while producers of a release that did
    /// not announce are still running. A cluster always reads on announcements.
    pub reader_block_max_streams: usize,
    /// Browser origins allowed to call the API cross-origin (CORS), e.g.
    /// `["https://chat.example.com"]`. Empty (the default) sends no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
    /// A non-streaming `POST /v1/chat/completions` waits at most this long for its request to
    /// end, then answers `504` with an OpenAI error (`code: timeout`); the request keeps
    /// running and can still be read with `GET /v1/chat/completions/{id}/stream`. Below the
    /// OpenAI SDKs' own 600 s default, so the client gets this answer rather than its timeout.
    pub completion_timeout_secs: u64,
    /// The model of a `POST /api/chat` (AI SDK) body without `model`. Unset: the first
    /// configured model id in sorted order. Must name a configured model.
    pub default_model: Option<String>,
    /// A new connection must deliver its first request head within this many milliseconds, or
    /// it is answered `408` and closed (actix-web's client request timeout, 5 s by its own
    /// default). The clock starts at the accept, so a burst of new connections on a saturated
    /// gateway can run past a short value before their requests are even read; leave slow
    /// clients to the ingress. 0 turns the timeout off.
    pub client_request_timeout_ms: u64,
    /// HTTP worker threads (each an actix-web event loop serving its share of the
    /// connections); the multiplexed reader runs on the main thread beside them. `0` (the
    /// default): one per CPU the process may use, which a pod's CPU limit caps (one in
    /// `k8s/`). At most 512. One worker cost less CPU per token on the bench's two cores, but
    /// its latencies were worse in the full benchmark (`bench/results/notes.md`).
    pub http_workers: usize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".to_owned(),
            keepalive_secs: 15,
            sse_buffer_bytes: 1024 * 1024,
            sse_write_timeout_ms: 10_000,
            reader_batch: 512,
            reader_block_ms: 5_000,
            connection_heartbeat_secs: 5,
            connection_ttl_secs: 15,
            reader_sweep_ms: 1_000,
            reader_block_max_streams: 128,
            cors_allowed_origins: Vec::new(),
            completion_timeout_secs: 540,
            default_model: None,
            client_request_timeout_ms: 30_000,
            http_workers: 0,
        }
    }
}

/// `[producer]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSettings {
    /// Listen address of health and metrics.
    pub addr: String,
    /// Most requests one producer streams at once; it claims jobs only when a worker permit is free.
    pub concurrency: usize,
    /// Consumer name in `llm:producers`; empty means hostname-pid (unique per process).
    pub consumer_name: String,
    /// How long one `XREADGROUP` for jobs blocks.
    pub claim_block_ms: u64,
    /// On SIGTERM, how long in-flight requests may run on; unfinished ones stay pending and
    /// another producer reclaims them. Keep it below the pod's termination grace period.
    pub shutdown_grace_secs: u64,
    /// A claimed job whose producer has not renewed it for this long is presumed dead and
    /// reclaimed by another producer (`XAUTOCLAIM` min-idle), which restarts the request.
    pub lease_ms: u64,
    /// How often a producer renews the leases of the jobs it works on. Must be well below
    /// `lease_ms` (at most half of it) so a slow Redis call does not lose a lease.
    pub lease_renew_ms: u64,
    /// How often a producer with a free worker permit looks for jobs whose lease ran out (its blocking
    /// read for new jobs waits at most this long, so `claim_block_ms` is capped by it).
    pub reclaim_interval_ms: u64,
    /// Attempts a request gets (the first one plus restarts after a producer died). A job
    /// reclaimed after that many goes to the dead-letter stream `llm:dead` and its client gets
    /// a `job_failed` error.
    pub max_attempts: u32,
    /// Tokens arriving within this window are merged into one `token` event (fewer entries and
    /// SSE messages at high token rates, up to the window in latency). 0 (default) keeps one
    /// event per token; tokens are batched into script calls without a timer either way.
    pub token_coalesce_ms: u64,
    /// A consumer of `llm:producers` idle this long with nothing pending is removed (a crashed
    /// or scaled-down producer; default 1 h). 0 never removes any. Live producers mark their
    /// consumers seen every 5 s, so keep it well above that.
    pub dead_consumer_secs: u64,
    /// Threads of the producer's async runtime. `0` (the default): one per CPU the process may
    /// use, which a pod's CPU limit caps (one in `k8s/`). One keeps a token's hops (upstream
    /// connection, SSE parser, attempt, Redis call) on one thread: less CPU per token on the
    /// bench's two cores, with latencies that moved either way between runs
    /// (`bench/results/notes.md`).
    pub runtime_threads: usize,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8081".to_owned(),
            concurrency: 64,
            consumer_name: String::new(),
            claim_block_ms: 2_000,
            shutdown_grace_secs: 20,
            lease_ms: 15_000,
            lease_renew_ms: 3_000,
            reclaim_interval_ms: 2_000,
            max_attempts: 3,
            token_coalesce_ms: 0,
            dead_consumer_secs: 3_600,
            runtime_threads: 0,
        }
    }
}

/// `[processor]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSettings {
    /// Listen address of health and metrics.
    pub addr: String,
    /// Consumer name in `llm:processors`; empty means hostname-pid.
    pub consumer_name: String,
    /// Most entries read per shard per batch.
    pub batch_size: u64,
    /// How long one `XREADGROUP` blocks.
    pub block_ms: u64,
    /// After a batch smaller than `batch_size`, how long a shard's loop lets records gather
    /// (counted from the start of that read) before it reads again, so that records arriving
    /// meanwhile are applied together: counters shared by many requests (a model's, a
    /// tenant's, a key's, the minute's) are then written once per batch, not once per record.
    /// Analytics and quota settlement trail the streams by up to this much. 0 reads again at
    /// once.
    pub gather_ms: u64,
    /// Analytics keys expire after this long without updates.
    pub stats_ttl_secs: u64,
    /// Entries pending this long with a consumer are presumed orphaned and reclaimed. A consumer
    /// that was only stalled, not dead, leaves them to the one that claimed them: records count
    /// once either way, so a short value costs only needless claims.
    pub reclaim_idle_ms: u64,
    /// The exactly-once ledger forgets an entry id when the entry is acknowledged; an id whose
    /// entry left the stream unacknowledged (trimmed while pending) is dropped after this long.
    pub ledger_ttl_secs: u64,
    /// How long the per-minute analytics buckets are kept (default 2 h); also the largest
    /// `?minutes=` window the analytics API serves.
    pub window_retention_secs: u64,
    /// A group consumer idle this long with nothing pending is removed from `llm:processors`
    /// (a crashed or scaled-down processor; default 1 h). 0 never removes any. Live processors
    /// mark their consumers seen every 5 s, so keep it well above that.
    pub dead_consumer_secs: u64,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8082".to_owned(),
            consumer_name: String::new(),
            batch_size: 256,
            block_ms: 2_000,
            gather_ms: 100,
            stats_ttl_secs: 7 * 24 * 3_600,
            reclaim_idle_ms: 30_000,
            ledger_ttl_secs: 24 * 3_600,
            window_retention_secs: 2 * 3_600,
            dead_consumer_secs: 3_600,
        }
    }
}

/// `[mock_llm]`: the development upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockLlmSettings {
    /// Listen address; models point at `http://<addr>/v1`.
    pub addr: String,
    /// Tokens per completion unless the request or a directive says otherwise.
    pub default_tokens: usize,
    /// Delay before each token, in milliseconds.
    pub token_delay_ms: u64,
    /// Seed mixed into the deterministic text.
    pub seed: u64,
}

impl Default for MockLlmSettings {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8090".to_owned(),
            default_tokens: 120,
            token_delay_ms: 20,
            seed: 0,
        }
    }
}

impl Settings {
    /// Defaults, then the TOML file (when given), then `BRIDGE__SECTION__KEY` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env = config::Environment::with_prefix("BRIDGE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        Self::load_with(path, env)
    }

    /// Like [`Settings::load`] with explicit variables instead of the process environment.
    pub fn load_from_vars(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env = config::Environment::with_prefix("BRIDGE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars.into_iter().collect()));
        Self::load_with(path, env)
    }

    fn load_with(path: Option<&Path>, env: config::Environment) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder.add_source(env).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: URLs parse, addresses parse, limits are positive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let redis = url::Url::parse(&self.redis.url)
            .map_err(|e| invalid("redis.url", format!("not a URL: {e}")))?;
        if !matches!(
            redis.scheme(),
            "redis" | "rediss" | "redis-cluster" | "rediss-cluster"
        ) {
            return Err(invalid(
                "redis.url",
                "scheme must be redis, rediss or redis-cluster",
            ));
        }
        if self.redis.command_timeout_ms == 0
            || self.redis.command_timeout_ms > MAX_COMMAND_TIMEOUT_MS
        {
            return Err(invalid(
                "redis.command_timeout_ms",
                format!(
                    "must be between 1 and {MAX_COMMAND_TIMEOUT_MS}: API calls promise a 503 \
                     within 2 s when Redis is unreachable"
                ),
            ));
        }
        if let Some(model) = &self.gateway.default_model
            && !self.models.contains_key(model)
        {
            return Err(invalid(
                "gateway.default_model",
                format!("{model:?} is not a configured model"),
            ));
        }
        if self.gateway.completion_timeout_secs == 0 {
            return Err(invalid(
                "gateway.completion_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.gateway.sse_write_timeout_ms == 0 {
            return Err(invalid(
                "gateway.sse_write_timeout_ms",
                "must be at least 1",
            ));
        }
        for (key, addr) in [
            ("gateway.addr", &self.gateway.addr),
            ("producer.addr", &self.producer.addr),
            ("processor.addr", &self.processor.addr),
            ("mock_llm.addr", &self.mock_llm.addr),
        ] {
            addr.parse::<SocketAddr>()
                .map_err(|e| invalid(key, format!("not a socket address: {e}")))?;
        }
        if self.models.is_empty() {
            return Err(invalid("models", "at least one model must be configured"));
        }
        for (id, model) in &self.models {
            stream_schema::ModelId::parse(id)
                .map_err(|e| invalid(format!("models.{id}"), e.to_string()))?;
            url::Url::parse(&model.base_url)
                .map_err(|e| invalid(format!("models.{id}.base_url"), format!("not a URL: {e}")))?;
            if model.upstream_model.is_empty() {
                return Err(invalid(
                    format!("models.{id}.upstream_model"),
                    "missing required value",
                ));
            }
        }
        for (index, key) in self.auth.api_keys.iter().enumerate() {
            check_api_key_entry(key)
                .map_err(|reason| invalid(format!("auth.api_keys[{index}]"), reason))?;
        }
        if !(50..=5_000).contains(&self.auth.key_refresh_ms) {
            return Err(invalid(
                "auth.key_refresh_ms",
                "must be between 50 and 5000 (revocations must reach every replica in 5 s)",
            ));
        }
        for (key, kid) in [
            ("auth.stream_token_kid", &self.auth.stream_token_kid),
            (
                "auth.previous_stream_token_kid",
                &self.auth.previous_stream_token_kid,
            ),
        ] {
            if kid.is_empty()
                || !kid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(key, "must be 1 or more of A-Z a-z 0-9 - _"));
            }
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(invalid("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            url::Url::parse(endpoint)
                .map_err(|e| invalid("telemetry.otlp_endpoint", format!("not a URL: {e}")))?;
        }
        if self.limits.max_tools == 0 {
            return Err(invalid("limits.max_tools", "must be at least 1"));
        }
        if self.limits.window_secs == 0 {
            return Err(invalid("limits.window_secs", "must be at least 1"));
        }
        if self.limits.default_token_estimate == 0 {
            return Err(invalid(
                "limits.default_token_estimate",
                "must be at least 1",
            ));
        }
        if self.streams.event_shards == 0 {
            return Err(invalid("streams.event_shards", "must be at least 1"));
        }
        if self.gateway.http_workers > MAX_HTTP_WORKERS {
            return Err(invalid(
                "gateway.http_workers",
                format!("must be at most {MAX_HTTP_WORKERS}"),
            ));
        }
        if self.producer.concurrency == 0 {
            return Err(invalid("producer.concurrency", "must be at least 1"));
        }
        let producer = &self.producer;
        if producer.lease_renew_ms == 0
            || producer.lease_renew_ms.saturating_mul(2) > producer.lease_ms
        {
            return Err(invalid(
                "producer.lease_renew_ms",
                "must be at least 1 and at most half of producer.lease_ms",
            ));
        }
        if producer.reclaim_interval_ms == 0 {
            return Err(invalid(
                "producer.reclaim_interval_ms",
                "must be at least 1",
            ));
        }
        if producer.max_attempts == 0 {
            return Err(invalid("producer.max_attempts", "must be at least 1"));
        }
        for (id, model) in &self.models {
            for (key, value) in [
                ("connect_timeout_ms", model.connect_timeout_ms),
                ("first_token_timeout_ms", model.first_token_timeout_ms),
                ("idle_timeout_ms", model.idle_timeout_ms),
                ("request_timeout_secs", model.request_timeout_secs),
            ] {
                if value == 0 {
                    return Err(invalid(format!("models.{id}.{key}"), "must be at least 1"));
                }
            }
            // The session stream's expiry is set when a request starts and ends; a request
            // that outlived it would lose its stream (and its client's history) mid-answer.
            if model.request_timeout_secs >= self.streams.session_ttl_secs {
                return Err(invalid(
                    format!("models.{id}.request_timeout_secs"),
                    "must be shorter than streams.session_ttl_secs",
                ));
            }
            if model.retry_base_ms > model.retry_max_ms {
                return Err(invalid(
                    format!("models.{id}.retry_base_ms"),
                    "must not exceed retry_max_ms",
                ));
            }
            if model.default_max_tokens == 0 {
                return Err(invalid(
                    format!("models.{id}.default_max_tokens"),
                    "must be at least 1",
                ));
            }
            if model.provider == Provider::Anthropic && model.anthropic_version.is_empty() {
                return Err(invalid(
                    format!("models.{id}.anthropic_version"),
                    "missing required value",
                ));
            }
            check_fallbacks(id, &model.fallbacks, &self.models)
                .map_err(|reason| invalid(format!("models.{id}.fallbacks"), reason))?;
        }
        if self.gateway.connection_ttl_secs <= self.gateway.connection_heartbeat_secs {
            return Err(invalid(
                "gateway.connection_ttl_secs",
                "must be longer than gateway.connection_heartbeat_secs",
            ));
        }
        if self.redis.pool_size == 0 {
            return Err(invalid("redis.pool_size", "must be at least 1"));
        }
        Ok(())
    }
}

/// A fallback list names configured models, never its own model, each at most once.
fn check_fallbacks(
    id: &str,
    fallbacks: &[String],
    models: &BTreeMap<String, ModelSettings>,
) -> Result<(), String> {
    for (index, fallback) in fallbacks.iter().enumerate() {
        if fallback == id {
            return Err(format!("`{fallback}` falls back to itself"));
        }
        if !models.contains_key(fallback) {
            return Err(format!("`{fallback}` is not a configured model"));
        }
        if fallbacks[..index].contains(fallback) {
            return Err(format!("`{fallback}` is listed twice"));
        }
    }
    Ok(())
}

/// An API key entry is an id of `[A-Za-z0-9_-]` and a 64-digit hex SHA-256.
pub fn check_api_key_entry(entry: &ApiKeyEntry) -> Result<(), String> {
    let id_ok = !entry.id.is_empty()
        && entry.id.len() <= 64
        && entry
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err("id must be 1-64 of A-Z a-z 0-9 - _".to_owned());
    }
    if entry.sha256.len() != 64 || !entry.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("sha256 must be 64 hex digits (sha256sum of the key)".to_owned());
    }
    if let Some(tenant) = &entry.tenant {
        stream_schema::TenantId::parse(tenant).map_err(|e| format!("tenant {e}"))?;
    }
    if let Some(role) = &entry.role {
        role.parse::<stream_schema::KeyRole>()
            .map_err(|_| "role must be chat or admin".to_owned())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_run_the_local_system() -> Result<(), ConfigError> {
        let settings = Settings::load_from_vars(None, vars(&[]))?;
        assert!(settings.models.contains_key("mock"));
        assert_eq!(settings.gateway.addr, "127.0.0.1:8080");
        Ok(())
    }

    #[test]
    fn env_overrides_a_key() -> Result<(), ConfigError> {
        let settings = Settings::load_from_vars(
            None,
            vars(&[
                ("BRIDGE__REDIS__URL", "redis://127.0.0.1:6380"),
                ("BRIDGE__GATEWAY__ADDR", "127.0.0.1:9000"),
                ("BRIDGE__PRODUCER__CONCURRENCY", "3"),
            ]),
        )?;
        assert_eq!(settings.redis.url, "redis://127.0.0.1:6380");
        assert_eq!(settings.gateway.addr, "127.0.0.1:9000");
        assert_eq!(settings.producer.concurrency, 3);
        Ok(())
    }

    #[test]
    fn a_command_timeout_that_breaks_the_503_promise_is_refused() {
        let err =
            Settings::load_from_vars(None, vars(&[("BRIDGE__REDIS__COMMAND_TIMEOUT_MS", "2000")]));
        assert!(
            matches!(&err, Err(ConfigError::Invalid { key, .. }) if key == "redis.command_timeout_ms"),
            "{err:?}"
        );
        let at_bound =
            Settings::load_from_vars(None, vars(&[("BRIDGE__REDIS__COMMAND_TIMEOUT_MS", "1500")]));
        assert!(at_bound.is_ok(), "{at_bound:?}");
    }

    #[test]
    fn more_http_workers_than_actix_web_runs_are_refused() {
        let err = Settings::load_from_vars(None, vars(&[("BRIDGE__GATEWAY__HTTP_WORKERS", "513")]));
        assert!(
            matches!(&err, Err(ConfigError::Invalid { key, .. }) if key == "gateway.http_workers"),
            "{err:?}"
        );
        let at_bound =
            Settings::load_from_vars(None, vars(&[("BRIDGE__GATEWAY__HTTP_WORKERS", "512")]));
        assert!(at_bound.is_ok(), "{at_bound:?}");
    }

    fn load_toml(text: &str) -> Result<Settings, ConfigError> {
        // Unique per test thread so parallel tests never share a file.
        let name = format!(
            "bridge-config-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(['(', ')'], "");
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).map_err(|e| invalid("test", e.to_string()))?;
        let loaded = Settings::load_from_vars(Some(&path), vars(&[]));
        let _ = std::fs::remove_file(&path);
        loaded
    }

    #[test]
    fn the_old_per_minute_limit_names_still_load() -> Result<(), ConfigError> {
        let settings = load_toml(
            "[limits]\nrequests_per_minute = 5\ntokens_per_minute = 700\n[limits.keys.k]\nrequests_per_minute = 9\n",
        )?;
        assert_eq!(settings.limits.requests_per_window, 5);
        assert_eq!(settings.limits.tokens_per_window, 700);
        assert_eq!(settings.limits.requests_per_window_for("k"), 9);
        Ok(())
    }

    #[test]
    fn a_file_configures_models() -> Result<(), ConfigError> {
        let settings = load_toml(
            "[models.\"gpt-4o\"]\nbase_url = \"https://api.openai.com/v1\"\nupstream_model = \"gpt-4o\"\napi_key_env = \"OPENAI_API_KEY\"\n",
        )?;
        assert_eq!(settings.models.len(), 1);
        assert_eq!(
            settings.models["gpt-4o"].api_key_env.as_deref(),
            Some("OPENAI_API_KEY")
        );
        Ok(())
    }

    #[test]
    fn an_unknown_model_key_is_named() {
        let err = load_toml(
            "[models.m]\nbase_url = \"http://x/v1\"\nupstream_model = \"m\"\nbase_ulr = \"typo\"\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("base_ulr"), "{err}");
    }

    #[test]
    fn an_unparsable_url_is_named() {
        let err = load_toml("[redis]\nurl = \"not a url\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("redis.url"), "{err}");
    }

    #[test]
    fn a_missing_upstream_model_is_named() {
        let err = load_toml("[models.m]\nbase_url = \"http://x/v1\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("models.m.upstream_model"), "{err}");
    }

    #[test]
    fn debug_output_hides_the_stream_token_secret() -> Result<(), ConfigError> {
        let settings = load_toml(
            "[auth]\nstream_token_secret = \"topsecretvalue\"\napi_keys = [{ id = \"a\", sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" }]\n",
        )?;
        let printed = format!("{settings:?}");
        assert!(!printed.contains("topsecretvalue"), "{printed}");
        Ok(())
    }

    #[test]
    fn a_malformed_key_hash_is_named() {
        let err = load_toml("[auth]\napi_keys = [{ id = \"a\", sha256 = \"abc\" }]\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.api_keys[0]"), "{err}");
    }

    #[test]
    fn key_tenants_and_roles_are_checked_and_named() -> Result<(), ConfigError> {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let settings = load_toml(&format!(
            "[auth]\napi_keys = [{{ id = \"a\", sha256 = \"{hash}\", tenant = \"acme\", role = \"admin\" }}]\n"
        ))?;
        assert_eq!(settings.auth.api_keys[0].tenant.as_deref(), Some("acme"));
        for bad in ["tenant = \"a/b\"", "tenant = \"\"", "role = \"root\""] {
            let err = load_toml(&format!(
                "[auth]\napi_keys = [{{ id = \"a\", sha256 = \"{hash}\", {bad} }}]\n"
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(err.contains("auth.api_keys[0]"), "{bad}: {err}");
        }
        let err = load_toml("[auth]\nkey_refresh_ms = 10000\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.key_refresh_ms"), "{err}");
        Ok(())
    }

    #[test]
    fn a_lease_renewed_too_rarely_is_named() {
        let err = load_toml("[producer]\nlease_ms = 1000\nlease_renew_ms = 800\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("producer.lease_renew_ms"), "{err}");
    }

    #[test]
    fn a_default_model_must_be_configured() -> Result<(), ConfigError> {
        let err = load_error(&format!("[gateway]\ndefault_model = \"c\"\n{TWO_MODELS}"));
        assert!(err.contains("gateway.default_model"), "{err}");
        let settings = load_toml(&format!("[gateway]\ndefault_model = \"b\"\n{TWO_MODELS}"))?;
        assert_eq!(settings.gateway.default_model.as_deref(), Some("b"));
        Ok(())
    }

    #[test]
    fn a_request_that_could_outlive_its_session_stream_is_named() {
        let err = load_error(
            "[streams]\nsession_ttl_secs = 600\n[models.m]\nbase_url = \"http://x/v1\"\nupstream_model = \"m\"\nrequest_timeout_secs = 600\n",
        );
        assert!(err.contains("models.m.request_timeout_secs"), "{err}");
        assert!(err.contains("streams.session_ttl_secs"), "{err}");
    }

    #[test]
    fn model_retry_policy_comes_from_the_file() -> Result<(), ConfigError> {
        let settings = load_toml(
            "[models.m]\nbase_url = \"http://x/v1\"\nupstream_model = \"m\"\nmax_retries = 5\nidle_timeout_ms = 700\nmax_concurrency = 2\n",
        )?;
        let model = &settings.models["m"];
        assert_eq!(model.max_retries, 5);
        assert_eq!(model.idle_timeout_ms, 700);
        assert_eq!(model.max_concurrency, 2);
        assert_eq!(model.retry_base_ms, ModelSettings::default().retry_base_ms);
        Ok(())
    }

    const TWO_MODELS: &str = "[models.a]\nbase_url = \"http://x/v1\"\nupstream_model = \"a\"\n\
        [models.b]\nbase_url = \"http://x/v1\"\nupstream_model = \"b\"\n";

    fn load_error(text: &str) -> String {
        load_toml(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn an_anthropic_model_with_fallbacks_loads() -> Result<(), ConfigError> {
        let settings = load_toml(&format!(
            "{TWO_MODELS}[models.c]\nprovider = \"anthropic\"\nbase_url = \"https://api.anthropic.com/v1\"\n\
             upstream_model = \"claude\"\nfallbacks = [\"a\", \"b\"]\n"
        ))?;
        let model = &settings.models["c"];
        assert_eq!(model.provider, Provider::Anthropic);
        assert_eq!(model.fallbacks, ["a", "b"]);
        assert_eq!(model.anthropic_version, "2023-06-01");
        assert_eq!(settings.models["a"].provider, Provider::OpenAi);
        Ok(())
    }

    #[test]
    fn an_unknown_provider_is_named() {
        let err = load_error(&format!("{TWO_MODELS}provider = \"gemini\"\n"));
        assert!(err.contains("gemini"), "{err}");
    }

    #[test]
    fn a_fallback_to_an_unknown_model_is_named() {
        let err = load_error(&format!("{TWO_MODELS}fallbacks = [\"c\"]\n"));
        assert!(err.contains("models.b.fallbacks"), "{err}");
        assert!(err.contains("`c` is not a configured model"), "{err}");
    }

    #[test]
    fn a_model_falling_back_to_itself_is_named() {
        let err = load_error(&format!("{TWO_MODELS}fallbacks = [\"a\", \"b\"]\n"));
        assert!(err.contains("models.b.fallbacks"), "{err}");
        assert!(err.contains("itself"), "{err}");
    }

    #[test]
    fn a_fallback_listed_twice_is_named() {
        let err = load_error(&format!("{TWO_MODELS}fallbacks = [\"a\", \"a\"]\n"));
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn models_may_fall_back_to_each_other() -> Result<(), ConfigError> {
        // Each list is followed alone, so a → b and b → a never loop.
        let text = TWO_MODELS.replace(
            "upstream_model = \"a\"\n",
            "upstream_model = \"a\"\nfallbacks = [\"b\"]\n",
        );
        let settings = load_toml(&format!("{text}fallbacks = [\"a\"]\n"))?;
        assert_eq!(settings.models["a"].fallbacks, ["b"]);
        Ok(())
    }

    #[test]
    fn debug_output_hides_the_redis_password() {
        let settings = RedisSettings {
            url: "redis://app:hunter2@redis:6379".to_owned(),
            ..RedisSettings::default()
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
