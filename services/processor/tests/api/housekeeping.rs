//! The processor's housekeeping: with no traffic at all it is still a consumer of every shard
//! (its own mark, `stream_io::groups::DeadConsumers`), so other processors never take it for
//! a dead one.

use std::time::Duration;

use anyhow::Context;
use stream_schema::RedisKey;
use stream_schema::keys::PROCESSOR_GROUP;
use test_support::{group_consumers, wait_until};

use crate::{TIMEOUT, TestProcessor};

const POLL: Duration = Duration::from_millis(50);

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
                let key = RedisKey::events_shard(shard);
                let consumers = group_consumers(redis, key.as_str(), PROCESSOR_GROUP).await?;
                if consumers
                    .iter()
                    .map(|c| c.name.as_str())
                    .ne(["idle-processor"])
                {
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
