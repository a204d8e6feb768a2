//! What an idle SSE connection's queues cost on the heap, before (tokio channels: the hub's
//! unbounded channel of frames, the body's bounded channel of 16) and now (a hub mailbox and
//! the body queue): part of the breakdown in `bench/results/memory-idle.md` (issue #18).
//!
//! A test binary of its own: it replaces the global allocator to read the live heap, which
//! must not count other tests' allocations.

use bytes::Bytes;
use gateway::hub::{Closed, Frame, Hub, HubSettings};
use stream_schema::{EntryId, ModelId, RedisKey, SessionId};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn live() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// Heap bytes `make` keeps alive (what it returns is held until measured).
fn cost<T>(make: impl FnOnce() -> T) -> (usize, T) {
    let before = live();
    let kept = make();
    (live().saturating_sub(before), kept)
}

/// The message the hub's channel carried before the mailboxes.
#[expect(dead_code, reason = "only its size matters here")]
enum OldHubMessage {
    Frame(Frame),
    Closed(Closed),
}

#[test]
fn an_idle_connections_queues_cost_less_than_the_channels_they_replace() -> anyhow::Result<()> {
    let _profiler = dhat::Profiler::builder().testing().build();
    let (old_hub, kept_hub) = cost(|| {
        (
            tokio::sync::mpsc::unbounded_channel::<OldHubMessage>(),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        )
    });
    let (old_body, kept_body) = cost(|| tokio::sync::mpsc::channel::<Bytes>(16));
    let hub = Hub::new(HubSettings {
        batch: 64,
        block_ms: 1000,
        buffer_bytes: 1 << 20,
        cluster: false,
        sweep_ms: 1000,
        block_max_streams: 128,
    });
    let key = RedisKey::session(&SessionId::parse("s")?, &ModelId::parse("m")?);
    // The first subscription of a key also adds the key's feed; count a second one.
    let first = hub.subscribe(&key, EntryId::ZERO, None);
    let (new_hub, second) = cost(|| hub.subscribe(&key, EntryId::ZERO, None));
    let (new_body, kept_new_body) = cost(|| gateway::body::channel(16 * 1024));
    #[expect(clippy::print_stdout, reason = "the figures are the test's report")]
    {
        println!(
            "idle queues, heap bytes: hub channel {old_hub} -> mailbox {new_hub} (with the \
             subscription's key); body channel {old_body} -> body queue {new_body}"
        );
    }
    assert!(new_hub < old_hub, "{new_hub} vs {old_hub}");
    assert!(new_body < old_body, "{new_body} vs {old_body}");
    drop((kept_hub, kept_body, first, second, kept_new_body));
    Ok(())
}
