//! The producer: claims chat jobs, streams them from the model's OpenAI-compatible endpoint and
//! writes every token to the session stream.

pub mod claimer;
pub mod upstream;
pub mod worker;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use service_kit::Settings;
use service_kit::ops::OpsState;
use stream_io::session::{Retention, SessionScripts};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claimer::Claimer;
use crate::worker::WorkerContext;

pub struct Application {
    port: u16,
    listener: TcpListener,
    ops: OpsState,
    claimer: Claimer,
    grace: Duration,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let metrics = service_kit::ops::install_metrics();
        let redis = service_kit::redis::pool(&settings.redis).context("redis pool")?;
        service_kit::redis::start(&redis, &settings.redis).await;
        let reader =
            service_kit::redis::blocking_client(&settings.redis).context("redis reader")?;
        service_kit::redis::start(&reader, &settings.redis).await;
        let upstreams = upstream::Registry::new(&settings.models).context("model registry")?;

        let listener = TcpListener::bind(&settings.producer.addr)
            .with_context(|| format!("binding producer.addr {}", settings.producer.addr))?;
        let port = listener.local_addr()?.port();
        let ctx = Arc::new(WorkerContext {
            redis: redis.clone(),
            scripts: SessionScripts::default(),
            upstreams,
            retention: Retention {
                maxlen: settings.streams.session_maxlen,
                ttl_secs: settings.streams.session_ttl_secs,
            },
            event_shards: settings.streams.event_shards,
            events_maxlen: settings.streams.events_maxlen,
        });
        let claimer = Claimer {
            ctx,
            reader,
            consumer: service_kit::consumer_name(&settings.producer.consumer_name, "producer"),
            slots: Arc::new(Semaphore::new(settings.producer.concurrency)),
            block_ms: settings.producer.claim_block_ms,
            workers: TaskTracker::new(),
        };
        Ok(Self {
            port,
            listener,
            ops: OpsState::new(redis, metrics),
            claimer,
            grace: Duration::from_secs(settings.producer.shutdown_grace_secs),
            shutdown,
        })
    }

    /// Port of the health and metrics endpoints.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Claims and runs jobs until shutdown; then stops claiming and gives in-flight requests
    /// the grace period before exiting (unfinished jobs stay pending for another producer).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let ops_shutdown = CancellationToken::new();
        let ops = tokio::spawn(service_kit::ops::serve(
            self.listener,
            self.ops.clone(),
            ops_shutdown.clone(),
        ));
        tracing::info!(consumer = %self.claimer.consumer, "claiming jobs");
        let workers = self.claimer.workers.clone();
        self.claimer
            .run(self.shutdown.clone(), self.ops.register_loop("claimer"))
            .await;
        workers.close();
        tracing::info!(in_flight = workers.len(), "stopped claiming; draining");
        if tokio::time::timeout(self.grace, workers.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = workers.len(),
                "grace period over; unfinished jobs stay pending for another producer"
            );
        }
        ops_shutdown.cancel();
        ops.await
            .context("ops server task")?
            .context("ops server")?;
        Ok(())
    }
}
