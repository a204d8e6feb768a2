//! Every write to a session stream announces itself, against a real redis-server: on a single
//! node on the shared channel, one message per script call naming each stream it wrote (and
//! none it was fenced off from); on a cluster on the stream's own channel.

use std::time::Duration;

use fred::prelude::*;
use stream_io::session::{
    AppendBatch, AppendOutcome, RequestStreams, SessionScripts, WakeUps, announced_streams,
};
use stream_schema::{ModelId, RedisKey, RequestId, SessionEvent, SessionId};
use test_support::RedisServer;

mod support;

use support::{start_request, token};

/// Starts a request on model `m` of `session` and returns its id and streams.
async fn start(
    client: &Client,
    scripts: &SessionScripts,
    session: &str,
) -> anyhow::Result<(RequestId, RequestStreams)> {
    let (session, model, request_id) = (
        SessionId::parse(session)?,
        ModelId::parse("m")?,
        RequestId::new(),
    );
    let streams = start_request(client, scripts, &session, &model, request_id).await?;
    Ok((request_id, streams))
}

/// The next announcement: its channel and the streams it names.
async fn next(
    messages: &mut tokio::sync::broadcast::Receiver<fred::types::Message>,
) -> anyhow::Result<(String, Vec<String>)> {
    let message = tokio::time::timeout(Duration::from_secs(5), messages.recv()).await??;
    let text = message.value.as_string().unwrap_or_default();
    let streams = announced_streams(&message.channel, &text)
        .into_iter()
        .map(str::to_owned)
        .collect();
    Ok((message.channel.to_string(), streams))
}

#[tokio::test]
async fn on_a_single_node_each_call_announces_the_streams_it_wrote_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let listener = redis.client().await?;
    let mut messages = listener.message_rx();
    listener
        .ssubscribe(RedisKey::wake_all().to_string())
        .await?;
    let scripts = SessionScripts::new(WakeUps::Shared);
    let shared = RedisKey::wake_all().to_string();

    let (a, a_streams) = start(&client, &scripts, "a").await?;
    assert_eq!(
        next(&mut messages).await?,
        (shared.clone(), vec![a_streams.stream.to_string()])
    );
    let (b, b_streams) = start(&client, &scripts, "b").await?;
    let (c, c_streams) = start(&client, &scripts, "c").await?;
    assert_eq!(next(&mut messages).await?.1, [b_streams.stream.to_string()]);
    assert_eq!(next(&mut messages).await?.1, [c_streams.stream.to_string()]);

    let outcome = scripts
        .append(&client, &a_streams, 1, &token(a, 1), true)
        .await?;
    assert!(matches!(outcome, AppendOutcome::Written(_)));
    assert_eq!(next(&mut messages).await?.1, [a_streams.stream.to_string()]);

    // One call for three requests, `b`'s attempt fenced off: one message naming `a` and `c`.
    let (a_tokens, b_tokens, c_tokens) = ([token(a, 2), token(a, 3)], [token(b, 1)], [token(c, 1)]);
    let outcomes = scripts
        .append_many(
            &client,
            &[
                AppendBatch {
                    target: &a_streams,
                    attempt: 1,
                    events: &a_tokens,
                    check_cancel: true,
                },
                AppendBatch {
                    target: &b_streams,
                    attempt: 2,
                    events: &b_tokens,
                    check_cancel: true,
                },
                AppendBatch {
                    target: &c_streams,
                    attempt: 1,
                    events: &c_tokens,
                    check_cancel: true,
                },
            ],
        )
        .await?;
    assert!(matches!(
        outcomes[..],
        [
            AppendOutcome::Written(_),
            AppendOutcome::Fenced,
            AppendOutcome::Written(_)
        ]
    ));
    assert_eq!(
        next(&mut messages).await?,
        (
            shared.clone(),
            vec![a_streams.stream.to_string(), c_streams.stream.to_string()]
        )
    );

    // A write fenced off as a whole announces nothing: the next message is the next write's.
    let fenced = scripts
        .append(&client, &b_streams, 2, &token(b, 1), true)
        .await?;
    assert_eq!(fenced, AppendOutcome::Fenced);
    let restart = SessionEvent::Restart {
        request_id: b,
        attempt: 2,
        reason: "producer_lost".to_owned(),
        served_by: None,
        timestamp: 2,
    };
    scripts.take_over(&client, &b_streams, 1, &restart).await?;
    assert_eq!(next(&mut messages).await?.1, [b_streams.stream.to_string()]);
    Ok(())
}

#[tokio::test]
async fn on_a_cluster_each_write_announces_itself_on_its_streams_channel() -> anyhow::Result<()> {
    // Sharded Pub/Sub works on a single node too; the channel is what differs.
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let listener = redis.client().await?;
    let mut messages = listener.message_rx();
    let scripts = SessionScripts::new(WakeUps::PerStream);
    let session = SessionId::parse("a")?;
    let stream = RedisKey::session(&session, &ModelId::parse("m")?);
    listener.ssubscribe(stream.wake_channel()).await?;

    let (a, a_streams) = start(&client, &scripts, "a").await?;
    assert_eq!(
        next(&mut messages).await?,
        (stream.wake_channel(), vec![stream.to_string()])
    );
    scripts
        .append(&client, &a_streams, 1, &token(a, 1), true)
        .await?;
    assert_eq!(next(&mut messages).await?.1, [stream.to_string()]);

    // Several requests' keys span slots on a cluster: one call cannot take them.
    let tokens = [token(a, 2)];
    let refused = scripts
        .append_many(
            &client,
            &[AppendBatch {
                target: &a_streams,
                attempt: 1,
                events: &tokens,
                check_cancel: true,
            }],
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    Ok(())
}
