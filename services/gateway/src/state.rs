//! What every handler shares.

use std::collections::BTreeMap;
use std::sync::Arc;

use fred::prelude::*;
use service_kit::Settings;
use stream_io::session::{Retention, SessionScripts};
use stream_schema::ModelId;

use crate::auth::ApiKeys;
use crate::connections::Connections;
use crate::hub::Hub;
use crate::stream_token::StreamTokens;

pub struct AppState {
    pub settings: Settings,
    /// Request-handler commands; blocking reads never use it.
    pub redis: Pool,
    pub scripts: SessionScripts,
    pub hub: Hub,
    pub connections: Connections,
    /// Configured model ids (the allow-list of `modelId`).
    pub models: BTreeMap<String, ModelId>,
    /// Shared with the key refresh loop, which swaps the active keys inside.
    pub api_keys: Arc<ApiKeys>,
    pub limiter: crate::limits::RateLimiter,
    pub stream_tokens: StreamTokens,
    /// Cancelled on shutdown: open SSE streams end cleanly.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Tracks the SSE delivery tasks handlers spawn, so shutdown waits for them.
    pub lifecycle: service_kit::lifecycle::Lifecycle,
    pub delivery: DeliveryMetrics,
}

/// The delivery metrics every SSE stream adds to, looked up in the recorder once: a lookup per
/// delivered batch and client (hashing the name, reading the registry) was about 2 % of the
/// gateway's time when many clients each get a token at a time.
pub struct DeliveryMetrics {
    pub events: metrics::Counter,
    pub tokens: metrics::Counter,
    /// Producer write to gateway send, per token, on two hosts' clocks (NTP keeps them close).
    pub lag: metrics::Histogram,
}

impl DeliveryMetrics {
    /// Handles from the recorder installed now (install it first).
    pub fn register() -> Self {
        Self {
            events: metrics::counter!("gateway_events_delivered_total"),
            tokens: metrics::counter!("gateway_tokens_delivered_total"),
            lag: metrics::histogram!("gateway_token_delivery_lag_seconds"),
        }
    }
}

impl AppState {
    pub fn retention(&self) -> Retention {
        Retention {
            ttl_secs: self.settings.streams.session_ttl_secs,
        }
    }

    pub fn client(&self) -> &Client {
        self.redis.next()
    }
}

pub type SharedState = Arc<AppState>;
