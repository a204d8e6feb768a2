//! Owner of the shared connection view: `llm:conns:{session}` (connection ids scored by the
//! Unix ms their entry expires) and `llm:conninfo:{session}` (connection id → its
//! `ConnectionInfo` JSON). Every gateway publishes its own connections with a heartbeat, so any
//! replica lists all of them, and a dead replica's vanish once their expiry passes.

use fred::prelude::*;
use fred::types::Value;
use stream_schema::{ConnectionInfo, RedisKey, SessionId};

use crate::error::StreamIoError;

/// Writes (or renews) `infos`, each listed until `expires_at_ms`; the keys of every session
/// touched expire after `ttl_secs` unless a later heartbeat renews them. One pipeline.
pub async fn publish(
    client: &Client,
    infos: &[ConnectionInfo],
    expires_at_ms: u64,
    ttl_secs: u64,
) -> Result<(), StreamIoError> {
    if infos.is_empty() {
        return Ok(());
    }
    let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
    // Unix ms are below 2^53: exact as a sorted-set score.
    let score = expires_at_ms as f64;
    let pipeline = client.pipeline();
    let mut sessions: Vec<&SessionId> = Vec::new();
    for info in infos {
        let _: () = pipeline
            .zadd(
                RedisKey::connections(&info.session_id).as_str(),
                None,
                None,
                false,
                false,
                (score, info.connection_id.as_str()),
            )
            .await?;
        let _: () = pipeline
            .hset(
                RedisKey::connection_info(&info.session_id).as_str(),
                (info.connection_id.as_str(), info.encode()),
            )
            .await?;
        if !sessions.contains(&&info.session_id) {
            sessions.push(&info.session_id);
        }
    }
    // The keys of a session with no live gateway left disappear too.
    for session in sessions {
        let _: () = pipeline
            .expire(RedisKey::connections(session).as_str(), ttl, None)
            .await?;
        let _: () = pipeline
            .expire(RedisKey::connection_info(session).as_str(), ttl, None)
            .await?;
    }
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// Removes one connection from the view (it closed).
pub async fn remove(
    client: &Client,
    session: &SessionId,
    connection_id: &str,
) -> Result<(), StreamIoError> {
    let pipeline = client.pipeline();
    let _: () = pipeline
        .zrem(RedisKey::connections(session).as_str(), connection_id)
        .await?;
    let _: () = pipeline
        .hdel(RedisKey::connection_info(session).as_str(), connection_id)
        .await?;
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// The connections of `session` still listed at `now_ms`, oldest first. Entries past their
/// expiry (their gateway stopped renewing them) are removed on the way.
pub async fn list(
    client: &Client,
    session: &SessionId,
    now_ms: u64,
) -> Result<Vec<ConnectionInfo>, StreamIoError> {
    let ids_key = RedisKey::connections(session);
    let info_key = RedisKey::connection_info(session);
    // Unix ms are below 2^53: exact as a sorted-set score.
    let now = now_ms as f64;
    let expired: Vec<String> = client
        .zrangebyscore(ids_key.as_str(), "-inf", now, false, None)
        .await?;
    if !expired.is_empty() {
        let pipeline = client.pipeline();
        let _: () = pipeline.zrem(ids_key.as_str(), expired.clone()).await?;
        let _: () = pipeline.hdel(info_key.as_str(), expired).await?;
        let _: Vec<Value> = pipeline.all().await?;
    }
    let ids: Vec<String> = client
        .zrangebyscore(ids_key.as_str(), now, "+inf", false, None)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let details: Vec<Option<String>> = client.hmget(info_key.as_str(), ids).await?;
    let mut list: Vec<ConnectionInfo> = details
        .into_iter()
        .flatten()
        .filter_map(|json| ConnectionInfo::decode(&json))
        .collect();
    list.sort_by_key(|c| c.connected_since);
    Ok(list)
}
