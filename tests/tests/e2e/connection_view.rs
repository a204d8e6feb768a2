//! The shared connection view (`GET /api/sessions/{id}/connections`): a dead gateway's
//! connections leave it after the liveness TTL, and idle connections cost Redis nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use fred::prelude::*;
use serde_json::Value;
use test_support::wait_until;

use crate::stack::{API_KEY, Stack, StackOptions, TIMEOUT, options};

const POLL: Duration = Duration::from_millis(25);

/// The connections `GET /api/sessions/{session}/connections` lists on gateway `index`.
async fn listed(stack: &Stack, index: usize, session: &str) -> anyhow::Result<Vec<Value>> {
    let body: Value = stack
        .http
        .get(format!(
            "{}/api/sessions/{session}/connections",
            stack.gateway_url(index)?
        ))
        .bearer_auth(API_KEY)
        .send()
        .await?
        .json()
        .await?;
    Ok(body["connections"].as_array().cloned().unwrap_or_default())
}

#[tokio::test]
async fn a_killed_gateways_connections_leave_the_view_after_its_liveness_ttl() -> anyhow::Result<()>
{
    let stack = Stack::start(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| {
            s.gateway.connection_heartbeat_secs = 1;
            s.gateway.connection_ttl_secs = 2;
        }),
    )
    .await?;
    let url = stack.session_stream("doomed").await?;
    let _on_a = stack.open(0, &url, &[]).await?;
    let first = wait_until(TIMEOUT, POLL, || async {
        let list = listed(&stack, 0, "doomed").await?;
        Ok((list.len() == 1).then_some(list))
    })
    .await?;
    let _on_b = stack.open(1, &url, &[]).await?;
    wait_until(TIMEOUT, POLL, || async {
        Ok((listed(&stack, 0, "doomed").await?.len() == 2).then_some(()))
    })
    .await?;

    stack.gateways[1].process.sigkill()?;
    // The liveness key lapses within its TTL (2 s) of the last renewal.
    let left = wait_until(Duration::from_secs(4), POLL, || async {
        let list = listed(&stack, 0, "doomed").await?;
        Ok((list.len() == 1).then_some(list))
    })
    .await?;
    assert_eq!(left[0]["gatewayId"], first[0]["gatewayId"]);
    // And the dead gateway's entry is gone from Redis, not only hidden.
    let redis = stack.redis_client().await?;
    let stored: u64 = redis.hlen("llm:conninfo:{doomed}").await?;
    assert_eq!(stored, 1);
    Ok(())
}

/// Commands Redis executed, by name, without the test's own `INFO`.
async fn commands(redis: &Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut calls = test_support::command_calls(redis).await?;
    calls.remove("info");
    Ok(calls)
}

/// The commands a connection view could cost: the old per-connection heartbeat's and the
/// per-gateway records'.
const VIEW_COMMANDS: [&str; 7] = ["hset", "hdel", "set", "zadd", "expire", "exists", "hgetall"];

/// What Redis ran during `window`: every command, and those of [`VIEW_COMMANDS`].
async fn commands_during(redis: &Client, window: Duration) -> anyhow::Result<(u64, u64)> {
    let before = commands(redis).await?;
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(window).await;
    let after = commands(redis).await?;
    let ran =
        |name: &String, calls: &u64| calls.saturating_sub(before.get(name).copied().unwrap_or(0));
    let total = after.iter().map(|(name, calls)| ran(name, calls)).sum();
    let view = after
        .iter()
        .filter(|(name, _)| VIEW_COMMANDS.contains(&name.as_str()))
        .map(|(name, calls)| ran(name, calls))
        .sum();
    Ok((total, view))
}

#[tokio::test]
async fn idle_connections_cost_redis_no_commands() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        // Renewals every second: per-connection heartbeats would cost 50 clients hundreds
        // of commands in the window.
        s.gateway.connection_heartbeat_secs = 1;
        s.gateway.connection_ttl_secs = 3;
        s.gateway.keepalive_secs = 1;
    }))
    .await?;
    let redis = stack.redis_client().await?;
    let mut open = open_idle(&stack, &redis, 0..2).await?;
    let window = Duration::from_secs(4);
    let with_two = commands_during(&redis, window).await?;
    open.extend(open_idle(&stack, &redis, 2..50).await?);
    let with_fifty = commands_during(&redis, window).await?;
    let report = format!(
        "(all, view) commands in {window:?}: {with_two:?} with 2 idle clients, {with_fifty:?} \
         with 50"
    );
    // One renewal per second whatever the clients; the window may catch one more, and the
    // periodic sweep for dead gateways (two commands). 48 more clients renewed one by one
    // would add about 800.
    assert!(with_fifty.1 <= with_two.1 + 4, "{report}");
    // The services' background loops vary from window to window (more so on a loaded
    // machine); per-connection renewals would add hundreds.
    assert!(with_fifty.0 <= with_two.0 * 2 + 40, "{report}");
    assert_eq!(open.len(), 50);
    Ok(())
}

/// Opens an idle session-wide stream for each session `idle-<i>`, each written to the view
/// before the next.
async fn open_idle(
    stack: &Stack,
    redis: &Client,
    sessions: std::ops::Range<usize>,
) -> anyhow::Result<Vec<test_support::SseConnection>> {
    let mut opened = Vec::new();
    for i in sessions {
        let session = format!("idle-{i}");
        let url = stack.session_stream(&session).await?;
        opened.push(stack.open(0, &url, &[]).await?);
        let key = format!("llm:conninfo:{{{session}}}");
        wait_until(TIMEOUT, POLL, || {
            let (redis, key) = (redis.clone(), key.clone());
            async move {
                let stored: u64 = redis.hlen(&key).await?;
                Ok((stored == 1).then_some(()))
            }
        })
        .await?;
    }
    Ok(opened)
}

#[tokio::test]
async fn the_start_answers_connection_id_names_the_connection_of_its_stream_url()
-> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| s.mock_llm.token_delay_ms = 5),
    )
    .await?;
    let started = stack
        .start_chat("named", "a long answer [[mock tokens=5000]]")
        .await?;
    let id = crate::stack::str_field(&started, "connectionId")?;
    let url = crate::stack::str_field(&started, "streamUrl")?;
    assert!(url.contains(&format!("connectionId={id}")), "{url}");
    let ids_listed = |want: usize| {
        let stack = &stack;
        async move {
            wait_until(TIMEOUT, POLL, || async {
                let list = listed(stack, 0, "named").await?;
                let ids: Vec<String> = list
                    .iter()
                    .filter_map(|c| c["connectionId"].as_str().map(str::to_owned))
                    .collect();
                Ok((ids.len() == want).then_some(ids))
            })
            .await
        }
    };

    let first = stack.open(0, url, &[]).await?;
    assert_eq!(ids_listed(1).await?, vec![id.to_owned()]);
    // The same URL in a second tab, on another gateway, while the first is open: its own id.
    let second = stack.open(1, url, &[]).await?;
    let both = ids_listed(2).await?;
    assert!(both.contains(&id.to_owned()), "{both:?}");
    assert!(both.iter().all(|c| c.starts_with("sse_")), "{both:?}");
    // The first reconnects (EventSource reuses the URL) after it closed: the id comes back.
    drop(first);
    ids_listed(1).await?;
    let _again = stack.open(0, url, &[]).await?;
    let after = ids_listed(2).await?;
    assert!(after.contains(&id.to_owned()), "{after:?}");
    drop(second);
    Ok(())
}
