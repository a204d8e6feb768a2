//! Writes and reads of session streams (`llm:stream:{session}:model`).
//!
//! Every write after `start` is fenced: a Lua script compares the writer's attempt with the
//! request's owner key (`llm:owner:{session}:request`, same slot as the stream) and appends only
//! when they match. A producer that lost its job to another one therefore cannot add a single
//! entry once the new owner has taken over. The same script reports a cancel request, so
//! observing a cancel costs no extra command while tokens flow.

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_schema::{EntryId, RequestId, SessionEvent, SessionId, StreamKey};

use crate::entry::{Entry, parse_entries};
use crate::error::StreamIoError;

/// KEYS: stream, owner. ARGV: maxlen, ttl, fields…
/// Sets the owner to attempt 1 and appends the `start` event; both expire after `ttl`.
const START: &str = r"
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
";

/// KEYS: stream, owner, cancel. ARGV: attempt, maxlen, check_cancel, expire_secs, fields…
/// Returns {0} when fenced off, {2} when cancelled, {1, id} when written. A non-zero
/// `expire_secs` (terminal events) refreshes the expiry of the stream and the owner key.
const APPEND: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0} end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return {2} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 5))
if ARGV[4] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {1, id}
";

/// KEYS: stream, owner. ARGV: expected attempt, new attempt, maxlen, fields…
/// Moves the owner from `expected` to `new` and appends the `restart` event, or returns {0, current}.
const TAKE_OVER: &str = r"
local current = redis.call('GET', KEYS[2])
if current ~= ARGV[1] then return {0, current or ''} end
redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return {1, id}
";

/// Retention settings of session streams.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Approximate `MAXLEN` of each session stream.
    pub maxlen: u64,
    /// Seconds a stream (and its owner key) lives after its request starts or ends.
    pub ttl_secs: u64,
}

/// What a fenced append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Written(EntryId),
    /// Another attempt owns the request now: stop writing.
    Fenced,
    /// The request was cancelled: stop generating and write `complete`/`cancelled`.
    Cancelled,
}

fn flatten(fields: stream_schema::Fields) -> impl Iterator<Item = String> {
    fields
        .into_iter()
        .flat_map(|(name, value)| [name.to_owned(), value])
}

/// Runs a script by hash, loading it on `NOSCRIPT` (a restarted or new Redis node).
async fn run_script(
    client: &Client,
    script: &Script,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<Value, StreamIoError> {
    Ok(script.evalsha_with_reload(client, keys, args).await?)
}

fn entry_id(value: Value) -> Result<EntryId, StreamIoError> {
    let raw = value
        .into_string()
        .ok_or_else(|| StreamIoError::Protocol("XADD returned no id".to_owned()))?;
    EntryId::parse(&raw).map_err(|e| StreamIoError::Protocol(format!("entry id {raw:?}: {e}")))
}

/// The session-stream scripts, loaded once per process.
#[derive(Clone)]
pub struct SessionScripts {
    start: Script,
    append: Script,
    take_over: Script,
}

impl Default for SessionScripts {
    fn default() -> Self {
        Self {
            start: Script::from_lua(START),
            append: Script::from_lua(APPEND),
            take_over: Script::from_lua(TAKE_OVER),
        }
    }
}

impl SessionScripts {
    /// Appends a request's `start` event and makes attempt 1 its owner.
    pub async fn start(
        &self,
        client: &Client,
        stream: &StreamKey,
        owner: &StreamKey,
        event: &SessionEvent,
        retention: Retention,
    ) -> Result<EntryId, StreamIoError> {
        let mut args = vec![retention.maxlen.to_string(), retention.ttl_secs.to_string()];
        args.extend(flatten(event.encode()));
        let reply = run_script(
            client,
            &self.start,
            vec![stream.to_string(), owner.to_string()],
            args,
        )
        .await?;
        entry_id(reply)
    }

    /// Appends `event` if `attempt` still owns the request (and, with `check_cancel`, the
    /// request was not cancelled). Terminal events refresh the stream's expiry.
    pub async fn append(
        &self,
        client: &Client,
        target: &RequestStreams,
        attempt: u32,
        event: &SessionEvent,
        check_cancel: bool,
    ) -> Result<AppendOutcome, StreamIoError> {
        let expire = if event.is_terminal() {
            target.retention.ttl_secs
        } else {
            0
        };
        let mut args = vec![
            attempt.to_string(),
            target.retention.maxlen.to_string(),
            if check_cancel { "1" } else { "0" }.to_owned(),
            expire.to_string(),
        ];
        args.extend(flatten(event.encode()));
        let reply = run_script(client, &self.append, target.keys(), args).await?;
        let mut parts = reply.into_array().into_iter();
        match parts.next().and_then(|v| v.as_i64()) {
            Some(0) => Ok(AppendOutcome::Fenced),
            Some(2) => Ok(AppendOutcome::Cancelled),
            Some(1) => {
                let id = parts
                    .next()
                    .ok_or_else(|| StreamIoError::Protocol("append without id".to_owned()))?;
                Ok(AppendOutcome::Written(entry_id(id)?))
            }
            other => Err(StreamIoError::Protocol(format!(
                "append script answered {other:?}"
            ))),
        }
    }

    /// Takes a request over from attempt `expected` as `expected + 1` and appends `restart`.
    /// Returns `None` when someone else already moved the owner.
    pub async fn take_over(
        &self,
        client: &Client,
        target: &RequestStreams,
        expected: u32,
        event: &SessionEvent,
    ) -> Result<Option<EntryId>, StreamIoError> {
        let mut args = vec![
            expected.to_string(),
            (expected + 1).to_string(),
            target.retention.maxlen.to_string(),
        ];
        args.extend(flatten(event.encode()));
        let keys = vec![target.stream.to_string(), target.owner.to_string()];
        let reply = run_script(client, &self.take_over, keys, args).await?;
        let mut parts = reply.into_array().into_iter();
        match parts.next().and_then(|v| v.as_i64()) {
            Some(1) => {
                let id = parts
                    .next()
                    .ok_or_else(|| StreamIoError::Protocol("take-over without id".to_owned()))?;
                Ok(Some(entry_id(id)?))
            }
            Some(0) => Ok(None),
            other => Err(StreamIoError::Protocol(format!(
                "take-over script answered {other:?}"
            ))),
        }
    }
}

/// The keys one request writes to in its session's slot.
#[derive(Debug, Clone)]
pub struct RequestStreams {
    pub stream: StreamKey,
    pub owner: StreamKey,
    pub cancel: StreamKey,
    pub retention: Retention,
}

impl RequestStreams {
    pub fn new(
        session: &SessionId,
        model: &stream_schema::ModelId,
        request: &RequestId,
        retention: Retention,
    ) -> Self {
        Self {
            stream: StreamKey::session(session, model),
            owner: StreamKey::owner(session, request),
            cancel: StreamKey::cancel(session, request),
            retention,
        }
    }

    fn keys(&self) -> Vec<String> {
        vec![
            self.stream.to_string(),
            self.owner.to_string(),
            self.cancel.to_string(),
        ]
    }
}

/// The current owner attempt of a request, if its owner key still exists.
pub async fn owner_attempt(
    client: &Client,
    owner: &StreamKey,
) -> Result<Option<u32>, StreamIoError> {
    let raw: Option<String> = client.get(owner.as_str()).await?;
    Ok(raw.and_then(|v| v.parse().ok()))
}

/// `XRANGE key (after + COUNT count`: up to `count` entries strictly after `after`.
pub async fn range_after(
    client: &Client,
    key: &StreamKey,
    after: EntryId,
    count: u64,
) -> Result<Vec<Entry>, StreamIoError> {
    let start = format!("({after}");
    let reply: Value = client.xrange(key.as_str(), start, "+", Some(count)).await?;
    parse_entries(reply)
}

/// `XRANGE key id id`: the entry itself, if it is still in the stream.
pub async fn entry_exists(
    client: &Client,
    key: &StreamKey,
    id: EntryId,
) -> Result<bool, StreamIoError> {
    let id = id.to_string();
    let reply: Value = client
        .xrange(key.as_str(), id.as_str(), id.as_str(), Some(1))
        .await?;
    Ok(!parse_entries(reply)?.is_empty())
}

/// The id of the newest entry of `key`, or `None` for a missing or empty stream.
pub async fn last_entry_id(
    client: &Client,
    key: &StreamKey,
) -> Result<Option<EntryId>, StreamIoError> {
    let reply: Value = client.xrevrange(key.as_str(), "+", "-", Some(1)).await?;
    Ok(parse_entries(reply)?.first().map(|e| e.id))
}

/// The id of the oldest entry still in `key`.
pub async fn first_entry_id(
    client: &Client,
    key: &StreamKey,
) -> Result<Option<EntryId>, StreamIoError> {
    let reply: Value = client.xrange(key.as_str(), "-", "+", Some(1)).await?;
    Ok(parse_entries(reply)?.first().map(|e| e.id))
}
