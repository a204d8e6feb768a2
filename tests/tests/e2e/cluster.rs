//! The end-to-end flows on a 3-master Redis Cluster: every multi-key command must stay in one
//! slot and the gateway's reader must read per slot. Chat, late join, resume, fan-out, replicas
//! and cancel, producer failover, rate limits and analytics counters.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use test_support::{SseClient, wait_until};

use crate::stack::{
    API_KEY, RedisSource, Stack, StackOptions, TIMEOUT, expected_text, options, payloads,
    str_field, text_of,
};

fn on_cluster(options: StackOptions) -> StackOptions {
    StackOptions {
        redis: RedisSource::Cluster,
        ..options
    }
}

#[tokio::test]
async fn chats_stream_resume_and_fan_out_on_a_cluster() -> anyhow::Result<()> {
    let stack = Stack::start(on_cluster(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| s.mock_llm.token_delay_ms = 3),
    ))
    .await?;
    // Several sessions, so their streams land in different slots and nodes.
    let mut chats = Vec::new();
    for i in 0..6 {
        let prompt = format!("cluster story {i} [[mock tokens=40]]");
        let started = stack.start_chat(&format!("c-session-{i}"), &prompt).await?;
        chats.push((prompt, started));
    }
    for (i, (prompt, started)) in chats.iter().enumerate() {
        let url = format!(
            "{}{}",
            stack.gateways[i % 2].url(),
            str_field(started, "streamUrl")?
        );
        // Fan-out: three clients per chat, on alternating gateways.
        let readers = (0..3).map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                SseClient::connect(&url, &[])
                    .await?
                    .collect_to_end(TIMEOUT)
                    .await
            })
        });
        let mut results = Vec::new();
        for result in futures::future::join_all(readers).await {
            results.push(result??);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        let events = payloads(&results[0])?;
        assert_eq!(text_of(&events), expected_text(prompt, 40));

        // Resume from the middle on the other gateway: exactly the rest.
        let middle = results[0][20].id.clone().unwrap_or_default();
        let rest = stack
            .open(
                (i + 1) % 2,
                str_field(started, "streamUrl")?,
                &[("Last-Event-ID", middle.as_str())],
            )
            .await?
            .collect_to_end(TIMEOUT)
            .await?;
        assert_eq!(rest, results[0][21..].to_vec());
    }
    Ok(())
}

#[tokio::test]
async fn cancel_across_gateways_and_a_session_watcher_on_a_cluster() -> anyhow::Result<()> {
    let stack = Stack::start(on_cluster(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| s.mock_llm.token_delay_ms = 5),
    ))
    .await?;
    let watch_url = stack.session_stream("watched").await?;
    let mut watcher = stack.open(1, &watch_url, &[]).await?;
    let started = stack
        .start_chat("watched", "a long one [[mock tokens=3000]]")
        .await?;
    let mut first = Vec::new();
    while first.len() < 6 {
        first.extend(watcher.next_event(TIMEOUT).await?);
    }
    assert_eq!(
        stack.cancel(1, str_field(&started, "requestId")?).await?,
        202
    );
    let rest = watcher
        .collect_until(TIMEOUT, |e| e.data.contains("\"complete\""))
        .await?;
    let last = rest
        .last()
        .map(|e| e.json())
        .transpose()?
        .unwrap_or_default();
    assert_eq!(last["finishReason"], "cancelled");
    Ok(())
}

#[tokio::test]
async fn a_killed_producer_is_taken_over_on_a_cluster() -> anyhow::Result<()> {
    let stack = Stack::start(on_cluster(
        StackOptions {
            producers: 2,
            ..options()
        }
        .with_settings(|s| {
            s.mock_llm.token_delay_ms = 10;
            s.producer.lease_ms = 1500;
            s.producer.lease_renew_ms = 300;
            s.producer.reclaim_interval_ms = 300;
        }),
    ))
    .await?;
    let prompt = "survive a crash [[mock tokens=200]]";
    let started = stack.start_chat("failover", prompt).await?;
    let mut client = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    let mut events = Vec::new();
    while events.len() < 20 {
        events.extend(client.next_event(TIMEOUT).await?);
    }
    // Kill whichever producer streams it: both, in turn, if needed — the first with tokens.
    let busy = wait_until(TIMEOUT, Duration::from_millis(50), || {
        let http = stack.http.clone();
        let urls: Vec<String> = stack
            .producers
            .iter()
            .map(|p| format!("{}/metrics", p.url()))
            .collect();
        async move {
            for (index, url) in urls.iter().enumerate() {
                let text = http.get(url).send().await?.text().await?;
                if text.contains("producer_jobs_claimed_total{claim=\"new\"} 1") {
                    return Ok(Some(index));
                }
            }
            Ok(None)
        }
    })
    .await?;
    stack.producers[busy].process.sigkill()?;
    events.extend(client.collect_to_end(Duration::from_secs(60)).await?);
    let json = payloads(&events)?;
    let restart = json
        .iter()
        .rposition(|e| e["type"] == "restart")
        .ok_or_else(|| anyhow::anyhow!("no restart event"))?;
    assert_eq!(json[restart]["attempt"], 2);
    assert_eq!(text_of(&json[restart..]), expected_text(prompt, 200));
    assert_eq!(
        json.last().map(|e| e["type"].clone()),
        Some(json!("complete"))
    );
    Ok(())
}

#[tokio::test]
async fn rate_limits_and_counters_hold_on_a_cluster() -> anyhow::Result<()> {
    let stack = Stack::start(on_cluster(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| {
            s.limits.window_secs = 30;
            s.limits.requests_per_window = 4;
        }),
    ))
    .await?;
    let mut admitted = Vec::new();
    let mut refused = 0;
    for i in 0..7 {
        let response = stack
            .http
            .post(format!("{}/api/chat/start", stack.gateways[i % 2].url()))
            .bearer_auth(API_KEY)
            .json(&json!({"sessionId": "limited", "modelId": "mock", "prompt": format!("n{i} [[mock tokens=3]]")}))
            .send()
            .await?;
        match response.status().as_u16() {
            200 => admitted.push(response.json::<serde_json::Value>().await?),
            429 => refused += 1,
            other => anyhow::bail!("unexpected {other}"),
        }
    }
    assert_eq!((admitted.len(), refused), (4, 3));
    for body in &admitted {
        stack.read_all(str_field(body, "streamUrl")?).await?;
    }
    // The processor's per-session counters (one shard, one slot) are exact.
    let redis = stack.redis_client().await?;
    let session = stream_schema::SessionId::parse("limited")?;
    let shard = stream_schema::keys::event_shard_of(&session, 4);
    let key = stream_schema::RedisKey::session_stats(shard, &session);
    let stats = wait_until(TIMEOUT, Duration::from_millis(50), || {
        let (redis, key) = (redis.clone(), key.clone());
        async move {
            let stats: HashMap<String, i64> =
                fred::prelude::HashesInterface::hgetall(&redis, key.as_str()).await?;
            Ok((stats.get("finished") == Some(&4)).then_some(stats))
        }
    })
    .await?;
    assert_eq!(stats.get("requests"), Some(&4));
    assert_eq!(stats.get("tokens_streamed"), Some(&12));
    Ok(())
}

/// `XREAD` calls on every node of the stack's cluster so far.
async fn xreads(stack: &Stack) -> anyhow::Result<u64> {
    let test_support::StackRedis::Cluster(cluster) = &stack.redis else {
        anyhow::bail!("not a cluster stack");
    };
    let mut calls = 0;
    for port in cluster.ports() {
        let node = test_support::connect_client(&format!("redis://127.0.0.1:{port}")).await?;
        calls += test_support::command_calls(&node)
            .await?
            .get("xread")
            .copied()
            .unwrap_or(0);
    }
    Ok(calls)
}

#[tokio::test]
async fn an_idle_cluster_gateway_costs_almost_nothing_and_tokens_come_on_wake_ups()
-> anyhow::Result<()> {
    let stack = Stack::start(on_cluster(options().with_settings(|s| {
        // Only announcements can bring tokens promptly: the safety round is a minute away.
        s.gateway.reader_sweep_ms = 60_000;
        s.mock_llm.token_delay_ms = 2;
    })))
    .await?;
    // Idle watchers on twenty sessions, spread over slots and nodes.
    let mut watchers = Vec::new();
    for i in 0..20 {
        let url = stack.session_stream(&format!("quiet-{i}")).await?;
        watchers.push(stack.open(0, &url, &[]).await?);
    }
    let before = xreads(&stack).await?;
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = xreads(&stack).await?.saturating_sub(before);
    // Polling every 5 ms (before wake-ups) cost 6,629 reads in this window; the announcements
    // leave nothing to read.
    assert!(idle <= 20, "{idle} XREADs in 3 s with 20 idle streams");

    // A chat on a watched session: every token arrives, on announcements alone.
    let began = std::time::Instant::now();
    let prompt = "wake me [[mock tokens=60]]";
    stack.start_chat("quiet-7", prompt).await?;
    let events = watchers[7]
        .collect_until(TIMEOUT, |e| e.data.contains("\"complete\""))
        .await?;
    let took = began.elapsed();
    assert_eq!(text_of(&payloads(&events)?), expected_text(prompt, 60));
    assert!(took < Duration::from_secs(5), "the answer took {took:?}");
    Ok(())
}
