//! Analytics counters: the one definition of what the processor writes into the `llm:stats:…`
//! hashes and what the gateway reads back from them: field names, the deltas each
//! [`EventRecord`] stands for, the latency histogram buckets and the percentile math. Pure: no
//! IO, so both sides provably agree.
//!
//! # Why fixed log-linear buckets instead of HDR histograms
//!
//! The processor applies a record's effects with one Lua script that also records the entry id
//! in the exactly-once ledger; every effect must therefore be expressible as plain Redis
//! commands in that script. An HDR histogram is a serialized blob: merging a sample into it
//! inside Redis would mean re-implementing its encoding in Lua (or a non-atomic
//! read-modify-write from Rust, which breaks exactly-once under crashes and races between
//! processors). Instead each latency sample increments one hash field named after a fixed
//! bucket (`HINCRBY <hash> ttft_b:<index> 1`). That is:
//! - atomic with the ledger (same script, same slot),
//! - exact: a count per bucket, no sampling,
//! - mergeable by plain summation across shards and minutes (the gateway sums the hashes of
//!   every shard and minute of a window and computes percentiles from the sum).
//!
//! Buckets are log-linear (as in HDR with 3 significant bits): values below 8 ms each have their
//! own bucket; from 8 ms on, each power of two `[2^e, 2^(e+1))` is cut into 8 equal buckets, up
//! to 2^20 ms (about 17.5 min; larger values fall into the last bucket). That is
//! [`BUCKETS`] = 144 possible fields per histogram, of which a hash holds only the non-empty
//! ones.
//!
//! **Error bound**: [`Histogram::percentile`] finds the bucket holding the nearest-rank
//! percentile and interpolates linearly inside it, so the reported value lies in the same
//! bucket as the true value: it is exact below 8 ms and off by less than one bucket width,
//! i.e. less than 1/8 (12.5 %) of the true value, above. Values at or above 2^20 ms are
//! reported as at most 2^20 ms.

use std::collections::BTreeMap;

use crate::event::FinishReason;
use crate::record::{EventRecord, FallbackSide, Outcome};

/// Field names of the stats hashes (totals and per-minute buckets share them).
pub mod field {
    /// First attempts started (`Started` with attempt 1): one per request.
    pub const REQUESTS: &str = "requests";
    /// Later attempts started (a producer took over a lost request).
    pub const RESTARTS: &str = "restarts";
    /// Per model: requests it could not serve that moved to the next model of its fallback
    /// chain (before their first token).
    pub const FELL_BACK: &str = "fell_back";
    /// Per model: requests it took over as a fallback of another model (also in `requests`).
    pub const FALLBACK_SERVED: &str = "fallback_served";
    /// Tokens written to session streams.
    pub const TOKENS_STREAMED: &str = "tokens_streamed";
    pub const PROMPT_TOKENS: &str = "prompt_tokens";
    pub const COMPLETION_TOKENS: &str = "completion_tokens";
    /// Requests that ended (any outcome).
    pub const FINISHED: &str = "finished";
    pub const TTFT_MS_SUM: &str = "ttft_ms_sum";
    /// Finished requests that had a first token (the samples of the ttft histogram).
    pub const TTFT_COUNT: &str = "ttft_count";
    pub const DURATION_MS_SUM: &str = "duration_ms_sum";
    /// Completion tokens of requests with a measurable generation time (numerator of
    /// tokens per second).
    pub const GENERATION_TOKENS: &str = "gen_tokens";
    /// Sum of `duration − ttft` over those requests (denominator of tokens per second).
    pub const GENERATION_MS_SUM: &str = "gen_ms_sum";
    /// `finish:<reason>`: requests that completed with that finish reason (incl. `cancelled`).
    pub const FINISH_PREFIX: &str = "finish:";
    /// `error:<code>`: requests that ended with that error code.
    pub const ERROR_PREFIX: &str = "error:";
    /// `ttft_b:<bucket>`: the time-to-first-token histogram.
    pub const TTFT_BUCKET_PREFIX: &str = "ttft_b:";
    /// `dur_b:<bucket>`: the request duration histogram.
    pub const DURATION_BUCKET_PREFIX: &str = "dur_b:";
}

/// Buckets below this are one millisecond wide (exact).
const LINEAR_LIMIT: u64 = 8;
/// log2 of the buckets per power of two.
const SUB_BITS: u32 = 3;
/// Largest tracked value: larger ones are counted in the last bucket.
pub const MAX_TRACKED_MS: u64 = (1 << 20) - 1;
/// Number of histogram buckets: 8 exact ones, then 8 per power of two from 2^3 to 2^19.
pub const BUCKETS: usize = 8 + (20 - 3) * 8;

/// The bucket of a latency in milliseconds.
pub fn bucket_of(ms: u64) -> usize {
    let v = ms.min(MAX_TRACKED_MS);
    let index = if v < LINEAR_LIMIT {
        v
    } else {
        // floor(log2 v) ≥ 3 here.
        let e = u64::from(63 - v.leading_zeros());
        let shift = e - u64::from(SUB_BITS);
        let sub = (v >> shift) & (LINEAR_LIMIT - 1);
        LINEAR_LIMIT + shift * LINEAR_LIMIT + sub
    };
    usize::try_from(index).unwrap_or(BUCKETS - 1)
}

/// The values `[low, high)` counted in bucket `index` (an index ≥ [`BUCKETS`] is the last one).
pub fn bucket_range(index: usize) -> (u64, u64) {
    let index = u64::try_from(index.min(BUCKETS - 1)).unwrap_or(0);
    if index < LINEAR_LIMIT {
        return (index, index + 1);
    }
    let k = index - LINEAR_LIMIT;
    let shift = k / LINEAR_LIMIT;
    let sub = k % LINEAR_LIMIT;
    (
        (LINEAR_LIMIT + sub) << shift,
        (LINEAR_LIMIT + sub + 1) << shift,
    )
}

/// Which latency a histogram holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// Start of the attempt to its first token.
    TimeToFirstToken,
    /// Start of the attempt to its end.
    Duration,
}

impl Latency {
    fn prefix(self) -> &'static str {
        match self {
            Self::TimeToFirstToken => field::TTFT_BUCKET_PREFIX,
            Self::Duration => field::DURATION_BUCKET_PREFIX,
        }
    }

    /// The field counting samples of bucket `index`.
    pub fn bucket_field(self, index: usize) -> String {
        format!("{}{index}", self.prefix())
    }
}

/// The Unix minute (bucket of the per-minute hashes) of a Unix ms timestamp.
pub fn minute_of(timestamp_ms: u64) -> u64 {
    timestamp_ms / 60_000
}

/// Whether a record also counts for the API key that started its request. Only `Started` and
/// `Finished` do: the processor resolves the key id from the request metadata, and doing that
/// for every `Tokens` record would cost a read per record; per key, `completion_tokens` stands
/// in for `tokens_streamed`.
pub fn counts_per_key(record: &EventRecord) -> bool {
    matches!(
        record,
        EventRecord::Started { .. } | EventRecord::Finished { .. }
    )
}

/// Whether a record counts for its session. A fallback counts for its models only: the
/// session still has one request.
pub fn counts_per_session(record: &EventRecord) -> bool {
    !matches!(record, EventRecord::FellBack { .. })
}

/// Key id used when a request's metadata (and so its API key) is gone.
pub const UNKNOWN_KEY: &str = "unknown";

/// A key id safe to put into a key name: configured ids are 1–64 of `[A-Za-z0-9_-]`; anything
/// else (which only a foreign writer could produce) is counted as [`UNKNOWN_KEY`].
pub fn key_label(raw: &str) -> &str {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { raw } else { UNKNOWN_KEY }
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The counter deltas a record stands for; the processor adds them to every stats hash the
/// record belongs to (totals and minute buckets of its session, model and, see
/// [`counts_per_key`], API key).
pub fn deltas(record: &EventRecord) -> Vec<(String, i64)> {
    use field::*;
    match record {
        EventRecord::Started { attempt, .. } => {
            let name = if *attempt <= 1 { REQUESTS } else { RESTARTS };
            vec![(name.to_owned(), 1)]
        }
        EventRecord::Tokens { count, .. } => {
            vec![(TOKENS_STREAMED.to_owned(), i64::from(*count))]
        }
        EventRecord::Finished {
            outcome,
            prompt_tokens,
            completion_tokens,
            ttft_ms,
            duration_ms,
            ..
        } => {
            let outcome_field = match outcome {
                Outcome::Completed(reason) => format!("{FINISH_PREFIX}{reason}"),
                Outcome::Failed(code) => format!("{ERROR_PREFIX}{code}"),
            };
            let mut d = vec![
                (FINISHED.to_owned(), 1),
                (outcome_field, 1),
                (PROMPT_TOKENS.to_owned(), i64::from(*prompt_tokens)),
                (COMPLETION_TOKENS.to_owned(), i64::from(*completion_tokens)),
                (DURATION_MS_SUM.to_owned(), signed(*duration_ms)),
                (Latency::Duration.bucket_field(bucket_of(*duration_ms)), 1),
            ];
            if let Some(ttft) = ttft_ms {
                d.push((TTFT_MS_SUM.to_owned(), signed(*ttft)));
                d.push((TTFT_COUNT.to_owned(), 1));
                d.push((Latency::TimeToFirstToken.bucket_field(bucket_of(*ttft)), 1));
                // Generation time is what the tokens took after the first one arrived; a
                // request whose tokens all came at once has none and says nothing about speed.
                let generation_ms = duration_ms.saturating_sub(*ttft);
                if generation_ms > 0 && *completion_tokens > 0 {
                    d.push((GENERATION_TOKENS.to_owned(), i64::from(*completion_tokens)));
                    d.push((GENERATION_MS_SUM.to_owned(), signed(generation_ms)));
                }
            }
            d
        }
        EventRecord::FellBack { side, .. } => match side {
            FallbackSide::From => vec![(FELL_BACK.to_owned(), 1)],
            FallbackSide::To => vec![(REQUESTS.to_owned(), 1), (FALLBACK_SERVED.to_owned(), 1)],
        },
    }
}

/// Sample counts per bucket of one latency; sums of hashes merge by addition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }
}

impl Histogram {
    /// Adds `count` samples to bucket `index` (an out-of-range index is the last bucket).
    pub fn add(&mut self, index: usize, count: u64) {
        let index = index.min(BUCKETS - 1);
        if let Some(slot) = self.counts.get_mut(index) {
            *slot = slot.saturating_add(count);
        }
    }

    /// Adds one sample of `ms`.
    pub fn record(&mut self, ms: u64) {
        self.add(bucket_of(ms), 1);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (index, count) in other.counts.iter().enumerate() {
            self.add(index, *count);
        }
    }

    /// The `q` quantile (0 < q ≤ 1) in ms, by nearest rank, interpolated linearly inside its
    /// bucket; `None` without samples. See the module docs for the error bound.
    pub fn percentile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // Nearest rank: the smallest sample with at least q·n samples at or below it.
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "sample counts are far below 2^52; the rank is clamped to 1..=total"
        )]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut before = 0_u64;
        for (index, count) in self.counts.iter().enumerate() {
            let count = *count;
            if count == 0 {
                continue;
            }
            if before + count >= rank {
                let (low, high) = bucket_range(index);
                if high - low == 1 {
                    // A one-millisecond bucket holds a single value: exact.
                    #[expect(clippy::cast_precision_loss, reason = "low < 2^20")]
                    return Some(low as f64);
                }
                // The rank's position inside the bucket, with samples assumed evenly spread.
                #[expect(clippy::cast_precision_loss, reason = "values < 2^21, counts < 2^52")]
                let value = low as f64
                    + (high - low) as f64 * ((rank - before) as f64 - 0.5) / count as f64;
                return Some(value);
            }
            before += count;
        }
        None
    }
}

/// Everything one stats hash (or the sum of several) says; what the analytics API shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub requests: u64,
    pub restarts: u64,
    pub fell_back: u64,
    pub fallback_served: u64,
    pub tokens_streamed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finished: u64,
    /// Completed requests by finish reason (`stop`, `length`, `cancelled`, …).
    pub finishes: BTreeMap<String, u64>,
    /// Failed requests by error code.
    pub errors: BTreeMap<String, u64>,
    pub ttft_ms_sum: u64,
    pub ttft_count: u64,
    pub duration_ms_sum: u64,
    pub generation_tokens: u64,
    pub generation_ms_sum: u64,
    pub ttft: Histogram,
    pub duration: Histogram,
}

impl Counters {
    /// Adds one field of a stats hash. Unknown fields are ignored, so an older reader keeps
    /// working next to a newer writer; negative values (impossible from HINCRBY of our
    /// deltas) count as zero.
    pub fn add_field(&mut self, name: &str, value: i64) {
        use field::*;
        let value = u64::try_from(value).unwrap_or(0);
        let slot = match name {
            REQUESTS => &mut self.requests,
            RESTARTS => &mut self.restarts,
            FELL_BACK => &mut self.fell_back,
            FALLBACK_SERVED => &mut self.fallback_served,
            TOKENS_STREAMED => &mut self.tokens_streamed,
            PROMPT_TOKENS => &mut self.prompt_tokens,
            COMPLETION_TOKENS => &mut self.completion_tokens,
            FINISHED => &mut self.finished,
            TTFT_MS_SUM => &mut self.ttft_ms_sum,
            TTFT_COUNT => &mut self.ttft_count,
            DURATION_MS_SUM => &mut self.duration_ms_sum,
            GENERATION_TOKENS => &mut self.generation_tokens,
            GENERATION_MS_SUM => &mut self.generation_ms_sum,
            other => {
                if let Some(reason) = other.strip_prefix(FINISH_PREFIX) {
                    add_to(&mut self.finishes, reason, value);
                } else if let Some(code) = other.strip_prefix(ERROR_PREFIX) {
                    add_to(&mut self.errors, code, value);
                } else if let Some(index) = bucket_index(other, TTFT_BUCKET_PREFIX) {
                    self.ttft.add(index, value);
                } else if let Some(index) = bucket_index(other, DURATION_BUCKET_PREFIX) {
                    self.duration.add(index, value);
                }
                return;
            }
        };
        *slot = slot.saturating_add(value);
    }

    /// Adds every field of a hash as Redis returns it (values are decimal strings; one that is
    /// not is skipped).
    pub fn add_hash<I, K, V>(&mut self, fields: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (name, value) in fields {
            if let Ok(value) = value.as_ref().parse::<i64>() {
                self.add_field(name.as_ref(), value);
            }
        }
    }

    /// The counters `record` stands for, as if read back from a hash (ground truth in tests).
    pub fn add_record(&mut self, record: &EventRecord) {
        for (name, delta) in deltas(record) {
            self.add_field(&name, delta);
        }
    }

    pub fn merge(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.restarts += other.restarts;
        self.fell_back += other.fell_back;
        self.fallback_served += other.fallback_served;
        self.tokens_streamed += other.tokens_streamed;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.finished += other.finished;
        for (reason, count) in &other.finishes {
            add_to(&mut self.finishes, reason, *count);
        }
        for (code, count) in &other.errors {
            add_to(&mut self.errors, code, *count);
        }
        self.ttft_ms_sum += other.ttft_ms_sum;
        self.ttft_count += other.ttft_count;
        self.duration_ms_sum += other.duration_ms_sum;
        self.generation_tokens += other.generation_tokens;
        self.generation_ms_sum += other.generation_ms_sum;
        self.ttft.merge(&other.ttft);
        self.duration.merge(&other.duration);
    }

    /// Requests that ended with `finishReason: cancelled`.
    pub fn cancelled(&self) -> u64 {
        self.finishes
            .get(FinishReason::Cancelled.as_str())
            .copied()
            .unwrap_or(0)
    }

    /// Requests that ended with an error, any code.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Completion tokens per second of generation time (after the first token), summed over
    /// requests: Σ tokens / Σ (duration − ttft). `None` before any request had one.
    pub fn tokens_per_second(&self) -> Option<f64> {
        (self.generation_ms_sum > 0).then(|| {
            #[expect(clippy::cast_precision_loss, reason = "sums far below 2^52")]
            let rate = self.generation_tokens as f64 * 1000.0 / self.generation_ms_sum as f64;
            rate
        })
    }
}

fn add_to(map: &mut BTreeMap<String, u64>, name: &str, value: u64) {
    let slot = map.entry(name.to_owned()).or_insert(0);
    *slot = slot.saturating_add(value);
}

fn bucket_index(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ErrorCode;
    use crate::ids::{ModelId, RequestId, SessionId};

    #[test]
    fn small_values_have_exact_buckets() {
        for ms in 0..8 {
            assert_eq!(bucket_of(ms), usize::try_from(ms).unwrap_or(usize::MAX));
            assert_eq!(bucket_range(bucket_of(ms)), (ms, ms + 1));
        }
    }

    #[test]
    fn every_value_falls_inside_its_bucket_and_buckets_tile_the_range() {
        // Contiguous, non-overlapping, increasing.
        let mut expected_low = 0;
        for index in 0..BUCKETS {
            let (low, high) = bucket_range(index);
            assert_eq!(low, expected_low, "bucket {index}");
            assert!(high > low);
            expected_low = high;
        }
        assert_eq!(expected_low, MAX_TRACKED_MS + 1);
        for ms in (0..5_000).chain([65_535, 65_536, 600_000, MAX_TRACKED_MS]) {
            let (low, high) = bucket_range(bucket_of(ms));
            assert!(low <= ms && ms < high, "{ms} not in [{low}, {high})");
        }
        assert_eq!(bucket_of(MAX_TRACKED_MS), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn bucket_width_is_at_most_an_eighth_of_its_values() {
        for index in 8..BUCKETS {
            let (low, high) = bucket_range(index);
            assert!((high - low) * 8 <= low, "bucket {index}: [{low}, {high})");
        }
    }

    #[test]
    fn percentiles_of_an_empty_histogram_are_none() {
        assert_eq!(Histogram::default().percentile(0.5), None);
    }

    #[test]
    fn exact_buckets_give_exact_percentiles() {
        let mut h = Histogram::default();
        for ms in [1, 2, 3, 4, 5, 6, 7, 7, 7, 7] {
            h.record(ms);
        }
        assert_eq!(h.percentile(0.5), Some(5.0));
        assert_eq!(h.percentile(0.95), Some(7.0));
        assert_eq!(h.percentile(0.1), Some(1.0));
    }

    #[test]
    fn percentiles_stay_within_the_error_bound() {
        // 1..=10_000 ms once each: the true nearest-rank p50 is 5000, p95 9500, p99 9900.
        let mut h = Histogram::default();
        for ms in 1..=10_000 {
            h.record(ms);
        }
        for (q, truth) in [(0.5, 5_000.0), (0.95, 9_500.0), (0.99, 9_900.0)] {
            let got = h.percentile(q).unwrap_or(f64::NAN);
            assert!((got - truth).abs() < truth / 8.0, "q={q}: {got} vs {truth}");
            let (low, high) = bucket_range(bucket_of(truth as u64));
            assert!(got >= low as f64 && got < high as f64, "q={q}: {got}");
        }
    }

    #[test]
    fn one_sample_is_reported_inside_its_bucket() {
        let mut h = Histogram::default();
        h.record(300);
        let (low, high) = bucket_range(bucket_of(300));
        let p = h.percentile(0.95).unwrap_or(f64::NAN);
        assert!(p >= low as f64 && p < high as f64);
        assert_eq!(h.percentile(0.5), h.percentile(0.95));
    }

    #[test]
    fn histograms_merge_by_summation() {
        let (mut a, mut b, mut both) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for ms in [3, 40, 900] {
            a.record(ms);
            both.record(ms);
        }
        for ms in [12, 40, 70_000] {
            b.record(ms);
            both.record(ms);
        }
        a.merge(&b);
        assert_eq!(a, both);
        assert_eq!(a.count(), 6);
    }

    fn finished(
        outcome: Outcome,
        ttft: Option<u64>,
        duration: u64,
    ) -> Result<EventRecord, crate::IdError> {
        Ok(EventRecord::Finished {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s")?,
            model_id: ModelId::parse("m")?,
            outcome,
            prompt_tokens: 10,
            completion_tokens: 50,
            ttft_ms: ttft,
            duration_ms: duration,
            timestamp: 0,
        })
    }

    #[test]
    fn counters_read_back_what_the_deltas_wrote() -> Result<(), crate::IdError> {
        let mut counters = Counters::default();
        counters.add_record(&EventRecord::Started {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s")?,
            model_id: ModelId::parse("m")?,
            attempt: 1,
            timestamp: 0,
        });
        counters.add_record(&finished(
            Outcome::Completed(FinishReason::Stop),
            Some(100),
            1_100,
        )?);
        counters.add_record(&finished(
            Outcome::Completed(FinishReason::Cancelled),
            Some(50),
            550,
        )?);
        counters.add_record(&finished(
            Outcome::Failed(ErrorCode::UpstreamError),
            None,
            30,
        )?);

        assert_eq!(counters.requests, 1);
        assert_eq!(counters.finished, 3);
        assert_eq!(counters.cancelled(), 1);
        assert_eq!(counters.failed(), 1);
        assert_eq!(counters.errors.get("upstream_error"), Some(&1));
        assert_eq!(counters.prompt_tokens, 30);
        assert_eq!(counters.completion_tokens, 150);
        assert_eq!(counters.ttft.count(), 2);
        assert_eq!(counters.duration.count(), 3);
        // 100 tokens over 1000 + 500 ms of generation; the failed one had no first token.
        let tps = counters.tokens_per_second().unwrap_or(0.0);
        assert!((tps - 100.0 * 1000.0 / 1500.0).abs() < 1e-9, "{tps}");

        // The same through the string form of a Redis hash.
        let hash: Vec<(String, String)> = {
            let mut sum: BTreeMap<String, i64> = BTreeMap::new();
            for record in [
                finished(Outcome::Completed(FinishReason::Stop), Some(100), 1_100)?,
                finished(Outcome::Completed(FinishReason::Cancelled), Some(50), 550)?,
                finished(Outcome::Failed(ErrorCode::UpstreamError), None, 30)?,
            ] {
                for (name, delta) in deltas(&record) {
                    *sum.entry(name).or_insert(0) += delta;
                }
            }
            sum.into_iter().map(|(k, v)| (k, v.to_string())).collect()
        };
        let mut read = Counters::default();
        read.add_hash(hash);
        read.requests = 1;
        assert_eq!(read, counters);
        Ok(())
    }

    #[test]
    fn key_labels_are_safe_in_key_names() {
        assert_eq!(key_label("team-a_1"), "team-a_1");
        assert_eq!(key_label(""), UNKNOWN_KEY);
        assert_eq!(key_label("a}b"), UNKNOWN_KEY);
        assert_eq!(key_label("a:b"), UNKNOWN_KEY);
        assert_eq!(key_label(&"x".repeat(65)), UNKNOWN_KEY);
    }
}
