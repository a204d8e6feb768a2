//! A supervisor for a service's internal loops (readers, consumers, claimers): a loop that
//! returns early or panics is restarted with backoff and counted in
//! `loop_restarts_total{loop}`; its readiness flag is down while it is not running.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ops::LoopFlag;

/// Backoff between restarts: doubles from `min` to `max`; reset after a loop ran `healthy_after`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// Runs `make_loop()` until `shutdown`, restarting it whenever it ends or panics before then.
/// Returns the number of restarts (for tests and logs).
pub async fn supervise<F, Fut>(
    name: &'static str,
    flag: LoopFlag,
    shutdown: CancellationToken,
    backoff: Backoff,
    mut make_loop: F,
) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut restarts = 0;
    let mut delay = backoff.min;
    loop {
        let started = tokio::time::Instant::now();
        // A task of its own, so a panic ends only this run of the loop, not the supervisor.
        let outcome = tokio::spawn(make_loop()).await;
        flag.set(false);
        if shutdown.is_cancelled() {
            return restarts;
        }
        match outcome {
            Ok(()) => tracing::error!(loop_name = name, "loop ended unexpectedly; restarting"),
            Err(error) => tracing::error!(loop_name = name, %error, "loop panicked; restarting"),
        }
        restarts += 1;
        metrics::counter!("loop_restarts_total", "loop" => name).increment(1);
        if started.elapsed() >= backoff.healthy_after {
            delay = backoff.min;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return restarts,
        }
        delay = (delay * 2).min(backoff.max);
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
            Backoff::default(),
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
}
