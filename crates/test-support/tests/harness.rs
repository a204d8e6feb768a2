//! Tests of the test harness itself: real redis-server processes, child processes and signals,
//! and the SSE client against a canned HTTP server.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use anyhow::{Context, bail};
use fred::prelude::*;
use test_support::{
    RedisCluster, RedisServer, ServiceProcess, SseClient, find_on_path, wait_for_http_ok,
    wait_until,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn redis_server_answers_again_after_restart_on_the_same_port() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let port = redis.port();
    assert_ne!(port, 6379);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    let client = redis.client().await?;
    let pong: String = client.ping(None).await?;
    assert_eq!(pong, "PONG");

    redis.stop().await?;
    let down = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(down.is_err(), "a stopped server still accepts connections");

    redis.restart().await?;
    assert_eq!(redis.port(), port);
    // The same client reconnects by itself; a fresh one must work at once.
    let fresh = redis.client().await?;
    let pong: String = fresh.ping(None).await?;
    assert_eq!(pong, "PONG");
    let reconnected: String = wait_until(TIMEOUT, Duration::from_millis(50), || async {
        Ok(client.ping::<String>(None).await.ok())
    })
    .await?;
    assert_eq!(reconnected, "PONG");
    Ok(())
}

#[tokio::test]
async fn redis_cluster_serves_keys_owned_by_every_master() -> anyhow::Result<()> {
    let cluster = RedisCluster::start().await?;
    assert_eq!(cluster.ports().len(), 3);
    let client = cluster.client().await?;

    // One key in each third of the slot space: `cluster create` gives each master one third.
    let mut keys: Vec<String> = Vec::new();
    for range in [0..5461_u16, 5461..10923, 10923..16384] {
        let key = (0..10_000)
            .map(|i| format!("harness:{i}"))
            .find(|k| range.contains(&fred::util::redis_keyslot(k.as_bytes())))
            .context("no key found for a slot range")?;
        keys.push(key);
    }
    for key in &keys {
        let _: () = client.set(key, key.as_str(), None, None, false).await?;
    }
    for key in &keys {
        let value: String = client.get(key).await?;
        assert_eq!(&value, key);
    }
    Ok(())
}

#[tokio::test]
async fn service_process_is_stopped_resumed_and_killed_by_signal() -> anyhow::Result<()> {
    let sleep = find_on_path("sleep")?;
    let mut process = ServiceProcess::spawn("sleeper", &sleep, &["30".to_owned()], &[])?;
    assert!(
        process
            .log_path()
            .to_string_lossy()
            .ends_with(&format!("sleeper-{}.log", process.pid()))
    );

    process.sigstop()?;
    process.sigcont()?;
    assert!(process.try_exit_status()?.is_none());
    process.sigkill()?;
    let status = process.wait_exit(TIMEOUT).await?;
    assert_eq!(status.signal(), Some(9));
    // The pid may be reused once reaped: signalling must now be refused.
    assert!(process.sigterm().is_err());
    Ok(())
}

/// What keeps parallel tests from racing for ports: a child owns a port only when its own
/// socket listens there, not when something answers on it.
#[tokio::test]
async fn a_child_owns_only_the_port_its_own_socket_listens_on() -> anyhow::Result<()> {
    // Another process (this test) listens on the port the child was meant to take.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_port = taken.local_addr()?.port();
    let sleep = find_on_path("sleep")?;
    let bystander = ServiceProcess::spawn("bystander", &sleep, &["30".to_owned()], &[])?;
    assert!(!bystander.listens_on(taken_port)?);

    let port = test_support::free_port()?;
    let dir = tempfile::tempdir()?;
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        &dir.path().display().to_string(),
    ]
    .map(str::to_owned);
    let redis = ServiceProcess::spawn("owner", &find_on_path("redis-server")?, &args, &[])?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !redis.listens_on(port)? {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "redis-server never listened on {port}: {}",
                redis.log_tail(20).await
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!redis.listens_on(taken_port)?);
    assert!(!bystander.listens_on(port)?);
    Ok(())
}

/// Set in the copy of this test binary that plays the test process to be killed.
const ORPHAN_PARENT_ENV: &str = "HARNESS_TEST_ORPHAN_PARENT";

/// A test process killed by a signal never runs `kill_on_drop`: its services must still die,
/// or they reconnect forever to whatever Redis a later test starts on the same port.
#[tokio::test]
async fn a_service_dies_with_the_test_process_that_spawned_it() -> anyhow::Result<()> {
    const NAME: &str = "a_service_dies_with_the_test_process_that_spawned_it";
    if std::env::var_os(ORPHAN_PARENT_ENV).is_some() {
        // The parent role: spawn a service, say its pid, wait to be killed.
        let sleep = find_on_path("sleep")?;
        let process = ServiceProcess::spawn("orphan", &sleep, &["60".to_owned()], &[])?;
        #[expect(
            clippy::print_stdout,
            reason = "the parent role tells the test its child's pid on stdout"
        )]
        {
            println!("orphan-pid={}", process.pid());
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        return Ok(());
    }
    let mut parent = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", NAME, "--nocapture"])
        .env(ORPHAN_PARENT_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = parent.stdout.take().context("parent stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let pid: u32 = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(pid) = line.strip_prefix("orphan-pid=") {
                return Ok(pid.trim().parse()?);
            }
        }
        bail!("the parent exited without spawning")
    })
    .await
    .context("the parent never said its child's pid")??;

    // `setpriv` arms the signal just before it execs the service: kill the parent only once
    // the child runs `sleep` (earlier, nothing would be armed yet, as in no real test).
    wait_until(TIMEOUT, Duration::from_millis(10), || async move {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        Ok((comm.trim() == "sleep").then_some(()))
    })
    .await
    .context("the child never ran its program")?;
    parent.kill().await?;
    // Dead means gone, or a zombie until init reaps it.
    wait_until(TIMEOUT, Duration::from_millis(20), || async move {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let after_name = stat.rsplit_once(')')?.1.to_owned();
                after_name.split_whitespace().next().map(str::to_owned)
            });
        Ok(matches!(state.as_deref(), None | Some("Z" | "X")).then_some(()))
    })
    .await
    .context("the killed test's child is still running")
}

#[tokio::test]
async fn service_process_captures_stdout_and_stderr_and_env() -> anyhow::Result<()> {
    let sh = find_on_path("sh")?;
    let script = "echo out-$GREETING; echo err-line >&2; exit 3".to_owned();
    let mut process = ServiceProcess::spawn(
        "talker",
        &sh,
        &["-c".to_owned(), script],
        &[("GREETING".to_owned(), "hello".to_owned())],
    )?;
    let status = process.wait_exit(TIMEOUT).await?;
    assert_eq!(status.code(), Some(3));
    let tail = process.log_tail(10).await;
    assert!(tail.contains("out-hello"), "{tail}");
    assert!(tail.contains("err-line"), "{tail}");
    assert_eq!(process.log_tail(1).await, "err-line");
    Ok(())
}

#[tokio::test]
async fn wait_exit_times_out_on_a_running_process() -> anyhow::Result<()> {
    let sleep = find_on_path("sleep")?;
    let mut process = ServiceProcess::spawn("slow", &sleep, &["30".to_owned()], &[])?;
    assert!(process.wait_exit(Duration::from_millis(100)).await.is_err());
    process.sigterm()?;
    let status = process.wait_exit(TIMEOUT).await?;
    assert_eq!(status.signal(), Some(15));
    Ok(())
}

/// A one-shot HTTP server that answers every connection with `response` after reading the
/// request head; the request head is handed back through the returned channel.
async fn canned_server(
    response: String,
) -> anyhow::Result<(String, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (requests, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0_u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = requests.send(String::from_utf8_lossy(&head).into_owned());
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok((base, received))
}

const SSE_BODY: &str = ": ping\n\n\
id: 1-0\ndata: {\"type\":\"start\"}\n\n\
: ping\n\n\
id: 1-1\ndata: {\"type\":\"token\",\"sequence\":1,\n\
data: \"content\":\"Once\"}\n\n\
event: custom\ndata: no-id\n\n\
id: 1-2\ndata: {\"type\":\"complete\"}\n\n";

fn sse_response() -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\n\r\n{SSE_BODY}"
    )
}

#[tokio::test]
async fn sse_client_parses_events_and_skips_comments() -> anyhow::Result<()> {
    let (base, mut requests) = canned_server(sse_response()).await?;
    let mut sse =
        SseClient::connect(&format!("{base}/stream"), &[("Last-Event-ID", "0-9")]).await?;
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    let head = requests.recv().await.context("no request seen")?;
    assert!(
        head.to_ascii_lowercase().contains("last-event-id: 0-9"),
        "{head}"
    );

    let events = sse.collect_to_end(TIMEOUT).await?;
    let ids: Vec<Option<&str>> = events.iter().map(|e| e.id.as_deref()).collect();
    // The event without `id:` inherits the previous one, as in a browser.
    assert_eq!(ids, [Some("1-0"), Some("1-1"), Some("1-1"), Some("1-2")]);
    assert_eq!(events[0].json()?["type"], "start");
    let token = events[1].json()?;
    assert_eq!(token["content"], "Once");
    assert_eq!(token["sequence"], 1);
    assert_eq!(events[0].event, None);
    assert_eq!(events[2].event.as_deref(), Some("custom"));
    assert!(events[2].json().is_err());
    assert!(events.iter().all(|e| !e.data.contains("ping")));
    assert_eq!(sse.last_event_id(), Some("1-2"));
    assert_eq!(sse.next_event(TIMEOUT).await?, None);
    Ok(())
}

#[tokio::test]
async fn sse_collect_until_stops_at_the_first_match() -> anyhow::Result<()> {
    let (base, _requests) = canned_server(sse_response()).await?;
    let mut sse = SseClient::connect(&base, &[]).await?;
    let events = sse
        .collect_until(TIMEOUT, |e| e.id.as_deref() == Some("1-1"))
        .await?;
    assert_eq!(events.len(), 2);
    let rest = sse.collect_until(TIMEOUT, |_| false).await;
    let Err(err) = rest else {
        bail!("collect_until succeeded although the stop condition never held");
    };
    assert!(format!("{err:#}").contains("ended before"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn sse_next_event_times_out_on_a_silent_stream() -> anyhow::Result<()> {
    // Headers and a comment only, then silence with the connection held open.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = [0_u8; 1024];
        let _ = socket.read(&mut buf).await?;
        socket
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Transfer-Encoding: chunked\r\n\r\n8\r\n: ping\n\n\r\n",
            )
            .await?;
        // Keep the socket open until the client gives up.
        let _ = socket.read(&mut buf).await;
        anyhow::Ok(())
    });
    let mut sse = SseClient::connect(&url, &[]).await?;
    assert!(sse.next_event(Duration::from_millis(200)).await.is_err());
    drop(sse);
    tokio::time::timeout(TIMEOUT, server).await???;
    Ok(())
}

#[tokio::test]
async fn sse_connect_reports_status_and_body_of_a_refusal() -> anyhow::Result<()> {
    let body = r#"{"error":{"code":"unauthorized","message":"bad token"}}"#;
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (base, _requests) = canned_server(response).await?;
    let Err(err) = SseClient::connect(&base, &[]).await else {
        bail!("connect succeeded on a 401");
    };
    let message = format!("{err:#}");
    assert!(message.contains("401"), "{message}");
    assert!(message.contains("unauthorized"), "{message}");
    Ok(())
}

#[tokio::test]
async fn wait_for_http_ok_succeeds_against_a_healthy_server() -> anyhow::Result<()> {
    let response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let (base, _requests) = canned_server(response.to_owned()).await?;
    wait_for_http_ok(&format!("{base}/healthz"), TIMEOUT).await?;
    // A port nobody listens on never becomes healthy.
    let port = test_support::free_port()?;
    let refused = wait_for_http_ok(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_millis(200),
    )
    .await;
    assert!(refused.is_err());
    Ok(())
}
