//! Writes of the analytics event records (`llm:events:{n}`) and the dead-letter stream
//! (`llm:dead`): the one module that appends to either, so the cap and the `traceparent` field
//! are applied the same way by every writer.
//!
//! Field names stay in `stream-schema` (`EventRecord`, `DeadLetter`); callers pass plain values
//! (shard count, caps, a traceparent string), never a service's types.

use fred::prelude::*;
use stream_schema::{DeadLetter, EntryId, EventRecord, RedisKey, SessionId};

use crate::error::StreamIoError;

/// Where a deployment's event records go: `shards` streams `llm:events:{n}`, each capped at
/// about `maxlen` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLog {
    /// `streams.event_shards`: a session's records all go to one shard, so one processor
    /// applies them in order.
    pub shards: u16,
    /// `streams.events_maxlen`: approximate `MAXLEN` of each shard.
    pub maxlen: u64,
}

impl EventLog {
    /// The shard stream that holds `session`'s records.
    pub fn shard_key(&self, session: &SessionId) -> RedisKey {
        RedisKey::events_shard(stream_schema::keys::event_shard_of(session, self.shards))
    }

    /// Appends `record` to its session's shard with `MAXLEN ~ maxlen`. `traceparent` (W3C, of
    /// the span the record is written in) becomes the record's `tp` field, so the processor's
    /// `record.apply` joins the request's trace; `None` writes the record unchanged.
    pub async fn append(
        &self,
        client: &Client,
        record: &EventRecord,
        traceparent: Option<String>,
    ) -> Result<EntryId, StreamIoError> {
        let key = self.shard_key(session_of(record));
        let fields = stream_schema::codec::with_traceparent(record.encode(), traceparent);
        let id: String = client
            .xadd(
                key.as_str(),
                false,
                crate::approx_cap(self.maxlen),
                "*",
                fields,
            )
            .await?;
        parse_id(&id)
    }
}

/// Appends a dead letter to `llm:dead` with `MAXLEN ~ maxlen`.
pub async fn dead_letter(
    client: &Client,
    maxlen: u64,
    dead: &DeadLetter,
) -> Result<EntryId, StreamIoError> {
    let id: String = client
        .xadd(
            RedisKey::dead_letter().as_str(),
            false,
            crate::approx_cap(maxlen),
            "*",
            dead.encode(),
        )
        .await?;
    parse_id(&id)
}

fn session_of(record: &EventRecord) -> &SessionId {
    record.session_id()
}

fn parse_id(raw: &str) -> Result<EntryId, StreamIoError> {
    EntryId::parse(raw).map_err(|e| StreamIoError::Protocol(format!("entry id {raw:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fred::types::Value;
    use stream_schema::{ModelId, RequestId};
    use test_support::RedisServer;

    use super::*;
    use crate::parse_entries;

    fn tokens(session: &str, count: u32) -> anyhow::Result<EventRecord> {
        Ok(EventRecord::Tokens {
            request_id: RequestId::new(),
            session_id: SessionId::parse(session)?,
            model_id: ModelId::parse("m")?,
            count,
            timestamp: 1,
        })
    }

    async fn entries(client: &Client, key: &RedisKey) -> anyhow::Result<Vec<crate::Entry>> {
        let reply: Value = client.xrange(key.as_str(), "-", "+", None).await?;
        Ok(parse_entries(reply)?)
    }

    #[tokio::test]
    async fn a_record_goes_to_its_sessions_shard_with_its_traceparent() -> anyhow::Result<()> {
        let redis = RedisServer::start().await?;
        let client = redis.client().await?;
        let log = EventLog {
            shards: 4,
            maxlen: 1_000,
        };
        let record = tokens("s1", 3)?;
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();

        let id = log.append(&client, &record, Some(tp.clone())).await?;
        log.append(&client, &tokens("s1", 4)?, None).await?;

        let shard = log.shard_key(&SessionId::parse("s1")?);
        let written = entries(&client, &shard).await?;
        assert_eq!(written.len(), 2);
        assert_eq!(written[0].id, id);
        assert_eq!(EventRecord::decode(&written[0].fields)?, record);
        assert_eq!(
            stream_schema::codec::traceparent(&written[0].fields),
            Some(tp.as_str())
        );
        assert_eq!(stream_schema::codec::traceparent(&written[1].fields), None);
        Ok(())
    }

    #[tokio::test]
    async fn dead_letters_are_capped_and_decodable() -> anyhow::Result<()> {
        let redis = RedisServer::start().await?;
        let client = redis.client().await?;
        let dead = DeadLetter {
            job_entry: EntryId::parse("5-1")?,
            request_id: None,
            reason: "undecodable: test".to_owned(),
            attempts: 0,
            consumer: "producer-test".to_owned(),
            timestamp: 1,
            job_fields: BTreeMap::from([("x".to_owned(), "y".to_owned())]),
        };
        // `MAXLEN ~` trims whole macro-nodes only (100 entries by default): well past one
        // node, the stream is trimmed, not grown without bound.
        for _ in 0..1_000 {
            dead_letter(&client, 10, &dead).await?;
        }

        let written = entries(&client, &RedisKey::dead_letter()).await?;
        assert!(written.len() < 1_000, "{} entries kept", written.len());
        assert_eq!(DeadLetter::decode(&written[0].fields)?, dead);
        Ok(())
    }
}
