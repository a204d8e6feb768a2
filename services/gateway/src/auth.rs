//! API keys: who may call the API, for which tenant, in which role. Keys are SHA-256 hashes
//! compared in constant time. The configured keys (and the key file) are a static seed; keys
//! added or revoked through `/api/admin/keys` live in Redis (`stream_io::api_keys`), and every
//! gateway reloads them when the store's version moves ([`ApiKeys::refresh`]), so a revocation
//! reaches every replica within `auth.key_refresh_ms`. Open streams of a revoked key watch
//! [`ApiKeys::changes`] and end themselves.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::HttpRequest;
use fred::prelude::Client;
use service_kit::config::{ApiKeyEntry, AuthSettings, check_api_key_entry};
use service_kit::ops::LoopFlag;
use sha2::{Digest, Sha256};
use stream_schema::{KeyRole, StoredApiKey, TenantId};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// The id of the API key a request was made with. As a handler argument it is the extractor
/// that authenticates the request (`401` when the key is missing or wrong); a handler that must
/// see the refusal itself takes `Result<KeyId, ApiError>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(pub String);

/// Who is calling: the key, its tenant and its role. As a handler argument it authenticates
/// the request like [`KeyId`]; every session id the caller names is scoped to `tenant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key: KeyId,
    pub tenant: TenantId,
    pub role: KeyRole,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == KeyRole::Admin
    }

    /// The stored id of the caller's session `client` (see `SessionId::scoped`).
    pub fn session(&self, client: &stream_schema::SessionId) -> stream_schema::SessionId {
        stream_schema::SessionId::scoped(&self.tenant, client)
    }

    /// `403` unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden("this needs an admin key".to_owned()))
        }
    }
}

fn authenticate(req: &HttpRequest) -> Result<Caller, ApiError> {
    match req.app_data::<actix_web::web::Data<crate::state::SharedState>>() {
        Some(state) => state.api_keys.authenticate(req),
        None => {
            tracing::error!("the gateway state is not registered with the app");
            Err(ApiError::Internal)
        }
    }
}

impl actix_web::FromRequest for KeyId {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(authenticate(req).map(|caller| caller.key))
    }
}

impl actix_web::FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(authenticate(req))
    }
}

/// Key id used for every request when anonymous access is allowed (development only).
pub const ANONYMOUS: &str = "anonymous";

/// One key that authenticates.
#[derive(Debug, Clone)]
struct KeyEntry {
    id: String,
    hash: [u8; 32],
    tenant: TenantId,
    role: KeyRole,
}

/// Where a listed key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `auth.api_keys`, `auth.api_keys_file` or the generated development key.
    Config,
    /// Added through `POST /api/admin/keys`.
    Store,
}

/// A key as `GET /api/admin/keys` lists it: never the secret, only a prefix of its hash.
#[derive(Debug, Clone)]
pub struct ListedKey {
    pub id: String,
    pub tenant: TenantId,
    pub role: KeyRole,
    pub sha256_prefix: String,
    pub source: KeySource,
    pub revoked: bool,
    pub created_at: Option<u64>,
}

pub struct ApiKeys {
    /// The configured keys; the store can revoke them, never change them.
    seed: Vec<KeyEntry>,
    /// The keys that authenticate now: `seed` minus revoked ones plus the store's. Written by
    /// the refresh loop and by this gateway's own key changes, read by every request.
    active: RwLock<Arc<Vec<KeyEntry>>>,
    /// The store version `active` was built from: a reload that read an older version (the
    /// refresh loop racing an admin call on this gateway) must not undo a newer one.
    applied_version: std::sync::Mutex<Option<u64>>,
    allow_anonymous: bool,
    /// Bumped by the refresh loop whenever `active` changed; open streams watch it to end
    /// themselves when their key is revoked.
    changes: watch::Sender<u64>,
    store: stream_io::api_keys::ApiKeyStore,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("cannot read auth.api_keys_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.api_keys_file {path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

fn decode(entry: &ApiKeyEntry) -> Result<KeyEntry, String> {
    check_api_key_entry(entry)?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&entry.sha256, &mut hash).map_err(|e| e.to_string())?;
    let tenant = match &entry.tenant {
        Some(tenant) => TenantId::parse(tenant).map_err(|e| format!("tenant {e}"))?,
        None => TenantId::default_tenant(),
    };
    let role = match &entry.role {
        Some(role) => role.parse::<KeyRole>()?,
        None => KeyRole::Chat,
    };
    Ok(KeyEntry {
        id: entry.id.clone(),
        hash,
        tenant,
        role,
    })
}

/// SHA-256 of a key, hex encoded: what goes into `auth.api_keys`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A key file line: `id:sha256hex[:tenant[:role]]`.
fn parse_line(line: &str) -> Result<ApiKeyEntry, String> {
    let mut parts = line.split(':').map(str::trim);
    let (Some(id), Some(sha256)) = (parts.next(), parts.next()) else {
        return Err("expected id:sha256hex[:tenant[:role]]".to_owned());
    };
    let entry = ApiKeyEntry {
        id: id.to_owned(),
        sha256: sha256.to_lowercase(),
        tenant: parts.next().filter(|t| !t.is_empty()).map(str::to_owned),
        role: parts.next().filter(|r| !r.is_empty()).map(str::to_owned),
    };
    if parts.next().is_some() {
        return Err("expected id:sha256hex[:tenant[:role]]".to_owned());
    }
    Ok(entry)
}

impl ApiKeys {
    /// Keys from the config and the optional key file.
    pub fn load(settings: &AuthSettings) -> Result<Self, KeyLoadError> {
        let mut keys = Vec::new();
        for entry in &settings.api_keys {
            // Entries were validated with the config; a failure here cannot happen.
            if let Ok(key) = decode(entry) {
                keys.push(key);
            }
        }
        if let Some(path) = &settings.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|source| KeyLoadError::Read {
                path: path.clone(),
                source,
            })?;
            for (index, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let key = parse_line(line)
                    .and_then(|entry| decode(&entry))
                    .map_err(|reason| KeyLoadError::Line {
                        path: path.clone(),
                        line: index + 1,
                        reason,
                    })?;
                keys.push(key);
            }
        }
        Ok(Self::with_seed(keys, settings.allow_anonymous))
    }

    fn with_seed(seed: Vec<KeyEntry>, allow_anonymous: bool) -> Self {
        Self {
            active: RwLock::new(Arc::new(seed.clone())),
            applied_version: std::sync::Mutex::new(None),
            seed,
            allow_anonymous,
            changes: watch::channel(0).0,
            store: stream_io::api_keys::ApiKeyStore::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.seed.is_empty()
    }

    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Adds a key at start (the generated development key: an admin of the default tenant).
    pub fn add(&mut self, id: &str, key: &str) {
        self.seed.push(KeyEntry {
            id: id.to_owned(),
            hash: Sha256::digest(key.as_bytes()).into(),
            tenant: TenantId::default_tenant(),
            role: KeyRole::Admin,
        });
        self.active = RwLock::new(Arc::new(self.seed.clone()));
    }

    fn active(&self) -> Arc<Vec<KeyEntry>> {
        match self.active.read() {
            Ok(active) => active.clone(),
            // A panic while swapping an `Arc` leaves a whole value behind: use it.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The caller a key id stands for while that key is active: revoking a key also revokes
    /// its stream tokens and ends its streams.
    pub fn caller_of(&self, id: &str) -> Option<Caller> {
        if self.allow_anonymous && id == ANONYMOUS {
            return Some(anonymous());
        }
        self.active()
            .iter()
            .find(|key| key.id == id)
            .map(KeyEntry::caller)
    }

    /// Whether a key id is (still) active.
    pub fn has_id(&self, id: &str) -> bool {
        self.caller_of(id).is_some()
    }

    /// Changes of the active keys: an open stream waits on it and then checks its key.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The caller of the request's `Authorization: Bearer` key.
    pub fn authenticate(&self, req: &HttpRequest) -> Result<Caller, ApiError> {
        let presented = bearer(req);
        let Some(presented) = presented else {
            if self.allow_anonymous {
                return Ok(anonymous());
            }
            return Err(ApiError::Unauthorized(
                "an API key is required: Authorization: Bearer <key>".to_owned(),
            ));
        };
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every key, without stopping early, so timing says nothing about
        // which key (if any) matched.
        let active = self.active();
        let mut found: Option<&KeyEntry> = None;
        for key in active.iter() {
            if bool::from(hash.ct_eq(&key.hash)) {
                found = Some(key);
            }
        }
        match found {
            Some(key) => Ok(key.caller()),
            None => Err(ApiError::Unauthorized("invalid API key".to_owned())),
        }
    }

    /// Reads the store (its version first, so the records are at least that new) and
    /// rebuilds the active keys from it.
    async fn reload(&self, client: &Client) -> Result<u64, stream_io::StreamIoError> {
        let version = stream_io::api_keys::version(client).await?;
        let stored = stream_io::api_keys::load(client).await?;
        self.apply(version, stored);
        Ok(version)
    }

    /// After a key change made through this gateway: it applies here at once, not at the next
    /// refresh (the change is stored either way; the refresh loop catches up on failure).
    async fn reload_after_change(&self, client: &Client) {
        if let Err(error) = self.reload(client).await {
            tracing::warn!(%error, "key change stored; it applies here at the next refresh");
        }
    }

    /// Rebuilds the active keys from the store's records of `version`, unless newer ones
    /// are in force already.
    fn apply(&self, version: u64, stored: stream_io::api_keys::Loaded) {
        let mut applied = self
            .applied_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if applied.is_some_and(|applied| applied > version) {
            return;
        }
        *applied = Some(version);
        let mut active = self.seed.clone();
        for (id, record) in stored {
            let record = match record {
                Ok(record) => record,
                Err(error) => {
                    tracing::warn!(key_id = %id, %error, "skipping an undecodable stored API key");
                    continue;
                }
            };
            active.retain(|key| key.id != id);
            if record.revoked {
                continue;
            }
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&record.sha256, &mut hash).is_err() {
                continue;
            }
            active.push(KeyEntry {
                id,
                hash,
                tenant: record.tenant,
                role: record.role,
            });
        }
        let active = Arc::new(active);
        match self.active.write() {
            Ok(mut slot) => *slot = active,
            Err(poisoned) => *poisoned.into_inner() = active,
        }
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Keeps the active keys in step with the store: polls its version every `every` and
    /// reloads the keys when it moved. The flag is up while the last poll succeeded (a gateway
    /// that cannot see revocations is not ready); on an error the last keys stay in force.
    pub async fn refresh(
        self: Arc<Self>,
        client: Client,
        every: Duration,
        shutdown: CancellationToken,
        flag: LoopFlag,
    ) {
        let mut seen: Option<u64> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let polled = async {
                let version = stream_io::api_keys::version(&client).await?;
                if seen != Some(version) {
                    seen = Some(self.reload(&client).await?);
                }
                Ok::<_, stream_io::StreamIoError>(())
            }
            .await;
            match polled {
                Ok(()) => flag.set(true),
                Err(error) => {
                    flag.set(false);
                    tracing::warn!(%error, "cannot refresh the API keys; the last ones stay in force");
                }
            }
        }
    }

    /// Every key (configured and stored, revoked ones too) for the admin listing.
    pub async fn list(&self, client: &Client) -> Result<Vec<ListedKey>, ApiError> {
        let stored = stream_io::api_keys::load(client)
            .await
            .map_err(|e| ApiError::from_redis(&e))?;
        let mut listed: Vec<ListedKey> = self
            .seed
            .iter()
            .map(|key| ListedKey {
                id: key.id.clone(),
                tenant: key.tenant.clone(),
                role: key.role,
                sha256_prefix: hex::encode(&key.hash[..4]),
                source: KeySource::Config,
                revoked: false,
                created_at: None,
            })
            .collect();
        for (id, record) in stored {
            let Ok(record) = record else { continue };
            let prefix = record.sha256.chars().take(8).collect();
            match listed.iter_mut().find(|key| key.id == id) {
                // A configured key's record only ever revokes it.
                Some(seeded) => seeded.revoked |= record.revoked,
                None => listed.push(ListedKey {
                    id,
                    tenant: record.tenant,
                    role: record.role,
                    sha256_prefix: prefix,
                    source: KeySource::Store,
                    revoked: record.revoked,
                    created_at: Some(record.created_at),
                }),
            }
        }
        listed.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(listed)
    }

    /// Stores a new key; false when the id is taken (configured, stored or revoked).
    pub async fn create(
        &self,
        client: &Client,
        id: &str,
        record: &StoredApiKey,
    ) -> Result<bool, ApiError> {
        if self.seed.iter().any(|key| key.id == id) || id == ANONYMOUS {
            return Ok(false);
        }
        let added = self
            .store
            .add(client, id, record)
            .await
            .map_err(|e| ApiError::from_redis(&e))?;
        if added {
            self.reload_after_change(client).await;
        }
        Ok(added)
    }

    /// Revokes a key by id; false when no such key exists.
    pub async fn revoke(&self, client: &Client, id: &str) -> Result<bool, ApiError> {
        // Compare-and-set against a concurrent change: retry a few times.
        for _ in 0..5 {
            let raw = stream_io::api_keys::raw(client, id)
                .await
                .map_err(|e| ApiError::from_redis(&e))?;
            let record = match &raw {
                Some(raw) => match StoredApiKey::decode(raw) {
                    Ok(record) => record,
                    Err(error) => {
                        tracing::error!(key_id = %id, %error, "undecodable stored API key");
                        return Err(ApiError::Internal);
                    }
                },
                None => match self.seed.iter().find(|key| key.id == id) {
                    Some(seeded) => StoredApiKey {
                        sha256: hex::encode(seeded.hash),
                        tenant: seeded.tenant.clone(),
                        role: seeded.role,
                        revoked: false,
                        created_at: stream_schema::now_millis(),
                    },
                    None => return Ok(false),
                },
            };
            let revoked = StoredApiKey {
                revoked: true,
                ..record
            };
            if self
                .store
                .replace(client, id, raw.as_deref(), &revoked)
                .await
                .map_err(|e| ApiError::from_redis(&e))?
            {
                self.reload_after_change(client).await;
                return Ok(true);
            }
        }
        Err(ApiError::Unavailable)
    }
}

impl KeyEntry {
    fn caller(&self) -> Caller {
        Caller {
            key: KeyId(self.id.clone()),
            tenant: self.tenant.clone(),
            role: self.role,
        }
    }
}

fn anonymous() -> Caller {
    Caller {
        key: KeyId(ANONYMOUS.to_owned()),
        tenant: TenantId::default_tenant(),
        role: KeyRole::Chat,
    }
}

/// The value of `Authorization: Bearer <value>`, if any.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get("Authorization")?.to_str().ok()?;
    let (scheme, value) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| value.trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn keys() -> ApiKeys {
        let settings = AuthSettings {
            api_keys: vec![ApiKeyEntry {
                id: "team-a".to_owned(),
                sha256: hash_key("sk-right"),
                tenant: Some("acme".to_owned()),
                ..ApiKeyEntry::default()
            }],
            ..AuthSettings::default()
        };
        ApiKeys::load(&settings).unwrap_or_else(|_| ApiKeys::with_seed(Vec::new(), false))
    }

    fn request(key: &str) -> HttpRequest {
        TestRequest::default()
            .insert_header(("Authorization", format!("Bearer {key}")))
            .to_http_request()
    }

    #[test]
    fn the_right_key_names_its_id_tenant_and_role() -> Result<(), ApiError> {
        let caller = keys().authenticate(&request("sk-right"))?;
        assert_eq!(caller.key, KeyId("team-a".to_owned()));
        assert_eq!(caller.tenant.as_str(), "acme");
        assert_eq!(caller.role, KeyRole::Chat);
        Ok(())
    }

    #[test]
    fn missing_or_wrong_keys_are_refused() {
        for header in [
            None,
            Some("Bearer sk-wrong"),
            Some("Basic sk-right"),
            Some("Bearer "),
        ] {
            let mut req = TestRequest::default();
            if let Some(value) = header {
                req = req.insert_header(("Authorization", value));
            }
            let result = keys().authenticate(&req.to_http_request());
            assert!(
                matches!(result, Err(ApiError::Unauthorized(_))),
                "{header:?}"
            );
        }
    }

    #[test]
    fn stored_keys_are_added_and_revocations_remove_configured_ones()
    -> Result<(), Box<dyn std::error::Error>> {
        let keys = keys();
        let mut changes = keys.changes();
        let added = StoredApiKey {
            sha256: hash_key("sk-new"),
            tenant: TenantId::parse("globex")?,
            role: KeyRole::Admin,
            revoked: false,
            created_at: 1,
        };
        let revoked_seed = StoredApiKey {
            sha256: hash_key("sk-right"),
            tenant: TenantId::parse("acme")?,
            role: KeyRole::Chat,
            revoked: true,
            created_at: 1,
        };
        keys.apply(
            2,
            vec![
                ("new".to_owned(), Ok(added)),
                ("team-a".to_owned(), Ok(revoked_seed)),
            ],
        );
        assert!(changes.has_changed()?);
        changes.mark_unchanged();
        let caller = keys.authenticate(&request("sk-new"))?;
        assert_eq!(caller.tenant.as_str(), "globex");
        assert!(caller.is_admin());
        assert!(keys.authenticate(&request("sk-right")).is_err());
        assert!(!keys.has_id("team-a"));
        // A snapshot of an older version (a refresh that raced a newer change) is ignored.
        keys.apply(1, Vec::new());
        assert!(keys.has_id("new"));
        // Without the revocation the configured key is back.
        keys.apply(3, Vec::new());
        assert!(keys.has_id("team-a"));
        assert!(!keys.has_id("new"));
        Ok(())
    }

    #[test]
    fn a_key_file_adds_keys_with_tenants_and_roles() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::env::temp_dir().join(format!("bridge-keys-{}", std::process::id()));
        std::fs::write(
            &path,
            format!(
                "# team keys\nteam-b:{}\nops:{}:ops:admin\n",
                hash_key("sk-b"),
                hash_key("sk-ops")
            ),
        )?;
        let loaded = ApiKeys::load(&AuthSettings {
            api_keys_file: Some(path.display().to_string()),
            ..AuthSettings::default()
        });
        let _ = std::fs::remove_file(&path);
        let loaded = loaded?;
        let b = loaded.authenticate(&request("sk-b"))?;
        assert_eq!(b.key, KeyId("team-b".to_owned()));
        assert!(b.tenant.is_default());
        let ops = loaded.authenticate(&request("sk-ops"))?;
        assert_eq!(ops.tenant.as_str(), "ops");
        assert!(ops.is_admin());
        Ok(())
    }
}
