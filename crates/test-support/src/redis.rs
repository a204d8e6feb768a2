//! Throwaway `redis-server` instances for tests: a single node that can be stopped and
//! restarted on the same port (Redis outage tests), and a 3-master cluster on loopback.
//!
//! Each instance is a child of the test process with its own temp dir, on a free port that is
//! never 6379 (a developer Redis runs there). Dropping the handle kills exactly our children.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use fred::prelude::*;
use fred::types::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::process::{
    command_dying_with_parent, find_on_path, free_port, kill_and_reap, pid_listens_on, tail_lines,
};

/// How long a freshly spawned node may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the cluster may take to report `cluster_state:ok` on every node.
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// A port picked by `free_port` can be taken before redis binds it; retry on a new port.
const SPAWN_ATTEMPTS: usize = 3;

/// One `redis-server` child on `127.0.0.1:<port>`, without persistence.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    binary: PathBuf,
    /// `None` while stopped (between `stop` and `restart`).
    child: Option<Child>,
    /// Extra flags, kept so a restart runs the node the same way.
    extra: Vec<&'static str>,
    /// Holds the log file; removed on drop, after the child is killed.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a node on a free loopback port and waits until it answers PING.
    pub async fn start() -> anyhow::Result<RedisServer> {
        Self::start_with(&[]).await
    }

    /// Like [`RedisServer::start`], but every write is fsynced to an append-only file, so the
    /// data survives [`RedisServer::stop`] + [`RedisServer::restart`] (an outage, not a loss).
    pub async fn start_durable() -> anyhow::Result<RedisServer> {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await
    }

    async fn start_with(extra: &[&'static str]) -> anyhow::Result<RedisServer> {
        let binary = redis_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("test-redis-")
            .tempdir()
            .context("creating a temp dir for redis-server")?;
        let mut last_err = anyhow!("redis-server was never started");
        for _ in 0..SPAWN_ATTEMPTS {
            let port = free_port()?;
            match spawn_ready(&binary, dir.path(), port, extra).await {
                Ok(child) => {
                    return Ok(RedisServer {
                        port,
                        binary,
                        child: Some(child),
                        extra: extra.to_vec(),
                        dir,
                    });
                }
                Err(err) => last_err = err,
            }
        }
        Err(last_err)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's own log file (useful in failure messages).
    pub fn log_path(&self) -> PathBuf {
        log_path(self.dir.path(), self.port)
    }

    /// Kills the node (SIGKILL, as in a crash) and waits until it is gone. The port stays
    /// reserved for [`RedisServer::restart`]. Does nothing if it is already stopped.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing redis-server")?;
        }
        Ok(())
    }

    /// Starts the node again on the same port (stopping it first if it runs) and waits until
    /// it answers PING. The data set starts empty unless the node is durable.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let child = spawn_ready(&self.binary, self.dir.path(), self.port, &self.extra)
            .await
            .with_context(|| format!("restarting redis-server on port {}", self.port))?;
        self.child = Some(child);
        Ok(())
    }

    /// A connected fred client for this node (see [`connect_client`] for its settings).
    pub async fn client(&self) -> anyhow::Result<Client> {
        connect_client(&self.url()).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

/// Three `redis-server` masters forming one cluster on loopback (no replicas).
#[derive(Debug)]
pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    /// Holds `nodes-<port>.conf` and logs of every node; removed on drop.
    dir: TempDir,
}

impl RedisCluster {
    /// Starts three masters, joins them with `redis-cli --cluster create` and waits until every
    /// node reports `cluster_state:ok`.
    pub async fn start() -> anyhow::Result<RedisCluster> {
        let binary = redis_server_binary()?;
        let cli = find_on_path("redis-cli").map_err(|_| {
            anyhow!(
                "redis-cli not found on PATH; run `make test` which installs it, \
                 or apt-get install redis-server"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("test-redis-cluster-")
            .tempdir()
            .context("creating a temp dir for the redis cluster")?;
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let (port, child) = cluster.spawn_node(&binary).await?;
            cluster.ports.push(port);
            cluster.children.push(child);
        }

        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let create = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), create)
            .await
            .map_err(|_| anyhow!("redis-cli --cluster create did not finish within 60 s"))?
            .context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        for &port in &cluster.ports {
            cluster.wait_cluster_ok(port).await?;
        }
        Ok(cluster)
    }

    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let mut ports = self.ports.iter();
        let mut url = match ports.next() {
            Some(first) => format!("redis-cluster://127.0.0.1:{first}"),
            None => String::from("redis-cluster://"),
        };
        for (i, port) in ports.enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{port}"));
        }
        url
    }

    /// Ports of the three masters, in creation order.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// A connected fred cluster client (see [`connect_client`] for its settings).
    pub async fn client(&self) -> anyhow::Result<Client> {
        connect_client(&self.url()).await
    }

    async fn spawn_node(&self, binary: &Path) -> anyhow::Result<(u16, Child)> {
        let mut last_err = anyhow!("cluster node was never started");
        for _ in 0..SPAWN_ATTEMPTS {
            let port = free_port()?;
            let conf = format!("nodes-{port}.conf");
            let extra = ["--cluster-enabled", "yes", "--cluster-config-file", &conf];
            match spawn_ready(binary, self.dir.path(), port, &extra).await {
                Ok(child) => return Ok((port, child)),
                Err(err) => last_err = err,
            }
        }
        Err(last_err)
    }

    async fn wait_cluster_ok(&self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + CLUSTER_OK_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match raw_command(port, &["CLUSTER", "INFO"]).await {
                Ok(info) if info.lines().any(|l| l.trim() == "cluster_state:ok") => return Ok(()),
                Ok(info) => last = info,
                Err(err) => last = err.to_string(),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        bail!(
            "cluster node {port} did not report cluster_state:ok within {CLUSTER_OK_TIMEOUT:?}; \
             last CLUSTER INFO: {last}"
        )
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            kill_and_reap(child);
        }
    }
}

/// Calls per command from `INFO commandstats` (`cmdstat_xadd:calls=…` → `xadd`): every call
/// Redis ran, those inside scripts included, failed ones too.
pub async fn command_calls(client: &Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let info: String = client
        .info(Some(fred::types::InfoKind::CommandStats))
        .await
        .context("INFO commandstats")?;
    Ok(parse_commandstats(&info))
}

fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Connects a fred client to `url` (`redis://` or `redis-cluster://`).
///
/// Commands time out after 5 s so a test against a stopped Redis fails instead of hanging;
/// the client reconnects forever (every 100 ms) so it survives [`RedisServer::restart`].
pub async fn connect_client(url: &str) -> anyhow::Result<Client> {
    let config = Config::from_url(url).with_context(|| format!("parsing redis url {url}"))?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(2))
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .build()
        .context("building the fred client")?;
    tokio::time::timeout(Duration::from_secs(10), client.init())
        .await
        .map_err(|_| anyhow!("connecting to {url} did not finish within 10 s"))?
        .with_context(|| format!("connecting to {url}"))?;
    Ok(client)
}

/// One consumer of a stream's consumer group, as `XINFO CONSUMERS` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConsumer {
    pub name: String,
    /// Entries delivered to it and not yet acknowledged.
    pub pending: i64,
    /// Milliseconds since Redis last counted it seen (on 7.0: a read that returned entries or
    /// named an id).
    pub idle_ms: i64,
}

/// The consumers of `group` on the stream `key`, in Redis's order (by name). Reads the
/// reply as RESP2 (flat field list) or RESP3 (map).
pub async fn group_consumers(
    client: &Client,
    key: &str,
    group: &str,
) -> anyhow::Result<Vec<GroupConsumer>> {
    let reply: Value = client.xinfo_consumers(key, group).await?;
    let Value::Array(consumers) = reply else {
        bail!("XINFO CONSUMERS {key} {group}: {reply:?}");
    };
    consumers
        .into_iter()
        .map(|consumer| {
            let mut fields: Vec<(String, Value)> = match consumer {
                Value::Map(map) => map
                    .inner()
                    .into_iter()
                    .filter_map(|(k, v)| k.into_string().map(|k| (k, v)))
                    .collect(),
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|pair| Some((pair[0].as_string()?, pair.get(1)?.clone())))
                    .collect(),
                other => bail!("XINFO CONSUMERS entry: {other:?}"),
            };
            let mut field = |name: &str| {
                fields
                    .iter()
                    .position(|(k, _)| k == name)
                    .map(|i| fields.swap_remove(i).1)
                    .with_context(|| format!("no {name} in an XINFO CONSUMERS entry"))
            };
            Ok(GroupConsumer {
                name: field("name")?.into_string().context("name")?,
                pending: field("pending")?.as_i64().context("pending")?,
                idle_ms: field("idle")?.as_i64().context("idle")?,
            })
        })
        .collect()
}

fn redis_server_binary() -> anyhow::Result<PathBuf> {
    find_on_path("redis-server").map_err(|_| {
        anyhow!(
            "redis-server not found on PATH; run `make test` which installs it, \
             or apt-get install redis-server"
        )
    })
}

fn log_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("redis-{port}.log"))
}

/// Spawns one node with our common flags plus `extra`, then waits for PING. On failure the
/// child is killed and the error carries the tail of its output.
async fn spawn_ready(
    binary: &Path,
    dir: &Path,
    port: u16,
    extra: &[&str],
) -> anyhow::Result<Child> {
    let log = log_path(dir, port);
    // Errors before redis opens its log file (bad flags, port in use) go to stderr.
    let stderr_path = dir.join(format!("redis-{port}.stderr"));
    let stderr = std::fs::File::create(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    let mut command = command_dying_with_parent(binary);
    command
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))?;

    match wait_for_ping(&mut child, port).await {
        Ok(()) => Ok(child),
        Err(err) => {
            let _ = child.kill().await;
            let out = read_tail(&stderr_path).await;
            let log = read_tail(&log).await;
            Err(err.context(format!(
                "redis-server on port {port} did not become ready\nstderr:\n{out}\nlog:\n{log}"
            )))
        }
    }
}

async fn wait_for_ping(child: &mut Child, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_err = anyhow!("no PING attempted");
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("checking redis-server")? {
            bail!("redis-server exited early with {status}");
        }
        // A PONG from a server another test started on this port (ours then exits on
        // EADDRINUSE) must not count: wait until the socket is our child's own.
        let ours = match child.id() {
            Some(pid) => pid_listens_on(pid, port)?,
            None => false,
        };
        if !ours {
            last_err = anyhow!("redis-server does not listen on port {port} yet");
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        }
        match raw_command(port, &["PING"]).await {
            Ok(reply) if reply == "PONG" => return Ok(()),
            Ok(reply) => last_err = anyhow!("unexpected PING reply {reply:?}"),
            Err(err) => last_err = err,
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Err(last_err.context(format!("no PONG within {READY_TIMEOUT:?}")))
}

async fn read_tail(path: &Path) -> String {
    match tokio::fs::read(path).await {
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), 20),
        Err(err) => format!("<cannot read {}: {err}>", path.display()),
    }
}

/// Sends one command over a fresh TCP connection and returns a simple-string, integer or
/// bulk-string reply as text. Deliberately tiny: it only serves readiness checks, where using
/// fred would add reconnect logic we do not want while a node is still starting.
async fn raw_command(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let io = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await?;

        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at_checked(1).unwrap_or(("", ""));
        match kind {
            "+" | ":" => Ok(rest.to_owned()),
            "-" => Err(anyhow!("redis error: {rest}")),
            "$" => {
                let len: usize = rest
                    .parse()
                    .map_err(|_| anyhow!("bad bulk length {rest:?}"))?;
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body).await?;
                body.truncate(len);
                Ok(String::from_utf8_lossy(&body).into_owned())
            }
            _ => Err(anyhow!("unexpected reply line {line:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(1), io)
        .await
        .map_err(|_| anyhow!("no reply from 127.0.0.1:{port} within 1 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_lines_are_parsed() {
        let info = "# Commandstats\r\ncmdstat_xadd:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=7,usec=9\r\n";
        let calls = parse_commandstats(info);
        assert_eq!(calls.get("xadd"), Some(&12));
        assert_eq!(calls.get("evalsha"), Some(&7));
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn cluster_url_lists_every_node() -> anyhow::Result<()> {
        // No processes: only the url shape is under test.
        let cluster = RedisCluster {
            ports: vec![7001, 7002, 7003],
            children: Vec::new(),
            dir: tempfile::tempdir()?,
        };
        assert_eq!(
            cluster.url(),
            "redis-cluster://127.0.0.1:7001?node=127.0.0.1:7002&node=127.0.0.1:7003"
        );
        Ok(())
    }
}
