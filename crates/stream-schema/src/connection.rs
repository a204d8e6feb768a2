//! The shared connection view: one JSON document per open SSE connection in
//! `llm:conninfo:{session}` (field = connection id), listed through `llm:conns:{session}`.

use serde::{Deserialize, Serialize};

use crate::ids::{RequestId, SessionId};

/// A snapshot of one connection, as `GET /api/sessions/{id}/connections` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub connection_id: String,
    pub session_id: SessionId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    /// The gateway replica serving it.
    pub gateway_id: String,
    /// Unix ms.
    pub connected_since: u64,
    /// As of the last heartbeat when read from the shared view.
    pub events_sent: u64,
}

impl ConnectionInfo {
    /// The JSON stored in `llm:conninfo:{session}`.
    pub fn encode(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for anything that is not a connection document (a foreign or older writer).
    pub fn decode(json: &str) -> Option<Self> {
        serde_json::from_str(json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_survives_its_json() -> Result<(), crate::IdError> {
        let info = ConnectionInfo {
            connection_id: "sse_1".to_owned(),
            session_id: SessionId::parse("s")?,
            request_id: Some(RequestId::new()),
            gateway_id: "gw".to_owned(),
            connected_since: 7,
            events_sent: 3,
        };
        assert_eq!(ConnectionInfo::decode(&info.encode()), Some(info));
        assert_eq!(ConnectionInfo::decode("{}"), None);
        Ok(())
    }
}
