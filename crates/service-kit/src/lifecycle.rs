//! One service lifecycle: the shutdown token, every task the service spawns (tracked, so
//! shutdown waits for them), its loops under the supervisor with a readiness flag each, and the
//! ops endpoints' server, stopped last so `/readyz` answers while the service drains.

use std::future::Future;
use std::net::TcpListener;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::{LoopFlag, OpsState};
use crate::supervisor::{RestartPolicy, supervise};

/// A service's tasks and shutdown. Cheap to clone: clones share the token and the tracker, so a
/// handler can spawn tracked tasks (the gateway's SSE deliveries).
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// Cancelled by SIGTERM (or a test); every loop and task watches it.
    shutdown: CancellationToken,
    /// Every task spawned through this lifecycle; `wait` waits for all of them.
    tasks: TaskTracker,
}

impl Lifecycle {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            tasks: TaskTracker::new(),
        }
    }

    /// The service's shutdown token.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Spawns a task that shutdown waits for. It must end by itself once `shutdown()` is
    /// cancelled.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Spawns `make_loop` under the supervisor (restarted with backoff whenever it ends or
    /// panics before shutdown), registered as `name` for `/readyz`: ready only while the
    /// current run has set the flag it is given.
    pub fn supervise<F, Fut>(
        &self,
        ops: &OpsState,
        name: impl Into<String>,
        policy: RestartPolicy,
        make_loop: F,
    ) -> LoopFlag
    where
        F: FnMut(LoopFlag) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let flag = ops.register_loop(name.clone());
        // Tracked: `wait` waits for it; nobody needs the handle.
        drop(self.supervise_with(flag.clone(), name, policy, make_loop));
        flag
    }

    /// Like [`Lifecycle::supervise`] with a flag of the caller's (e.g. one readiness does not
    /// check: [`LoopFlag::standalone`]). The handle ends with the supervisor (after shutdown)
    /// and yields its restart count, for a caller that must wait for this loop first.
    pub fn supervise_with<F, Fut>(
        &self,
        flag: LoopFlag,
        name: impl Into<String>,
        policy: RestartPolicy,
        make_loop: F,
    ) -> JoinHandle<u64>
    where
        F: FnMut(LoopFlag) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.supervise_until(self.shutdown.clone(), flag, name, policy, make_loop)
    }

    /// Like [`Lifecycle::supervise_with`], until `stop` instead of the service's shutdown (a
    /// loop that must outlive the service's token, like the producer's lease renewer through
    /// the grace period).
    pub fn supervise_until<F, Fut>(
        &self,
        stop: CancellationToken,
        flag: LoopFlag,
        name: impl Into<String>,
        policy: RestartPolicy,
        mut make_loop: F,
    ) -> JoinHandle<u64>
    where
        F: FnMut(LoopFlag) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (name, run_flag) = (name.into(), flag.clone());
        self.tasks
            .spawn(supervise(name, flag, stop, policy, move || {
                make_loop(run_flag.clone())
            }))
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on `listener` (producer, processor) until
    /// [`OpsServer::stop`]: not at shutdown, so readiness stays observable while draining.
    pub fn serve_ops(&self, listener: TcpListener, ops: OpsState) -> OpsServer {
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::ops::serve(listener, ops, stop.clone()));
        OpsServer { stop, task }
    }

    /// Waits for every task spawned so far and any they spawn; call after `shutdown()` is
    /// cancelled (or to wait for loops that end by themselves).
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Tasks still running (logs at shutdown).
    pub fn running(&self) -> usize {
        self.tasks.len()
    }
}

/// The running ops server of a service without an HTTP API of its own.
#[derive(Debug)]
pub struct OpsServer {
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl OpsServer {
    /// Stops the server (in-flight scrapes finish) and waits for it.
    pub async fn stop(self) -> std::io::Result<()> {
        self.stop.cancel();
        self.task.await.map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_every_tracked_task_and_loop_has_ended() {
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let finished = Arc::new(AtomicU32::new(0));
        let task_done = finished.clone();
        let stop = lifecycle.shutdown().clone();
        lifecycle.spawn(async move {
            stop.cancelled().await;
            // Work after the signal (an SSE stream's last event) is waited for.
            tokio::time::sleep(Duration::from_millis(50)).await;
            task_done.fetch_add(1, Ordering::SeqCst);
        });
        let stop = lifecycle.shutdown().clone();
        let loop_done = finished.clone();
        lifecycle.supervise_with(
            LoopFlag::standalone(),
            "test",
            RestartPolicy::default(),
            move |flag| {
                let (stop, done) = (stop.clone(), loop_done.clone());
                async move {
                    flag.set(true);
                    stop.cancelled().await;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            },
        );
        lifecycle.shutdown().cancel();
        lifecycle.wait().await;
        assert_eq!(finished.load(Ordering::SeqCst), 2);
        assert_eq!(lifecycle.running(), 0);
    }
}
