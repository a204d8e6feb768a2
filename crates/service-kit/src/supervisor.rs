//! A supervisor for a service's internal loops (readers, consumers, claimers): a loop that
//! returns early or panics is restarted with backoff and counted in
//! `loop_restarts_total{loop}`; its readiness flag is down while it is not running.
//! [`crate::lifecycle::Lifecycle::supervise`] spawns a loop under it, tracked and registered
//! for `/readyz`.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::ops::LoopFlag;

/// How a supervised loop is restarted.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Delay before each restart.
    pub backoff: Backoff,
    /// A run this long counts as healthy: the next restart waits the shortest delay again.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            healthy_after: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// For loops that end on any error and leave the retry to the supervisor (the processor's
    /// shard loops): the backoff of [`Backoff::default`].
    pub fn on_error() -> Self {
        Self {
            backoff: Backoff::default(),
            ..Self::default()
        }
    }
}

/// Runs `make_loop()` until `shutdown`, restarting it whenever it ends or panics before then.
/// Returns the number of restarts (for tests and logs).
///
/// `flag` is down from the moment a run ends until the next run sets it. A run that had set it
/// (it became ready) or that lasted `healthy_after` starts the backoff over: its end is a new
/// incident, not the next failure of the same one.
pub async fn supervise<F, Fut>(
    name: impl Into<String>,
    flag: LoopFlag,
    shutdown: CancellationToken,
    policy: RestartPolicy,
    mut make_loop: F,
) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = name.into();
    let mut restarts = 0;
    let mut backoff = policy.backoff;
    loop {
        let started = tokio::time::Instant::now();
        // A task of its own, so a panic ends only this run of the loop, not the supervisor.
        let outcome = tokio::spawn(make_loop()).await;
        let was_ready = flag.is_running();
        flag.set(false);
        if shutdown.is_cancelled() {
            return restarts;
        }
        match outcome {
            Ok(()) => tracing::error!(loop_name = %name, "loop ended unexpectedly; restarting"),
            Err(error) => tracing::error!(loop_name = %name, %error, "loop panicked; restarting"),
        }
        restarts += 1;
        metrics::counter!("loop_restarts_total", "loop" => name.clone()).increment(1);
        if was_ready || started.elapsed() >= policy.healthy_after {
            backoff.reset();
        }
        if !backoff.wait(&shutdown).await {
            return restarts;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::ops::LoopFlag;

    #[tokio::test(start_paused = true)]
    async fn a_failing_loop_is_restarted_with_backoff_and_counted() {
        let runs = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let flag = LoopFlag::standalone();
        let counter = runs.clone();
        let stop = shutdown.clone();
        let started = tokio::time::Instant::now();
        let restarts = supervise(
            "test",
            flag.clone(),
            shutdown.clone(),
            RestartPolicy::default(),
            move || {
                let counter = counter.clone();
                let stop = stop.clone();
                async move {
                    let run = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    match run {
                        1 => {}
                        #[expect(
                            clippy::panic,
                            reason = "the behaviour under test is a panicking loop"
                        )]
                        2 => panic!("boom"),
                        _ => {
                            // The third run is healthy until shutdown.
                            stop.cancel();
                        }
                    }
                }
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts, 2);
        // 100 ms then 200 ms of backoff, on the paused clock.
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(!flag.is_running());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_became_ready_starts_the_backoff_over() {
        let runs = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let flag = LoopFlag::standalone();
        let (counter, stop, run_flag) = (runs.clone(), shutdown.clone(), flag.clone());
        let started = tokio::time::Instant::now();
        let restarts = supervise(
            "test",
            flag.clone(),
            shutdown.clone(),
            RestartPolicy::default(),
            move || {
                let (counter, stop, flag) = (counter.clone(), stop.clone(), run_flag.clone());
                async move {
                    match counter.fetch_add(1, Ordering::SeqCst) + 1 {
                        // Fails at once twice (100 ms, then 200 ms of backoff)...
                        1 | 2 => {}
                        // ...then becomes ready before failing: a new incident, 100 ms again.
                        3 => flag.set(true),
                        _ => stop.cancel(),
                    }
                }
            },
        )
        .await;
        assert_eq!(restarts, 3);
        assert_eq!(started.elapsed(), Duration::from_millis(400));
        assert!(!flag.is_running());
    }
}
