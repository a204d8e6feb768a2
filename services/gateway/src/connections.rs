//! The connection manager: which SSE connections are open, per session.
//!
//! Each gateway keeps its own connections in memory (registered when a stream opens, removed
//! by a guard the moment its delivery task ends) and mirrors them into a shared view in Redis
//! (`llm:conns:{session}` scored by expiry, details in `llm:conninfo:{session}`), renewed by a
//! heartbeat. A gateway that dies stops renewing, so its connections vanish after the TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use service_kit::lifecycle::Lifecycle;
use stream_io::StreamIoError;
use stream_schema::{RequestId, SessionId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A snapshot of one connection; its JSON shape is the shared view's (`stream-schema`).
pub use stream_schema::ConnectionInfo;

struct Live {
    info: ConnectionInfo,
    /// Incremented by the connection's delivery task, read by listings and heartbeats.
    events_sent: Arc<AtomicU64>,
}

impl Live {
    fn snapshot(&self) -> ConnectionInfo {
        ConnectionInfo {
            events_sent: self.events_sent.load(Ordering::Relaxed),
            ..self.info.clone()
        }
    }
}

#[derive(Clone)]
pub struct Connections {
    /// Connection id → live connection of this gateway. Written on open/close, read by
    /// listings and the heartbeat.
    live: Arc<Mutex<HashMap<String, Live>>>,
    gateway_id: Arc<str>,
    /// Reads of the shared view; `None` in unit tests.
    redis: Option<Pool>,
    /// Writes to the shared view, applied in order by one task: a removal can never be
    /// overtaken by an earlier registration or heartbeat (which would list a closed
    /// connection until its TTL).
    view: Option<mpsc::UnboundedSender<ViewOp>>,
}

/// One change to the shared view.
enum ViewOp {
    Publish(Vec<ConnectionInfo>),
    Remove(SessionId, String),
}

/// Removes its connection (here and in the shared view) when dropped.
pub struct ConnectionGuard {
    pub connection_id: String,
    pub events_sent: Arc<AtomicU64>,
    session_id: SessionId,
    registry: Connections,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry.remove(&self.session_id, &self.connection_id);
    }
}

fn now_ms() -> u64 {
    stream_schema::now_millis()
}

impl Connections {
    /// Must be called inside a Tokio runtime when `redis` is given: it starts the view writer,
    /// tracked by `lifecycle` so shutdown waits for the last removals to be written.
    pub fn new(
        gateway_id: String,
        redis: Option<Pool>,
        ttl: Duration,
        lifecycle: &Lifecycle,
    ) -> Self {
        let view = redis.clone().map(|pool| {
            let (tx, rx) = mpsc::unbounded_channel();
            lifecycle.spawn(write_view_in_order(
                pool,
                rx,
                ttl,
                lifecycle.shutdown().clone(),
            ));
            tx
        });
        Self {
            live: Arc::default(),
            gateway_id: gateway_id.into(),
            redis,
            view,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Live>) -> T) -> T {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut live)
    }

    pub fn register(
        &self,
        session_id: SessionId,
        request_id: Option<RequestId>,
    ) -> ConnectionGuard {
        let connection_id = new_connection_id();
        let events_sent = Arc::new(AtomicU64::new(0));
        let info = ConnectionInfo {
            connection_id: connection_id.clone(),
            session_id: session_id.clone(),
            request_id,
            gateway_id: self.gateway_id.to_string(),
            connected_since: now_ms(),
            events_sent: 0,
        };
        self.publish(vec![info.clone()]);
        self.with(|live| {
            live.insert(
                connection_id.clone(),
                Live {
                    info,
                    events_sent: events_sent.clone(),
                },
            )
        });
        metrics::gauge!("gateway_sse_connections").increment(1.0);
        ConnectionGuard {
            connection_id,
            events_sent,
            session_id,
            registry: self.clone(),
        }
    }

    fn remove(&self, session_id: &SessionId, connection_id: &str) {
        if self.with(|live| live.remove(connection_id)).is_some() {
            metrics::gauge!("gateway_sse_connections").decrement(1.0);
        }
        if let Some(view) = &self.view {
            let _ = view.send(ViewOp::Remove(session_id.clone(), connection_id.to_owned()));
        }
    }

    /// Writes (or renews) connections in the shared view, in the background.
    fn publish(&self, infos: Vec<ConnectionInfo>) {
        if let Some(view) = &self.view
            && !infos.is_empty()
        {
            let _ = view.send(ViewOp::Publish(infos));
        }
    }

    /// Renews this gateway's connections every `interval` until shutdown.
    pub async fn heartbeat(self, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let infos: Vec<ConnectionInfo> =
                self.with(|live| live.values().map(Live::snapshot).collect());
            self.publish(infos);
        }
    }

    /// This gateway's connections of a session.
    pub fn local_for_session(&self, session_id: &SessionId) -> Vec<ConnectionInfo> {
        self.with(|live| {
            let mut list: Vec<ConnectionInfo> = live
                .values()
                .filter(|c| &c.info.session_id == session_id)
                .map(Live::snapshot)
                .collect();
            list.sort_by_key(|c| c.connected_since);
            list
        })
    }

    /// Every gateway's live connections of a session, from the shared view. Entries whose
    /// gateway stopped renewing them are dropped here.
    pub async fn for_session(
        &self,
        session_id: &SessionId,
    ) -> Result<Vec<ConnectionInfo>, StreamIoError> {
        let Some(redis) = &self.redis else {
            return Ok(self.local_for_session(session_id));
        };
        stream_io::connections::list(redis.next(), session_id, now_ms()).await
    }

    pub fn count(&self) -> usize {
        self.with(|live| live.len())
    }
}

/// The view writer: applies changes in the order they were made; the entries expire by
/// themselves after the TTL when a write fails.
async fn write_view_in_order(
    pool: Pool,
    mut ops: mpsc::UnboundedReceiver<ViewOp>,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let ttl_secs = ttl.as_secs();
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    loop {
        let op = tokio::select! {
            op = ops.recv() => op,
            // After shutdown it keeps writing while streams end (their removals), and stops once
            // nothing came for a while: a `Connections` handle that outlives the server must not
            // keep shutdown waiting.
            () = quiet_after(&shutdown) => None,
        };
        let Some(op) = op else { break };
        let result = match op {
            ViewOp::Publish(infos) => write_view(&pool, &infos, now_ms() + ttl_ms, ttl_secs).await,
            ViewOp::Remove(session_id, connection_id) => {
                remove_from_view(&pool, &session_id, &connection_id).await
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "cannot update the shared connection view");
        }
    }
}

/// Resolves once `shutdown` is cancelled and then [`VIEW_QUIET`] passes.
async fn quiet_after(shutdown: &CancellationToken) {
    shutdown.cancelled().await;
    tokio::time::sleep(VIEW_QUIET).await;
}

/// How long the view writer waits for more removals after shutdown.
const VIEW_QUIET: Duration = Duration::from_secs(1);

async fn remove_from_view(
    pool: &Pool,
    session_id: &SessionId,
    connection_id: &str,
) -> Result<(), StreamIoError> {
    stream_io::connections::remove(pool.next(), session_id, connection_id).await
}

async fn write_view(
    redis: &Pool,
    infos: &[ConnectionInfo],
    expiry: u64,
    ttl_secs: u64,
) -> Result<(), StreamIoError> {
    stream_io::connections::publish(redis.next(), infos, expiry, ttl_secs).await
}

/// `sse_<uuid>`: unique across gateway replicas.
pub fn new_connection_id() -> String {
    format!("sse_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_guard_removes_its_connection() -> Result<(), stream_schema::IdError> {
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let connections =
            Connections::new("gw".to_owned(), None, Duration::from_secs(15), &lifecycle);
        let session = SessionId::parse("s")?;
        let guard = connections.register(session.clone(), None);
        guard.events_sent.fetch_add(3, Ordering::Relaxed);
        let listed = connections.local_for_session(&session);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].events_sent, 3);
        assert_eq!(listed[0].gateway_id, "gw");
        drop(guard);
        assert!(connections.local_for_session(&session).is_empty());
        Ok(())
    }
}
