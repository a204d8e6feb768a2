//! The job backlog as gauges: `producer_group_lag` (jobs not yet delivered to any producer) and
//! `producer_group_pending` (delivered, not yet acknowledged: running or waiting for reclaim)
//! from `XINFO GROUPS llm:requests`, with `producer_in_flight` the autoscaling signals.
//!
//! Every producer reports the same group, so dashboards and alerts take `max` over replicas.

use std::time::Duration;

use fred::prelude::*;
use stream_io::groups;
use stream_schema::RedisKey;
use stream_schema::keys::PRODUCER_GROUP;
use tokio_util::sync::CancellationToken;

/// How often the group is read: one cheap `XINFO GROUPS`, often enough for an autoscaler.
pub const EVERY: Duration = Duration::from_secs(2);

/// Exports the gauges every [`EVERY`] until `stop`. A failed read is only logged (Redis down
/// already shows in `/readyz` and the loops' errors); the gauges keep their last value.
pub async fn export(redis: Pool, stop: CancellationToken) {
    let key = RedisKey::requests();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match groups::group_state(redis.next(), &key, PRODUCER_GROUP).await {
            Ok(Some(state)) => {
                #[expect(clippy::cast_precision_loss, reason = "gauges are f64")]
                {
                    metrics::gauge!("producer_group_pending").set(state.pending as f64);
                    if let Some(lag) = state.lag {
                        metrics::gauge!("producer_group_lag").set(lag as f64);
                    }
                }
            }
            // The claimer creates the group (and the stream) at start; until then nothing to say.
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "cannot read the producer group's state"),
        }
    }
}
