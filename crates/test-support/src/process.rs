//! Spawning service binaries (and other helper programs) as children of the test, with their
//! output captured in a log file and POSIX signals aimed at exactly that child.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::sockets::{TcpState, socket_inodes, tcp_sockets};

/// Port of the developer Redis that runs on these machines; tests must never touch it.
const RESERVED_PORT: u16 = 6379;

/// A running child process whose stdout and stderr go to one log file.
///
/// Dropping it kills and reaps the child. The log file is kept after the drop so a
/// failed run can still be inspected.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    child: Child,
    /// Taken once at spawn: `Child::id()` turns `None` after the child is reaped, which is
    /// also what `live_pid` uses to refuse signalling a pid that may have been reused.
    pid: u32,
    log_path: PathBuf,
}

impl ServiceProcess {
    /// Spawns `binary` with `args` and extra `envs` (added to the inherited environment).
    ///
    /// Output goes to `<log dir>/<name>-<pid>.log`; the log dir is `$BRIDGE_TEST_LOG_DIR`, else
    /// `<cargo target dir>/test-logs`, else `<system temp>/llm-bridge-test-logs`.
    pub fn spawn(
        name: &str,
        binary: &Path,
        args: &[String],
        envs: &[(String, String)],
    ) -> anyhow::Result<ServiceProcess> {
        let dir = log_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating log dir {}", dir.display()))?;
        // The pid is only known after spawning; write to a unique name first, rename after.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let provisional = dir.join(format!(
            "{name}-spawning-{}-{nanos}.log",
            std::process::id()
        ));
        let stdout = File::create(&provisional)
            .with_context(|| format!("creating log file {}", provisional.display()))?;
        let stderr = stdout.try_clone().context("duplicating log file handle")?;

        let mut child = command_dying_with_parent(binary);
        child
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = child
            .spawn()
            .with_context(|| format!("spawning {name} ({})", binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{name} exited before its pid could be read"))?;

        let log_path = dir.join(format!("{name}-{pid}.log"));
        // The child keeps writing through its open descriptor, so renaming is safe.
        let log_path = match std::fs::rename(&provisional, &log_path) {
            Ok(()) => log_path,
            Err(_) => provisional,
        };

        Ok(ServiceProcess {
            name: name.to_owned(),
            child,
            pid,
            log_path,
        })
    }

    /// The name given at spawn (used in log file names and error messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid as spawned (still returned after the child exited).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where stdout and stderr of the child are written.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n_lines` lines of the log, for failure messages. Never fails: a read error is
    /// returned as text, because it is only ever shown to a human.
    pub async fn log_tail(&self, n_lines: usize) -> String {
        match tokio::fs::read(&self.log_path).await {
            Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), n_lines),
            Err(err) => format!("<cannot read {}: {err}>", self.log_path.display()),
        }
    }

    /// Asks the child to shut down gracefully.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Kills the child without giving it a chance to clean up (a crash).
    pub fn sigkill(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Freezes the child (a hung process: it keeps its sockets and leases but does nothing).
    pub fn sigstop(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Resumes a child frozen by [`ServiceProcess::sigstop`].
    pub fn sigcont(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Waits for the child to exit, failing after `timeout` (the child is left running then).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for {} to exit", self.name)),
            Err(_) => bail!(
                "{} (pid {}) did not exit within {timeout:?}; log: {}",
                self.name,
                self.pid,
                self.log_path.display()
            ),
        }
    }

    /// The exit status if the child has already exited, without waiting.
    pub fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking whether {} exited", self.name))
    }

    /// Whether the child itself holds a listening TCP socket on loopback `port`.
    ///
    /// Answering on the port is not proof: between [`free_port`] and the child's bind another
    /// test's server can take the port, the child then exits on `EADDRINUSE`, and a readiness
    /// probe reaches the other server. The kernel's socket table says whose socket it is.
    pub fn listens_on(&self, port: u16) -> anyhow::Result<bool> {
        pid_listens_on(self.pid, port)
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.live_pid()?;
        kill(pid, signal).with_context(|| format!("sending {signal} to {} ({pid})", self.name))
    }

    /// The pid, only while it still belongs to our child: once tokio has reaped the child the
    /// kernel may hand the number to an unrelated process, which we must never signal.
    fn live_pid(&self) -> anyhow::Result<Pid> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("{} (pid {}) has already exited", self.name, self.pid))?;
        let pid = i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))?;
        Ok(Pid::from_raw(pid))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Locates a workspace binary (`gateway`, `producer`, `processor`, `mock-llm`).
///
/// Uses `$BRIDGE_BIN_DIR` when set; otherwise the directory of the running test executable,
/// one level up if that is cargo's `deps` folder (tests run from `<target>/debug/deps/`,
/// binaries live in `<target>/debug/`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("BRIDGE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("locating the running test executable")?;
            let mut dir = exe
                .parent()
                .ok_or_else(|| anyhow!("test executable {} has no parent dir", exe.display()))?
                .to_path_buf();
            if dir.file_name() == Some(OsStr::new("deps")) {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "binary {name} not found at {}; build it first with `cargo build --workspace --bins`",
            path.display()
        )
    }
}

/// Finds an executable on `PATH`, like `which`.
pub fn find_on_path(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").ok_or_else(|| anyhow!("PATH is not set"))?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| anyhow!("{name} not found on PATH"))
}

/// A loopback TCP port that was free a moment ago (bind to port 0, read it, release it).
///
/// Another process can grab it before the caller binds; helpers that start servers retry on a
/// fresh port when that happens. Never returns 6379 (the developer Redis).
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        if port != RESERVED_PORT {
            return Ok(port);
        }
    }
    bail!("could not find a free loopback port")
}

/// Whether process `pid` holds a listening TCP socket on `port` (see
/// [`ServiceProcess::listens_on`]).
pub(crate) fn pid_listens_on(pid: u32, port: u16) -> anyhow::Result<bool> {
    let listening: Vec<String> = tcp_sockets()?
        .into_iter()
        .filter(|s| s.state == TcpState::Listen && s.local_port == port)
        .map(|s| s.inode)
        .collect();
    if listening.is_empty() {
        return Ok(false);
    }
    // A wrapper (heaptrack, `sh -c`) leaves the socket to a descendant, which counts too.
    Ok(self_and_descendants(pid).into_iter().any(|pid| {
        // The process may exit (and its fd dir vanish) while we look: "not listening".
        socket_inodes(pid).is_ok_and(|held| listening.iter().any(|l| held.contains(l)))
    }))
}

/// `pid` and every process below it, from `/proc/<pid>/task/<tid>/children`.
fn self_and_descendants(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut next = 0;
    while let Some(&current) = found.get(next) {
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{current}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                found.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    found
}

/// Kills `child` (SIGKILL, only this pid) and reaps it, from synchronous code such as `Drop`.
///
/// tokio's `kill_on_drop` leaves reaping to a background reaper that may never run before
/// the test binary exits, which strands zombies; reaping here keeps long suites clean. The
/// busy wait is short: SIGKILL takes effect within milliseconds.
pub(crate) fn kill_and_reap(child: &mut Child) {
    // An error means the child was already reaped; `try_wait` below then returns at once.
    let _ = child.start_kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Ok(Some(_)) | Err(_) => return,
        }
    }
}

/// Last `n` lines of `text`, joined with newlines.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn log_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRIDGE_TEST_LOG_DIR") {
        return PathBuf::from(dir);
    }
    // `<target>/<profile>/deps/<test>` -> `<target>/test-logs`: next to the build, out of git.
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        if deps.file_name()? != OsStr::new("deps") {
            return None;
        }
        Some(deps.parent()?.parent()?.join("test-logs"))
    });
    from_exe.unwrap_or_else(|| std::env::temp_dir().join("llm-bridge-test-logs"))
}

/// A command for `binary` that receives SIGKILL when the thread that spawned it dies.
///
/// `kill_on_drop` only runs when the test unwinds; a test process killed by a signal (a
/// nextest timeout, a Ctrl-C) would leave its services behind, and a service reconnects
/// forever: a later test whose Redis gets the same free port would find an orphaned producer
/// or processor of an earlier run in its consumer groups. The kernel ties the child to the
/// spawning *thread*, here the test's runtime thread, which lives as long as the test.
/// util-linux's `setpriv` sets the signal and then execs `binary` (same pid, so signals the
/// harness sends still reach the service); without `setpriv` the command runs `binary` as is.
pub fn command_dying_with_parent(binary: &Path) -> Command {
    match find_on_path("setpriv") {
        Ok(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(binary);
            command
        }
        Err(_) => Command::new(binary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_lines_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a\nb", 5), "a\nb");
        assert_eq!(tail_lines("", 3), "");
    }

    #[test]
    fn free_port_is_bindable_and_not_the_developer_redis() -> anyhow::Result<()> {
        let port = free_port()?;
        assert_ne!(port, RESERVED_PORT);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        Ok(())
    }
}
