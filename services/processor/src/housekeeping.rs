//! Consumer-group housekeeping of one event shard: the group's lag and pending count as
//! Prometheus gauges, and removal of consumers that died long ago.
//!
//! A processor that crashes leaves its consumer in `llm:processors` forever; its pending
//! entries are reclaimed by the others (`XAUTOCLAIM`), but the name stays listed in
//! `XINFO CONSUMERS`, and with pods that get a new name on every start the list only grows.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::StreamKey;

/// KEYS: stream. ARGV: group, min idle ms, own consumer name.
/// Deletes every other consumer of the group that is idle at least `min idle ms` and has no
/// pending entries; returns their names. Check and delete are one script: `XGROUP
/// DELCONSUMER` drops the consumer's pending entries with it, so a consumer must not be able
/// to receive an entry between the check and the delete. (Redis refreshes a consumer's idle
/// time on every `XREADGROUP`, also on an empty blocking one, so a live processor is never
/// idle for long.)
const REMOVE_DEAD: &str = r"
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

/// The group's state from `XINFO GROUPS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupState {
    /// Entries delivered to some consumer and not yet acknowledged.
    pub pending: u64,
    /// Entries in the stream not yet delivered to the group; `None` when Redis cannot tell
    /// (after deletions from the middle of the stream).
    pub lag: Option<u64>,
}

#[derive(Clone)]
pub struct Housekeeping {
    script: Script,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Self {
            script: Script::from_lua(REMOVE_DEAD),
        }
    }
}

impl Housekeeping {
    /// Removes the group's consumers (other than `own`) idle for `min_idle_ms` with nothing
    /// pending; returns their names.
    pub async fn remove_dead_consumers(
        &self,
        client: &Client,
        key: &StreamKey,
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

/// `XINFO GROUPS key` for `group`; `None` when the group does not exist.
pub async fn group_state(
    client: &Client,
    key: &StreamKey,
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
