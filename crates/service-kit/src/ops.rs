//! Operations endpoints every service serves: `/healthz` (alive), `/readyz` (Redis reachable and
//! every registered loop running) and `/metrics` (Prometheus text).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{HttpResponse, web};
use fred::prelude::*;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// How often recorded histogram samples are folded into their buckets (see [`metrics_upkeep`]):
/// a service holds at most about this long's samples. A fifth of the exporter's own 5 s: the
/// gateway records one sample per delivered token, and at 10,000 tokens/s five seconds of
/// them (about 0.8 MB in small blocks, allocated on the workers and freed by the upkeep) kept
/// glibc's heap growing for minutes after warm-up in the memory soak (issue #18). Folding
/// costs the same per sample however often it runs.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder as the process-wide `metrics` recorder.
///
/// A second call in one process (tests) gets a handle of its own recorder that sees nothing,
/// instead of failing. The caller must run [`metrics_upkeep`] (or [`serve`], which does) for
/// as long as the process records histograms.
pub fn install_metrics() -> PrometheusHandle {
    let recorder = recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::debug!("a metrics recorder is already installed in this process");
    }
    handle
}

/// The recorder every service installs, not yet installed (tests use it as a local recorder).
pub fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    // Histograms, not summaries: buckets aggregate across replicas in Prometheus. Every
    // histogram of the bridge is in seconds, from sub-millisecond token lag to minute-long
    // requests.
    let builder = PrometheusBuilder::new().set_buckets(&[
        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        30.0, 60.0, 300.0,
    ]);
    match builder {
        Ok(builder) => builder.build_recorder(),
        Err(error) => {
            tracing::warn!(%error, "invalid histogram buckets; using summaries");
            PrometheusBuilder::new().build_recorder()
        }
    }
}

/// Folds the recorded histogram samples into their buckets every `every` until `shutdown`.
///
/// The exporter keeps each histogram sample (value and time, 16 bytes) in a list until an
/// upkeep or a `/metrics` render folds it into the fixed buckets. `build_recorder` starts no
/// upkeep task of its own, so without this a service nobody scrapes grows by every sample it
/// ever records: the gateway records one per delivered token (issue #20).
pub async fn metrics_upkeep(
    handle: PrometheusHandle,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// Running state of one internal loop; the loop sets it, `/readyz` reads it.
#[derive(Clone, Debug)]
pub struct LoopFlag(Arc<AtomicBool>);

impl LoopFlag {
    /// A flag not registered with any `OpsState` (tests, tools).
    pub fn standalone() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    pub fn set(&self, running: bool) {
        self.0.store(running, Ordering::Relaxed);
    }

    pub fn is_running(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What `/readyz` checks and `/metrics` renders. Cheap to clone.
#[derive(Clone)]
pub struct OpsState {
    /// `None` for a service without Redis (mock-llm): readiness then checks only the loops.
    redis: Option<Pool>,
    metrics: PrometheusHandle,
    /// Registered by each service at build time; flipped by the loops themselves.
    loops: Arc<Mutex<BTreeMap<String, LoopFlag>>>,
}

impl OpsState {
    pub fn new(redis: Pool, metrics: PrometheusHandle) -> Self {
        Self {
            redis: Some(redis),
            metrics,
            loops: Arc::default(),
        }
    }

    /// For a service that uses no Redis (mock-llm).
    pub fn without_redis(metrics: PrometheusHandle) -> Self {
        Self {
            redis: None,
            metrics,
            loops: Arc::default(),
        }
    }

    /// [`metrics_upkeep`] of this state's recorder, every [`METRICS_UPKEEP_INTERVAL`].
    pub fn metrics_upkeep(&self, shutdown: CancellationToken) -> impl Future<Output = ()> + use<> {
        metrics_upkeep(self.metrics.clone(), METRICS_UPKEEP_INTERVAL, shutdown)
    }

    /// Registers a loop that must be running for the service to be ready.
    pub fn register_loop(&self, name: impl Into<String>) -> LoopFlag {
        let flag = LoopFlag(Arc::new(AtomicBool::new(false)));
        if let Ok(mut loops) = self.loops.lock() {
            loops.insert(name.into(), flag.clone());
        }
        flag
    }

    /// Loops that are not running.
    fn stopped_loops(&self) -> Vec<String> {
        match self.loops.lock() {
            Ok(loops) => loops
                .iter()
                .filter(|(_, flag)| !flag.is_running())
                .map(|(name, _)| name.clone())
                .collect(),
            Err(_) => vec!["<registry poisoned>".to_owned()],
        }
    }

    /// What `/readyz` answers: whether Redis answers a `PING`, and the loops not running.
    async fn readiness(&self) -> (bool, Vec<String>) {
        (self.redis_reachable().await, self.stopped_loops())
    }

    /// Sets the readiness gauges to what `/readyz` would answer now: `service_ready` (1 or 0),
    /// `redis_connected` (services with Redis) and `loop_running{loop}`. Alerts need them as
    /// metrics: a scrape succeeds (`up` is 1) whether or not the service is ready, and traffic
    /// counters move only while clients call.
    async fn export_readiness(&self) {
        let (redis, stopped) = self.readiness().await;
        metrics::gauge!("service_ready").set(f64::from(u8::from(redis && stopped.is_empty())));
        if self.redis.is_some() {
            metrics::gauge!("redis_connected").set(f64::from(u8::from(redis)));
        }
        let names: Vec<String> = match self.loops.lock() {
            Ok(loops) => loops.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        for name in names {
            let running = !stopped.contains(&name);
            metrics::gauge!("loop_running", "loop" => name).set(f64::from(u8::from(running)));
        }
    }

    async fn redis_reachable(&self) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        let ping = redis.next().ping::<String>(None);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }
}

/// Body of `/healthz`.
#[derive(Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always `ok`: answering at all is the signal.
    #[cfg_attr(feature = "openapi", schema(example = "ok"))]
    pub status: &'static str,
}

/// Body of `/readyz`, the same shape for `200` and `503`.
#[derive(Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    /// `ready` or `unavailable`.
    #[cfg_attr(feature = "openapi", schema(example = "ready"))]
    pub status: &'static str,
    /// `ok` or `unreachable`.
    #[cfg_attr(feature = "openapi", schema(example = "ok"))]
    pub redis: &'static str,
    /// Internal loops that are not running (empty when ready).
    pub stopped_loops: Vec<String>,
}

/// Process alive.
#[cfg_attr(feature = "openapi", utoipa::path(
    get, path = "/healthz", tag = "ops", operation_id = "healthz",
    responses((status = 200, description = "The process is alive", body = Health)),
))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Redis reachable and every internal loop running.
#[cfg_attr(feature = "openapi", utoipa::path(
    get, path = "/readyz", tag = "ops", operation_id = "readyz",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "Redis unreachable or a loop stopped", body = Readiness),
    ),
))]
pub async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    let (redis, stopped) = state.readiness().await;
    let ready = redis && stopped.is_empty();
    let body = Readiness {
        status: if ready { "ready" } else { "unavailable" },
        redis: if redis { "ok" } else { "unreachable" },
        stopped_loops: stopped,
    };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text exposition.
#[cfg_attr(feature = "openapi", utoipa::path(
    get, path = "/metrics", tag = "ops", operation_id = "metrics",
    responses((
        status = 200, description = "Prometheus text format",
        content_type = "text/plain; version=0.0.4", body = String,
    )),
))]
pub async fn metrics_text(state: web::Data<OpsState>) -> HttpResponse {
    state.export_readiness().await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// Mounts the three endpoints on an app (the gateway mounts them beside its API).
pub fn configure(state: OpsState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_text));
    }
}

/// Serves only the ops endpoints (producer, processor), and keeps the metrics' memory bounded
/// ([`metrics_upkeep`]), until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = tokio::spawn(state.metrics_upkeep(shutdown.clone()));
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new().configure(configure(state.clone()))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.stop(true).await;
    });
    let served = server.await;
    // Ends on `shutdown` by itself; also when the server failed early.
    upkeep.abort();
    served
}
