//! Delivery that never loses or repeats a token: resume, fan-out, the multiplexed reader,
//! backpressure, keep-alive, the connection manager, stateless replicas and cancel.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures::StreamExt;
use serde_json::{Value, json};
use test_support::{SseEvent, metric_sample, wait_until};

use crate::stack::{
    Stack, StackOptions, TIMEOUT, expected_text, options, payloads, str_field, text_of,
};

const POLL: Duration = Duration::from_millis(25);
/// Deadline of the tests that stream tens of thousands of tokens.
const LONG: Duration = Duration::from_secs(120);

fn last_id(events: &[SseEvent]) -> anyhow::Result<String> {
    events
        .last()
        .and_then(|e| e.id.clone())
        .ok_or_else(|| anyhow::anyhow!("no event with an id"))
}

#[tokio::test]
async fn resuming_with_last_event_id_gives_exactly_the_rest() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.mock_llm.token_delay_ms = 5)).await?;
    let prompt = "Resume me [[mock tokens=60]]";
    let started = stack.start_chat("resume", prompt).await?;
    let url = str_field(&started, "streamUrl")?;

    let mut first = stack.open(0, url, &[]).await?;
    let mut head = Vec::new();
    for _ in 0..10 {
        head.extend(first.next_event(TIMEOUT).await?);
    }
    drop(first);

    // Header form.
    let resume_at = last_id(&head)?;
    let rest = stack
        .open(0, url, &[("Last-Event-ID", resume_at.as_str())])
        .await?
        .collect_to_end(TIMEOUT)
        .await?;
    let mut all = head.clone();
    all.extend(rest.clone());
    let all_json = payloads(&all)?;
    assert_eq!(text_of(&all_json), expected_text(prompt, 60));
    let ids: Vec<&String> = all.iter().filter_map(|e| e.id.as_ref()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "an event was delivered twice");

    // Query form, for clients that cannot set headers: same result.
    let via_query = stack
        .open(0, &format!("{url}&lastEventId={resume_at}"), &[])
        .await?
        .collect_to_end(TIMEOUT)
        .await?;
    assert_eq!(via_query, rest);
    Ok(())
}

#[tokio::test]
async fn fifty_clients_on_one_session_receive_identical_events() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.mock_llm.token_delay_ms = 3)).await?;
    let started = stack
        .start_chat("fanout", "Fan out [[mock tokens=150]]")
        .await?;
    let url = str_field(&started, "streamUrl")?.to_owned();
    let gateway = stack.gateway();
    let readers = (0..50).map(|_| {
        let url = format!("{gateway}{url}");
        tokio::spawn(async move {
            test_support::SseClient::connect(&url, &[])
                .await?
                .collect_to_end(TIMEOUT)
                .await
        })
    });
    let results = futures::future::join_all(readers).await;
    let mut sequences = Vec::new();
    for result in results {
        sequences.push(result??);
    }
    let first = &sequences[0];
    assert_eq!(first.len(), 152, "start + 150 tokens + complete");
    for other in &sequences[1..] {
        assert_eq!(other, first);
    }
    Ok(())
}

#[tokio::test]
async fn a_session_stream_without_request_id_follows_new_requests() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    // An earlier request is history: "from now on" excludes it.
    let old = stack
        .start_chat("follow", "old one [[mock tokens=3]]")
        .await?;
    stack.read_all(str_field(&old, "streamUrl")?).await?;

    let follow = stack.session_stream("follow").await?;
    let mut watcher = stack.open(0, &follow, &[]).await?;
    let a = stack
        .start_chat("follow", "first [[mock tokens=4]]")
        .await?;
    let first = watcher
        .collect_until(TIMEOUT, |e| e.data.contains("\"complete\""))
        .await?;
    let b = stack
        .start_chat("follow", "second [[mock tokens=5]]")
        .await?;
    let second = watcher
        .collect_until(TIMEOUT, |e| e.data.contains("\"complete\""))
        .await?;
    let first_json = payloads(&first)?;
    let second_json = payloads(&second)?;
    assert!(first_json.iter().all(|e| e["requestId"] == a["requestId"]));
    assert!(second_json.iter().all(|e| e["requestId"] == b["requestId"]));
    assert_eq!(
        text_of(&first_json),
        expected_text("first [[mock tokens=4]]", 4)
    );
    assert_eq!(
        text_of(&second_json),
        expected_text("second [[mock tokens=5]]", 5)
    );
    Ok(())
}

#[tokio::test]
async fn resuming_into_trimmed_history_reports_history_lost() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let started = stack
        .start_chat("trimmed", "short lived [[mock tokens=5]]")
        .await?;
    let url = str_field(&started, "streamUrl")?;
    let events = stack.read_all(url).await?;
    let early = events[1].id.clone().unwrap_or_default();

    let redis = stack.redis_client().await?;
    let _: u64 = redis
        .xtrim("llm:stream:{trimmed}:mock", ("MAXLEN", "=", 1))
        .await?;
    let after = stack
        .open(0, url, &[("Last-Event-ID", early.as_str())])
        .await?
        .collect_to_end(TIMEOUT)
        .await?;
    let after_json = payloads(&after)?;
    assert_eq!(after_json.len(), 1, "{after_json:?}");
    assert_eq!(after_json[0]["type"], "error");
    assert_eq!(after_json[0]["code"], "history_lost");
    assert_eq!(after_json[0]["retryable"], false);
    Ok(())
}

/// Retention is by age, never by count: a request with more entries than the old count cap
/// (10,000) reaches a client that joins after it ended, from its `start` on.
#[tokio::test]
async fn a_request_longer_than_the_old_cap_reaches_a_late_joiner_whole() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.mock_llm.token_delay_ms = 0)).await?;
    let (status, started) = stack
        .post_start(
            0,
            &json!({
                "sessionId": "long",
                "modelId": "mock",
                "prompt": "a long answer [[mock tokens=12000]]",
                "maxTokens": 12_000,
            }),
        )
        .await?;
    anyhow::ensure!(status == 200, "{status} {started}");
    let url = str_field(&started, "streamUrl")?;
    // The first reader follows it to the end; the second joins afterwards. The deadline is
    // for a loaded CI machine producing 12,000 tokens, not a speed requirement.
    let first = stack.open(0, url, &[]).await?.collect_to_end(LONG).await?;
    let late = payloads(&stack.open(0, url, &[]).await?.collect_to_end(LONG).await?)?;
    assert_eq!(late.len(), first.len());
    assert_eq!(
        late.first().map(|e| e["type"].clone()),
        Some(json!("start"))
    );
    let tokens: Vec<u64> = late
        .iter()
        .filter(|e| e["type"] == "token")
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert_eq!(tokens, (1..=12_000).collect::<Vec<_>>());
    assert_eq!(
        late.last().map(|e| e["type"].clone()),
        Some(json!("complete"))
    );
    Ok(())
}

/// `history_lost` is exact: a client whose own last entry was removed by retention (which
/// removes with `XDEL`, recording the last removed id) but nothing after it resumes with the
/// rest; a client positioned before a removed entry gets `history_lost`.
#[tokio::test]
async fn history_lost_only_when_an_entry_after_the_position_is_gone() -> anyhow::Result<()> {
    let stack = crate::stack::start().await?;
    let started = stack
        .start_chat("edge", "short lived [[mock tokens=5]]")
        .await?;
    let url = str_field(&started, "streamUrl")?;
    let events = stack.read_all(url).await?;
    let ids: Vec<String> = events.iter().filter_map(|e| e.id.clone()).collect();
    anyhow::ensure!(ids.len() >= 4, "{ids:?}");

    // Retention removed the start and the first token, oldest first, as `START` does.
    let redis = stack.redis_client().await?;
    let removed: u64 = redis
        .xdel(
            "llm:stream:{edge}:mock",
            vec![ids[0].clone(), ids[1].clone()],
        )
        .await?;
    assert_eq!(removed, 2);

    let at_edge = stack
        .open(0, url, &[("Last-Event-ID", ids[1].as_str())])
        .await?
        .collect_to_end(TIMEOUT)
        .await?;
    let resumed: Vec<String> = at_edge.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(resumed, ids[2..].to_vec(), "{:?}", payloads(&at_edge)?);

    let before_edge = stack
        .open(0, url, &[("Last-Event-ID", ids[0].as_str())])
        .await?
        .collect_to_end(TIMEOUT)
        .await?;
    let before_edge = payloads(&before_edge)?;
    assert_eq!(before_edge.len(), 1, "{before_edge:?}");
    assert_eq!(before_edge[0]["code"], "history_lost");
    Ok(())
}

/// A client that stops reading (its TCP window fills) is cut off after
/// `gateway.sse_write_timeout_ms`: it leaves the connection listing, and when it reads again it
/// gets what was already on its way, the end of the stream, and resumes from Redis with
/// nothing lost or repeated.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_resumes_without_loss() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        s.mock_llm.token_delay_ms = 0;
        s.gateway.sse_write_timeout_ms = 500;
    }))
    .await?;
    let tokens = 30_000;
    let (status, started) = stack
        .post_start(
            0,
            &json!({
                "sessionId": "stalled",
                "modelId": "mock",
                "prompt": format!("a flood [[mock tokens={tokens}]]"),
                "maxTokens": tokens,
            }),
        )
        .await?;
    anyhow::ensure!(status == 200, "{status} {started}");
    let url = str_field(&started, "streamUrl")?;
    // Opened, then not read: megabytes of frames fill the socket buffers on both sides.
    let mut stalled = stack.open(0, url, &[]).await?;

    let list_url = format!("{}/api/sessions/stalled/connections", stack.gateway());
    let http = stack.http.clone();
    wait_until(LONG, POLL, || {
        let (http, list_url) = (http.clone(), list_url.clone());
        async move {
            let body: Value = http
                .get(&list_url)
                .bearer_auth(crate::stack::API_KEY)
                .send()
                .await?
                .json()
                .await?;
            let open = body["connections"].as_array().map_or(0, Vec::len);
            Ok((open == 0).then_some(()))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("the stalled client was never cut off: {e}"))?;
    // Cut off for stalling, not ended because the whole answer fit in the socket buffers.
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.gateway()))
        .send()
        .await?
        .text()
        .await?;
    let stalled_total = metric_sample(&metrics, "gateway_sse_stalled_total");
    assert_eq!(stalled_total, Some(1.0), "{metrics}");

    // Reading again: what was in flight, then the end of the response.
    let head = stalled.collect_to_end(LONG).await?;
    let resume_at = last_id(&head)?;
    let rest = stack
        .open(0, url, &[("Last-Event-ID", resume_at.as_str())])
        .await?
        .collect_to_end(LONG)
        .await?;
    let all = payloads(
        &head
            .into_iter()
            .chain(rest)
            .filter(|e| e.id.is_some())
            .collect::<Vec<_>>(),
    )?;
    let sequences: Vec<u64> = all
        .iter()
        .filter(|e| e["type"] == "token")
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert_eq!(sequences, (1..=tokens).collect::<Vec<_>>());
    assert_eq!(
        all.last().map(|e| e["type"].clone()),
        Some(json!("complete"))
    );
    Ok(())
}

#[tokio::test]
async fn a_chat_started_on_one_gateway_streams_and_cancels_on_another() -> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            gateways: 2,
            ..options()
        }
        .with_settings(|s| s.mock_llm.token_delay_ms = 5),
    )
    .await?;
    let started = stack
        .start_chat("replicas", "a very long story [[mock tokens=5000]]")
        .await?;
    let request_id = str_field(&started, "requestId")?;
    let mut on_b = stack
        .open(1, str_field(&started, "streamUrl")?, &[])
        .await?;
    let mut received = Vec::new();
    while received.len() < 11 {
        received.extend(on_b.next_event(TIMEOUT).await?);
    }

    assert_eq!(stack.cancel(1, request_id).await?, 202);
    let cancelled_at = Instant::now();
    received.extend(on_b.collect_to_end(TIMEOUT).await?);
    let events = payloads(&received)?;
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "complete");
    assert_eq!(last["finishReason"], "cancelled");
    let tokens = events.iter().filter(|e| e["type"] == "token").count();
    assert!(tokens < 5000, "generation went on to the end");
    assert_eq!(last["usage"]["completionTokens"], tokens);

    // The producer dropped the upstream connection: mock-llm saw its client go away.
    let stats_url = format!("{}/_mock/stats", stack.mock_llm.url());
    let http = stack.http.clone();
    wait_until(Duration::from_secs(1), POLL, || {
        let (http, stats_url) = (http.clone(), stats_url.clone());
        async move {
            let stats: Value = http.get(&stats_url).send().await?.json().await?;
            Ok((stats["streams_disconnected"] == 1).then_some(()))
        }
    })
    .await?;
    assert!(cancelled_at.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test]
async fn connections_are_listed_across_gateways_and_removed_on_disconnect() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        gateways: 2,
        ..options()
    })
    .await?;
    let watched = stack.session_stream("watched").await?;
    let on_a = stack.open(0, &watched, &[]).await?;
    let on_b = stack.open(1, &watched, &[]).await?;
    let list_url = format!("{}/api/sessions/watched/connections", stack.gateway());
    let http = stack.http.clone();
    let count = |want: usize| {
        let (http, list_url) = (http.clone(), list_url.clone());
        async move {
            let body: Value = http
                .get(&list_url)
                .bearer_auth(crate::stack::API_KEY)
                .send()
                .await?
                .json()
                .await?;
            let list = body["connections"].as_array().cloned().unwrap_or_default();
            Ok((list.len() == want).then_some(list))
        }
    };
    let both = wait_until(TIMEOUT, POLL, || count(2)).await?;
    let gateways: std::collections::HashSet<&str> = both
        .iter()
        .filter_map(|c| c["gatewayId"].as_str())
        .collect();
    assert_eq!(gateways.len(), 2, "{both:?}");
    assert!(both.iter().all(|c| c["sessionId"] == "watched"));

    drop(on_b);
    // SPEC §4: removed within 1 s of the disconnect.
    wait_until(Duration::from_secs(1), POLL, || count(1)).await?;
    drop(on_a);
    wait_until(Duration::from_secs(1), POLL, || count(0)).await?;
    Ok(())
}

#[tokio::test]
async fn an_idle_stream_gets_keepalive_comments() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.gateway.keepalive_secs = 1)).await?;
    let quiet = stack.session_stream("quiet").await?;
    let response = stack
        .http
        .get(format!("{}{quiet}", stack.gateway()))
        .send()
        .await?;
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains(": ping") {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(remaining, body.next())
            .await
            .map_err(|_| anyhow::anyhow!("no keep-alive within 5 s; got {seen:?}"))?;
        let chunk = chunk.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(())
}

#[tokio::test]
async fn a_thousand_clients_share_the_gateways_fixed_redis_connections() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.mock_llm.token_delay_ms = 10)).await?;
    let redis = stack.redis_client().await?;
    let clients_now = || {
        let redis = redis.clone();
        async move {
            let info: String = redis.info(Some(fred::types::InfoKind::Clients)).await?;
            let count = info
                .lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| anyhow::anyhow!("no connected_clients in {info}"))?;
            anyhow::Ok(count)
        }
    };
    // Warm up: the reader's first subscription opens its fixed connections (fred's
    // backchannel for CLIENT UNBLOCK among them); from then on the count must not move.
    let mut warm = Vec::new();
    for i in 0..5 {
        let url = stack.session_stream(&format!("warm-{i}")).await?;
        warm.push(stack.open(0, &url, &[]).await?);
    }
    let before = clients_now().await?;

    // A live chat on some sessions, idle session-wide streams on the others.
    let mut live = Vec::new();
    for i in 0..10 {
        live.push(
            stack
                .start_chat(&format!("crowd-{i}"), "crowd [[mock tokens=200]]")
                .await?,
        );
    }
    let mut idle_urls = Vec::new();
    for i in 0..300 {
        idle_urls.push(stack.session_stream(&format!("idle-{i}")).await?);
    }
    let mut connections = Vec::new();
    for i in 0..1000 {
        let path = if i < 100 {
            str_field(&live[i % 10], "streamUrl")?.to_owned()
        } else {
            idle_urls[i % 300].clone()
        };
        connections.push(stack.open(0, &path, &[]).await?);
    }
    let during = clients_now().await?;
    assert_eq!(
        during, before,
        "the gateway opened Redis connections per SSE client"
    );
    // And the clients really are served: the live ones get their whole answer.
    let mut finished = 0;
    for connection in connections.iter_mut().take(100) {
        let events = connection.collect_to_end(TIMEOUT).await?;
        if events
            .last()
            .is_some_and(|e| e.data.contains("\"complete\""))
        {
            finished += 1;
        }
    }
    assert_eq!(finished, 100);
    Ok(())
}

/// The stream keys each `XREAD` in Redis's slow log names, and whether it blocks. The stack's
/// Redis logs every command once [`log_every_command`] ran; a command of more than 32
/// arguments is cut there, but an `XREAD` names its keys before its ids, so up to 27 keys show.
async fn logged_xreads(redis: &Client) -> anyhow::Result<Vec<(bool, Vec<String>)>> {
    let log: fred::types::Value = redis
        .custom(fred::cmd!("SLOWLOG"), vec!["GET", "-1"])
        .await?;
    let mut reads = Vec::new();
    for entry in log.into_array() {
        let Some(args) = entry.into_array().into_iter().nth(3) else {
            continue;
        };
        let args: Vec<String> = args
            .into_array()
            .into_iter()
            .filter_map(|arg| arg.into_string())
            .collect();
        if !args
            .first()
            .is_some_and(|cmd| cmd.eq_ignore_ascii_case("XREAD"))
        {
            continue;
        }
        let blocks = args.iter().any(|arg| arg.eq_ignore_ascii_case("BLOCK"));
        let keys = args
            .iter()
            .skip_while(|arg| !arg.eq_ignore_ascii_case("STREAMS"))
            .filter(|arg| arg.starts_with("llm:stream:"))
            .cloned()
            .collect();
        reads.push((blocks, keys));
    }
    Ok(reads)
}

async fn log_every_command(redis: &Client) -> anyhow::Result<()> {
    let _: () = redis
        .custom(
            fred::cmd!("CONFIG"),
            vec![
                "SET",
                "slowlog-max-len",
                "100000",
                "slowlog-log-slower-than",
                "0",
            ],
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_reader_reads_only_the_streams_written_and_tokens_come_on_announcements()
-> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        // Only announcements can bring tokens promptly: the safety round is a minute away.
        s.gateway.reader_sweep_ms = 60_000;
        s.gateway.reader_block_max_streams = 0;
        s.mock_llm.token_delay_ms = 2;
    }))
    .await?;
    let redis = stack.redis_client().await?;
    log_every_command(&redis).await?;
    let mut watchers = Vec::new();
    for i in 0..20 {
        let url = stack.session_stream(&format!("quiet-{i}")).await?;
        watchers.push(stack.open(0, &url, &[]).await?);
    }
    // The reader reads each new stream once when it starts following it (a session-wide
    // stream follows every model's); from then on it reads only what was announced.
    let streams = 20 * stack.settings().models.len();
    wait_until(TIMEOUT, POLL, || {
        let redis = redis.clone();
        async move {
            let named: std::collections::HashSet<String> = logged_xreads(&redis)
                .await?
                .into_iter()
                .flat_map(|(_, keys)| keys)
                .filter(|key| key.contains("{quiet-"))
                .collect();
            Ok((named.len() == streams).then_some(()))
        }
    })
    .await?;
    let _: () = redis.custom(fred::cmd!("SLOWLOG"), vec!["RESET"]).await?;

    let prompt = "wake me [[mock tokens=60]]";
    stack.start_chat("quiet-7", prompt).await?;
    let events = watchers[7]
        .collect_until(TIMEOUT, |e| e.data.contains("\"complete\""))
        .await?;
    assert_eq!(text_of(&payloads(&events)?), expected_text(prompt, 60));

    let reads = logged_xreads(&redis).await?;
    assert!(!reads.is_empty(), "the answer came without a read");
    for (blocks, keys) in &reads {
        assert!(!blocks, "a blocking read: {keys:?}");
        assert!(
            !keys.is_empty() && keys.iter().all(|key| key.contains("{quiet-7}")),
            "a read of streams nobody wrote to: {keys:?}"
        );
    }
    Ok(())
}

/// Waits until Redis logged an `XREAD` naming `session`'s stream that blocks (`blocking`) or
/// does not, then empties the log.
async fn wait_for_read_of(redis: &Client, session: &str, blocking: bool) -> anyhow::Result<()> {
    let tag = format!("{{{session}}}");
    wait_until(TIMEOUT, POLL, || {
        let (redis, tag) = (redis.clone(), tag.clone());
        async move {
            let seen = logged_xreads(&redis)
                .await?
                .iter()
                .any(|(blocks, keys)| *blocks == blocking && keys.iter().any(|k| k.contains(&tag)));
            Ok(seen.then_some(()))
        }
    })
    .await?;
    let _: () = redis.custom(fred::cmd!("SLOWLOG"), vec!["RESET"]).await?;
    Ok(())
}

#[tokio::test]
async fn the_reader_moves_between_blocking_and_announced_reads_without_losing_a_token()
-> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        // One chat's stream blocks; with other sessions watched, announcements take over.
        s.gateway.reader_block_max_streams = 2;
        // A token left behind at a switch would wait for the next write, or stall the end.
        s.gateway.reader_sweep_ms = 60_000;
        s.mock_llm.token_delay_ms = 10;
    }))
    .await?;
    let redis = stack.redis_client().await?;
    log_every_command(&redis).await?;
    let prompt = "switch modes [[mock tokens=600]]";
    let started = stack.start_chat("switch", prompt).await?;
    let mut reader = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    wait_for_read_of(&redis, "switch", true).await?;
    for round in 0..2 {
        let mut others = Vec::new();
        for i in 0..3 {
            let url = stack.session_stream(&format!("other-{round}-{i}")).await?;
            others.push(stack.open(0, &url, &[]).await?);
        }
        wait_for_read_of(&redis, "switch", false).await?;
        drop(others);
        wait_for_read_of(&redis, "switch", true).await?;
    }
    let events = reader.collect_to_end(TIMEOUT).await?;
    assert_eq!(text_of(&payloads(&events)?), expected_text(prompt, 600));
    let ids: Vec<&String> = events.iter().filter_map(|e| e.id.as_ref()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "an event was delivered twice");
    Ok(())
}

#[tokio::test]
async fn a_write_nobody_announced_is_delivered_by_the_sweep() -> anyhow::Result<()> {
    // A producer of an earlier release appends without announcing; so does a lost message.
    let stack = Stack::start(options().with_settings(|s| {
        s.gateway.reader_sweep_ms = 300;
        s.gateway.reader_block_max_streams = 0;
    }))
    .await?;
    let url = stack.session_stream("silent").await?;
    let mut watcher = stack.open(0, &url, &[]).await?;
    let session = stream_schema::SessionId::parse("silent")?;
    let model = stack
        .settings()
        .models
        .keys()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the stack has no model"))?;
    let model = stream_schema::ModelId::parse(model)?;
    let event = stream_schema::SessionEvent::Token {
        request_id: stream_schema::RequestId::new(),
        sequence: 0,
        content: "unannounced".to_owned(),
        timestamp: 1,
    };
    let fields: Vec<(String, String)> = event
        .encode()
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    let redis = stack.redis_client().await?;
    let _: String = redis
        .xadd(
            stream_schema::RedisKey::session(&session, &model).as_str(),
            false,
            None,
            "*",
            fields,
        )
        .await?;
    let events = watcher
        .collect_until(TIMEOUT, |e| e.data.contains("unannounced"))
        .await?;
    assert!(events.iter().any(|e| e.data.contains("unannounced")));
    Ok(())
}

#[tokio::test]
async fn a_slow_client_is_cut_off_and_resumes_without_loss() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        s.gateway.sse_buffer_bytes = 65536;
        s.mock_llm.token_delay_ms = 0;
    }))
    .await?;
    // More than the kernel can hold for a client that stopped reading: with 30,000 tokens
    // (about 5 MB of frames) the gateway's socket buffer (up to `tcp_wmem`'s 4 MB) and the
    // client's receive buffer sometimes took the whole flood, and nothing overflowed.
    let tokens: usize = 100_000;
    let prompt = format!("flood [[mock tokens={tokens}]]");
    let prompt = prompt.as_str();
    let started = stack.start_chat("slow", prompt).await?;
    let url = str_field(&started, "streamUrl")?;

    // Read a little, then stop reading while the producer floods the stream.
    let mut slow = stack.open(0, url, &[]).await?;
    let mut received = Vec::new();
    for _ in 0..5 {
        received.extend(slow.next_event(TIMEOUT).await?);
    }
    let http = stack.http.clone();
    let metrics_url = format!("{}/metrics", stack.gateway());
    wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let (http, metrics_url) = (http.clone(), metrics_url.clone());
        async move {
            let text = http.get(&metrics_url).send().await?.text().await?;
            Ok(text.contains("gateway_sse_overflows_total 1").then_some(()))
        }
    })
    .await?;
    // Drain what the kernel and the gateway had buffered; the stream ends with a retryable
    // error instead of growing the gateway's memory.
    let rest = slow.collect_to_end(TIMEOUT).await?;
    let tail = rest
        .last()
        .map(SseEvent::json)
        .transpose()?
        .unwrap_or_default();
    assert_eq!(tail["type"], "error", "{tail}");
    assert_eq!(tail["retryable"], true);
    received.extend(rest.into_iter().filter(|e| e.id.is_some()));

    // Resume like EventSource does, until the request completes (a resumed client that is
    // again too slow is cut again; it never loses anything either way).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !received
        .last()
        .is_some_and(|e| e.data.contains("\"complete\""))
    {
        anyhow::ensure!(Instant::now() < deadline, "did not complete after resuming");
        let resumed = stack
            .open(0, url, &[("Last-Event-ID", last_id(&received)?.as_str())])
            .await?
            .collect_to_end(Duration::from_secs(60))
            .await?;
        received.extend(resumed.into_iter().filter(|e| e.id.is_some()));
    }
    let all = payloads(&received)?;
    let sequences: Vec<u64> = all
        .iter()
        .filter(|e| e["type"] == "token")
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    let expected_sequences: Vec<u64> = (1..=tokens as u64).collect();
    if sequences != expected_sequences {
        let first_bad = sequences
            .iter()
            .zip(&expected_sequences)
            .position(|(a, b)| a != b);
        anyhow::bail!(
            "{} tokens; first mismatch at index {first_bad:?}; last event {:?}",
            sequences.len(),
            all.last()
        );
    }
    assert!(
        text_of(&all) == expected_text(prompt, tokens),
        "text differs"
    );
    Ok(())
}

#[tokio::test]
async fn clients_that_drop_and_resume_at_random_see_every_token_once() -> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.mock_llm.token_delay_ms = 1)).await?;
    let prompt = "chaos [[mock tokens=1500]]";
    let started = stack.start_chat("chaos", prompt).await?;
    let url = format!("{}{}", stack.gateway(), str_field(&started, "streamUrl")?);
    let expected = expected_text(prompt, 1500);

    let deadline = Instant::now() + Duration::from_secs(90);
    let clients = (0..20u64).map(|client| {
        let url = url.clone();
        tokio::spawn(async move {
            // A small deterministic PRNG per client: reproducible drop points.
            let mut state = client.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |bound: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % bound
            };
            let mut events: Vec<SseEvent> = Vec::new();
            let mut reconnects = 0u32;
            loop {
                anyhow::ensure!(Instant::now() < deadline, "chaos client ran out of time");
                let headers: Vec<(&str, String)> = events
                    .last()
                    .and_then(|e| e.id.clone())
                    .map(|id| vec![("Last-Event-ID", id)])
                    .unwrap_or_default();
                let header_refs: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut connection = test_support::SseClient::connect(&url, &header_refs).await?;
                let take = 1 + next(120);
                let mut done = false;
                for _ in 0..take {
                    match connection.next_event(TIMEOUT).await? {
                        Some(event) => {
                            done = event.data.contains("\"complete\"");
                            events.push(event);
                            if done {
                                break;
                            }
                        }
                        None => {
                            done = true;
                            break;
                        }
                    }
                }
                if done {
                    return anyhow::Ok((events, reconnects));
                }
                reconnects += 1;
            }
        })
    });
    let mut cycles = 0;
    for result in futures::future::join_all(clients).await {
        let (events, reconnects) = result??;
        cycles += reconnects;
        let json = payloads(&events)?;
        let sequences: Vec<u64> = json
            .iter()
            .filter(|e| e["type"] == "token")
            .filter_map(|e| e["sequence"].as_u64())
            .collect();
        assert_eq!(
            sequences,
            (1..=1500).collect::<Vec<_>>(),
            "a token was lost or repeated"
        );
        assert_eq!(text_of(&json), expected);
        let mut counts: HashMap<String, u32> = HashMap::new();
        for id in events.iter().filter_map(|e| e.id.clone()) {
            *counts.entry(id).or_default() += 1;
        }
        assert!(counts.values().all(|&n| n == 1));
    }
    assert!(cycles >= 200, "only {cycles} reconnect cycles ran");
    let _ = json!(null);
    Ok(())
}

/// A deterministic pseudo-random sequence (xorshift64*), so a failing run can be replayed.
struct Draws(u64);

impl Draws {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below.max(1)
    }
}

#[tokio::test]
async fn a_session_followed_across_two_models_resumes_exactly_after_random_drops()
-> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| s.mock_llm.token_delay_ms = 1)).await?;
    let watch = stack.session_stream("two-models").await?;
    let mut connection = stack.open(0, &watch, &[]).await?;
    // Three requests on each model at once: the two streams' entry ids interleave.
    let tokens = 120;
    let mut requests = HashMap::new();
    for i in 0..6 {
        let model = if i % 2 == 0 { "mock" } else { "gpt-4" };
        let prompt = format!("interleaved {i} [[mock tokens={tokens}]]");
        let (status, started) = stack
            .post_start(
                0,
                &json!({"sessionId": "two-models", "modelId": model, "prompt": prompt}),
            )
            .await?;
        anyhow::ensure!(status == 200, "{status} {started}");
        requests.insert(str_field(&started, "requestId")?.to_owned(), prompt);
    }

    let mut draws = Draws(0x5eed_1234_abcd_0001);
    let mut seen: Vec<Value> = Vec::new();
    let mut completes = 0;
    let mut drops = 0;
    let mut last_id = String::new();
    while completes < requests.len() {
        // Take a few events, then drop the connection and resume from the last id.
        for _ in 0..1 + draws.next(40) {
            let Some(event) = connection.next_event(LONG).await? else {
                break;
            };
            let payload = event.json()?;
            anyhow::ensure!(payload["type"] != "error", "{payload}");
            last_id = event
                .id
                .clone()
                .ok_or_else(|| anyhow::anyhow!("an event without id: {payload}"))?;
            if payload["type"] == "complete" {
                completes += 1;
            }
            seen.push(payload);
            if completes == requests.len() {
                break;
            }
        }
        drops += 1;
        connection = stack
            .open(0, &watch, &[("Last-Event-ID", last_id.as_str())])
            .await?;
    }
    assert!(drops > 10, "only {drops} drops");
    assert!(
        last_id.contains("mock=") && last_id.contains("gpt-4="),
        "{last_id}"
    );
    // Every request whole, once: its start, every token in order, its complete.
    for (request_id, prompt) in &requests {
        let own: Vec<&Value> = seen
            .iter()
            .filter(|e| e["requestId"] == request_id.as_str())
            .collect();
        let kinds: Vec<&str> = own.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(kinds.first(), Some(&"start"), "{request_id}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&"complete"), "{request_id}: {kinds:?}");
        let sequences: Vec<u64> = own
            .iter()
            .filter(|e| e["type"] == "token")
            .filter_map(|e| e["sequence"].as_u64())
            .collect();
        assert_eq!(
            sequences,
            (1..=tokens).collect::<Vec<_>>(),
            "{request_id}: lost or repeated tokens after {drops} drops"
        );
        let owned: Vec<Value> = own.into_iter().cloned().collect();
        assert_eq!(text_of(&owned), expected_text(prompt, tokens as usize));
        assert_eq!(kinds.len(), tokens as usize + 2, "{request_id}: {kinds:?}");
    }
    Ok(())
}
