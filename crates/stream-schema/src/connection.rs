//! The shared connection view: one JSON document per open SSE connection in
//! `llm:conninfo:{session}` (field = connection id), written by the gateway that serves it and
//! valid while that gateway's liveness key `llm:gateway:{id}` exists.

use std::fmt;

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
    /// Exact when listed by the gateway that serves it; from another gateway, as of the
    /// serving gateway's last renewal (only connections that sent events are rewritten).
    pub events_sent: u64,
}

/// The id of one SSE connection: `sse_` and 32 lowercase hex digits. The start answer names
/// one in `connectionId` and carries it in its `streamUrl`, so the connection opened with that
/// URL is listed under it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ConnectionId(String);

impl ConnectionId {
    const PREFIX: &'static str = "sse_";

    /// A fresh, time-ordered id, unique across gateways.
    pub fn new() -> Self {
        Self(format!("{}{}", Self::PREFIX, uuid::Uuid::now_v7().simple()))
    }

    pub fn parse(raw: &str) -> Result<Self, crate::IdError> {
        let valid = raw.strip_prefix(Self::PREFIX).is_some_and(|hex| {
            hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(crate::IdError::Charset {
                allowed: "sse_ followed by 32 lowercase hex digits",
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ConnectionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One gateway process in the shared connection view. Unique per start (a random suffix), so a
/// restarted gateway never revives the entries of its previous life; only characters that are
/// safe inside a key's `{…}` hash tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayId(String);

impl GatewayId {
    /// `<name>-<8 random hex digits>`.
    pub fn unique(name: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Self::from_stored(&format!("{name}-{}", &suffix[..8]))
    }

    /// The gateway named in a stored connection document. A name with characters no
    /// [`GatewayId::unique`] produces maps to a key no gateway renews: it reads as dead.
    pub fn from_stored(raw: &str) -> Self {
        Self(
            raw.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
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

    #[test]
    fn connection_ids_parse_only_what_new_makes() {
        let id = ConnectionId::new();
        assert_eq!(ConnectionId::parse(id.as_str()), Ok(id));
        for bad in [
            "",
            "sse_",
            "sse_XYZ",
            "abc_0123456789abcdef0123456789abcdef",
            "sse_0123",
        ] {
            assert!(ConnectionId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gateway_ids_are_unique_and_safe_in_a_hash_tag() {
        let a = GatewayId::unique("gateway-host-1");
        let b = GatewayId::unique("gateway-host-1");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("gateway-host-1-"));
        assert_eq!(GatewayId::from_stored("g{1}").as_str(), "g_1_");
    }
}
