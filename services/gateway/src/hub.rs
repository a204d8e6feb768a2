//! The multiplexed reader: one loop reads every session stream that has a subscriber and fans
//! entries out to all subscribers of each stream. With few streams it blocks in one `XREAD`
//! over all of them; with more (and always on a cluster) it reads only the streams whose writes
//! announced themselves ([`Hub::run`]).
//!
//! **Invariant**: the gateway never holds a Redis connection, or a blocking read, per SSE
//! client. Subscribing and unsubscribing only touch the in-memory table; a new stream wakes the
//! reader (`CLIENT UNBLOCK` on its own connection when it blocks) so it reads the new key.
//!
//! The seam between history and live feed: each stream has a hub cursor, the id of the last
//! entry the hub dispatched. A subscriber registers under the table lock; every entry after the
//! cursor at that moment reaches its mailbox, and the entries from its own position up to that
//! cursor it reads with `XRANGE` ([`Subscription::catch_up_to`]). Delivery drops ids it has
//! already sent, so neither a gap nor a duplicate can appear at the seam.
//!
//! Per read round, each new entry is decoded straight from the reply's protocol frames
//! ([`stream_io::parse_xread_frame`]) and encoded once as a shared [`Frame`]; each subscriber
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
    /// may not span slots (see [`Hub::run`]).
    pub cluster: bool,
    /// The announced reader: a full read round at least this often, whatever was announced.
    pub sweep_ms: u64,
    /// A single node: up to this many streams, block on all of them instead of reading what
    /// was announced.
    pub block_max_streams: usize,
}

/// One round's read of every stream (see [`Hub::read_args`]): `keys[i]` is read after
/// `ids[i]`.
struct ReadArgs {
    keys: Vec<Bytes>,
    ids: Vec<Bytes>,
    round: u64,
}

/// What changed in the table since the announced reader last looked.
struct Changes {
    added: Vec<String>,
    removed: Vec<String>,
    /// No stream has a subscriber.
    idle: bool,
}

/// How writes announce themselves to the announced reader (see [`stream_io::session::WakeUps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announcements {
    /// One channel for every stream (a single node): subscribed while any stream is followed.
    Shared,
    /// A channel per stream, in its slot (a cluster): one subscription per followed stream.
    PerStream,
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
    /// Keys of the feeds created, and of those removed, since the announced reader last took
    /// them ([`Hub::take_changes`]): it reads a new stream once and follows or stops following
    /// its wake channel. The blocking reader names every stream every round and drops them.
    added: Vec<String>,
    removed: Vec<String>,
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
            if added {
                table.added.push(key.as_str().to_owned());
            }
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
                table.removed.push(key.to_owned());
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
        table.added.clear();
        table.removed.clear();
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

    /// The announced reader's read: each of `only`'s streams that has a feed (every stream
    /// with `None`) and its cursor, and the round they belong to (for [`Hub::dispatch`]).
    fn cursors(&self, only: Option<&HashSet<String>>) -> (Vec<(String, String)>, u64) {
        let mut table = self.table();
        table.round += 1;
        let cursors = match only {
            None => table
                .feeds
                .iter()
                .map(|(key, feed)| (key.clone(), feed.cursor.to_string()))
                .collect(),
            Some(keys) => keys
                .iter()
                .filter_map(|key| {
                    let feed = table.feeds.get(key)?;
                    Some((key.clone(), feed.cursor.to_string()))
                })
                .collect(),
        };
        (cursors, table.round)
    }

    /// The feeds created and removed since the last call, for the announced reader: `added`
    /// holds the keys that have a feed now, `removed` those that have none, each once.
    fn take_changes(&self) -> Changes {
        let mut table = self.table();
        let table = &mut *table;
        let mut added: Vec<String> = table
            .added
            .drain(..)
            .filter(|key| table.feeds.contains_key(key))
            .collect();
        added.sort_unstable();
        added.dedup();
        let mut removed: Vec<String> = table
            .removed
            .drain(..)
            .filter(|key| !table.feeds.contains_key(key))
            .collect();
        removed.sort_unstable();
        removed.dedup();
        Changes {
            added,
            removed,
            idle: table.feeds.is_empty(),
        }
    }

    /// Every stream with a feed.
    fn keys(&self) -> Vec<String> {
        self.table().feeds.keys().cloned().collect()
    }

    /// Decodes and encodes each new entry once, then hands every subscriber all of its frames
    /// of the round under one lock of its mailbox, and wakes them all once the round is
    /// dispatched.
    /// `round` is the snapshot the read's cursors came from. Returns the streams whose entries
    /// were set aside because their feed is newer than the read: they must be read again from
    /// the feed's own cursor.
    fn dispatch(&self, replies: Vec<stream_io::RawStream>, round: u64) -> Vec<String> {
        let buffer_bytes = self.shared.settings.buffer_bytes;
        let mut table = self.table();
        let mut frames = Vec::new();
        let mut read_again = Vec::new();
        // Woken together once the round is dispatched (and the table lock released): a
        // delivery task woken mid-round runs on the other core and contends for the mailbox
        // locks the dispatch still takes.
        let mut wakers = Vec::new();
        for (key, entries) in replies {
            // The stream lost its last subscriber while the read was in flight.
            let Some(feed) = table.feeds.get_mut(&*key) else {
                continue;
            };
            if feed.since_round >= round {
                read_again.push(key.to_string());
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
                        wakers.extend(state.waker.take());
                        return false;
                    }
                    state.queued += size;
                    state.frames.push_back(frame.clone());
                }
                if state.frames.len() > before {
                    wakers.extend(state.waker.take());
                }
                true
            });
        }
        drop(table);
        for waker in wakers {
            waker.wake();
        }
        read_again
    }

    /// Ends every subscription with `reason` (Redis failed: clients resume later).
    fn close_all(&self, reason: Closed) {
        let mut table = self.table();
        let table = &mut *table;
        for (key, feed) in table.feeds.drain() {
            table.removed.push(key);
            for (_, subscriber) in feed.subscribers {
                subscriber.mailbox.close(reason);
                metrics::gauge!("gateway_hub_subscribers").decrement(1.0);
            }
        }
    }

    /// One blocking round: one `XREAD … BLOCK` over every stream with a subscriber, re-issued
    /// when a new stream comes (`CLIENT UNBLOCK`). Redis scans every named stream when the read
    /// is issued and each time a write wakes it, so its cost grows with the streams followed,
    /// not the streams written; with few streams it is the quickest way to each entry (the
    /// reply carries it). False on shutdown.
    async fn blocking_round(
        &self,
        reader: &Client,
        shutdown: &CancellationToken,
        flag: &LoopFlag,
        backoff: &mut Backoff,
    ) -> bool {
        let settings = self.shared.settings;
        // Longest a read may take before the connection is presumed dead.
        let read_deadline = Duration::from_millis(settings.block_ms) + Duration::from_secs(3);
        let ReadArgs { keys, ids, round } = self.read_args();
        if keys.is_empty() {
            return true;
        }
        let read = reader.custom_raw(
            CustomCommand::new_static("XREAD", ClusterHash::Random, true),
            xread_args(settings.batch, Some(settings.block_ms), keys, ids),
        );
        let read = tokio::time::timeout(read_deadline, read);
        tokio::pin!(read);
        let result = tokio::select! {
            result = &mut read => result,
            () = self.shared.wake.notified() => interrupt(reader, &mut read).await,
            () = shutdown.cancelled() => {
                let _ = reader.unblock_self(Some(ClientUnblockFlag::Timeout)).await;
                return false;
            }
        };
        match result
            .map_err(|_| "read timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .and_then(|frame| stream_io::parse_xread_frame(frame).map_err(|e| e.to_string()))
        {
            Ok(replies) => {
                backoff.reset();
                flag.set(true);
                // Streams set aside are read from their own cursors in the next round.
                let _ = self.dispatch(replies, round);
                true
            }
            Err(error) => self.read_failed(&error, backoff, shutdown, flag).await,
        }
    }

    /// Streams with a subscriber.
    fn followed(&self) -> usize {
        self.table().feeds.len()
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

    /// The reader loop. `reader` and `wake` are clients of their own: `reader`'s connection
    /// blocks in `XREAD`, `wake`'s takes subscriptions. It reads what was announced, or, on a
    /// single node with at most `block_max_streams` streams, blocks on all of them
    /// ([`Hub::blocking_round`]): a blocked read returns each entry with its reply, where an
    /// announcement adds a hop, and Redis's cost of blocking on a few streams is small. The
    /// loop unsubscribes while it blocks, and its first announced round after blocking reads
    /// every stream.
    ///
    /// Every write to a session stream announces itself (`SPUBLISH` inside the writing
    /// script, see [`stream_io::session::WakeUps`]): on a single node on one shared channel,
    /// one message per script call naming every stream it wrote; on a Redis Cluster on the
    /// stream's own channel, in its slot, because a blocking `XREAD` can only cover keys of
    /// one slot and sessions spread over all of them. This loop listens on `wake`, a client of
    /// its own: the shared channel while it follows any stream, or the channel of each stream
    /// in its table (`SSUBSCRIBE`, one per new stream). It subscribes before a new stream is
    /// first read, so no write after that read goes unannounced. It reads only the announced
    /// streams it follows, with non-blocking `XREAD`s (one per slot on a cluster), all at
    /// once; with nothing announced it reads nothing. A full round every `sweep_ms`
    /// (and after the wake client reconnects or falls behind) is the safety net for a lost
    /// announcement. Redis's cost is per write and per stream written, never per client or
    /// per stream followed, and idle streams cost one round per `sweep_ms`.
    pub async fn run(
        self,
        reader: Client,
        wake: Client,
        shutdown: CancellationToken,
        flag: LoopFlag,
    ) {
        let settings = self.shared.settings;
        let mode = if settings.cluster {
            Announcements::PerStream
        } else {
            Announcements::Shared
        };
        let mut messages = wake.message_rx();
        let mut reconnects = wake.reconnect_rx();
        let mut sweep = tokio::time::interval(Duration::from_millis(settings.sweep_ms.max(1)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::default();
        let mut listener = Listener::new(mode);
        // What the next round reads: announced or new streams, or all of them.
        let mut due: HashSet<String> = HashSet::new();
        let mut read_all = true;
        flag.set(true);
        while !shutdown.is_cancelled() {
            let changes = self.take_changes();
            if changes.idle {
                listener.stop(&wake).await;
                if !self.idle(&reader, &shutdown, &flag).await {
                    break;
                }
                read_all = true;
                continue;
            }
            if mode == Announcements::Shared && self.followed() <= settings.block_max_streams {
                // Few streams: block on all of them, unsubscribed; announcements would add a
                // hop to each entry and save Redis little.
                listener.stop(&wake).await;
                if !self
                    .blocking_round(&reader, &shutdown, &flag, &mut backoff)
                    .await
                {
                    break;
                }
                // Whatever was written before the next announced round subscribes is read
                // by that round in full.
                read_all = true;
                continue;
            }
            if let Err(error) = listener.follow(&wake, &self, &changes).await {
                listener.forget();
                if !self
                    .read_failed(&error, &mut backoff, &shutdown, &flag)
                    .await
                {
                    break;
                }
                read_all = true;
                continue;
            }
            due.extend(changes.added);
            let (cursors, round) = self.cursors((!read_all).then_some(&due));
            read_all = false;
            due.clear();
            if !cursors.is_empty() {
                match read_round(&reader, settings.batch, cursors, mode).await {
                    Ok(replies) => {
                        backoff.reset();
                        flag.set(true);
                        // A stream that filled its batch has more: read it again at once.
                        due.extend(
                            replies
                                .iter()
                                .filter(|(_, entries)| entries.len() as u64 >= settings.batch)
                                .map(|(key, _)| key.to_string()),
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
                        announced(&message, &mut due);
                        // Take every announcement already queued: one round serves them all.
                        loop {
                            match messages.try_recv() {
                                Ok(message) => announced(&message, &mut due),
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
                    listener.forget();
                    read_all = true;
                }
                () = self.shared.wake.notified() => {}
                _ = sweep.tick() => read_all = true,
                () = shutdown.cancelled() => break,
            }
        }
        listener.stop(&wake).await;
        flag.set(false);
    }
}

/// The announced reader's subscriptions on its wake client.
struct Listener {
    mode: Announcements,
    /// Shared: whether the shared channel is subscribed.
    shared: bool,
    /// Per stream: the stream keys whose channel is subscribed.
    streams: HashSet<String>,
    /// The subscriptions may be gone (a reconnect, a failed call): subscribe anew.
    lost: bool,
}

impl Listener {
    fn new(mode: Announcements) -> Self {
        Self {
            mode,
            shared: false,
            streams: HashSet::new(),
            lost: false,
        }
    }

    /// Subscribes what the table's `changes` need: the shared channel, or the channel of each
    /// new stream (all of the table's after a loss), and unsubscribes the removed streams'.
    async fn follow(&mut self, wake: &Client, hub: &Hub, changes: &Changes) -> Result<(), String> {
        match self.mode {
            Announcements::Shared => {
                if !self.shared || self.lost {
                    subscribe(wake, vec![RedisKey::wake_all().to_string()]).await?;
                    self.shared = true;
                }
            }
            Announcements::PerStream => {
                let gone: Vec<String> = changes
                    .removed
                    .iter()
                    .filter(|key| self.streams.remove(*key))
                    .map(|key| RedisKey::wake_channel_of(key))
                    .collect();
                unsubscribe(wake, gone).await;
                let wanted = if self.lost {
                    self.streams.clear();
                    hub.keys()
                } else {
                    changes.added.clone()
                };
                let new: Vec<String> = wanted
                    .into_iter()
                    .filter(|key| !self.streams.contains(key))
                    .collect();
                subscribe(
                    wake,
                    new.iter()
                        .map(|key| RedisKey::wake_channel_of(key))
                        .collect(),
                )
                .await?;
                self.streams.extend(new);
            }
        }
        self.lost = false;
        Ok(())
    }

    /// The subscriptions may be gone: the next [`Listener::follow`] makes them again.
    fn forget(&mut self) {
        self.lost = true;
    }

    /// Unsubscribes everything (no stream is followed).
    async fn stop(&mut self, wake: &Client) {
        let mut channels: Vec<String> = self
            .streams
            .drain()
            .map(|key| RedisKey::wake_channel_of(&key))
            .collect();
        if std::mem::take(&mut self.shared) {
            channels.push(RedisKey::wake_all().to_string());
        }
        unsubscribe(wake, channels).await;
    }
}

/// Adds the stream keys an announcement names to `due`.
fn announced(message: &fred::types::Message, due: &mut HashSet<String>) {
    let text = message.value.as_str();
    let text = text.as_deref().unwrap_or_default();
    for key in stream_io::session::announced_streams(&message.channel, text) {
        if !due.contains(key) {
            due.insert(key.to_owned());
        }
    }
}

/// Subscribes `channels` (`SSUBSCRIBE`, one call each: on a cluster they live in different
/// slots), all at once.
async fn subscribe(wake: &Client, channels: Vec<String>) -> Result<(), String> {
    if channels.is_empty() {
        return Ok(());
    }
    let subscribes = channels.into_iter().map(|channel| wake.ssubscribe(channel));
    let results = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join_all(subscribes),
    )
    .await
    .map_err(|_| "following wake channels timed out".to_owned())?;
    for result in results {
        result.map_err(|e| format!("following a wake channel: {e}"))?;
    }
    Ok(())
}

/// Unsubscribes `channels`. Best effort: an announcement that still arrives for a stream no
/// longer in the table is ignored.
async fn unsubscribe(wake: &Client, channels: Vec<String>) {
    if channels.is_empty() {
        return;
    }
    let unsubscribes = channels
        .into_iter()
        .map(|channel| wake.sunsubscribe(channel));
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

/// The arguments of `XREAD COUNT batch [BLOCK block_ms] STREAMS keys… ids…`.
fn xread_args(batch: u64, block_ms: Option<u64>, keys: Vec<Bytes>, ids: Vec<Bytes>) -> Vec<Value> {
    let mut args = Vec::with_capacity(5 + keys.len() + ids.len());
    args.push(Value::from_static_str("COUNT"));
    args.push(Value::Integer(i64::try_from(batch).unwrap_or(i64::MAX)));
    if let Some(block_ms) = block_ms {
        args.push(Value::from_static_str("BLOCK"));
        args.push(Value::Integer(i64::try_from(block_ms).unwrap_or(i64::MAX)));
    }
    args.push(Value::from_static_str("STREAMS"));
    args.extend(keys.into_iter().map(Value::Bytes));
    args.extend(ids.into_iter().map(Value::Bytes));
    args
}

/// Non-blocking `XREAD`s over `cursors` (key, last id): one on a single node, one per slot
/// on a cluster (routed to the slot's node), all at once (fred pipelines them per node). The
/// replies are read as protocol frames ([`stream_io::parse_xread_frame`]).
async fn read_round(
    reader: &Client,
    batch: u64,
    cursors: Vec<(String, String)>,
    mode: Announcements,
) -> Result<Vec<stream_io::RawStream>, String> {
    let mut groups: HashMap<u16, (Vec<Bytes>, Vec<Bytes>)> = HashMap::new();
    for (key, id) in cursors {
        let slot = match mode {
            Announcements::Shared => 0,
            Announcements::PerStream => fred::util::redis_keyslot(key.as_bytes()),
        };
        let group = groups.entry(slot).or_default();
        group.0.push(Bytes::from(key));
        group.1.push(Bytes::from(id));
    }
    let reads = groups.into_iter().map(|(slot, (keys, ids))| {
        let route = match mode {
            Announcements::Shared => ClusterHash::Random,
            Announcements::PerStream => ClusterHash::Custom(slot),
        };
        reader.custom_raw(
            CustomCommand::new_static("XREAD", route, false),
            xread_args(batch, None, keys, ids),
        )
    });
    let results = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(reads))
        .await
        .map_err(|_| "read round timed out".to_owned())?;
    let mut replies = Vec::new();
    for result in results {
        let frame = result.map_err(|e| e.to_string())?;
        replies.extend(stream_io::parse_xread_frame(frame).map_err(|e| e.to_string())?);
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
    use fred::types::Resp3Frame;
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

    fn reply(key: &str, events: &[SessionEvent]) -> Resp3Frame {
        reply_from(key, 1, events)
    }

    fn bulk(text: impl Into<Bytes>) -> Resp3Frame {
        Resp3Frame::BlobString {
            data: text.into(),
            attributes: None,
        }
    }

    fn array(items: Vec<Resp3Frame>) -> Resp3Frame {
        Resp3Frame::Array {
            data: items,
            attributes: None,
        }
    }

    /// An `XREAD` reply as Redis sends it over RESP2 (fred hands it over as RESP3 frames),
    /// whose entries have ids `first-0`, `first+1-0`, …
    fn reply_from(key: &str, first: usize, events: &[SessionEvent]) -> Resp3Frame {
        let entries = events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let fields = event
                    .encode()
                    .into_iter()
                    .flat_map(|(name, value)| [bulk(name), bulk(value)])
                    .collect();
                array(vec![bulk(format!("{}-0", first + i)), array(fields)])
            })
            .collect();
        array(vec![array(vec![bulk(key.to_owned()), array(entries)])])
    }

    /// A single-node hub whose buffer no test fills.
    fn hub() -> Hub {
        Hub::new(HubSettings {
            batch: 64,
            block_ms: 1000,
            buffer_bytes: 1 << 20,
            cluster: false,
            sweep_ms: 1000,
            block_max_streams: 0,
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

    /// The frames made from a read reply are, byte for byte, those of the events written.
    #[test]
    fn frames_from_a_read_reply_are_those_of_the_events_written() -> anyhow::Result<()> {
        let events = events();
        let read = stream_io::parse_xread_frame(reply("llm:stream:{s}:m", &events))?;
        assert_eq!(read.len(), 1);
        assert_eq!(&*read[0].0, "llm:stream:{s}:m");
        assert_eq!(read[0].1.len(), events.len());
        for (n, (entry, event)) in read[0].1.iter().zip(&events).enumerate() {
            let from_reply = Frame::new(entry.id, SessionEvent::decode(entry)?);
            let written = Frame::new(
                EntryId {
                    ms: n as u64 + 1,
                    seq: 0,
                },
                event.clone(),
            );
            assert_eq!(from_reply.id, written.id);
            assert_eq!(from_reply.bytes, written.bytes);
            assert_eq!(from_reply.event, written.event);
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
        let (cursors, first) = hub.cursors(None);
        let (keys, ids): (Vec<String>, Vec<String>) = cursors.into_iter().unzip();
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
            stream_io::parse_xread_frame(reply_from(key.as_str(), 1, &events))?,
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
            stream_io::parse_xread_frame(reply_from(key.as_str(), 3, &events))?,
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
            stream_io::parse_xread_frame(reply(key.as_str(), &events))?,
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
