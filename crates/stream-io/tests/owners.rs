//! The owner modules of shared structures against a real redis-server: what one service writes
//! is what another reads back, and each write happens once.

use fred::prelude::*;
use stream_io::idempotency::{self, ClaimOutcome};
use stream_io::quotas::Quotas;
use stream_io::requests::{self, StoredMeta};
use stream_io::{cancel, connections, groups};
use stream_schema::keys::PRODUCER_GROUP;
use stream_schema::{
    ChatMessage, ConnectionInfo, EntryId, GatewayId, Job, ModelId, RedisKey, RequestId,
    RequestMeta, Reservation, Role, SessionId,
};
use test_support::RedisServer;

fn job_and_meta(request_id: RequestId) -> anyhow::Result<(Job, RequestMeta)> {
    let session_id = SessionId::parse("s")?;
    let model_id = ModelId::parse("m")?;
    let job = Job {
        request_id,
        session_id: session_id.clone(),
        model_id: model_id.clone(),
        messages: vec![ChatMessage::text(Role::User, "hi")],
        max_tokens: Some(10),
        temperature: None,
        options: stream_schema::ChatOptions::default(),
        enqueued_at: 1,
        traceparent: None,
        token_cap: None,
    };
    let meta = RequestMeta {
        session_id,
        model_id,
        start_entry: EntryId::parse("1-0")?,
        key_id: "team-a".to_owned(),
        reservation: Some(Reservation {
            window: 3,
            tokens: 10,
        }),
        traceparent: None,
    };
    Ok((job, meta))
}

#[tokio::test]
async fn an_enqueued_job_is_read_with_its_metadata_and_deleted_once_done() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let request_id = RequestId::new();
    let (job, meta) = job_and_meta(request_id)?;
    let jobs = RedisKey::requests();
    groups::ensure_group(&client, &jobs, PRODUCER_GROUP).await?;

    assert!(!requests::meta_exists(&client, &request_id).await?);
    requests::enqueue(&client, &meta, &job, 60, 1_000).await?;
    // What a gateway whose enqueue reply was lost asks before it declares the start failed.
    assert!(requests::meta_exists(&client, &request_id).await?);

    assert_eq!(
        requests::load_meta(&client, &request_id).await?,
        StoredMeta::Found(meta)
    );
    let ttl: i64 = client
        .ttl(RedisKey::request_meta(&request_id).as_str())
        .await?;
    assert!((1..=60).contains(&ttl), "metadata expires: ttl {ttl}");
    let read = groups::read_new(
        &client,
        PRODUCER_GROUP,
        "p1",
        std::slice::from_ref(&jobs),
        10,
        0,
    )
    .await?;
    let entries: Vec<_> = read.into_iter().flat_map(|(_, entries)| entries).collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(Job::decode(&entries[0].fields)?, job);

    requests::delete_job(&client, entries[0].id).await?;

    let length: u64 = client.xlen(jobs.as_str()).await?;
    assert_eq!(length, 0, "the job is deleted");
    let state = groups::group_state(&client, &jobs, PRODUCER_GROUP).await?;
    assert_eq!(state.map(|s| s.pending), Some(0), "and acked");
    Ok(())
}

#[tokio::test]
async fn missing_and_foreign_metadata_are_told_apart() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let request_id = RequestId::new();
    assert_eq!(
        requests::load_meta(&client, &request_id).await?,
        StoredMeta::Missing
    );
    // A foreign (or newer) writer.
    let _: () = client
        .hset(RedisKey::request_meta(&request_id).as_str(), ("v", "999"))
        .await?;
    assert!(matches!(
        requests::load_meta(&client, &request_id).await?,
        StoredMeta::Undecodable(_)
    ));
    Ok(())
}

#[tokio::test]
async fn a_settlement_gives_back_unused_tokens_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let quotas = Quotas::default();
    let window_ms = 10_000;
    let request = RequestId::new();
    let reservation = quotas
        .reserve_tokens(&client, "k", 100, 60, window_ms, Some(20_500))
        .await?
        .map_err(|retry| anyhow::anyhow!("refused, retry in {retry} ms"))?;
    assert_eq!(
        reservation,
        Reservation {
            window: 2,
            tokens: 60
        }
    );

    assert!(
        quotas
            .settle(&client, "k", &request, reservation, 20, 60)
            .await?
    );
    assert!(
        !quotas
            .settle(&client, "k", &request, reservation, 20, 60)
            .await?,
        "a redelivered record settles nothing"
    );

    let used: Option<i64> = client
        .hget(RedisKey::token_quota("k").as_str(), "2")
        .await?;
    assert_eq!(used, Some(20));
    // 80 tokens are free again in the same window.
    let again = quotas
        .reserve_tokens(&client, "k", 100, 80, window_ms, Some(21_000))
        .await?;
    assert!(again.is_ok());
    Ok(())
}

#[tokio::test]
async fn a_refused_request_can_be_forgotten_from_the_log() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let quotas = Quotas::default();
    let log = RedisKey::key_request_log("k");
    let admit = |member: &'static str| {
        let (quotas, client, log) = (&quotas, &client, &log);
        async move {
            quotas
                .check_request_log(client, log, 1, 1_000, member, Some(5_000))
                .await
        }
    };
    assert_eq!(admit("a").await?, Ok(()));
    assert_eq!(admit("b").await?, Err(1_000));
    quotas.forget_request(&client, &log, "a").await?;
    assert_eq!(admit("b").await?, Ok(()));
    Ok(())
}

#[tokio::test]
async fn a_cancel_flag_is_seen_and_expires_with_the_stream() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let session = SessionId::parse("s")?;
    let request = RequestId::new();
    assert!(!cancel::is_requested(&client, &session, &request).await?);

    cancel::request(&client, &session, &request, 30).await?;

    assert!(cancel::is_requested(&client, &session, &request).await?);
    let ttl: i64 = client
        .ttl(RedisKey::cancel(&session, &request).as_str())
        .await?;
    assert!((1..=30).contains(&ttl), "ttl {ttl}");
    Ok(())
}

#[tokio::test]
async fn an_idempotency_claim_is_seen_recorded_and_released() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let ClaimOutcome::Claimed(claim) =
        idempotency::claim(&client, "k", "idem", "body-1", 60).await?
    else {
        anyhow::bail!("a fresh key is claimed");
    };
    // The claim expires on its own (set in the same step as the claim).
    let ttl: i64 = client
        .ttl(RedisKey::idempotency("k", "idem").as_str())
        .await?;
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    let seen = |expected_response: Option<&str>| {
        let client = &client;
        let expected_response = expected_response.map(str::to_owned);
        async move {
            match idempotency::claim(client, "k", "idem", "body-2", 60).await? {
                ClaimOutcome::Seen {
                    body_digest,
                    response,
                } => {
                    assert_eq!(body_digest.as_deref(), Some("body-1"));
                    assert_eq!(response, expected_response);
                    Ok(())
                }
                ClaimOutcome::Claimed(_) => Err(anyhow::anyhow!("claimed twice")),
            }
        }
    };
    seen(None).await?;
    claim.record(&client, "{\"ok\":1}").await?;
    seen(Some("{\"ok\":1}")).await?;

    claim.release(&client).await?;

    assert!(matches!(
        idempotency::claim(&client, "k", "idem", "body-3", 60).await?,
        ClaimOutcome::Claimed(_)
    ));
    Ok(())
}

#[tokio::test]
async fn the_connection_view_lists_connections_of_live_gateways_only() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let session = SessionId::parse("s")?;
    let (alive, dead) = (
        GatewayId::from_stored("gw-a"),
        GatewayId::from_stored("gw-b"),
    );
    let info = |id: &str, gateway: &GatewayId, since: u64| ConnectionInfo {
        connection_id: id.to_owned(),
        session_id: session.clone(),
        request_id: None,
        gateway_id: gateway.to_string(),
        connected_since: since,
        events_sent: 0,
    };
    connections::announce(&client, &alive, 60_000, 1).await?;
    connections::announce(&client, &dead, 60_000, 1).await?;
    connections::write(
        &client,
        &alive,
        &[info("b", &alive, 2), info("a", &alive, 1)],
    )
    .await?;
    connections::write(&client, &dead, &[info("c", &dead, 3)]).await?;
    assert_eq!(
        connections::list(&client, &session).await?,
        vec![
            info("a", &alive, 1),
            info("b", &alive, 2),
            info("c", &dead, 3)
        ]
    );
    connections::remove(&client, &alive, &session, "b").await?;
    assert_eq!(
        connections::list(&client, &session).await?,
        vec![info("a", &alive, 1), info("c", &dead, 3)]
    );
    assert!(connections::renew(&client, &alive, 60_000).await?);

    // The dead gateway's liveness key lapses: its entry is no longer listed, and is deleted.
    let _: i64 = client.del(RedisKey::gateway_alive(&dead).as_str()).await?;
    assert!(!connections::renew(&client, &dead, 60_000).await?);
    assert_eq!(
        connections::list(&client, &session).await?,
        vec![info("a", &alive, 1)]
    );
    let details: u64 = client
        .hlen(RedisKey::connection_info(&session).as_str())
        .await?;
    assert_eq!(details, 1);

    // A sweep removes a dead gateway's entries from sessions nobody lists.
    let other = SessionId::parse("t")?;
    connections::announce(&client, &dead, 60_000, 1).await?;
    connections::write(
        &client,
        &dead,
        &[ConnectionInfo {
            session_id: other.clone(),
            ..info("d", &dead, 4)
        }],
    )
    .await?;
    let _: i64 = client.del(RedisKey::gateway_alive(&dead).as_str()).await?;
    assert_eq!(connections::sweep(&client).await?, 1);
    let left: u64 = client
        .hlen(RedisKey::connection_info(&other).as_str())
        .await?;
    assert_eq!(left, 0);
    let index: u64 = client
        .exists(RedisKey::gateway_connections(&dead).as_str())
        .await?;
    assert_eq!(index, 0);
    assert_eq!(connections::sweep(&client).await?, 0);

    // A gateway that leaves takes its entries along.
    connections::leave(&client, &alive).await?;
    assert!(connections::list(&client, &session).await?.is_empty());
    Ok(())
}
