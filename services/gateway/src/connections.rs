//! The connection manager: which SSE connections are open, per session.
//!
//! Each gateway keeps its own connections in memory (registered when a stream opens, removed
//! by a guard the moment its delivery task ends) and mirrors them into a shared view in Redis
//! (`stream_io::connections`): an entry is written once when a connection opens and removed
//! when it closes, and the gateway renews one liveness key for all of them. An idle
//! connection costs Redis nothing; a gateway that dies stops renewing, and readers ignore (and
//! delete) its entries once its key has expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use service_kit::lifecycle::Lifecycle;
use stream_io::StreamIoError;
use stream_io::connections::Claim;
use stream_schema::{ConnectionId, GatewayId, RequestId, SessionId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A snapshot of one connection; its JSON shape is the shared view's (`stream-schema`).
pub use stream_schema::ConnectionInfo;

struct Live {
    info: ConnectionInfo,
    /// Incremented by the connection's delivery task, read by listings and the view writer.
    events_sent: Arc<AtomicU64>,
    /// The count last written to the shared view; written and read by the view writer.
    published_events: u64,
}

impl Live {
    fn snapshot(&self) -> ConnectionInfo {
        ConnectionInfo {
            events_sent: self.events_sent.load(Ordering::Relaxed),
            ..self.info.clone()
        }
    }
}

/// Connection id → live connection of this gateway. Written on open/close, read by listings
/// and the view writer.
type LiveTable = Arc<Mutex<HashMap<String, Live>>>;

fn lock(live: &LiveTable) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
    live.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How the view is kept in Redis.
#[derive(Debug, Clone, Copy)]
pub struct ViewSettings {
    /// How often the liveness key is renewed (and changed event counts written).
    pub renew_every: Duration,
    /// The liveness key's TTL: how long a dead gateway's connections stay listed.
    pub ttl: Duration,
}

#[derive(Clone)]
pub struct Connections {
    live: LiveTable,
    gateway_id: GatewayId,
    /// Reads of the shared view; `None` in unit tests.
    redis: Option<Pool>,
    /// Writes to the shared view, applied in order by one task: a removal can never be
    /// overtaken by an earlier registration (which would list a closed connection for as long
    /// as its gateway lives).
    view: Option<mpsc::UnboundedSender<ViewOp>>,
}

/// One change to the shared view.
enum ViewOp {
    Open(ConnectionInfo),
    Close(SessionId, String),
}

/// Removes its connection (here and in the shared view) when dropped.
pub struct ConnectionGuard {
    pub connection_id: String,
    pub events_sent: Arc<AtomicU64>,
    session_id: SessionId,
    /// `None` once forgotten: the id belongs to another connection.
    registry: Option<Connections>,
}

impl ConnectionGuard {
    /// Drops the connection from this gateway's table only: its id turned out to be another
    /// connection's, whose entry in the shared view must stay.
    fn forget(&mut self) {
        if let Some(registry) = self.registry.take()
            && registry
                .with(|live| live.remove(&self.connection_id))
                .is_some()
        {
            metrics::gauge!("gateway_sse_connections").decrement(1.0);
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.take() {
            registry.remove(&self.session_id, &self.connection_id);
        }
    }
}

fn now_ms() -> u64 {
    stream_schema::now_millis()
}

impl Connections {
    /// Must be called inside a Tokio runtime when `redis` is given: it starts the view writer,
    /// tracked by `lifecycle` so shutdown waits for the last removals to be written.
    pub fn new(
        gateway_id: GatewayId,
        redis: Option<Pool>,
        settings: ViewSettings,
        lifecycle: &Lifecycle,
    ) -> Self {
        let live = LiveTable::default();
        let view = redis.clone().map(|pool| {
            let (tx, rx) = mpsc::unbounded_channel();
            let writer = ViewWriter {
                pool,
                gateway: gateway_id.clone(),
                live: live.clone(),
                settings,
                announced: false,
            };
            lifecycle.spawn(writer.run(rx, lifecycle.shutdown().clone()));
            tx
        });
        Self {
            live,
            gateway_id,
            redis,
            view,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Live>) -> T) -> T {
        f(&mut lock(&self.live))
    }

    /// Registers a new connection. It takes the id it `requested` (the `connectionId` of its
    /// start answer, carried in the stream URL) unless another open connection holds it, here
    /// or on a live gateway (a second tab with the same URL); then it gets a fresh one. A
    /// reconnect with the same URL gets the id back once its old connection has closed.
    pub async fn register(
        &self,
        session_id: SessionId,
        request_id: Option<RequestId>,
        requested: Option<ConnectionId>,
    ) -> Result<ConnectionGuard, StreamIoError> {
        if let Some(id) = requested
            && let Some((mut guard, info)) = self.insert(&session_id, request_id, id)
        {
            // If this future is dropped while claiming, the guard's drop removes the claim.
            if self.claimed(&info).await? {
                self.opened(info);
                return Ok(guard);
            }
            guard.forget();
        }
        loop {
            if let Some((guard, info)) = self.insert(&session_id, request_id, ConnectionId::new()) {
                self.opened(info);
                return Ok(guard);
            }
        }
    }

    /// Adds a connection to this gateway's table unless its id is taken here. The snapshot
    /// returned beside the guard is for registering it in the shared view: the guard keeps
    /// only what its removal needs (an idle connection's bytes count, issue #18).
    fn insert(
        &self,
        session_id: &SessionId,
        request_id: Option<RequestId>,
        connection_id: ConnectionId,
    ) -> Option<(ConnectionGuard, ConnectionInfo)> {
        let events_sent = Arc::new(AtomicU64::new(0));
        let info = ConnectionInfo {
            connection_id: connection_id.to_string(),
            session_id: session_id.clone(),
            request_id,
            gateway_id: self.gateway_id.to_string(),
            connected_since: now_ms(),
            events_sent: 0,
        };
        let inserted = self.with(|live| match live.entry(info.connection_id.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Live {
                    info: info.clone(),
                    events_sent: events_sent.clone(),
                    published_events: 0,
                });
                true
            }
        });
        if inserted {
            metrics::gauge!("gateway_sse_connections").increment(1.0);
        }
        inserted.then(|| {
            let guard = ConnectionGuard {
                connection_id: info.connection_id.clone(),
                events_sent,
                session_id: session_id.clone(),
                registry: Some(self.clone()),
            };
            (guard, info)
        })
    }

    /// Whether the shared view lets this connection keep its requested id: it was free, or
    /// its holder is gone (this gateway's own closed connection whose removal is still queued,
    /// or a dead gateway's).
    async fn claimed(&self, info: &ConnectionInfo) -> Result<bool, StreamIoError> {
        let Some(redis) = &self.redis else {
            return Ok(true);
        };
        match stream_io::connections::claim(redis.next(), info).await? {
            Claim::Claimed => Ok(true),
            Claim::Taken(holder) if holder.gateway_id == self.gateway_id.as_str() => Ok(true),
            Claim::Taken(holder) => Ok(!stream_io::connections::is_alive(
                redis.next(),
                &GatewayId::from_stored(&holder.gateway_id),
            )
            .await?),
        }
    }

    /// The connection keeps its id: written to the shared view.
    fn opened(&self, info: ConnectionInfo) {
        self.queue(ViewOp::Open(info));
    }

    fn remove(&self, session_id: &SessionId, connection_id: &str) {
        // Queued under the table's lock: whoever sees the connection gone from this gateway
        // (a listing) also sees its removal counted in the view writer's backlog.
        let removed = self.with(|live| {
            self.queue(ViewOp::Close(session_id.clone(), connection_id.to_owned()));
            live.remove(connection_id).is_some()
        });
        if removed {
            metrics::gauge!("gateway_sse_connections").decrement(1.0);
        }
    }

    fn queue(&self, op: ViewOp) {
        if let Some(view) = &self.view {
            metrics::gauge!(VIEW_BACKLOG).increment(1.0);
            if view.send(op).is_err() {
                // The writer has stopped (shutdown): nothing will write this change.
                metrics::gauge!(VIEW_BACKLOG).decrement(1.0);
            }
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

    /// Every gateway's live connections of a session: this gateway's from memory (exact, even
    /// while a write to the view is in flight), the others' from the shared view, where entries
    /// of dead gateways are dropped.
    pub async fn for_session(
        &self,
        session_id: &SessionId,
    ) -> Result<Vec<ConnectionInfo>, StreamIoError> {
        let Some(redis) = &self.redis else {
            return Ok(self.local_for_session(session_id));
        };
        let mut list = stream_io::connections::list(redis.next(), session_id).await?;
        list.retain(|c| c.gateway_id != self.gateway_id.as_str());
        list.extend(self.local_for_session(session_id));
        list.sort_by_key(|c| c.connected_since);
        Ok(list)
    }

    pub fn count(&self) -> usize {
        self.with(|live| live.len())
    }
}

/// Gauge: changes to the shared view queued and not yet written (their Redis call has not
/// answered). It stays near 0; a growing backlog means Redis is slow or unreachable.
const VIEW_BACKLOG: &str = "gateway_connection_view_backlog";

/// Renewals between two sweeps for dead gateways' leftovers.
const SWEEP_EVERY: u32 = 12;

/// How long the view writer waits for more removals after shutdown.
const VIEW_QUIET: Duration = Duration::from_secs(1);

/// The one task that writes this gateway's part of the view, in order.
struct ViewWriter {
    pool: Pool,
    gateway: GatewayId,
    live: LiveTable,
    settings: ViewSettings,
    /// Whether the liveness key is known to exist; false until the first announce succeeds.
    announced: bool,
}

impl ViewWriter {
    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.settings.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<ViewOp>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                op = ops.recv() => {
                    let Some(op) = op else { break };
                    if let Err(error) = self.apply(op).await {
                        tracing::debug!(%error, "cannot update the shared connection view");
                    }
                    metrics::gauge!(VIEW_BACKLOG).decrement(1.0);
                }
                _ = tick.tick(), if !shutdown.is_cancelled() => {
                    if let Err(error) = self.renew(ticks % SWEEP_EVERY == SWEEP_EVERY - 1).await {
                        tracing::debug!(%error, "cannot renew the shared connection view");
                    }
                    ticks = ticks.wrapping_add(1);
                }
                // After shutdown it keeps writing while streams end (their removals), and stops
                // once nothing came for a while: a `Connections` handle that outlives the server
                // must not keep shutdown waiting.
                () = quiet_after(&shutdown) => break,
            }
        }
        // Changes queued after the last one written are not written: `leave` below removes
        // all of this gateway's entries. Senders from now on see the channel closed.
        ops.close();
        while ops.try_recv().is_ok() {
            metrics::gauge!(VIEW_BACKLOG).decrement(1.0);
        }
        if let Err(error) = stream_io::connections::leave(self.pool.next(), &self.gateway).await {
            tracing::debug!(%error, "cannot remove this gateway from the connection view");
        }
    }

    async fn apply(&mut self, op: ViewOp) -> Result<(), StreamIoError> {
        let client = self.pool.next();
        match op {
            ViewOp::Open(info) => {
                if !self.announced {
                    // The connections already open are written by `announce` itself.
                    return self.announce().await;
                }
                stream_io::connections::write(client, &self.gateway, &[info]).await
            }
            ViewOp::Close(session, connection_id) => {
                stream_io::connections::remove(client, &self.gateway, &session, &connection_id)
                    .await
            }
        }
    }

    /// Writes the liveness key and every open connection: at start, and whenever the key was
    /// found missing (readers may have deleted the entries meanwhile).
    async fn announce(&mut self) -> Result<(), StreamIoError> {
        let client = self.pool.next();
        stream_io::connections::announce(client, &self.gateway, self.ttl_ms(), now_ms()).await?;
        let all: Vec<ConnectionInfo> = lock(&self.live).values().map(Live::snapshot).collect();
        stream_io::connections::write(client, &self.gateway, &all).await?;
        self.mark_published(&all);
        self.announced = true;
        Ok(())
    }

    /// One round: the liveness key, then the event counts that changed (connections that sent
    /// nothing cost nothing), and now and then a sweep for dead gateways.
    async fn renew(&mut self, sweep: bool) -> Result<(), StreamIoError> {
        let client = self.pool.next();
        let renewed = self.announced
            && stream_io::connections::renew(client, &self.gateway, self.ttl_ms()).await?;
        if !renewed {
            self.announced = false;
            return self.announce().await;
        }
        let changed: Vec<ConnectionInfo> = lock(&self.live)
            .values()
            .filter(|c| c.events_sent.load(Ordering::Relaxed) != c.published_events)
            .map(Live::snapshot)
            .collect();
        stream_io::connections::write(client, &self.gateway, &changed).await?;
        self.mark_published(&changed);
        if sweep {
            let removed = stream_io::connections::sweep(client).await?;
            if removed > 0 {
                tracing::info!(removed, "removed dead gateways from the connection view");
            }
        }
        Ok(())
    }

    fn mark_published(&self, infos: &[ConnectionInfo]) {
        let mut live = lock(&self.live);
        for info in infos {
            if let Some(c) = live.get_mut(&info.connection_id) {
                c.published_events = info.events_sent;
            }
        }
    }
}

/// Resolves once `shutdown` is cancelled and then [`VIEW_QUIET`] passes.
async fn quiet_after(shutdown: &CancellationToken) {
    shutdown.cancelled().await;
    tokio::time::sleep(VIEW_QUIET).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: ViewSettings = ViewSettings {
        renew_every: Duration::from_secs(5),
        ttl: Duration::from_secs(15),
    };

    #[tokio::test]
    async fn a_dropped_guard_removes_its_connection() -> anyhow::Result<()> {
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let connections = Connections::new(GatewayId::from_stored("gw"), None, VIEW, &lifecycle);
        let session = SessionId::parse("s")?;
        let guard = connections.register(session.clone(), None, None).await?;
        guard.events_sent.fetch_add(3, Ordering::Relaxed);
        let listed = connections.local_for_session(&session);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].events_sent, 3);
        assert_eq!(listed[0].gateway_id, "gw");
        drop(guard);
        assert!(connections.local_for_session(&session).is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn a_requested_id_is_taken_once() -> anyhow::Result<()> {
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let connections = Connections::new(GatewayId::from_stored("gw"), None, VIEW, &lifecycle);
        let session = SessionId::parse("s")?;
        let id = ConnectionId::new();
        let first = connections
            .register(session.clone(), None, Some(id.clone()))
            .await?;
        assert_eq!(first.connection_id, id.as_str());
        // A second tab with the same URL while the first is open: a fresh id.
        let second = connections
            .register(session.clone(), None, Some(id.clone()))
            .await?;
        assert_ne!(second.connection_id, id.as_str());
        // A reconnect after the first closed: the id again.
        drop(first);
        let again = connections
            .register(session.clone(), None, Some(id.clone()))
            .await?;
        assert_eq!(again.connection_id, id.as_str());
        assert_eq!(connections.count(), 2);
        Ok(())
    }
}
