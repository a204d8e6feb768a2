//! The suite's stack: test-support's launcher (`test_support::Stack`: its own redis-server and
//! the real service binaries on free loopback ports, killed on drop) with the suite's settings,
//! and helpers over SSE payloads.

use anyhow::Context;
use serde_json::Value;
use service_kit::Settings;
use test_support::SseEvent;

pub use test_support::stack::{RedisSource, Service, Stack, StackOptions, TIMEOUT};

/// The API key every stack accepts (id `test`), and a second one (id `other`).
pub const API_KEY: &str = "sk-test-key";
pub const OTHER_API_KEY: &str = "sk-other-key";

/// What every test starts unless it says otherwise: one gateway, producer and processor; fast
/// tokens, short blocking reads, a stream-token secret shared by all gateways.
pub fn options() -> StackOptions {
    let mut settings = Settings::default();
    settings.streams.event_shards = 4;
    settings.auth.stream_token_secret = Some("e2e-shared-secret".to_owned().into());
    settings.mock_llm.token_delay_ms = 1;
    settings.mock_llm.default_tokens = 20;
    settings.producer.concurrency = 16;
    settings.producer.claim_block_ms = 500;
    settings.processor.block_ms = 500;
    StackOptions {
        settings,
        api_keys: vec![
            ("test".to_owned(), API_KEY.to_owned()),
            ("other".to_owned(), OTHER_API_KEY.to_owned()),
        ],
        ..StackOptions::default()
    }
}

/// A stack with [`options`].
pub async fn start() -> anyhow::Result<Stack> {
    Stack::start(options()).await
}

/// The text mock-llm generates for a single-prompt chat of `tokens` tokens with seed 0.
pub fn expected_text(prompt: &str, tokens: usize) -> String {
    mock_llm::text::completion_tokens(&mock_llm::text::prompt_text([prompt]), 0, tokens).concat()
}

/// The JSON of each event.
pub fn payloads(events: &[SseEvent]) -> anyhow::Result<Vec<Value>> {
    events.iter().map(SseEvent::json).collect()
}

/// Concatenated token contents.
pub fn text_of(payloads: &[Value]) -> String {
    payloads
        .iter()
        .filter(|p| p["type"] == "token")
        .filter_map(|p| p["content"].as_str())
        .collect()
}

pub fn str_field<'a>(value: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    value[name]
        .as_str()
        .with_context(|| format!("missing string field {name} in {value}"))
}
