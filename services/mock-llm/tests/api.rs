//! mock-llm over real HTTP on port 0: the deterministic text, the OpenAI wire format as the
//! real async-openai client parses it, and every injectable fault.

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, CreateChatCompletionStreamResponse, FinishReason, Role,
};
use futures::StreamExt;
use mock_llm::text::{completion_tokens, count_prompt_tokens, prompt_text};
use mock_llm::{Application, StatsSnapshot};
use service_kit::config::MockLlmSettings;

const SEED: u64 = 7;
const DEFAULT_TOKENS: usize = 12;

struct TestApp {
    base: String,
    http: reqwest::Client,
    handle: actix_web::dev::ServerHandle,
}

impl TestApp {
    fn openai(&self) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", self.base))
                .with_api_key("x"),
        )
    }

    async fn stats(&self) -> anyhow::Result<StatsSnapshot> {
        let url = format!("{}/_mock/stats", self.base);
        Ok(self.http.get(url).send().await?.json().await?)
    }

    /// Polls the stats until `done` holds; a deadline instead of a guessed sleep.
    async fn wait_for_stats(
        &self,
        done: impl Fn(&StatsSnapshot) -> bool,
    ) -> anyhow::Result<StatsSnapshot> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stats = self.stats().await?;
            if done(&stats) {
                return Ok(stats);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "stats never reached the condition: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn post_raw(&self, body: serde_json::Value) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}/v1/chat/completions", self.base);
        Ok(self.http.post(url).json(&body).send().await?)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Not awaited: the runtime of the test is ending anyway; this only starts the stop.
        drop(self.handle.stop(false));
    }
}

fn spawn_app() -> anyhow::Result<TestApp> {
    let app = Application::build(
        MockLlmSettings {
            addr: "127.0.0.1:0".to_owned(),
            default_tokens: DEFAULT_TOKENS,
            token_delay_ms: 0,
            seed: SEED,
        },
        tokio_util::sync::CancellationToken::new(),
    )?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    Ok(TestApp {
        base,
        http: reqwest::Client::new(),
        handle,
    })
}

fn request(model: &str, prompt: &str) -> anyhow::Result<CreateChatCompletionRequestArgs> {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(prompt)
            .build()?
            .into()])
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    Ok(args)
}

/// Everything a stream delivered, until its end or its first error.
#[derive(Debug, Default)]
struct Collected {
    chunks: Vec<CreateChatCompletionStreamResponse>,
    text: String,
    error: Option<OpenAIError>,
}

impl Collected {
    fn finish_reason(&self) -> Option<FinishReason> {
        self.chunks
            .iter()
            .flat_map(|c| &c.choices)
            .find_map(|c| c.finish_reason)
    }

    fn content_chunks(&self) -> usize {
        self.chunks
            .iter()
            .flat_map(|c| &c.choices)
            .filter(|c| c.delta.content.as_deref().is_some_and(|t| !t.is_empty()))
            .count()
    }
}

async fn stream_all(
    app: &TestApp,
    mut request: CreateChatCompletionRequest,
) -> anyhow::Result<Collected> {
    // Explicit: with async-openai's `byot` feature (the producer's) on in a workspace build,
    // `create_stream` no longer sets it by itself.
    request.stream = Some(true);
    let mut stream = app.openai().chat().create_stream(request).await?;
    let mut collected = Collected::default();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                for choice in &chunk.choices {
                    collected
                        .text
                        .push_str(choice.delta.content.as_deref().unwrap_or_default());
                }
                collected.chunks.push(chunk);
            }
            Err(error) => {
                collected.error = Some(error);
                // Whatever follows an error must be the end, never more tokens.
                anyhow::ensure!(stream.next().await.is_none(), "items after an error");
                break;
            }
        }
    }
    Ok(collected)
}

// ---- text -------------------------------------------------------------------------------

#[test]
fn the_text_is_deterministic_and_seeded() {
    let a = completion_tokens("Tell me a story", 1, 50);
    assert_eq!(a, completion_tokens("Tell me a story", 1, 50));
    assert_ne!(a, completion_tokens("Tell me a story", 2, 50));
    assert_ne!(a, completion_tokens("Tell me a story!", 1, 50));
    assert_eq!(a.len(), 50);
}

#[test]
fn a_shorter_completion_is_a_prefix_of_a_longer_one() {
    let long = completion_tokens("prefix", 3, 200);
    for n in [0, 1, 7, 13, 199] {
        assert_eq!(completion_tokens("prefix", 3, n), long[..n]);
    }
}

#[test]
fn directives_do_not_change_the_text_of_the_rest() {
    let plain = prompt_text(["Tell me a story"]);
    let with_directives = prompt_text(["Tell me a story [[mock tokens=5 seed=9]]"]);
    assert_eq!(plain, with_directives);
    assert_eq!(
        prompt_text(["[[mock delay_ms=0]]Tell me", "a story"]),
        "Tell me\na story"
    );
}

#[test]
fn the_text_reads_like_sentences() {
    let tokens = completion_tokens("readable", 0, 300);
    let text = tokens.concat();
    assert!(!tokens[0].starts_with(' '));
    assert!(
        tokens[1..]
            .iter()
            .all(|t| t.starts_with(' ') && t.len() > 1)
    );
    assert!(
        text.chars()
            .all(|c| c.is_ascii_alphabetic() || matches!(c, ' ' | '.' | ','))
    );
    assert!(text.starts_with(|c: char| c.is_ascii_uppercase()));
    for sentence in text.split(". ").skip(1) {
        assert!(
            sentence.starts_with(|c: char| c.is_ascii_uppercase()),
            "{sentence}"
        );
    }
    assert!(!text.contains("  "));
}

// ---- streaming through async-openai ------------------------------------------------------

#[tokio::test]
async fn a_stream_through_async_openai_carries_the_deterministic_text() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let prompt = "Tell me a story about a dragon";

    let got = stream_all(&app, request("mock", prompt)?.build()?).await?;

    assert!(got.error.is_none(), "{:?}", got.error);
    let expected = completion_tokens(&prompt_text([prompt]), SEED, DEFAULT_TOKENS);
    assert_eq!(got.text, expected.concat());
    assert_eq!(got.content_chunks(), DEFAULT_TOKENS);
    assert_eq!(got.finish_reason(), Some(FinishReason::Stop));
    let first = &got.chunks[0];
    assert_eq!(first.choices[0].delta.role, Some(Role::Assistant));
    assert_eq!(first.object, "chat.completion.chunk");
    assert!(got.chunks.iter().all(|c| c.id == first.id));
    assert!(first.id.starts_with("chatcmpl-"));
    let last = got
        .chunks
        .last()
        .map(|c| (c.choices.len(), c.usage.clone()));
    let usage = match last {
        Some((0, Some(usage))) => usage,
        other => anyhow::bail!("last chunk is not a usage chunk: {other:?}"),
    };
    assert_eq!(usage.prompt_tokens, count_prompt_tokens(prompt));
    assert_eq!(usage.prompt_tokens, 7);
    assert_eq!(usage.completion_tokens, 12);
    assert_eq!(usage.total_tokens, 19);
    let stats = app.wait_for_stats(|s| s.streams_completed == 1).await?;
    assert_eq!(stats.streams_disconnected, 0);
    Ok(())
}

#[tokio::test]
async fn directives_in_the_model_name_or_a_message_shape_the_completion() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let by_model = stream_all(&app, request("mock:tokens=5,seed=3", "Hi")?.build()?).await?;
    let by_message = stream_all(
        &app,
        request("mock", "Hi [[mock tokens=4 delay_ms=1]]")?.build()?,
    )
    .await?;

    assert_eq!(by_model.text, completion_tokens("Hi", 3, 5).concat());
    assert_eq!(by_message.text, completion_tokens("Hi", SEED, 4).concat());
    // The model is echoed as sent.
    assert_eq!(by_model.chunks[0].model, "mock:tokens=5,seed=3");
    Ok(())
}

#[tokio::test]
async fn max_tokens_below_the_length_finishes_with_length() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let got = stream_all(
        &app,
        request("mock:tokens=10", "limit")?
            .max_completion_tokens(3u32)
            .build()?,
    )
    .await?;

    assert_eq!(got.text, completion_tokens("limit", SEED, 3).concat());
    assert_eq!(got.finish_reason(), Some(FinishReason::Length));
    let usage = got.chunks.last().and_then(|c| c.usage.clone());
    assert_eq!(usage.map(|u| u.completion_tokens), Some(3));
    Ok(())
}

#[tokio::test]
async fn no_usage_suppresses_the_usage_chunk() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let got = stream_all(&app, request("mock:no_usage=1", "quiet")?.build()?).await?;

    assert!(got.error.is_none());
    assert!(got.chunks.iter().all(|c| c.usage.is_none()));
    assert!(got.chunks.iter().all(|c| !c.choices.is_empty()));
    Ok(())
}

#[tokio::test]
async fn stamp_appends_the_send_time_to_each_token() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let got = stream_all(&app, request("mock:tokens=4,stamp=1", "timed")?.build()?).await?;

    let expected = completion_tokens("timed", SEED, 4);
    let contents: Vec<&str> = got
        .chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.as_deref())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(contents.len(), expected.len());
    for (content, token) in contents.iter().zip(&expected) {
        let (text, sent_at) = content
            .rsplit_once('|')
            .ok_or_else(|| anyhow::anyhow!("no stamp in {content:?}"))?;
        assert_eq!(text, token);
        assert!(sent_at.parse::<u64>()? > 1_600_000_000_000_000);
    }
    Ok(())
}

#[tokio::test]
async fn the_wire_format_is_openai_sse() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let response = app
        .post_raw(serde_json::json!({
            "model": "mock:tokens=3",
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
                {"role": "user", "content": "Go"},
            ],
        }))
        .await?;

    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    let body = response.text().await?;
    let frames: Vec<&str> = body.split_terminator("\n\n").collect();
    assert!(frames.iter().all(|f| f.starts_with("data: ")), "{body}");
    // role, 3 tokens, finish, usage, [DONE]
    assert_eq!(frames.len(), 7, "{body}");
    assert_eq!(frames.last(), Some(&"data: [DONE]"));
    let chunks = frames[..6]
        .iter()
        .map(|f| serde_json::from_str::<serde_json::Value>(&f["data: ".len()..]))
        .collect::<Result<Vec<_>, _>>()?;
    let expected = completion_tokens("Be brief\nGo", SEED, 3);
    for (chunk, token) in chunks[1..4].iter().zip(&expected) {
        assert_eq!(chunk["choices"][0]["delta"]["content"], token.as_str());
        assert!(chunk["x_mock_sent_at_us"].as_u64().is_some_and(|us| us > 0));
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
    }
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"][0]["delta"], serde_json::json!({}));
    assert_eq!(chunks[5]["choices"], serde_json::json!([]));
    assert_eq!(chunks[5]["usage"]["prompt_tokens"], 3);
    Ok(())
}

#[tokio::test]
async fn a_non_streaming_request_gets_one_completion_object() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let response = app
        .openai()
        .chat()
        .create(request("mock:tokens=6", "whole")?.build()?)
        .await?;

    let choice = &response.choices[0];
    assert_eq!(
        choice.message.content.as_deref(),
        Some(completion_tokens("whole", SEED, 6).concat().as_str())
    );
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert_eq!(response.object, "chat.completion");
    let usage = response
        .usage
        .map(|u| (u.prompt_tokens, u.completion_tokens));
    assert_eq!(usage, Some((1, 6)));
    Ok(())
}

// ---- faults -----------------------------------------------------------------------------

#[tokio::test]
async fn a_429_with_fail_times_succeeds_on_retry() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let body = serde_json::json!({
        "model": "mock",
        "stream": true,
        "messages": [{"role": "user", "content": "busy [[mock status=429 fail_times=1]]"}],
    });

    let first = app.post_raw(body.clone()).await?;
    let retry_after = first
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = first.status();
    let error: serde_json::Value = first.json().await?;
    let second = app.post_raw(body).await?;

    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert!(error["error"]["message"].is_string());
    assert_eq!(second.status(), 200);
    Ok(())
}

#[tokio::test]
async fn async_openai_retries_a_429_by_itself() -> anyhow::Result<()> {
    let app = spawn_app()?;

    // retry_after=0 keeps the client's own (Retry-After driven) retry fast.
    let got = stream_all(
        &app,
        request(
            "mock",
            "again [[mock status=429 fail_times=1 retry_after=0]]",
        )?
        .build()?,
    )
    .await?;

    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(
        got.text,
        completion_tokens("again", SEED, DEFAULT_TOKENS).concat()
    );
    // Two HTTP requests reached the mock although the caller made one.
    assert_eq!(app.stats().await?.requests, 2);
    Ok(())
}

#[tokio::test]
async fn a_500_is_an_api_error_after_the_clients_retries() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let raw = app
        .post_raw(serde_json::json!({
            "model": "mock:status=500",
            "messages": [{"role": "user", "content": "x"}],
        }))
        .await?;
    let raw_status = raw.status();
    let raw_body: serde_json::Value = raw.json().await?;
    let result = app
        .openai()
        .chat()
        .create_stream(request("mock:status=500", "boom")?.stream(true).build()?)
        .await;

    assert_eq!(raw_status, 500);
    assert_eq!(raw_body["error"]["type"], "server_error");
    match result {
        Err(OpenAIError::ApiError(e)) => assert_eq!(e.status_code.as_u16(), 500),
        Err(other) => anyhow::bail!("unexpected error {other}"),
        Ok(_) => anyhow::bail!("a 500 opened a stream"),
    }
    // 1 raw + 1 initial + 3 automatic retries by async-openai.
    assert_eq!(app.stats().await?.requests, 5);
    Ok(())
}

#[tokio::test]
async fn error_after_sends_an_in_stream_error_and_no_done() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let got = stream_all(&app, request("mock:error_after=3", "oops")?.build()?).await?;

    assert_eq!(got.text, completion_tokens("oops", SEED, 3).concat());
    assert_eq!(got.finish_reason(), None);
    // async-openai has no in-stream error type: it fails to parse the chunk and hands back
    // the raw JSON, which is how a caller recognises the error.
    match &got.error {
        Some(OpenAIError::JSONDeserialize(_, raw)) => assert!(raw.contains("\"error\""), "{raw}"),
        other => anyhow::bail!("expected a deserialization error, got {other:?}"),
    }
    app.wait_for_stats(|s| s.streams_aborted == 1).await?;
    Ok(())
}

#[tokio::test]
async fn disconnect_after_breaks_the_stream_without_a_clean_end() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let got = stream_all(&app, request("mock:disconnect_after=2", "cut")?.build()?).await?;

    assert_eq!(got.text, completion_tokens("cut", SEED, 2).concat());
    assert_eq!(got.finish_reason(), None);
    match &got.error {
        Some(OpenAIError::StreamError(_)) => {}
        other => anyhow::bail!("expected a stream error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn fail_times_also_limits_mid_stream_faults() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let req = || request("mock", "flaky [[mock disconnect_after=1 fail_times=1]]");

    let first = stream_all(&app, req()?.build()?).await?;
    let second = stream_all(&app, req()?.build()?).await?;

    assert!(first.error.is_some());
    assert!(second.error.is_none(), "{:?}", second.error);
    assert_eq!(second.content_chunks(), DEFAULT_TOKENS);
    Ok(())
}

#[tokio::test]
async fn stall_after_goes_silent_and_counts_the_client_leaving() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let mut stream = app
        .openai()
        .chat()
        .create_stream(
            request("mock:stall_after=2", "wait")?
                .stream(true)
                .build()?,
        )
        .await?;

    let mut tokens = 0;
    while tokens < 2 {
        let chunk = stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
        tokens += chunk
            .choices
            .iter()
            .filter(|c| c.delta.content.as_deref().is_some_and(|t| !t.is_empty()))
            .count();
    }
    let next = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(next.is_err(), "a chunk arrived during the stall: {next:?}");
    drop(stream);

    let stats = app
        .wait_for_stats(|s| s.streams_disconnected == 1 && s.active_streams == 0)
        .await?;
    assert_eq!(stats.streams_completed, 0);
    Ok(())
}

#[tokio::test]
async fn dropping_a_stream_early_counts_a_disconnect() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let mut stream = app
        .openai()
        .chat()
        .create_stream(
            request("mock:tokens=1000,delay_ms=20", "long")?
                .stream(true)
                .build()?,
        )
        .await?;

    for _ in 0..3 {
        stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
    }
    assert_eq!(app.stats().await?.active_streams, 1);
    drop(stream);

    let stats = app
        .wait_for_stats(|s| s.streams_disconnected == 1 && s.active_streams == 0)
        .await?;
    assert_eq!(stats.streams_started, 1);
    assert_eq!(stats.streams_completed, 0);
    Ok(())
}

// ---- other endpoints and bad input ------------------------------------------------------

#[tokio::test]
async fn models_and_healthz_answer() -> anyhow::Result<()> {
    let app = spawn_app()?;

    let models: serde_json::Value = app
        .http
        .get(format!("{}/v1/models", app.base))
        .send()
        .await?
        .json()
        .await?;
    let health = app.http.get(format!("{}/healthz", app.base)).send().await?;

    assert_eq!(
        models,
        serde_json::json!({"object": "list", "data": [
            {"id": "mock", "object": "model", "created": 0, "owned_by": "mock-llm"}
        ]})
    );
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await?, "ok");
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_openai_style_400s() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let url = format!("{}/v1/chat/completions", app.base);

    let not_json = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    let no_messages = app.post_raw(serde_json::json!({"model": "mock"})).await?;
    let empty_messages = app
        .post_raw(serde_json::json!({"model": "mock", "messages": []}))
        .await?;
    let typo = app
        .post_raw(serde_json::json!({
            "model": "mock",
            "messages": [{"role": "user", "content": "[[mock tokenz=3]]"}],
        }))
        .await?;

    for response in [not_json, no_messages, empty_messages, typo] {
        assert_eq!(response.status(), 400);
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].is_string());
    }
    Ok(())
}

// ---- tool calls and reasoning ------------------------------------------------------------

#[tokio::test]
async fn tool_calls_stream_as_openai_fragments_that_rebuild_the_planned_arguments()
-> anyhow::Result<()> {
    use mock_llm::scenario::{Scenario, Shape};
    let app = spawn_app()?;
    let prompt = "Weather in two cities [[mock tools=2 arg_chunk=4]]";

    let got = stream_all(&app, request("mock", prompt)?.build()?).await?;

    assert!(got.error.is_none(), "{:?}", got.error);
    let planned = Scenario::plan(
        &prompt_text([prompt]),
        SEED,
        &Shape {
            tool_calls: 2,
            arg_chunk: 4,
            ..Shape::default()
        },
    );
    // Rebuild each call by `index` as a client does: id and name from the first fragment.
    let mut calls: Vec<(String, String, String)> = vec![Default::default(); 2];
    let mut fragments = 0;
    for chunk in got.chunks.iter().flat_map(|c| &c.choices) {
        for call in chunk.delta.tool_calls.iter().flatten() {
            let rebuilt = &mut calls[call.index as usize];
            if let Some(id) = &call.id {
                rebuilt.0.clone_from(id);
            }
            let function = call.function.as_ref();
            if let Some(name) = function.and_then(|f| f.name.as_ref()) {
                rebuilt.1.clone_from(name);
            }
            rebuilt
                .2
                .push_str(function.and_then(|f| f.arguments.as_deref()).unwrap_or(""));
            fragments += 1;
        }
    }
    for (rebuilt, call) in calls.iter().zip(&planned.tool_calls) {
        assert_eq!(
            rebuilt,
            &(call.id.clone(), call.name.clone(), call.arguments.clone())
        );
    }
    assert!(fragments > 20, "only {fragments} tool-call chunks");
    assert_eq!(got.text, "", "a tool-call answer has no text by default");
    assert_eq!(got.finish_reason(), Some(FinishReason::ToolCalls));
    Ok(())
}

#[tokio::test]
async fn reasoning_streams_as_reasoning_content_and_is_reported_in_usage() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let body = serde_json::json!({
        "model": "mock",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Think first [[mock reasoning=5 tokens=3]]"}],
    });

    let text = app.post_raw(body).await?.text().await?;

    let chunks: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let reasoning: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning.len(), 5);
    let usage = &chunks.last().cloned().unwrap_or_default()["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 5);
    Ok(())
}

#[tokio::test]
async fn a_request_with_tools_gets_a_call_of_its_first_tool_until_a_tool_answered()
-> anyhow::Result<()> {
    let app = spawn_app()?;
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "find_flight", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "other"}},
    ]);
    let ask = serde_json::json!({
        "model": "mock", "tools": tools,
        "messages": [{"role": "user", "content": "Book me a flight"}],
    });
    let answered = serde_json::json!({
        "model": "mock", "tools": tools,
        "messages": [
            {"role": "user", "content": "Book me a flight"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "find_flight", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "AF 123"},
        ],
    });

    let call: serde_json::Value = app.post_raw(ask).await?.json().await?;
    let text: serde_json::Value = app.post_raw(answered).await?.json().await?;

    let choice = &call["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "find_flight"
    );
    assert_eq!(text["choices"][0]["finish_reason"], "stop");
    assert!(text["choices"][0]["message"]["tool_calls"].is_null());
    Ok(())
}

#[tokio::test]
async fn faults_count_every_chunk_of_a_tool_call_answer() -> anyhow::Result<()> {
    let app = spawn_app()?;
    let body = serde_json::json!({
        "model": "mock", "stream": true,
        "messages": [{"role": "user", "content": "Break mid-call [[mock reasoning=2 tools=1 error_after=6]]"}],
    });

    let text = app.post_raw(body).await?.text().await?;

    let frames: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    // The role chunk, 2 reasoning chunks, the call's opening, 3 argument fragments, the error.
    assert_eq!(frames.len(), 8, "{frames:?}");
    assert!(frames[7].contains("\"error\""), "{}", frames[7]);
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.contains("\"arguments\""))
            .count(),
        4
    );
    assert!(!text.contains("[DONE]"));
    Ok(())
}
