//! Stream tokens: what lets an SSE client open a session's stream without an API key.
//!
//! `<kid>.<expiry>.<keyId>.<tenant>.<scope>.<mac>` where `scope` is a request id (that
//! request's stream only) or `*` (any stream of the session), and `mac` is
//! base64url(HMAC-SHA256(secret, "v2\n" tenant "\n" session "\n" scope "\n" expiry "\n"
//! keyId)). The session (the client's id) is not in the token text but is part of the MAC, so a
//! token for session A never verifies for session B; the tenant is, so the stream opened is the
//! tenant's session A and no other tenant's. `kid` names the secret, so a rotated-out secret
//! keeps verifying its tokens until they expire. Tokens of the earlier format
//! (`<kid>.<expiry>.<keyId>.<scope>.<mac>`, "v1", no tenant) verify as the default tenant's, so
//! a rollout does not cut open streams.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use stream_schema::{RequestId, SessionId, TenantId};

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. `WrongScope` is a valid token for something else (403); the rest
/// are not valid tokens at all (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed stream token")]
    Malformed,
    #[error("stream token signed with an unknown key")]
    UnknownKid,
    #[error("invalid stream token")]
    BadSignature,
    #[error("expired stream token")]
    Expired,
    /// A request's token for another request, or for the session-wide stream.
    #[error("the stream token is for another request")]
    WrongScope,
}

/// What a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Request(RequestId),
    Session,
}

impl Scope {
    fn text(&self) -> String {
        match self {
            Self::Request(id) => id.to_string(),
            Self::Session => "*".to_owned(),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "*" => Some(Self::Session),
            other => RequestId::parse(other).ok().map(Self::Request),
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub scope: Scope,
    /// The API key the chat was started with.
    pub key_id: String,
    /// The tenant of that key, whose session the token opens.
    pub tenant: TenantId,
    /// Unix seconds.
    pub expires_at: u64,
}

struct Signer {
    kid: String,
    secret: SecretString,
}

pub struct StreamTokens {
    current: Signer,
    previous: Option<Signer>,
    ttl_secs: u64,
}

/// What a token's MAC covers, per format.
enum Signed<'a> {
    V1,
    V2(&'a TenantId),
}

fn mac(
    secret: &SecretString,
    format: &Signed<'_>,
    session: &SessionId,
    scope: &Scope,
    expires_at: u64,
    key_id: &str,
) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret.expose_secret().as_bytes()).ok()?;
    let scope = scope.text();
    match format {
        Signed::V1 => {
            mac.update(format!("v1\n{session}\n{scope}\n{expires_at}\n{key_id}").as_bytes());
        }
        Signed::V2(tenant) => mac
            .update(format!("v2\n{tenant}\n{session}\n{scope}\n{expires_at}\n{key_id}").as_bytes()),
    }
    Some(mac)
}

impl StreamTokens {
    pub fn new(
        kid: String,
        secret: SecretString,
        previous: Option<(String, SecretString)>,
        ttl_secs: u64,
    ) -> Self {
        Self {
            current: Signer { kid, secret },
            previous: previous.map(|(kid, secret)| Signer { kid, secret }),
            ttl_secs,
        }
    }

    /// A token for `scope` of the client's `session` in `tenant`, issued to API key `key_id`,
    /// valid from `now` (s).
    pub fn issue(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        scope: Scope,
        key_id: &str,
        now: u64,
    ) -> String {
        let expires_at = now + self.ttl_secs;
        let signature = mac(
            &self.current.secret,
            &Signed::V2(tenant),
            session,
            &scope,
            expires_at,
            key_id,
        )
        .map(|m| URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()))
        .unwrap_or_default();
        format!(
            "{}.{expires_at}.{key_id}.{tenant}.{}.{signature}",
            self.current.kid,
            scope.text()
        )
    }

    /// Checks a token against the client's session and the request asked for (`None`: the
    /// session-wide stream, which only a session token opens).
    pub fn verify(
        &self,
        token: &str,
        session: &SessionId,
        request: Option<&RequestId>,
        now: u64,
    ) -> Result<Claims, TokenError> {
        let parts: Vec<&str> = token.split('.').collect();
        let (kid, expires_at, key_id, tenant, token_scope, signature) = match parts.as_slice() {
            [kid, expires_at, key_id, scope, signature] => {
                (kid, expires_at, key_id, None, scope, signature)
            }
            [kid, expires_at, key_id, tenant, scope, signature] => {
                (kid, expires_at, key_id, Some(tenant), scope, signature)
            }
            _ => return Err(TokenError::Malformed),
        };
        let signer = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|s| s.kid == *kid)
            .ok_or(TokenError::UnknownKid)?;
        let expires_at: u64 = expires_at.parse().map_err(|_| TokenError::Malformed)?;
        let scope = Scope::parse(token_scope).ok_or(TokenError::Malformed)?;
        let tenant = match tenant {
            Some(tenant) => TenantId::parse(tenant).map_err(|_| TokenError::Malformed)?,
            None => TenantId::default_tenant(),
        };
        let format = match parts.len() {
            5 => Signed::V1,
            _ => Signed::V2(&tenant),
        };
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let expected = mac(&signer.secret, &format, session, &scope, expires_at, key_id)
            .ok_or(TokenError::BadSignature)?;
        // Constant-time comparison of the MAC.
        expected
            .verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        // A request token opens that request's stream only; a session token opens any stream
        // of the session.
        if let Scope::Request(granted) = scope
            && request != Some(&granted)
        {
            return Err(TokenError::WrongScope);
        }
        Ok(Claims {
            scope,
            key_id: (*key_id).to_owned(),
            tenant,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(kid: &str, secret: &str) -> StreamTokens {
        StreamTokens::new(kid.to_owned(), secret.to_owned().into(), None, 60)
    }

    fn ids() -> Result<(SessionId, SessionId, RequestId, TenantId), stream_schema::IdError> {
        Ok((
            SessionId::parse("alice")?,
            SessionId::parse("bob")?,
            RequestId::new(),
            TenantId::parse("acme")?,
        ))
    }

    #[test]
    fn a_token_opens_its_own_session_and_request() -> Result<(), Box<dyn std::error::Error>> {
        let (alice, _, request, acme) = ids()?;
        let signer = tokens("k1", "s3cret");
        let token = signer.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        let claims = signer.verify(&token, &alice, Some(&request), 1_000)?;
        assert_eq!(claims.key_id, "team-a");
        assert_eq!(claims.tenant, acme);
        assert_eq!(claims.scope, Scope::Request(request));
        let session_token = signer.issue(&acme, &alice, Scope::Session, "team-a", 1_000);
        assert!(
            signer
                .verify(&session_token, &alice, Some(&request), 1_000)
                .is_ok()
        );
        assert!(signer.verify(&session_token, &alice, None, 1_059).is_ok());
        Ok(())
    }

    #[test]
    fn a_request_token_does_not_open_the_session_stream() -> Result<(), Box<dyn std::error::Error>>
    {
        let (alice, _, request, acme) = ids()?;
        let signer = tokens("k1", "s3cret");
        let token = signer.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        assert_eq!(
            signer.verify(&token, &alice, None, 1_000),
            Err(TokenError::WrongScope)
        );
        Ok(())
    }

    #[test]
    fn the_tenant_cannot_be_swapped() -> Result<(), Box<dyn std::error::Error>> {
        let (alice, _, request, acme) = ids()?;
        let signer = tokens("k1", "s3cret");
        let token = signer.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        let swapped = token.replacen(".acme.", ".globex.", 1);
        assert_ne!(swapped, token);
        assert_eq!(
            signer.verify(&swapped, &alice, Some(&request), 1_000),
            Err(TokenError::BadSignature)
        );
        // Dropping the tenant (the old format) does not make it the default tenant's either.
        let parts: Vec<&str> = token.split('.').collect();
        let old_format = format!(
            "{}.{}.{}.{}.{}",
            parts[0], parts[1], parts[2], parts[4], parts[5]
        );
        assert_eq!(
            signer.verify(&old_format, &alice, Some(&request), 1_000),
            Err(TokenError::BadSignature)
        );
        Ok(())
    }

    #[test]
    fn tokens_of_the_earlier_format_are_the_default_tenants()
    -> Result<(), Box<dyn std::error::Error>> {
        let (alice, _, request, _) = ids()?;
        let signer = tokens("k1", "s3cret");
        let expires_at = 1_060;
        let mac = mac(
            &"s3cret".to_owned().into(),
            &Signed::V1,
            &alice,
            &Scope::Request(request),
            expires_at,
            "team-a",
        )
        .ok_or("mac")?;
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        let token = format!("k1.{expires_at}.team-a.{request}.{signature}");
        let claims = signer.verify(&token, &alice, Some(&request), 1_000)?;
        assert!(claims.tenant.is_default());
        Ok(())
    }

    #[test]
    fn other_sessions_requests_and_secrets_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let (alice, bob, request, acme) = ids()?;
        let signer = tokens("k1", "s3cret");
        let token = signer.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        assert_eq!(
            signer.verify(&token, &bob, Some(&request), 1_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer.verify(&token, &alice, Some(&RequestId::new()), 1_000),
            Err(TokenError::WrongScope)
        );
        assert_eq!(
            signer.verify(&token, &alice, Some(&request), 1_060),
            Err(TokenError::Expired)
        );
        let other_secret = tokens("k1", "different");
        assert_eq!(
            other_secret.verify(&token, &alice, Some(&request), 1_000),
            Err(TokenError::BadSignature)
        );
        let other_kid = tokens("k2", "s3cret");
        assert_eq!(
            other_kid.verify(&token, &alice, Some(&request), 1_000),
            Err(TokenError::UnknownKid)
        );
        Ok(())
    }

    #[test]
    fn tampering_with_any_part_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let (alice, _, request, acme) = ids()?;
        let signer = tokens("k1", "s3cret");
        let token = signer.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        let parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let later = (1_000 + 60 + 3_600).to_string();
        let with = |index: usize, value: &str| {
            let mut parts = parts.clone();
            parts[index] = value.to_owned();
            parts.join(".")
        };
        let tampered = [
            with(1, &later),
            with(2, "team-b"),
            with(3, "default"),
            with(4, "*"),
            with(5, "AAAA"),
            format!("{token}x"),
            "garbage".to_owned(),
            String::new(),
        ];
        for bad in tampered {
            assert!(
                signer.verify(&bad, &alice, Some(&request), 1_000).is_err(),
                "{bad}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_rotated_out_secret_still_verifies_its_tokens() -> Result<(), Box<dyn std::error::Error>> {
        let (alice, _, request, acme) = ids()?;
        let old = tokens("k1", "old-secret");
        let token = old.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        let rotated = StreamTokens::new(
            "k2".to_owned(),
            "new-secret".to_owned().into(),
            Some(("k1".to_owned(), "old-secret".to_owned().into())),
            60,
        );
        assert!(
            rotated
                .verify(&token, &alice, Some(&request), 1_000)
                .is_ok()
        );
        let fresh = rotated.issue(&acme, &alice, Scope::Request(request), "team-a", 1_000);
        assert!(fresh.starts_with("k2."));
        Ok(())
    }
}
