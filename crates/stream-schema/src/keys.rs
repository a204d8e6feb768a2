//! Redis key names (SPEC §3). Everything of one session carries the `{sessionId}` hash tag, so it
//! lives in one Redis Cluster slot.

use std::fmt;

use crate::connection::GatewayId;
use crate::ids::{ModelId, RequestId, SessionId, TenantId};

/// Consumer group of producers on the job stream.
pub const PRODUCER_GROUP: &str = "llm:producers";
/// Consumer group of processors on the event shards.
pub const PROCESSOR_GROUP: &str = "llm:processors";

/// The value of an owner key (`RedisKey::owner`) once its request has a terminal event: no
/// attempt matches it, so every later write is fenced off.
pub const OWNER_DONE: &str = "done";

/// The value of a flag key whose presence is all that counts: a cancel request
/// (`RedisKey::cancel`) and a settled-quota marker (`RedisKey::quota_reconciled`).
pub const FLAG_SET: &str = "1";

/// What a stream's wake channel adds in front of the stream key.
const WAKE_PREFIX: &str = "llm:wake:";

/// The name of a Redis key. Built only by the constructors below, from validated ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RedisKey(String);

impl RedisKey {
    /// `llm:stream:{<sessionId>}:<modelId>`: a session's events for one model.
    pub fn session(session: &SessionId, model: &ModelId) -> Self {
        Self(format!("llm:stream:{{{session}}}:{model}"))
    }

    /// `llm:requests`: the job stream.
    pub fn requests() -> Self {
        Self("llm:requests".to_owned())
    }

    /// `llm:dead`: jobs that failed too often (or could not be read), with the reason; written
    /// by producers, read by operators. Nothing consumes it automatically.
    pub fn dead_letter() -> Self {
        Self("llm:dead".to_owned())
    }

    /// `llm:events:{<n>}`: one shard of the compact event records.
    pub fn events_shard(shard: u16) -> Self {
        Self(format!("llm:events:{{{shard}}}"))
    }

    /// `llm:cancel:{<sessionId>}:<requestId>`: set by the gateway to cancel a request.
    pub fn cancel(session: &SessionId, request: &RequestId) -> Self {
        Self(format!("llm:cancel:{{{session}}}:{request}"))
    }

    /// `llm:request:{<requestId>}`: the request's metadata hash (session, model, start entry).
    pub fn request_meta(request: &RequestId) -> Self {
        Self(format!("llm:request:{{{request}}}"))
    }

    /// `llm:owner:{<sessionId>}:<requestId>`: the attempt allowed to write the request's events
    /// (the fencing token; same slot as the session stream so one script checks and writes).
    pub fn owner(session: &SessionId, request: &RequestId) -> Self {
        Self(format!("llm:owner:{{{session}}}:{request}"))
    }

    /// `llm:idem:{key:<keyId>}:<sha256 of the Idempotency-Key>`: a start's body digest and, once
    /// it succeeded, its response, so a retried start returns the same request.
    pub fn idempotency(key_id: &str, idempotency_key_sha256: &str) -> Self {
        Self(format!(
            "llm:idem:{{key:{key_id}}}:{idempotency_key_sha256}"
        ))
    }

    /// `llm:rl:{key:<keyId>}`: the request log (sorted set of start times) of an API key.
    pub fn key_request_log(key_id: &str) -> Self {
        Self(format!("llm:rl:{{key:{key_id}}}"))
    }

    /// `llm:rl:{<sessionId>}:session`: the request log of a session.
    pub fn session_request_log(session: &SessionId) -> Self {
        Self(format!("llm:rl:{{{session}}}:session"))
    }

    /// `llm:quota:{key:<keyId>}`: reserved tokens of an API key per window (field = window
    /// index).
    pub fn token_quota(key_id: &str) -> Self {
        Self(format!("llm:quota:{{key:{key_id}}}"))
    }

    /// `llm:quota:{key:<keyId>}:done:<requestId>`: marks a request's reservation as reconciled,
    /// so a redelivered record does not give tokens back twice.
    pub fn quota_reconciled(key_id: &str, request: &RequestId) -> Self {
        Self(format!("llm:quota:{{key:{key_id}}}:done:{request}"))
    }

    /// `llm:conninfo:{<sessionId>}`: connection id → JSON details (`ConnectionInfo`) of each
    /// open SSE connection of a session, across all gateways. Written once when a connection
    /// opens and removed when it closes; an entry counts only while its gateway's
    /// [`RedisKey::gateway_alive`] exists.
    pub fn connection_info(session: &SessionId) -> Self {
        Self(format!("llm:conninfo:{{{session}}}"))
    }

    /// `llm:gateway:{<gatewayId>}`: a gateway's liveness key, one per gateway, renewed with a
    /// TTL (`gateway.connection_ttl_secs`). Gone means the gateway died: its connections leave
    /// the view.
    pub fn gateway_alive(gateway: &GatewayId) -> Self {
        Self(format!("llm:gateway:{{{gateway}}}"))
    }

    /// `llm:gateway:{<gatewayId>}:conns`: connection id → session id of each connection a
    /// gateway listed, so a dead gateway's entries can be found and removed.
    pub fn gateway_connections(gateway: &GatewayId) -> Self {
        Self(format!("llm:gateway:{{{gateway}}}:conns"))
    }

    /// `llm:gateways`: gateway id → Unix ms it announced itself; the list a sweep walks to
    /// find dead gateways.
    pub fn gateways() -> Self {
        Self("llm:gateways".to_owned())
    }

    /// `llm:stats:{<shard>}:session:<sessionId>`: per-session counters. They live in the slot
    /// of the event shard that carries the session's records, so the processor updates them and
    /// records what it applied in one atomic script.
    pub fn session_stats(shard: u16, session: &SessionId) -> Self {
        Self(format!("llm:stats:{{{shard}}}:session:{session}"))
    }

    /// `llm:stats:{<shard>}:model:<modelId>`: one shard's part of a model's counters; readers
    /// sum all shards.
    pub fn model_stats(shard: u16, model: &ModelId) -> Self {
        Self(format!("llm:stats:{{{shard}}}:model:{model}"))
    }

    /// `llm:stats:{<shard>}:tenant:<tenant>:model:<modelId>`: one shard's part of a model's
    /// counters within one tenant (the tenant of the record's session), what a non-admin key's
    /// `GET /api/analytics/models` reads.
    pub fn tenant_model_stats(shard: u16, tenant: &TenantId, model: &ModelId) -> Self {
        Self(format!(
            "llm:stats:{{{shard}}}:tenant:{tenant}:model:{model}"
        ))
    }

    /// `llm:stats:{<shard>}:m:<unixMinute>:tenant:<tenant>:model:<modelId>`: a tenant's model
    /// counters of one minute.
    pub fn tenant_model_stats_minute(
        shard: u16,
        tenant: &TenantId,
        model: &ModelId,
        minute: u64,
    ) -> Self {
        Self(format!(
            "llm:stats:{{{shard}}}:m:{minute}:tenant:{tenant}:model:{model}"
        ))
    }

    /// `llm:keys:{auth}`: API keys added while running, key id → `StoredApiKey` JSON (also
    /// revocations of configured keys). Every gateway reloads it when `api_keys_version` moves.
    pub fn api_keys() -> Self {
        Self("llm:keys:{auth}".to_owned())
    }

    /// `llm:keys:{auth}:version`: bumped by every change of `api_keys` (same slot, same
    /// script), so a gateway polls one small string instead of the whole hash.
    pub fn api_keys_version() -> Self {
        Self("llm:keys:{auth}:version".to_owned())
    }

    /// `llm:stats:{<shard>}:key:<keyId>`: one shard's part of an API key's counters (records
    /// of requests started with that key); readers sum all shards. An id that is not a valid
    /// configured key id is counted as `unknown` (see `stats::key_label`).
    pub fn key_stats(shard: u16, key_id: &str) -> Self {
        Self(format!(
            "llm:stats:{{{shard}}}:key:{}",
            crate::stats::key_label(key_id)
        ))
    }

    /// `llm:stats:{<shard>}:m:<unixMinute>:session:<sessionId>`: the session's counters of one
    /// minute (by record timestamp), kept for `processor.window_retention_secs`. The minute
    /// comes before the id: session ids may contain `:`, so a suffix could collide with the
    /// totals key of another session.
    pub fn session_stats_minute(shard: u16, session: &SessionId, minute: u64) -> Self {
        Self(format!(
            "llm:stats:{{{shard}}}:m:{minute}:session:{session}"
        ))
    }

    /// `llm:stats:{<shard>}:m:<unixMinute>:model:<modelId>`: a model's counters of one minute.
    pub fn model_stats_minute(shard: u16, model: &ModelId, minute: u64) -> Self {
        Self(format!("llm:stats:{{{shard}}}:m:{minute}:model:{model}"))
    }

    /// `llm:stats:{<shard>}:m:<unixMinute>:key:<keyId>`: an API key's counters of one minute.
    pub fn key_stats_minute(shard: u16, key_id: &str, minute: u64) -> Self {
        Self(format!(
            "llm:stats:{{{shard}}}:m:{minute}:key:{}",
            crate::stats::key_label(key_id)
        ))
    }

    /// `llm:stats:{<shard>}:applied`: entry ids of the shard the processor already applied
    /// (its exactly-once ledger).
    pub fn applied_ledger(shard: u16) -> Self {
        Self(format!("llm:stats:{{{shard}}}:applied"))
    }

    /// `llm:wake`: the Pub/Sub channel (`SPUBLISH`) on which, on a single node, every write
    /// to a session stream announces itself, the message naming the streams written (one key
    /// per line), so a gateway's reader reads only the streams that have something new.
    pub fn wake_all() -> Self {
        Self(WAKE_PREFIX.trim_end_matches(':').to_owned())
    }

    /// `llm:wake:<this key>`: the sharded Pub/Sub channel (`SPUBLISH`) on which, on a Redis
    /// Cluster, every write to this session stream announces itself, so a gateway's reader
    /// reads when there is something to read instead of polling. It carries the stream's hash
    /// tag: the same slot as the stream, so the writing script may publish to it.
    pub fn wake_channel(&self) -> String {
        Self::wake_channel_of(&self.0)
    }

    /// [`RedisKey::wake_channel`] of a stream key held as text (the reader's table).
    pub fn wake_channel_of(stream: &str) -> String {
        format!("{WAKE_PREFIX}{stream}")
    }

    /// The stream key a wake channel belongs to; `None` for any other channel.
    pub fn stream_of_wake_channel(channel: &str) -> Option<&str> {
        channel.strip_prefix(WAKE_PREFIX)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RedisKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RedisKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The event shard of a session: every record of a session lands in one shard, in order, next
/// to the session's counters.
pub fn event_shard_of(session: &SessionId, shards: u16) -> u16 {
    // FNV-1a: stable across processes and releases, unlike std's randomised hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in session.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    u16::try_from(hash % u64::from(shards.max(1))).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_carry_the_session_hash_tag() -> Result<(), crate::IdError> {
        let session = SessionId::parse("user_123")?;
        let model = ModelId::parse("gpt-4")?;
        assert_eq!(
            RedisKey::session(&session, &model).as_str(),
            "llm:stream:{user_123}:gpt-4"
        );
        let request = RequestId::new();
        assert_eq!(
            RedisKey::cancel(&session, &request).as_str(),
            format!("llm:cancel:{{user_123}}:{request}")
        );
        Ok(())
    }

    #[test]
    fn stats_keys_share_the_shard_slot_and_never_collide() -> Result<(), crate::IdError> {
        let session = SessionId::parse("a:m:5")?;
        let model = ModelId::parse("gpt-4")?;
        assert_eq!(
            RedisKey::session_stats_minute(3, &SessionId::parse("a")?, 5).as_str(),
            "llm:stats:{3}:m:5:session:a"
        );
        // A session id that looks like a minute suffix still gets a different key.
        assert_ne!(
            RedisKey::session_stats(3, &session).as_str(),
            RedisKey::session_stats_minute(3, &SessionId::parse("a")?, 5).as_str()
        );
        assert_eq!(
            RedisKey::model_stats_minute(0, &model, 29_000_000).as_str(),
            "llm:stats:{0}:m:29000000:model:gpt-4"
        );
        assert_eq!(
            RedisKey::key_stats(1, "team-a").as_str(),
            "llm:stats:{1}:key:team-a"
        );
        assert_eq!(
            RedisKey::key_stats_minute(1, "bad}id", 7).as_str(),
            "llm:stats:{1}:m:7:key:unknown"
        );
        Ok(())
    }

    #[test]
    fn event_shards_are_stable_and_in_range() -> Result<(), crate::IdError> {
        let session = SessionId::parse("user_123")?;
        let shard = event_shard_of(&session, 8);
        assert!(shard < 8);
        assert_eq!(shard, event_shard_of(&session, 8));
        assert_eq!(event_shard_of(&session, 1), 0);
        Ok(())
    }
}
