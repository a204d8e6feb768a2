//! The metrics recorder's memory stays bounded however many samples a service records between
//! scrapes (issue #20: the gateway grew by every delivered token's lag sample).
//!
//! A test binary of its own, unlike the rest of the package's tests: it replaces the global
//! allocator to read the live heap, which must not count other tests' allocations.

use std::time::Duration;

use service_kit::ops::{METRICS_UPKEEP_INTERVAL, metrics_upkeep, recorder};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Samples per upkeep interval: a busy gateway (5,000 tokens/s for the 1 s interval).
const SAMPLES_PER_INTERVAL: usize = 5_000;
const INTERVALS: usize = 40;
/// What a histogram sample costs while it waits for the upkeep (an `f64` and a `quanta`
/// instant).
const SAMPLE_BYTES: usize = 16;

fn live_bytes() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// Lets the upkeep run once: the clock is paused, so this sleep advances it to the upkeep's
/// tick (which runs before the clock moves on) and just past it, without waiting.
async fn next_upkeep() {
    tokio::time::sleep(METRICS_UPKEEP_INTERVAL + Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn histogram_samples_do_not_accumulate_between_scrapes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let recorder = recorder();
    let shutdown = CancellationToken::new();
    let upkeep = tokio::spawn(metrics_upkeep(
        recorder.handle(),
        METRICS_UPKEEP_INTERVAL,
        shutdown.clone(),
    ));
    let histogram =
        metrics::with_local_recorder(&recorder, || metrics::histogram!("test_lag_seconds"));
    let record = |n: usize| {
        for i in 0..n {
            histogram.record((i % 1000) as f64 / 1e4);
        }
    };
    // Warm up: the histogram's buckets and the allocator's own structures exist from here on.
    for _ in 0..2 {
        record(SAMPLES_PER_INTERVAL);
        next_upkeep().await;
    }
    let idle = live_bytes();
    let samples = INTERVALS * SAMPLES_PER_INTERVAL;
    let kept_if_leaking = samples * SAMPLE_BYTES;

    for _ in 0..INTERVALS {
        record(SAMPLES_PER_INTERVAL);
        next_upkeep().await;
    }
    let retained = live_bytes().saturating_sub(idle);
    // Freed blocks wait for the exporter's epoch-based reclamation, so not exactly zero.
    assert!(
        retained < kept_if_leaking / 20,
        "with the upkeep the heap grew by {retained} bytes over {samples} samples \
         ({kept_if_leaking} if none were folded into buckets)"
    );

    // The same load without the upkeep: the measurement does see the samples pile up.
    shutdown.cancel();
    assert!(upkeep.await.is_ok(), "the upkeep task panicked");
    let before = live_bytes();
    record(samples);
    let grown = live_bytes().saturating_sub(before);
    assert!(
        grown >= kept_if_leaking * 9 / 10,
        "without the upkeep the heap grew by only {grown} bytes over {samples} samples"
    );
}
