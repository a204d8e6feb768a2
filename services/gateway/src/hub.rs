//! The multiplexed reader: one blocking `XREAD` over every session stream that has a
//! subscriber, fanning entries out to all subscribers of each stream.
//!
//! **Invariant**: the gateway never holds a Redis connection, or a blocking read, per SSE
//! client. Subscribing and unsubscribing only touch the in-memory table; a new stream wakes the
//! reader (`CLIENT UNBLOCK` on its own connection) so it re-issues the read with the new key.
//!
//! The seam between history and live feed: each stream has a hub cursor, the id of the last
//! entry the hub dispatched. A subscriber registers under the table lock; every entry after the
//! cursor at that moment reaches its mailbox, and the entries from its own position up to that
//! cursor it reads with `XRANGE` ([`Subscription::catch_up_to`]). Delivery drops ids it has
//! already sent, so neither a gap nor a duplicate can appear at the seam.
//!
//! Per read round, each new entry is decoded straight from the reply's values
//! ([`stream_io::parse_xread_raw`]) and encoded once as a shared [`Frame`]; each subscriber
//! gets all its frames of the round under one lock of its mailbox and one wake-up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fred::prelude::*;
use fred::types::{ClientUnblockFlag, ClusterHash, CustomCommand, Value};
use service_kit::backoff::Backoff;
use service_kit::ops::LoopFlag;
use stream_schema::{EntryId, RedisKey, RequestId, SessionEvent};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One decoded entry and its SSE frame, encoded once and shared by every subscriber.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: EntryId,
    pub event: Arc<SessionEvent>,
    pub bytes: Bytes,
}

/// Room for a typical frame (id, a token event's JSON), so that writing one rarely grows
/// its buffer.
const FRAME_CAPACITY: usize = 192;

impl Frame {
    pub fn new(id: EntryId, event: SessionEvent) -> Self {
        // One buffer for the whole frame: the id and the event's JSON are written into it
        // in place, not built as strings of their own and copied (issue #18).
        let mut text = String::with_capacity(FRAME_CAPACITY);
        // Writing to a `String` cannot fail.
        let _ = write!(text, "id: {id}\ndata: ");
        let mut bytes = text.into_bytes();
        event.write_json(&mut bytes);
        bytes.extend_from_slice(b"\n\n");
        Self {
            id,
            event: Arc::new(event),
            bytes: Bytes::from(bytes),
        }
    }
}

/// Why the hub stopped feeding a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The subscriber fell more than its byte budget behind: it resumes from Redis.
    Overflow,
    /// Reading from Redis failed: the client resumes once Redis is back.
    Unavailable,
}

/// Tuning of the reader.
#[derive(Debug, Clone, Copy)]
pub struct HubSettings {
    /// `COUNT` per stream of one read.
    pub batch: u64,
    /// `BLOCK` of one read, in milliseconds.
    pub block_ms: u64,
    /// Bytes a subscriber may have queued before it is cut off.
    pub buffer_bytes: usize,
    /// Redis Cluster: streams of different sessions live in different slots, and one `XREAD`
    /// may not span slots (see [`Hub::run_cluster`]).
    pub cluster: bool,
    /// Cluster mode: a full read round at least this often, whatever was announced.
    pub cluster_poll_ms: u64,
}

/// One round's read of every stream (see [`Hub::read_args`]): `keys[i]` is read after
/// `ids[i]`.
struct ReadArgs {
    keys: Vec<Bytes>,
    ids: Vec<Bytes>,
    round: u64,
}

/// Room per stream in a round's argument buffer: a session stream's key (`llm:stream:{…}:…`)
/// and an entry id.
const READ_ARG_BYTES: usize = 80;

struct Subscriber {
    mailbox: Arc<Mailbox>,
    filter: Option<RequestId>,
}

/// What the hub hands one subscriber: frames in order, then maybe why it stopped. One lock per
/// read round and subscriber, and the delivery takes everything queued at once. Empty, it
/// holds no allocation (an idle connection's queue costs its `Arc` only).
#[derive(Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
}

#[derive(Default)]
struct MailboxState {
    frames: VecDeque<Frame>,
    /// Bytes of `frames`: the hub adds, the delivery's take resets.
    queued: usize,
    closed: Option<Closed>,
    /// The delivery task waiting for frames.
    waker: Option<Waker>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, MailboxState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self, reason: Closed) {
        let mut state = self.lock();
        state.closed.get_or_insert(reason);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }
}

struct Feed {
    /// Last entry id the hub dispatched for this stream.
    cursor: EntryId,
    /// The read round in which the feed was created (see [`Table::round`]).
    since_round: u64,
    /// By subscription id. A `Vec`: a feed usually has one subscriber (a session's tab), and an
    /// empty-then-one-entry `HashMap` allocates four slots (about 140 bytes more per idle
    /// connection, issue #18).
    subscribers: Vec<(u64, Subscriber)>,
}

#[derive(Default)]
struct Table {
    feeds: HashMap<String, Feed>,
    next_id: u64,
    /// Counts the reader's snapshots. A read's reply is dispatched only to feeds that existed
    /// when its cursors were taken: a feed removed and created again meanwhile (its last
    /// subscriber left, a new one came) may start before the cursor that read used, and
    /// dispatching the reply would skip the entries in between for good.
    round: u64,
}

struct Shared {
    /// Written by subscribe/unsubscribe and the reader's dispatch; held only briefly and never
    /// across an await.
    table: Mutex<Table>,
    /// Signalled when a stream is added, so the blocked read is restarted with it.
    wake: Notify,
    settings: HubSettings,
}

/// Cheap to clone; all clones share one table and one reader.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A subscriber's end: its mailbox and where its catch-up read must stop.
pub struct Subscription {
    pub key: RedisKey,
    /// When set, read `(after, catch_up_to]` from Redis before taking frames.
    pub catch_up_to: Option<EntryId>,
    mailbox: Arc<Mailbox>,
    id: u64,
    hub: Hub,
}

/// What a subscription yields: every frame queued since the last take, or the end.
#[derive(Debug)]
pub enum Batch {
    /// In stream order; the taker leaves the deque empty for the next take (its buffer is
    /// reused).
    Frames,
    Closed(Closed),
}

impl Subscription {
    /// Takes every queued frame into `into` (which must be empty), or says why the hub
    /// stopped feeding this subscription once its frames are all taken. The byte budget
    /// counts only what is still queued, so taking frees it.
    pub fn poll_take(&self, cx: &mut Context<'_>, into: &mut VecDeque<Frame>) -> Poll<Batch> {
        let mut state = self.mailbox.lock();
        if !state.frames.is_empty() {
            std::mem::swap(&mut state.frames, into);
            state.queued = 0;
            return Poll::Ready(Batch::Frames);
        }
        if let Some(reason) = state.closed {
            return Poll::Ready(Batch::Closed(reason));
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.key.as_str(), self.id);
    }
}

impl Hub {
    pub fn new(settings: HubSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                table: Mutex::new(Table::default()),
                wake: Notify::new(),
                settings,
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated in a way that
        // matters more than losing delivery altogether, so keep serving.
        self.shared
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows `key` from after `after`, optionally only events of one request.
    pub fn subscribe(
        &self,
        key: &RedisKey,
        after: EntryId,
        filter: Option<RequestId>,
    ) -> Subscription {
        let mailbox = Arc::new(Mailbox::default());
        let (id, catch_up_to, added) = {
            let mut table = self.table();
            let id = table.next_id;
            table.next_id += 1;
            let mut added = false;
            let round = table.round;
            let feed = table
                .feeds
                .entry(key.as_str().to_owned())
                .or_insert_with(|| {
                    added = true;
                    Feed {
                        cursor: after,
                        since_round: round,
                        subscribers: Vec::with_capacity(1),
                    }
                });
            let catch_up_to = (feed.cursor > after).then_some(feed.cursor);
            feed.subscribers.push((
                id,
                Subscriber {
                    mailbox: mailbox.clone(),
                    filter,
                },
            ));
            (id, catch_up_to, added)
        };
        if added {
            self.shared.wake.notify_one();
        }
        metrics::gauge!("gateway_hub_subscribers").increment(1.0);
        Subscription {
            key: key.clone(),
            catch_up_to,
            mailbox,
            id,
            hub: self.clone(),
        }
    }

    fn unsubscribe(&self, key: &str, id: u64) {
        let mut table = self.table();
        if let Some(feed) = table.feeds.get_mut(key) {
            if let Some(at) = feed.subscribers.iter().position(|(s, _)| *s == id) {
                feed.subscribers.swap_remove(at);
                metrics::gauge!("gateway_hub_subscribers").decrement(1.0);
            }
            if feed.subscribers.is_empty() {
                table.feeds.remove(key);
            }
        }
    }

    /// The streams to read and their cursors as `XREAD` arguments, and the round they belong
    /// to (for [`Hub::dispatch`]). A read names every stream with a subscriber, every round:
    /// all keys and cursors are written into one buffer and handed out as slices of it, where
    /// a string per stream and round made most of the gateway's allocations under load
    /// (issue #18).
    fn read_args(&self) -> ReadArgs {
        let mut table = self.table();
        table.round += 1;
        let mut text = BytesMut::with_capacity(table.feeds.len() * READ_ARG_BYTES);
        // Where each stream's key ends and its cursor ends, in `text`.
        let mut ends = Vec::with_capacity(table.feeds.len());
        for (key, feed) in &table.feeds {
            text.extend_from_slice(key.as_bytes());
            let key_end = text.len();
            // Writing to a `BytesMut` cannot fail: it grows.
            let _ = write!(text, "{}", feed.cursor);
            ends.push((key_end, text.len()));
        }
        let text = text.freeze();
        let mut keys = Vec::with_capacity(ends.len());
        let mut ids = Vec::with_capacity(ends.len());
        let mut start = 0;
        for (key_end, id_end) in ends {
            keys.push(text.slice(start..key_end));
            ids.push(text.slice(key_end..id_end));
            start = id_end;
        }
        ReadArgs {
            keys,
            ids,
            round: table.round,
        }
    }

    /// The streams to read and their cursors, and the round they belong to (for
    /// [`Hub::dispatch`]). The cluster reader's form: it follows and filters streams by key.
    fn snapshot(&self) -> (Vec<String>, Vec<String>, u64) {
        let mut table = self.table();
        table.round += 1;
        let (keys, ids) = table
            .feeds
            .iter()
            .map(|(key, feed)| (key.clone(), feed.cursor.to_string()))
            .unzip();
        (keys, ids, table.round)
    }

    /// Decodes and encodes each new entry once, then hands every subscriber all of its frames
    /// of the round under one lock of its mailbox and wakes it once.
    /// `round` is the snapshot the read's cursors came from. Returns the streams whose entries
    /// were set aside because their feed is newer than the read: they must be read again from
    /// the feed's own cursor.
    fn dispatch(
        &self,
        replies: Vec<(String, Vec<stream_io::RawEntry>)>,
        round: u64,
    ) -> Vec<String> {
        let buffer_bytes = self.shared.settings.buffer_bytes;
        let mut table = self.table();
        let mut frames = Vec::new();
        let mut read_again = Vec::new();
        for (key, entries) in replies {
            // The stream lost its last subscriber while the read was in flight.
            let Some(feed) = table.feeds.get_mut(&key) else {
                continue;
            };
            if feed.since_round >= round {
                read_again.push(key);
                continue;
            }
            frames.clear();
            for entry in entries {
                if entry.id <= feed.cursor {
                    continue;
                }
                feed.cursor = entry.id;
                match SessionEvent::decode(&entry) {
                    Ok(event) => frames.push(Frame::new(entry.id, event)),
                    Err(error) => {
                        tracing::warn!(%key, id = %entry.id, %error, "skipping undecodable entry");
                        metrics::counter!("gateway_decode_errors_total").increment(1);
                    }
                }
            }
            if frames.is_empty() {
                continue;
            }
            feed.subscribers.retain(|(_, subscriber)| {
                let mut state = subscriber.mailbox.lock();
                let before = state.frames.len();
                for frame in &frames {
                    if subscriber
                        .filter
                        .is_some_and(|f| f != frame.event.request_id())
                    {
                        continue;
                    }
                    let size = frame.bytes.len();
                    if state.queued + size > buffer_bytes {
                        metrics::counter!("gateway_sse_overflows_total").increment(1);
                        metrics::gauge!("gateway_hub_subscribers").decrement(1.0);
                        state.closed = Some(Closed::Overflow);
                        if let Some(waker) = state.waker.take() {
                            waker.wake();
                        }
                        return false;
                    }
                    state.queued += size;
                    state.frames.push_back(frame.clone());
                }
                if state.frames.len() > before
                    && let Some(waker) = state.waker.take()
                {
                    waker.wake();
                }
                true
            });
        }
        read_again
    }

    /// Ends every subscription with `reason` (Redis failed: clients resume later).
    fn close_all(&self, reason: Closed) {
        let mut table = self.table();
        for (_, feed) in table.feeds.drain() {
            for (_, subscriber) in feed.subscribers {
                subscriber.mailbox.close(reason);
                metrics::gauge!("gateway_hub_subscribers").decrement(1.0);
            }
        }
    }

    /// The reader loop. `reader` is a client of its own: its connection blocks in `XREAD`.
    /// On a Redis Cluster, `wake` (another client of its own) follows the streams' wake
    /// channels ([`Hub::run_cluster`]).
    pub async fn run(
        self,
        reader: Client,
        wake: Option<Client>,
        shutdown: CancellationToken,
        flag: LoopFlag,
    ) {
        if let Some(wake) = wake.filter(|_| self.shared.settings.cluster) {
            return self.run_cluster(reader, wake, shutdown, flag).await;
        }
        let settings = self.shared.settings;
        // Longest a read may take before the connection is presumed dead.
        let read_deadline = Duration::from_millis(settings.block_ms) + Duration::from_secs(3);
        let mut backoff = Backoff::default();
        flag.set(true);
        while !shutdown.is_cancelled() {
            let ReadArgs { keys, ids, round } = self.read_args();
            if keys.is_empty() {
                if !self.idle(&reader, &shutdown, &flag).await {
                    break;
                }
                continue;
            }
            let read = reader.custom::<Value, Value>(
                CustomCommand::new_static("XREAD", ClusterHash::Random, true),
                blocking_xread_args(settings.batch, settings.block_ms, keys, ids),
            );
            let read = tokio::time::timeout(read_deadline, read);
            tokio::pin!(read);
            let result = tokio::select! {
                result = &mut read => result,
                () = self.shared.wake.notified() => interrupt(&reader, &mut read).await,
                () = shutdown.cancelled() => {
                    let _ = reader.unblock_self(Some(ClientUnblockFlag::Timeout)).await;
                    break;
                }
            };
            match result
                .map_err(|_| "read timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .and_then(|value| stream_io::parse_xread_raw(value).map_err(|e| e.to_string()))
            {
                Ok(replies) => {
                    backoff.reset();
                    flag.set(true);
                    // Streams set aside are read from their own cursors in the next round.
                    let _ = self.dispatch(replies, round);
                }
                Err(error) => {
                    if !self
                        .read_failed(&error, &mut backoff, &shutdown, &flag)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        flag.set(false);
    }
}

impl Hub {
    /// Nothing to read: checks the reader's connection so readiness tells the truth (and
    /// recovers after an outage) while no client is connected, then waits for a new key or a
    /// while. False on shutdown.
    async fn idle(&self, reader: &Client, shutdown: &CancellationToken, flag: &LoopFlag) -> bool {
        let alive = tokio::time::timeout(Duration::from_secs(2), reader.ping::<String>(None)).await;
        flag.set(matches!(alive, Ok(Ok(_))));
        tokio::select! {
            () = self.shared.wake.notified() => true,
            () = tokio::time::sleep(Duration::from_millis(self.shared.settings.block_ms)) => true,
            () = shutdown.cancelled() => false,
        }
    }

    /// A read failed (Redis down): ends every stream with a retryable error and waits
    /// `backoff` (100 ms doubling to 2 s). False on shutdown.
    async fn read_failed(
        &self,
        error: &str,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
        flag: &LoopFlag,
    ) -> bool {
        tracing::warn!(%error, "multiplexed read failed; ending open streams");
        metrics::counter!("gateway_reader_errors_total").increment(1);
        flag.set(false);
        self.close_all(Closed::Unavailable);
        backoff.wait(shutdown).await
    }

    /// The reader loop on a Redis Cluster.
    ///
    /// A blocking `XREAD` can only cover keys of one slot, and sessions spread over all slots,
    /// so blocking per slot would need a connection per active slot. Instead every write to a
    /// session stream also publishes to the stream's wake channel (`SPUBLISH` inside the
    /// writing script, in the stream's slot), and this loop follows the wake channel of every
    /// stream in its table on `wake`, a client of its own (`SSUBSCRIBE`, one per new stream,
    /// sent before the stream is first read so no write can go unannounced). It reads only
    /// the streams that were announced, one non-blocking `XREAD` per slot, all at once; with
    /// nothing announced it reads nothing. A full round every `cluster_poll_ms` (and after the
    /// wake client reconnects or falls behind) is the safety net for a lost announcement. The
    /// cost is per write and per active stream, never per client, and idle streams cost one
    /// round per `cluster_poll_ms`.
    pub async fn run_cluster(
        self,
        reader: Client,
        wake: Client,
        shutdown: CancellationToken,
        flag: LoopFlag,
    ) {
        let settings = self.shared.settings;
        let mut messages = wake.message_rx();
        let mut reconnects = wake.reconnect_rx();
        let mut sweep =
            tokio::time::interval(Duration::from_millis(settings.cluster_poll_ms.max(1)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::default();
        // Stream keys whose wake channel `wake` follows.
        let mut followed: HashSet<String> = HashSet::new();
        // What the next round reads: announced or new streams, or all of them.
        let mut due: HashSet<String> = HashSet::new();
        let mut read_all = true;
        while !shutdown.is_cancelled() {
            let (keys, ids, round) = self.snapshot();
            if keys.is_empty() {
                unfollow(&wake, followed.drain().collect()).await;
                if !self.idle(&reader, &shutdown, &flag).await {
                    break;
                }
                read_all = true;
                continue;
            }
            match follow(&wake, &keys, &mut followed).await {
                Ok(added) => due.extend(added),
                Err(error) => {
                    followed.clear();
                    if !self
                        .read_failed(&error, &mut backoff, &shutdown, &flag)
                        .await
                    {
                        break;
                    }
                    continue;
                }
            }
            let cursors: Vec<(String, String)> = keys
                .into_iter()
                .zip(ids)
                .filter(|(key, _)| read_all || due.contains(key))
                .collect();
            read_all = false;
            due.clear();
            if !cursors.is_empty() {
                match read_round(&reader, settings.batch, cursors).await {
                    Ok(replies) => {
                        backoff.reset();
                        flag.set(true);
                        // A stream that filled its batch has more: read it again at once.
                        due.extend(
                            replies
                                .iter()
                                .filter(|(_, entries)| entries.len() as u64 >= settings.batch)
                                .map(|(key, _)| key.clone()),
                        );
                        let read_again = self.dispatch(replies, round);
                        due.extend(read_again);
                    }
                    Err(error) => {
                        if !self
                            .read_failed(&error, &mut backoff, &shutdown, &flag)
                            .await
                        {
                            break;
                        }
                        continue;
                    }
                }
                if !due.is_empty() {
                    continue;
                }
            }
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) => {
                        due.extend(announced(&message));
                        // Take every announcement already queued: one round serves them all.
                        loop {
                            match messages.try_recv() {
                                Ok(message) => due.extend(announced(&message)),
                                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                                Err(_) => {
                                    read_all = true;
                                    break;
                                }
                            }
                        }
                    }
                    // Announcements were dropped (or the client is gone): read everything.
                    Err(_) => read_all = true,
                },
                // Subscriptions of a reconnected connection are gone: follow again, read all.
                _ = reconnects.recv() => {
                    followed.clear();
                    read_all = true;
                }
                () = self.shared.wake.notified() => {}
                _ = sweep.tick() => read_all = true,
                () = shutdown.cancelled() => break,
            }
        }
        unfollow(&wake, followed.drain().collect()).await;
        flag.set(false);
    }
}

/// The stream key an announcement on a wake channel names.
fn announced(message: &fred::types::Message) -> Option<String> {
    RedisKey::stream_of_wake_channel(&message.channel).map(str::to_owned)
}

/// Follows the wake channel of each of `keys` not followed yet (one `SSUBSCRIBE` each: the
/// channels live in different slots) and stops following the keys that left the table.
/// Returns the newly followed keys, which must be read once now.
async fn follow(
    wake: &Client,
    keys: &[String],
    followed: &mut HashSet<String>,
) -> Result<Vec<String>, String> {
    let current: HashSet<&String> = keys.iter().collect();
    let gone: Vec<String> = followed
        .iter()
        .filter(|key| !current.contains(key))
        .cloned()
        .collect();
    for key in &gone {
        followed.remove(key);
    }
    unfollow(wake, gone).await;
    let added: Vec<String> = keys
        .iter()
        .filter(|key| !followed.contains(*key))
        .cloned()
        .collect();
    if added.is_empty() {
        return Ok(added);
    }
    let subscribes = added
        .iter()
        .map(|key| wake.ssubscribe(RedisKey::wake_channel_of(key)));
    let results = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join_all(subscribes),
    )
    .await
    .map_err(|_| "following wake channels timed out".to_owned())?;
    for result in results {
        result.map_err(|e| format!("following a wake channel: {e}"))?;
    }
    followed.extend(added.iter().cloned());
    Ok(added)
}

/// Stops following the wake channels of `keys`. Best effort: an announcement that still
/// arrives for a key no longer in the table is ignored.
async fn unfollow(wake: &Client, keys: Vec<String>) {
    if keys.is_empty() {
        return;
    }
    let unsubscribes = keys
        .iter()
        .map(|key| wake.sunsubscribe(RedisKey::wake_channel_of(key)));
    let done = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join_all(unsubscribes),
    )
    .await;
    if let Ok(results) = done {
        for error in results.into_iter().filter_map(Result::err) {
            tracing::debug!(%error, "unfollowing a wake channel failed");
        }
    }
}

/// The arguments of `XREAD COUNT batch BLOCK block_ms STREAMS keys… ids…`.
fn blocking_xread_args(batch: u64, block_ms: u64, keys: Vec<Bytes>, ids: Vec<Bytes>) -> Vec<Value> {
    let mut args = Vec::with_capacity(5 + keys.len() + ids.len());
    args.push(Value::from_static_str("COUNT"));
    args.push(Value::Integer(i64::try_from(batch).unwrap_or(i64::MAX)));
    args.push(Value::from_static_str("BLOCK"));
    args.push(Value::Integer(i64::try_from(block_ms).unwrap_or(i64::MAX)));
    args.push(Value::from_static_str("STREAMS"));
    args.extend(keys.into_iter().map(Value::Bytes));
    args.extend(ids.into_iter().map(Value::Bytes));
    args
}

/// One non-blocking `XREAD` per slot over `cursors` (key, last id), all at once (fred
/// pipelines them per node).
async fn read_round(
    reader: &Client,
    batch: u64,
    cursors: Vec<(String, String)>,
) -> Result<Vec<(String, Vec<stream_io::RawEntry>)>, String> {
    let mut groups: HashMap<u16, (Vec<String>, Vec<String>)> = HashMap::new();
    for (key, id) in cursors {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let group = groups.entry(slot).or_default();
        group.0.push(key);
        group.1.push(id);
    }
    let reads = groups
        .into_values()
        .map(|(keys, ids)| reader.xread::<Value, _, _>(Some(batch), None, keys, ids));
    let results = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(reads))
        .await
        .map_err(|_| "read round timed out".to_owned())?;
    let mut replies = Vec::new();
    for result in results {
        let value = result.map_err(|e| e.to_string())?;
        replies.extend(stream_io::parse_xread_raw(value).map_err(|e| e.to_string())?);
    }
    Ok(replies)
}

/// Interrupts the blocked read so it is re-issued with the new key set. `CLIENT UNBLOCK` may
/// arrive before the read itself reached Redis, so it is repeated until the read returns.
async fn interrupt<F>(reader: &Client, read: &mut std::pin::Pin<&mut F>) -> F::Output
where
    F: std::future::Future,
{
    loop {
        if let Err(error) = reader.unblock_self(Some(ClientUnblockFlag::Timeout)).await {
            tracing::debug!(%error, "unblock failed; retrying");
        }
        if let Ok(output) = tokio::time::timeout(Duration::from_millis(20), read.as_mut()).await {
            return output;
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::task::noop_waker_ref;
    use stream_schema::{ErrorCode, ModelId, SessionId};

    use super::*;

    fn events() -> Vec<SessionEvent> {
        let request_id = RequestId::new();
        vec![
            SessionEvent::Token {
                request_id,
                sequence: 0,
                content: "h\u{e9}llo \"quoted\"\n".to_owned(),
                timestamp: 1_700_000_000_000,
            },
            SessionEvent::Error {
                request_id,
                code: ErrorCode::Unavailable,
                message: "gone".to_owned(),
                retryable: true,
                timestamp: 1_700_000_000_001,
            },
        ]
    }

    fn reply(key: &str, events: &[SessionEvent]) -> Value {
        reply_from(key, 1, events)
    }

    /// A reply whose entries have ids `first-0`, `first+1-0`, …
    fn reply_from(key: &str, first: usize, events: &[SessionEvent]) -> Value {
        let entries = events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let fields = event
                    .encode()
                    .into_iter()
                    .flat_map(|(name, value)| [Value::from(name), Value::from(value)])
                    .collect();
                Value::Array(vec![
                    Value::from(format!("{}-0", first + i)),
                    Value::Array(fields),
                ])
            })
            .collect();
        Value::Array(vec![Value::Array(vec![
            Value::from(key),
            Value::Array(entries),
        ])])
    }

    /// A single-node hub whose buffer no test fills.
    fn hub() -> Hub {
        Hub::new(HubSettings {
            batch: 64,
            block_ms: 1000,
            buffer_bytes: 1 << 20,
            cluster: false,
            cluster_poll_ms: 1000,
        })
    }

    /// A frame is the SSE event of its entry: its id, its event's JSON as data, a blank line;
    /// a frame longer than the buffer's first size is whole too.
    #[test]
    fn a_frame_is_the_sse_event_of_its_entry() -> anyhow::Result<()> {
        let mut events = events();
        events.push(SessionEvent::Token {
            request_id: RequestId::new(),
            sequence: 7,
            content: "x".repeat(3 * FRAME_CAPACITY),
            timestamp: 1_700_000_000_002,
        });
        for (n, event) in events.into_iter().enumerate() {
            let id = EntryId {
                ms: 1_700_000_000_000 + n as u64,
                seq: 3,
            };
            let expected = format!("id: {id}\ndata: {}\n\n", event.to_json());
            let frame = Frame::new(id, event);
            assert_eq!(frame.bytes, expected.as_bytes());
        }
        Ok(())
    }

    /// The reader's raw parse makes byte for byte the frames the converting parse made.
    #[test]
    fn frames_from_the_raw_parse_equal_those_of_the_converting_parse() -> anyhow::Result<()> {
        let value = reply("llm:stream:{s}:m", &events());
        let converted = stream_io::parse_xread(value.clone())?;
        let raw = stream_io::parse_xread_raw(value)?;
        assert_eq!(converted.len(), 1);
        assert_eq!(converted[0].1.len(), raw[0].1.len());
        for (entry, raw_entry) in converted[0].1.iter().zip(&raw[0].1) {
            let old = Frame::new(entry.id, SessionEvent::decode(&entry.fields)?);
            let new = Frame::new(raw_entry.id, SessionEvent::decode(raw_entry)?);
            assert_eq!(old.id, new.id);
            assert_eq!(old.bytes, new.bytes);
            assert_eq!(old.event, new.event);
        }
        Ok(())
    }

    /// A round's read names every stream once, each with its own cursor, as the cluster
    /// reader's snapshot does; each round has a new number.
    #[test]
    fn a_rounds_read_names_every_stream_after_its_cursor() -> anyhow::Result<()> {
        let hub = hub();
        let mut subscriptions = Vec::new();
        for (n, session) in ["a", "b", "a-much-longer-session-id-than-the-others"]
            .into_iter()
            .enumerate()
        {
            let key = RedisKey::session(&SessionId::parse(session)?, &ModelId::parse("m")?);
            let after = EntryId {
                ms: 1_700_000_000_000 + n as u64,
                seq: n as u64,
            };
            subscriptions.push(hub.subscribe(&key, after, None));
        }
        let (keys, ids, first) = hub.snapshot();
        let args = hub.read_args();
        assert_eq!(args.round, first + 1);
        let read: Vec<(&[u8], &[u8])> = args
            .keys
            .iter()
            .zip(&args.ids)
            .map(|(key, id)| (key.as_ref(), id.as_ref()))
            .collect();
        let expected: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(&ids)
            .map(|(key, id)| (key.as_bytes(), id.as_bytes()))
            .collect();
        assert_eq!(read, expected);
        assert_eq!(read.len(), 3);
        assert!(ids.contains(&"1700000000002-2".to_owned()), "{ids:?}");
        Ok(())
    }

    /// A read in flight whose cursor came from a feed that was removed and created again
    /// since (its last subscriber left, a new one came from an earlier position) is not
    /// dispatched to the new feed, which would skip the entries in between for good: the
    /// stream is read again from the new feed's cursor.
    #[test]
    fn a_read_older_than_its_feed_is_read_again_from_the_feeds_cursor() -> anyhow::Result<()> {
        let hub = hub();
        let key = RedisKey::session(&SessionId::parse("s")?, &ModelId::parse("m")?);
        let events = events();
        let first = hub.subscribe(&key, EntryId::ZERO, None);
        let round = hub.read_args().round;
        let set_aside = hub.dispatch(
            stream_io::parse_xread_raw(reply_from(key.as_str(), 1, &events))?,
            round,
        );
        assert!(set_aside.is_empty());
        let ReadArgs { ids, round, .. } = hub.read_args();
        assert_eq!(ids, ["2-0"]);

        // While the read from 2-0 is in flight, the only subscriber leaves and another one
        // comes from the start: its feed is new, with nothing to catch up on.
        drop(first);
        let second = hub.subscribe(&key, EntryId::ZERO, None);
        assert_eq!(second.catch_up_to, None);
        let set_aside = hub.dispatch(
            stream_io::parse_xread_raw(reply_from(key.as_str(), 3, &events))?,
            round,
        );
        assert_eq!(set_aside, [key.as_str()]);
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut taken = VecDeque::new();
        assert!(
            second.poll_take(&mut cx, &mut taken).is_pending(),
            "entries 3 and 4 without 1 and 2: {taken:?}"
        );
        let ids = hub.read_args().ids;
        assert_eq!(
            ids,
            ["0-0"],
            "the next read starts where the new subscriber stands"
        );
        Ok(())
    }

    /// A round's frames reach a subscriber in one take, in order; the end comes after them.
    #[test]
    fn a_subscriber_takes_a_rounds_frames_at_once_then_the_end() -> anyhow::Result<()> {
        let hub = hub();
        let key = RedisKey::session(&SessionId::parse("s")?, &ModelId::parse("m")?);
        let subscription = hub.subscribe(&key, EntryId::ZERO, None);
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut taken = VecDeque::new();
        assert!(subscription.poll_take(&mut cx, &mut taken).is_pending());
        let events = events();
        let round = hub.read_args().round;
        hub.dispatch(
            stream_io::parse_xread_raw(reply(key.as_str(), &events))?,
            round,
        );
        assert!(matches!(
            subscription.poll_take(&mut cx, &mut taken),
            Poll::Ready(Batch::Frames)
        ));
        let ids: Vec<String> = taken.iter().map(|f| f.id.to_string()).collect();
        assert_eq!(ids, ["1-0", "2-0"]);
        assert_eq!(
            taken.iter().map(|f| f.event.as_ref()).collect::<Vec<_>>(),
            events.iter().collect::<Vec<_>>()
        );
        taken.clear();
        assert!(subscription.poll_take(&mut cx, &mut taken).is_pending());
        hub.close_all(Closed::Unavailable);
        assert!(matches!(
            subscription.poll_take(&mut cx, &mut taken),
            Poll::Ready(Batch::Closed(Closed::Unavailable))
        ));
        Ok(())
    }
}
