//! `processor.gather_ms`: records that arrive while a shard's loop gathers after a short batch
//! are applied together, in one script call.

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use stream_io::records::EventLog;
use stream_schema::stats::field::TOKENS_STREAMED;
use stream_schema::{EventRecord, ModelId, RedisKey, RequestId, SessionId};
use test_support::wait_until;

use crate::{TIMEOUT, TestProcessor};

const POLL: Duration = Duration::from_millis(10);

fn tokens(session: &SessionId, model: &ModelId, count: u32) -> EventRecord {
    EventRecord::Tokens {
        request_id: RequestId::new(),
        session_id: session.clone(),
        model_id: model.clone(),
        count,
        timestamp: stream_schema::now_millis(),
    }
}

/// How many times Redis has run `ZADD`: only the apply script runs it (its ledger insert, once
/// per call that applies anything), so it counts applied batches.
async fn zadd_calls(redis: &Client) -> anyhow::Result<u64> {
    Ok(test_support::command_calls(redis)
        .await?
        .get("zadd")
        .copied()
        .unwrap_or(0))
}

async fn streamed(redis: &Client, key: &RedisKey) -> anyhow::Result<i64> {
    let value: Option<i64> = redis.hget(key.as_str(), TOKENS_STREAMED).await?;
    Ok(value.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_arrive_while_a_shard_gathers_are_applied_in_one_batch() -> anyhow::Result<()>
{
    // Arrange: one shard, a gathering window long enough to be unmistakable.
    let processor = TestProcessor::start(|settings| {
        settings.streams.event_shards = 1;
        settings.processor.gather_ms = 1_500;
    })
    .await?;
    let redis = &processor.redis;
    let log = EventLog {
        shards: 1,
        maxlen: service_kit::Settings::default().streams.events_maxlen,
    };
    let model = ModelId::parse("gather-model")?;
    let model_stats = RedisKey::model_stats(0, &model);

    // Act: one record, applied alone (the loop was waiting); then five more at once, while the
    // loop gathers after that one-record batch.
    log.append(redis, &tokens(&SessionId::parse("s0")?, &model, 1), None)
        .await?;
    wait_until(TIMEOUT, POLL, || async {
        Ok((streamed(redis, &model_stats).await? == 1).then_some(()))
    })
    .await
    .context("the first record was never applied")?;
    let applies_before = zadd_calls(redis).await?;
    for n in 1..=5 {
        let session = SessionId::parse(&format!("s{n}"))?;
        log.append(redis, &tokens(&session, &model, 10), None)
            .await?;
    }

    // Assert: all five counted, by one apply.
    wait_until(TIMEOUT, POLL, || async {
        Ok((streamed(redis, &model_stats).await? == 51).then_some(()))
    })
    .await
    .context("the five records were never applied")?;
    assert_eq!(zadd_calls(redis).await? - applies_before, 1);

    processor.stop().await
}
