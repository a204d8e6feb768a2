//! Observability and the Redis-down story: metrics after a chat, fast 503s and readiness while
//! Redis is down, recovery without restarting anything, and the interrupted client resuming.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use fred::prelude::*;
use serde_json::json;
use test_support::{metric_sample, wait_until};

use crate::stack::{
    API_KEY, RedisSource, Stack, StackOptions, TIMEOUT, expected_text, options, payloads,
    str_field, text_of,
};

const POLL: Duration = Duration::from_millis(50);

/// Waits until the gateway, producer and processor all answer `/readyz` with `status`; on a
/// timeout, names the service and shows its `/readyz` body and log tail.
async fn every_service_reports(stack: &Stack, status: u16, within: Duration) -> anyhow::Result<()> {
    for service in [
        &stack.gateways[0],
        &stack.producers[0],
        &stack.processors[0],
    ] {
        let ready = format!("{}/readyz", service.url());
        let http = stack.http.clone();
        let reached = wait_until(within, POLL, || {
            let (http, ready) = (http.clone(), ready.clone());
            async move { Ok((http.get(&ready).send().await?.status() == status).then_some(())) }
        })
        .await;
        if let Err(error) = reached {
            let body = stack.http.get(&ready).send().await?.text().await?;
            anyhow::bail!(
                "{} never answered {status}: {error}; /readyz: {body}\n{}",
                service.process.name(),
                service.process.log_tail(20).await
            );
        }
    }
    Ok(())
}

/// Every service's `/metrics` has `service_ready` and `redis_connected` at `value`.
async fn readiness_gauges_read(stack: &Stack, value: f64) -> anyhow::Result<()> {
    for service in [
        &stack.gateways[0],
        &stack.producers[0],
        &stack.processors[0],
    ] {
        let metrics = scrape(stack, service.url()).await?;
        for gauge in ["service_ready", "redis_connected"] {
            assert_eq!(
                metric_sample(&metrics, gauge),
                Some(value),
                "{gauge} of {}",
                service.process.name()
            );
        }
    }
    Ok(())
}

async fn scrape(stack: &Stack, url: String) -> anyhow::Result<String> {
    Ok(stack
        .http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

#[tokio::test]
async fn metrics_count_a_chat_on_every_service() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let prompt = "measure me [[mock tokens=12]]";
    let started = stack.start_chat("metered", prompt).await?;
    let events = payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)?;
    assert_eq!(text_of(&events), expected_text(prompt, 12));

    let gateway = scrape(&stack, stack.gateway()).await?;
    assert_eq!(
        metric_sample(&gateway, "gateway_chats_started_total{outcome=\"started\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&gateway, "gateway_tokens_delivered_total"),
        Some(12.0)
    );
    assert_eq!(
        metric_sample(&gateway, "gateway_events_delivered_total"),
        Some(14.0)
    );
    assert_eq!(
        metric_sample(&gateway, "gateway_token_delivery_lag_seconds_count"),
        Some(12.0)
    );
    assert!(gateway.contains("gateway_token_delivery_lag_seconds_bucket{le=\"0.005\"}"));

    let producer_url = stack.producers[0].url();
    let producer = wait_until(TIMEOUT, POLL, || {
        let url = producer_url.clone();
        let stack = &stack;
        async move {
            let text = scrape(stack, url).await?;
            Ok(
                metric_sample(&text, "producer_requests_total{outcome=\"stop\"}")
                    .is_some_and(|v| v == 1.0)
                    .then_some(text),
            )
        }
    })
    .await?;
    assert_eq!(
        metric_sample(&producer, "producer_tokens_total"),
        Some(12.0)
    );
    assert_eq!(
        metric_sample(&producer, "producer_time_to_first_token_seconds_count"),
        Some(1.0)
    );
    // The bridge's own share of the request (total minus upstream wait) is measured too.
    assert_eq!(
        metric_sample(&producer, "producer_overhead_seconds_count"),
        Some(1.0)
    );

    // Autoscaling signals: nothing generating once the worker is gone, and the job stream's
    // group (read every `producer::backlog::EVERY`) has nothing pending or undelivered.
    let producer_url = stack.producers[0].url();
    wait_until(TIMEOUT, POLL, || {
        let url = producer_url.clone();
        let stack = &stack;
        async move {
            let text = scrape(stack, url).await?;
            let gauges = (
                metric_sample(&text, "producer_in_flight"),
                metric_sample(&text, "producer_group_pending"),
                metric_sample(&text, "producer_group_lag"),
            );
            Ok((gauges == (Some(0.0), Some(0.0), Some(0.0))).then_some(()))
        }
    })
    .await
    .context("producer_in_flight, producer_group_pending and producer_group_lag at 0")?;

    // Without trace export, records carry no trace context (no cost, no extra field).
    let redis = stack.redis_client().await?;
    for shard in 0..4 {
        let key = stream_schema::RedisKey::events_shard(shard);
        let entries: Vec<(String, HashMap<String, String>)> =
            redis.xrange(key.as_str(), "-", "+", None).await?;
        for (id, fields) in entries {
            assert!(
                !fields.contains_key("tp"),
                "record {id} of shard {shard}: {fields:?}"
            );
        }
    }

    let processor_url = stack.processors[0].url();
    wait_until(TIMEOUT, POLL, || {
        let url = processor_url.clone();
        let stack = &stack;
        async move {
            let text = scrape(stack, url).await?;
            // started + one tokens record + finished.
            Ok(
                (metric_sample(&text, "processor_records_total{outcome=\"applied\"}") == Some(3.0))
                    .then_some(()),
            )
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn redis_down_fails_fast_and_everything_recovers_without_a_restart() -> anyhow::Result<()> {
    let mut stack = Stack::start(
        StackOptions {
            redis: RedisSource::Durable,
            ..options()
        }
        .with_settings(|s| {
            s.mock_llm.token_delay_ms = 20;
            s.producer.lease_ms = 2000;
            s.producer.lease_renew_ms = 500;
            s.producer.reclaim_interval_ms = 500;
        }),
    )
    .await?;
    let prompt = "through the outage [[mock tokens=150]]";
    let started = stack.start_chat("outage", prompt).await?;
    let url = str_field(&started, "streamUrl")?.to_owned();
    let mut client = stack.open(0, &url, &[]).await?;
    let mut received = Vec::new();
    while received.len() < 10 {
        received.extend(client.next_event(TIMEOUT).await?);
    }

    stack.redis.stop().await?;

    // API calls answer 503 quickly.
    let began = Instant::now();
    let response = stack
        .http
        .post(format!("{}/api/chat/start", stack.gateway()))
        .bearer_auth(API_KEY)
        .json(&json!({"sessionId": "outage", "modelId": "mock", "prompt": "x"}))
        .send()
        .await?;
    let took = began.elapsed();
    assert_eq!(response.status().as_u16(), 503);
    assert!(took <= Duration::from_secs(2), "503 took {took:?}");
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"]["code"], "unavailable");

    // Every service says it is not ready, and its metrics say so too (what the alerts read:
    // a scrape still succeeds, and no traffic is needed).
    every_service_reports(&stack, 503, Duration::from_secs(10)).await?;
    readiness_gauges_read(&stack, 0.0).await?;

    // The open stream ends (with a retryable error event, or just closes) so the client resumes.
    let rest = client.collect_to_end(Duration::from_secs(15)).await?;
    if let Some(last) = rest.last() {
        let last = last.json()?;
        if last["type"] == "error" {
            assert_eq!(last["retryable"], true, "{last}");
        }
    }
    received.extend(rest.into_iter().filter(|e| e.id.is_some()));

    stack.redis.restart().await?;

    // Recovery by themselves: ready again, a new chat works end to end.
    every_service_reports(&stack, 200, Duration::from_secs(20)).await?;
    readiness_gauges_read(&stack, 1.0).await?;
    let after_prompt = "after the outage [[mock tokens=8]]";
    let after = stack.start_chat("recovered", after_prompt).await?;
    let after_events = payloads(&stack.read_all(str_field(&after, "streamUrl")?).await?)?;
    assert_eq!(text_of(&after_events), expected_text(after_prompt, 8));

    // The interrupted client resumes from its last event and gets the request to its end
    // (a producer takes the job over after its lease: `restart`, then the whole answer).
    let last_id = received
        .last()
        .and_then(|e| e.id.clone())
        .ok_or_else(|| anyhow::anyhow!("no event received before the outage"))?;
    let resumed = stack
        .open(0, &url, &[("Last-Event-ID", last_id.as_str())])
        .await?
        .collect_to_end(Duration::from_secs(60))
        .await?;
    let resumed_json = payloads(&resumed)?;
    let last = resumed_json.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "complete", "{resumed_json:?}");
    let mut all = payloads(&received)?;
    all.extend(resumed_json);
    // The text of the final attempt: everything after the last `restart`.
    let final_attempt: Vec<serde_json::Value> =
        match all.iter().rposition(|e| e["type"] == "restart") {
            Some(index) => all[index..].to_vec(),
            None => all,
        };
    assert_eq!(text_of(&final_attempt), expected_text(prompt, 150));
    Ok(())
}

/// Redis comes back empty (restarted without persistence): the consumer groups are gone. Every
/// service recreates what it needs from the beginning of the stream, readiness says 503 until
/// then, and every chat started afterwards completes and is counted: no job is skipped, even
/// one enqueued before the producer noticed.
#[tokio::test]
async fn redis_back_empty_recreates_the_groups_and_skips_no_job() -> anyhow::Result<()> {
    let mut stack = crate::stack::start().await?;
    let warm = stack
        .start_chat("before", "warm up [[mock tokens=4]]")
        .await?;
    stack.read_all(str_field(&warm, "streamUrl")?).await?;

    stack.redis.stop().await?;
    every_service_reports(&stack, 503, Duration::from_secs(10)).await?;
    // Not durable: it starts with an empty data set on the same port.
    stack.redis.restart().await?;

    // Start chats as soon as the gateway takes them, before the producer and processor have
    // recreated their groups: the jobs wait in a stream whose group does not exist yet.
    let prompt = "after the wipe [[mock tokens=6]]";
    let mut started = Vec::new();
    while started.len() < 3 {
        let chat = wait_until(Duration::from_secs(20), POLL, || async {
            let (status, body) = stack
                .post_start(
                    0,
                    &json!({"sessionId": "after", "modelId": "mock", "prompt": prompt}),
                )
                .await?;
            match status {
                200 => Ok(Some(body)),
                503 => Ok(None),
                other => anyhow::bail!("start answered {other}: {body}"),
            }
        })
        .await
        .context("the gateway never took a chat")?;
        started.push(chat);
    }
    for chat in &started {
        let events = payloads(&stack.read_all(str_field(chat, "streamUrl")?).await?)?;
        assert_eq!(text_of(&events), expected_text(prompt, 6));
    }
    every_service_reports(&stack, 200, Duration::from_secs(20)).await?;
    // The processor's recreated group read every record from the start.
    let url = format!("{}/api/analytics/sessions/after", stack.gateway());
    let http = stack.http.clone();
    wait_until(Duration::from_secs(20), POLL, || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body: serde_json::Value = http
                .get(&url)
                .bearer_auth(API_KEY)
                .send()
                .await?
                .json()
                .await?;
            Ok((body["totals"]["requests"].as_u64() == Some(3)
                && body["totals"]["finished"].as_u64() == Some(3))
            .then_some(()))
        }
    })
    .await
    .context("the processor did not count the chats started after the wipe")?;
    Ok(())
}

/// Threads of process `pid` whose name starts with `prefix` (Linux: `/proc/<pid>/task`).
fn threads_named(pid: u32, prefix: &str) -> anyhow::Result<usize> {
    let mut count = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm"))?;
        if comm.starts_with(prefix) {
            count += 1;
        }
    }
    Ok(count)
}

/// A chat streams through `stack`, whose gateway runs `threads` HTTP workers and whose
/// producer runs `threads` runtime threads, as their gauges also say.
async fn serves_with_threads(stack: &Stack, threads: usize) -> anyhow::Result<()> {
    let prompt = "count the threads [[mock tokens=8]]";
    let started = stack.start_chat("threads", prompt).await?;
    let events = payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)?;
    assert_eq!(text_of(&events), expected_text(prompt, 8));

    // Under actix's System (the binary's `main`), each worker is an arbiter thread named
    // `actix-rt|system:<n>|arbiter:<n>`, of which the kernel keeps 15 characters; the
    // reader's thread is the main one.
    let gateway = &stack.gateways[0];
    assert_eq!(threads_named(gateway.pid(), "actix-rt|system")?, threads);
    let metrics = scrape(stack, stack.gateway()).await?;
    assert_eq!(
        metric_sample(&metrics, "gateway_http_workers"),
        Some(threads as f64)
    );
    // Tokio names its blocking threads as its workers, so the producer's count comes from
    // the runtime itself.
    let metrics = scrape(stack, stack.producers[0].url()).await?;
    assert_eq!(
        metric_sample(&metrics, "producer_runtime_threads"),
        Some(threads as f64)
    );
    Ok(())
}

#[tokio::test]
async fn the_services_run_the_threads_their_settings_give() -> anyhow::Result<()> {
    // The default: one of each per CPU this process may use, as the services count them.
    let cpus = std::thread::available_parallelism()?.get();
    serves_with_threads(&crate::stack::start().await?, cpus).await?;
    // Three: not what the default gives on the two-core machines the suite runs on.
    let stack = Stack::start(options().with_settings(|settings| {
        settings.gateway.http_workers = 3;
        settings.producer.runtime_threads = 3;
    }))
    .await?;
    serves_with_threads(&stack, 3).await
}
