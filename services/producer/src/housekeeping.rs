//! Removal of producers that died long ago from `llm:producers`. Each producer gets a new
//! consumer name at every start (hostname-pid), so without it the group's consumer list grows
//! with every restart and deploy. Only consumers with nothing pending go: a dead producer's
//! jobs are reclaimed first (`claimer`), once their lease has run out.

use std::time::Duration;

use fred::prelude::*;
use stream_io::groups::DeadConsumers;
use stream_schema::RedisKey;
use stream_schema::keys::PRODUCER_GROUP;
use tokio_util::sync::CancellationToken;

/// How often a producer marks itself seen and looks for dead consumers.
pub const EVERY: Duration = Duration::from_secs(5);

/// Every [`EVERY`] until `stop`: marks `own` seen and removes the group's other consumers idle
/// for `min_idle_ms` with nothing pending. Failures are only logged: nothing else needs it.
pub async fn remove_dead_consumers(
    redis: Pool,
    own: String,
    min_idle_ms: u64,
    stop: CancellationToken,
) {
    let key = RedisKey::requests();
    let dead = DeadConsumers::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match dead
            .remove(redis.next(), &key, PRODUCER_GROUP, &own, min_idle_ms)
            .await
        {
            Ok(removed) => {
                for name in removed {
                    tracing::info!(consumer = %name, "removed dead consumer");
                    metrics::counter!("producer_dead_consumers_removed_total").increment(1);
                }
            }
            // Before the claimer has created the group there is nothing to do.
            Err(error) => tracing::debug!(%error, "cannot remove dead consumers"),
        }
    }
}
