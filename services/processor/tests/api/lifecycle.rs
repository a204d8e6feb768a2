//! A shard loop that dies is restarted by the supervisor, and `/readyz` tells the truth while
//! it is down.

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use stream_schema::RedisKey;
use test_support::wait_until;

use crate::{TIMEOUT, TestProcessor};

const POLL: Duration = Duration::from_millis(20);

/// `/readyz`'s status and its list of stopped loops.
async fn readiness(http: &reqwest::Client, base: &str) -> anyhow::Result<(u16, Vec<String>)> {
    let response = http.get(format!("{base}/readyz")).send().await?;
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await?;
    let stopped = body["stoppedLoops"]
        .as_array()
        .context("stoppedLoops")?
        .iter()
        .filter_map(|name| name.as_str().map(str::to_owned))
        .collect();
    Ok((status, stopped))
}

/// `loop_restarts_total{loop="<name>"}` from `/metrics` (0 before the first restart).
async fn restarts(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let prefix = format!("loop_restarts_total{{loop=\"{name}\"}} ");
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_loop_is_restarted_and_readiness_reports_it_while_down() -> anyhow::Result<()>
{
    // Arrange: a processor with two shards, ready.
    let processor = TestProcessor::start(|settings| {
        settings.streams.event_shards = 2;
        // Short blocking reads: a read parked on the shard's stream notices the damage soon.
        settings.processor.block_ms = 100;
    })
    .await?;
    let (redis, base) = (&processor.redis, processor.base.as_str());
    let http = reqwest::Client::builder().no_proxy().build()?;
    wait_until(TIMEOUT, POLL, || async {
        Ok(readiness(&http, base).await?.0.eq(&200).then_some(()))
    })
    .await
    .context("processor never became ready")?;

    // Act: shard 1's stream becomes a string, so every command of its loop fails (WRONGTYPE)
    // and every run of the loop dies at once; shard 0 is untouched.
    let key = RedisKey::events_shard(1);
    let _: () = redis.del(key.as_str()).await?;
    let _: () = redis
        .set(key.as_str(), "not a stream", None, None, false)
        .await?;

    // Assert: restarted again and again, and reported down the whole time, alone.
    wait_until(TIMEOUT, POLL, || async {
        Ok((restarts(&http, base, "shard-1").await? >= 2).then_some(()))
    })
    .await
    .context("the dead shard loop was not restarted")?;
    let (status, stopped) = readiness(&http, base).await?;
    assert_eq!(status, 503);
    assert_eq!(stopped, ["shard-1"]);
    assert_eq!(restarts(&http, base, "shard-0").await?, 0);

    // Act: the stream is gone again; the next restart creates it with its group.
    let _: () = redis.del(key.as_str()).await?;

    // Assert: the restarted loop runs and the processor is ready again.
    wait_until(TIMEOUT, POLL, || async {
        Ok(readiness(&http, base).await?.0.eq(&200).then_some(()))
    })
    .await
    .context("the restarted shard loop never reported ready")?;

    processor.stop().await
}
