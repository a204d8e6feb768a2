//! Consumer-group helpers shared by producers (jobs) and processors (event records).

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_schema::{EntryId, RedisKey};

use crate::entry::{Entry, parse_entries, parse_xread};
use crate::error::StreamIoError;

/// Creates `group` on `key` (and the stream) if missing; an existing group is fine.
pub async fn ensure_group(
    client: &Client,
    key: &RedisKey,
    group: &str,
) -> Result<(), StreamIoError> {
    match client
        .xgroup_create::<Value, _, _, _>(key.as_str(), group, "0", true)
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if error.details().contains("BUSYGROUP") => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// `XREADGROUP GROUP group consumer COUNT n BLOCK ms STREAMS key… >…`: new entries only.
pub async fn read_new(
    client: &Client,
    group: &str,
    consumer: &str,
    keys: &[RedisKey],
    count: u64,
    block_ms: u64,
) -> Result<Vec<(String, Vec<Entry>)>, StreamIoError> {
    let names: Vec<&str> = keys.iter().map(RedisKey::as_str).collect();
    let ids: Vec<&str> = keys.iter().map(|_| ">").collect();
    let reply: Value = client
        .xreadgroup(
            group,
            consumer,
            Some(count),
            Some(block_ms),
            false,
            names,
            ids,
        )
        .await?;
    parse_xread(reply)
}

/// `XACK key group id…`.
pub async fn ack(
    client: &Client,
    key: &str,
    group: &str,
    ids: &[EntryId],
) -> Result<(), StreamIoError> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = ids.iter().map(EntryId::to_string).collect();
    client.xack::<Value, _, _, _>(key, group, ids).await?;
    Ok(())
}

/// One `XAUTOCLAIM` page: entries idle for at least `min_idle_ms` become `consumer`'s. Returns
/// the cursor for the next page (`0-0` when done) and the claimed entries that still exist.
pub async fn autoclaim(
    client: &Client,
    key: &RedisKey,
    group: &str,
    consumer: &str,
    min_idle_ms: u64,
    cursor: &str,
    count: u64,
) -> Result<(String, Vec<Entry>), StreamIoError> {
    let reply: Value = client
        .xautoclaim(
            key.as_str(),
            group,
            consumer,
            min_idle_ms,
            cursor,
            Some(count),
            false,
        )
        .await?;
    let mut parts = match reply {
        Value::Array(parts) => parts.into_iter(),
        other => {
            return Err(StreamIoError::Protocol(format!(
                "xautoclaim reply: {other:?}"
            )));
        }
    };
    let next = parts
        .next()
        .and_then(Value::into_string)
        .ok_or_else(|| StreamIoError::Protocol("xautoclaim without cursor".to_owned()))?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Null))?;
    Ok((next, entries))
}

/// KEYS: stream. ARGV: group, consumer, idle_ms, id…
/// For each id still pending with `consumer`, resets its idle time to `idle_ms` (`XCLAIM … IDLE
/// JUSTID`, which does not count as a delivery). Returns the ids that are no longer pending with
/// `consumer`: another consumer reclaimed them (or they were acknowledged).
///
/// The pending check must sit in the same script: a bare `XCLAIM` with min-idle 0 would steal an
/// entry back from the consumer that legitimately reclaimed it.
const RENEW: &str = r"
local lost = {}
for i = 4, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine == 0 then
    table.insert(lost, ARGV[i])
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  end
end
return lost
";

/// Leases on pending entries: a consumer holds an entry while it keeps the entry's idle time
/// below the lease; `XAUTOCLAIM` with `min-idle = lease` by another consumer takes over the rest.
#[derive(Clone)]
pub struct LeaseScript {
    renew: fred::types::scripts::Script,
}

impl Default for LeaseScript {
    fn default() -> Self {
        Self {
            renew: fred::types::scripts::Script::from_lua(RENEW),
        }
    }
}

impl LeaseScript {
    /// Renews `consumer`'s leases on `ids` (idle time back to 0). Returns the ids it has lost.
    pub async fn renew(
        &self,
        client: &Client,
        key: &RedisKey,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
    ) -> Result<Vec<EntryId>, StreamIoError> {
        self.set_idle(client, key, group, consumer, ids, 0).await
    }

    /// Hands entries back: they stay pending with `consumer` but look idle for `idle_ms`, so the
    /// next `XAUTOCLAIM` with that min-idle by any consumer takes them at once. Returns the ids
    /// that were not `consumer`'s any more.
    pub async fn hand_back(
        &self,
        client: &Client,
        key: &RedisKey,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
        idle_ms: u64,
    ) -> Result<Vec<EntryId>, StreamIoError> {
        self.set_idle(client, key, group, consumer, ids, idle_ms)
            .await
    }

    async fn set_idle(
        &self,
        client: &Client,
        key: &RedisKey,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
        idle_ms: u64,
    ) -> Result<Vec<EntryId>, StreamIoError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![group.to_owned(), consumer.to_owned(), idle_ms.to_string()];
        args.extend(ids.iter().map(EntryId::to_string));
        let reply: Value = self
            .renew
            .evalsha_with_reload(client, vec![key.to_string()], args)
            .await?;
        reply
            .into_array()
            .into_iter()
            .map(|id| {
                let raw = id.into_string().ok_or_else(|| {
                    StreamIoError::Protocol("lease id is not a string".to_owned())
                })?;
                EntryId::parse(&raw)
                    .map_err(|e| StreamIoError::Protocol(format!("lease id {raw:?}: {e}")))
            })
            .collect()
    }
}

/// The group's state from `XINFO GROUPS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupState {
    /// Entries delivered to some consumer and not yet acknowledged.
    pub pending: u64,
    /// Entries in the stream not yet delivered to the group; `None` when Redis cannot tell
    /// (after deletions from the middle of the stream).
    pub lag: Option<u64>,
}

/// `XINFO GROUPS key` for `group`; `None` when the group does not exist.
pub async fn group_state(
    client: &Client,
    key: &RedisKey,
    group: &str,
) -> Result<Option<GroupState>, StreamIoError> {
    let reply: Value = client.xinfo_groups(key.as_str()).await?;
    let Value::Array(groups) = reply else {
        return Err(StreamIoError::Protocol(format!(
            "xinfo groups reply: {reply:?}"
        )));
    };
    for info in groups {
        let info = pairs(info);
        if info.get("name").and_then(Value::as_string).as_deref() != Some(group) {
            continue;
        }
        let pending = info
            .get("pending")
            .and_then(Value::as_u64)
            .ok_or_else(|| StreamIoError::Protocol("xinfo groups without pending".to_owned()))?;
        let lag = info.get("lag").and_then(Value::as_u64);
        return Ok(Some(GroupState { pending, lag }));
    }
    Ok(None)
}

/// The fields of one `XINFO` entry, a map in RESP3 and a flat name/value array in RESP2.
fn pairs(value: Value) -> HashMap<String, Value> {
    match value {
        Value::Map(map) => map
            .inner()
            .into_iter()
            .filter_map(|(k, v)| k.into_string().map(|k| (k, v)))
            .collect(),
        Value::Array(flat) => {
            let mut out = HashMap::new();
            let mut items = flat.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                if let Some(k) = k.into_string() {
                    out.insert(k, v);
                }
            }
            out
        }
        _ => HashMap::new(),
    }
}

/// KEYS: stream. ARGV: group, min idle ms, own consumer name.
/// Marks the own consumer seen, then deletes every other consumer of the group that is idle at
/// least `min idle ms` and has no pending entries; returns their names.
///
/// The mark: Redis 7.0 does not reset a consumer's idle time on an empty blocking
/// `XREADGROUP` (nor on an `XAUTOCLAIM` that claims nothing), so without it two members with
/// no traffic would take each other for dead. It is a read of the own pending entries after
/// the stream's last id: it returns none and touches none (a read from `0` would reset the idle
/// time of the oldest pending entry, and with it `XAUTOCLAIM`'s retry of it), but
/// it resets the consumer's idle time, and creates the consumer if it does not exist.
///
/// Check and delete are one script: `XGROUP DELCONSUMER` drops the consumer's pending entries
/// with it, so a consumer must not be able to receive an entry between the check and the
/// delete.
const REMOVE_DEAD: &str = r"
local stream = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #stream, 2 do
  if stream[i] == 'last-generated-id' then
    redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[3], 'COUNT', 1, 'STREAMS', KEYS[1], stream[i + 1])
  end
end
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0
      and tonumber(info['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
";

/// Removal of consumers that died long ago. A service that crashes, or a pod that gets a new
/// name on every start, leaves its consumer in the group forever: its pending entries are
/// reclaimed by the others (`XAUTOCLAIM`), but the name stays listed in `XINFO CONSUMERS` and
/// the list only grows.
#[derive(Clone)]
pub struct DeadConsumers {
    script: Script,
}

impl Default for DeadConsumers {
    fn default() -> Self {
        Self {
            script: Script::from_lua(REMOVE_DEAD),
        }
    }
}

impl DeadConsumers {
    /// Marks `own` seen, then removes the group's other consumers idle for `min_idle_ms` with
    /// nothing pending; returns their names. Each live member of the group calls it
    /// periodically, well within `min_idle_ms`.
    pub async fn remove(
        &self,
        client: &Client,
        key: &RedisKey,
        group: &str,
        own: &str,
        min_idle_ms: u64,
    ) -> Result<Vec<String>, StreamIoError> {
        let removed: Value = self
            .script
            .evalsha_with_reload(
                client,
                vec![key.to_string()],
                vec![group.to_owned(), min_idle_ms.to_string(), own.to_owned()],
            )
            .await?;
        Ok(match removed {
            Value::Array(names) => names.into_iter().filter_map(Value::into_string).collect(),
            _ => Vec::new(),
        })
    }
}
