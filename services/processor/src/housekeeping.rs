//! Consumer-group housekeeping of one event shard: removal of consumers that died long ago.
//! (The group's lag and pending gauges read `stream_io::groups::group_state`.)
//!
//! A processor that crashes leaves its consumer in `llm:processors` forever; its pending
//! entries are reclaimed by the others (`XAUTOCLAIM`), but the name stays listed in
//! `XINFO CONSUMERS`, and with pods that get a new name on every start the list only grows.

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_io::StreamIoError;
use stream_schema::RedisKey;

/// KEYS: stream. ARGV: group, min idle ms, own consumer name.
/// Deletes every other consumer of the group that is idle at least `min idle ms` and has no
/// pending entries; returns their names. Check and delete are one script: `XGROUP
/// DELCONSUMER` drops the consumer's pending entries with it, so a consumer must not be able
/// to receive an entry between the check and the delete. (Redis 7.0 does not refresh a
/// consumer's idle time on an empty blocking `XREADGROUP`, so each processor marks its own
/// consumer seen before it looks: `stream_io::groups::mark_seen`.)
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
        key: &RedisKey,
        group: &str,
        own: &str,
        min_idle_ms: u64,
    ) -> Result<Vec<String>, StreamIoError> {
        #[expect(
            clippy::disallowed_methods,
            reason = "removes consumers of the processors' own group; writes no shared key"
        )]
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
