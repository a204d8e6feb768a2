//! `bench [--quick] [--peers] [--repeats N] [--out FILE.md] …` (all flags: `bench --help`):
//! starts the whole stack (release binaries next to this one) on mock-llm and measures the
//! bridge against a direct baseline (and LiteLLM with `--peers`) in the same run; writes a
//! Markdown report, its JSON data and SVG plots. `make bench`, `make bench-quick` and
//! `make bench-peers` run it through `scripts/bench.sh`.

mod capacity;
mod client;
mod plot;
mod probe;
mod report;
mod run;
mod soak;
mod stack;
mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::report::{Repeat, RunData};
use crate::run::{PathKind, Runner, Scenario, Watched};
use crate::stack::{LiteLlm, Stack};

struct Options {
    quick: bool,
    peers: bool,
    repeats: usize,
    out: PathBuf,
    notes: Option<PathBuf>,
    litellm_venv: Option<PathBuf>,
    /// `--only a,b`: run just these scenarios (tuning experiments, smoke tests).
    only: Option<Vec<String>>,
    /// `--idle 1000,10000`: idle-client steps; `--idle 0` skips the step.
    idle: Option<Vec<usize>>,
    /// `--render FILE.json`: no measuring; writes the report of an earlier run's data again
    /// (after a change to the report or the notes).
    render: Option<PathBuf>,
    /// With `--render`: take the idle-client figures from this other run's data instead.
    idle_from: Option<PathBuf>,
    /// `--soak`: the memory soak instead of the matrix.
    soak: Option<soak::SoakOptions>,
    /// `--capacity`: the figures of `docs/capacity.md` instead of the matrix.
    capacity: bool,
    /// `--readme FILE.md`: also write the report's headline table between the markers
    /// [`report::README_START`] and [`report::README_END`] of that file.
    readme: Option<PathBuf>,
}

/// The command line (`bench --help`); every flag that `scripts/bench.sh` passes.
#[derive(Debug, clap::Parser)]
#[command(
    name = "bench",
    version,
    about = "Load generator: starts the whole stack (release binaries next to this one) on \
             mock-llm and measures the bridge against a direct baseline in the same run.",
    // A flag given twice takes its last value, as the hand-written parser did.
    args_override_self = true,
    after_help = ENV_HELP,
)]
struct Args {
    /// The short matrix, one repeat: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Also measure a LiteLLM proxy on the same mock-llm.
    #[arg(long)]
    peers: bool,
    /// Repeats of the whole matrix [default: 3, or 1 with --quick].
    #[arg(long, value_name = "N")]
    repeats: Option<usize>,
    /// Report path [default: bench/results/bench.md, peers.md or quick/quick.md].
    #[arg(long, value_name = "FILE.md")]
    out: Option<PathBuf>,
    /// Markdown notes included in the report, if the file exists.
    #[arg(long, value_name = "FILE.md")]
    notes: Option<PathBuf>,
    /// Python venv with LiteLLM [default: ~/.cache/llm-bridge/venv-litellm].
    #[arg(long, value_name = "DIR")]
    litellm_venv: Option<PathBuf>,
    /// Run just these scenarios (comma-separated names), or a paced load the matrix does not
    /// have: STREAMSxRATE[:WINDOW_SECONDS], e.g. 20x20 (20 streams at 20 tokens/s) or 20x20:60.
    #[arg(long, value_name = "S1,S2", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Idle-client steps (comma-separated counts); `--idle 0` skips the step.
    #[arg(long, value_name = "N1,N2", value_delimiter = ',', value_parser = parse_count)]
    idle: Option<Vec<usize>>,
    /// Measure nothing: write the report of an earlier run's data again.
    #[arg(long, value_name = "FILE.json")]
    render: Option<PathBuf>,
    /// With --render: take the idle-client figures from this other run's data.
    #[arg(long, value_name = "FILE.json")]
    idle_from: Option<PathBuf>,
    /// The memory soak instead of the matrix: a steady load for --minutes, RSS of every
    /// service and Redis memory sampled; fails when one grows past --margin-pct after the
    /// warm-up [report: bench/results/soak.md].
    #[arg(long)]
    soak: bool,
    /// Soak: length of the run in minutes.
    #[arg(long, default_value_t = 30.0, requires = "soak")]
    minutes: f64,
    /// Soak: minutes of warm-up before the series are judged.
    #[arg(long, default_value_t = 5.0, requires = "soak")]
    warmup_minutes: f64,
    /// Soak: concurrent streams.
    #[arg(long, default_value_t = 200, requires = "soak")]
    streams: usize,
    /// Soak: tokens per chat.
    #[arg(long, default_value_t = 100, requires = "soak")]
    tokens: usize,
    /// Soak: mock-llm's delay per token, ms.
    #[arg(long, default_value_t = 20, requires = "soak")]
    delay_ms: u64,
    /// Soak: allowed growth of each series after warm-up, percent.
    #[arg(long, default_value_t = 10.0, requires = "soak")]
    margin_pct: f64,
    /// Soak: keep both processors alive (by default the second is killed halfway through the warm-up).
    #[arg(long, requires = "soak")]
    no_kill: bool,
    /// The figures `docs/capacity.md` plans with instead of the matrix: bytes per stream
    /// entry, Redis commands and time per token, connections, memory per idle SSE client
    /// (--idle, default 1000,10000) [report: bench/results/capacity.md].
    #[arg(long, conflicts_with_all = ["soak", "peers", "quick"])]
    capacity: bool,
    /// Also write the report's headline table into this file (the README), replacing what
    /// stands between `<!-- bench-headline:start -->` and `<!-- bench-headline:end -->`.
    #[arg(long, value_name = "FILE.md", conflicts_with_all = ["soak", "capacity"])]
    readme: Option<PathBuf>,
}

/// The bench has no settings file of its own: it writes one for the stack it starts.
const ENV_HELP: &str = "\
The services it starts read a settings file the bench writes. They inherit its environment,
so BRIDGE__SECTION__KEY variables (e.g. BRIDGE__PRODUCER__TOKEN_COALESCE_MS=5) override that
file, as for any service started with --config.";

fn parse_count(value: &str) -> Result<usize, String> {
    value.trim().parse().map_err(|error| format!("{error}"))
}

/// Parses the command line; `--help`/`--version` exit 0, a wrong argument prints the usage and
/// exits 2.
fn parse_args() -> Options {
    let args = <Args as clap::Parser>::parse();
    let soak = args.soak.then(|| soak::SoakOptions {
        minutes: args.minutes,
        warmup_minutes: args.warmup_minutes,
        streams: args.streams.max(1),
        tokens_per_chat: args.tokens.max(2),
        delay_ms: args.delay_ms,
        margin_pct: args.margin_pct,
        kill_processor: !args.no_kill,
    });
    let out = args.out.unwrap_or_else(|| {
        if soak.is_some() {
            return soak::default_out();
        }
        if args.capacity {
            return capacity::default_out();
        }
        PathBuf::from(match (args.quick, args.peers) {
            (true, _) => "bench/results/quick/quick.md",
            (false, true) => "bench/results/peers.md",
            (false, false) => "bench/results/bench.md",
        })
    });
    Options {
        quick: args.quick,
        peers: args.peers,
        repeats: args
            .repeats
            .unwrap_or(if args.quick { 1 } else { 3 })
            .max(1),
        out,
        notes: args.notes,
        litellm_venv: args.litellm_venv.or_else(LiteLlm::default_venv),
        only: args.only,
        idle: args
            .idle
            .map(|steps| steps.into_iter().filter(|&n| n > 0).collect()),
        render: args.render,
        idle_from: args.idle_from,
        soak,
        capacity: args.capacity,
        readme: args.readme,
    }
}

fn scenario(
    name: &str,
    streams: usize,
    delay_ms: u64,
    tokens_per_chat: usize,
    warmup_s: u64,
    window_s: u64,
) -> Scenario {
    Scenario {
        name: name.to_owned(),
        streams,
        delay_ms,
        tokens_per_chat,
        warmup: Duration::from_secs(warmup_s),
        window: Duration::from_secs(window_s),
    }
}

/// The matrix: paced streams at 50 and 20 tokens/s (delay 20 / 50 ms) with chats of about
/// 10 s, unpaced streams for throughput, and short chats for time to first token.
fn matrix(quick: bool) -> Vec<Scenario> {
    if quick {
        return vec![
            scenario(report::TTFT, 1, 20, 4, 1, 4),
            scenario(report::ONE_STREAM, 1, 20, 500, 1, 6),
            scenario("100x50", 100, 20, 500, 2, 5),
            scenario(report::MANY, 1000, 50, 200, 3, 5),
            scenario(report::UNPACED, 100, 0, 500, 2, 5),
        ];
    }
    vec![
        scenario(report::TTFT, 1, 20, 4, 2, 15),
        scenario(report::ONE_STREAM, 1, 20, 500, 2, 20),
        scenario("1x20", 1, 50, 200, 2, 10),
        scenario("100x50", 100, 20, 500, 3, 10),
        scenario("100x20", 100, 50, 200, 3, 10),
        scenario(report::MID, 200, 20, 500, 3, 10),
        scenario(report::MANY, 1000, 50, 200, 4, 10),
        scenario("1000x50", 1000, 20, 500, 4, 10),
        scenario(report::COMPARISON, 512, 20, 64, 3, 10),
        scenario("max-10", 10, 0, 500, 2, 8),
        scenario(report::UNPACED, 100, 0, 500, 2, 8),
        scenario("max-1000", 1000, 0, 500, 3, 8),
    ]
}

/// `--only 20x20` or `20x20:60`: a paced load the matrix does not have, `streams` streams at
/// `rate` tokens/s each, chats of about 10 s, 3 s of warm-up and a window of 10 s (or the
/// seconds given), for experiments such as `scripts/callgrind.sh`.
fn ad_hoc(name: &str) -> Option<Scenario> {
    let (load, window_s) = match name.split_once(':') {
        Some((load, window)) => (load, window.parse().ok()?),
        None => (name, 10),
    };
    let (streams, rate) = load.split_once('x')?;
    let streams: usize = streams.parse().ok()?;
    let rate: u64 = rate.parse().ok()?;
    if streams == 0 || window_s == 0 || !(1..=1000).contains(&rate) {
        return None;
    }
    let tokens_per_chat = usize::try_from(rate * 10).ok()?;
    Some(scenario(
        name,
        streams,
        1000 / rate,
        tokens_per_chat,
        3,
        window_s,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_args();
    let notes = match &options.notes {
        Some(path) if path.is_file() => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        _ => None,
    };
    if let Some(json) = &options.render {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let mut data: RunData = serde_json::from_str(&text).context("parsing the run data")?;
        if let Some(other) = &options.idle_from {
            let text = std::fs::read_to_string(other)
                .with_context(|| format!("reading {}", other.display()))?;
            let other_data: RunData =
                serde_json::from_str(&text).context("parsing the idle run's data")?;
            let mut idle = other_data.repeats.into_iter().map(|r| r.idle);
            for repeat in &mut data.repeats {
                repeat.idle = idle.next().flatten();
            }
            data.idle_source = Some(format!(
                "`{}` ({}, started {}, load before {})",
                other.display(),
                other_data.command,
                other_data.started,
                other_data.load_before
            ));
        }
        let out = json.with_extension("md");
        report::write(&data, &out, notes.as_deref())?;
        announce(&out);
        if let Some(readme) = &options.readme {
            report::write_readme_headline(&data, &out, readme)?;
            announce(readme);
        }
        return Ok(());
    }
    let begun = Instant::now();
    let repo = std::env::current_dir().context("reading the current directory")?;
    let machine = probe::Machine::describe(&repo);
    if let Some(soak_options) = options.soak {
        let data = soak::run(soak_options, machine, command_line()).await?;
        soak::write(&data, &options.out)?;
        announce(&options.out);
        if !data.passed() {
            bail!(
                "memory grew past the margin after warm-up, or the counters are not exact; see {}",
                options.out.display()
            );
        }
        return Ok(());
    }
    if options.capacity {
        let steps = options.idle.clone().unwrap_or_else(|| vec![1_000, 10_000]);
        let data = capacity::run(machine, command_line(), steps).await?;
        capacity::write(&data, &options.out)?;
        announce(&options.out);
        return Ok(());
    }
    let load_before = probe::load_average();
    let started = probe::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"], None);
    eprintln!("bench: load average {load_before}; starting the stack");

    let stack = Stack::start().await?;
    let (litellm, litellm_error) = if options.peers {
        match &options.litellm_venv {
            Some(venv) => match LiteLlm::start(venv, stack.mock_llm().port).await {
                Ok(l) => (Some(l), None),
                Err(error) => {
                    eprintln!("bench: LiteLLM could not start: {error:#}");
                    (None, Some(format!("{error:#}")))
                }
            },
            None => (None, Some("no venv path (HOME unset)".to_owned())),
        }
    } else {
        (None, None)
    };
    let mut paths = vec![PathKind::Baseline, PathKind::Bridge];
    if litellm.is_some() {
        paths.push(PathKind::LiteLlm);
    }
    let runner = Runner {
        stack: &stack,
        litellm: litellm.as_ref(),
        http: client::http_client()?,
        watched: Watched::new(&stack, litellm.as_ref()),
        ticks_per_sec: probe::clock_ticks_per_sec(),
        run_id: format!("b{}", std::process::id()),
    };
    let mut scenarios = matrix(options.quick);
    if let Some(only) = &options.only {
        scenarios.retain(|s| only.contains(&s.name));
        for name in only {
            if scenarios.iter().any(|s| &s.name == name) {
                continue;
            }
            match ad_hoc(name) {
                Some(scenario) => scenarios.push(scenario),
                None => bail!(
                    "--only {name}: not a scenario of this mode, nor a paced load \
                     STREAMSxRATE[:WINDOW_SECONDS] (e.g. 20x20 or 20x20:60)"
                ),
            }
        }
    }
    let idle_steps = options.idle.clone().unwrap_or_else(|| {
        if options.quick {
            vec![1_000]
        } else {
            vec![1_000, 10_000]
        }
    });
    let mut repeats = Vec::new();
    for repeat in 0..options.repeats {
        let tag = format!("r{repeat}");
        eprintln!("bench: repeat {}/{}", repeat + 1, options.repeats);
        let xadd =
            match run::xadd_reference(&stack, if options.quick { 50_000 } else { 200_000 }).await {
                Ok(x) => Some(x),
                Err(error) => {
                    eprintln!("bench: redis-benchmark reference failed: {error:#}");
                    None
                }
            };
        let mut measurements = Vec::new();
        for scenario in &scenarios {
            for &path in &paths {
                let m = runner
                    .measure(path, scenario, &tag)
                    .await
                    .with_context(|| format!("{} on {}", scenario.name, path.label()))?;
                eprintln!(
                    "bench:   {:>9} {:<18} {:>8.0} tok/s  p50 {:>8.3} ms  p99 {:>8.3} ms  ttft p50 {:>8.3} ms  errors {}",
                    scenario.name,
                    path.label(),
                    m.tokens_per_sec,
                    m.token_latency.map_or(f64::NAN, |p| p.p50_us / 1000.0),
                    m.token_latency.map_or(f64::NAN, |p| p.p99_us / 1000.0),
                    m.ttft.map_or(f64::NAN, |p| p.p50_us / 1000.0),
                    m.errors,
                );
                measurements.push(m);
            }
        }
        let idle = if idle_steps.is_empty() {
            None
        } else {
            match runner.idle_clients(&idle_steps, &tag).await {
                Ok(idle) => {
                    for p in &idle.points {
                        eprintln!(
                            "bench:   {} idle clients: {:.2} KiB per client, {} Redis connections",
                            p.clients,
                            p.bytes_per_client / 1024.0,
                            p.gateway_redis_connections
                        );
                    }
                    Some(idle)
                }
                Err(error) => {
                    eprintln!("bench: idle clients failed: {error:#}");
                    None
                }
            }
        };
        repeats.push(Repeat {
            measurements,
            xadd,
            idle,
        });
    }

    let env_overrides = std::env::vars()
        .filter(|(k, _)| k.starts_with("BRIDGE__"))
        .collect();
    let data = RunData {
        mode: match (options.quick, litellm.is_some() || options.peers) {
            (true, _) => "quick".to_owned(),
            (false, true) => "full, with LiteLLM".to_owned(),
            (false, false) => "full".to_owned(),
        },
        command: command_line(),
        started,
        duration_secs: begun.elapsed().as_secs_f64(),
        load_before,
        load_after: probe::load_average(),
        machine,
        config: stack.config.clone(),
        env_overrides,
        litellm: litellm.as_ref().map(|l| report::LiteLlmInfo {
            version: l.version.clone(),
            config: l.config.clone(),
        }),
        litellm_error,
        idle_source: None,
        scenarios,
        paths,
        repeats,
    };
    report::write(&data, &options.out, notes.as_deref())?;
    announce(&options.out);
    if let Some(readme) = &options.readme {
        report::write_readme_headline(&data, &options.out, readme)?;
        announce(readme);
    }
    Ok(())
}

/// How this run was invoked, for the report.
fn command_line() -> String {
    std::iter::once("bench".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

#[expect(
    clippy::print_stdout,
    reason = "the report's path is the program's output"
)]
fn announce(out: &std::path::Path) {
    println!("{}", out.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ad_hoc_load_is_streams_at_a_rate_with_an_optional_window() -> anyhow::Result<()> {
        let scenario = ad_hoc("20x20").context("20x20 is a paced load")?;
        assert_eq!(
            (
                scenario.streams,
                scenario.delay_ms,
                scenario.tokens_per_chat
            ),
            (20, 50, 200)
        );
        assert_eq!(scenario.window, Duration::from_secs(10));
        let scenario = ad_hoc("3x50:80").context("3x50:80 is a paced load")?;
        assert_eq!((scenario.streams, scenario.delay_ms), (3, 20));
        assert_eq!(scenario.window, Duration::from_secs(80));
        assert_eq!(scenario.name, "3x50:80");
        for wrong in [
            "max-100", "20x", "x20", "0x20", "20x0", "20x2000", "20x20:0", "20x20:s",
        ] {
            assert!(ad_hoc(wrong).is_none(), "{wrong}");
        }
        Ok(())
    }
}
