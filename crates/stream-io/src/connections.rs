//! Owner of the shared connection view: per-gateway records whose cost does not grow with
//! idle clients.
//!
//! - `llm:conninfo:{session}`: connection id → `ConnectionInfo` JSON, written once when a
//!   connection opens and removed when it closes (in the session's slot).
//! - `llm:gateway:{id}`: one liveness key per gateway, renewed with a TTL. An entry counts only
//!   while its gateway's key exists; readers drop and delete the others.
//! - `llm:gateway:{id}:conns`: connection id → session of each entry a gateway wrote, so a sweep
//!   can remove a dead gateway's entries even from sessions nobody lists again.
//! - `llm:gateways`: the gateways that announced themselves, which a sweep walks.
//!
//! Every command touches one key (or keys of one slot), so the view works on Redis Cluster.

use std::collections::{BTreeMap, HashMap};

use fred::prelude::*;
use fred::types::{Expiration, SetOptions, Value};
use stream_schema::{ConnectionInfo, GatewayId, RedisKey, SessionId};

use crate::error::StreamIoError;

fn px(ttl_ms: u64) -> Expiration {
    Expiration::PX(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

/// Marks `gateway` alive for `ttl_ms` and lists it among the gateways a sweep checks.
pub async fn announce(
    client: &Client,
    gateway: &GatewayId,
    ttl_ms: u64,
    now_ms: u64,
) -> Result<(), StreamIoError> {
    let pipeline = client.pipeline();
    let _: () = pipeline
        .set(
            RedisKey::gateway_alive(gateway).as_str(),
            now_ms,
            Some(px(ttl_ms)),
            None,
            false,
        )
        .await?;
    let _: () = pipeline
        .hset(RedisKey::gateways().as_str(), (gateway.as_str(), now_ms))
        .await?;
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// Renews the liveness key of `gateway` (one command). False when the key was gone (it lapsed
/// while Redis was unreachable, or Redis came back empty): the caller announces itself again
/// and rewrites its connections, which readers may have removed meanwhile.
pub async fn renew(
    client: &Client,
    gateway: &GatewayId,
    ttl_ms: u64,
) -> Result<bool, StreamIoError> {
    let reply: Option<String> = client
        .set(
            RedisKey::gateway_alive(gateway).as_str(),
            stream_schema::now_millis(),
            Some(px(ttl_ms)),
            Some(SetOptions::XX),
            false,
        )
        .await?;
    Ok(reply.is_some())
}

/// Writes `infos`, connections of `gateway`, into the view (their sessions' hashes and the
/// gateway's index). Also rewrites entries already there (fresh `events_sent`).
pub async fn write(
    client: &Client,
    gateway: &GatewayId,
    infos: &[ConnectionInfo],
) -> Result<(), StreamIoError> {
    if infos.is_empty() {
        return Ok(());
    }
    let pipeline = client.pipeline();
    for info in infos {
        let _: () = pipeline
            .hset(
                RedisKey::connection_info(&info.session_id).as_str(),
                (info.connection_id.as_str(), info.encode()),
            )
            .await?;
    }
    let index: Vec<(&str, &str)> = infos
        .iter()
        .map(|info| (info.connection_id.as_str(), info.session_id.as_str()))
        .collect();
    let _: () = pipeline
        .hset(RedisKey::gateway_connections(gateway).as_str(), index)
        .await?;
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// Whether a connection may take the id it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The id was free: `info` is in the session's hash now (the caller still writes it with
    /// [`write`] for the gateway's index).
    Claimed,
    /// Another connection holds it, listed as this.
    Taken(ConnectionInfo),
}

/// Takes `info.connection_id` in its session's hash unless an entry holds it (`HSETNX`): the
/// first connection that opens with an id gets it. A holder that cannot be decoded is
/// replaced.
pub async fn claim(client: &Client, info: &ConnectionInfo) -> Result<Claim, StreamIoError> {
    let key = RedisKey::connection_info(&info.session_id);
    let set: bool = client
        .hsetnx(key.as_str(), info.connection_id.as_str(), info.encode())
        .await?;
    if set {
        return Ok(Claim::Claimed);
    }
    let holder: Option<String> = client
        .hget(key.as_str(), info.connection_id.as_str())
        .await?;
    match holder.as_deref().and_then(ConnectionInfo::decode) {
        Some(holder) => Ok(Claim::Taken(holder)),
        None => {
            let _: i64 = client
                .hset(key.as_str(), (info.connection_id.as_str(), info.encode()))
                .await?;
            Ok(Claim::Claimed)
        }
    }
}

/// Whether `gateway`'s liveness key exists.
pub async fn is_alive(client: &Client, gateway: &GatewayId) -> Result<bool, StreamIoError> {
    let exists: i64 = client
        .exists(RedisKey::gateway_alive(gateway).as_str())
        .await?;
    Ok(exists > 0)
}

/// Removes one connection of `gateway` from the view (it closed).
pub async fn remove(
    client: &Client,
    gateway: &GatewayId,
    session: &SessionId,
    connection_id: &str,
) -> Result<(), StreamIoError> {
    let pipeline = client.pipeline();
    let _: () = pipeline
        .hdel(RedisKey::connection_info(session).as_str(), connection_id)
        .await?;
    let _: () = pipeline
        .hdel(
            RedisKey::gateway_connections(gateway).as_str(),
            connection_id,
        )
        .await?;
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// Which of `gateways` have their liveness key (one `EXISTS` each: the keys live in different
/// slots).
async fn alive(
    client: &Client,
    gateways: impl IntoIterator<Item = GatewayId>,
) -> Result<HashMap<GatewayId, bool>, StreamIoError> {
    let gateways: Vec<GatewayId> = gateways.into_iter().collect();
    if gateways.is_empty() {
        return Ok(HashMap::new());
    }
    let pipeline = client.pipeline();
    for gateway in &gateways {
        let _: () = pipeline
            .exists(RedisKey::gateway_alive(gateway).as_str())
            .await?;
    }
    let replies: Vec<i64> = pipeline.all().await?;
    Ok(gateways
        .into_iter()
        .zip(replies.into_iter().chain(std::iter::repeat(0)))
        .map(|(gateway, exists)| (gateway, exists > 0))
        .collect())
}

/// The connections of `session` whose gateway is alive, oldest first. Entries of dead gateways
/// (and undecodable ones) are deleted on the way.
pub async fn list(
    client: &Client,
    session: &SessionId,
) -> Result<Vec<ConnectionInfo>, StreamIoError> {
    let key = RedisKey::connection_info(session);
    let stored: HashMap<String, String> = client.hgetall(key.as_str()).await?;
    if stored.is_empty() {
        return Ok(Vec::new());
    }
    let mut decoded = Vec::with_capacity(stored.len());
    let mut stale = Vec::new();
    for (connection_id, json) in stored {
        match ConnectionInfo::decode(&json) {
            Some(info) => decoded.push(info),
            None => stale.push(connection_id),
        }
    }
    let gateways: BTreeMap<GatewayId, ()> = decoded
        .iter()
        .map(|info| (GatewayId::from_stored(&info.gateway_id), ()))
        .collect();
    let alive = alive(client, gateways.into_keys()).await?;
    let mut list = Vec::with_capacity(decoded.len());
    for info in decoded {
        if alive
            .get(&GatewayId::from_stored(&info.gateway_id))
            .copied()
            .unwrap_or(false)
        {
            list.push(info);
        } else {
            stale.push(info.connection_id);
        }
    }
    if !stale.is_empty() {
        let _: i64 = client.hdel(key.as_str(), stale).await?;
    }
    list.sort_by_key(|c| c.connected_since);
    Ok(list)
}

/// Removes every trace of the gateways in `llm:gateways` whose liveness key is gone: their
/// entries in each session's hash, their index and their registration. Returns how many were
/// removed. Any gateway may run it at any time; running it twice is harmless.
pub async fn sweep(client: &Client) -> Result<usize, StreamIoError> {
    let registered: HashMap<String, String> = client.hgetall(RedisKey::gateways().as_str()).await?;
    let alive = alive(
        client,
        registered.keys().map(|id| GatewayId::from_stored(id)),
    )
    .await?;
    let mut removed = 0;
    for id in registered.keys() {
        let gateway = GatewayId::from_stored(id);
        if alive.get(&gateway).copied().unwrap_or(true) {
            continue;
        }
        retire(client, &gateway, id).await?;
        removed += 1;
    }
    Ok(removed)
}

/// Removes `gateway` from the view: its connections' entries, index, liveness key and
/// registration (registered under `registered_as`). For a gateway that stops cleanly, and for
/// a sweep of a dead one.
async fn retire(
    client: &Client,
    gateway: &GatewayId,
    registered_as: &str,
) -> Result<(), StreamIoError> {
    let index_key = RedisKey::gateway_connections(gateway);
    let index: HashMap<String, String> = client.hgetall(index_key.as_str()).await?;
    let pipeline = client.pipeline();
    for (connection_id, session) in &index {
        if let Ok(session) = SessionId::parse(session) {
            let _: () = pipeline
                .hdel(
                    RedisKey::connection_info(&session).as_str(),
                    connection_id.as_str(),
                )
                .await?;
        }
    }
    let _: () = pipeline.del(index_key.as_str()).await?;
    let _: () = pipeline
        .del(RedisKey::gateway_alive(gateway).as_str())
        .await?;
    let _: () = pipeline
        .hdel(RedisKey::gateways().as_str(), registered_as)
        .await?;
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// A gateway that stops cleanly takes its remaining entries and its liveness key with it.
pub async fn leave(client: &Client, gateway: &GatewayId) -> Result<(), StreamIoError> {
    retire(client, gateway, gateway.as_str()).await
}
