//! Connecting to Redis (single node, TLS or cluster) with the timeouts and reconnect policy that
//! make the system fail fast while Redis is down and recover by itself when it returns.

use std::time::Duration;

use fred::prelude::*;

use crate::config::RedisSettings;

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid redis.url: {0}")]
    Url(fred::error::Error),
    #[error("cannot create Redis client: {0}")]
    Build(fred::error::Error),
}

fn builder(settings: &RedisSettings) -> Result<Builder, RedisSetupError> {
    let config = Config::from_url(&settings.url).map_err(RedisSetupError::Url)?;
    let mut builder = Builder::from_config(config);
    let command_timeout = Duration::from_millis(settings.command_timeout_ms);
    let connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
    builder
        .with_config(|config| {
            // Keep retrying the first connection too: a service started before Redis becomes
            // ready once Redis is up (its /readyz says 503 meanwhile).
            config.fail_fast = false;
        })
        .with_connection_config(|config| {
            config.connection_timeout = connect_timeout;
            config.internal_command_timeout = connect_timeout;
            // A command interrupted by a dropped connection is retried once, not thrice, so a
            // caller learns about an outage within its timeout.
            config.max_command_attempts = 2;
            // fred leaves Nagle's algorithm on: a command written while an earlier one on the
            // connection is unacknowledged would wait for that ACK, and fred pipelines the
            // commands of concurrent callers on one connection. Redis disables it on its side.
            config.tcp.nodelay = Some(true);
        })
        .with_performance_config(|config| {
            config.default_command_timeout = command_timeout;
        })
        // Reconnect forever, 100 ms doubling to 2 s: services heal without a restart.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// A pool for request handlers and ordinary commands. Call `init()` on it.
pub fn pool(settings: &RedisSettings) -> Result<Pool, RedisSetupError> {
    builder(settings)?
        .build_pool(settings.pool_size)
        .map_err(RedisSetupError::Build)
}

/// A dedicated client for blocking reads (`XREAD BLOCK`, `XREADGROUP BLOCK`): a blocking command
/// occupies its connection, so it never shares the request pool. Its command timeout is
/// disabled because a blocking read legitimately waits.
pub fn blocking_client(settings: &RedisSettings) -> Result<Client, RedisSetupError> {
    let mut builder = builder(settings)?;
    builder.with_performance_config(|config| {
        config.default_command_timeout = Duration::ZERO;
    });
    builder.build().map_err(RedisSetupError::Build)
}

/// Starts connecting `client` (reconnecting forever in the background) and waits up to
/// `connect_timeout_ms` for the first connection. A service whose Redis is not up yet still
/// starts: its `/readyz` answers 503 and its commands fail fast until Redis is reachable.
pub async fn start<C: ClientLike>(client: &C, settings: &RedisSettings) {
    let _connection_task = client.connect();
    let wait = Duration::from_millis(settings.connect_timeout_ms);
    match tokio::time::timeout(wait, client.wait_for_connect()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "redis not reachable yet; retrying in the background")
        }
        Err(_) => tracing::warn!("redis not reachable yet; retrying in the background"),
    }
}

/// Exports the pool's Redis health as metrics until `shutdown`, read from fred every 10 s:
/// `redis_commands_total`, `redis_command_latency_avg_seconds` and
/// `redis_command_latency_max_seconds` over the last interval, and
/// `redis_connection_errors_total`.
pub async fn observe(pool: Pool, shutdown: tokio_util::sync::CancellationToken) {
    let mut errors = pool.next().error_rx();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = errors.recv() => match received {
                    Ok(_) => metrics::counter!("redis_connection_errors_total").increment(1),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        metrics::counter!("redis_connection_errors_total").increment(missed);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                () = stop.cancelled() => return,
            }
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let mut samples = 0u64;
        let mut sum_ms = 0i64;
        let mut max_ms = 0i64;
        for client in pool.clients() {
            let stats = client.take_latency_metrics();
            samples += stats.samples;
            sum_ms += stats.sum;
            max_ms = max_ms.max(stats.max);
        }
        metrics::counter!("redis_commands_total").increment(samples);
        if samples > 0 {
            metrics::gauge!("redis_command_latency_avg_seconds")
                .set(sum_ms as f64 / samples as f64 / 1000.0);
        }
        metrics::gauge!("redis_command_latency_max_seconds").set(max_ms as f64 / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection, pooled or blocking, is opened with `TCP_NODELAY`.
    #[test]
    fn connections_disable_nagles_algorithm() -> Result<(), RedisSetupError> {
        let settings = RedisSettings::default();
        assert_eq!(
            builder(&settings)?.get_connection_config().tcp.nodelay,
            Some(true)
        );
        let blocking = blocking_client(&settings)?;
        assert_eq!(blocking.connection_config().tcp.nodelay, Some(true));
        let pool = pool(&settings)?;
        assert!(
            pool.clients()
                .iter()
                .all(|client| client.connection_config().tcp.nodelay == Some(true))
        );
        Ok(())
    }
}
