//! `groups::DeadConsumers` against a real redis-server: a live member of a group is never taken
//! for a dead one, however long it has had no traffic (Redis 7.0 does not reset a consumer's
//! idle time on an empty blocking read, so the script marks its caller seen first), and the
//! mark leaves the caller's pending entries to `XAUTOCLAIM`.

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use stream_io::groups::{self, DeadConsumers};
use stream_schema::RedisKey;
use stream_schema::keys::PROCESSOR_GROUP;
use test_support::{RedisServer, group_consumers, wait_until};

const TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// Waits until every consumer of the group on `key` is idle at least `ms`.
async fn all_idle(redis: &Client, key: &RedisKey, ms: u64) -> anyhow::Result<()> {
    wait_until(TIMEOUT, POLL, || async move {
        let all = group_consumers(redis, key.as_str(), PROCESSOR_GROUP).await?;
        let idle = !all.is_empty() && all.iter().all(|c| c.idle_ms >= ms as i64);
        Ok(idle.then_some(()))
    })
    .await
    .context("the consumers never became idle")
}

/// Reads one new entry as `consumer`; acks it when `ack`.
async fn take_one(redis: &Client, key: &RedisKey, consumer: &str, ack: bool) -> anyhow::Result<()> {
    let _: String = redis
        .xadd(key.as_str(), false, None, "*", ("field", "value"))
        .await?;
    let read = groups::read_new(
        redis,
        PROCESSOR_GROUP,
        consumer,
        std::slice::from_ref(key),
        1,
        100,
    )
    .await?;
    let ids: Vec<_> = read
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 1);
    if ack {
        groups::ack(redis, key.as_str(), PROCESSOR_GROUP, &ids).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_consumer_that_ran_housekeeping_is_kept_and_a_silent_one_removed() -> anyhow::Result<()> {
    const MIN_IDLE_MS: u64 = 1_000;
    let redis_server = RedisServer::start().await?;
    let redis = redis_server.client().await?;
    let key = RedisKey::events_shard(0);
    groups::ensure_group(&redis, &key, PROCESSOR_GROUP).await?;
    // Both read and ack one entry each, then have no traffic past the limit.
    take_one(&redis, &key, "live", true).await?;
    take_one(&redis, &key, "silent", true).await?;
    all_idle(&redis, &key, MIN_IDLE_MS).await?;
    // An empty blocking read of new entries (what a live member does without traffic)
    // does not make it look live on Redis 7.0; its own housekeeping does.
    let read = groups::read_new(
        &redis,
        PROCESSOR_GROUP,
        "live",
        std::slice::from_ref(&key),
        1,
        10,
    )
    .await?;
    assert!(read.iter().all(|(_, entries)| entries.is_empty()));
    let housekeeping = DeadConsumers::default();
    let removed = housekeeping
        .remove(&redis, &key, PROCESSOR_GROUP, "live", MIN_IDLE_MS)
        .await?;
    assert_eq!(removed, vec!["silent".to_owned()]);

    // Another member's housekeeping right after: "live" marked itself, so it stays.
    let removed = housekeeping
        .remove(&redis, &key, PROCESSOR_GROUP, "other", MIN_IDLE_MS)
        .await?;
    assert_eq!(removed, Vec::<String>::new());
    let left: Vec<String> = group_consumers(&redis, key.as_str(), PROCESSOR_GROUP)
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(left, vec!["live".to_owned(), "other".to_owned()]);
    Ok(())
}

/// The mark touches none of the consumer's pending entries: a record that failed and stays
/// pending still becomes idle enough for `XAUTOCLAIM` to retry it.
#[tokio::test]
async fn housekeeping_leaves_the_own_pending_entries_idle() -> anyhow::Result<()> {
    const MIN_IDLE_MS: u64 = 500;
    let redis_server = RedisServer::start().await?;
    let redis = redis_server.client().await?;
    let key = RedisKey::events_shard(0);
    groups::ensure_group(&redis, &key, PROCESSOR_GROUP).await?;
    take_one(&redis, &key, "holder", false).await?;
    all_idle(&redis, &key, MIN_IDLE_MS).await?;
    DeadConsumers::default()
        .remove(&redis, &key, PROCESSOR_GROUP, "holder", MIN_IDLE_MS)
        .await?;
    let (_, claimed) = groups::autoclaim(
        &redis,
        &key,
        PROCESSOR_GROUP,
        "holder",
        MIN_IDLE_MS,
        "0-0",
        10,
    )
    .await?;
    assert_eq!(claimed.len(), 1, "the failed record is retried");
    Ok(())
}
