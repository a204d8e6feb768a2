//! The Markdown report of a run: headline figures against the targets of the benchmark issue,
//! the machine and configuration, every figure per scenario and path with min/median/max over
//! the repeats, and the plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use serde::{Deserialize, Serialize};

use crate::plot::{self, Line, Panel};
use crate::probe::Machine;
use crate::run::{IdleMemory, Measurement, PathKind, Scenario, XaddReference};
use crate::stats::{Spread, show};

/// Which commit the figures belong to, first; a dirty tree is said where nobody can miss it.
fn provenance(m: &Machine, out: &mut String) -> std::fmt::Result {
    if m.tree_dirty {
        writeln!(
            out,
            "> **WARNING: this run was built from a working tree with uncommitted changes on top \
             of `{}`. Its figures belong to no commit; do not commit it as a report.**\n",
            m.git_commit
        )
    } else {
        writeln!(out, "Built from commit `{}` (clean tree).\n", m.git_commit)
    }
}

/// Everything a run measured, also written as JSON next to the report.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunData {
    pub mode: String,
    pub command: String,
    pub started: String,
    pub duration_secs: f64,
    pub load_before: String,
    pub load_after: String,
    pub machine: Machine,
    pub config: String,
    /// `BRIDGE__*` variables the services inherited (tuning experiments).
    pub env_overrides: Vec<(String, String)>,
    pub litellm: Option<LiteLlmInfo>,
    /// Why LiteLLM is missing when it was asked for.
    pub litellm_error: Option<String>,
    /// Where the idle-client figures come from when not from this run (`--idle-from`).
    #[serde(default)]
    pub idle_source: Option<String>,
    pub scenarios: Vec<Scenario>,
    pub paths: Vec<PathKind>,
    pub repeats: Vec<Repeat>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LiteLlmInfo {
    pub version: String,
    pub config: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Repeat {
    pub measurements: Vec<Measurement>,
    pub xadd: Option<XaddReference>,
    pub idle: Option<IdleMemory>,
}

/// Scenario names the targets refer to.
pub const ONE_STREAM: &str = "1x50";
pub const TTFT: &str = "ttft-1";
pub const MID: &str = "200x50";
pub const MANY: &str = "1000x20";
/// The unpaced scenario the throughput, CPU and command targets name.
pub const UNPACED: &str = "max-100";
/// The shape other streaming gateways publish: 512 streams × 64 tokens at 20 ms.
pub const COMPARISON: &str = "512x64";

fn measurement<'r>(repeat: &'r Repeat, path: PathKind, scenario: &str) -> Option<&'r Measurement> {
    repeat
        .measurements
        .iter()
        .find(|m| m.path == path && m.scenario == scenario)
}

impl RunData {
    /// A figure of one path over the repeats.
    fn spread(
        &self,
        path: PathKind,
        scenario: &str,
        figure: impl Fn(&Measurement) -> Option<f64>,
    ) -> Option<Spread> {
        Spread::of(
            self.repeats
                .iter()
                .filter_map(|r| measurement(r, path, scenario).and_then(&figure)),
        )
    }

    /// `path` minus the baseline, per repeat, over the repeats.
    fn added(
        &self,
        path: PathKind,
        scenario: &str,
        figure: impl Fn(&Measurement) -> Option<f64>,
    ) -> Option<Spread> {
        Spread::of(self.repeats.iter().filter_map(|r| {
            let with = measurement(r, path, scenario).and_then(&figure)?;
            let base = measurement(r, PathKind::Baseline, scenario).and_then(&figure)?;
            Some(with - base)
        }))
    }

    /// The unpaced scenario where the bridge delivered most (by median).
    fn best_unpaced(&self) -> Option<&Scenario> {
        self.scenarios
            .iter()
            .filter(|s| s.delay_ms == 0)
            .filter_map(|s| {
                self.spread(PathKind::Bridge, &s.name, |m| Some(m.tokens_per_sec))
                    .map(|v| (s, v.median))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s)
    }
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

fn p50(m: &Measurement) -> Option<f64> {
    m.token_latency.map(|p| ms(p.p50_us))
}
fn p99(m: &Measurement) -> Option<f64> {
    m.token_latency.map(|p| ms(p.p99_us))
}
fn p999(m: &Measurement) -> Option<f64> {
    m.token_latency.map(|p| ms(p.p999_us))
}
fn ttft50(m: &Measurement) -> Option<f64> {
    m.ttft.map(|p| ms(p.p50_us))
}
fn ttft99(m: &Measurement) -> Option<f64> {
    m.ttft.map(|p| ms(p.p99_us))
}
const BRIDGE_SERVICES: [&str; 3] = ["gateway", "producer", "processor"];
fn bridge_cpu(m: &Measurement) -> Option<f64> {
    Some(
        BRIDGE_SERVICES
            .iter()
            .filter_map(|s| m.cpu_per_10k.get(*s))
            .sum(),
    )
}

/// `met` or by how much it missed; `None` value → not measured.
fn verdict(value: Option<Spread>, target: f64, at_most: bool) -> String {
    let Some(value) = value else {
        return "not measured".to_owned();
    };
    let v = value.median;
    let met = if at_most { v <= target } else { v >= target };
    if met {
        "**met**".to_owned()
    } else if target == 0.0 {
        format!("missed: {v:.0} instead of none")
    } else if at_most {
        format!("missed: {:.2}× the target", v / target)
    } else {
        format!("missed: {:.0} % of the target", 100.0 * v / target)
    }
}

/// Writes `<stem>.md`, `<stem>.json`, `<stem>-latency.svg` and `<stem>-throughput.svg`.
pub fn write(data: &RunData, out: &Path, notes: Option<&str>) -> anyhow::Result<()> {
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("bench")
        .to_owned();
    let dir = out.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let latency_svg = format!("{stem}-latency.svg");
    let throughput_svg = format!("{stem}-throughput.svg");
    plot::draw(&dir.join(&latency_svg), &latency_panels(data))?;
    plot::draw(&dir.join(&throughput_svg), &[throughput_panel(data)])?;
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(data)?,
    )?;
    let mut text = String::new();
    markdown(data, &mut text, &latency_svg, &throughput_svg, notes)?;
    std::fs::write(out, text)?;
    Ok(())
}

/// The markers around the headline table a README carries (see [`write_readme_headline`]).
pub const README_START: &str = "<!-- bench-headline:start -->";
pub const README_END: &str = "<!-- bench-headline:end -->";

/// Replaces what stands between [`README_START`] and [`README_END`] in `readme` with the
/// headline table of `data` (the same rows as the report at `report`), a line naming the run
/// and a link to the report, so the README's figures are never copied by hand.
pub fn write_readme_headline(data: &RunData, report: &Path, readme: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        anyhow::bail!(
            "{} has no {README_START} … {README_END} block",
            readme.display()
        );
    };
    anyhow::ensure!(
        start < end,
        "{}: the markers are out of order",
        readme.display()
    );
    let mut block = String::new();
    readme_block(data, report, readme, &mut block)?;
    let mut updated = String::with_capacity(text.len() + block.len());
    updated.push_str(&text[..start + README_START.len()]);
    updated.push('\n');
    updated.push_str(&block);
    updated.push_str(&text[end..]);
    std::fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))?;
    Ok(())
}

fn readme_block(
    data: &RunData,
    report: &Path,
    readme: &Path,
    out: &mut String,
) -> std::fmt::Result {
    // The link is relative to the README's directory when the report lies under it.
    let base = readme.parent().unwrap_or_else(|| Path::new("."));
    let link = report.strip_prefix(base).unwrap_or(report).display();
    let commit: String = data.machine.git_commit.chars().take(12).collect();
    let dirty = if data.machine.tree_dirty {
        " (**dirty tree**: not a reproducible run)"
    } else {
        ""
    };
    writeln!(
        out,
        "Written by `bench --readme` from [{link}]({link}) (`{}`, {}, {} repeat(s), commit `{commit}`{dirty}).\n",
        data.command,
        data.started,
        data.repeats.len()
    )?;
    headline_rows(data, out)
}

fn latency_panels(data: &RunData) -> Vec<Panel> {
    let mut rates: Vec<u64> = data
        .scenarios
        .iter()
        .filter(|s| s.delay_ms > 0 && s.name != TTFT)
        .map(|s| s.delay_ms)
        .collect();
    rates.sort_unstable();
    rates.dedup();
    rates
        .into_iter()
        .map(|delay| {
            let scenarios: Vec<&Scenario> = data
                .scenarios
                .iter()
                .filter(|s| s.delay_ms == delay && s.name != TTFT)
                .collect();
            let mut lines = Vec::new();
            for &path in &data.paths {
                for (label, figure, marked) in [
                    ("p50", p50 as fn(&Measurement) -> Option<f64>, false),
                    ("p99", p99, true),
                ] {
                    let points: Vec<(f64, f64)> = scenarios
                        .iter()
                        .filter_map(|s| {
                            data.spread(path, &s.name, figure)
                                .map(|v| (s.streams as f64, v.median))
                        })
                        .collect();
                    if !points.is_empty() {
                        lines.push(Line {
                            label: format!("{} {label}", path.label()),
                            path,
                            marked,
                            points,
                        });
                    }
                }
            }
            Panel {
                title: format!("Per-token latency, {} tok/s per stream", 1000 / delay),
                y_label: "mock-llm send → client receive (ms)".to_owned(),
                lines,
                references: Vec::new(),
                log_y: true,
            }
        })
        .collect()
}

fn throughput_panel(data: &RunData) -> Panel {
    let unpaced: Vec<&Scenario> = data.scenarios.iter().filter(|s| s.delay_ms == 0).collect();
    let lines = data
        .paths
        .iter()
        .map(|&path| Line {
            label: path.label().to_owned(),
            path,
            marked: true,
            points: unpaced
                .iter()
                .filter_map(|s| {
                    data.spread(path, &s.name, |m| Some(m.tokens_per_sec))
                        .map(|v| (s.streams as f64, v.median))
                })
                .collect(),
        })
        .filter(|l| !l.points.is_empty())
        .collect();
    let mut references = vec![("target 40k tokens/s".to_owned(), 40_000.0)];
    if let Some(xadd) = Spread::of(
        data.repeats
            .iter()
            .filter_map(|r| r.xadd.as_ref().map(|x| x.plain)),
    ) {
        references.push((
            "redis-benchmark XADD (no pipelining)".to_owned(),
            xadd.median,
        ));
    }
    Panel {
        title: "End-to-end tokens/s, unpaced streams".to_owned(),
        y_label: "tokens/s received by clients".to_owned(),
        lines,
        references,
        log_y: true,
    }
}

fn markdown(
    data: &RunData,
    out: &mut String,
    latency_svg: &str,
    throughput_svg: &str,
    notes: Option<&str>,
) -> std::fmt::Result {
    writeln!(out, "# Benchmark report ({})\n", data.mode)?;
    writeln!(
        out,
        "Generated by `{}` on {} in {:.0} s; {} repeat(s). Each figure is `median (min–max)` \
         over the repeats; a single repeat shows one value. Raw data: the `.json` file next to \
         this one.\n",
        data.command,
        data.started,
        data.duration_secs,
        data.repeats.len()
    )?;
    provenance(&data.machine, out)?;
    headline(data, out)?;
    if let Some(notes) = notes {
        writeln!(out, "{}\n", notes.trim_end())?;
    }
    writeln!(out, "## Plots\n")?;
    writeln!(out, "![Per-token latency]({latency_svg})\n")?;
    writeln!(out, "![Throughput]({throughput_svg})\n")?;
    machine(data, out)?;
    method(data, out)?;
    latency_tables(data, out)?;
    throughput_tables(data, out)?;
    redis_tables(data, out)?;
    idle_table(data, out)?;
    health(data, out)?;
    Ok(())
}

fn headline(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(out, "## Headline figures against the targets\n")?;
    writeln!(
        out,
        "\"Added\" is the bridge minus the baseline measured in the same repeat (the client \
         streaming straight from mock-llm), then min/median/max over repeats. Latencies in ms. \
         Targets: issue #18.\n"
    )?;
    headline_rows(data, out)
}

/// The headline table itself (the report's and the README's).
fn headline_rows(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(out, "| figure | measured | target | verdict |")?;
    writeln!(out, "|---|---|---|---|")?;
    let bridge = PathKind::Bridge;
    let tps = data.spread(bridge, UNPACED, |m| Some(m.tokens_per_sec));
    writeln!(
        out,
        "| end-to-end tokens/s, `{UNPACED}` | {} | ≥ 80,000 | {} |",
        show(tps, 0),
        verdict(tps, 80_000.0, false)
    )?;
    if data.paths.contains(&PathKind::LiteLlm) {
        let ratio = Spread::of(data.repeats.iter().filter_map(|r| {
            let b = measurement(r, bridge, UNPACED)?.tokens_per_sec;
            let l = measurement(r, PathKind::LiteLlm, UNPACED)?.tokens_per_sec;
            (l > 0.0).then(|| b / l)
        }));
        writeln!(
            out,
            "| bridge tokens/s ÷ LiteLLM tokens/s, `{UNPACED}` | {} | ≥ 50× | {} |",
            show(ratio, 1),
            verdict(ratio, 50.0, false)
        )?;
    }
    for (scenario, target) in [(UNPACED, 0.15), (MANY, 0.35)] {
        let cpu = data.spread(bridge, scenario, bridge_cpu);
        writeln!(
            out,
            "| CPU-s per 10k tokens, gateway + producer + processor, `{scenario}` | {} | ≤ {target} | {} |",
            show(cpu, 3),
            verdict(cpu, target, true)
        )?;
    }
    let with_redis = data.spread(bridge, UNPACED, |m| {
        Some(bridge_cpu(m)? + m.cpu_per_10k.get("redis").copied().unwrap_or(0.0))
    });
    writeln!(
        out,
        "| the same plus Redis, `{UNPACED}` (not part of the target) | {} | – | – |",
        show(with_redis, 3)
    )?;
    if let Some(many) = data.scenarios.iter().find(|s| s.name == MANY) {
        // Offered: what mock-llm sends a client in the same repeat, that is the baseline's
        // rate. It stays a few percent below the nominal rate (every stream at exactly
        // `delay_ms` per token): mock-llm's waits end on the timer's next millisecond, and a
        // chat's next one starts only after it ended. Both hold for every path alike.
        let share = Spread::of(data.repeats.iter().filter_map(|r| {
            let bridge = measurement(r, bridge, MANY)?.tokens_per_sec;
            let base = measurement(r, PathKind::Baseline, MANY)?.tokens_per_sec;
            (base > 0.0).then(|| 100.0 * bridge / base)
        }));
        writeln!(
            out,
            "| `{MANY}`: delivered share of what mock-llm offered in the same run (the baseline's tokens/s) (%) | {} | ≥ 99 | {} |",
            show(share, 1),
            verdict(share, 99.0, false)
        )?;
        let nominal = many.streams as f64 * 1000.0 / many.delay_ms.max(1) as f64;
        let of_nominal =
            |path: PathKind| data.spread(path, MANY, |m| Some(100.0 * m.tokens_per_sec / nominal));
        writeln!(
            out,
            "| … of the nominal {nominal:.0} tokens/s (every stream at exactly mock-llm's pace), bridge / baseline (%) | {} / {} | – | – |",
            show(of_nominal(bridge), 1),
            show(of_nominal(PathKind::Baseline), 1)
        )?;
    }
    for (label, scenario, figure, target) in [
        (
            "added per-token latency p99, 1,000 streams × 20 tok/s",
            MANY,
            p99 as fn(&Measurement) -> Option<f64>,
            10.0,
        ),
        (
            "added per-token latency p99, 200 streams × 50 tok/s",
            MID,
            p99,
            3.0,
        ),
        (
            "added per-token latency p50, 1 stream × 50 tok/s",
            ONE_STREAM,
            p50,
            0.4,
        ),
        (
            "added per-token latency p99, 1 stream × 50 tok/s",
            ONE_STREAM,
            p99,
            1.0,
        ),
        ("added time to first token p50, 1 stream", TTFT, ttft50, 1.5),
        (
            "added per-token latency p99, 512 streams × 64 tokens at 20 ms",
            COMPARISON,
            p99,
            3.0,
        ),
    ] {
        let added = data.added(bridge, scenario, figure);
        writeln!(
            out,
            "| {label} | {} | ≤ {target} | {} |",
            show(added, 3),
            verdict(added, target, true)
        )?;
    }
    let stalled = data.spread(bridge, COMPARISON, |m| Some((m.stalled + m.errors) as f64));
    writeln!(
        out,
        "| streams stalled (a gap over {} ms between tokens) or failed, `{COMPARISON}` | {} | 0 | {} |",
        crate::client::STALL_GAP.as_millis(),
        show(stalled, 0),
        verdict(stalled, 0.0, true)
    )?;
    // Redis connections of the gateway: idle, with idle clients, under the largest load.
    let mut seen = Vec::new();
    if let Some(repeat) = data.repeats.first() {
        if let Some(idle) = &repeat.idle {
            seen.push(format!("{} at 0 clients", idle.base_connections));
            for p in &idle.points {
                seen.push(format!(
                    "{} at {} idle clients",
                    p.gateway_redis_connections, p.clients
                ));
            }
        }
        for m in &repeat.measurements {
            if let Some(c) = m.gateway_redis_connections {
                seen.push(format!("{c} during `{}`", m.scenario));
            }
        }
    }
    let counts: Vec<usize> = data
        .repeats
        .iter()
        .flat_map(|r| {
            r.idle
                .iter()
                .flat_map(|i| {
                    std::iter::once(i.base_connections)
                        .chain(i.points.iter().map(|p| p.gateway_redis_connections))
                })
                .chain(
                    r.measurements
                        .iter()
                        .filter_map(|m| m.gateway_redis_connections),
                )
        })
        .collect();
    let (low, high) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    writeln!(
        out,
        "| Redis connections of the gateway (first repeat) | {} | constant as clients grow | {} |",
        seen.join(", "),
        if counts.is_empty() {
            "not measured".to_owned()
        } else if high <= low + 1 {
            format!(
                "**met** ({low}–{high}: the handler pool, the reader's connections, and the \
                 connection fred opens on demand to send `CLIENT UNBLOCK`)"
            )
        } else {
            format!("missed: {low} to {high} connections")
        }
    )?;
    for (scenario, target) in [(UNPACED, 1.5), (MANY, 2.0)] {
        let commands = data.spread(bridge, scenario, |m| m.redis_commands_per_token);
        writeln!(
            out,
            "| Redis commands per delivered token, all that Redis ran (`INFO commandstats`, \
             script-internal calls included), `{scenario}` | {} | ≤ {target} | {} |",
            show(commands, 2),
            verdict(commands, target, true)
        )?;
    }
    let sent = data.spread(bridge, UNPACED, |m| m.sent_commands_per_token);
    writeln!(
        out,
        "| … of which the services sent (round trips; a one-second `MONITOR` sample), \
         `{UNPACED}` | {} | – | – |",
        show(sent, 2)
    )?;
    if let Some(short) = data.scenarios.iter().find(|s| s.name == TTFT) {
        let per_chat = |figure: fn(&Measurement) -> Option<f64>| {
            data.spread(bridge, TTFT, move |m| {
                figure(m).map(|per_token| per_token * short.tokens_per_chat as f64)
            })
        };
        writeln!(
            out,
            "| Redis commands per chat of {} tokens, start to complete, background loops included (`{TTFT}`): all / sent | {} / {} | – | – |",
            short.tokens_per_chat,
            show(per_chat(|m| m.redis_commands_per_token), 0),
            show(per_chat(|m| m.sent_commands_per_token), 0),
        )?;
    }
    let largest = data
        .repeats
        .iter()
        .filter_map(|r| r.idle.as_ref()?.points.last().map(|p| p.clients))
        .max();
    if let Some(clients) = largest {
        let per_client = Spread::of(data.repeats.iter().filter_map(|r| {
            r.idle
                .as_ref()?
                .points
                .iter()
                .find(|p| p.clients == clients)
                .map(|p| p.bytes_per_client / 1024.0)
        }));
        writeln!(
            out,
            "| gateway memory per idle SSE client at {clients} clients (KiB){} | {} | ≤ 16 at 10,000 | {} |",
            if data.idle_source.is_some() {
                ", separate run (below)"
            } else {
                ""
            },
            show(per_client, 2),
            if clients < 10_000 {
                "not measured at 10,000 (quick mode)".to_owned()
            } else {
                verdict(per_client, 16.0, true)
            }
        )?;
    }
    writeln!(out)?;
    Ok(())
}

fn machine(data: &RunData, out: &mut String) -> std::fmt::Result {
    let m = &data.machine;
    writeln!(out, "## Machine and versions\n")?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(out, "| CPUs (nproc) | {} |", m.nproc)?;
    writeln!(out, "| CPU model | {} |", m.cpu_model)?;
    writeln!(out, "| kernel | {} |", m.kernel)?;
    writeln!(out, "| RAM | {:.1} GiB |", m.ram_gib)?;
    writeln!(
        out,
        "| load average (1/5/15 min) before / after | {} / {} |",
        data.load_before, data.load_after
    )?;
    writeln!(out, "| rustc | {} |", m.rustc)?;
    writeln!(out, "| Redis | {} |", m.redis)?;
    writeln!(out, "| source revision | {} |", m.git_rev)?;
    writeln!(out, "| source commit | {} |", m.git_commit)?;
    match (&data.litellm, &data.litellm_error) {
        (Some(l), _) => writeln!(out, "| LiteLLM | {} |", l.version)?,
        (None, Some(error)) => writeln!(out, "| LiteLLM | could not run: {error} |")?,
        (None, None) => {}
    }
    writeln!(out)?;
    writeln!(
        out,
        "Everything runs on this one machine at once: Redis, mock-llm, the three bridge \
         services{}, and the load generator. The machine is shared, so the load average above \
         is part of the result (the figure after the run includes the run's own load).\n",
        if data.litellm.is_some() {
            ", LiteLLM"
        } else {
            ""
        }
    )?;
    Ok(())
}

fn method(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(out, "## Method and configuration\n")?;
    writeln!(
        out,
        "- Each stream is a loop of chats, one after another. A chat asks mock-llm (through the \
         prompt directive `[[mock tokens=N delay_ms=D stamp=1]]`) for N tokens, one every D ms \
         (`unpaced`: D = 0, as fast as the path takes them). `stamp=1` makes mock-llm append \
         `|<send time in Unix µs>` to each token's text; every path forwards the text \
         unchanged, so the client computes receive − send per token with the one clock of this \
         machine.\n\
         - Paths: **baseline**: the client streams from mock-llm's OpenAI endpoint itself; \
         **bridge**: `POST /api/chat/start` then the request's SSE stream (mock-llm → producer → \
         Redis → gateway → client){}.\n\
         - Per-token latency counts every token after the first of its chat, received within \
         the measurement window (the first is covered by time to first token, which runs from \
         before the start request to the first token).\n\
         - Each measurement: warm-up, then a window in which tokens/s, CPU time \
         (`/proc/<pid>/stat`, utime + stime, all threads) and Redis `INFO commandstats` are \
         sampled at both ends; then running chats finish before the next measurement begins \
         (mock-llm reports no open stream).\n\
         - Within a repeat, each scenario runs on every path back to back (baseline first), so \
         a change in machine load hits both.\n\
         - Memory per idle client: RSS (`VmRSS`) of a gateway started for this measurement, \
         with N session-wide SSE streams open (one session each, via \
         `POST /api/sessions/{{id}}/stream-token`), minus its RSS before they opened, divided \
         by N.\n\
         - A token event that carries several tokens (`producer.token_coalesce_ms`) counts \
         each stamp in its text as one token.\n",
        if data.litellm.is_some() {
            "; **LiteLLM**: the same OpenAI request through a LiteLLM proxy (one worker, \
             logging off) pointed at the same mock-llm"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "| scenario | streams | rate per stream | tokens per chat | warm-up | window |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for s in &data.scenarios {
        writeln!(
            out,
            "| `{}` | {} | {} | {} | {:.0} s | {:.0} s |",
            s.name,
            s.streams,
            s.rate_label(),
            s.tokens_per_chat,
            s.warmup.as_secs_f64(),
            s.window.as_secs_f64()
        )?;
    }
    writeln!(
        out,
        "\nThe stack's configuration (every other key at its default):\n\n```toml\n{}```\n",
        data.config
    )?;
    if !data.env_overrides.is_empty() {
        writeln!(out, "Environment overrides inherited by the services:\n")?;
        for (k, v) in &data.env_overrides {
            writeln!(out, "- `{k}={v}`")?;
        }
        writeln!(out)?;
    }
    if let Some(l) = &data.litellm {
        writeln!(
            out,
            "LiteLLM proxy configuration (`litellm --config … --num_workers 1`, \
             `LITELLM_LOG=ERROR`, a random `LITELLM_MASTER_KEY` per run, which the proxy \
             requires):\n\n```yaml\n{}```\n",
            l.config
        )?;
    }
    Ok(())
}

fn latency_tables(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "## Per-token latency (ms, mock-llm send → client receive)\n"
    )?;
    writeln!(
        out,
        "| scenario | path | samples | p50 | p99 | p999 | added p50 | added p99 | added p999 |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    for s in data.scenarios.iter().filter(|s| s.name != TTFT) {
        for &path in &data.paths {
            let samples = data.spread(path, &s.name, |m| m.token_latency.map(|p| p.count as f64));
            let added = |f: fn(&Measurement) -> Option<f64>| {
                if path == PathKind::Baseline {
                    "–".to_owned()
                } else {
                    show(data.added(path, &s.name, f), 3)
                }
            };
            writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.name,
                path.label(),
                show(samples, 0),
                show(data.spread(path, &s.name, p50), 3),
                show(data.spread(path, &s.name, p99), 3),
                show(data.spread(path, &s.name, p999), 3),
                added(p50),
                added(p99),
                added(p999),
            )?;
        }
    }
    writeln!(
        out,
        "\np999 needs about 1,000 samples or more to mean anything; with fewer it is close to \
         the maximum. In unpaced scenarios (and paced ones a path cannot keep up with) mock-llm \
         produces faster than the path drains, tokens queue in socket buffers, and latency \
         measures the queue, not the path.\n"
    )?;
    writeln!(
        out,
        "## Time to first token (ms, chat start → first token)\n"
    )?;
    writeln!(
        out,
        "| scenario | path | chats | p50 | p99 | added p50 | added p99 |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for s in &data.scenarios {
        for &path in &data.paths {
            let chats = data.spread(path, &s.name, |m| m.ttft.map(|p| p.count as f64));
            let added = |f: fn(&Measurement) -> Option<f64>| {
                if path == PathKind::Baseline {
                    "–".to_owned()
                } else {
                    show(data.added(path, &s.name, f), 3)
                }
            };
            writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} | {} |",
                s.name,
                path.label(),
                show(chats, 0),
                show(data.spread(path, &s.name, ttft50), 3),
                show(data.spread(path, &s.name, ttft99), 3),
                added(ttft50),
                added(ttft99),
            )?;
        }
    }
    writeln!(
        out,
        "\nEvery chat's first token waits for mock-llm's `delay_ms` on every path; the added \
         figure removes it. On the bridge the clock includes the start request, the job's trip \
         through Redis to a producer, and opening the SSE stream.\n"
    )?;
    Ok(())
}

fn throughput_tables(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(out, "## Throughput and CPU\n")?;
    let mut processes: Vec<String> = data
        .repeats
        .iter()
        .flat_map(|r| {
            r.measurements
                .iter()
                .flat_map(|m| m.cpu_per_10k.keys().cloned())
        })
        .collect();
    processes.sort();
    processes.dedup();
    write!(
        out,
        "| scenario | path | tokens/s | bridge services CPU-s/10k |"
    )?;
    for p in &processes {
        write!(out, " {p} |")?;
    }
    writeln!(out)?;
    write!(out, "|---|---|---|---|")?;
    for _ in &processes {
        write!(out, "---|")?;
    }
    writeln!(out)?;
    for s in &data.scenarios {
        for &path in &data.paths {
            write!(
                out,
                "| `{}` | {} | {} | {} |",
                s.name,
                path.label(),
                show(data.spread(path, &s.name, |m| Some(m.tokens_per_sec)), 0),
                if path == PathKind::Bridge {
                    show(data.spread(path, &s.name, bridge_cpu), 3)
                } else {
                    "–".to_owned()
                }
            )?;
            for p in &processes {
                let v = data.spread(path, &s.name, |m| m.cpu_per_10k.get(p).copied());
                write!(out, " {} |", show(v, 3))?;
            }
            writeln!(out)?;
        }
    }
    writeln!(
        out,
        "\nCPU columns are CPU-seconds per 10,000 tokens delivered in the window, per process \
         (`bench` is the load generator itself). A process not on a path still shows its \
         background cost.\n"
    )?;
    let xadd: Vec<&XaddReference> = data
        .repeats
        .iter()
        .filter_map(|r| r.xadd.as_ref())
        .collect();
    if let Some(first) = xadd.first() {
        writeln!(
            out,
            "Reference on the same Redis in the same run (`{}`): {} XADD/s without \
             pipelining, {} XADD/s with 16 pipelined; the bridge's best end-to-end rate is {} \
             tokens/s.\n",
            first.command,
            show(Spread::of(xadd.iter().map(|x| x.plain)), 0),
            show(Spread::of(xadd.iter().map(|x| x.pipelined)), 0),
            show(
                data.best_unpaced().and_then(
                    |b| data.spread(PathKind::Bridge, &b.name, |m| Some(m.tokens_per_sec))
                ),
                0
            ),
        )?;
    }
    Ok(())
}

fn redis_tables(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(out, "## Redis commands per delivered token (bridge)\n")?;
    let mut commands: BTreeMap<String, f64> = BTreeMap::new();
    for m in data
        .repeats
        .iter()
        .flat_map(|r| &r.measurements)
        .filter(|m| m.path == PathKind::Bridge)
    {
        for (c, v) in &m.redis_commands {
            *commands.entry(c.clone()).or_default() += v;
        }
    }
    let mut top: Vec<(String, f64)> = commands.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = top.into_iter().take(8).map(|(c, _)| c).collect();
    write!(out, "| scenario | total | sent by the services |")?;
    for c in &top {
        write!(out, " {c} |")?;
    }
    writeln!(out, " gateway Redis connections |")?;
    write!(out, "|---|---|---|")?;
    for _ in &top {
        write!(out, "---|")?;
    }
    writeln!(out, "---|")?;
    for s in &data.scenarios {
        write!(
            out,
            "| `{}` | {} |",
            s.name,
            show(
                data.spread(PathKind::Bridge, &s.name, |m| m.redis_commands_per_token),
                2
            )
        )?;
        write!(
            out,
            " {} |",
            show(
                data.spread(PathKind::Bridge, &s.name, |m| m.sent_commands_per_token),
                2
            )
        )?;
        for c in &top {
            let v = data.spread(PathKind::Bridge, &s.name, |m| {
                Some(m.redis_commands.get(c).copied().unwrap_or(0.0))
            });
            write!(out, " {} |", show(v, 3))?;
        }
        let conns = data.spread(PathKind::Bridge, &s.name, |m| {
            m.gateway_redis_connections.map(|c| c as f64)
        });
        writeln!(out, " {} |", show(conns, 0))?;
    }
    writeln!(
        out,
        "\n`total` and the per-command columns: all commands Redis executed in the window (every \
         service, heartbeats and background loops included; the benchmark's own `INFO` \
         excluded), as `INFO commandstats` counts them, that is with the commands that Lua \
         scripts run counted one by one, divided by the tokens clients received. `sent by the \
         services`: the part of the total that arrived over the network, from the share of \
         sent commands among all commands in a one-second `MONITOR` sample at the end of the \
         warm-up.\n"
    )?;
    let mut sent: BTreeMap<String, f64> = BTreeMap::new();
    for m in data
        .repeats
        .iter()
        .flat_map(|r| &r.measurements)
        .filter(|m| m.path == PathKind::Bridge)
    {
        if let Some(sample) = &m.monitor {
            for (c, n) in &sample.sent_by_command {
                *sent.entry(c.clone()).or_default() += *n as f64;
            }
        }
    }
    let all: f64 = sent.values().sum();
    if all > 0.0 {
        let mut sent: Vec<(String, f64)> = sent.into_iter().collect();
        sent.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shares: Vec<String> = sent
            .iter()
            .take(10)
            .map(|(c, n)| format!("{c} {:.1} %", 100.0 * n / all))
            .collect();
        writeln!(
            out,
            "Commands the services sent, all `MONITOR` samples together: {}.\n",
            shares.join(", ")
        )?;
    }
    Ok(())
}

fn idle_table(data: &RunData, out: &mut String) -> std::fmt::Result {
    if data.repeats.iter().all(|r| r.idle.is_none()) {
        return Ok(());
    }
    writeln!(out, "## Gateway memory with idle SSE clients\n")?;
    if let Some(source) = &data.idle_source {
        writeln!(
            out,
            "These figures come from a separate run, {source}: the idle-client step of this \
             run measured the gateway that had carried the streaming loads, whose allocator \
             reused memory they left behind.\n"
        )?;
    }
    writeln!(
        out,
        "| repeat | RSS before | clients | RSS with clients | KiB per client | gateway Redis connections | time to open all |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for (i, r) in data.repeats.iter().enumerate() {
        let Some(idle) = &r.idle else { continue };
        for p in &idle.points {
            writeln!(
                out,
                "| {} | {:.1} MiB | {} | {:.1} MiB | {:.2} | {} (before: {}) | {:.1} s |",
                i + 1,
                idle.base_rss as f64 / 1_048_576.0,
                p.clients,
                p.gateway_rss as f64 / 1_048_576.0,
                p.bytes_per_client / 1024.0,
                p.gateway_redis_connections,
                idle.base_connections,
                idle.open_secs
            )?;
        }
    }
    writeln!(
        out,
        "\nEach repeat measures a gateway process started for the purpose (same configuration \
         and Redis), after one warm-up client, so memory left in the allocator by earlier \
         load does not hide the cost per client.\n"
    )?;
    Ok(())
}

fn health(data: &RunData, out: &mut String) -> std::fmt::Result {
    writeln!(out, "## Run health\n")?;
    writeln!(
        out,
        "| scenario | path | chats (all repeats) | failed chats | unstamped tokens | drained |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for s in &data.scenarios {
        for &path in &data.paths {
            let ms: Vec<&Measurement> = data
                .repeats
                .iter()
                .filter_map(|r| measurement(r, path, &s.name))
                .collect();
            writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} |",
                s.name,
                path.label(),
                ms.iter().map(|m| m.chats).sum::<u64>(),
                ms.iter().map(|m| m.errors).sum::<u64>(),
                ms.iter().map(|m| m.unstamped).sum::<u64>(),
                if ms.iter().all(|m| m.drained) {
                    "yes"
                } else {
                    "no: chats were cut off"
                }
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(tree_dirty: bool) -> Machine {
        Machine {
            nproc: 2,
            cpu_model: "cpu".to_owned(),
            kernel: "k".to_owned(),
            ram_gib: 1.0,
            rustc: "rustc".to_owned(),
            redis: "redis".to_owned(),
            git_rev: "abc".to_owned(),
            git_commit: "abcdef".to_owned(),
            tree_dirty,
        }
    }

    fn empty_run() -> RunData {
        RunData {
            mode: "full".to_owned(),
            command: "bench --peers".to_owned(),
            started: "2026-11-30 05:00 UTC".to_owned(),
            duration_secs: 1.0,
            load_before: String::new(),
            load_after: String::new(),
            machine: machine(false),
            config: String::new(),
            env_overrides: Vec::new(),
            litellm: None,
            litellm_error: None,
            idle_source: None,
            scenarios: Vec::new(),
            paths: vec![PathKind::Bridge],
            repeats: Vec::new(),
        }
    }

    #[test]
    fn the_readme_block_is_replaced_and_nothing_else() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("bench-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let readme = dir.join("README.md");
        std::fs::write(
            &readme,
            format!("# Title\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n"),
        )?;
        write_readme_headline(&empty_run(), &dir.join("bench/results/peers.md"), &readme)?;
        let text = std::fs::read_to_string(&readme)?;
        assert!(
            text.starts_with("# Title\n\nbefore\n<!-- bench-headline:start -->\n"),
            "{text}"
        );
        assert!(
            text.ends_with("<!-- bench-headline:end -->\nafter\n"),
            "{text}"
        );
        assert!(!text.contains("old table"), "{text}");
        assert!(
            text.contains("[bench/results/peers.md](bench/results/peers.md)"),
            "{text}"
        );
        assert!(text.contains("commit `abcdef`"), "{text}");
        assert!(
            text.contains("| figure | measured | target | verdict |"),
            "{text}"
        );

        std::fs::write(&readme, "no markers\n")?;
        assert!(write_readme_headline(&empty_run(), &readme, &readme).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_dirty_tree_is_said_loudly_and_a_clean_one_names_its_commit() {
        let mut dirty = String::new();
        provenance(&machine(true), &mut dirty).unwrap_or_default();
        assert!(dirty.contains("**WARNING"), "{dirty}");
        assert!(dirty.contains("`abcdef`"), "{dirty}");
        let mut clean = String::new();
        provenance(&machine(false), &mut clean).unwrap_or_default();
        assert!(!clean.contains("WARNING"), "{clean}");
        assert!(clean.contains("Built from commit `abcdef`"), "{clean}");
    }
}
