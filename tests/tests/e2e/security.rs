//! Only the right client sees a session: API keys, stream tokens, CORS.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;

use crate::stack::{OTHER_API_KEY, Stack, TIMEOUT, options, str_field};

/// A token signed like the gateway does, with the stack's shared secret: lets tests make
/// tokens the gateway would never issue (expired, for a revoked key).
fn forge(
    secret: &str,
    kid: &str,
    session: &str,
    scope: &str,
    expires_at: u64,
    key_id: &str,
) -> anyhow::Result<String> {
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    mac.update(format!("v1\n{session}\n{scope}\n{expires_at}\n{key_id}").as_bytes());
    let signature =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{kid}.{expires_at}.{key_id}.{scope}.{signature}"))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn status_of(stack: &Stack, path: &str) -> anyhow::Result<u16> {
    Ok(stack
        .http
        .get(format!("{}{path}", stack.gateway()))
        .send()
        .await?
        .status()
        .as_u16())
}

#[tokio::test]
async fn stream_tokens_open_only_their_own_session_and_request() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let alice = stack
        .start_chat("alice", "secret plans [[mock tokens=3]]")
        .await?;
    let request = str_field(&alice, "requestId")?;
    let token = str_field(&alice, "streamToken")?;
    assert!(str_field(&alice, "streamUrl")?.contains(token));

    // The token works for its own request, in the query or as a bearer token.
    assert_eq!(
        status_of(&stack, str_field(&alice, "streamUrl")?).await?,
        200
    );
    let bearer = stack
        .open(
            0,
            &format!("/api/sse/stream/alice?requestId={request}"),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await?
        .collect_to_end(TIMEOUT)
        .await?;
    assert_eq!(bearer.len(), 5);

    // No token, another session, another request, tampered, expired, foreign secret.
    let mallory = stack.start_chat("mallory", "hi [[mock tokens=1]]").await?;
    let mallory_request = str_field(&mallory, "requestId")?;
    let expired = forge(
        "e2e-shared-secret",
        "k1",
        "alice",
        request,
        now_secs() - 1,
        "test",
    )?;
    let foreign = forge(
        "not-our-secret",
        "k1",
        "alice",
        request,
        now_secs() + 600,
        "test",
    )?;
    let unknown_kid = forge(
        "e2e-shared-secret",
        "k9",
        "alice",
        request,
        now_secs() + 600,
        "test",
    )?;
    let mut tampered = token.to_owned();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let refused = [
        (format!("/api/sse/stream/alice?requestId={request}"), 401),
        (format!("/api/sse/stream/bob?token={token}"), 401),
        (
            format!("/api/sse/stream/alice?requestId={mallory_request}&token={token}"),
            403,
        ),
        (
            format!("/api/sse/stream/alice?requestId={request}&token={tampered}"),
            401,
        ),
        (
            format!("/api/sse/stream/alice?requestId={request}&token={expired}"),
            401,
        ),
        (
            format!("/api/sse/stream/alice?requestId={request}&token={foreign}"),
            401,
        ),
        (
            format!("/api/sse/stream/alice?requestId={request}&token={unknown_kid}"),
            401,
        ),
        (
            format!("/api/sse/stream/alice?requestId={request}&token=garbage"),
            401,
        ),
    ];
    for (path, status) in refused {
        let response = stack
            .http
            .get(format!("{}{path}", stack.gateway()))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: serde_json::Value = response.json().await?;
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn a_token_of_a_key_that_is_not_configured_is_refused() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let alice = stack.start_chat("alice", "hello [[mock tokens=2]]").await?;
    let request = str_field(&alice, "requestId")?;
    // Correctly signed, but for a key id the gateway does not know (revoked or never issued).
    let revoked = forge(
        "e2e-shared-secret",
        "k1",
        "alice",
        request,
        now_secs() + 600,
        "revoked",
    )?;
    let status = status_of(
        &stack,
        &format!("/api/sse/stream/alice?requestId={request}&token={revoked}"),
    )
    .await?;
    assert_eq!(status, 403);
    Ok(())
}

#[tokio::test]
async fn api_calls_need_a_valid_key_and_keys_do_not_share_requests() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let url = format!("{}/api/chat/start", stack.gateway());
    let body = json!({"sessionId": "s", "modelId": "mock", "prompt": "x"});
    let anonymous = stack.http.post(&url).json(&body).send().await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    let wrong = stack
        .http
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&body)
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    let error: serde_json::Value = wrong.json().await?;
    assert_eq!(error["error"]["code"], "unauthorized");

    // A chat started with one key cannot be cancelled with another: it looks unknown.
    let started = stack
        .start_chat("s", "long [[mock tokens=500 delay_ms=5]]")
        .await?;
    let request = str_field(&started, "requestId")?;
    let other = stack
        .http
        .post(format!("{}/api/chat/{request}/cancel", stack.gateway()))
        .bearer_auth(OTHER_API_KEY)
        .send()
        .await?;
    assert_eq!(other.status().as_u16(), 404);
    let no_key = stack
        .http
        .post(format!("{}/api/chat/{request}/cancel", stack.gateway()))
        .send()
        .await?;
    assert_eq!(no_key.status().as_u16(), 401);
    assert_eq!(stack.cancel(0, request).await?, 202);

    let listing = stack
        .http
        .get(format!("{}/api/sessions/s/connections", stack.gateway()))
        .send()
        .await?;
    assert_eq!(listing.status().as_u16(), 401);
    Ok(())
}

#[tokio::test]
async fn cors_headers_only_for_configured_origins() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        s.gateway.cors_allowed_origins = vec!["https://chat.example.com".to_owned()]
    }))
    .await?;
    let preflight = |origin: &'static str| {
        stack
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/chat/start", stack.gateway()),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://chat.example.com").await?;
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://chat.example.com")
    );
    let denied = preflight("https://evil.example.net").await?;
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // Without configured origins there are no CORS headers at all.
    let plain = crate::stack::start().await?;
    let response = plain
        .http
        .get(format!("{}/api/models", plain.gateway()))
        .header("Origin", "https://chat.example.com")
        .send()
        .await?;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    Ok(())
}

#[tokio::test]
async fn the_demo_page_sends_security_headers() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let page = stack
        .http
        .get(format!("{}/", stack.gateway()))
        .send()
        .await?;
    assert_eq!(page.status().as_u16(), 200);
    let headers = page.headers();
    assert_eq!(
        headers
            .get("x-content-type-options")
            .and_then(|v| v.to_str().ok()),
        Some("nosniff")
    );
    assert_eq!(
        headers.get("x-frame-options").and_then(|v| v.to_str().ok()),
        Some("DENY")
    );
    assert!(headers.get("content-security-policy").is_some());
    Ok(())
}
