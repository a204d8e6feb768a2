//! The seed's flow: start a chat, watch the tokens arrive over SSE, completion with usage;
//! late clients; input errors; analytics counters.

use std::collections::HashMap;

use serde_json::json;
use test_support::wait_until;

use crate::stack::{TIMEOUT, expected_text, payloads, str_field, text_of};

#[tokio::test]
async fn a_chat_streams_the_deterministic_text_in_order() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let prompt = "Tell me a story about a dragon [[mock tokens=25]]";
    let started = stack.start_chat("user_123", prompt).await?;
    assert_eq!(started["status"], "connected");
    assert_eq!(started["sessionId"], "user_123");
    assert_eq!(started["modelId"], "mock");
    assert!(str_field(&started, "connectionId")?.starts_with("sse_"));
    let request_id = str_field(&started, "requestId")?;

    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    assert_eq!(connection.header("content-type"), Some("text/event-stream"));
    assert_eq!(connection.header("cache-control"), Some("no-cache"));
    assert_eq!(connection.header("x-accel-buffering"), Some("no"));
    let events = connection.collect_to_end(TIMEOUT).await?;
    let events_json = payloads(&events)?;

    assert_eq!(
        events_json.first().map(|e| &e["type"]),
        Some(&json!("start"))
    );
    assert_eq!(events_json[0]["attempt"], 1);
    let sequences: Vec<u64> = events_json
        .iter()
        .filter(|e| e["type"] == "token")
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert_eq!(sequences, (1..=25).collect::<Vec<_>>());
    assert_eq!(text_of(&events_json), expected_text(prompt, 25));
    let complete = events_json.last().cloned().unwrap_or_default();
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["finishReason"], "stop");
    assert_eq!(complete["usage"]["completionTokens"], 25);
    assert_eq!(complete["usage"]["source"], "upstream");
    assert!(complete["usage"]["promptTokens"].as_u64().unwrap_or(0) > 0);
    assert!(events_json.iter().all(|e| e["requestId"] == request_id));

    // Every SSE id is the Redis entry id, strictly increasing.
    let ids: Vec<String> = events.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), events.len());
    let parsed: Vec<stream_schema::EntryId> = ids
        .iter()
        .map(|id| stream_schema::EntryId::parse(id))
        .collect::<Result<_, _>>()?;
    assert!(parsed.windows(2).all(|w| w[0] < w[1]));
    Ok(())
}

#[tokio::test]
async fn a_late_client_receives_the_same_events() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let started = stack
        .start_chat("late", "Late joiners [[mock tokens=10]]")
        .await?;
    let url = str_field(&started, "streamUrl")?;
    let first = stack.read_all(url).await?;
    // The request is over: a client arriving now still gets all of it, from `start`.
    let second = stack.read_all(url).await?;
    assert_eq!(first, second);
    assert_eq!(payloads(&second)?.len(), 12);
    Ok(())
}

#[tokio::test]
async fn messages_are_accepted_instead_of_a_prompt() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let (status, body) = stack
        .post_start(
            0,
            &json!({"sessionId": "m", "modelId": "gpt-4", "maxTokens": 7, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"}
            ]}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let events = payloads(&stack.read_all(str_field(&body, "streamUrl")?).await?)?;
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["finishReason"], "length");
    assert_eq!(complete["usage"]["completionTokens"], 7);
    let expected = mock_llm::text::completion_tokens(
        &mock_llm::text::prompt_text(["Be brief.", "Hello there"]),
        0,
        7,
    )
    .concat();
    assert_eq!(text_of(&events), expected);
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_the_spec_json_errors() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let url = format!("{}/api/chat/start", stack.gateway());
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed json",
            "{\"sessionId\":".to_owned(),
            400,
            "invalid_json",
        ),
        (
            "bad session id",
            json!({"sessionId": "a}b", "modelId": "mock", "prompt": "x"}).to_string(),
            400,
            "invalid_session_id",
        ),
        (
            "unknown model",
            json!({"sessionId": "s", "modelId": "nope", "prompt": "x"}).to_string(),
            404,
            "unknown_model",
        ),
        (
            "empty prompt",
            json!({"sessionId": "s", "modelId": "mock", "prompt": "  "}).to_string(),
            400,
            "invalid_request",
        ),
        (
            "no prompt",
            json!({"sessionId": "s", "modelId": "mock"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            "wrong type",
            json!({"sessionId": 5, "modelId": "mock", "prompt": "x"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            "body over 1 MiB",
            json!({"sessionId": "s", "modelId": "mock", "prompt": "x".repeat(1_100_000)})
                .to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = stack
            .http
            .post(&url)
            .bearer_auth(crate::stack::API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let error: serde_json::Value = response.json().await?;
        assert_eq!(error["error"]["code"], code, "{name}: {error}");
        assert!(error["error"]["message"].is_string(), "{name}");
    }
    // Nothing was queued for any of them.
    let redis = stack.redis_client().await?;
    let queued: u64 = fred::prelude::StreamsInterface::xlen(&redis, "llm:requests").await?;
    assert_eq!(queued, 0);

    let unknown = stack
        .http
        .get(format!(
            "{}/api/sse/stream/s?requestId=not-a-uuid",
            stack.gateway()
        ))
        .send()
        .await?;
    assert_eq!(unknown.status().as_u16(), 400);
    assert_eq!(
        stack
            .cancel(0, "01a213d6-926b-7493-91b3-6a476fcecada")
            .await?,
        404
    );
    let nowhere = stack
        .http
        .get(format!("{}/nowhere", stack.gateway()))
        .send()
        .await?;
    assert_eq!(nowhere.status().as_u16(), 404);
    let body: serde_json::Value = nowhere.json().await?;
    assert_eq!(body["error"]["code"], "not_found");
    Ok(())
}

#[tokio::test]
async fn the_processor_counts_requests_and_tokens() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    for prompt in ["one [[mock tokens=5]]", "two [[mock tokens=7]]"] {
        let started = stack.start_chat("counted", prompt).await?;
        stack.read_all(str_field(&started, "streamUrl")?).await?;
    }
    let redis = stack.redis_client().await?;
    let shard =
        stream_schema::keys::event_shard_of(&stream_schema::SessionId::parse("counted")?, 4);
    let key =
        stream_schema::RedisKey::session_stats(shard, &stream_schema::SessionId::parse("counted")?);
    let stats = wait_until(TIMEOUT, std::time::Duration::from_millis(50), || {
        let redis = redis.clone();
        let key = key.clone();
        async move {
            let stats: HashMap<String, i64> =
                fred::prelude::HashesInterface::hgetall(&redis, key.as_str()).await?;
            Ok((stats.get("finished") == Some(&2)).then_some(stats))
        }
    })
    .await?;
    assert_eq!(stats.get("requests"), Some(&2));
    assert_eq!(stats.get("tokens_streamed"), Some(&12));
    assert_eq!(stats.get("completion_tokens"), Some(&12));
    assert_eq!(stats.get("finish:stop"), Some(&2));
    Ok(())
}

#[tokio::test]
async fn a_retried_start_with_the_same_idempotency_key_starts_nothing_new() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let url = format!("{}/api/chat/start", stack.gateway());
    let body = json!({"sessionId": "idem", "modelId": "mock", "prompt": "once [[mock tokens=3]]"});
    let send = |idempotency_key: &'static str, body: serde_json::Value| {
        stack
            .http
            .post(&url)
            .bearer_auth(crate::stack::API_KEY)
            .header("Idempotency-Key", idempotency_key)
            .json(&body)
            .send()
    };
    let first: serde_json::Value = send("order-42", body.clone()).await?.json().await?;
    let again = send("order-42", body.clone()).await?;
    assert_eq!(again.status().as_u16(), 200);
    let again: serde_json::Value = again.json().await?;
    assert_eq!(again["requestId"], first["requestId"]);
    assert_eq!(again["streamUrl"], first["streamUrl"]);

    // Same key, another body: refused. Another key: a new request.
    let other_body = json!({"sessionId": "idem", "modelId": "mock", "prompt": "twice"});
    let conflict = send("order-42", other_body).await?;
    assert_eq!(conflict.status().as_u16(), 409);
    let error: serde_json::Value = conflict.json().await?;
    assert_eq!(error["error"]["code"], "idempotency_conflict");
    let fresh: serde_json::Value = send("order-43", body).await?.json().await?;
    assert_ne!(fresh["requestId"], first["requestId"]);

    // Exactly two jobs were queued (order-42 once, order-43 once).
    let redis = stack.redis_client().await?;
    let started = wait_until(TIMEOUT, std::time::Duration::from_millis(50), || {
        let redis = redis.clone();
        async move {
            let finished: Option<i64> = fred::prelude::HashesInterface::hget(
                &redis,
                stream_schema::RedisKey::session_stats(
                    stream_schema::keys::event_shard_of(
                        &stream_schema::SessionId::parse("idem")?,
                        4,
                    ),
                    &stream_schema::SessionId::parse("idem")?,
                )
                .as_str(),
                "requests",
            )
            .await?;
            Ok((finished == Some(2)).then_some(()))
        }
    })
    .await;
    started?;
    Ok(())
}
