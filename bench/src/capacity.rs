//! `bench --capacity` (`make bench-capacity`): the measured figures `docs/capacity.md` plans
//! with, from one command anyone can rerun, written as a Markdown table
//! (`bench/results/capacity.md`): bytes per session-stream entry, Redis commands and Redis
//! time per delivered token, CPU per 10k tokens, Redis connections of the whole system, and
//! gateway memory per idle SSE client.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use fred::types::InfoKind;

use crate::probe;
use crate::run::{IdleMemory, Measurement, PathKind, Runner, Scenario, Watched};
use crate::stack::Stack;

/// The load behind the per-token figures: a few concurrent chats, fast enough to batch.
const CHATS: usize = 10;
const TOKENS_PER_CHAT: usize = 500;
const DELAY_MS: u64 = 2;
const WARMUP_S: u64 = 2;
const WINDOW_S: u64 = 10;

pub fn default_out() -> PathBuf {
    PathBuf::from("bench/results/capacity.md")
}

/// Calls and total microseconds of one command, from `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default)]
struct CommandTime {
    calls: u64,
    usec: u64,
}

async fn command_times(redis: &Client) -> anyhow::Result<BTreeMap<String, CommandTime>> {
    let info: String = redis
        .info(Some(InfoKind::CommandStats))
        .await
        .context("INFO commandstats")?;
    Ok(parse_command_times(&info))
}

fn parse_command_times(info: &str) -> BTreeMap<String, CommandTime> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some((
                name.to_owned(),
                CommandTime {
                    calls: field("calls")?,
                    usec: field("usec")?,
                },
            ))
        })
        .collect()
}

/// The longest session stream in Redis after the load: its memory and length.
async fn stream_memory(redis: &Client) -> anyhow::Result<Option<(String, u64, u64)>> {
    let keys: Vec<String> = redis
        .custom(fred::cmd!("KEYS"), vec!["llm:stream:*"])
        .await
        .context("KEYS llm:stream:*")?;
    let mut longest: Option<(String, u64)> = None;
    for key in keys {
        let len: u64 = redis.xlen(&key).await.context("XLEN")?;
        if longest.as_ref().is_none_or(|(_, l)| len > *l) {
            longest = Some((key, len));
        }
    }
    let Some((key, len)) = longest else {
        return Ok(None);
    };
    let bytes: u64 = redis
        .custom(
            fred::cmd!("MEMORY"),
            vec!["USAGE", key.as_str(), "SAMPLES", "0"],
        )
        .await
        .context("MEMORY USAGE")?;
    Ok(Some((key, bytes, len)))
}

/// Everything one capacity run measured.
pub struct CapacityData {
    machine: probe::Machine,
    command: String,
    started: String,
    load: Measurement,
    /// Redis time per call of the script commands (`evalsha`, `fcall`, …) during the load.
    script_usec: BTreeMap<String, f64>,
    stream: Option<(String, u64, u64)>,
    redis_clients: u64,
    gateway_connections: usize,
    idle: Option<IdleMemory>,
    idle_error: Option<String>,
}

pub async fn run(
    machine: probe::Machine,
    command: String,
    idle_steps: Vec<usize>,
) -> anyhow::Result<CapacityData> {
    let started = probe::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"], None);
    let stack = Stack::start().await?;
    let runner = Runner {
        stack: &stack,
        litellm: None,
        http: crate::client::http_client()?,
        watched: Watched::new(&stack, None),
        ticks_per_sec: probe::clock_ticks_per_sec(),
        run_id: format!("c{}", std::process::id()),
    };
    let scenario = Scenario {
        name: format!("{CHATS}x{TOKENS_PER_CHAT}"),
        streams: CHATS,
        delay_ms: DELAY_MS,
        tokens_per_chat: TOKENS_PER_CHAT,
        warmup: Duration::from_secs(WARMUP_S),
        window: Duration::from_secs(WINDOW_S),
    };
    let before = command_times(&stack.redis_client).await?;
    eprintln!("bench: capacity load {}", scenario.name);
    let load = runner.measure(PathKind::Bridge, &scenario, "cap").await?;
    let after = command_times(&stack.redis_client).await?;
    let script_usec = after
        .iter()
        .filter(|(name, _)| name.starts_with("evalsha") || name.starts_with("fcall"))
        .filter_map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            let calls = a.calls.saturating_sub(b.calls);
            (calls > 0).then(|| {
                (
                    name.clone(),
                    a.usec.saturating_sub(b.usec) as f64 / calls as f64,
                )
            })
        })
        .collect();
    stack.wait_idle(&runner.http, Duration::from_secs(60)).await;
    let stream = stream_memory(&stack.redis_client).await?;
    // Our own INFO client is one of Redis's clients.
    let redis_clients =
        probe::info_field(&stack.redis_client, InfoKind::Clients, "connected_clients")
            .await?
            .parse::<u64>()
            .context("parsing connected_clients")?
            .saturating_sub(1);
    let gateway_connections = probe::connections_to(stack.gateway().pid(), stack.redis_port())?;
    let (idle, idle_error) = if idle_steps.is_empty() {
        (None, None)
    } else {
        eprintln!("bench: capacity idle clients {idle_steps:?}");
        match runner.idle_clients(&idle_steps, "cap").await {
            Ok(idle) => (Some(idle), None),
            Err(error) => (None, Some(format!("{error:#}"))),
        }
    };
    Ok(CapacityData {
        machine,
        command,
        started,
        load,
        script_usec,
        stream,
        redis_clients,
        gateway_connections,
        idle,
        idle_error,
    })
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The Markdown table.
pub fn render(data: &CapacityData) -> String {
    let mut md = String::new();
    let m = &data.machine;
    let _ = writeln!(md, "# Capacity figures (measured)\n");
    if m.tree_dirty {
        let _ = writeln!(
            md,
            "> **Built from a dirty tree** (uncommitted changes on top of `{}`): these figures \
             belong to no commit.\n",
            m.git_rev
        );
    }
    let _ = writeln!(
        md,
        "Written by `{}` (`make bench-capacity`) on {}, commit `{}`; {} × {}, {:.1} GiB, {}, \
         {}; release build. `docs/capacity.md` plans with these figures.\n",
        data.command, data.started, m.git_commit, m.nproc, m.cpu_model, m.ram_gib, m.redis, m.rustc
    );
    let load = &data.load;
    let _ = writeln!(
        md,
        "Load: {CHATS} concurrent chats of {TOKENS_PER_CHAT} tokens at one token per \
         {DELAY_MS} ms on mock-llm, one SSE client each (fresh `redis-server`, one gateway, \
         producer and processor, default config); figures per delivered token over a \
         {WINDOW_S} s window after a {WARMUP_S} s warm-up ({:.0} tokens/s delivered, {} \
         errors).\n",
        load.tokens_per_sec, load.errors
    );
    let _ = writeln!(md, "| what | measured |\n|---|---|");
    match &data.stream {
        Some((key, bytes, len)) => {
            let _ = writeln!(
                md,
                "| session stream memory (`MEMORY USAGE … SAMPLES 0` of the longest stream, \
                 `{key}`: {len} entries) | {} B ≈ **{:.0} B per entry** |",
                thousands(*bytes),
                *bytes as f64 / (*len).max(1) as f64
            );
        }
        None => {
            let _ = writeln!(md, "| session stream memory | no stream found |");
        }
    }
    if let Some(total) = load.redis_commands_per_token {
        let _ = writeln!(
            md,
            "| Redis commands per delivered token (`INFO commandstats`, script-internal calls \
             included) | **{total:.2}** |"
        );
    }
    if let Some(sent) = load.sent_commands_per_token {
        let _ = writeln!(
            md,
            "| of which sent by the services (round trips; `MONITOR` share of a 1 s sample) | \
             {sent:.2} |"
        );
    }
    let mut by_command: Vec<(&String, &f64)> = load.redis_commands.iter().collect();
    by_command.sort_by(|a, b| b.1.total_cmp(a.1));
    for (name, per_token) in by_command.into_iter().filter(|(_, v)| **v >= 0.005) {
        let _ = writeln!(md, "| — `{name}` per token | {per_token:.3} |");
    }
    for (name, usec) in &data.script_usec {
        let _ = writeln!(
            md,
            "| Redis time per `{name}` call (`usec_per_call` over the load) | ≈ {usec:.1} µs |"
        );
    }
    for service in ["gateway", "producer", "processor", "redis"] {
        if let Some(cpu) = load.cpu_per_10k.get(service) {
            let _ = writeln!(md, "| {service} CPU-s per 10k tokens | {cpu:.3} |");
        }
    }
    let _ = writeln!(
        md,
        "| Redis connections of the whole system (after the load) | {} (gateway {}) |",
        data.redis_clients, data.gateway_connections
    );
    match (&data.idle, &data.idle_error) {
        (Some(idle), _) => {
            for point in &idle.points {
                let _ = writeln!(
                    md,
                    "| gateway memory per idle SSE client at {} clients (RSS growth of a fresh \
                     gateway) | **{:.1} KiB** (Redis connections: {}) |",
                    thousands(point.clients as u64),
                    point.bytes_per_client / 1024.0,
                    point.gateway_redis_connections
                );
            }
        }
        (None, Some(error)) => {
            let _ = writeln!(
                md,
                "| gateway memory per idle SSE client | failed: {error} |"
            );
        }
        (None, None) => {}
    }
    md
}

pub fn write(data: &CapacityData, out: &Path) -> anyhow::Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, render(data)).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_times_are_parsed() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=4,usec=72,usec_per_call=18.00,\
                    rejected_calls=0,failed_calls=0\r\ncmdstat_xread:calls=2,usec=10\r\n";
        let times = parse_command_times(info);
        assert_eq!(times["evalsha"].calls, 4);
        assert_eq!(times["evalsha"].usec, 72);
        assert_eq!(times["xread"].usec, 10);
        assert_eq!(thousands(47_372), "47,372");
        assert_eq!(thousands(12), "12");
    }
}
