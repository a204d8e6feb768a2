//! What the benchmark reads from outside the processes it measures: CPU time and resident
//! memory from `/proc/<pid>`, a process's TCP connections to Redis from `/proc/net/tcp`, and
//! Redis's own `INFO commandstats`; plus the machine description for the report.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use fred::prelude::*;
use fred::types::InfoKind;
use test_support::sockets::{TcpState, socket_inodes, tcp_sockets};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// User + system CPU time of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses: fields after the last
    // `)` start with field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {}", index + 3))?
            .parse::<u64>()
            .with_context(|| format!("/proc/{pid}/stat field {}", index + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// Parent pid of a process (field 4 of `/proc/<pid>/stat`).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and every live descendant (a Python server may fork workers).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return tree;
    };
    let all: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    let mut grew = true;
    while grew {
        grew = false;
        for &candidate in &all {
            if !tree.contains(&candidate)
                && parent_pid(candidate).is_some_and(|parent| tree.contains(&parent))
            {
                tree.push(candidate);
                grew = true;
            }
        }
    }
    tree
}

/// CPU ticks of a process and its descendants (processes that exited are not counted).
pub fn tree_cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let mut total = cpu_ticks(pid)?;
    for child in process_tree(pid).into_iter().skip(1) {
        total += cpu_ticks(child).unwrap_or(0);
    }
    Ok(total)
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 when it cannot be read.
pub fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Resident set size of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// Anonymous resident memory of a process, in bytes (`RssAnon`: heap, stacks and other private
/// memory). `VmRSS` adds the pages of the binary and libraries the process has touched, which
/// grow as new code paths run and are bounded by the files' size: a leak shows here.
pub fn rss_anon_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "RssAnon")
}

fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status_kib(&status, field)
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// A `Name:   123 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Established TCP connections of process `pid` to `127.0.0.1:<remote_port>`.
pub fn connections_to(pid: u32, remote_port: u16) -> anyhow::Result<usize> {
    let held = socket_inodes(pid)?;
    Ok(tcp_sockets()?
        .iter()
        .filter(|s| {
            s.state == TcpState::Established
                && s.remote_port == remote_port
                && held.contains(&s.inode)
        })
        .count())
}

pub use test_support::command_calls;

/// Commands Redis executed during a `MONITOR` sample: those clients sent, and those scripts ran
/// (`INFO commandstats` counts both alike).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MonitorSample {
    pub sent: u64,
    pub in_scripts: u64,
    /// Sent commands by name (lowercase).
    pub sent_by_command: BTreeMap<String, u64>,
}

/// Watches every command on the Redis at `port` for `duration` with `MONITOR`.
///
/// `MONITOR` slows Redis down while it runs, so callers sample outside measurement windows.
pub async fn monitor(port: u16, duration: Duration) -> anyhow::Result<MonitorSample> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connecting for MONITOR")?;
    stream.write_all(b"*1\r\n$7\r\nMONITOR\r\n").await?;
    let mut lines = BufReader::new(stream).lines();
    let mut sample = MonitorSample::default();
    let deadline = tokio::time::Instant::now() + duration;
    while let Ok(line) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        let Some(line) = line.context("reading MONITOR output")? else {
            break;
        };
        // `+1700000000.123456 [0 127.0.0.1:5555] "XADD" "key" …`; scripts show `[0 lua]`.
        let Some((source, command)) = line
            .split_once(" [")
            .and_then(|(_, rest)| rest.split_once("] "))
        else {
            continue;
        };
        if source.ends_with("lua") {
            sample.in_scripts += 1;
        } else {
            sample.sent += 1;
            let name = command
                .split('"')
                .nth(1)
                .unwrap_or_default()
                .to_ascii_lowercase();
            *sample.sent_by_command.entry(name).or_default() += 1;
        }
    }
    Ok(sample)
}

/// One field of an `INFO` section (`process_id`, `connected_clients`, …).
pub async fn info_field(redis: &Client, kind: InfoKind, field: &str) -> anyhow::Result<String> {
    let info: String = redis.info(Some(kind)).await.context("INFO")?;
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow!("INFO has no field {field}"))
}

/// The machine and software the run happened on, for the report header.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub ram_gib: f64,
    pub rustc: String,
    pub redis: String,
    pub git_rev: String,
    /// The full commit hash the binaries were built from (`unknown` outside a git checkout).
    #[serde(default)]
    pub git_commit: String,
    /// Uncommitted changes in the tree at run time: the figures then belong to no commit.
    #[serde(default)]
    pub tree_dirty: bool,
}

impl Machine {
    pub fn describe(repo: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_gib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0.0, |kb| kb as f64 / (1024.0 * 1024.0));
        Self {
            nproc: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model,
            kernel: command_line("uname", &["-r"], None),
            ram_gib,
            rustc: command_line("rustc", &["-V"], None),
            redis: command_line("redis-server", &["--version"], None),
            git_rev: command_line(
                "git",
                &["describe", "--always", "--dirty", "--abbrev=12"],
                Some(repo),
            ),
            git_commit: command_line("git", &["rev-parse", "HEAD"], Some(repo)),
            tree_dirty: tree_is_dirty(repo),
        }
    }
}

/// Whether `git status` lists any change; outside a git checkout the tree counts as dirty
/// (nothing ties the figures to a commit there either).
fn tree_is_dirty(repo: &Path) -> bool {
    std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(repo)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_none_or(|o| !o.stdout.is_empty())
}

/// First line of a command's output, or `unknown`.
pub fn command_line(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut command = std::process::Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let status =
            "Name:\tgateway\nVmRSS:\t   28444 kB\nRssAnon:\t   15336 kB\nRssFile:\t   13108 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(28_444));
        assert_eq!(status_kib(status, "RssAnon"), Some(15_336));
        assert_eq!(
            status_kib(status, "Rss"),
            None,
            "a prefix of another field is not it"
        );
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn own_process_is_readable() -> anyhow::Result<()> {
        let pid = std::process::id();
        assert!(rss_bytes(pid)? > 0);
        assert!(rss_anon_bytes(pid)? > 0);
        cpu_ticks(pid)?;
        assert!(process_tree(pid).contains(&pid));
        Ok(())
    }
}
