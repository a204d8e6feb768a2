//! `GET /api/analytics/sessions/{sessionId}`, `GET /api/analytics/models` and
//! `GET /api/analytics/key`: the counters the processor keeps, as camelCase JSON.
//!
//! Per tenant: a session id names the caller's tenant's session, and the models' counters are
//! the caller's tenant's. An admin key reads the global model counters, and any tenant's with
//! `?tenant=`.
//!
//! Every answer has `totals` (since the counters' TTL began) and `window` (the last
//! `?minutes=` minutes, default 15, at most `processor.window_retention_secs`), built by summing
//! stats hashes: a session's live in one shard, a model's and a key's are spread over every
//! shard. Field names, histogram buckets and percentiles come from `stream_schema::stats`, the
//! definitions the processor writes with.

use std::collections::{BTreeMap, HashMap};

use actix_web::{HttpRequest, HttpResponse, web};
use fred::prelude::*;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use stream_schema::stats::{Counters, Histogram};
use stream_schema::{ModelId, RedisKey, SessionId, TenantId};
use utoipa::ToSchema;

use crate::auth::{Caller, KeyId};
use crate::error::ApiError;
use crate::state::{AppState, SharedState};

/// Window length when the query gives none.
const DEFAULT_WINDOW_MINUTES: u64 = 15;

#[derive(Debug, Deserialize)]
struct WindowQuery {
    minutes: Option<u64>,
    /// Admin keys only: another tenant's counters.
    tenant: Option<String>,
}

/// p50 and p95 of one latency, in ms; `null` without samples.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Percentiles {
    p50: Option<f64>,
    p95: Option<f64>,
    samples: u64,
}

impl From<&Histogram> for Percentiles {
    fn from(histogram: &Histogram) -> Self {
        Self {
            p50: histogram.percentile(0.50).map(round),
            p95: histogram.percentile(0.95).map(round),
            samples: histogram.count(),
        }
    }
}

/// One decimal is more precision than the buckets have.
fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// What a set of stats hashes says; the same shape for totals and windows.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    requests: u64,
    restarts: u64,
    /// Per model: requests this model could not serve that moved to the next model of its
    /// fallback chain (0 for sessions and keys).
    fell_back: u64,
    /// Per model: requests this model served as a fallback of another one (also counted in
    /// its `requests`; 0 for sessions and keys).
    fallback_served: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Tokens written to session streams (not counted per API key).
    tokens_streamed: u64,
    finished: u64,
    cancelled: u64,
    /// Completed requests by finish reason, `cancelled` included.
    finishes: BTreeMap<String, u64>,
    /// Failed requests by error code.
    errors: BTreeMap<String, u64>,
    time_to_first_token_ms: Percentiles,
    duration_ms: Percentiles,
    /// Completion tokens per second of generation (after the first token).
    tokens_per_second: Option<f64>,
}

impl From<&Counters> for Summary {
    fn from(c: &Counters) -> Self {
        Self {
            requests: c.requests,
            restarts: c.restarts,
            fell_back: c.fell_back,
            fallback_served: c.fallback_served,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            tokens_streamed: c.tokens_streamed,
            finished: c.finished,
            cancelled: c.cancelled(),
            finishes: c.finishes.clone(),
            errors: c.errors.clone(),
            time_to_first_token_ms: (&c.ttft).into(),
            duration_ms: (&c.duration).into(),
            tokens_per_second: c.tokens_per_second().map(round),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    window_minutes: u64,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    totals: Summary,
    window: Window,
}

/// Which stats hashes to sum: per shard, the totals key and the key of a given minute.
trait Scope: Sync {
    fn totals(&self, shard: u16) -> RedisKey;
    fn minute(&self, shard: u16, minute: u64) -> RedisKey;
}

struct SessionScope(SessionId);
struct ModelScope(ModelId);
struct TenantModelScope(TenantId, ModelId);
struct KeyScope(String);

impl Scope for SessionScope {
    fn totals(&self, shard: u16) -> RedisKey {
        RedisKey::session_stats(shard, &self.0)
    }
    fn minute(&self, shard: u16, minute: u64) -> RedisKey {
        RedisKey::session_stats_minute(shard, &self.0, minute)
    }
}

impl Scope for ModelScope {
    fn totals(&self, shard: u16) -> RedisKey {
        RedisKey::model_stats(shard, &self.0)
    }
    fn minute(&self, shard: u16, minute: u64) -> RedisKey {
        RedisKey::model_stats_minute(shard, &self.0, minute)
    }
}

impl Scope for TenantModelScope {
    fn totals(&self, shard: u16) -> RedisKey {
        RedisKey::tenant_model_stats(shard, &self.0, &self.1)
    }
    fn minute(&self, shard: u16, minute: u64) -> RedisKey {
        RedisKey::tenant_model_stats_minute(shard, &self.0, &self.1, minute)
    }
}

impl Scope for KeyScope {
    fn totals(&self, shard: u16) -> RedisKey {
        RedisKey::key_stats(shard, &self.0)
    }
    fn minute(&self, shard: u16, minute: u64) -> RedisKey {
        RedisKey::key_stats_minute(shard, &self.0, minute)
    }
}

/// Sums the hashes of `keys`; the reads are issued together so fred pipelines them.
async fn sum(client: &Client, keys: &[RedisKey]) -> Result<Counters, ApiError> {
    let replies = join_all(
        keys.iter()
            .map(|key| client.hgetall::<HashMap<String, String>, _>(key.as_str())),
    )
    .await;
    let mut counters = Counters::default();
    for reply in replies {
        counters.add_hash(reply?);
    }
    Ok(counters)
}

/// Totals and window of `scope` over `shards`, for the `minutes` minutes up to now.
async fn report(
    client: &Client,
    scope: &dyn Scope,
    shards: &[u16],
    minutes: u64,
) -> Result<Report, ApiError> {
    let totals: Vec<RedisKey> = shards.iter().map(|shard| scope.totals(*shard)).collect();
    let now = stream_schema::stats::minute_of(stream_schema::now_millis());
    let first = now.saturating_sub(minutes.saturating_sub(1));
    let window: Vec<RedisKey> = shards
        .iter()
        .flat_map(|shard| (first..=now).map(move |minute| scope.minute(*shard, minute)))
        .collect();
    let (totals, window) = futures::try_join!(sum(client, &totals), sum(client, &window))?;
    Ok(Report {
        totals: (&totals).into(),
        window: Window {
            window_minutes: minutes,
            summary: (&window).into(),
        },
    })
}

/// The `?minutes=` window, checked against what the processor keeps.
fn window_minutes(req: &HttpRequest, state: &AppState) -> Result<u64, ApiError> {
    let query = web::Query::<WindowQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))?;
    let max = (state.settings.processor.window_retention_secs / 60).max(1);
    let minutes = query.minutes.unwrap_or(DEFAULT_WINDOW_MINUTES.min(max));
    if minutes == 0 || minutes > max {
        return Err(ApiError::InvalidRequest(format!(
            "minutes must be between 1 and {max} (the analytics retention)"
        )));
    }
    Ok(minutes)
}

/// Whose counters the caller reads: `Some(tenant)`, or `None` for the global ones (an admin
/// without `?tenant=`). A non-admin key reads its own tenant's only: naming another tenant is
/// `403`, the same whether that tenant exists or not.
fn tenant_of(req: &HttpRequest, caller: &Caller) -> Result<Option<TenantId>, ApiError> {
    let query = web::Query::<WindowQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))?;
    let Some(raw) = &query.tenant else {
        return Ok((!caller.is_admin()).then(|| caller.tenant.clone()));
    };
    let tenant =
        TenantId::parse(raw).map_err(|e| ApiError::InvalidRequest(format!("tenant {e}")))?;
    if tenant != caller.tenant {
        caller.require_admin()?;
    }
    Ok(Some(tenant))
}

fn all_shards(state: &AppState) -> Vec<u16> {
    (0..state.settings.streams.event_shards.max(1)).collect()
}

#[utoipa::path(
    get, path = "/api/analytics/sessions/{sessionId}", tag = "analytics",
    operation_id = "sessionAnalytics",
    params(("sessionId" = String, Path, description = "1-128 of A-Z a-z 0-9 _ . : -"),
        ("minutes" = Option<u64>, Query, description = "Window length in minutes (default 15, at \
            most the retention)"),
        ("tenant" = Option<String>, Query, description = "Admin keys: the session of this \
            tenant (default: the key's own)")),
    responses(
        (status = 200, description = "The counters of the caller's tenant's session (all zero \
            for a session it never used)", body = SessionAnalytics),
        (status = 400, description = "`invalid_session_id`, or `invalid_request`: `minutes` is not a whole number of \
            minutes within the retention", body = crate::error::ErrorBody),
        crate::error::ApiKeyRefused,
        (status = 403, description = "`forbidden`: `tenant` names another tenant and the key \
            is not an admin", body = crate::error::ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn session(
    state: web::Data<SharedState>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let client = SessionId::parse(&path).map_err(|e| ApiError::InvalidSessionId(e.to_string()))?;
    let minutes = window_minutes(&req, &state)?;
    let tenant = tenant_of(&req, &caller)?.unwrap_or_else(|| caller.tenant.clone());
    let session = SessionId::scoped(&tenant, &client);
    // Every record of a session goes to one shard, and so do its counters.
    let shard = stream_schema::keys::event_shard_of(&session, state.settings.streams.event_shards);
    let report = report(
        state.client(),
        &SessionScope(session.clone()),
        &[shard],
        minutes,
    )
    .await?;
    Ok(HttpResponse::Ok().json(SessionAnalytics {
        session_id: client.to_string(),
        report,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelReport {
    model_id: String,
    #[serde(flatten)]
    report: Report,
}

#[utoipa::path(
    get, path = "/api/analytics/models", tag = "analytics", operation_id = "modelAnalytics",
    params(("minutes" = Option<u64>, Query, description = "Window length in minutes (default 15, at \
            most the retention)"),
        ("tenant" = Option<String>, Query, description = "Admin keys: this tenant's counters \
            (without it an admin reads the global ones; other keys always read their own \
            tenant's)")),
    responses(
        (status = 200, description = "Counters of every configured model, of the caller's \
            tenant (an admin: global, or `tenant`'s)", body = ModelsAnalytics),
        (status = 400, description = "`invalid_request`: `minutes` is not a whole number of \
            minutes within the retention", body = crate::error::ErrorBody),
        crate::error::ApiKeyRefused,
        (status = 403, description = "`forbidden`: `tenant` names another tenant and the key \
            is not an admin", body = crate::error::ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn models(
    state: web::Data<SharedState>,
    caller: Caller,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let minutes = window_minutes(&req, &state)?;
    let tenant = tenant_of(&req, &caller)?;
    let shards = all_shards(&state);
    let client = state.client();
    let reports = join_all(state.models.iter().map(|(id, model)| {
        let (shards, tenant) = (&shards, &tenant);
        async move {
            let scope: Box<dyn Scope + Send> = match tenant {
                Some(tenant) => Box::new(TenantModelScope(tenant.clone(), model.clone())),
                None => Box::new(ModelScope(model.clone())),
            };
            let report = report(client, scope.as_ref(), shards, minutes).await?;
            Ok::<_, ApiError>(ModelReport {
                model_id: id.clone(),
                report,
            })
        }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(ModelsAnalytics {
        tenant: tenant.map(|t| t.to_string()),
        window_minutes: minutes,
        models: reports,
    }))
}

/// The calling API key's own counters (requests it started; no `tokensStreamed`).
#[utoipa::path(
    get, path = "/api/analytics/key", tag = "analytics", operation_id = "keyAnalytics",
    params(("minutes" = Option<u64>, Query, description = "Window length in minutes (default 15, at \
            most the retention)")),
    responses(
        (status = 200, description = "The calling API key's counters", body = KeyAnalytics),
        (status = 400, description = "`invalid_request`: `minutes` is not a whole number of \
            minutes within the retention", body = crate::error::ErrorBody),
        crate::error::ApiKeyRefused,
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn own_key(
    state: web::Data<SharedState>,
    key: KeyId,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let minutes = window_minutes(&req, &state)?;
    let report = report(
        state.client(),
        &KeyScope(key.0.clone()),
        &all_shards(&state),
        minutes,
    )
    .await?;
    Ok(HttpResponse::Ok().json(KeyAnalytics {
        key_id: key.0,
        report,
    }))
}

/// `GET /api/analytics/sessions/{sessionId}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAnalytics {
    session_id: String,
    #[serde(flatten)]
    report: Report,
}

/// `GET /api/analytics/models`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelsAnalytics {
    /// Whose counters these are; absent for the global ones (admin keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    window_minutes: u64,
    models: Vec<ModelReport>,
}

/// `GET /api/analytics/key`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyAnalytics {
    key_id: String,
    #[serde(flatten)]
    report: Report,
}
