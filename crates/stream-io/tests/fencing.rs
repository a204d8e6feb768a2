//! The session-stream and lease scripts against a real redis-server: an attempt that lost the
//! request writes nothing, the end fences everyone, renewing a lease never steals a job back,
//! retention trims by age only, with an exact record of what it trimmed, and a session's running
//! request is found from the newest entries of its streams.

use fred::prelude::*;
use stream_io::groups::{self, LeaseScript};
use stream_io::session::{
    AppendOutcome, OwnerState, SessionScripts, TakeOver, Trimmed, owner_state, trimmed,
};
use stream_schema::{
    EntryId, ErrorCode, FinishReason, ModelId, RedisKey, RequestId, SessionEvent, SessionId, Usage,
    UsageSource,
};
use test_support::RedisServer;

mod support;

use support::{start_request, token};

#[tokio::test]
async fn only_the_owner_attempt_writes_and_the_end_fences_everyone() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let request_id = RequestId::new();
    let (session, model) = (SessionId::parse("s")?, ModelId::parse("m")?);
    let streams = start_request(&client, &scripts, &session, &model, request_id).await?;
    let first = scripts
        .append(&client, &streams, 1, &token(request_id, 1), true)
        .await?;
    assert!(matches!(first, AppendOutcome::Written(_)));

    let restart = SessionEvent::Restart {
        request_id,
        attempt: 2,
        reason: "producer_lost".to_owned(),
        served_by: None,
        timestamp: 2,
    };
    assert!(matches!(
        scripts.take_over(&client, &streams, 1, &restart).await?,
        TakeOver::Taken(_)
    ));
    // A second reclaimer with the same stale view loses the race.
    assert_eq!(
        scripts.take_over(&client, &streams, 1, &restart).await?,
        TakeOver::Lost(OwnerState::Attempt(2))
    );
    // The old attempt is fenced off; the new one writes.
    assert_eq!(
        scripts
            .append(&client, &streams, 1, &token(request_id, 2), true)
            .await?,
        AppendOutcome::Fenced
    );
    let complete = SessionEvent::Complete {
        request_id,
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
            source: UsageSource::Counted,
            reasoning_tokens: None,
        },
        timestamp: 3,
    };
    assert!(matches!(
        scripts
            .append(&client, &streams, 2, &complete, false)
            .await?,
        AppendOutcome::Written(_)
    ));
    assert_eq!(
        owner_state(&client, &streams.owner).await?,
        OwnerState::Done
    );
    // After the end nobody writes, not even the attempt that ended it.
    assert_eq!(
        scripts
            .append(&client, &streams, 2, &token(request_id, 2), true)
            .await?,
        AppendOutcome::Fenced
    );
    let failed = SessionEvent::Error {
        request_id,
        code: ErrorCode::JobFailed,
        message: "x".to_owned(),
        retryable: false,
        timestamp: 4,
    };
    assert_eq!(
        scripts.give_up(&client, &streams, 2, &failed).await?,
        TakeOver::Lost(OwnerState::Done)
    );
    let len: u64 = client.xlen(streams.stream.as_str()).await?;
    assert_eq!(len, 4, "start, token 1, restart, complete");
    Ok(())
}

#[tokio::test]
async fn renewing_a_lease_reports_a_lost_job_and_never_steals_it_back() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let key = RedisKey::requests();
    groups::ensure_group(&client, &key, "g").await?;
    let id: String = client
        .xadd(key.as_str(), false, None, "*", vec![("v", "1")])
        .await?;
    let id = stream_schema::EntryId::parse(&id)?;
    let read = groups::read_new(&client, "g", "a", std::slice::from_ref(&key), 1, 100).await;
    assert_eq!(read?.len(), 1);

    let lease = LeaseScript::default();
    assert!(
        lease
            .renew(&client, &key, "g", "a", &[id])
            .await?
            .is_empty()
    );
    // `b` takes it over once it is idle; `a` then learns it lost it, and `b` keeps it.
    let (_, taken) = groups::autoclaim(&client, &key, "g", "b", 0, "0-0", 10).await?;
    assert_eq!(taken.len(), 1);
    assert_eq!(lease.renew(&client, &key, "g", "a", &[id]).await?, vec![id]);
    let pending: fred::types::Value = client.xpending(key.as_str(), "g", ("-", "+", 10)).await?;
    let owner = pending
        .into_array()
        .first()
        .cloned()
        .map(|entry| entry.into_array())
        .and_then(|entry| entry.get(1).cloned())
        .and_then(|consumer| consumer.into_string());
    assert_eq!(owner.as_deref(), Some("b"));

    // A hand-back makes the job look idle for the lease, so the next reclaim takes it at once.
    assert!(
        lease
            .hand_back(&client, &key, "g", "b", &[id], 60_000)
            .await?
            .is_empty()
    );
    let (_, again) = groups::autoclaim(&client, &key, "g", "c", 50_000, "0-0", 10).await?;
    assert_eq!(again.len(), 1);
    Ok(())
}

/// Entries older than two TTLs go when a request starts; younger ones, however many, stay; and
/// `trimmed` reports the last id removed, so a reader positioned there lost nothing.
#[tokio::test]
async fn a_start_trims_only_entries_older_than_two_ttls() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let session = SessionId::parse("s")?;
    let model = ModelId::parse("m")?;
    let key = RedisKey::session(&session, &model);
    assert_eq!(trimmed(&client, &key).await?, Trimmed::Missing);

    // 300 entries from 1970 (older than any cutoff), then 300 from a minute ago.
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    for i in 1..=300u64 {
        let _: String = client
            .xadd(key.as_str(), false, None, format!("{i}-0"), ("old", "1"))
            .await?;
    }
    let recent_from = now_ms - 60_000;
    for i in 0..300u64 {
        let _: String = client
            .xadd(
                key.as_str(),
                false,
                None,
                format!("{}-0", recent_from + i),
                ("recent", "1"),
            )
            .await?;
    }
    assert_eq!(trimmed(&client, &key).await?, Trimmed::UpTo(EntryId::ZERO));

    // A new request on the same session and model: its stream is `key`.
    start_request(&client, &scripts, &session, &model, RequestId::new()).await?;

    // Every entry younger than 120 s is still there, with the new start.
    let recent: Vec<(String, std::collections::HashMap<String, String>)> = client
        .xrange(key.as_str(), format!("{recent_from}-0"), "+", None)
        .await?;
    assert_eq!(recent.len(), 301);
    let Trimmed::UpTo(max_deleted) = trimmed(&client, &key).await? else {
        anyhow::bail!("the stream vanished");
    };
    assert_eq!(max_deleted, EntryId::parse("300-0")?);
    let len: u64 = client.xlen(key.as_str()).await?;
    assert_eq!(len, 301, "only the entries older than two TTLs went");
    // A reader positioned at the last trimmed entry lost nothing; one before it did.
    let state = trimmed(&client, &key).await?;
    assert!(!state.lost_after(max_deleted));
    assert!(state.lost_after(EntryId::parse("0-1")?));
    Ok(())
}

/// Appends never trim: a request longer than any count cap keeps its beginning.
#[tokio::test]
async fn appends_never_trim_a_running_request() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let request_id = RequestId::new();
    let (session, model) = (SessionId::parse("s")?, ModelId::parse("m")?);
    let streams = start_request(&client, &scripts, &session, &model, request_id).await?;
    for sequence in 1..=12_000 {
        let outcome = scripts
            .append(&client, &streams, 1, &token(request_id, sequence), false)
            .await?;
        anyhow::ensure!(matches!(outcome, AppendOutcome::Written(_)), "{outcome:?}");
    }
    let len: u64 = client.xlen(streams.stream.as_str()).await?;
    assert_eq!(len, 12_001);
    assert_eq!(
        trimmed(&client, &streams.stream).await?,
        Trimmed::UpTo(EntryId::ZERO)
    );
    Ok(())
}

#[tokio::test]
async fn the_active_request_is_the_running_one_of_the_newest_entries() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let session = SessionId::parse("chat")?;
    let (a, b) = (ModelId::parse("a")?, ModelId::parse("b")?);
    let models = [a.clone(), b.clone()];
    let active = || stream_io::session::active_request(&client, &session, models.iter());
    assert_eq!(active().await?, None, "no streams");

    let first = RequestId::new();
    let streams_a = start_request(&client, &scripts, &session, &a, first).await?;
    scripts
        .append(&client, &streams_a, 1, &token(first, 1), true)
        .await?;
    assert_eq!(active().await?, Some(first));

    // A newer request on the other model is the one a chat resumes.
    let second = RequestId::new();
    let streams_b = start_request(&client, &scripts, &session, &b, second).await?;
    assert_eq!(active().await?, Some(second));

    // Once it ended, the older one still runs.
    let complete = |request_id| SessionEvent::Complete {
        request_id,
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 1,
            completion_tokens: 0,
            source: UsageSource::Counted,
            reasoning_tokens: None,
        },
        timestamp: 2,
    };
    scripts
        .append(&client, &streams_b, 1, &complete(second), false)
        .await?;
    assert_eq!(active().await?, Some(first));
    scripts
        .append(&client, &streams_a, 1, &complete(first), false)
        .await?;
    assert_eq!(active().await?, None, "every request ended");
    Ok(())
}

/// Entry ids of two streams compare by millisecond only: `T-3` of one stream (its fourth entry
/// in that millisecond) is not newer than `T-0` of another written in the same millisecond by
/// a later request. CI caught this once when the two happened to share a millisecond.
#[tokio::test]
async fn the_active_request_ignores_sequence_numbers_across_streams() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let session = SessionId::parse("chat")?;
    let (a, b) = (ModelId::parse("a")?, ModelId::parse("b")?);
    let (older, newer) = (RequestId::new(), RequestId::new());
    for (request_id, model) in [(older, &a), (newer, &b)] {
        start_request(&client, &scripts, &session, model, request_id).await?;
    }
    // Both streams get an entry in one (future) millisecond: the older request's is its 4th.
    let ms = stream_schema::now_millis() + 60_000;
    let add = |model: &ModelId, id: String, request_id| {
        let key = RedisKey::session(&session, model);
        let fields: Vec<(String, String)> = token(request_id, 1)
            .encode()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        let client = client.clone();
        async move {
            let _: String = client
                .xadd(key.as_str(), false, None, id.as_str(), fields)
                .await?;
            anyhow::Ok(())
        }
    };
    add(&a, format!("{ms}-3"), older).await?;
    add(&b, format!("{ms}-0"), newer).await?;
    let active = stream_io::session::active_request(&client, &session, [&a, &b]).await?;
    assert_eq!(active, Some(newer));
    Ok(())
}

#[tokio::test]
async fn a_batch_is_one_entry_per_event_all_or_nothing() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let request_id = RequestId::new();
    let session = SessionId::parse("s")?;
    let streams = start_request(
        &client,
        &scripts,
        &session,
        &ModelId::parse("m")?,
        request_id,
    )
    .await?;
    let entries = |client: Client, key: RedisKey| async move {
        let reply: fred::types::Value = client.xrange(key.as_str(), "-", "+", None).await?;
        let entries = stream_io::parse_entries(reply)?;
        entries
            .iter()
            .map(|entry| SessionEvent::decode(&entry.fields).map(|e| (entry.id, e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::from)
    };

    let batch: Vec<_> = (1..=3).map(|n| token(request_id, n)).collect();
    let written = scripts
        .append_batch(&client, &streams, 1, &batch, true)
        .await?;
    let stored = entries(client.clone(), streams.stream.clone()).await?;
    assert_eq!(stored.len(), 4);
    assert_eq!(
        stored[1..]
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>(),
        batch
    );
    assert_eq!(written, AppendOutcome::Written(stored[3].0), "the last id");

    // A terminal event may end a batch, never sit inside one.
    let complete = SessionEvent::Complete {
        request_id,
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 1,
            completion_tokens: 4,
            source: UsageSource::Counted,
            reasoning_tokens: None,
        },
        timestamp: 3,
    };
    let misplaced = vec![complete.clone(), token(request_id, 4)];
    assert!(
        scripts
            .append_batch(&client, &streams, 1, &misplaced, true)
            .await
            .is_err()
    );
    assert!(
        scripts
            .append_batch(&client, &streams, 1, &[], true)
            .await
            .is_err()
    );

    // A cancel refuses the whole batch; the terminal append (no cancel check) still writes.
    stream_io::cancel::request(&client, &session, &request_id, 60).await?;
    let rest = vec![token(request_id, 4), token(request_id, 5)];
    assert_eq!(
        scripts
            .append_batch(&client, &streams, 1, &rest, true)
            .await?,
        AppendOutcome::Cancelled
    );
    assert_eq!(
        entries(client.clone(), streams.stream.clone()).await?.len(),
        4
    );
    let ending = vec![token(request_id, 4), complete];
    assert!(matches!(
        scripts
            .append_batch(&client, &streams, 1, &ending, false)
            .await?,
        AppendOutcome::Written(_)
    ));
    assert_eq!(
        owner_state(&client, &streams.owner).await?,
        OwnerState::Done
    );
    let ttl: i64 = client.ttl(streams.owner.as_str()).await?;
    assert!((1..=60).contains(&ttl), "the owner key expires: {ttl}");
    // Fenced: a batch after the end writes none of its events.
    assert_eq!(
        scripts
            .append_batch(&client, &streams, 1, &batch, false)
            .await?,
        AppendOutcome::Fenced
    );
    assert_eq!(
        entries(client.clone(), streams.stream.clone()).await?.len(),
        6
    );
    Ok(())
}

/// A Redis that lost its scripts (restarted, failed over, `SCRIPT FLUSH`) answers `NOSCRIPT`
/// to each script's next call: the call loads the script and is made again, built anew, and
/// its events are written once.
#[tokio::test]
async fn every_script_is_loaded_again_after_redis_forgets_it_and_writes_once() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let scripts = SessionScripts::default();
    let model = ModelId::parse("m")?;
    let forget = || async { client.script_flush(false).await };

    let (one, two) = (RequestId::new(), RequestId::new());
    let (first, second) = (SessionId::parse("a")?, SessionId::parse("b")?);
    forget().await?;
    let one_streams = start_request(&client, &scripts, &first, &model, one).await?;
    forget().await?;
    let two_streams = start_request(&client, &scripts, &second, &model, two).await?;
    forget().await?;
    let appended = scripts
        .append_batch(
            &client,
            &one_streams,
            1,
            &[token(one, 1), token(one, 2)],
            true,
        )
        .await?;
    assert!(matches!(appended, AppendOutcome::Written(_)));
    forget().await?;
    let (one_next, two_first) = ([token(one, 3)], [token(two, 1)]);
    let outcomes = scripts
        .append_many(
            &client,
            &[
                stream_io::session::AppendBatch {
                    target: &one_streams,
                    attempt: 1,
                    events: &one_next,
                    check_cancel: true,
                },
                stream_io::session::AppendBatch {
                    target: &two_streams,
                    attempt: 1,
                    events: &two_first,
                    check_cancel: true,
                },
            ],
        )
        .await?;
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, AppendOutcome::Written(_)))
    );
    forget().await?;
    let restart = SessionEvent::Restart {
        request_id: two,
        attempt: 2,
        reason: "producer_lost".to_owned(),
        served_by: None,
        timestamp: 2,
    };
    assert!(matches!(
        scripts
            .take_over(&client, &two_streams, 1, &restart)
            .await?,
        TakeOver::Taken(_)
    ));

    let sequences = |streams: &stream_io::session::RequestStreams| {
        let client = client.clone();
        let stream = streams.stream.clone();
        async move {
            let entries =
                stream_io::session::range_after(&client, &stream, EntryId::ZERO, 100).await?;
            let kinds: Vec<String> = entries
                .iter()
                .map(|entry| match SessionEvent::decode(&entry.fields) {
                    Ok(SessionEvent::Token { sequence, .. }) => format!("t{sequence}"),
                    Ok(SessionEvent::Start { .. }) => "start".to_owned(),
                    Ok(SessionEvent::Restart { .. }) => "restart".to_owned(),
                    other => format!("{other:?}"),
                })
                .collect();
            anyhow::Ok(kinds)
        }
    };
    assert_eq!(sequences(&one_streams).await?, ["start", "t1", "t2", "t3"]);
    assert_eq!(sequences(&two_streams).await?, ["start", "t1", "restart"]);
    Ok(())
}
