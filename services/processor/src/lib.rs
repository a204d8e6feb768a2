//! The processor: a consumer group over the event shards that keeps per-session, per-model and
//! per-API-key analytics (totals and per-minute buckets), exactly once under at-least-once
//! delivery.

pub mod apply;
pub mod consumer;
pub mod quota;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use service_kit::Settings;
use service_kit::lifecycle::Lifecycle;
use service_kit::ops::OpsState;
use service_kit::supervisor::RestartPolicy;
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, Retention};
use crate::consumer::ShardConsumer;

pub struct Application {
    port: u16,
    listener: TcpListener,
    ops: OpsState,
    consumers: Vec<Arc<ShardConsumer>>,
    lifecycle: Lifecycle,
}

impl Application {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let metrics = service_kit::ops::install_metrics();
        let redis = service_kit::redis::pool(&settings.redis).context("redis pool")?;
        service_kit::redis::start(&redis, &settings.redis).await;
        let consumer = service_kit::consumer_name(&settings.processor.consumer_name, "processor");
        let applier = Applier::new(Retention {
            ledger_secs: settings.processor.ledger_ttl_secs,
            totals_secs: settings.processor.stats_ttl_secs,
            window_secs: settings.processor.window_retention_secs,
        });
        let mut consumers = Vec::new();
        // One blocking connection per shard: each shard may live on a different cluster node,
        // and a blocking read cannot span slots.
        for shard in 0..settings.streams.event_shards {
            let reader =
                service_kit::redis::blocking_client(&settings.redis).context("redis reader")?;
            service_kit::redis::start(&reader, &settings.redis).await;
            consumers.push(Arc::new(ShardConsumer {
                shard,
                reader,
                redis: redis.clone(),
                consumer: consumer.clone(),
                applier: applier.clone(),
                reconciler: quota::Reconciler::new(settings.limits.window_secs),
                batch: settings.processor.batch_size,
                block_ms: settings.processor.block_ms,
                gather: Duration::from_millis(settings.processor.gather_ms),
                reclaim_idle_ms: settings.processor.reclaim_idle_ms,
                dead_consumer_ms: settings.processor.dead_consumer_secs.saturating_mul(1000),
                dead_consumers: stream_io::groups::DeadConsumers::default(),
                metas: std::sync::Mutex::default(),
            }));
        }
        let listener = TcpListener::bind(&settings.processor.addr)
            .with_context(|| format!("binding processor.addr {}", settings.processor.addr))?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            port,
            listener,
            ops: OpsState::new(redis, metrics),
            consumers,
            lifecycle: Lifecycle::new(shutdown),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs every shard's consumer until shutdown; each finishes and acks its batch first.
    /// Each shard loop runs under the supervisor with a readiness flag of its own
    /// (`shard-<n>`): `/readyz` is 503 while any shard is down or restarting.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let ops = self.lifecycle.serve_ops(self.listener, self.ops.clone());
        for consumer in self.consumers {
            let shutdown = self.lifecycle.shutdown().clone();
            self.lifecycle.supervise(
                &self.ops,
                shard_loop_name(consumer.shard),
                RestartPolicy::on_error(),
                move |flag| Arc::clone(&consumer).run(shutdown.clone(), flag),
            );
        }
        self.lifecycle.wait().await;
        ops.stop().await.context("ops server")?;
        Ok(())
    }
}

fn shard_loop_name(shard: u16) -> String {
    format!("shard-{shard}")
}
