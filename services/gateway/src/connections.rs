//! The connection manager: which SSE connections this gateway serves, per session. A
//! connection registers when its stream opens and is removed by its guard the moment its
//! delivery task ends (client gone, stream complete, shutdown).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use stream_schema::{RequestId, SessionId};

/// A snapshot of one connection, as `GET /api/sessions/{id}/connections` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub connection_id: String,
    pub session_id: SessionId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    /// Unix ms.
    pub connected_since: u64,
    pub events_sent: u64,
}

struct Live {
    info: ConnectionInfo,
    /// Incremented by the connection's delivery task, read by listings.
    events_sent: Arc<AtomicU64>,
}

#[derive(Clone, Default)]
pub struct Connections {
    /// Connection id → live connection. Written on open/close, read by listings.
    live: Arc<Mutex<HashMap<String, Live>>>,
}

/// Removes its connection from the registry when dropped.
pub struct ConnectionGuard {
    pub connection_id: String,
    pub events_sent: Arc<AtomicU64>,
    registry: Connections,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry.remove(&self.connection_id);
    }
}

impl Connections {
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
            session_id,
            request_id,
            connected_since: stream_schema::now_millis(),
            events_sent: 0,
        };
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
            registry: self.clone(),
        }
    }

    fn remove(&self, connection_id: &str) {
        if self.with(|live| live.remove(connection_id)).is_some() {
            metrics::gauge!("gateway_sse_connections").decrement(1.0);
        }
    }

    pub fn for_session(&self, session_id: &SessionId) -> Vec<ConnectionInfo> {
        self.with(|live| {
            let mut list: Vec<ConnectionInfo> = live
                .values()
                .filter(|c| &c.info.session_id == session_id)
                .map(|c| ConnectionInfo {
                    events_sent: c.events_sent.load(Ordering::Relaxed),
                    ..c.info.clone()
                })
                .collect();
            list.sort_by_key(|c| c.connected_since);
            list
        })
    }

    pub fn count(&self) -> usize {
        self.with(|live| live.len())
    }
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
        let connections = Connections::default();
        let session = SessionId::parse("s")?;
        let guard = connections.register(session.clone(), None);
        guard.events_sent.fetch_add(3, Ordering::Relaxed);
        let listed = connections.for_session(&session);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].events_sent, 3);
        drop(guard);
        assert!(connections.for_session(&session).is_empty());
        Ok(())
    }
}
