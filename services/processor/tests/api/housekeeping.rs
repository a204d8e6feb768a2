//! The processor's housekeeping: with no traffic at all it is still a consumer of every shard
//! (its own mark, `stream_io::groups::DeadConsumers`), so other processors never take it for
//! a dead one.

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use fred::types::Value;
use stream_schema::RedisKey;
use stream_schema::keys::PROCESSOR_GROUP;
use test_support::wait_until;

use crate::{TIMEOUT, TestProcessor};

const POLL: Duration = Duration::from_millis(50);

/// Names of the consumers of the group on `key`.
async fn consumer_names(redis: &Client, key: &RedisKey) -> anyhow::Result<Vec<String>> {
    let reply: Value = redis.xinfo_consumers(key.as_str(), PROCESSOR_GROUP).await?;
    let Value::Array(consumers) = reply else {
        return Ok(Vec::new());
    };
    consumers
        .into_iter()
        .map(|consumer| {
            let fields: Vec<Value> = consumer.into_array();
            fields
                .chunks(2)
                .find(|pair| pair[0].as_str().as_deref() == Some("name"))
                .and_then(|pair| pair[1].as_string())
                .with_context(|| format!("no name in {fields:?}"))
        })
        .collect()
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
                let names = consumer_names(redis, &RedisKey::events_shard(shard)).await?;
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
