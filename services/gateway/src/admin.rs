//! Key management for admin keys: `POST /api/admin/keys` (adds a key and returns its secret
//! once), `GET /api/admin/keys` (ids, tenants, roles and hash prefixes, never secrets) and
//! `DELETE /api/admin/keys/{keyId}` (revokes it on every gateway within `auth.key_refresh_ms`,
//! and ends its open streams).

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use stream_schema::{KeyRole, StoredApiKey, TenantId};
use utoipa::ToSchema;

use crate::auth::{Caller, KeySource, hash_key};
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// A key to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"id": "acme-web", "tenant": "acme", "role": "chat"}))]
pub(crate) struct NewKey {
    /// 1-64 of `A-Z a-z 0-9 - _`, unique forever (a revoked id is not reused); generated
    /// when absent.
    id: Option<String>,
    /// 1-64 of `A-Z a-z 0-9 - _`: whose sessions the key sees.
    #[schema(value_type = String)]
    tenant: String,
    /// `chat` (default) or `admin`.
    #[schema(value_type = Option<String>, example = "chat")]
    role: Option<KeyRole>,
}

/// The added key: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreatedKey {
    id: String,
    #[schema(value_type = String)]
    tenant: TenantId,
    #[schema(value_type = String)]
    role: KeyRole,
    /// The API key (`Authorization: Bearer <key>`). Not stored: keep it now.
    key: String,
    /// The first 8 hex digits of its SHA-256, as the listing shows it.
    sha256_prefix: String,
}

/// One key of the listing.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyInfo {
    id: String,
    #[schema(value_type = String)]
    tenant: TenantId,
    #[schema(value_type = String)]
    role: KeyRole,
    /// The first 8 hex digits of the key's SHA-256.
    sha256_prefix: String,
    /// `config` (the config file; revocable, not removable) or `store` (added through the API).
    #[schema(example = "store")]
    source: &'static str,
    revoked: bool,
    /// Unix ms; absent for configured keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyList {
    keys: Vec<KeyInfo>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RevokedKey {
    id: String,
    revoked: bool,
}

/// Adds an API key for a tenant.
#[utoipa::path(
    post, path = "/api/admin/keys", tag = "admin", operation_id = "createApiKey",
    request_body(content = NewKey, content_type = "application/json"),
    responses(
        (status = 201, description = "Added; every gateway accepts it within \
            `auth.key_refresh_ms`", body = CreatedKey),
        (status = 400, description = "`invalid_request`: a bad id, tenant or role",
            body = ErrorBody),
        crate::error::ApiKeyRefused,
        (status = 403, description = "`forbidden`: not an admin key", body = ErrorBody),
        (status = 409, description = "`conflict`: the id is taken", body = ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn create(
    state: web::Data<SharedState>,
    caller: Caller,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let new: NewKey =
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let id = new
        .id
        .unwrap_or_else(|| format!("key-{}", hex::encode(rand::random::<[u8; 6]>())));
    if !stream_schema::api_key::valid_key_id(&id) {
        return Err(ApiError::InvalidRequest(
            "id must be 1-64 of A-Z a-z 0-9 - _".to_owned(),
        ));
    }
    let tenant = TenantId::parse(&new.tenant)
        .map_err(|e| ApiError::InvalidRequest(format!("tenant {e}")))?;
    let role = new.role.unwrap_or(KeyRole::Chat);
    let key = format!("sk-{}", hex::encode(rand::random::<[u8; 24]>()));
    let sha256 = hash_key(&key);
    let record = StoredApiKey {
        sha256: sha256.clone(),
        tenant: tenant.clone(),
        role,
        revoked: false,
        created_at: stream_schema::now_millis(),
    };
    if !state.api_keys.create(state.client(), &id, &record).await? {
        return Err(ApiError::Conflict(format!("the key id `{id}` is taken")));
    }
    tracing::info!(key_id = %id, %tenant, %role, by = %caller.key.0, "API key added");
    Ok(HttpResponse::Created().json(CreatedKey {
        id,
        tenant,
        role,
        key,
        sha256_prefix: sha256.chars().take(8).collect(),
    }))
}

/// Every API key, configured and added, revoked ones included; never a secret.
#[utoipa::path(
    get, path = "/api/admin/keys", tag = "admin", operation_id = "listApiKeys",
    responses(
        (status = 200, description = "The keys, by id", body = KeyList),
        crate::error::ApiKeyRefused,
        (status = 403, description = "`forbidden`: not an admin key", body = ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn list(state: web::Data<SharedState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let keys = state
        .api_keys
        .list(state.client())
        .await?
        .into_iter()
        .map(|key| KeyInfo {
            id: key.id,
            tenant: key.tenant,
            role: key.role,
            sha256_prefix: key.sha256_prefix,
            source: match key.source {
                KeySource::Config => "config",
                KeySource::Store => "store",
            },
            revoked: key.revoked,
            created_at: key.created_at,
        })
        .collect();
    Ok(HttpResponse::Ok().json(KeyList { keys }))
}

/// Revokes an API key: within `auth.key_refresh_ms` every gateway refuses it, its stream
/// tokens stop opening streams, and its open streams end with an `unauthorized` error event.
#[utoipa::path(
    delete, path = "/api/admin/keys/{keyId}", tag = "admin", operation_id = "revokeApiKey",
    params(("keyId" = String, Path, description = "The id of the key")),
    responses(
        (status = 200, description = "Revoked (also when it already was)", body = RevokedKey),
        crate::error::ApiKeyRefused,
        (status = 403, description = "`forbidden`: not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no key with this id", body = ErrorBody),
        crate::error::RedisUnavailable,
    ),
    security(("bearer" = [])),
)]
pub async fn revoke(
    state: web::Data<SharedState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = path.into_inner();
    if !stream_schema::api_key::valid_key_id(&id)
        || !state.api_keys.revoke(state.client(), &id).await?
    {
        return Err(ApiError::NotFound("no such API key".to_owned()));
    }
    tracing::info!(key_id = %id, by = %caller.key.0, "API key revoked");
    Ok(HttpResponse::Ok().json(RevokedKey { id, revoked: true }))
}
