//! A tiny static file server on loopback for a built web app (the `useChat` app): its own
//! origin, so the page talks to the gateway cross-origin the way a real front end does.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Serves the files directly in `dir` (no subdirectories) until dropped.
pub struct StaticSite {
    port: u16,
    task: JoinHandle<()>,
}

impl StaticSite {
    pub async fn serve(dir: PathBuf) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(answer(client, dir.clone()));
            }
        });
        Ok(Self { port, task })
    }

    /// `http://127.0.0.1:<port>`: the page's origin, for `gateway.cors_allowed_origins`.
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for StaticSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request per connection: `GET /<file>[?query]`, `/` being `index.html`.
async fn answer(mut client: TcpStream, dir: PathBuf) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let name = match path.trim_start_matches('/') {
        "" => "index.html",
        name => name,
    };
    let file = file_in(&dir, name);
    let body = match &file {
        Some(path) => tokio::fs::read(path).await.ok(),
        None => None,
    };
    let response = match body {
        Some(body) => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\n\
                 cache-control: no-store\r\nconnection: close\r\n\r\n",
                content_type(name),
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(&body);
            out
        }
        None => {
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
        }
    };
    let _ = client.write_all(&response).await;
    let _ = client.shutdown().await;
}

/// Only plain names of files in `dir`: no paths, no hidden files.
fn file_in(dir: &Path, name: &str) -> Option<PathBuf> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    plain.then(|| dir.join(name))
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "application/octet-stream",
    }
}
