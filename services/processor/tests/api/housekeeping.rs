//! Removal of dead consumers from `llm:processors`: a live processor is never taken for a dead
//! one, however long it has had no traffic (Redis 7.0 does not reset a consumer's idle time on
//! an empty blocking read, so the processor marks itself seen).

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use fred::types::Value;
use processor::housekeeping::Housekeeping;
use stream_io::groups;
use stream_schema::RedisKey;
use stream_schema::keys::PROCESSOR_GROUP;
use test_support::{RedisServer, wait_until};

use crate::{TIMEOUT, TestProcessor};

const POLL: Duration = Duration::from_millis(50);

/// `(name, pending, idle ms)` of every consumer of the group on `key`.
async fn consumers(redis: &Client, key: &RedisKey) -> anyhow::Result<Vec<(String, i64, i64)>> {
    let reply: Value = redis.xinfo_consumers(key.as_str(), PROCESSOR_GROUP).await?;
    let Value::Array(consumers) = reply else {
        return Ok(Vec::new());
    };
    consumers
        .into_iter()
        .map(|consumer| {
            let fields: Vec<Value> = consumer.into_array();
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|pair| pair[0].as_str().as_deref() == Some(name))
                    .map(|pair| pair[1].clone())
                    .with_context(|| format!("no {name} in {fields:?}"))
            };
            Ok((
                field("name")?.into_string().context("name")?,
                field("pending")?.as_i64().context("pending")?,
                field("idle")?.as_i64().context("idle")?,
            ))
        })
        .collect()
}

#[tokio::test]
async fn a_consumer_marked_seen_is_kept_and_a_silent_one_removed() -> anyhow::Result<()> {
    const MIN_IDLE_MS: u64 = 1_000;
    let redis_server = RedisServer::start().await?;
    let redis = redis_server.client().await?;
    let key = RedisKey::events_shard(0);
    groups::ensure_group(&redis, &key, PROCESSOR_GROUP).await?;
    // Both consumers read and ack one entry each, then have no traffic.
    for consumer in ["live", "silent"] {
        let _: String = redis
            .xadd(key.as_str(), false, None, "*", ("field", "value"))
            .await?;
        let read = groups::read_new(
            &redis,
            PROCESSOR_GROUP,
            consumer,
            std::slice::from_ref(&key),
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
        groups::ack(&redis, key.as_str(), PROCESSOR_GROUP, &ids).await?;
    }
    wait_until(TIMEOUT, POLL, || {
        let (redis, key) = (&redis, &key);
        async move {
            let all = consumers(redis, key).await?;
            let idle = all.len() == 2 && all.iter().all(|(_, _, idle)| *idle >= MIN_IDLE_MS as i64);
            Ok(idle.then_some(()))
        }
    })
    .await
    .context("the consumers never became idle")?;
    // An empty blocking read of new entries (what a live processor does without traffic)...
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
    // ...then the mark the processor sets before it looks for dead consumers.
    groups::mark_seen(&redis, &key, PROCESSOR_GROUP, "live").await?;

    let removed = Housekeeping::default()
        .remove_dead_consumers(&redis, &key, PROCESSOR_GROUP, "remover", MIN_IDLE_MS)
        .await?;
    assert_eq!(removed, vec!["silent".to_owned()]);
    let left: Vec<String> = consumers(&redis, &key)
        .await?
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(left, vec!["live".to_owned()]);
    Ok(())
}

#[tokio::test]
async fn a_processor_without_traffic_is_a_consumer_of_every_shard() -> anyhow::Result<()> {
    let processor = TestProcessor::start(|settings| {
        settings.processor.consumer_name = "idle-processor".to_owned();
    })
    .await?;
    let shards = service_kit::Settings::default().streams.event_shards;
    // No record is ever written: only the processor's own mark makes it a consumer.
    wait_until(TIMEOUT, POLL, || {
        let redis = &processor.redis;
        async move {
            for shard in 0..shards {
                let names: Vec<String> = consumers(redis, &RedisKey::events_shard(shard))
                    .await?
                    .into_iter()
                    .map(|(name, _, _)| name)
                    .collect();
                if names != ["idle-processor"] {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await
    .context("the idle processor is not a consumer of every shard")?;
    processor.stop().await
}
