//! The one backoff of every retry loop (the gateway's reader, the processor's shards, the
//! supervisor's restarts): a delay that doubles from `min` up to `max` and starts over after a
//! success.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff state. Owned by the loop that retries; not shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// The delay the next failure waits.
    next: Duration,
}

impl Backoff {
    /// Starts at `min`; `max` is raised to `min` if smaller.
    pub const fn new(min: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < min.as_nanos() {
            min
        } else {
            max
        };
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay for this failure; the next one waits twice as long, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Waits this failure's delay. False when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.cancelled() => false,
        }
    }
}

impl Default for Backoff {
    /// 100 ms doubling to 2 s: short enough that a Redis restart is noticed within seconds,
    /// long enough not to hammer a Redis that is down.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_starts_over_after_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_the_delay_or_stops_at_shutdown() {
        let mut backoff = Backoff::default();
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(backoff.wait(&shutdown).await);
        assert!(backoff.wait(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        shutdown.cancel();
        assert!(!backoff.wait(&shutdown).await);
    }
}
