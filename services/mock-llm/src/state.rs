//! Server-wide state shared by every worker: counters for `/_mock/stats` and the `fail_times`
//! bookkeeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use service_kit::config::MockLlmSettings;

/// Counters behind `GET /_mock/stats`. Written by the handlers and by each stream's
/// [`StreamGuard`]; read by the stats endpoint and by in-process tests via `Application::stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Every `POST /v1/chat/completions`, whatever its outcome.
    pub requests: AtomicU64,
    /// Streaming responses that began (status 200 sent).
    pub streams_started: AtomicU64,
    /// Streams that reached `data: [DONE]`.
    pub streams_completed: AtomicU64,
    /// Streams whose client went away before the end (including during a stall).
    pub streams_disconnected: AtomicU64,
    /// Streams ended early on purpose by `error_after` / `disconnect_after`.
    pub streams_aborted: AtomicU64,
    /// Streams currently open.
    pub active_streams: AtomicU64,
}

/// A point-in-time copy of [`Stats`], as served by `GET /_mock/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub streams_started: u64,
    pub streams_completed: u64,
    pub streams_disconnected: u64,
    pub streams_aborted: u64,
    pub active_streams: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: get(&self.requests),
            streams_started: get(&self.streams_started),
            streams_completed: get(&self.streams_completed),
            streams_disconnected: get(&self.streams_disconnected),
            streams_aborted: get(&self.streams_aborted),
            active_streams: get(&self.active_streams),
        }
    }
}

/// How a stream ended, decided by whoever ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running: if the guard drops now, the client went away.
    Running,
    Completed,
    Aborted,
}

/// Lives inside a stream body; actix drops the body when the client disconnects, so the drop
/// is where a stream's end is counted, whatever caused it.
#[derive(Debug)]
pub struct StreamGuard {
    stats: std::sync::Arc<Stats>,
    pub outcome: Outcome,
}

impl StreamGuard {
    pub fn start(stats: std::sync::Arc<Stats>) -> Self {
        stats.streams_started.fetch_add(1, Ordering::Relaxed);
        stats.active_streams.fetch_add(1, Ordering::Relaxed);
        Self {
            stats,
            outcome: Outcome::Running,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.active_streams.fetch_sub(1, Ordering::Relaxed);
        let counter = match self.outcome {
            Outcome::Running => {
                tracing::debug!("mock stream: client went away before the end");
                &self.stats.streams_disconnected
            }
            Outcome::Completed => &self.stats.streams_completed,
            Outcome::Aborted => &self.stats.streams_aborted,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the handlers share, behind `web::Data` (an `Arc`).
#[derive(Debug)]
pub struct AppState {
    pub settings: MockLlmSettings,
    pub stats: std::sync::Arc<Stats>,
    /// Requests seen per fault key + prompt, for `fail_times`. Written and read by the chat
    /// handler only. It grows with distinct faulty prompts, which only tests send.
    failures: Mutex<HashMap<String, u32>>,
    /// Source of unique completion ids.
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(settings: MockLlmSettings, stats: std::sync::Arc<Stats>) -> Self {
        Self {
            settings,
            stats,
            failures: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Counts one more request under `key` and says whether it is still within the first
    /// `fail_times` (so its fault must fire).
    pub fn should_fail(&self, key: String, fail_times: u32) -> bool {
        // A poisoned lock only means another handler panicked mid-update; the map is still
        // a valid map of counters.
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = failures.entry(key).or_insert(0);
        *seen = seen.saturating_add(1);
        *seen <= fail_times
    }

    pub fn completion_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("chatcmpl-mock{nanos:x}{n:x}")
    }
}
