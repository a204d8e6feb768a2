//! What the gateway does with a connection that is slow to send its request.

use std::time::Duration;

use anyhow::ensure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::TestApp;

/// Everything the gateway sends on `socket` until it closes it; the deadline only bounds a
/// gateway that never answers.
async fn answer(socket: &mut TcpStream) -> anyhow::Result<String> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[test]
fn a_connection_that_sends_no_request_is_answered_408_after_the_configured_time()
-> anyhow::Result<()> {
    let app = TestApp::start_with(|settings| settings.gateway.client_request_timeout_ms = 300)?;
    app.block_on(async {
        let mut socket = TcpStream::connect(app.base.trim_start_matches("http://")).await?;
        let answer = answer(&mut socket).await?;
        ensure!(answer.starts_with("HTTP/1.1 408"), "answer: {answer:?}");
        Ok(())
    })
}

/// actix-web's own default is 5 s from the accept; under a burst of new connections on a
/// busy machine that cut off a chat start in the benchmark. The gateway's default waits longer.
#[test]
fn a_request_sent_later_than_actixs_own_default_is_still_served() -> anyhow::Result<()> {
    let app = TestApp::start()?;
    app.block_on(async {
        let mut socket = TcpStream::connect(app.base.trim_start_matches("http://")).await?;
        // The behaviour under test is the passing of time itself: past actix's 5 s.
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            .await?;
        let answer = answer(&mut socket).await?;
        ensure!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
        Ok(())
    })
}
