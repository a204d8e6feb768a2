//! API keys: who may start, cancel and read analytics. Keys are configured as SHA-256 hashes
//! and compared in constant time; each has an id used in logs, analytics and limits.

use actix_web::HttpRequest;
use service_kit::config::{ApiKeyEntry, AuthSettings, check_api_key_entry};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The id of the API key a request was made with. As a handler argument it is the extractor
/// that authenticates the request (`401` when the key is missing or wrong); a handler that must
/// see the refusal itself takes `Result<KeyId, ApiError>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(pub String);

impl actix_web::FromRequest for KeyId {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let key = match req.app_data::<actix_web::web::Data<crate::state::SharedState>>() {
            Some(state) => state.api_keys.authenticate(req),
            None => {
                tracing::error!("the gateway state is not registered with the app");
                Err(ApiError::Internal)
            }
        };
        std::future::ready(key)
    }
}

/// Key id used for every request when anonymous access is allowed (development only).
pub const ANONYMOUS: &str = "anonymous";

pub struct ApiKeys {
    keys: Vec<(String, [u8; 32])>,
    allow_anonymous: bool,
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

fn decode(entry: &ApiKeyEntry) -> Result<(String, [u8; 32]), String> {
    check_api_key_entry(entry)?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&entry.sha256, &mut hash).map_err(|e| e.to_string())?;
    Ok((entry.id.clone(), hash))
}

/// SHA-256 of a key, hex encoded: what goes into `auth.api_keys`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
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
                let (id, sha256) = line.split_once(':').ok_or_else(|| KeyLoadError::Line {
                    path: path.clone(),
                    line: index + 1,
                    reason: "expected id:sha256hex".to_owned(),
                })?;
                let entry = ApiKeyEntry {
                    id: id.trim().to_owned(),
                    sha256: sha256.trim().to_lowercase(),
                };
                keys.push(decode(&entry).map_err(|reason| KeyLoadError::Line {
                    path: path.clone(),
                    line: index + 1,
                    reason,
                })?);
            }
        }
        Ok(Self {
            keys,
            allow_anonymous: settings.allow_anonymous,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Adds a key at start (the generated development key).
    pub fn add(&mut self, id: &str, key: &str) {
        self.keys
            .push((id.to_owned(), Sha256::digest(key.as_bytes()).into()));
    }

    /// Whether a key id is (still) configured: revoking a key also revokes its stream tokens.
    pub fn has_id(&self, id: &str) -> bool {
        (self.allow_anonymous && id == ANONYMOUS) || self.keys.iter().any(|(k, _)| k == id)
    }

    /// The key id of the request's `Authorization: Bearer` key.
    pub fn authenticate(&self, req: &HttpRequest) -> Result<KeyId, ApiError> {
        let presented = bearer(req);
        let Some(presented) = presented else {
            if self.allow_anonymous {
                return Ok(KeyId(ANONYMOUS.to_owned()));
            }
            return Err(ApiError::Unauthorized(
                "an API key is required: Authorization: Bearer <key>".to_owned(),
            ));
        };
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every key, without stopping early, so timing says nothing about
        // which key (if any) matched.
        let mut found: Option<&str> = None;
        for (id, expected) in &self.keys {
            if bool::from(hash.ct_eq(expected)) {
                found = Some(id);
            }
        }
        match found {
            Some(id) => Ok(KeyId(id.to_owned())),
            None => Err(ApiError::Unauthorized("invalid API key".to_owned())),
        }
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
            }],
            ..AuthSettings::default()
        };
        ApiKeys::load(&settings).unwrap_or(ApiKeys {
            keys: Vec::new(),
            allow_anonymous: false,
        })
    }

    #[test]
    fn the_right_key_names_its_id() -> Result<(), ApiError> {
        let req = TestRequest::default()
            .insert_header(("Authorization", "Bearer sk-right"))
            .to_http_request();
        assert_eq!(keys().authenticate(&req)?, KeyId("team-a".to_owned()));
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
    fn a_key_file_adds_keys() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::env::temp_dir().join(format!("bridge-keys-{}", std::process::id()));
        std::fs::write(&path, format!("# team keys\nteam-b:{}\n", hash_key("sk-b")))?;
        let loaded = ApiKeys::load(&AuthSettings {
            api_keys_file: Some(path.display().to_string()),
            ..AuthSettings::default()
        });
        let _ = std::fs::remove_file(&path);
        let loaded = loaded?;
        let req = TestRequest::default()
            .insert_header(("Authorization", "Bearer sk-b"))
            .to_http_request();
        assert_eq!(loaded.authenticate(&req)?, KeyId("team-b".to_owned()));
        Ok(())
    }
}
