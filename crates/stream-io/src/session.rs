//! Writes and reads of session streams (`llm:stream:{session}:model`).
//!
//! Every write after `start` is fenced: a Lua script compares the writer's attempt with the
//! request's owner key (`llm:owner:{session}:request`, same slot as the stream) and appends only
//! when they match. A producer that lost its job to another one therefore cannot add a single
//! entry once the new owner has taken over. The same script reports a cancel request, so
//! observing a cancel costs no extra command while tokens flow, and takes a batch of events
//! (one entry each) for the price of one owner read.

use fred::prelude::*;
use fred::types::Value;
use fred::types::scripts::Script;
use stream_schema::{EntryId, RedisKey, RequestId, SessionEvent, SessionId};

use crate::call_args::CallArgs;
use crate::entry::{Entry, parse_entries};
use crate::error::StreamIoError;

/// KEYS: stream, owner. ARGV: ttl, wake channel ('' for none), fields…
/// Sets the owner to attempt 1 and appends the `start` event; both expire after `ttl`.
/// Every script that appends to a session stream also announces the write on a wake channel
/// when one is given, naming the stream (see [`WakeUps`]).
///
/// Retention is by age, never by count, and only here: the entries removed are older than two
/// TTLs by Redis's clock. A request shorter than its TTL (the stream itself would expire under a
/// longer one) that ended less than a TTL ago started less than two TTLs ago, so no entry of a
/// running request or of one inside its TTL is ever removed; between starts a stream grows only
/// by the running requests' own entries, which their token caps bound.
///
/// The stale entries are removed with `XDEL`, not `XTRIM MINID`: only `XDEL` moves the stream's
/// `max-deleted-entry-id`, which makes `history_lost` exact (see [`trimmed`]). Emptied nodes
/// are freed all the same. At most `4 × 2,000` go per start (Lua's `unpack` limit); a longer
/// backlog goes at the next starts.
const START: &str = r"
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - 2000 * tonumber(ARGV[1])
if cutoff > 0 then
  local before = '(' .. string.format('%d', cutoff) .. '-0'
  for _ = 1, 4 do
    local stale = redis.call('XRANGE', KEYS[1], '-', before, 'COUNT', 2000)
    if #stale == 0 then break end
    local ids = {}
    for i, entry in ipairs(stale) do ids[i] = entry[1] end
    redis.call('XDEL', KEYS[1], unpack(ids))
  end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('SPUBLISH', ARGV[2], KEYS[1]) end
return id
";

/// The owner-key value once a request has its terminal event: no attempt matches it, so every
/// later write is fenced off, and a producer that reclaims the job sees it needs no new attempt.
pub use stream_schema::keys::OWNER_DONE;

/// KEYS: stream, owner, cancel. ARGV: attempt, check_cancel, terminal, expire_secs, owner-done
/// value, wake channel, event count, then per event its field count and fields…
/// Returns {0} when fenced off, {2} when cancelled, {1, id…} (one id per event) when written.
/// A batch is all or nothing: the owner and the cancel flag are read once, in one `MGET` (same
/// slot), before the first `XADD`, and nothing else runs in between. A terminal last event also
/// marks the owner `done` (fencing off every attempt, this one included) and refreshes the
/// expiry of the stream and the owner key; content appends touch no expiry (`START` set it, the
/// terminal append refreshes it), so a token costs one `XADD` plus its share of the batch's
/// `EVALSHA` and `MGET`.
const APPEND: &str = r"
local state = redis.call('MGET', KEYS[2], KEYS[3])
if state[1] ~= ARGV[1] then return {0} end
if ARGV[2] == '1' and state[2] then return {2} end
local reply = {1}
local at = 8
for e = 1, tonumber(ARGV[7]) do
  local n = tonumber(ARGV[at])
  reply[e + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, at + 1, at + n))
  at = at + n + 1
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
if ARGV[6] ~= '' then redis.call('SPUBLISH', ARGV[6], KEYS[1]) end
return reply
";

/// `APPEND` for several requests at once (a single node only: the keys span slots).
/// KEYS: per request stream, owner, cancel. ARGV: owner-done value, request count, wake channel
/// ('' for none), then per request attempt, check_cancel, terminal, expire_secs, event count,
/// and per event its field count and fields…
/// Returns per request {0, ''} when fenced off, {2, ''} when cancelled, {1, last id} when
/// written: each request's batch exactly as `APPEND` would, with one `MGET` for the owners and
/// cancel flags of all of them. The caller never puts two batches of one owner key in a call
/// (the state is read once, before any write). One announcement names every stream written.
const APPEND_MANY: &str = r"
local n = tonumber(ARGV[2])
local keys = {}
for i = 1, n do
  keys[2 * i - 1] = KEYS[3 * i - 1]
  keys[2 * i] = KEYS[3 * i]
end
local state = redis.call('MGET', unpack(keys))
local reply = {}
local written = {}
local at = 4
for i = 1, n do
  local attempt, check, terminal, ttl = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local count = tonumber(ARGV[at + 4])
  at = at + 5
  local code = 1
  if state[2 * i - 1] ~= attempt then
    code = 0
  elseif check == '1' and state[2 * i] then
    code = 2
  end
  local last = ''
  for _ = 1, count do
    local fields = tonumber(ARGV[at])
    if code == 1 then
      last = redis.call('XADD', KEYS[3 * i - 2], '*', unpack(ARGV, at + 1, at + fields))
    end
    at = at + fields + 1
  end
  if code == 1 then
    if terminal == '1' then
      redis.call('SET', KEYS[3 * i - 1], ARGV[1], 'EX', ttl)
      redis.call('EXPIRE', KEYS[3 * i - 2], ttl)
    end
    written[#written + 1] = KEYS[3 * i - 2]
  end
  reply[i] = {code, last}
end
if ARGV[3] ~= '' and #written > 0 then
  redis.call('SPUBLISH', ARGV[3], table.concat(written, '\n'))
end
return reply
";

/// KEYS: stream, owner. ARGV: expected owner, new owner, expire_secs, wake channel, fields…
/// Moves the owner from `expected` to `new` and appends the event, or returns {0, current}.
/// A non-zero `expire_secs` (a terminal event) refreshes the expiry of both keys.
const TAKE_OVER: &str = r"
local current = redis.call('GET', KEYS[2])
if current ~= ARGV[1] then return {0, current or ''} end
redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
if ARGV[3] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
if ARGV[4] ~= '' then redis.call('SPUBLISH', ARGV[4], KEYS[1]) end
return {1, id}
";

/// Retention of session streams: by age, never by count (see `START`).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Seconds a stream (and its owner key) lives after its request starts or ends; entries
    /// older than twice this are trimmed when a request starts.
    pub ttl_secs: u64,
}

/// Events one append script call takes at most: a script blocks Redis while it runs, so one
/// call stays short (callers batch fewer: the producer's batch holds 128).
pub const MAX_BATCH_EVENTS: usize = 256;

/// Sizing hints of an append call's buffers: arguments of a token event (its field count,
/// six names and six values), bytes of one event's values, and of one batch's keys and
/// arguments. A larger call only grows its buffers.
const ARGS_PER_EVENT: usize = 13;
const BYTES_PER_EVENT: usize = 96;
const BYTES_PER_BATCH: usize = 192;

/// Requests one [`SessionScripts::append_many`] call takes at most.
pub const MAX_BATCH_REQUESTS: usize = 256;

/// One request's batch in an [`SessionScripts::append_many`] call.
#[derive(Debug, Clone, Copy)]
pub struct AppendBatch<'a> {
    pub target: &'a RequestStreams,
    pub attempt: u32,
    pub events: &'a [SessionEvent],
    pub check_cancel: bool,
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

/// A script's boolean argument.
fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

/// Runs a script by hash with the keys and arguments `call` builds, loading the script on
/// `NOSCRIPT` (a restarted or new Redis node) and building the call again for the retry.
///
/// Not fred's `Script::evalsha_with_reload`: it keeps a clone of every key and argument for
/// that rare retry, and cloning an owned `Bytes` allocates, so every call paid an allocation
/// and a free per argument (per event field, for an append): a visible share of the producer's
/// time in a profile of 1,000 paced streams.
async fn run_script(
    client: &Client,
    script: &Script,
    call: impl Fn() -> CallArgs,
) -> Result<Value, StreamIoError> {
    let (keys, args) = call().finish();
    match client.evalsha(script.sha1().clone(), keys, args).await {
        Err(error) if error.details().starts_with("NOSCRIPT") => {
            script.load(client).await?;
            let (keys, args) = call().finish();
            Ok(client.evalsha(script.sha1().clone(), keys, args).await?)
        }
        reply => Ok(reply?),
    }
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
    append_many: Script,
    take_over: Script,
    /// Where every write announces itself.
    wake_ups: WakeUps,
}

/// Where the writes to session streams announce themselves, so that a gateway's reader reads
/// the streams that were written instead of blocking on, or polling, all of them. Each
/// announcement is one `SPUBLISH` inside the writing script; its message names the streams
/// written, one key per line (see [`announced_streams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WakeUps {
    /// A single node: every write on one channel, [`RedisKey::wake_all`]; a call that appends
    /// for several requests (`append_many`) announces all its streams in one message.
    #[default]
    Shared,
    /// Redis Cluster: each stream on its own channel ([`RedisKey::wake_channel`], in the
    /// stream's slot, which a script may publish to), so that a reader follows only the
    /// streams it serves, on the nodes that hold them.
    PerStream,
}

impl WakeUps {
    /// The announcements of a deployment: per stream on a cluster, shared on a single node.
    pub fn for_cluster(cluster: bool) -> Self {
        if cluster {
            Self::PerStream
        } else {
            Self::Shared
        }
    }
}

/// The stream keys one announcement names: from a per-stream channel's name, or from a shared
/// channel's message (one key per line). Empty for any other channel.
pub fn announced_streams<'a>(channel: &'a str, message: &'a str) -> Vec<&'a str> {
    if let Some(stream) = RedisKey::stream_of_wake_channel(channel) {
        return vec![stream];
    }
    if channel == RedisKey::wake_all().as_str() {
        return message.split('\n').filter(|key| !key.is_empty()).collect();
    }
    Vec::new()
}

impl Default for SessionScripts {
    fn default() -> Self {
        Self {
            start: Script::from_lua(START),
            append: Script::from_lua(APPEND),
            append_many: Script::from_lua(APPEND_MANY),
            take_over: Script::from_lua(TAKE_OVER),
            wake_ups: WakeUps::default(),
        }
    }
}

impl SessionScripts {
    /// Scripts whose writes announce themselves as `wake_ups` says.
    pub fn new(wake_ups: WakeUps) -> Self {
        Self {
            wake_ups,
            ..Self::default()
        }
    }

    /// The channel that announces a write to `stream`, as the call's next argument.
    fn wake(&self, call: &mut CallArgs, stream: &RedisKey) {
        match self.wake_ups {
            WakeUps::Shared => call.arg(RedisKey::wake_all()),
            WakeUps::PerStream => call.arg(stream.wake_channel()),
        }
    }

    /// Appends a request's `start` event and makes attempt 1 its owner.
    pub async fn start(
        &self,
        client: &Client,
        stream: &RedisKey,
        owner: &RedisKey,
        event: &SessionEvent,
        retention: Retention,
    ) -> Result<EntryId, StreamIoError> {
        let reply = run_script(client, &self.start, || {
            let mut call = CallArgs::default();
            call.key(stream);
            call.key(owner);
            call.arg(retention.ttl_secs);
            self.wake(&mut call, stream);
            call.fields(event);
            call
        })
        .await?;
        entry_id(reply)
    }

    /// Appends `event` if `attempt` still owns the request (and, with `check_cancel`, the
    /// request was not cancelled). A terminal event marks the request done (no attempt may
    /// write after it) and refreshes the stream's expiry.
    pub async fn append(
        &self,
        client: &Client,
        target: &RequestStreams,
        attempt: u32,
        event: &SessionEvent,
        check_cancel: bool,
    ) -> Result<AppendOutcome, StreamIoError> {
        self.append_batch(
            client,
            target,
            attempt,
            std::slice::from_ref(event),
            check_cancel,
        )
        .await
    }

    /// Appends `events` in order, one stream entry each, in one fenced script call: all of
    /// them if `attempt` still owns the request (and, with `check_cancel`, the request was not
    /// cancelled), none otherwise. Only the last event may be terminal; it then marks the
    /// request done and refreshes the expiry. `Written` carries the last entry's id. At most
    /// [`MAX_BATCH_EVENTS`] events per call (Lua's `unpack` takes a few thousand arguments).
    pub async fn append_batch(
        &self,
        client: &Client,
        target: &RequestStreams,
        attempt: u32,
        events: &[SessionEvent],
        check_cancel: bool,
    ) -> Result<AppendOutcome, StreamIoError> {
        let Some(last) = events.last() else {
            return Err(StreamIoError::Protocol("an empty append".to_owned()));
        };
        if events.len() > MAX_BATCH_EVENTS
            || events[..events.len() - 1]
                .iter()
                .any(SessionEvent::is_terminal)
        {
            return Err(StreamIoError::Protocol(format!(
                "a batch of {} events, or a terminal event before its end",
                events.len()
            )));
        }
        let reply = run_script(client, &self.append, || {
            let mut call = CallArgs::with_capacity(
                7 + events.len() * ARGS_PER_EVENT,
                events.len() * BYTES_PER_EVENT,
            );
            target.write_keys(&mut call);
            call.arg(attempt);
            call.static_arg(flag(check_cancel));
            call.static_arg(flag(last.is_terminal()));
            call.arg(target.retention.ttl_secs);
            call.static_arg(OWNER_DONE);
            self.wake(&mut call, &target.stream);
            call.arg(events.len());
            for event in events {
                call.event(event);
            }
            call
        })
        .await?;
        let mut parts = reply.into_array().into_iter();
        match parts.next().and_then(|v| v.as_i64()) {
            Some(0) => Ok(AppendOutcome::Fenced),
            Some(2) => Ok(AppendOutcome::Cancelled),
            Some(1) => {
                let id = parts
                    .last()
                    .ok_or_else(|| StreamIoError::Protocol("append without id".to_owned()))?;
                Ok(AppendOutcome::Written(entry_id(id)?))
            }
            other => Err(StreamIoError::Protocol(format!(
                "append script answered {other:?}"
            ))),
        }
    }

    /// Appends the batches of several requests in one script call, each exactly as
    /// [`SessionScripts::append_batch`] would (fenced, refused on cancel, all or nothing per
    /// request), and answers one outcome per batch, in order. A single node only: the keys of
    /// different sessions live in different cluster slots. At most [`MAX_BATCH_REQUESTS`]
    /// batches, no two of the same request's owner key, each of at most
    /// [`MAX_BATCH_EVENTS`] events.
    pub async fn append_many(
        &self,
        client: &Client,
        batches: &[AppendBatch<'_>],
    ) -> Result<Vec<AppendOutcome>, StreamIoError> {
        if batches.is_empty() || batches.len() > MAX_BATCH_REQUESTS {
            return Err(StreamIoError::Protocol(format!(
                "a call of {} batches",
                batches.len()
            )));
        }
        if self.wake_ups == WakeUps::PerStream {
            return Err(StreamIoError::Protocol(
                "append_many on a cluster: its keys span slots".to_owned(),
            ));
        }
        for batch in batches {
            if batch.events.is_empty()
                || batch.events.len() > MAX_BATCH_EVENTS
                || batch.events[..batch.events.len() - 1]
                    .iter()
                    .any(SessionEvent::is_terminal)
            {
                return Err(StreamIoError::Protocol(format!(
                    "a batch of {} events, or a terminal event before its end",
                    batch.events.len()
                )));
            }
        }
        let reply = run_script(client, &self.append_many, || {
            let events: usize = batches.iter().map(|batch| batch.events.len()).sum();
            let mut call = CallArgs::with_capacity(
                3 + batches.len() * 5 + events * ARGS_PER_EVENT,
                batches.len() * BYTES_PER_BATCH + events * BYTES_PER_EVENT,
            );
            call.static_arg(OWNER_DONE);
            call.arg(batches.len());
            call.arg(RedisKey::wake_all());
            for batch in batches {
                let terminal = batch.events.last().is_some_and(SessionEvent::is_terminal);
                batch.target.write_keys(&mut call);
                call.arg(batch.attempt);
                call.static_arg(flag(batch.check_cancel));
                call.static_arg(flag(terminal));
                call.arg(batch.target.retention.ttl_secs);
                call.arg(batch.events.len());
                for event in batch.events {
                    call.event(event);
                }
            }
            call
        })
        .await?;
        let outcomes = reply
            .into_array()
            .into_iter()
            .map(|one| {
                let mut parts = one.into_array().into_iter();
                match parts.next().and_then(|v| v.as_i64()) {
                    Some(0) => Ok(AppendOutcome::Fenced),
                    Some(2) => Ok(AppendOutcome::Cancelled),
                    Some(1) => {
                        let id = parts.next().ok_or_else(|| {
                            StreamIoError::Protocol("append without id".to_owned())
                        })?;
                        Ok(AppendOutcome::Written(entry_id(id)?))
                    }
                    other => Err(StreamIoError::Protocol(format!(
                        "append script answered {other:?}"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if outcomes.len() != batches.len() {
            return Err(StreamIoError::Protocol(format!(
                "{} outcomes for {} batches",
                outcomes.len(),
                batches.len()
            )));
        }
        Ok(outcomes)
    }

    /// Takes a request over from attempt `expected` as `expected + 1` and appends `event` (the
    /// `restart`), in one atomic step: no write of `expected` can land after it.
    pub async fn take_over(
        &self,
        client: &Client,
        target: &RequestStreams,
        expected: u32,
        event: &SessionEvent,
    ) -> Result<TakeOver, StreamIoError> {
        let next = expected.saturating_add(1).to_string();
        self.move_owner(client, target, expected, next, 0, event)
            .await
    }

    /// Ends a request on behalf of attempt `expected` that can no longer run (a poison job):
    /// marks it done and appends the terminal `event`, in one atomic step.
    pub async fn give_up(
        &self,
        client: &Client,
        target: &RequestStreams,
        expected: u32,
        event: &SessionEvent,
    ) -> Result<TakeOver, StreamIoError> {
        let ttl = target.retention.ttl_secs;
        self.move_owner(client, target, expected, OWNER_DONE.to_owned(), ttl, event)
            .await
    }

    async fn move_owner(
        &self,
        client: &Client,
        target: &RequestStreams,
        expected: u32,
        next: String,
        expire_secs: u64,
        event: &SessionEvent,
    ) -> Result<TakeOver, StreamIoError> {
        let reply = run_script(client, &self.take_over, || {
            let mut call = CallArgs::default();
            call.key(&target.stream);
            call.key(&target.owner);
            call.arg(expected);
            call.arg(&next);
            call.arg(expire_secs);
            self.wake(&mut call, &target.stream);
            call.fields(event);
            call
        })
        .await?;
        let mut parts = reply.into_array().into_iter();
        match parts.next().and_then(|v| v.as_i64()) {
            Some(1) => {
                let id = parts
                    .next()
                    .ok_or_else(|| StreamIoError::Protocol("take-over without id".to_owned()))?;
                Ok(TakeOver::Taken(entry_id(id)?))
            }
            Some(0) => {
                let current = parts
                    .next()
                    .and_then(Value::into_string)
                    .unwrap_or_default();
                Ok(TakeOver::Lost(OwnerState::from_value(Some(current))))
            }
            other => Err(StreamIoError::Protocol(format!(
                "take-over script answered {other:?}"
            ))),
        }
    }
}

/// What a take-over did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    /// The owner moved and the event was appended.
    Taken(EntryId),
    /// The owner was not the expected attempt (any more); nothing was written.
    Lost(OwnerState),
}

/// Who may write a request's events, as its owner key says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerState {
    /// The key is gone: the request's stream expired (or never existed).
    Missing,
    /// This attempt may write.
    Attempt(u32),
    /// The terminal event is written; nobody may write.
    Done,
}

impl OwnerState {
    fn from_value(raw: Option<String>) -> Self {
        match raw.as_deref() {
            None | Some("") => Self::Missing,
            Some(OWNER_DONE) => Self::Done,
            // Anything else would be a bug or foreign data: treat it like a missing owner so
            // that nobody writes, rather than guess an attempt.
            Some(other) => other.parse().map_or(Self::Missing, Self::Attempt),
        }
    }
}

/// The owner state of a request.
pub async fn owner_state(client: &Client, owner: &RedisKey) -> Result<OwnerState, StreamIoError> {
    let raw: Option<String> = client.get(owner.as_str()).await?;
    Ok(OwnerState::from_value(raw))
}

/// The keys one request writes to in its session's slot.
#[derive(Debug, Clone)]
pub struct RequestStreams {
    pub stream: RedisKey,
    pub owner: RedisKey,
    pub cancel: RedisKey,
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
            stream: RedisKey::session(session, model),
            owner: RedisKey::owner(session, request),
            cancel: RedisKey::cancel(session, request),
            retention,
        }
    }

    /// The keys the append scripts take for this request, in their order.
    fn write_keys(&self, call: &mut CallArgs) {
        call.key(&self.stream);
        call.key(&self.owner);
        call.key(&self.cancel);
    }
}

/// `XRANGE key (after + COUNT count`: up to `count` entries strictly after `after`.
pub async fn range_after(
    client: &Client,
    key: &RedisKey,
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
    key: &RedisKey,
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
    key: &RedisKey,
) -> Result<Option<EntryId>, StreamIoError> {
    let reply: Value = client.xrevrange(key.as_str(), "+", "-", Some(1)).await?;
    Ok(parse_entries(reply)?.first().map(|e| e.id))
}

/// The request of a session that is still answering, if any: of the newest entry of each of
/// the session's model streams (`models`), the request whose owner key still names an attempt
/// (not [`OWNER_DONE`](stream_schema::keys::OWNER_DONE), not expired), the newest such one
/// first. A chat front end asks this after a reload to resume the answer it was showing; a
/// session runs one request at a time in practice, and a running request's entries are the
/// newest of its stream.
pub async fn active_request<'a>(
    client: &Client,
    session: &SessionId,
    models: impl IntoIterator<Item = &'a stream_schema::ModelId>,
) -> Result<Option<RequestId>, StreamIoError> {
    // Compared by (millisecond, request id): an entry id's sequence number counts within its
    // own stream only, so `5-1` of one stream is not newer than `5-0` of another.
    let mut newest: Option<(u64, RequestId)> = None;
    for model in models {
        let key = RedisKey::session(session, model);
        let reply: Value = client.xrevrange(key.as_str(), "+", "-", Some(1)).await?;
        let Some(entry) = parse_entries(reply)?.into_iter().next() else {
            continue;
        };
        // An entry this version cannot read belongs to no request it could deliver.
        let Ok(event) = SessionEvent::decode(&entry.fields) else {
            continue;
        };
        let request = event.request_id();
        // Streams written in the same millisecond tie; then the later request (UUIDv7 ids sort
        // by creation) is the newer answer.
        if newest.is_some_and(|newest| newest >= (entry.id.ms, request)) {
            continue;
        }
        let owner = RedisKey::owner(session, &request);
        if matches!(owner_state(client, &owner).await?, OwnerState::Attempt(_)) {
            newest = Some((entry.id.ms, request));
        }
    }
    Ok(newest.map(|(_, request)| request))
}

/// What a stream has lost, for an exact `history_lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trimmed {
    /// The stream does not exist (never written, or expired).
    Missing,
    /// The largest id ever removed from the stream (`0-0` when none was).
    UpTo(EntryId),
}

impl Trimmed {
    /// Whether a reader positioned at `after` (it has every entry up to it) missed an entry.
    pub fn lost_after(self, after: EntryId) -> bool {
        matches!(self, Self::UpTo(max_deleted) if max_deleted > after)
    }
}

/// `XINFO STREAM`'s `max-deleted-entry-id` (Redis ≥ 7.0; moved by `XDEL`, which is how `START`
/// removes stale entries, never by `XTRIM`). Removal from the front and expiry are the only
/// ways a session stream loses entries, so an entry after a reader's position is gone exactly
/// when this id is past it.
pub async fn trimmed(client: &Client, key: &RedisKey) -> Result<Trimmed, StreamIoError> {
    let reply: Result<Value, _> = client.xinfo_stream(key.as_str(), false, None).await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) if error.details().contains("no such key") => return Ok(Trimmed::Missing),
        Err(error) => return Err(error.into()),
    };
    let mut fields = reply.into_array().into_iter();
    while let Some(name) = fields.next() {
        let value = fields.next();
        if name.as_str().as_deref() == Some("max-deleted-entry-id") {
            let raw = value.and_then(Value::into_string).unwrap_or_default();
            return EntryId::parse(&raw).map(Trimmed::UpTo).map_err(|e| {
                StreamIoError::Protocol(format!("max-deleted-entry-id {raw:?}: {e}"))
            });
        }
    }
    Err(StreamIoError::Protocol(
        "XINFO STREAM has no max-deleted-entry-id (Redis < 7.0)".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An announcement names its streams by its channel (a cluster's) or its lines (the
    /// shared channel's); any other channel names none.
    #[test]
    fn an_announcement_names_the_streams_written() -> Result<(), stream_schema::IdError> {
        let model = stream_schema::ModelId::parse("m")?;
        let a = RedisKey::session(&SessionId::parse("a")?, &model);
        let b = RedisKey::session(&SessionId::parse("b")?, &model);
        assert_eq!(announced_streams(&a.wake_channel(), "1"), [a.as_str()]);
        let both = format!("{a}\n{b}");
        assert_eq!(
            announced_streams(RedisKey::wake_all().as_str(), &both),
            [a.as_str(), b.as_str()]
        );
        assert!(announced_streams(RedisKey::wake_all().as_str(), "").is_empty());
        assert!(announced_streams("llm:other", a.as_str()).is_empty());
        Ok(())
    }
}
