//! SPEC's "Redis unreachable: 503 within 2 s" holds for every configuration file we ship, not
//! only for the built-in defaults: each file's Redis timeouts are what a deployment runs with.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use service_kit::Settings;
use service_kit::config::ApiKeyEntry;
use test_support::RedisServer;
use tokio_util::sync::CancellationToken;

use crate::helpers::{API_KEY, KEY_ID};

/// Every file a deployment or `make run` starts the services with.
const SHIPPED: [&str; 3] = [
    "config/local.example.toml",
    "k8s/base/bridge.toml",
    "k8s/overlays/prod/bridge.toml",
];

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// The file as a service loads it, pointed at `redis_url` and a loopback port; every other key
/// (the timeouts and pool size under test) stays as shipped. The prod file names a Redis
/// Cluster; a single node stands in for it: the timeouts, not the topology, bound the 503.
fn shipped_settings(file: &str, redis_url: &str) -> anyhow::Result<Settings> {
    let env = vec![
        ("BRIDGE__REDIS__URL".to_owned(), redis_url.to_owned()),
        ("BRIDGE__GATEWAY__ADDR".to_owned(), "127.0.0.1:0".to_owned()),
    ];
    let mut settings = Settings::load_from_vars(Some(&repo_file(file)), env)
        .with_context(|| format!("loading {file}"))?;
    settings.auth.api_keys_file = None;
    settings.auth.api_keys = vec![ApiKeyEntry {
        id: KEY_ID.to_owned(),
        sha256: gateway::auth::hash_key(API_KEY),
        ..ApiKeyEntry::default()
    }];
    settings.auth.stream_token_secret = Some("shipped-config-secret".to_owned().into());
    Ok(settings)
}

async fn answers_503_within_2s_with_redis_stopped(file: &str) -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let settings = shipped_settings(file, &redis.url())?;
    let model = settings
        .models
        .keys()
        .next()
        .cloned()
        .context("a shipped config without models")?;
    let shutdown = CancellationToken::new();
    let app = gateway::Application::build(settings, shutdown.clone()).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let server = tokio::spawn(app.run_until_stopped());
    test_support::wait_for_http_ok(&format!("{base}/readyz"), Duration::from_secs(20)).await?;

    redis.stop().await?;

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    // Twice: the second call meets the pool while it reconnects, not a fresh failure.
    for attempt in 1..=2 {
        let began = Instant::now();
        let response = http
            .post(format!("{base}/api/chat/start"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"sessionId": "s1", "modelId": model, "prompt": "x"}))
            .send()
            .await?;
        let took = began.elapsed();
        ensure!(
            response.status().as_u16() == 503,
            "{file}, call {attempt}: status {}",
            response.status()
        );
        ensure!(
            took <= Duration::from_secs(2),
            "{file}, call {attempt}: 503 took {took:?}"
        );
    }
    shutdown.cancel();
    server.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_config_answers_503_within_2s_when_redis_is_down() -> anyhow::Result<()> {
    for file in SHIPPED {
        answers_503_within_2s_with_redis_stopped(file).await?;
    }
    Ok(())
}
