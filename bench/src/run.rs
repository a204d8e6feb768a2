//! One measurement: a load on one path, sampled over a window after a warm-up: tokens/s,
//! latency percentiles, CPU per service, Redis commands per token. Also the two measurements
//! that are not streaming loads: `redis-benchmark`'s XADD rate and gateway memory per idle
//! SSE client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::client::{self, Counters, Load, Target};
use crate::probe;
use crate::stack::{LiteLlm, Stack};
use crate::stats::Percentiles;

/// Which way the tokens go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PathKind {
    /// The client streams from mock-llm directly: the floor every path pays.
    Baseline,
    /// mock-llm → producer → Redis → gateway → SSE client.
    Bridge,
    /// mock-llm → LiteLLM proxy → client.
    LiteLlm,
}

impl PathKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Baseline => "baseline (direct)",
            Self::Bridge => "bridge",
            Self::LiteLlm => "LiteLLM",
        }
    }
}

/// A row of the matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub streams: usize,
    pub delay_ms: u64,
    pub tokens_per_chat: usize,
    pub warmup: Duration,
    pub window: Duration,
}

impl Scenario {
    /// `streams × rate` for paced loads, `streams × max` for unpaced ones.
    pub fn rate_label(&self) -> String {
        match 1000_u64.checked_div(self.delay_ms) {
            Some(rate) => format!("{rate} tok/s"),
            None => "unpaced".to_owned(),
        }
    }

    pub fn load(&self) -> Load {
        Load {
            delay_ms: self.delay_ms,
            tokens_per_chat: self.tokens_per_chat,
        }
    }
}

/// The figures of one measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub path: PathKind,
    pub scenario: String,
    pub tokens_per_sec: f64,
    pub token_latency: Option<Percentiles>,
    pub ttft: Option<Percentiles>,
    /// CPU seconds per 10k delivered tokens, per process (`gateway`, `redis`, `bench`, …).
    pub cpu_per_10k: BTreeMap<String, f64>,
    /// Redis commands per delivered token (our own `INFO` excluded); `None` off the bridge.
    pub redis_commands_per_token: Option<f64>,
    /// The same by command.
    pub redis_commands: BTreeMap<String, f64>,
    /// Of those, the commands the services sent (round trips), not the ones their scripts ran:
    /// the total scaled by the share `MONITOR` saw sent during the last second of warm-up.
    pub sent_commands_per_token: Option<f64>,
    /// The `MONITOR` sample behind it.
    pub monitor: Option<probe::MonitorSample>,
    /// Gateway connections to Redis in the middle of the window.
    pub gateway_redis_connections: Option<usize>,
    pub chats: u64,
    pub errors: u64,
    /// Chats of the window with a gap over `client::STALL_GAP` between two tokens.
    #[serde(default)]
    pub stalled: u64,
    pub unstamped: u64,
    /// Whether the load drained before the next measurement (else it was cut short).
    pub drained: bool,
}

/// What the runner samples at the start and end of the window.
struct Snapshot {
    at: Instant,
    tokens: u64,
    cpu_ticks: BTreeMap<String, u64>,
    commands: BTreeMap<String, u64>,
}

/// Processes whose CPU is accounted, by name.
pub struct Watched {
    pub pids: Vec<(String, u32)>,
    /// Processes sampled with their descendants (LiteLLM).
    pub trees: Vec<(String, u32)>,
}

impl Watched {
    pub fn new(stack: &Stack, litellm: Option<&LiteLlm>) -> Self {
        let mut pids: Vec<(String, u32)> = stack
            .bridge_pids()
            .iter()
            .map(|(name, pid)| ((*name).to_owned(), *pid))
            .collect();
        pids.push(("mock-llm".to_owned(), stack.mock_llm().pid()));
        pids.push(("redis".to_owned(), stack.redis_pid));
        pids.push(("bench".to_owned(), std::process::id()));
        let trees = litellm
            .map(|l| vec![("litellm".to_owned(), l.service.pid())])
            .unwrap_or_default();
        Self { pids, trees }
    }

    fn ticks(&self) -> BTreeMap<String, u64> {
        let mut ticks = BTreeMap::new();
        for (name, pid) in &self.pids {
            ticks.insert(name.clone(), probe::cpu_ticks(*pid).unwrap_or(0));
        }
        for (name, pid) in &self.trees {
            ticks.insert(name.clone(), probe::tree_cpu_ticks(*pid).unwrap_or(0));
        }
        ticks
    }
}

/// Shared context of every measurement in a run.
pub struct Runner<'a> {
    pub stack: &'a Stack,
    pub litellm: Option<&'a LiteLlm>,
    pub http: reqwest::Client,
    pub watched: Watched,
    pub ticks_per_sec: f64,
    /// Distinguishes sessions of different measurements.
    pub run_id: String,
}

impl Runner<'_> {
    fn target(&self, path: PathKind) -> anyhow::Result<Target> {
        Ok(match path {
            PathKind::Bridge => Target::Bridge {
                gateway: self.stack.gateway().url(),
            },
            PathKind::Baseline => Target::OpenAi {
                base: self.stack.mock_llm().url(),
                model: "mock".to_owned(),
                key: "unused".to_owned(),
            },
            PathKind::LiteLlm => {
                let litellm = self.litellm.context("LiteLLM is not running")?;
                Target::OpenAi {
                    base: litellm.service.url(),
                    model: "mock".to_owned(),
                    key: litellm.key.clone(),
                }
            }
        })
    }

    async fn snapshot(&self, counters: &Counters) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            at: Instant::now(),
            tokens: counters.tokens.load(Ordering::Relaxed),
            cpu_ticks: self.watched.ticks(),
            commands: probe::command_calls(&self.stack.redis_client).await?,
        })
    }

    /// Runs `scenario` on `path` and measures its window.
    pub async fn measure(
        &self,
        path: PathKind,
        scenario: &Scenario,
        tag: &str,
    ) -> anyhow::Result<Measurement> {
        // Start from a quiet system: nothing left streaming from the previous measurement.
        if !self
            .stack
            .wait_idle(&self.http, Duration::from_secs(60))
            .await
        {
            eprintln!("bench: mock-llm still streaming before {}", scenario.name);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let target = self.target(path)?;
        let counters = Arc::new(Counters::default());
        let load = scenario.load();
        // Spread the first requests over half the warm-up, so the start is not one burst; the
        // first chats' lengths are spread too (`first_chat`), so chats keep ending and starting
        // evenly through the window.
        let stagger = scenario.warmup / 2;
        let mut loops = JoinSet::new();
        let run = format!("{}{tag}", self.run_id);
        for stream in 0..scenario.streams {
            let delay = stagger.mul_f64(stream as f64 / scenario.streams.max(1) as f64);
            loops.spawn(client::chat_loop(
                self.http.clone(),
                target.clone(),
                run.clone(),
                stream,
                client::first_chat(load, stream, scenario.streams),
                load,
                delay,
                Arc::clone(&counters),
            ));
        }

        tokio::time::sleep(scenario.warmup).await;
        // What share of Redis's commands the services send themselves (the rest run inside
        // their scripts): sampled before the window, since MONITOR slows Redis down.
        let monitor = if path == PathKind::Bridge {
            Some(probe::monitor(self.stack.redis_port(), Duration::from_secs(1)).await?)
        } else {
            None
        };
        let start = self.snapshot(&counters).await?;
        counters.recording.store(true, Ordering::Relaxed);
        tokio::time::sleep(scenario.window / 2).await;
        let gateway_redis_connections = (path == PathKind::Bridge)
            .then(|| probe::connections_to(self.stack.gateway().pid(), self.stack.redis_port()))
            .transpose()?;
        tokio::time::sleep(scenario.window - scenario.window / 2).await;
        counters.recording.store(false, Ordering::Relaxed);
        let end = self.snapshot(&counters).await?;
        counters.stop.store(true, Ordering::Relaxed);

        // Running chats end at their next token (bridge chats are cancelled through the API,
        // since generation outlives a client that leaves); past a generous bound, they are cut
        // off.
        let tail = Duration::from_secs(30) + Duration::from_millis(scenario.delay_ms * 10);
        let drained =
            tokio::time::timeout(tail, async { while loops.join_next().await.is_some() {} })
                .await
                .is_ok();
        loops.abort_all();
        while loops.join_next().await.is_some() {}

        let mut samples = std::mem::take(
            &mut *counters
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let seconds = end.at.duration_since(start.at).as_secs_f64();
        let tokens = end.tokens.saturating_sub(start.tokens);
        let (tokens_f, per_10k) = {
            let tokens_f = tokens as f64;
            (tokens_f, 10_000.0 / tokens_f.max(1.0))
        };
        let mut cpu_per_10k = BTreeMap::new();
        for (name, after) in &end.cpu_ticks {
            let before = start.cpu_ticks.get(name).copied().unwrap_or(0);
            let seconds_used = after.saturating_sub(before) as f64 / self.ticks_per_sec;
            cpu_per_10k.insert(name.clone(), seconds_used * per_10k);
        }
        let mut redis_commands = BTreeMap::new();
        let mut total_commands = 0_u64;
        for (name, after) in &end.commands {
            if name == "info" {
                continue;
            }
            let calls = after.saturating_sub(start.commands.get(name).copied().unwrap_or(0));
            if calls > 0 {
                total_commands += calls;
                redis_commands.insert(name.clone(), calls as f64 / tokens_f.max(1.0));
            }
        }
        let on_bridge = path == PathKind::Bridge;
        let redis_commands_per_token = on_bridge.then(|| total_commands as f64 / tokens_f.max(1.0));
        let sent_commands_per_token = match (&monitor, redis_commands_per_token) {
            (Some(sample), Some(total)) if sample.sent + sample.in_scripts > 0 => {
                Some(total * sample.sent as f64 / (sample.sent + sample.in_scripts) as f64)
            }
            _ => None,
        };
        Ok(Measurement {
            path,
            scenario: scenario.name.clone(),
            tokens_per_sec: tokens_f / seconds.max(f64::EPSILON),
            token_latency: Percentiles::of(&mut samples.token_us),
            ttft: Percentiles::of(&mut samples.ttft_us),
            cpu_per_10k,
            redis_commands_per_token,
            redis_commands: if on_bridge {
                redis_commands
            } else {
                BTreeMap::new()
            },
            sent_commands_per_token,
            monitor,
            gateway_redis_connections,
            chats: counters.chats.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            stalled: counters.stalled.load(Ordering::Relaxed),
            unstamped: counters.unstamped.load(Ordering::Relaxed),
            drained,
        })
    }

    /// Gateway RSS and Redis connections with 0, then each of `steps` idle SSE clients open,
    /// on a gateway started for this measurement (a gateway that carried the streaming loads
    /// keeps their memory in its allocator and would show too little per client).
    pub async fn idle_clients(&self, steps: &[usize], tag: &str) -> anyhow::Result<IdleMemory> {
        self.stack
            .wait_idle(&self.http, Duration::from_secs(60))
            .await;
        let gateway = self
            .stack
            .spawn_gateway(&format!("gateway-idle-{tag}"))
            .await?;
        let gateway_pid = gateway.pid();
        let redis_port = self.stack.redis_port();
        // One client through the fresh gateway first, so lazily built state (pools, the
        // reader's first read) is not counted per client.
        let warm = client::open_idle(
            &self.http,
            &gateway.url(),
            &format!("{}{tag}warm", self.run_id),
            0..1,
        )
        .await
        .context("opening the warm-up client")?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let base_rss = probe::rss_bytes(gateway_pid)?;
        let base_connections = probe::connections_to(gateway_pid, redis_port)?;
        let mut open = Vec::new();
        let mut points = Vec::new();
        let prefix = format!("{}{tag}idle", self.run_id);
        let started = Instant::now();
        for &count in steps {
            let more = client::open_idle(&self.http, &gateway.url(), &prefix, open.len()..count)
                .await
                .with_context(|| format!("opening {count} idle SSE clients"))?;
            open.extend(more);
            if open.len() != count {
                bail!("opened {} idle clients instead of {count}", open.len());
            }
            // Let the delivery tasks settle (subscriptions, registry heartbeats).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss = probe::rss_bytes(gateway_pid)?;
            let per_client = rss.saturating_sub(base_rss) as f64 / count as f64;
            points.push(IdlePoint {
                clients: count,
                gateway_rss: rss,
                bytes_per_client: per_client,
                gateway_redis_connections: probe::connections_to(gateway_pid, redis_port)?,
            });
        }
        let open_secs = started.elapsed().as_secs_f64();
        drop(open);
        drop(warm);
        drop(gateway);
        Ok(IdleMemory {
            base_rss,
            base_connections,
            points,
            open_secs,
        })
    }
}

/// Gateway memory with idle clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleMemory {
    pub base_rss: u64,
    pub base_connections: usize,
    pub points: Vec<IdlePoint>,
    /// Time to open all clients (stream token + SSE request each).
    pub open_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdlePoint {
    pub clients: usize,
    pub gateway_rss: u64,
    pub bytes_per_client: f64,
    pub gateway_redis_connections: usize,
}

/// `redis-benchmark`'s XADD rate on the stack's Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XaddReference {
    /// One command per round trip, 50 clients.
    pub plain: f64,
    /// 16 commands pipelined per round trip, 50 clients.
    pub pipelined: f64,
    pub command: String,
}

pub async fn xadd_reference(stack: &Stack, requests: u64) -> anyhow::Result<XaddReference> {
    let port = stack.redis_port().to_string();
    let key = "bench:xadd-reference";
    let command_args = [
        "XADD",
        key,
        "MAXLEN",
        "~",
        "10000",
        "*",
        "content",
        " the|1700000000000000",
    ];
    let rate = |pipeline: &'static str| {
        let port = port.clone();
        let requests = requests.to_string();
        async move {
            let output = tokio::process::Command::new("redis-benchmark")
                .args(["-h", "127.0.0.1", "-p", &port, "-c", "50", "-n", &requests])
                .args(["-P", pipeline, "--csv"])
                .args(command_args)
                .kill_on_drop(true)
                .output()
                .await
                .context("running redis-benchmark (apt-get install redis-tools)")?;
            if !output.status.success() {
                bail!(
                    "redis-benchmark failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            parse_benchmark_csv(&String::from_utf8_lossy(&output.stdout))
        }
    };
    let plain = rate("1").await?;
    let pipelined = rate("16").await?;
    let _: i64 = fred::interfaces::KeysInterface::del(&stack.redis_client, key).await?;
    Ok(XaddReference {
        plain,
        pipelined,
        command: format!(
            "redis-benchmark -c 50 -n {requests} -P 1|16 {}",
            command_args.join(" ")
        ),
    })
}

/// The requests/s of the single test in `redis-benchmark --csv` output.
fn parse_benchmark_csv(csv: &str) -> anyhow::Result<f64> {
    csv.lines()
        .filter(|line| !line.starts_with("\"test\""))
        .find_map(|line| {
            line.split(',')
                .nth(1)
                .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
        })
        .with_context(|| format!("no rate in redis-benchmark output: {csv}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_csv_rate() -> anyhow::Result<()> {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"XADD bench:x MAXLEN ~ 10000 * c v\",\"84388.19\",\"0.5\"\n";
        assert!((parse_benchmark_csv(csv)? - 84388.19).abs() < 1e-6);
        assert!(parse_benchmark_csv("").is_err());
        Ok(())
    }
}
