//! The rate-limit scripts against a real `redis-server`, with an injected clock: the sliding
//! request log and the fixed token window admit exactly their limit.

use gateway::limits::RateLimiter;
use stream_schema::RedisKey;
use test_support::RedisServer;

#[tokio::test]
async fn the_request_log_admits_exactly_the_limit_per_sliding_window() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let limiter = RateLimiter::default();
    let key = RedisKey::key_request_log("k");
    let check = |member: &'static str, now: u64| {
        let (limiter, client, key) = (limiter.clone(), client.clone(), key.clone());
        async move {
            limiter
                .check_log(&client, &key, 3, 1_000, member, Some(now))
                .await
        }
    };
    assert_eq!(check("a", 0).await?, Ok(()));
    assert_eq!(check("b", 100).await?, Ok(()));
    assert_eq!(check("c", 200).await?, Ok(()));
    // Full until the oldest entry (t=0) leaves the window at t=1000.
    assert_eq!(check("d", 300).await?, Err(1));
    assert_eq!(check("e", 999).await?, Err(1));
    assert_eq!(check("f", 1_000).await?, Ok(()));
    // Refused requests were not recorded: b, c, f are in the window now.
    assert_eq!(check("g", 1_050).await?, Err(1));
    assert_eq!(check("h", 1_100).await?, Ok(()));
    Ok(())
}

#[tokio::test]
async fn token_reservations_fill_a_fixed_window_and_reset_with_the_next() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let client = redis.client().await?;
    let limiter = RateLimiter::default();
    let window = 10_000;
    let first = limiter
        .reserve(&client, "k", 100, 60, window, Some(20_500))
        .await?;
    assert_eq!(first.map(|r| (r.window, r.tokens)), Ok((2, 60)));
    // 60 + 50 > 100: retry when window 2 ends at 30 000 ms.
    assert_eq!(
        limiter
            .reserve(&client, "k", 100, 50, window, Some(21_000))
            .await?,
        Err(9)
    );
    assert!(
        limiter
            .reserve(&client, "k", 100, 40, window, Some(29_999))
            .await?
            .is_ok()
    );
    assert_eq!(
        limiter
            .reserve(&client, "k", 100, 1, window, Some(29_999))
            .await?,
        Err(1)
    );
    let next = limiter
        .reserve(&client, "k", 100, 100, window, Some(30_000))
        .await?;
    assert_eq!(next.map(|r| r.window), Ok(3));
    Ok(())
}
