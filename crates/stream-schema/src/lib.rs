//! The stream schemas: every Redis key name, stream field name and event type of the bridge
//! (SPEC §3), as pure types and codecs. No IO lives here.
//!
//! **Invariant**: only this crate knows Redis field names and key layouts; every other crate
//! goes through these types.

pub mod api_key;
pub mod codec;
pub mod connection;
pub mod cursor;
pub mod dead_letter;
pub mod event;
pub mod idempotency;
pub mod ids;
pub mod job;
pub mod keys;
pub mod message;
pub mod record;
#[cfg(feature = "utoipa")]
mod schema;
pub mod stats;

pub use api_key::{KeyRole, StoredApiKey};
pub use codec::{DecodeError, FieldSink, Fields, SCHEMA_VERSION};
pub use connection::{ConnectionId, ConnectionInfo, GatewayId};
pub use cursor::SessionCursor;
pub use dead_letter::DeadLetter;
pub use event::{ErrorCode, FinishReason, SessionEvent, Usage, UsageSource};
pub use ids::{EntryId, IdError, ModelId, RequestId, SessionId, TenantId};
pub use job::{Job, RequestMeta, Reservation};
pub use keys::RedisKey;
pub use message::{ChatMessage, ChatOptions, Role};
pub use record::{EventRecord, Outcome};

/// Milliseconds since the Unix epoch, the `timestamp` of every event.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
