//! The producer's fenced appends, combined across requests.
//!
//! Each attempt's sink hands its batch here and waits for the outcome. On a single Redis node,
//! the batches of all requests share script calls, with no timer: a batch goes out at once when
//! no call is in flight; the batches that arrive while one is go together in the next, one
//! `EVALSHA` and one `MGET` (every owner key and cancel flag) for all of them
//! (`SessionScripts::append_many`), each request still fenced, refused on cancel and written
//! all or nothing on its own. At most two calls are in flight. A batch that finds no call in
//! flight and nothing waiting is written by its own caller; otherwise it queues, and a short
//! task takes the queue while batches wait (spawned on the workers' tracker, so shutdown waits
//! for it). In Redis Cluster the keys of different sessions live in different slots, so each
//! batch is its own `APPEND` call, as before.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fred::prelude::*;
use stream_io::StreamIoError;
use stream_io::session::{
    AppendBatch, AppendOutcome, MAX_BATCH_REQUESTS, RequestStreams, SessionScripts,
};
use stream_schema::SessionEvent;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// Events of one combined call at most: a script blocks Redis while it runs.
const MAX_CALL_EVENTS: usize = 512;
/// Combined calls in flight at most: two, so the producer prepares the next call while Redis
/// runs the last one; more would only split what waits into smaller calls.
const CALLS_IN_FLIGHT: usize = 2;

/// Where every attempt of this producer appends its content and terminal events.
#[derive(Clone)]
pub struct Appender {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Pool,
    scripts: SessionScripts,
    /// Whether batches of different requests share a call (a single node).
    combine: bool,
    tracker: TaskTracker,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    /// Tasks making calls, at most [`CALLS_IN_FLIGHT`] (each ends when the queue is empty).
    running: usize,
}

/// One request's batch waiting for a call.
struct Queued {
    target: Arc<RequestStreams>,
    attempt: u32,
    events: Vec<SessionEvent>,
    check_cancel: bool,
    reply: oneshot::Sender<Result<AppendOutcome, StreamIoError>>,
}

impl Appender {
    /// `combine` on a single node only (see the module's documentation); the calls' tasks are
    /// spawned on `tracker`.
    pub fn new(redis: Pool, scripts: SessionScripts, combine: bool, tracker: TaskTracker) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                scripts,
                combine,
                tracker,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Appends `events` for `attempt` (see `SessionScripts::append_batch`), in a call shared
    /// with the other requests' batches waiting at the same time.
    pub async fn append(
        &self,
        target: &Arc<RequestStreams>,
        attempt: u32,
        events: Vec<SessionEvent>,
        check_cancel: bool,
    ) -> Result<AppendOutcome, StreamIoError> {
        let inner = &self.inner;
        // Without combining, or with no call in flight and nothing waiting, this caller makes
        // its own call (one task hand-off fewer per lone batch, the common case at a low
        // rate). While a call is in flight, batches queue and go together, as below.
        let slot = if inner.combine {
            CallSlot::claim_idle(inner)
        } else {
            None
        };
        if !inner.combine || slot.is_some() {
            let outcome = inner
                .scripts
                .append_batch(inner.redis.next(), target, attempt, &events, check_cancel)
                .await;
            drop(slot);
            return outcome;
        }
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = inner.lock();
            state.queue.push(Queued {
                target: Arc::clone(target),
                attempt,
                events,
                check_cancel,
                reply,
            });
            let start = state.running < CALLS_IN_FLIGHT;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            inner.spawn_runner();
        }
        answer.await.unwrap_or_else(|_| {
            Err(StreamIoError::Protocol(
                "the append's call was dropped".to_owned(),
            ))
        })
    }
}

/// A call slot held by a caller that makes its own call. When the call ends (or the caller
/// goes away), batches that queued meanwhile get a task to take them; otherwise the slot is
/// given back.
struct CallSlot<'a>(&'a Arc<Inner>);

impl<'a> CallSlot<'a> {
    /// The slot, when no call is in flight and no batch waits.
    fn claim_idle(inner: &'a Arc<Inner>) -> Option<Self> {
        let mut state = inner.lock();
        let idle = state.queue.is_empty() && state.running == 0;
        if idle {
            state.running += 1;
        }
        // Lazily: a slot made and dropped here would give back one it never took.
        idle.then(|| Self(inner))
    }
}

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        let inner = self.0;
        let waiting = {
            let mut state = inner.lock();
            let waiting = !state.queue.is_empty();
            if !waiting {
                state.running -= 1;
            }
            waiting
        };
        if waiting {
            inner.spawn_runner();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (a push, or a swap of the queue).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a task that makes calls while batches wait; the caller has counted it in
    /// `running`.
    fn spawn_runner(self: &Arc<Self>) {
        let runner = Arc::clone(self);
        self.tracker.spawn(async move { runner.run().await });
    }

    /// Makes calls while batches wait: each call takes everything queued (up to its limits).
    async fn run(&self) {
        loop {
            let round = {
                let mut state = self.lock();
                if state.queue.is_empty() {
                    state.running -= 1;
                    return;
                }
                take_round(&mut state.queue)
            };
            let outcomes = self.call(&round).await;
            match outcomes {
                Ok(outcomes) => {
                    for (queued, outcome) in round.into_iter().zip(outcomes) {
                        // A waiter that went away needs no answer.
                        let _ = queued.reply.send(Ok(outcome));
                    }
                }
                Err(error) => {
                    for queued in round {
                        let _ = queued.reply.send(Err(same_error(&error)));
                    }
                }
            }
        }
    }

    async fn call(&self, round: &[Queued]) -> Result<Vec<AppendOutcome>, StreamIoError> {
        let client = self.redis.next();
        if let [one] = round {
            // Alone, the smaller script (the same commands inside).
            let outcome = self
                .scripts
                .append_batch(
                    client,
                    &one.target,
                    one.attempt,
                    &one.events,
                    one.check_cancel,
                )
                .await?;
            return Ok(vec![outcome]);
        }
        let batches: Vec<AppendBatch<'_>> = round
            .iter()
            .map(|queued| AppendBatch {
                target: &queued.target,
                attempt: queued.attempt,
                events: &queued.events,
                check_cancel: queued.check_cancel,
            })
            .collect();
        self.scripts.append_many(client, &batches).await
    }
}

/// The batches of the next call, in queue order: at most [`MAX_BATCH_REQUESTS`] and
/// [`MAX_CALL_EVENTS`] events (the first always goes), and never two of one owner key (two
/// attempts of one request: the script reads each owner once). The rest stay queued, in order.
fn take_round(queue: &mut Vec<Queued>) -> Vec<Queued> {
    // Chosen first, moved after: the owner set borrows the queue's keys instead of copying one
    // per batch.
    let chosen: Vec<bool> = {
        let mut owners = HashSet::new();
        let (mut taken, mut events) = (0, 0);
        queue
            .iter()
            .map(|queued| {
                let owner = queued.target.owner.as_str();
                let fits = taken == 0
                    || (taken < MAX_BATCH_REQUESTS
                        && events + queued.events.len() <= MAX_CALL_EVENTS
                        && !owners.contains(owner));
                if fits {
                    taken += 1;
                    events += queued.events.len();
                    owners.insert(owner);
                }
                fits
            })
            .collect()
    };
    let mut round = Vec::new();
    let mut rest = Vec::new();
    for (queued, fits) in queue.drain(..).zip(chosen) {
        if fits {
            round.push(queued);
        } else {
            rest.push(queued);
        }
    }
    *queue = rest;
    round
}

/// The error of a shared call, for each of its waiters.
fn same_error(error: &StreamIoError) -> StreamIoError {
    match error {
        StreamIoError::Redis(error) => StreamIoError::Redis(error.clone()),
        StreamIoError::Protocol(message) => StreamIoError::Protocol(message.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use stream_io::session::{AppendOutcome, RequestStreams};
    use stream_schema::{Job, RedisKey, SessionEvent, SessionId};

    use super::{MAX_CALL_EVENTS, Queued, take_round};
    use crate::worker::testing::{Env, job};

    fn token(job: &Job, sequence: u64) -> SessionEvent {
        SessionEvent::Token {
            request_id: job.request_id,
            sequence,
            content: format!("t{sequence}"),
            timestamp: 1,
        }
    }

    async fn started(env: &Env, session: &str) -> anyhow::Result<(Job, Arc<RequestStreams>)> {
        let mut job = job()?;
        job.session_id = SessionId::parse(session)?;
        env.start_request(&job).await?;
        let streams = Arc::new(env.streams(&job));
        Ok((job, streams))
    }

    fn tokens(events: &[SessionEvent]) -> Vec<u64> {
        events.iter().filter_map(SessionEvent::sequence).collect()
    }

    #[tokio::test]
    async fn batches_that_wait_together_share_one_call_each_fenced_on_its_own() -> anyhow::Result<()>
    {
        let env = Env::start(Duration::ZERO).await?;
        let (a, a_streams) = started(&env, "a").await?;
        let (b, b_streams) = started(&env, "b").await?;
        let (fenced, fenced_streams) = started(&env, "fenced").await?;
        let (cancelled, cancelled_streams) = started(&env, "cancelled").await?;
        let restart = SessionEvent::Restart {
            request_id: fenced.request_id,
            attempt: 2,
            reason: "test".to_owned(),
            served_by: None,
            timestamp: 1,
        };
        env.ctx
            .scripts
            .take_over(env.client(), &fenced_streams, 1, &restart)
            .await?;
        stream_io::cancel::request(
            env.client(),
            &cancelled.session_id,
            &cancelled.request_id,
            60,
        )
        .await?;
        let (lead, lead_streams) = started(&env, "lead").await?;
        let scripts = env.calls("evalsha").await?;

        // The first finds no call in flight and makes its own; the other four queue behind
        // it and share the next call (one thread: the queue's task runs once every append
        // waits).
        let appender = &env.ctx.appender;
        let outcomes = futures::future::join_all([
            appender.append(&lead_streams, 1, vec![token(&lead, 1)], true),
            appender.append(&a_streams, 1, vec![token(&a, 1), token(&a, 2)], true),
            appender.append(&b_streams, 1, vec![token(&b, 1)], true),
            appender.append(&fenced_streams, 1, vec![token(&fenced, 1)], true),
            appender.append(&cancelled_streams, 1, vec![token(&cancelled, 1)], true),
        ])
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

        assert!(matches!(outcomes[0], AppendOutcome::Written(_)));
        assert!(matches!(outcomes[1], AppendOutcome::Written(_)));
        assert!(matches!(outcomes[2], AppendOutcome::Written(_)));
        assert_eq!(
            outcomes[3..],
            [AppendOutcome::Fenced, AppendOutcome::Cancelled]
        );
        assert_eq!(
            env.calls("evalsha").await? - scripts,
            2,
            "the lone call and the shared one"
        );
        assert_eq!(tokens(&env.events(&lead).await?), [1]);
        assert_eq!(tokens(&env.events(&a).await?), [1, 2]);
        assert_eq!(tokens(&env.events(&b).await?), [1]);
        assert_eq!(env.events(&fenced).await?.len(), 2, "`start` and `restart`");
        assert_eq!(env.events(&cancelled).await?.len(), 1, "`start`");
        Ok(())
    }

    /// A batch left queued while both call slots are busy is taken by whichever call ends
    /// first: the lone caller's slot hands it to a new task, or the queue's task takes it.
    /// Either way every batch gets its answer and every slot is given back.
    #[tokio::test]
    async fn a_batch_queued_behind_busy_calls_is_written_and_the_slots_are_given_back()
    -> anyhow::Result<()> {
        let env = Env::start(Duration::ZERO).await?;
        let (lead, lead_streams) = started(&env, "lead").await?;
        let (a, a_streams) = started(&env, "a").await?;
        let scripts = env.calls("evalsha").await?;

        // `lead` calls alone; the first `a` batch gets the second slot; the second `a` batch
        // (same owner key) cannot share that call and waits for a slot.
        let appender = &env.ctx.appender;
        let outcomes = futures::future::join_all([
            appender.append(&lead_streams, 1, vec![token(&lead, 1)], true),
            appender.append(&a_streams, 1, vec![token(&a, 1)], true),
            appender.append(&a_streams, 1, vec![token(&a, 2)], true),
        ])
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

        assert!(
            outcomes
                .iter()
                .all(|outcome| matches!(outcome, AppendOutcome::Written(_)))
        );
        assert_eq!(env.calls("evalsha").await? - scripts, 3);
        assert_eq!(tokens(&env.events(&a).await?), [1, 2]);
        // The queue's tasks end once it is empty; wait for them to give their slots back.
        let inner = &appender.inner;
        tokio::time::timeout(Duration::from_secs(5), async {
            while inner.lock().running > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("a call slot was never given back"))?;
        assert!(inner.lock().queue.is_empty());

        // With the slots back, the next batch is written as before.
        appender
            .append(&lead_streams, 1, vec![token(&lead, 2)], true)
            .await?;
        assert_eq!(env.calls("evalsha").await? - scripts, 4);
        assert_eq!(tokens(&env.events(&lead).await?), [1, 2]);
        Ok(())
    }

    #[test]
    fn a_call_never_takes_two_batches_of_one_owner_and_keeps_the_rest_in_order()
    -> anyhow::Result<()> {
        let queued = |job: &Job, events: usize| {
            let target = Arc::new(RequestStreams::new(
                &job.session_id,
                &job.model_id,
                &job.request_id,
                stream_io::session::Retention { ttl_secs: 60 },
            ));
            let (reply, _) = tokio::sync::oneshot::channel();
            Queued {
                target,
                attempt: 1,
                events: (1..=events as u64).map(|n| token(job, n)).collect(),
                check_cancel: true,
                reply,
            }
        };
        let (a, b, c) = (job()?, job()?, job()?);
        let mut queue = vec![
            queued(&a, 1),
            queued(&a, 1),
            queued(&b, MAX_CALL_EVENTS - 1),
            queued(&c, 1),
        ];

        let round = take_round(&mut queue);

        // `a` once; `b` fits beside it; `c` would pass the call's event limit.
        let owners = |queued: &[Queued]| -> Vec<String> {
            queued
                .iter()
                .map(|q| q.target.owner.as_str().to_owned())
                .collect()
        };
        let owner = |job: &Job| RedisKey::owner(&job.session_id, &job.request_id).to_string();
        assert_eq!(owners(&round), [owner(&a), owner(&b)]);
        assert_eq!(owners(&queue), [owner(&a), owner(&c)]);
        // The first batch always goes, whatever its size.
        let mut big = vec![queued(&c, MAX_CALL_EVENTS + 1)];
        assert_eq!(take_round(&mut big).len(), 1);
        Ok(())
    }
}
