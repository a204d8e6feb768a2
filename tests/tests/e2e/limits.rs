//! Rate limits: exact across gateway replicas, honest Retry-After, let in again after the
//! window. The window logic itself, with an injected clock, is tested in the gateway's own
//! tests (`services/gateway/tests/api/limits.rs`).

use std::time::{Duration, Instant};

use serde_json::json;
use stream_schema::{RedisKey, SessionId};
use test_support::wait_until;

use crate::stack::{API_KEY, Stack, StackOptions, TIMEOUT, options, str_field};

async fn start_on(
    stack: &Stack,
    gateway: usize,
    session: String,
    extra: serde_json::Value,
) -> anyhow::Result<reqwest::Response> {
    let mut body =
        json!({"sessionId": session, "modelId": "mock", "prompt": "limited [[mock tokens=10]]"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    Ok(stack
        .http
        .post(format!("{}/api/chat/start", stack.gateways[gateway].url()))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await?)
}

#[tokio::test]
async fn requests_per_window_hold_exactly_across_two_gateways() -> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| {
            s.limits.window_secs = 3;
            s.limits.requests_per_window = 5;
        }),
    )
    .await?;
    let started = Instant::now();
    let attempts = (0..12).map(|i| start_on(&stack, i % 2, format!("s{i}"), json!({})));
    let mut admitted = 0;
    for response in futures::future::join_all(attempts).await {
        let response = response?;
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let retry: u64 = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("429 without Retry-After"))?;
                assert!(
                    (1..=3).contains(&retry),
                    "Retry-After {retry} outside the window"
                );
                let body: serde_json::Value = response.json().await?;
                assert_eq!(body["error"]["code"], "rate_limited");
            }
            other => anyhow::bail!("unexpected status {other}"),
        }
    }
    assert_eq!(
        admitted, 5,
        "exactly the limit is admitted across both replicas"
    );

    // Let in again once the window has passed, not before.
    let http = stack.http.clone();
    let url = format!("{}/api/chat/start", stack.gateways[1].url());
    wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http
                .post(&url)
                .bearer_auth(API_KEY)
                .json(&json!({"sessionId": "again", "modelId": "mock", "prompt": "x [[mock tokens=1]]"}))
                .send()
                .await?;
            Ok((response.status() == 200).then_some(()))
        }
    })
    .await?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "admitted again before the window passed"
    );
    Ok(())
}

#[tokio::test]
async fn a_session_limit_applies_across_keys() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        s.limits.window_secs = 30;
        s.limits.session_requests_per_window = 2;
    }))
    .await?;
    for _ in 0..2 {
        assert_eq!(
            start_on(&stack, 0, "busy".to_owned(), json!({}))
                .await?
                .status()
                .as_u16(),
            200
        );
    }
    let third = stack
        .http
        .post(format!("{}/api/chat/start", stack.gateway()))
        .bearer_auth(crate::stack::OTHER_API_KEY)
        .json(&json!({"sessionId": "busy", "modelId": "mock", "prompt": "x"}))
        .send()
        .await?;
    assert_eq!(third.status().as_u16(), 429);
    // Another session is not affected.
    assert_eq!(
        start_on(&stack, 0, "calm".to_owned(), json!({}))
            .await?
            .status()
            .as_u16(),
        200
    );
    Ok(())
}

#[tokio::test]
async fn token_reservations_are_exact_and_given_back_after_use() -> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| {
            s.limits.window_secs = 60;
            s.limits.tokens_per_window = 100;
        }),
    )
    .await?;
    // maxTokens 30 reserves 30: three fit in 100, the fourth does not, on either gateway.
    let mut started = Vec::new();
    for i in 0..3 {
        let response = start_on(&stack, i % 2, format!("t{i}"), json!({"maxTokens": 30})).await?;
        assert_eq!(response.status().as_u16(), 200);
        started.push(response.json::<serde_json::Value>().await?);
    }
    let fourth = start_on(&stack, 1, "t3".to_owned(), json!({"maxTokens": 30})).await?;
    assert_eq!(fourth.status().as_u16(), 429);
    let retry: u64 = fourth
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // Each used 10 of its 30: once the processor settles them, 60 tokens are free again.
    for body in &started {
        stack.read_all(str_field(body, "streamUrl")?).await?;
    }
    let redis = stack.redis_client().await?;
    let quota = RedisKey::token_quota("test");
    let used = wait_until(TIMEOUT, Duration::from_millis(50), || {
        let (redis, quota) = (redis.clone(), quota.clone());
        async move {
            let fields: std::collections::HashMap<String, i64> =
                fred::prelude::HashesInterface::hgetall(&redis, quota.as_str()).await?;
            let total: i64 = fields.values().sum();
            Ok((total == 30).then_some(total))
        }
    })
    .await?;
    assert_eq!(used, 30);
    let after = start_on(&stack, 0, "t4".to_owned(), json!({"maxTokens": 60})).await?;
    assert_eq!(after.status().as_u16(), 200);
    // maxTokens above the whole limit can never pass: a 400, not a 429 to retry forever.
    let too_big = start_on(&stack, 0, "t5".to_owned(), json!({"maxTokens": 101})).await?;
    assert_eq!(too_big.status().as_u16(), 400);
    let _ = SessionId::parse("unused")?;
    Ok(())
}

#[tokio::test]
async fn a_request_past_its_estimated_reservation_ends_rate_limited() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        s.limits.tokens_per_window = 1000;
        s.limits.default_token_estimate = 5;
        s.limits.hard_token_cap = true;
    }))
    .await?;
    let prompt = "talkative [[mock tokens=20]]";
    let started = stack.start_chat("capped", prompt).await?;
    let events = crate::stack::payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)?;
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["finishReason"], "rate_limited");
    assert_eq!(complete["usage"]["completionTokens"], 5);
    let expected: String =
        mock_llm::text::completion_tokens(&mock_llm::text::prompt_text([prompt]), 0, 5).concat();
    assert_eq!(crate::stack::text_of(&events), expected);

    // With maxTokens the upstream itself stops at it: no cap involved.
    let bounded = stack
        .http
        .post(format!("{}/api/chat/start", stack.gateway()))
        .bearer_auth(API_KEY)
        .json(&json!({"sessionId": "capped", "modelId": "mock", "prompt": prompt, "maxTokens": 8}))
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    let events = crate::stack::payloads(&stack.read_all(str_field(&bounded, "streamUrl")?).await?)?;
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["finishReason"], "length");
    Ok(())
}
