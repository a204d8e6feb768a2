//! The gateway: chat start, SSE delivery through the multiplexed reader, cancel, the demo page.

pub mod admin;
pub mod aisdk;
pub mod analytics;
pub mod auth;
pub mod body;
pub mod chat;
pub mod connections;
pub mod error;
pub mod hub;
pub mod idempotency;
pub mod limits;
pub mod openai;
pub mod openapi;
pub mod page;
mod prefix;
pub mod sessions;
pub mod state;
pub mod stream_token;
pub mod streams;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use service_kit::Settings;
use service_kit::lifecycle::Lifecycle;
use service_kit::ops::OpsState;
use service_kit::supervisor::RestartPolicy;
use stream_io::session::{SessionScripts, WakeUps};
use stream_schema::{GatewayId, ModelId};
use tokio_util::sync::CancellationToken;

use crate::connections::{Connections, ViewSettings};
use crate::error::ApiError;
use crate::hub::{Hub, HubSettings};
use crate::state::{AppState, SharedState};

/// A gateway bound to its port, ready to run.
pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    lifecycle: Lifecycle,
}

impl Application {
    /// Connects to Redis, starts the reader and binds `settings.gateway.addr` (port 0 allowed).
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let metrics = service_kit::ops::install_metrics();
        let redis = service_kit::redis::pool(&settings.redis).context("redis pool")?;
        service_kit::redis::start(&redis, &settings.redis).await;
        let reader =
            service_kit::redis::blocking_client(&settings.redis).context("redis reader")?;
        service_kit::redis::start(&reader, &settings.redis).await;

        // The reader learns which streams were written from their announcements, on a client
        // of its own (subscribed connections take no other commands).
        let wake =
            service_kit::redis::blocking_client(&settings.redis).context("redis wake-ups")?;
        service_kit::redis::start(&wake, &settings.redis).await;
        let ops = OpsState::new(redis.clone(), metrics);
        let hub = Hub::new(HubSettings {
            batch: settings.gateway.reader_batch,
            block_ms: settings.gateway.reader_block_ms,
            buffer_bytes: settings.gateway.sse_buffer_bytes,
            cluster: settings.redis.is_cluster(),
            sweep_ms: settings.gateway.reader_sweep_ms,
            block_max_streams: settings.gateway.reader_block_max_streams,
        });
        let lifecycle = Lifecycle::new(shutdown.clone());
        let (loop_hub, loop_shutdown) = (hub.clone(), shutdown.clone());
        lifecycle.supervise(&ops, "reader", RestartPolicy::default(), move |flag| {
            loop_hub
                .clone()
                .run(reader.clone(), wake.clone(), loop_shutdown.clone(), flag)
        });

        let models = settings
            .models
            .keys()
            .map(|id| ModelId::parse(id).map(|model| (id.clone(), model)))
            .collect::<Result<_, _>>()
            .context("model ids")?;
        let (api_keys, stream_tokens) = security(&settings)?;
        let api_keys = Arc::new(api_keys);
        // Keys added or revoked through the API: every replica follows the store.
        let (keys_loop, keys_client, keys_shutdown) =
            (api_keys.clone(), redis.next().clone(), shutdown.clone());
        let key_refresh = Duration::from_millis(settings.auth.key_refresh_ms);
        lifecycle.supervise(&ops, "keys", RestartPolicy::default(), move |flag| {
            keys_loop.clone().refresh(
                keys_client.clone(),
                key_refresh,
                keys_shutdown.clone(),
                flag,
            )
        });
        let listener = TcpListener::bind(&settings.gateway.addr)
            .with_context(|| format!("binding gateway.addr {}", settings.gateway.addr))?;
        let port = listener.local_addr()?.port();
        let connections = Connections::new(
            GatewayId::unique(&service_kit::consumer_name("", "gateway")),
            Some(redis.clone()),
            ViewSettings {
                renew_every: Duration::from_secs(settings.gateway.connection_heartbeat_secs.max(1)),
                ttl: Duration::from_secs(settings.gateway.connection_ttl_secs),
            },
            &lifecycle,
        );
        lifecycle.spawn(service_kit::redis::observe(redis.clone(), shutdown.clone()));
        // Without it every delivered token's lag sample stays in memory (issue #20).
        lifecycle.spawn(ops.metrics_upkeep(shutdown.clone()));
        let cluster = settings.redis.is_cluster();
        let state: SharedState = Arc::new(AppState {
            settings,
            redis,
            scripts: SessionScripts::new(WakeUps::for_cluster(cluster)),
            hub,
            connections,
            models,
            api_keys,
            limiter: limits::RateLimiter::default(),
            stream_tokens,
            shutdown: shutdown.clone(),
            lifecycle: lifecycle.clone(),
            delivery: state::DeliveryMetrics::register(),
        });
        let cors_origins = state.settings.gateway.cors_allowed_origins.clone();
        let client_request_timeout =
            Duration::from_millis(state.settings.gateway.client_request_timeout_ms);
        let http_workers = match state.settings.gateway.http_workers {
            // actix-web's own default, named here so the gauge can tell it.
            0 => std::thread::available_parallelism()
                .map_or(2, std::num::NonZeroUsize::get)
                .min(service_kit::config::MAX_HTTP_WORKERS),
            workers => workers,
        };
        metrics::gauge!("gateway_http_workers").set(http_workers as f64);
        let server = HttpServer::new(move || {
            App::new()
                // Without configured origins there is no CORS middleware at all: a restrictive
                // one would refuse the demo page's own same-origin POSTs (they carry Origin).
                .wrap(actix_web::middleware::Condition::new(
                    !cors_origins.is_empty(),
                    cors(&cors_origins),
                ))
                .app_data(web::Data::new(state.clone()))
                .configure(service_kit::ops::configure(ops.clone()))
                .configure(routes)
                .default_service(web::to(not_found))
        })
        .disable_signals()
        // Without this a client that closes while its stream is idle is noticed only at the
        // next write (keep-alive ping); with it the connection is dropped at once.
        .h1_allow_half_closed(false)
        // Tokens are tiny writes: send each at once instead of waiting to fill a packet.
        .tcp_nodelay(true)
        // Zero disables it (actix's own convention).
        .client_request_timeout(client_request_timeout)
        // SSE responses end on shutdown themselves; the rest finish within this.
        .shutdown_timeout(5)
        .workers(http_workers)
        .listen(listener)?
        .run();
        Ok(Self {
            port,
            server,
            lifecycle,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` is cancelled, then drains connections and waits for every
    /// tracked task: the reader, SSE deliveries and the connection-view writer.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let shutdown = self.lifecycle.shutdown().clone();
        self.lifecycle.spawn(async move {
            shutdown.cancelled().await;
            handle.stop(true).await;
        });
        self.server.await.context("http server")?;
        self.lifecycle.shutdown().cancel();
        self.lifecycle.wait().await;
        Ok(())
    }
}

/// The API routes (ops endpoints are mounted by `service_kit::ops`).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(page::index))
        .route("/aisdk-demo", web::get().to(page::aisdk))
        .route("/openapi.json", web::get().to(openapi::serve))
        .route("/api/models", web::get().to(chat::models))
        .route("/api/chat/start", web::post().to(chat::start))
        .route("/v1/models", web::get().to(openai::routes::models))
        .route(
            "/v1/chat/completions",
            web::post().to(openai::routes::completions),
        )
        .route(
            "/v1/chat/completions/{id}/stream",
            web::get().to(openai::routes::resume),
        )
        .route("/api/chat/{requestId}/cancel", web::post().to(chat::cancel))
        .route("/api/chat", web::post().to(aisdk::routes::chat))
        .route(
            "/api/chat/{id}/stream",
            web::get().to(aisdk::routes::resume),
        )
        .route("/api/chat/{id}/stop", web::post().to(aisdk::routes::stop))
        .route(
            "/api/sse/stream/{sessionId}",
            web::get().to(streams::stream),
        )
        .route(
            "/api/analytics/sessions/{sessionId}",
            web::get().to(analytics::session),
        )
        .route("/api/analytics/models", web::get().to(analytics::models))
        .route("/api/analytics/key", web::get().to(analytics::own_key))
        .route(
            "/api/sessions/{sessionId}/stream-token",
            web::post().to(sessions::stream_token),
        )
        .route(
            "/api/sessions/{sessionId}/connections",
            web::get().to(sessions::connections),
        )
        .route("/api/admin/keys", web::post().to(admin::create))
        .route("/api/admin/keys", web::get().to(admin::list))
        .route("/api/admin/keys/{keyId}", web::delete().to(admin::revoke));
}

/// CORS for the configured origins only; with none configured the middleware adds nothing
/// and browsers keep the same-origin policy.
fn cors(origins: &[String]) -> actix_cors::Cors {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "DELETE"])
        .allowed_headers([
            "Authorization",
            "Content-Type",
            "Last-Event-ID",
            "Idempotency-Key",
        ])
        .expose_headers(["Retry-After"])
        .max_age(600);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    cors
}

/// API keys and the stream-token signer, with loud warnings for every development shortcut.
fn security(settings: &Settings) -> anyhow::Result<(auth::ApiKeys, stream_token::StreamTokens)> {
    use secrecy::SecretString;
    let auth = &settings.auth;
    let mut api_keys = auth::ApiKeys::load(auth)?;
    if api_keys.allows_anonymous() {
        tracing::warn!(
            "auth.allow_anonymous is on: anyone can start chats and read streams (development only)"
        );
    } else if api_keys.is_empty() {
        let key = format!("sk-dev-{}", random_token());
        api_keys.add("dev", &key);
        tracing::warn!(
            dev_key = %key,
            "no API keys configured (auth.api_keys); generated a development key for this process only"
        );
    }
    let secret = match &auth.stream_token_secret {
        Some(secret) => secret.clone(),
        None => {
            tracing::warn!(
                "auth.stream_token_secret is not set: stream tokens from this gateway are not accepted by other replicas"
            );
            SecretString::from(random_token())
        }
    };
    let previous = auth
        .previous_stream_token_secret
        .clone()
        .map(|secret| (auth.previous_stream_token_kid.clone(), secret));
    Ok((
        api_keys,
        stream_token::StreamTokens::new(
            auth.stream_token_kid.clone(),
            secret,
            previous,
            auth.stream_token_ttl_secs,
        ),
    ))
}

/// 32 random bytes, hex encoded.
fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// No route matched: a known path with another method is `405` (with `Allow`), else `404`.
async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    match openapi::allowed_methods(req.path()) {
        Some(methods) => Err(ApiError::MethodNotAllowed(methods)),
        None => Err(ApiError::NotFound("no such endpoint".to_owned())),
    }
}
