//! Distributed tracing: with OTLP export on, one chat is one trace across gateway, producer and
//! processor (the `traceparent` rides in the job and the event records). The collector is a
//! tiny OTLP/HTTP JSON receiver inside the test.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use fred::prelude::*;
use serde_json::Value;
use test_support::wait_until;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::stack::{
    Stack, StackOptions, TIMEOUT, expected_text, options, payloads, str_field, text_of,
};
use service_kit::config::OtlpProtocol;

const POLL: Duration = Duration::from_millis(100);
/// Largest export request the receiver accepts (the SDK sends batches of at most 512 spans).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// An OTLP/HTTP receiver for JSON exports: `POST /v1/traces` is answered `200 {}` and its body
/// kept. Stops when dropped.
struct OtlpReceiver {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

impl OtlpReceiver {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&bodies);
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    // A broken connection only loses that export; the SDK retries on its next
                    // batch and the test's wait reports what never arrived.
                    let _ = serve_connection(socket, store).await;
                });
            }
        });
        Ok(Self {
            port,
            bodies,
            server,
        })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<ReceivedSpan> {
        let bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.iter().flat_map(spans_of).collect()
    }
}

/// Serves HTTP/1.1 requests on one (keep-alive) connection until the client closes it.
async fn serve_connection(socket: TcpStream, store: Arc<Mutex<Vec<Value>>>) -> anyhow::Result<()> {
    let mut reader = BufReader::new(socket);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let mut content_length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "content-length" {
                    content_length = Some(value.parse::<usize>()?);
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let body = if chunked {
            read_chunked(&mut reader).await?
        } else {
            let length = content_length.unwrap_or(0);
            anyhow::ensure!(length <= MAX_BODY, "export of {length} bytes");
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await?;
            body
        };
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, reply) = if method == "POST" && path == "/v1/traces" {
            match serde_json::from_slice::<Value>(&body) {
                Ok(json) => {
                    store
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(json);
                    ("200 OK", "{}")
                }
                Err(_) => ("400 Bad Request", "{}"),
            }
        } else {
            ("404 Not Found", "{}")
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        reader.get_mut().write_all(response.as_bytes()).await?;
    }
}

async fn read_chunked(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line).await?;
        let size_hex = size_line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_hex, 16)?;
        anyhow::ensure!(body.len() + size <= MAX_BODY, "export too large");
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).await?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

/// An attribute's value as text (OTLP JSON writes `intValue` as a string, but accept a number).
fn attribute_text(value: &Value) -> Option<String> {
    let (_, inner) = value.as_object()?.iter().next()?;
    Some(match inner {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    })
}

fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            Some((
                kv["key"].as_str()?.to_owned(),
                attribute_text(&kv["value"])?,
            ))
        })
        .collect()
}

/// The spans of one `ExportTraceServiceRequest` in JSON.
fn spans_of(body: &Value) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = attributes(&resource_spans["resource"]["attributes"])
            .remove("service.name")
            .unwrap_or_default();
        for scope in resource_spans["scopeSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |name: &str| span[name].as_str().unwrap_or_default().to_owned();
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    attributes: attributes(&span["attributes"]),
                });
            }
        }
    }
    out
}

#[tokio::test]
async fn one_chat_is_one_trace_across_gateway_producer_and_processor() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let stack = Stack::start(
        StackOptions {
            service_env: vec![
                // Export every 200 ms instead of 5 s, so the wait below is short.
                env("OTEL_BSP_SCHEDULE_DELAY", "200"),
                // The log level does not decide what is traced: info spans are exported with logs
                // at warn (and a developer's RUST_LOG cannot hide them).
                env("RUST_LOG", "warn"),
            ],
            ..options()
        }
        .with_settings(|s| {
            s.telemetry.otlp_endpoint = Some(receiver.endpoint());
            s.telemetry.otlp_protocol = OtlpProtocol::HttpJson;
            s.telemetry.sample_ratio = 1.0;
        }),
    )
    .await?;

    let prompt = "trace me [[mock tokens=12]]";
    let started = stack.start_chat("traced", prompt).await?;
    let request_id = str_field(&started, "requestId")?.to_owned();
    let events = payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)?;
    assert_eq!(text_of(&events), expected_text(prompt, 12));

    // The chat's trace: the one of this request's producer attempt, once the gateway's start and
    // delivery and at least one processor span of it have arrived too.
    let wanted = [
        "chat.start",
        "producer.attempt",
        "record.apply",
        "sse.deliver",
    ];
    let trace = wait_until(TIMEOUT, POLL, || {
        let spans = receiver.spans();
        let request_id = request_id.clone();
        async move {
            let Some(attempt) = spans.iter().find(|s| {
                s.name == "producer.attempt" && s.attributes.get("request_id") == Some(&request_id)
            }) else {
                return Ok(None);
            };
            let trace: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.trace_id == attempt.trace_id)
                .cloned()
                .collect();
            let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
            Ok(wanted.iter().all(|n| names.contains(n)).then_some(trace))
        }
    })
    .await
    .with_context(|| {
        let seen: BTreeSet<(String, String)> = receiver
            .spans()
            .into_iter()
            .map(|s| (s.service, s.name))
            .collect();
        format!("spans received: {seen:?}")
    })?;

    let trace_id = trace[0].trace_id.clone();
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    assert_ne!(trace_id, "0".repeat(32));
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for service in ["gateway", "producer", "processor"] {
        assert!(
            services.contains(service),
            "{service} missing in {services:?}"
        );
    }
    let one = |name: &str| -> anyhow::Result<&ReceivedSpan> {
        let mut found = trace.iter().filter(|s| s.name == name);
        match (found.next(), found.next()) {
            (Some(span), None) => Ok(span),
            (None, _) => bail!("no {name} span in the trace"),
            (Some(_), Some(_)) => bail!("more than one {name} span in the trace"),
        }
    };

    // The shape: gateway start → producer claim and attempt → upstream call → processor.
    let start = one("chat.start")?;
    assert_eq!(start.service, "gateway");
    let claim = one("job.claim")?;
    assert_eq!(claim.service, "producer");
    assert_eq!(claim.parent_span_id, start.span_id);
    assert_eq!(
        claim.attributes.get("claim").map(String::as_str),
        Some("new")
    );
    let attempt = one("producer.attempt")?;
    assert_eq!(attempt.parent_span_id, start.span_id);
    assert_eq!(
        attempt.attributes.get("attempt").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        attempt.attributes.get("tokens").map(String::as_str),
        Some("12")
    );
    assert_eq!(
        attempt.attributes.get("outcome").map(String::as_str),
        Some("stop")
    );
    let deliver = one("sse.deliver")?;
    assert_eq!(deliver.service, "gateway");
    assert_eq!(deliver.parent_span_id, start.span_id);
    let call = one("llm.call")?;
    assert_eq!(call.service, "producer");
    assert_eq!(call.parent_span_id, attempt.span_id);
    assert_eq!(
        call.attributes.get("tokens").map(String::as_str),
        Some("12")
    );
    assert_eq!(
        call.attributes.get("finish_reason").map(String::as_str),
        Some("stop")
    );
    assert!(call.attributes.contains_key("ttft_ms"), "{call:?}");
    // Token writes are aggregated: no span per token anywhere in the trace.
    assert!(trace.len() < 12, "{} spans for 12 tokens", trace.len());
    for apply in trace.iter().filter(|s| s.name == "record.apply") {
        assert_eq!(apply.service, "processor");
        assert!(
            apply.parent_span_id == attempt.span_id || apply.parent_span_id == call.span_id,
            "{apply:?} is not a child of the attempt"
        );
    }

    // The records carry the attempt's trace context; the start record is written in the
    // attempt's span itself.
    let shard_records = stream_records(&stack).await?;
    let started_tp = shard_records
        .iter()
        .find(|fields| {
            fields.get("k").map(String::as_str) == Some("start")
                && fields.get("rid") == Some(&request_id)
        })
        .and_then(|fields| fields.get("tp"))
        .context("no start record with a traceparent")?;
    assert_eq!(started_tp, &format!("00-{trace_id}-{}-01", attempt.span_id));
    Ok(())
}

/// The fields of every record in every event shard.
async fn stream_records(stack: &Stack) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let redis = stack.redis_client().await?;
    let mut records = Vec::new();
    // The stack configures 4 event shards.
    for shard in 0..4 {
        let key = stream_schema::RedisKey::events_shard(shard);
        let entries: Vec<(String, HashMap<String, String>)> =
            redis.xrange(key.as_str(), "-", "+", None).await?;
        records.extend(entries.into_iter().map(|(_, fields)| fields));
    }
    Ok(records)
}
