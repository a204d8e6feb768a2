//! A Server-Sent Events client for tests: connect, then read events with deadlines.
//!
//! Parsing follows the EventSource rules (via `eventsource-stream`): comment lines such as
//! `: ping` are dropped, multi-line `data:` is joined, and an event without `id:` inherits the
//! last id seen, exactly as a browser's `lastEventId` would.

use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

/// How long `connect` waits for the response headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One SSE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field, or the last id seen before it; `None` if no id was ever sent.
    pub id: Option<String>,
    pub data: String,
    /// The `event:` field; `None` when absent (the default `message` type).
    pub event: Option<String>,
}

impl SseEvent {
    /// Parses `data` as JSON (our gateway sends one JSON object per event).
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.data)
            .with_context(|| format!("SSE data is not JSON: {:?}", self.data))
    }

    fn from_raw(raw: Event) -> SseEvent {
        SseEvent {
            id: (!raw.id.is_empty()).then_some(raw.id),
            data: raw.data,
            // The parser reports a missing `event:` as "message".
            event: (raw.event != "message").then_some(raw.event),
        }
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// Entry point: `SseClient::connect(url, headers)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SseClient;

impl SseClient {
    /// GETs `url` with `Accept: text/event-stream` plus `headers` (e.g. `Last-Event-ID`,
    /// `Authorization`) and returns the open stream. Any status other than 200 is an error
    /// carrying the status and the response body.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<SseConnection> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        let send = || {
            let mut request = http.get(url).header("Accept", "text/event-stream");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            tokio::time::timeout(CONNECT_TIMEOUT, request.send())
        };
        let timed_out = || anyhow!("GET {url}: no response headers within {CONNECT_TIMEOUT:?}");
        // Like EventSource, reconnect once after a network error before any response (on a
        // loaded 2-core machine the server may drop a connection whose request head it read
        // late); an HTTP status is an answer and is never retried.
        let response = match send().await.map_err(|_| timed_out())? {
            Err(error) if error.is_request() || error.is_connect() => send()
                .await
                .map_err(|_| timed_out())?
                .with_context(|| format!("GET {url} (after a network error: {error})"))?,
            other => other.with_context(|| format!("GET {url}"))?,
        };

        let status = response.status();
        if status != StatusCode::OK {
            let body = tokio::time::timeout(CONNECT_TIMEOUT, response.text())
                .await
                .map_err(|_| anyhow!("timed out reading the body"))
                .and_then(|body| body.map_err(anyhow::Error::from))
                .unwrap_or_else(|err| format!("<unreadable body: {err}>"));
            bail!("GET {url} answered {status}: {body}");
        }
        let headers = response.headers().clone();
        let events: EventStream = Box::pin(response.bytes_stream().eventsource());
        Ok(SseConnection {
            status,
            headers,
            events,
            last_event_id: None,
        })
    }
}

/// An open SSE response being read event by event.
pub struct SseConnection {
    status: StatusCode,
    headers: HeaderMap,
    events: EventStream,
    /// Updated by every event read; what a client would send as `Last-Event-ID` to resume.
    last_event_id: Option<String>,
}

impl std::fmt::Debug for SseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseConnection")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("last_event_id", &self.last_event_id)
            .finish_non_exhaustive()
    }
}

impl SseConnection {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// One response header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The id of the last event read, to resume with `Last-Event-ID`.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The next event; `Ok(None)` when the server ended the response cleanly. Waiting longer
    /// than `timeout` is an error.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Option<SseEvent>> {
        self.next_event_until(Instant::now() + timeout).await
    }

    /// Every event up to and including the first one for which `stop` is true. The stream
    /// ending first, or `timeout` passing (for the whole collection), is an error that lists
    /// what arrived.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        stop: impl Fn(&SseEvent) -> bool,
    ) -> anyhow::Result<Vec<SseEvent>> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            match self.next_event_until(deadline).await {
                Ok(Some(event)) => {
                    let done = stop(&event);
                    events.push(event);
                    if done {
                        return Ok(events);
                    }
                }
                Ok(None) => bail!(
                    "SSE stream ended before the stop condition; received {}",
                    summarize(&events)
                ),
                Err(err) => {
                    return Err(err.context(format!("collecting; received {}", summarize(&events))));
                }
            }
        }
    }

    /// Every remaining event until the server ends the response; `timeout` covers the whole
    /// collection.
    pub async fn collect_to_end(&mut self, timeout: Duration) -> anyhow::Result<Vec<SseEvent>> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            match self.next_event_until(deadline).await {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return Ok(events),
                Err(err) => {
                    return Err(err.context(format!(
                        "waiting for the end of the stream; received {}",
                        summarize(&events)
                    )));
                }
            }
        }
    }

    async fn next_event_until(&mut self, deadline: Instant) -> anyhow::Result<Option<SseEvent>> {
        match tokio::time::timeout_at(deadline, self.events.next()).await {
            Err(_) => bail!("no SSE event before the deadline"),
            Ok(None) => Ok(None),
            Ok(Some(Err(err))) => Err(anyhow!("reading the SSE stream: {err}")),
            Ok(Some(Ok(raw))) => {
                let event = SseEvent::from_raw(raw);
                if event.id.is_some() {
                    self.last_event_id.clone_from(&event.id);
                }
                Ok(Some(event))
            }
        }
    }
}

/// A short description of collected events for error messages (data can be long).
fn summarize(events: &[SseEvent]) -> String {
    const SHOWN: usize = 5;
    let shown: Vec<String> = events
        .iter()
        .rev()
        .take(SHOWN)
        .rev()
        .map(|e| {
            let data: String = e.data.chars().take(120).collect();
            format!("[id={:?} {data}]", e.id)
        })
        .collect();
    format!("{} events, last: {}", events.len(), shown.join(" "))
}
