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
/// Marks the own consumer seen, then deletes every other consumer of the group that is idle at
/// least `min idle ms` and has no pending entries; returns their names.
///
/// The mark: Redis 7.0 does not reset a consumer's idle time on an empty blocking
/// `XREADGROUP` (nor on an `XAUTOCLAIM` that claims nothing), so without it two processors with
/// no traffic would take each other for dead. It is a read of the own pending entries after
/// the stream's last id: it returns none and touches none (a read from `0` would reset the idle
/// time of the oldest pending entry, and with it `XAUTOCLAIM`'s retry of a failed record), but
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
    /// Marks `own` seen, then removes the group's other consumers idle for `min_idle_ms` with
    /// nothing pending; returns their names.
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
