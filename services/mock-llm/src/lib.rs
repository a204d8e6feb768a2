//! mock-llm: an OpenAI-compatible chat completion server with deterministic text, a
//! configurable token delay and injectable faults; the default upstream for development,
//! tests and benchmarks.
//!
//! Endpoints: `POST /v1/chat/completions` (streaming and not), `POST /v1/messages`
//! (Anthropic's Messages API, streaming and not), `GET /v1/models`,
//! `GET /_mock/stats`, `GET /healthz`, `GET /metrics`. The text a request gets is described in [`text`], the
//! faults and shapes (tool calls, reasoning) it can ask for in [`directive`], the whole planned
//! answer in [`scenario`].

pub mod directive;
pub mod scenario;
pub mod text;

mod anthropic;
mod chat;
mod error;
mod openai;
mod state;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use service_kit::config::MockLlmSettings;
use service_kit::lifecycle::Lifecycle;
use service_kit::ops::OpsState;
use tokio_util::sync::CancellationToken;

pub use state::{Stats, StatsSnapshot};

/// Largest accepted request body; well above any prompt limit the gateway allows.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A bound, not yet running server.
pub struct Application {
    local_addr: SocketAddr,
    server: Server,
    stats: Arc<Stats>,
    lifecycle: Lifecycle,
}

impl Application {
    /// Binds `settings.addr` (port 0 picks a free port); serving starts in
    /// [`Application::run_until_stopped`] and ends when `shutdown` is cancelled.
    pub fn build(settings: MockLlmSettings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let ops = OpsState::without_redis(service_kit::ops::install_metrics());
        let listener = TcpListener::bind(&settings.addr)
            .with_context(|| format!("cannot bind mock_llm.addr {}", settings.addr))?;
        let local_addr = listener
            .local_addr()
            .context("cannot read the bound address")?;
        let stats = Arc::new(Stats::default());
        let state = web::Data::new(state::AppState::new(settings, Arc::clone(&stats)));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(web::Data::new(ops.clone()))
                .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
                .route("/healthz", web::get().to(healthz))
                .route("/metrics", web::get().to(metrics_text))
                .route("/v1/models", web::get().to(models))
                .route(
                    "/v1/chat/completions",
                    web::post().to(chat::chat_completions),
                )
                .route("/v1/messages", web::post().to(anthropic::messages))
                .route("/_mock/stats", web::get().to(stats_handler))
                .default_service(web::to(not_found))
        })
        // Without this, a client that closes its socket during a stall leaves a half-closed
        // connection that actix keeps forever, and the disconnect is never counted.
        .h1_allow_half_closed(false)
        // Tokens are tiny writes; Nagle would batch them and distort latency measurements.
        .tcp_nodelay(true)
        // Stalled streams never finish by themselves; do not wait the default 30 s for them.
        .shutdown_timeout(1)
        // The lifecycle's token stops it (SIGTERM and Ctrl-C through `service_kit::shutdown`).
        .disable_signals()
        .listen(listener)
        .context("cannot listen on the bound socket")?
        .run();
        Ok(Self {
            local_addr,
            server,
            stats,
            lifecycle: Lifecycle::new(shutdown),
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The bound address, for logs.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live counters behind `GET /_mock/stats`.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Stops the server from elsewhere (`handle.stop(true)`), like cancelling its shutdown.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the shutdown token is cancelled (or the [`ServerHandle`] stops it).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let shutdown = self.lifecycle.shutdown().clone();
        self.lifecycle.spawn(async move {
            shutdown.cancelled().await;
            handle.stop(true).await;
        });
        let result = self.server.await;
        self.lifecycle.shutdown().cancel();
        self.lifecycle.wait().await;
        result
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

/// Prometheus text: the `/_mock/stats` counters as `mock_llm_*` gauges, read at scrape time.
async fn metrics_text(state: web::Data<state::AppState>, ops: web::Data<OpsState>) -> HttpResponse {
    let stats = state.stats.snapshot();
    #[expect(clippy::cast_precision_loss, reason = "gauges are f64")]
    for (name, value) in [
        ("mock_llm_requests", stats.requests),
        ("mock_llm_streams_started", stats.streams_started),
        ("mock_llm_streams_completed", stats.streams_completed),
        ("mock_llm_streams_disconnected", stats.streams_disconnected),
        ("mock_llm_streams_aborted", stats.streams_aborted),
        ("mock_llm_active_streams", stats.active_streams),
    ] {
        metrics::gauge!(name).set(value as f64);
    }
    service_kit::ops::metrics_text(ops).await
}

async fn models() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock-llm"}],
    }))
}

async fn stats_handler(state: web::Data<state::AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.stats.snapshot())
}

async fn not_found() -> Result<HttpResponse, error::ApiError> {
    Err(error::ApiError::not_found("no such endpoint"))
}
