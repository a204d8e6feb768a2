//! The processor as a library on port 0 against a real redis-server: its lifecycle as seen
//! from `/readyz` and `/metrics`.

// Tests break Redis state on purpose (a shard key of the wrong type) with raw commands; the
// rule that services write shared keys only through stream_io holds for the service code.
#![expect(
    clippy::disallowed_methods,
    reason = "tests set up broken Redis state directly"
)]

mod gather;
mod housekeeping;
mod lifecycle;

use std::time::Duration;

use anyhow::Context;
use fred::prelude::Client;
use test_support::RedisServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A processor built on port 0 against a redis-server of its own, running until [`stop`].
///
/// [`stop`]: TestProcessor::stop
struct TestProcessor {
    /// Kept so the server lives as long as the processor.
    _redis_server: RedisServer,
    /// A client of the processor's Redis for the test's own reads and writes.
    redis: Client,
    /// `http://127.0.0.1:<ops port>`.
    base: String,
    shutdown: CancellationToken,
    running: JoinHandle<anyhow::Result<()>>,
}

impl TestProcessor {
    /// Starts a processor with the default settings on a fresh Redis, changed by `configure`.
    async fn start(configure: impl FnOnce(&mut service_kit::Settings)) -> anyhow::Result<Self> {
        let redis_server = RedisServer::start().await?;
        let redis = redis_server.client().await?;
        let mut settings = service_kit::Settings::default();
        settings.redis.url = redis_server.url();
        settings.processor.addr = "127.0.0.1:0".to_owned();
        configure(&mut settings);
        let shutdown = CancellationToken::new();
        let app = processor::Application::build(settings, shutdown.clone()).await?;
        let base = format!("http://127.0.0.1:{}", app.port());
        let running = tokio::spawn(app.run_until_stopped());
        Ok(Self {
            _redis_server: redis_server,
            redis,
            base,
            shutdown,
            running,
        })
    }

    /// Shuts the processor down and fails unless it stops cleanly in time.
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.running)
            .await
            .context("the processor did not stop")??
    }
}
