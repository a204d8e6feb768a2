//! `bench --soak` (`make bench-memory`): a long steady load, sampling the memory of every
//! service and of Redis, to show that nothing grows with traffic once every bound is reached.
//!
//! N streams each run one chat after another on their own fixed session (the shape of issue
//! #20's report). Every `SAMPLE_EVERY` it reads each service's RSS and anonymous RSS (without
//! the binary's pages, which grow as new code paths run), Redis `used_memory`, and the
//! processor's exactly-once ledger (entries and `MEMORY USAGE` over every shard). After the
//! warm-up each series is judged flat when its mean over the last samples is within the margin
//! of its mean over the first samples after warm-up. The report (Markdown, JSON, SVG curves)
//! says which and by how much; the run fails when one is not flat, so a leak fails
//! `make bench-memory`.
//!
//! Redis keeps what its retention bounds allow (session streams by age, event shards and the
//! job stream by length, analytics windows by age), so the soak sets those bounds short enough
//! to be reached during the warm-up; the report quotes them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use fred::prelude::*;
use fred::types::InfoKind;
use serde::{Deserialize, Serialize};
use stream_schema::RedisKey;

use crate::client::{self, Counters, Load, Target};
use crate::plot::{self, Curve, TimePanel};
use crate::probe::{self, Machine};
use crate::stack::Stack;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples averaged at each end of the judged span.
const ENDS: usize = 3;
const MIB: f64 = 1024.0 * 1024.0;

/// The shape of a soak run (`bench --soak --help` lists the flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakOptions {
    pub minutes: f64,
    pub warmup_minutes: f64,
    pub streams: usize,
    pub tokens_per_chat: usize,
    pub delay_ms: u64,
    /// Allowed growth of each series after warm-up, in percent of its level.
    pub margin_pct: f64,
    /// SIGKILL the second of two processors halfway through the warm-up ([`kill_at`]); the
    /// analytics must still count every chat exactly once.
    pub kill_processor: bool,
}

/// One reading of every series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub secs: f64,
    pub chats: u64,
    pub errors: u64,
    /// Resident set size per service, bytes.
    pub rss: BTreeMap<String, u64>,
    /// Anonymous resident memory per service (`RssAnon`), bytes: the RSS without the pages of
    /// the binary and libraries, which grow as new code paths run. Absent in older reports.
    #[serde(default)]
    pub anon: BTreeMap<String, u64>,
    pub redis_used_memory: u64,
    /// Ids in the processor's exactly-once ledgers, all shards.
    pub ledger_entries: u64,
    /// `MEMORY USAGE` of those ledgers, bytes.
    pub ledger_bytes: u64,
}

/// Whether one series stayed within the margin after warm-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub series: String,
    pub after_warmup: f64,
    pub at_end: f64,
    pub growth_pct: f64,
    /// Least-squares growth per completed chat after warm-up (same unit as the values).
    pub per_chat: f64,
    pub flat: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakData {
    pub command: String,
    /// When the second processor was killed, seconds into the run.
    pub processor_killed_at_secs: Option<f64>,
    pub exactness: Exactness,
    pub started: String,
    pub machine: Machine,
    pub options: SoakOptions,
    /// The configuration keys that differ from the defaults.
    pub config: String,
    pub samples: Vec<Sample>,
    pub verdicts: Vec<Verdict>,
}

/// The analytics against what the clients saw, once the group has drained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exactness {
    /// Chats the gateway accepted.
    pub started: u64,
    /// `totals.requests` over every model of `GET /api/analytics/models`.
    pub requests: u64,
    /// `totals.finished` over every model.
    pub finished: u64,
}

impl Exactness {
    pub fn exact(&self) -> bool {
        self.requests == self.started && self.finished == self.started
    }
}

impl SoakData {
    pub fn all_flat(&self) -> bool {
        self.verdicts.iter().all(|v| v.flat)
    }

    /// Whether the run passes: memory flat and the counters exact.
    pub fn passed(&self) -> bool {
        self.all_flat() && self.exactness.exact()
    }
}

/// Runs the soak and returns its data (the caller writes the report).
pub async fn run(
    options: SoakOptions,
    machine: Machine,
    command: String,
) -> anyhow::Result<SoakData> {
    let started = probe::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"], None);
    let processors = if options.kill_processor { 2 } else { 1 };
    let stack = Stack::start_with(processors, |settings| {
        // Retention reached within the warm-up, so that what Redis keeps is bounded in the
        // judged span: session streams by age (2 × TTL), shards and jobs by length, analytics
        // windows by age.
        settings.streams.session_ttl_secs = 60;
        // A request must end within the session TTL (the settings refuse otherwise); soak
        // chats take about a second.
        for model in settings.models.values_mut() {
            model.request_timeout_secs = 30;
        }
        settings.streams.events_maxlen = 20_000;
        settings.streams.requests_maxlen = 10_000;
        settings.processor.window_retention_secs = 300;
    })
    .await?;
    let shards = stack.bridge.settings().streams.event_shards;
    let http = client::http_client()?;
    let counters = Arc::new(Counters::default());
    let load = Load {
        delay_ms: options.delay_ms,
        tokens_per_chat: options.tokens_per_chat,
    };
    let gateway = stack.gateway().url();
    let mut loops = tokio::task::JoinSet::new();
    for stream in 0..options.streams {
        // Spread the first chats over one chat's length so chats end uniformly over time.
        let stagger = Duration::from_millis(
            (options.delay_ms * options.tokens_per_chat as u64) * stream as u64
                / options.streams.max(1) as u64,
        );
        loops.spawn(client::chat_loop(
            http.clone(),
            Target::Bridge {
                gateway: gateway.clone(),
            },
            format!("soak{}", std::process::id()),
            stream,
            load,
            load,
            stagger,
            Arc::clone(&counters),
        ));
    }

    let begun = Instant::now();
    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let mut samples = Vec::new();
    let mut processor_killed_at_secs = None;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        if options.kill_processor
            && processor_killed_at_secs.is_none()
            && begun.elapsed() >= kill_at(&options)
        {
            // Mid-batch with high likelihood at this rate; the survivor reclaims its entries.
            stack.bridge.processors[1].process.sigkill()?;
            processor_killed_at_secs = Some(begun.elapsed().as_secs_f64());
            eprintln!("soak: SIGKILL sent to processor-1");
        }
        let sample = sample(&stack, shards, &counters, begun.elapsed()).await?;
        eprintln!(
            "soak: {:>5.1} min  {:>7} chats  {:>3} errors  rss gw {:.1} / prod {:.1} / proc {:.1} MiB  redis {:.1} MiB  ledger {}",
            sample.secs / 60.0,
            sample.chats,
            sample.errors,
            sample.rss.get("gateway").copied().unwrap_or(0) as f64 / MIB,
            sample.rss.get("producer").copied().unwrap_or(0) as f64 / MIB,
            sample.rss.get("processor").copied().unwrap_or(0) as f64 / MIB,
            sample.redis_used_memory as f64 / MIB,
            sample.ledger_entries,
        );
        samples.push(sample);
        if begun.elapsed() >= total {
            break;
        }
    }
    counters.stop.store(true, Ordering::Relaxed);
    // Chats in flight finish (a few seconds); what does not is aborted with the stack.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    loops.abort_all();
    let exactness = drained_counts(&stack, &http, counters.started.load(Ordering::Relaxed)).await?;
    eprintln!(
        "soak: {} chats started; analytics count {} requests, {} finished",
        exactness.started, exactness.requests, exactness.finished
    );

    let verdicts = judge(&samples, &options);
    Ok(SoakData {
        command,
        processor_killed_at_secs,
        exactness,
        started,
        machine,
        config: stack.config.clone(),
        options,
        samples,
        verdicts,
    })
}

/// When the soak kills the second processor: halfway through the warm-up. The survivor then
/// takes over every record, not half of them, and its memory settles at a new level with batches
/// twice as full (90 KB of live heap, the rest glibc keeping pages: `bench/results/memory.md`).
/// That is a change of load the soak makes itself, so it belongs before the judged span, with
/// time left for the reclaim (`processor.reclaim_idle_ms`, 30 s) and the new level to settle.
fn kill_at(options: &SoakOptions) -> Duration {
    Duration::from_secs_f64((options.warmup_minutes * 60.0 / 2.0).max(0.0))
}

/// The analytics totals once they equal what the clients started, or after `DRAIN` with
/// whatever they are then (a processor that lost or doubled a record never gets there).
async fn drained_counts(
    stack: &Stack,
    http: &reqwest::Client,
    started: u64,
) -> anyhow::Result<Exactness> {
    const DRAIN: Duration = Duration::from_secs(120);
    let deadline = Instant::now() + DRAIN;
    loop {
        let body: serde_json::Value = http
            .get(format!("{}/api/analytics/models", stack.gateway().url()))
            .bearer_auth(crate::stack::API_KEY)
            .send()
            .await
            .context("GET /api/analytics/models")?
            .json()
            .await
            .context("analytics body")?;
        let total = |field: &str| -> u64 {
            body["models"]
                .as_array()
                .map(|models| {
                    models
                        .iter()
                        .filter_map(|m| m["totals"][field].as_u64())
                        .sum()
                })
                .unwrap_or(0)
        };
        let counts = Exactness {
            started,
            requests: total("requests"),
            finished: total("finished"),
        };
        if counts.exact() || Instant::now() >= deadline {
            return Ok(counts);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn sample(
    stack: &Stack,
    shards: u16,
    counters: &Counters,
    elapsed: Duration,
) -> anyhow::Result<Sample> {
    let (mut rss, mut anon) = (BTreeMap::new(), BTreeMap::new());
    for (name, pid) in stack.bridge_pids() {
        rss.insert(name.to_owned(), probe::rss_bytes(pid)?);
        anon.insert(name.to_owned(), probe::rss_anon_bytes(pid)?);
    }
    let redis = &stack.redis_client;
    let redis_used_memory = probe::info_field(redis, InfoKind::Memory, "used_memory")
        .await?
        .parse()
        .context("parsing used_memory")?;
    let (mut ledger_entries, mut ledger_bytes) = (0, 0);
    for shard in 0..shards {
        let key = RedisKey::applied_ledger(shard);
        let entries: u64 = redis.zcard(key.as_str()).await?;
        let bytes: Option<u64> = redis
            .custom(
                fred::types::CustomCommand::new_static("MEMORY", None, false),
                vec!["USAGE", key.as_str()],
            )
            .await?;
        ledger_entries += entries;
        ledger_bytes += bytes.unwrap_or(0);
    }
    Ok(Sample {
        secs: elapsed.as_secs_f64(),
        chats: counters.chats.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        rss,
        anon,
        redis_used_memory,
        ledger_entries,
        ledger_bytes,
    })
}

/// The series a verdict is given for, with their values per sample.
fn series(samples: &[Sample]) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    let names: Vec<String> = samples
        .first()
        .map(|s| s.rss.keys().cloned().collect())
        .unwrap_or_default();
    for name in names {
        let values = samples
            .iter()
            .map(|s| s.rss.get(&name).copied().unwrap_or(0) as f64)
            .collect();
        out.push((format!("{name} RSS"), values));
        // Judged too (a leak shows here first); absent from reports older than the field.
        if samples.iter().all(|s| s.anon.contains_key(&name)) {
            let values = samples
                .iter()
                .map(|s| s.anon.get(&name).copied().unwrap_or(0) as f64)
                .collect();
            out.push((format!("{name} anonymous RSS"), values));
        }
    }
    out.push((
        "Redis used_memory".to_owned(),
        samples.iter().map(|s| s.redis_used_memory as f64).collect(),
    ));
    out
}

fn judge(samples: &[Sample], options: &SoakOptions) -> Vec<Verdict> {
    let judged: Vec<usize> = (0..samples.len())
        .filter(|&i| samples[i].secs >= options.warmup_minutes * 60.0)
        .collect();
    let chats: Vec<f64> = judged.iter().map(|&i| samples[i].chats as f64).collect();
    series(samples)
        .into_iter()
        .map(|(name, values)| {
            let values: Vec<f64> = judged.iter().map(|&i| values[i]).collect();
            verdict(name, &chats, &values, options.margin_pct)
        })
        .collect()
}

fn verdict(series: String, chats: &[f64], values: &[f64], margin_pct: f64) -> Verdict {
    let ends = ENDS.min(values.len() / 2).max(1);
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let after_warmup = mean(&values[..ends.min(values.len())]);
    let at_end = mean(&values[values.len().saturating_sub(ends)..]);
    let growth_pct = (at_end - after_warmup) / after_warmup * 100.0;
    Verdict {
        series,
        after_warmup,
        at_end,
        growth_pct,
        per_chat: slope(chats, values),
        // Too few samples after warm-up to judge counts as not flat.
        flat: values.len() >= 2 * ends && growth_pct.is_finite() && growth_pct <= margin_pct,
    }
}

/// Least-squares slope of `ys` over `xs`; 0 when `xs` does not vary.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len().min(ys.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// Writes `<out>` (Markdown), `<stem>.json` and `<stem>.svg` next to it.
pub fn write(data: &SoakData, out: &Path) -> anyhow::Result<()> {
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("soak")
        .to_owned();
    let dir = out.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let svg = format!("{stem}.svg");
    plot::draw_time_series(&dir.join(&svg), &panels(data))?;
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(data)?,
    )?;
    let mut text = String::new();
    markdown(data, &svg, &mut text)?;
    std::fs::write(out, text)?;
    Ok(())
}

fn minutes(s: &Sample) -> f64 {
    s.secs / 60.0
}

fn panels(data: &SoakData) -> Vec<TimePanel> {
    let warmup_min = data.options.warmup_minutes;
    let names: Vec<String> = data
        .samples
        .first()
        .map(|s| s.rss.keys().cloned().collect())
        .unwrap_or_default();
    let rss = names
        .iter()
        .map(|name| Curve {
            label: name.clone(),
            points: data
                .samples
                .iter()
                .map(|s| {
                    (
                        minutes(s),
                        s.rss.get(name).copied().unwrap_or(0) as f64 / MIB,
                    )
                })
                .collect(),
        })
        .chain(names.iter().map(|name| {
            Curve {
                label: format!("{name} (anonymous)"),
                points: data
                    .samples
                    .iter()
                    .filter_map(|s| Some((minutes(s), *s.anon.get(name)? as f64 / MIB)))
                    .collect(),
            }
        }))
        .filter(|curve| !curve.points.is_empty())
        .collect();
    let redis = vec![
        Curve {
            label: "used_memory".to_owned(),
            points: data
                .samples
                .iter()
                .map(|s| (minutes(s), s.redis_used_memory as f64 / MIB))
                .collect(),
        },
        Curve {
            label: "ledger (MEMORY USAGE)".to_owned(),
            points: data
                .samples
                .iter()
                .map(|s| (minutes(s), s.ledger_bytes as f64 / MIB))
                .collect(),
        },
    ];
    vec![
        TimePanel {
            title: "RSS of each service".to_owned(),
            y_label: "MiB".to_owned(),
            curves: rss,
            warmup_min,
        },
        TimePanel {
            title: "Redis memory".to_owned(),
            y_label: "MiB".to_owned(),
            curves: redis,
            warmup_min,
        },
    ]
}

fn markdown(data: &SoakData, svg: &str, out: &mut String) -> std::fmt::Result {
    let o = &data.options;
    let m = &data.machine;
    writeln!(out, "# Memory soak\n")?;
    writeln!(
        out,
        "Generated by `{}` on {}: {} streams, each running chats of {} tokens at {} ms per \
         token one after another on its own session, for {} minutes ({} of warm-up).\n",
        data.command,
        data.started,
        o.streams,
        o.tokens_per_chat,
        o.delay_ms,
        o.minutes,
        o.warmup_minutes
    )?;
    if m.tree_dirty {
        writeln!(
            out,
            "> **WARNING: built from a working tree with uncommitted changes on top of `{}`; \
             these figures belong to no commit.**\n",
            m.git_commit
        )?;
    } else {
        writeln!(out, "Built from commit `{}` (clean tree).\n", m.git_commit)?;
    }
    let last = data.samples.last();
    writeln!(
        out,
        "**{}**: every series after warm-up {} within {} % of its level.\n",
        if data.all_flat() { "Flat" } else { "NOT FLAT" },
        if data.all_flat() {
            "stayed"
        } else {
            "did not all stay"
        },
        o.margin_pct
    )?;
    let e = &data.exactness;
    writeln!(
        out,
        "**Counters {}**: {} chats started; the analytics count {} requests and {} finished{}.\n",
        if e.exact() { "exact" } else { "NOT EXACT" },
        e.started,
        e.requests,
        e.finished,
        data.processor_killed_at_secs
            .map_or_else(String::new, |secs| format!(
                ", with one of the two processors killed by SIGKILL at minute {:.1} (in the \
                 warm-up: the judged span is the survivor's alone)",
                secs / 60.0
            ))
    )?;
    writeln!(out, "![Memory over time]({svg})\n")?;
    writeln!(
        out,
        "| series | after warm-up (mean of first {ENDS}) | at the end (mean of last {ENDS}) | growth | growth per chat (least squares) | flat |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for v in &data.verdicts {
        writeln!(
            out,
            "| {} | {:.1} MiB | {:.1} MiB | {:+.2} % | {:+.1} B | {} |",
            v.series,
            v.after_warmup / MIB,
            v.at_end / MIB,
            v.growth_pct,
            v.per_chat,
            if v.flat { "yes" } else { "**no**" }
        )?;
    }
    writeln!(out)?;
    if let Some(last) = last {
        let peak = data
            .samples
            .iter()
            .filter(|s| s.secs >= o.warmup_minutes * 60.0)
            .map(|s| (s.ledger_entries, s.ledger_bytes))
            .max()
            .unwrap_or_default();
        writeln!(
            out,
            "**Exactly-once ledger**: {} ids ({:.1} KiB) at the end, at most {} ids ({:.1} KiB) \
             after warm-up, with {} streams in flight: {:.0} bytes per in-flight request. It \
             holds the records between apply and ack, not the traffic: {} chats completed, \
             {} failed.\n",
            last.ledger_entries,
            last.ledger_bytes as f64 / 1024.0,
            peak.0,
            peak.1 as f64 / 1024.0,
            o.streams,
            peak.1 as f64 / o.streams.max(1) as f64,
            last.chats,
            last.errors
        )?;
    }
    writeln!(out, "## Machine and configuration\n")?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(out, "| CPU | {} × {} |", m.nproc, m.cpu_model)?;
    writeln!(out, "| kernel | {} |", m.kernel)?;
    writeln!(out, "| RAM | {:.1} GiB |", m.ram_gib)?;
    writeln!(out, "| rustc | {} |", m.rustc)?;
    writeln!(out, "| Redis | {} |", m.redis)?;
    writeln!(out, "| source commit | {} |", m.git_commit)?;
    writeln!(out)?;
    writeln!(
        out,
        "Settings that differ from the defaults (retention set short so that its bound is \
         reached during the warm-up):\n\n```toml\n{}```\n",
        data.config
    )?;
    writeln!(out, "## Samples (every minute)\n")?;
    writeln!(
        out,
        "| minute | chats | errors | gateway MiB (anonymous) | producer MiB (anonymous) | processor MiB (anonymous) | Redis MiB | ledger ids |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    let mut next_minute = 0.0;
    for s in &data.samples {
        if minutes(s) + 1e-9 < next_minute {
            continue;
        }
        next_minute = minutes(s).floor() + 1.0;
        let rss = |name: &str| {
            let total = s.rss.get(name).copied().unwrap_or(0) as f64 / MIB;
            match s.anon.get(name) {
                Some(anon) => format!("{total:.1} ({:.1})", *anon as f64 / MIB),
                None => format!("{total:.1}"),
            }
        };
        writeln!(
            out,
            "| {:.1} | {} | {} | {} | {} | {} | {:.1} | {} |",
            minutes(s),
            s.chats,
            s.errors,
            rss("gateway"),
            rss("producer"),
            rss("processor"),
            s.redis_used_memory as f64 / MIB,
            s.ledger_entries
        )?;
    }
    Ok(())
}

/// Where `bench --soak` writes unless told otherwise.
pub fn default_out() -> PathBuf {
    PathBuf::from("bench/results/soak.md")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The takeover of the killed processor's records, and the new level it brings, fall
    /// inside the warm-up, before the first judged sample.
    #[test]
    fn the_processor_is_killed_early_in_the_warm_up() {
        let options = SoakOptions {
            minutes: 30.0,
            warmup_minutes: 5.0,
            streams: 200,
            tokens_per_chat: 100,
            delay_ms: 20,
            margin_pct: 10.0,
            kill_processor: true,
        };
        let kill = kill_at(&options);
        let judged_from = Duration::from_secs_f64(options.warmup_minutes * 60.0);
        assert!(kill + Duration::from_secs(90) <= judged_from, "{kill:?}");
        assert!(
            kill >= Duration::from_secs(60),
            "some load before the kill: {kill:?}"
        );
    }

    #[test]
    fn a_level_series_is_flat_and_a_growing_one_is_not() {
        let chats: Vec<f64> = (0..10).map(f64::from).collect();
        let level: Vec<f64> = vec![100.0; 10];
        let growing: Vec<f64> = (0..10).map(|i| 100.0 + 10.0 * f64::from(i)).collect();
        let flat = verdict("level".to_owned(), &chats, &level, 5.0);
        assert!(flat.flat, "{flat:?}");
        assert!(flat.per_chat.abs() < 1e-9);
        let leak = verdict("leak".to_owned(), &chats, &growing, 5.0);
        assert!(!leak.flat, "{leak:?}");
        assert!((leak.per_chat - 10.0).abs() < 1e-9);
    }

    /// A heap that grows fails the soak even while file pages leave the RSS level, and a
    /// report written before `anon` existed is judged on RSS alone.
    #[test]
    fn anonymous_memory_is_judged_beside_the_rss() {
        let sample = |i: u32, anon: Option<u64>| Sample {
            secs: 60.0 * f64::from(i),
            chats: u64::from(i) * 100,
            errors: 0,
            rss: BTreeMap::from([("gateway".to_owned(), 100 << 20)]),
            anon: anon
                .map(|bytes| BTreeMap::from([("gateway".to_owned(), bytes)]))
                .unwrap_or_default(),
            redis_used_memory: 1 << 20,
            ledger_entries: 0,
            ledger_bytes: 0,
        };
        let options = SoakOptions {
            minutes: 10.0,
            warmup_minutes: 1.0,
            streams: 1,
            tokens_per_chat: 1,
            delay_ms: 1,
            margin_pct: 10.0,
            kill_processor: false,
        };
        let growing: Vec<Sample> = (0..10)
            .map(|i| sample(i, Some((40 + 10 * u64::from(i)) << 20)))
            .collect();
        let verdicts = judge(&growing, &options);
        let flat = |name: &str| verdicts.iter().find(|v| v.series == name).map(|v| v.flat);
        assert_eq!(flat("gateway RSS"), Some(true));
        assert_eq!(flat("gateway anonymous RSS"), Some(false));

        let older: Vec<Sample> = (0..10).map(|i| sample(i, None)).collect();
        let names: Vec<String> = judge(&older, &options)
            .into_iter()
            .map(|v| v.series)
            .collect();
        assert_eq!(names, ["gateway RSS", "Redis used_memory"]);
    }

    #[test]
    fn too_few_samples_are_not_called_flat() {
        let one = verdict("short".to_owned(), &[0.0], &[100.0], 5.0);
        assert!(!one.flat);
    }
}
