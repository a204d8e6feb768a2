//! A producer that survives anything upstream or in itself: upstream faults become the
//! specified events, a producer that dies or freezes is replaced without interleaving two
//! attempts, poison jobs are dead-lettered, SIGTERM drains or hands work back, cancel stops the
//! upstream call.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::Value as RedisValue;
use serde_json::Value;
use stream_schema::keys::PRODUCER_GROUP;
use stream_schema::{DeadLetter, RedisKey, SessionEvent};
use test_support::{SseEvent, group_consumers, wait_until};

use crate::stack::{
    Service, Stack, StackOptions, TIMEOUT, expected_text, options, payloads, str_field, text_of,
};
use service_kit::config::{ModelSettings, ProducerSettings};

const POLL: Duration = Duration::from_millis(25);

/// Upstream timeouts and retries short enough for tests.
fn fast_upstream(model: &mut ModelSettings) {
    model.first_token_timeout_ms = 1500;
    model.idle_timeout_ms = 1000;
    model.max_retries = 2;
    model.retry_base_ms = 50;
    model.retry_max_ms = 3000;
}

/// Leases short enough that a lost producer is replaced within about two seconds.
fn short_leases(producer: &mut ProducerSettings) {
    producer.lease_ms = 1500;
    producer.lease_renew_ms = 300;
    producer.reclaim_interval_ms = 250;
}

async fn stack_with(
    producers: usize,
    configure: impl FnOnce(&mut ProducerSettings),
) -> anyhow::Result<Stack> {
    Stack::start(
        StackOptions {
            producers,
            ..options()
        }
        .with_settings(|s| {
            configure(&mut s.producer);
            s.models.values_mut().for_each(fast_upstream);
        }),
    )
    .await
}

/// Starts a chat and reads it to its end.
async fn chat(stack: &Stack, session: &str, prompt: &str) -> anyhow::Result<Vec<Value>> {
    let started = stack.start_chat(session, prompt).await?;
    let events = stack.read_all(str_field(&started, "streamUrl")?).await?;
    payloads(&events)
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

fn sequences(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .filter_map(|e| e["sequence"].as_u64())
        .collect()
}

async fn mock_stats(stack: &Stack) -> anyhow::Result<Value> {
    Ok(stack
        .http
        .get(format!("{}/_mock/stats", stack.mock_llm.url()))
        .send()
        .await?
        .json()
        .await?)
}

async fn metrics_of(stack: &Stack, producer: &Service) -> anyhow::Result<String> {
    Ok(stack
        .http
        .get(format!("{}/metrics", producer.url()))
        .send()
        .await?
        .text()
        .await?)
}

/// Sum of every sample of `name` in a Prometheus text page.
fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every event of a session stream, straight from Redis.
async fn stream_in_redis(stack: &Stack, session: &str) -> anyhow::Result<Vec<SessionEvent>> {
    let redis = stack.redis_client().await?;
    let entries: Vec<(String, HashMap<String, String>)> = redis
        .xrange(format!("llm:stream:{{{session}}}:mock"), "-", "+", None)
        .await?;
    entries
        .iter()
        .map(|(_, fields)| Ok(SessionEvent::decode(fields)?))
        .collect()
}

/// Index in `stack.producers` of the producer whose consumer holds the only pending job.
pub(crate) async fn job_holder(stack: &Stack) -> anyhow::Result<usize> {
    let redis = stack.redis_client().await?;
    wait_until(TIMEOUT, POLL, || {
        let redis = redis.clone();
        async move {
            let pending: RedisValue = redis
                .xpending("llm:requests", "llm:producers", ("-", "+", 10))
                .await?;
            let consumers: Vec<String> = pending
                .into_array()
                .into_iter()
                .filter_map(|entry| entry.into_array().get(1).cloned()?.into_string())
                .collect();
            let [consumer] = consumers.as_slice() else {
                return Ok(None);
            };
            // Consumer names are `producer-<host>-<pid>`.
            let pid: u32 = consumer
                .rsplit('-')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("consumer name {consumer} has no pid"))?;
            Ok(stack.producers.iter().position(|p| p.process.pid() == pid))
        }
    })
    .await
}

/// Reads until `count` events arrived.
async fn read_events(
    connection: &mut test_support::SseConnection,
    count: usize,
) -> anyhow::Result<Vec<SseEvent>> {
    let mut events = Vec::new();
    while events.len() < count {
        match connection.next_event(TIMEOUT).await? {
            Some(event) => events.push(event),
            None => anyhow::bail!("the stream ended after {} events", events.len()),
        }
    }
    Ok(events)
}

/// Checks a request that was restarted once: a `restart` (attempt 2, `producer_lost`), after it
/// exactly the tokens 1..=n of the whole answer and `complete`; nothing of attempt 1 after it.
fn assert_restarted_once(events: &[Value], prompt: &str, tokens: usize) {
    let kinds = types(events);
    let restarts: Vec<usize> = kinds
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == "restart")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(restarts.len(), 1, "{kinds:?}");
    let restart = &events[restarts[0]];
    assert_eq!(restart["attempt"], 2);
    assert_eq!(restart["reason"], "producer_lost");
    let before = &events[..restarts[0]];
    let after = &events[restarts[0] + 1..];
    let before_seq = sequences(before);
    assert_eq!(
        before_seq,
        (1..=before_seq.len() as u64).collect::<Vec<_>>(),
        "attempt 1 had a gap"
    );
    // An entry of attempt 1 after the restart would break this run (its sequence continues
    // from where attempt 1 was).
    assert_eq!(
        sequences(after),
        (1..=tokens as u64).collect::<Vec<_>>(),
        "attempt 2 is not exactly 1..={tokens}"
    );
    assert_eq!(text_of(after), expected_text(prompt, tokens));
    let last = after.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "complete", "{last}");
    assert_eq!(last["finishReason"], "stop");
    assert_eq!(
        types(after).iter().filter(|t| **t != "token").count(),
        1,
        "{:?}",
        types(after)
    );
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_then_succeeds() -> anyhow::Result<()> {
    let stack = stack_with(1, |_| {}).await?;
    let prompt = "rate limited once [[mock status=429 retry_after=1 fail_times=1 tokens=5]]";
    let started_at = Instant::now();
    let events = chat(&stack, "r429", prompt).await?;

    assert_eq!(
        types(&events),
        [
            "start", "token", "token", "token", "token", "token", "complete"
        ]
    );
    assert_eq!(text_of(&events), expected_text(prompt, 5));
    assert_eq!(events[6]["usage"]["source"], "upstream");
    // The producer waited the second the upstream asked for, and asked twice in all.
    assert!(started_at.elapsed() >= Duration::from_secs(1));
    assert_eq!(mock_stats(&stack).await?["requests"], 2);
    Ok(())
}

#[tokio::test]
async fn a_persistent_5xx_ends_with_a_retryable_error_and_a_4xx_is_not_retried()
-> anyhow::Result<()> {
    let stack = stack_with(1, |_| {}).await?;
    let events = chat(&stack, "r500", "always broken [[mock status=503]]").await?;
    assert_eq!(types(&events), ["start", "error"]);
    assert_eq!(events[1]["code"], "upstream_error");
    assert_eq!(events[1]["retryable"], true);
    assert!(
        events[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("503")),
        "{}",
        events[1]
    );
    // The first try and `max_retries = 2` retries.
    assert_eq!(mock_stats(&stack).await?["requests"], 3);

    let events = chat(&stack, "r400", "bad request [[mock status=400]]").await?;
    assert_eq!(types(&events), ["start", "error"]);
    assert_eq!(events[1]["retryable"], false);
    assert_eq!(
        mock_stats(&stack).await?["requests"],
        4,
        "a 400 was retried"
    );
    Ok(())
}

#[tokio::test]
async fn a_stall_ends_with_an_upstream_timeout_after_the_idle_or_first_token_timeout()
-> anyhow::Result<()> {
    let stack = stack_with(1, |_| {}).await?;
    let prompt = "stalls [[mock stall_after=3 tokens=10]]";
    let started = stack.start_chat("stall", prompt).await?;
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    let head = payloads(&read_events(&mut connection, 4).await?)?;
    let last_token_at = Instant::now();
    let rest = payloads(&connection.collect_to_end(TIMEOUT).await?)?;
    let waited = last_token_at.elapsed();

    assert_eq!(types(&head), ["start", "token", "token", "token"]);
    assert_eq!(types(&rest), ["error"]);
    assert_eq!(rest[0]["code"], "upstream_timeout");
    assert_eq!(rest[0]["retryable"], true);
    // `idle_timeout_ms = 1000`.
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // The tokens before the stall stay readable.
    let again = chat_events(&stack, &started).await?;
    assert_eq!(text_of(&again), expected_text(prompt, 3));
    // The producer hung up on the stalled upstream.
    wait_for_stat(&stack, "streams_disconnected", 1).await?;

    // Silence before the first token: `first_token_timeout_ms = 1500`, not retried.
    let started_at = Instant::now();
    let events = chat(&stack, "mute", "says nothing [[mock stall_after=0]]").await?;
    assert_eq!(types(&events), ["start", "error"]);
    assert_eq!(events[1]["code"], "upstream_timeout");
    assert!(started_at.elapsed() >= Duration::from_millis(1400));
    assert_eq!(mock_stats(&stack).await?["requests"], 2);
    Ok(())
}

async fn chat_events(stack: &Stack, started: &Value) -> anyhow::Result<Vec<Value>> {
    payloads(&stack.read_all(str_field(started, "streamUrl")?).await?)
}

async fn wait_for_stat(stack: &Stack, name: &str, want: u64) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(2), POLL, || async move {
        Ok((mock_stats(stack).await?[name] == want).then_some(()))
    })
    .await
}

#[tokio::test]
async fn a_broken_stream_ends_with_an_error_and_keeps_the_tokens_before_it() -> anyhow::Result<()> {
    let stack = stack_with(1, |_| {}).await?;
    for (session, prompt) in [
        ("cut", "cut off [[mock disconnect_after=4 tokens=10]]"),
        ("garbled", "error event [[mock error_after=4 tokens=10]]"),
    ] {
        let events = chat(&stack, session, prompt).await?;
        assert_eq!(
            types(&events),
            ["start", "token", "token", "token", "token", "error"],
            "{session}"
        );
        assert_eq!(events[5]["code"], "upstream_error");
        assert_eq!(events[5]["retryable"], true);
        assert_eq!(text_of(&events), expected_text(prompt, 4), "{session}");
        // Nothing was retried once tokens were out.
        let in_redis = stream_in_redis(&stack, session).await?;
        assert_eq!(in_redis.len(), 6, "{session}: {in_redis:?}");
    }
    assert_eq!(mock_stats(&stack).await?["requests"], 2);
    Ok(())
}

#[tokio::test]
async fn without_upstream_usage_the_producer_counts_and_says_so() -> anyhow::Result<()> {
    let stack = stack_with(1, |p| p.token_coalesce_ms = 0).await?;
    let events = chat(&stack, "nousage", "count me [[mock no_usage=1 tokens=7]]").await?;
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["usage"]["completionTokens"], 7);
    assert_eq!(complete["usage"]["source"], "counted");
    Ok(())
}

#[tokio::test]
async fn coalesced_tokens_keep_the_text_and_the_token_count() -> anyhow::Result<()> {
    let stack = stack_with(1, |p| p.token_coalesce_ms = 50).await?;
    let prompt = "many small tokens [[mock tokens=200 delay_ms=1 no_usage=1]]";
    let events = chat(&stack, "coalesce", prompt).await?;
    let tokens = sequences(&events);
    assert!(tokens.len() < 200, "nothing was coalesced");
    assert_eq!(tokens, (1..=tokens.len() as u64).collect::<Vec<_>>());
    assert_eq!(text_of(&events), expected_text(prompt, 200));
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["usage"]["completionTokens"], 200);
    Ok(())
}

#[tokio::test]
async fn a_killed_producers_request_completes_on_another_with_a_restart() -> anyhow::Result<()> {
    let stack = stack_with(2, short_leases).await?;
    let prompt = "survive a crash [[mock tokens=300 delay_ms=10]]";
    let started = stack.start_chat("crash", prompt).await?;
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    let mut events = read_events(&mut connection, 21).await?;
    let holder = job_holder(&stack).await?;
    stack.producers[holder].process.sigkill()?;
    let killed_at = Instant::now();

    events.extend(connection.collect_to_end(TIMEOUT).await?);
    let events = payloads(&events)?;
    assert_restarted_once(&events, prompt, 300);
    let restart_at = types(&events)
        .iter()
        .position(|t| *t == "restart")
        .unwrap_or_default();
    assert!(
        restart_at >= 21,
        "attempt 1 had written its first 20 tokens"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(10));

    // Redis holds exactly what the client saw, and the job is gone from the queue.
    let in_redis = stream_in_redis(&stack, "crash").await?;
    assert_eq!(in_redis.len(), events.len());
    let redis = stack.redis_client().await?;
    let queued: u64 = redis.xlen("llm:requests").await?;
    assert_eq!(queued, 0);
    Ok(())
}

#[tokio::test]
async fn a_frozen_producer_writes_nothing_once_its_lease_is_taken() -> anyhow::Result<()> {
    let stack = stack_with(2, short_leases).await?;
    let prompt = "freeze [[mock tokens=300 delay_ms=10]]";
    let started = stack.start_chat("frozen", prompt).await?;
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    let mut events = read_events(&mut connection, 11).await?;
    let holder = job_holder(&stack).await?;
    let frozen = &stack.producers[holder];
    frozen.process.sigstop()?;

    // The other producer takes over once the lease runs out ...
    let taken = connection
        .collect_until(TIMEOUT, |e| e.data.contains("\"restart\""))
        .await;
    // ... and while it streams, the frozen one wakes up with its upstream data buffered.
    let resumed = frozen.process.sigcont();
    let taken = taken?;
    resumed?;
    events.extend(taken);
    events.extend(connection.collect_to_end(TIMEOUT).await?);
    let events = payloads(&events)?;
    assert_restarted_once(&events, prompt, 300);

    // Nothing more lands in Redis after the end, and the woken producer knows it lost the job.
    let metrics = wait_until(TIMEOUT, POLL, || async {
        let page = metrics_of(&stack, frozen).await?;
        let stopped = metric_sum(&page, "producer_leases_lost_total")
            + metric_sum(&page, "producer_fenced_total");
        Ok((stopped >= 1.0).then_some(page))
    })
    .await?;
    assert!(
        metric_sum(&metrics, "producer_requests_total") == 0.0,
        "the frozen producer finished a request: {metrics}"
    );
    let in_redis = stream_in_redis(&stack, "frozen").await?;
    assert_eq!(in_redis.len(), events.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stream_in_redis(&stack, "frozen").await?, in_redis);
    Ok(())
}

#[tokio::test]
async fn a_job_that_exhausts_its_attempts_is_dead_lettered_and_its_client_told()
-> anyhow::Result<()> {
    // One attempt only: the first producer's death is fatal for the request.
    let stack = stack_with(2, |p| {
        short_leases(p);
        p.max_attempts = 1;
    })
    .await?;
    let started = stack
        .start_chat("poison", "doomed [[mock tokens=300 delay_ms=10]]")
        .await?;
    let request_id = str_field(&started, "requestId")?.to_owned();
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    read_events(&mut connection, 6).await?;
    let holder = job_holder(&stack).await?;
    stack.producers[holder].process.sigkill()?;

    let rest = payloads(&connection.collect_to_end(TIMEOUT).await?)?;
    let last = rest.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "error", "{rest:?}");
    assert_eq!(last["code"], "job_failed");
    assert_eq!(last["retryable"], false);
    assert!(!types(&rest).contains(&"restart"));

    // A job nobody can even read goes the same way.
    let redis = stack.redis_client().await?;
    let _: String = redis
        .xadd(
            "llm:requests",
            false,
            None,
            "*",
            vec![("v", "1"), ("rid", "x")],
        )
        .await?;

    let dead = wait_until(TIMEOUT, POLL, || {
        let redis = redis.clone();
        async move {
            let entries: Vec<(String, HashMap<String, String>)> =
                redis.xrange("llm:dead", "-", "+", None).await?;
            let dead: Vec<DeadLetter> = entries
                .iter()
                .map(|(_, f)| DeadLetter::decode(f))
                .collect::<Result<_, _>>()?;
            Ok((dead.len() == 2).then_some(dead))
        }
    })
    .await?;
    let poisoned = dead
        .iter()
        .find(|d| d.request_id.is_some_and(|r| r.to_string() == request_id))
        .ok_or_else(|| anyhow::anyhow!("no dead letter for {request_id}: {dead:?}"))?;
    assert!(
        poisoned.reason.starts_with("attempts_exhausted"),
        "{poisoned:?}"
    );
    assert_eq!(poisoned.attempts, 1);
    assert!(poisoned.job_fields.contains_key("msgs"));
    assert!(dead.iter().any(|d| d.reason.starts_with("undecodable")));
    // Dead jobs leave the queue (acknowledged and deleted right after their dead letter).
    wait_until(TIMEOUT, POLL, || {
        let redis = redis.clone();
        async move {
            let queued: u64 = redis.xlen("llm:requests").await?;
            Ok((queued == 0).then_some(()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_takes_no_new_ones_and_exits_zero() -> anyhow::Result<()>
{
    let mut stack = stack_with(1, |p| p.shutdown_grace_secs = 10).await?;
    let prompt = "finish me [[mock tokens=150 delay_ms=10]]";
    let started = stack.start_chat("drain", prompt).await?;
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    let mut events = read_events(&mut connection, 11).await?;
    stack.producers[0].process.sigterm()?;
    let term_at = Instant::now();
    let draining = &stack.producers[0].process;
    wait_until(TIMEOUT, POLL, || async {
        Ok(draining
            .log_tail(50)
            .await
            .contains("stopped claiming")
            .then_some(()))
    })
    .await?;
    // Asked after the producer stopped claiming: it must stay queued for another producer.
    let late = stack
        .start_chat("late", "too late [[mock tokens=3]]")
        .await?;

    let status = stack.producers[0]
        .process
        .wait_exit(Duration::from_secs(12))
        .await?;
    assert!(status.success(), "{status:?}");
    assert!(term_at.elapsed() < Duration::from_secs(10));

    events.extend(connection.collect_to_end(TIMEOUT).await?);
    let events = payloads(&events)?;
    assert_eq!(text_of(&events), expected_text(prompt, 150));
    assert_eq!(sequences(&events), (1..=150).collect::<Vec<_>>());
    assert_eq!(
        events.last().cloned().unwrap_or_default()["type"],
        "complete"
    );

    let redis = stack.redis_client().await?;
    let queued: u64 = redis.xlen("llm:requests").await?;
    assert_eq!(queued, 1, "the late job was taken or lost");
    let late_events = stream_in_redis(&stack, "late").await?;
    assert_eq!(late_events.len(), 1, "only its start: {late_events:?}");
    drop(late);
    Ok(())
}

#[tokio::test]
async fn sigterm_past_the_grace_period_hands_the_request_to_another_producer() -> anyhow::Result<()>
{
    // A long lease: the hand-back, not the lease running out, must bring the quick restart.
    let mut stack = stack_with(2, |p| {
        p.shutdown_grace_secs = 1;
        p.lease_ms = 20000;
        p.lease_renew_ms = 1000;
        p.reclaim_interval_ms = 250;
    })
    .await?;
    let prompt = "too long to drain [[mock tokens=300 delay_ms=10]]";
    let started = stack.start_chat("handback", prompt).await?;
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    let mut events = read_events(&mut connection, 11).await?;
    let holder = job_holder(&stack).await?;
    stack.producers[holder].process.sigterm()?;
    let term_at = Instant::now();

    let status = stack.producers[holder]
        .process
        .wait_exit(Duration::from_secs(6))
        .await?;
    assert!(status.success(), "{status:?}");
    assert!(
        term_at.elapsed() < Duration::from_secs(4),
        "{:?}",
        term_at.elapsed()
    );

    events.extend(connection.collect_to_end(TIMEOUT).await?);
    let events = payloads(&events)?;
    assert_restarted_once(&events, prompt, 300);
    assert!(term_at.elapsed() < Duration::from_secs(15));
    Ok(())
}

#[tokio::test]
async fn cancel_while_the_upstream_is_silent_hangs_up_within_a_second() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let started = stack
        .start_chat("hush", "then silence [[mock stall_after=3 tokens=10]]")
        .await?;
    let request_id = str_field(&started, "requestId")?;
    let mut connection = stack
        .open(0, str_field(&started, "streamUrl")?, &[])
        .await?;
    read_events(&mut connection, 4).await?;

    let cancelled_at = Instant::now();
    assert_eq!(stack.cancel(0, request_id).await?, 202);
    // No token flows, so only the producer's cancel poll can notice: SPEC says within 1 s.
    wait_until(Duration::from_secs(1), POLL, || async {
        Ok((mock_stats(&stack).await?["streams_disconnected"] == 1).then_some(()))
    })
    .await?;
    assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    let rest = payloads(&connection.collect_to_end(TIMEOUT).await?)?;
    assert_eq!(types(&rest), ["complete"]);
    assert_eq!(rest[0]["finishReason"], "cancelled");
    assert_eq!(rest[0]["usage"]["completionTokens"], 3);
    Ok(())
}

/// Names of the consumers of `llm:producers` on the jobs stream, sorted.
async fn producer_consumers(redis: &Client) -> anyhow::Result<Vec<String>> {
    let consumers = group_consumers(redis, RedisKey::requests().as_str(), PRODUCER_GROUP).await?;
    let mut names: Vec<String> = consumers.into_iter().map(|c| c.name).collect();
    names.sort();
    Ok(names)
}

/// A consumer left in `llm:producers` by a producer that died long ago (nothing pending) is
/// removed; two live producers with no traffic at all for longer than the limit keep each
/// other (on Redis 7.0 only their own marks keep their idle time short).
#[tokio::test]
async fn a_long_dead_producer_leaves_the_group_and_idle_live_ones_stay() -> anyhow::Result<()> {
    const DEAD_SECS: u64 = 8;
    let stack = stack_with(2, |producer| producer.dead_consumer_secs = DEAD_SECS).await?;
    let redis = stack.redis_client().await?;
    let live = wait_until(TIMEOUT, POLL, || async {
        let names = producer_consumers(&redis).await?;
        Ok((names.len() == 2).then_some(names))
    })
    .await?;
    // Taken before Redis creates the consumer, so that it is no later than Redis's own start
    // of its idle time.
    let gone_at = Instant::now();
    let _: i64 = redis
        .xgroup_createconsumer(
            RedisKey::requests().as_str(),
            PRODUCER_GROUP,
            "gone-producer",
        )
        .await?;
    let left = wait_until(Duration::from_secs(DEAD_SECS) + TIMEOUT, POLL, || async {
        let names = producer_consumers(&redis).await?;
        Ok((!names.iter().any(|name| name == "gone-producer")).then_some(names))
    })
    .await?;
    assert!(
        // Redis counts idle time in whole milliseconds.
        gone_at.elapsed() >= Duration::from_secs(DEAD_SECS) - Duration::from_millis(2),
        "removed after {:?}, before it was idle {DEAD_SECS} s",
        gone_at.elapsed()
    );
    assert_eq!(
        left, live,
        "the live producers, idle longer than the limit, stay"
    );
    Ok(())
}
