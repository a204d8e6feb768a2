//! Consumer-group helpers shared by producers (jobs) and processors (event records).

use fred::prelude::*;
use fred::types::Value;
use stream_schema::{EntryId, StreamKey};

use crate::entry::{Entry, parse_entries, parse_xread};
use crate::error::StreamIoError;

/// Creates `group` on `key` (and the stream) if missing; an existing group is fine.
pub async fn ensure_group(
    client: &Client,
    key: &StreamKey,
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
    keys: &[StreamKey],
    count: u64,
    block_ms: u64,
) -> Result<Vec<(String, Vec<Entry>)>, StreamIoError> {
    let names: Vec<&str> = keys.iter().map(StreamKey::as_str).collect();
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
    key: &StreamKey,
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
