//! Condition waits with a deadline: tests wait for a state to be reached, never for a fixed
//! amount of time.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::time::Instant;

/// Polls `f` every `poll_interval` until it yields `Some(value)` or `timeout` passes.
///
/// `Ok(None)` means "not yet". An `Err` also counts as "not yet" (a service that is still
/// starting refuses connections), but the last error is kept and reported if time runs out.
/// Each call of `f` is itself cut off at the deadline, so a hanging probe cannot overrun it.
pub async fn wait_until<T, F, Fut>(
    timeout: Duration,
    poll_interval: Duration,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err: Option<anyhow::Error> = None;
    let mut attempts = 0_u32;
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => last_err = Some(err),
            Err(_) => break,
        }
        let next = Instant::now() + poll_interval;
        if next >= deadline {
            break;
        }
        tokio::time::sleep_until(next).await;
    }
    let message = format!("condition not met within {timeout:?} ({attempts} attempts)");
    match last_err {
        Some(err) => Err(err.context(message)),
        None => Err(anyhow!(message)),
    }
}

/// Polls `GET url` until it answers 2xx, e.g. a service's `/healthz` or `/readyz`.
pub async fn wait_for_http_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    wait_until(timeout, Duration::from_millis(50), || async {
        let response = client
            .get(url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(Some(()))
        } else {
            Err(anyhow!("GET {url} answered {status}"))
        }
    })
    .await
    .with_context(|| format!("waiting for {url} to answer 2xx"))
}

/// The value of the sample `series value` of a Prometheus text page (`/metrics`): `series` is
/// the name with its labels written exactly as the page does, or the name alone. `None` when
/// the page has no such sample or its value is not a number.
pub fn metric_sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_until_returns_the_first_ready_value() -> anyhow::Result<()> {
        let mut calls = 0;
        let value = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            calls += 1;
            let ready = calls >= 3;
            async move { Ok(ready.then_some(calls)) }
        })
        .await?;
        assert_eq!(value, 3);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_times_out_with_the_last_error() {
        let result: anyhow::Result<()> = wait_until(
            Duration::from_millis(100),
            Duration::from_millis(10),
            || async { Err(anyhow!("still starting")) },
        )
        .await;
        let message = result
            .map(|()| String::new())
            .unwrap_or_else(|e| format!("{e:#}"));
        assert!(message.contains("not met within"), "{message}");
        assert!(message.contains("still starting"), "{message}");
    }

    #[test]
    fn a_sample_is_read_by_its_exact_series() {
        let page = "# TYPE x counter\nx_total{a=\"1\"} 3\nx_total 7\nx_total_more 9\ny NaNx\n";
        assert_eq!(metric_sample(page, "x_total"), Some(7.0));
        assert_eq!(metric_sample(page, "x_total{a=\"1\"}"), Some(3.0));
        assert_eq!(metric_sample(page, "x"), None);
        assert_eq!(metric_sample(page, "y"), None);
    }
}
