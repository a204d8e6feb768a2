//! The producer: claims chat jobs, streams them from the model's OpenAI-compatible endpoint and
//! writes every token to the session stream. Jobs it holds are leased (`lease`); jobs whose
//! producer died are reclaimed and restarted (`claimer`, `recovery`); every write is fenced by
//! attempt (`sink`, through `stream_io::session`).

pub mod appends;
pub mod backlog;
pub mod claimer;
pub mod housekeeping;
pub mod lease;
pub mod recovery;
pub mod sink;
pub mod upstream;
pub mod worker;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use service_kit::Settings;
use service_kit::lifecycle::Lifecycle;
use service_kit::ops::{LoopFlag, OpsState};
use service_kit::supervisor::RestartPolicy;
use stream_io::groups::LeaseScript;
use stream_io::session::{Retention, SessionScripts, WakeUps};
use stream_schema::RedisKey;
use stream_schema::keys::PRODUCER_GROUP;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claimer::{Claimer, Dispatcher};
use crate::lease::{Leases, Renewer};
use crate::worker::WorkerContext;

/// After the grace period, how long stopped workers get to return before the process exits.
const STOP_WAIT: Duration = Duration::from_secs(2);

pub struct Application {
    port: u16,
    listener: TcpListener,
    ops: OpsState,
    claimer: Claimer,
    renewer: Renewer,
    grace: Duration,
    lease: Duration,
    /// `producer.dead_consumer_secs` in ms; 0 removes none.
    dead_consumer_ms: u64,
    lifecycle: Lifecycle,
}

impl Application {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let metrics = service_kit::ops::install_metrics();
        // Present from the start (an autoscaler reads it before the first job).
        metrics::gauge!("producer_in_flight").set(0.0);
        // What `producer.runtime_threads` came to (0 means one per CPU the process may use).
        metrics::gauge!("producer_runtime_threads")
            .set(tokio::runtime::Handle::current().metrics().num_workers() as f64);
        let redis = service_kit::redis::pool(&settings.redis).context("redis pool")?;
        service_kit::redis::start(&redis, &settings.redis).await;
        let reader =
            service_kit::redis::blocking_client(&settings.redis).context("redis reader")?;
        service_kit::redis::start(&reader, &settings.redis).await;
        let upstreams = upstream::Registry::new(&settings.models).context("model registry")?;

        let listener = TcpListener::bind(&settings.producer.addr)
            .with_context(|| format!("binding producer.addr {}", settings.producer.addr))?;
        let port = listener.local_addr()?.port();
        let producer = &settings.producer;
        // Cluster mode: every append wakes the gateways' readers (see the gateway's hub).
        let scripts = SessionScripts::new(WakeUps::for_cluster(settings.redis.is_cluster()));
        let workers = TaskTracker::new();
        let ctx = Arc::new(WorkerContext {
            redis: redis.clone(),
            // Batches of many requests share script calls on a single node only.
            appender: appends::Appender::new(
                redis.clone(),
                scripts.clone(),
                !settings.redis.is_cluster(),
                workers.clone(),
            ),
            scripts,
            upstreams,
            retention: Retention {
                ttl_secs: settings.streams.session_ttl_secs,
            },
            event_shards: settings.streams.event_shards,
            events_maxlen: settings.streams.events_maxlen,
            token_coalesce: Duration::from_millis(producer.token_coalesce_ms),
            write_metrics: worker::WriteMetrics::register(),
        });
        let consumer = service_kit::consumer_name(&producer.consumer_name, "producer");
        let leases = Arc::new(Leases::default());
        let dispatcher = Arc::new(Dispatcher {
            ctx,
            consumer: consumer.clone(),
            worker_permits: Arc::new(Semaphore::new(producer.concurrency)),
            leases: Arc::clone(&leases),
            workers,
            hard_stop: CancellationToken::new(),
            max_attempts: producer.max_attempts,
            dead_maxlen: settings.streams.requests_maxlen,
        });
        let lease = Duration::from_millis(producer.lease_ms);
        Ok(Self {
            port,
            listener,
            ops: OpsState::new(redis.clone(), metrics),
            claimer: Claimer {
                dispatcher,
                reader,
                block_ms: producer.claim_block_ms,
                lease,
                reclaim_interval: Duration::from_millis(producer.reclaim_interval_ms),
            },
            renewer: Renewer {
                redis,
                script: LeaseScript::default(),
                consumer,
                leases,
                interval: Duration::from_millis(producer.lease_renew_ms),
            },
            grace: Duration::from_secs(producer.shutdown_grace_secs),
            lease,
            dead_consumer_ms: producer.dead_consumer_secs.saturating_mul(1000),
            lifecycle: Lifecycle::new(shutdown),
        })
    }

    /// Port of the health and metrics endpoints.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Claims and runs jobs until shutdown; then stops claiming and gives in-flight requests
    /// the grace period. Requests still running after it are stopped without a terminal event
    /// and handed back (pending, and idle as if their lease had run out) so another producer
    /// restarts them at once.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let lifecycle = self.lifecycle;
        let ops = lifecycle.serve_ops(self.listener, self.ops.clone());
        let dispatcher = Arc::clone(&self.claimer.dispatcher);
        let workers = dispatcher.workers.clone();
        let leases = Arc::clone(&self.renewer.leases);
        let (redis, script, consumer) = (
            self.renewer.redis.clone(),
            self.renewer.script.clone(),
            self.renewer.consumer.clone(),
        );
        tracing::info!(consumer = %consumer, "claiming jobs");

        // Leases are renewed until the last worker is gone, through the grace period.
        let renewer_stop = CancellationToken::new();
        {
            let (renewer, stop) = (self.renewer, renewer_stop.clone());
            lifecycle.supervise_until(
                renewer_stop.clone(),
                LoopFlag::standalone(),
                "lease_renewer",
                RestartPolicy::default(),
                move |_| renewer.clone().run(stop.clone()),
            );
        }
        // Also runs through the grace period: draining is when the backlog matters.
        lifecycle.spawn(backlog::export(redis.clone(), renewer_stop.clone()));
        if self.dead_consumer_ms > 0 {
            lifecycle.spawn(housekeeping::remove_dead_consumers(
                redis.clone(),
                consumer.clone(),
                self.dead_consumer_ms,
                renewer_stop.clone(),
            ));
        }
        let claimer_flag = self.ops.register_loop("claimer");
        let (claimer, shutdown) = (self.claimer, lifecycle.shutdown().clone());
        let claiming = lifecycle.supervise_with(
            claimer_flag,
            "claimer",
            RestartPolicy::default(),
            move |flag| claimer.clone().run(shutdown.clone(), flag),
        );
        if let Err(error) = claiming.await {
            tracing::warn!(%error, "claimer supervisor ended abnormally");
        }
        workers.close();
        tracing::info!(in_flight = workers.len(), "stopped claiming; draining");
        if tokio::time::timeout(self.grace, workers.wait())
            .await
            .is_err()
        {
            let unfinished = leases.ids();
            tracing::warn!(
                in_flight = unfinished.len(),
                "grace period over; handing unfinished jobs back to other producers"
            );
            dispatcher.hard_stop.cancel();
            if tokio::time::timeout(STOP_WAIT, workers.wait())
                .await
                .is_err()
            {
                tracing::warn!("workers did not stop in time");
            }
            let handed = script
                .hand_back(
                    redis.next(),
                    &RedisKey::requests(),
                    PRODUCER_GROUP,
                    &consumer,
                    &unfinished,
                    worker::millis(self.lease),
                )
                .await;
            if let Err(error) = handed {
                // They come back anyway once their lease runs out.
                tracing::warn!(%error, "cannot hand jobs back");
            }
        }
        renewer_stop.cancel();
        // The renewer and the backlog gauges (workers are tracked by the dispatcher).
        lifecycle.wait().await;
        ops.stop().await.context("ops server")?;
        Ok(())
    }
}
