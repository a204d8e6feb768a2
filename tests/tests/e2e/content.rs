//! Everything a model streams besides text, through the real binaries: tool calls whose
//! arguments arrive in many fragments, reasoning, and what a client rebuilds from them: the
//! same calls as the model made, also after resuming mid-argument and after a producer died
//! mid-call.

use std::collections::BTreeMap;

use fred::prelude::*;
use mock_llm::scenario::{Scenario, Shape};
use serde_json::{Value, json};
use service_kit::config::ProducerSettings;
use test_support::SseEvent;

use crate::stack::{Stack, StackOptions, TIMEOUT, options, payloads, str_field, text_of};

/// One tool call as a client rebuilds it: `id` and `name` from the first fragment of its
/// `index`, arguments concatenated in stream order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

/// The calls a client rebuilds from `events`, as a client must: by `index`, dropping what it
/// rebuilt so far at a `restart` (the new attempt streams every call again from the start).
fn rebuild(events: &[Value]) -> BTreeMap<u64, Call> {
    let mut calls = BTreeMap::new();
    for event in events {
        match event["type"].as_str() {
            Some("restart") => calls.clear(),
            Some("tool_call") => {
                let call: &mut Call = calls
                    .entry(event["index"].as_u64().unwrap_or(u64::MAX))
                    .or_default();
                if let Some(id) = event["id"].as_str() {
                    call.id = id.to_owned();
                }
                if let Some(name) = event["name"].as_str() {
                    call.name = name.to_owned();
                }
                call.arguments
                    .push_str(event["arguments"].as_str().unwrap_or_default());
            }
            _ => {}
        }
    }
    calls
}

/// The calls mock-llm makes for a single-prompt chat (seed 0, as in the suite's settings).
fn planned(prompt: &str, shape: &Shape) -> BTreeMap<u64, Call> {
    Scenario::plan(&mock_llm::text::prompt_text([prompt]), 0, shape)
        .tool_calls
        .into_iter()
        .zip(0..)
        .map(|(call, index)| {
            (
                index,
                Call {
                    id: call.id,
                    name: call.name,
                    arguments: call.arguments,
                },
            )
        })
        .collect()
}

fn tool_shape(calls: usize, arg_chunk: usize) -> Shape {
    Shape {
        tool_calls: calls,
        arg_chunk,
        ..Shape::default()
    }
}

/// `sequence` of every content event (token, tool_call, reasoning) after the last `restart`.
fn content_sequences(events: &[Value]) -> Vec<u64> {
    let from = events
        .iter()
        .rposition(|e| e["type"] == "restart")
        .map_or(0, |i| i + 1);
    events[from..]
        .iter()
        .filter_map(|e| e["sequence"].as_u64())
        .collect()
}

/// A stop condition for `collect_until`: true at the `count`-th `tool_call` event.
fn tool_call_fragments(count: usize) -> impl Fn(&SseEvent) -> bool {
    let seen = std::cell::Cell::new(0);
    move |event| {
        if event.json().is_ok_and(|json| json["type"] == "tool_call") {
            seen.set(seen.get() + 1);
        }
        seen.get() == count
    }
}

async fn start(stack: &Stack, session: &str, prompt: &str) -> anyhow::Result<String> {
    let started = stack.start_chat(session, prompt).await?;
    Ok(str_field(&started, "streamUrl")?.to_owned())
}

#[tokio::test]
async fn two_tool_calls_in_many_fragments_rebuild_exactly_what_the_model_sent() -> anyhow::Result<()>
{
    let stack = Stack::start(options()).await?;
    let prompt = "What is the weather in Paris and in Rome? [[mock tools=2 arg_chunk=3]]";

    let url = start(&stack, "tools", prompt).await?;
    let events = payloads(&stack.read_all(&url).await?)?;

    let expected = planned(prompt, &tool_shape(2, 3));
    assert_eq!(rebuild(&events), expected);
    let fragments = events.iter().filter(|e| e["type"] == "tool_call").count();
    let chunks: usize = expected
        .values()
        .map(|c| c.arguments.chars().count().div_ceil(3))
        .sum();
    // Without coalescing, each opening and each fragment is its own event.
    assert_eq!(fragments, chunks + 2);
    // `id` and `name` only open a call; later fragments carry index and arguments only.
    let openings: Vec<&Value> = events.iter().filter(|e| e["id"].is_string()).collect();
    assert_eq!(openings.len(), 2, "{openings:?}");
    assert!(openings.iter().all(|e| e["name"].is_string()));
    let sequences = content_sequences(&events);
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["finishReason"], "tool_calls");
    assert_eq!(text_of(&events), "", "a tool-call answer has no text");
    Ok(())
}

#[tokio::test]
async fn coalesced_fragments_stay_within_one_call_and_rebuild_the_same_arguments()
-> anyhow::Result<()> {
    let stack = Stack::start(options().with_settings(|s| {
        s.producer.token_coalesce_ms = 30;
    }))
    .await?;
    let prompt = "Think, say, then call [[mock reasoning=6 tokens=4 tools=2 delay_ms=2]]";

    let url = start(&stack, "coalesced", prompt).await?;
    let events = payloads(&stack.read_all(&url).await?)?;

    let shape = Shape {
        text_tokens: 4,
        reasoning: 6,
        ..tool_shape(2, mock_llm::scenario::DEFAULT_ARG_CHUNK)
    };
    assert_eq!(rebuild(&events), planned(prompt, &shape));
    let scenario = Scenario::plan(&mock_llm::text::prompt_text([prompt]), 0, &shape);
    let content = events
        .iter()
        .filter(|e| e["sequence"].is_u64())
        .collect::<Vec<_>>();
    assert!(
        content.len() < scenario.pieces().len(),
        "nothing was coalesced"
    );
    let reasoning: String = content
        .iter()
        .filter(|e| e["type"] == "reasoning")
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(reasoning, scenario.reasoning.concat());
    assert_eq!(text_of(&events), scenario.text.concat());
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["usage"]["reasoningTokens"], 6);
    Ok(())
}

#[tokio::test]
async fn a_client_that_resumes_mid_argument_rebuilds_the_same_calls() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let prompt = "Two lookups please [[mock tools=2 arg_chunk=2 delay_ms=5]]";

    let url = start(&stack, "resume-tools", prompt).await?;
    let mut first = stack.open(0, &url, &[]).await?;
    // Up to the third fragment of the first call: in the middle of its arguments.
    let before = first.collect_until(TIMEOUT, tool_call_fragments(3)).await?;
    let resume_at = first
        .last_event_id()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no event id to resume from"))?;
    drop(first);
    let after = stack
        .open(0, &url, &[("Last-Event-ID", resume_at.as_str())])
        .await?
        .collect_to_end(TIMEOUT)
        .await?;

    let ids: Vec<Option<&str>> = before
        .iter()
        .chain(&after)
        .map(|e| e.id.as_deref())
        .collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "an event arrived twice");
    let mut events = payloads(&before)?;
    let last_before = events.last().cloned().unwrap_or_default();
    assert!(last_before["id"].is_null(), "resumed mid-argument");
    events.extend(payloads(&after)?);
    assert_eq!(rebuild(&events), planned(prompt, &tool_shape(2, 2)));
    let sequences = content_sequences(&events);
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn after_a_producer_dies_mid_call_the_restart_rebuilds_every_call_from_scratch()
-> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            producers: 2,
            ..options()
        }
        .with_settings(|s| short_leases(&mut s.producer)),
    )
    .await?;
    let prompt = "Survive a crash mid-call [[mock tools=2 arg_chunk=1 delay_ms=10]]";

    let url = start(&stack, "crash-tools", prompt).await?;
    let mut connection = stack.open(0, &url, &[]).await?;
    let mut events = connection
        .collect_until(TIMEOUT, tool_call_fragments(15))
        .await?;
    let holder = crate::producer::job_holder(&stack).await?;
    stack.producers[holder].process.sigkill()?;
    events.extend(connection.collect_to_end(TIMEOUT).await?);
    let events = payloads(&events)?;

    let restart = events
        .iter()
        .position(|e| e["type"] == "restart")
        .ok_or_else(|| anyhow::anyhow!("no restart"))?;
    assert_eq!(events[restart]["attempt"], 2);
    // Attempt 1 had begun the first call; a client that did not drop it would now hold a
    // call with arguments twice over.
    assert!(!rebuild(&events[..restart]).is_empty());
    assert_eq!(rebuild(&events), planned(prompt, &tool_shape(2, 1)));
    let sequences = content_sequences(&events);
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["finishReason"], "tool_calls");
    Ok(())
}

#[tokio::test]
async fn a_reasoning_chat_streams_reasoning_before_the_answer_and_reports_its_tokens()
-> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let prompt = "Think it over first [[mock reasoning=8 tokens=5]]";

    let url = start(&stack, "reasoning", prompt).await?;
    let events = payloads(&stack.read_all(&url).await?)?;

    let scenario = Scenario::plan(
        &mock_llm::text::prompt_text([prompt]),
        0,
        &Shape {
            text_tokens: 5,
            reasoning: 8,
            ..Shape::default()
        },
    );
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    let first_token = kinds.iter().position(|k| *k == "token").unwrap_or(0);
    let last_reasoning = kinds.iter().rposition(|k| *k == "reasoning").unwrap_or(0);
    assert!(last_reasoning < first_token, "{kinds:?}");
    let reasoning: String = events
        .iter()
        .filter(|e| e["type"] == "reasoning")
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(reasoning, scenario.reasoning.concat());
    assert_eq!(text_of(&events), scenario.text.concat());
    let sequences = content_sequences(&events);
    assert_eq!(sequences, (1..=13).collect::<Vec<_>>());
    let complete = events.last().cloned().unwrap_or_default();
    assert_eq!(complete["finishReason"], "stop");
    assert_eq!(complete["usage"]["reasoningTokens"], 8);
    assert_eq!(complete["usage"]["completionTokens"], 13);
    Ok(())
}

/// Leases short enough that a lost producer is replaced within about two seconds.
fn short_leases(producer: &mut ProducerSettings) {
    producer.lease_ms = 1500;
    producer.lease_renew_ms = 300;
    producer.reclaim_interval_ms = 250;
}

#[tokio::test]
async fn a_chat_with_tools_gets_a_call_then_answers_the_tool_result() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let tools = json!([{"type": "function", "function": {"name": "find_flight",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}]);
    let ask = json!([{"role": "user", "content": "Find me a flight to Oslo"}]);

    let (status, started) = stack
        .post_start(
            0,
            &json!({"sessionId": "tool-loop", "modelId": "mock", "messages": ask,
                "tools": tools, "toolChoice": "auto"}),
        )
        .await?;
    anyhow::ensure!(status == 200, "{started}");
    let events = payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)?;

    // mock-llm calls the first declared tool when the request has tools: the tools reached it.
    let calls = rebuild(&events);
    let call = calls.get(&0).cloned().unwrap_or_default();
    assert_eq!(call.name, "find_flight", "{events:?}");
    assert_eq!(
        events.last().cloned().unwrap_or_default()["finishReason"],
        "tool_calls"
    );

    // The application runs the tool and sends the result back: the model answers in text.
    let mut conversation = ask.as_array().cloned().unwrap_or_default();
    conversation.push(json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}]}));
    conversation.push(json!({"role": "tool", "tool_call_id": call.id, "content": "SK 4711"}));
    let (status, started) = stack
        .post_start(
            0,
            &json!({"sessionId": "tool-loop", "modelId": "mock", "messages": conversation,
                "tools": tools}),
        )
        .await?;
    anyhow::ensure!(status == 200, "{started}");
    let events = payloads(&stack.read_all(str_field(&started, "streamUrl")?).await?)?;
    assert!(rebuild(&events).is_empty());
    assert!(!text_of(&events).is_empty());
    assert_eq!(
        events.last().cloned().unwrap_or_default()["finishReason"],
        "stop"
    );
    Ok(())
}

#[tokio::test]
async fn bad_chat_input_is_a_400_with_the_spec_error_body_and_writes_nothing() -> anyhow::Result<()>
{
    let stack = Stack::start(options().with_settings(|s| s.limits.max_tools = 2)).await?;
    let redis = stack.redis_client().await?;
    let tool = |name: &str| json!({"type": "function", "function": {"name": name}});
    let cases = [
        json!({"messages": [{"role": "robot", "content": "beep"}]}),
        json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "tool", "content": "42"}]}),
        json!({"prompt": "hi", "tools": [tool("a"), tool("b"), tool("c")]}),
    ];
    for (i, fields) in cases.into_iter().enumerate() {
        let session = format!("bad-{i}");
        let mut body = json!({"sessionId": session, "modelId": "mock"});
        if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
            body.extend(fields.clone());
        }

        let (status, answer) = stack.post_start(0, &body).await?;

        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
        let keys: Vec<String> = redis
            .scan_page("0", format!("*{session}*"), Some(1000), None)
            .await
            .map(|(_, keys): (String, Vec<String>)| keys)?;
        assert!(keys.is_empty(), "{keys:?}");
    }
    let queued: u64 = redis.xlen("llm:requests").await?;
    assert_eq!(queued, 0, "a refused start queued a job");
    Ok(())
}

#[tokio::test]
async fn analytics_count_reasoning_and_tool_call_fragments_as_streamed_tokens() -> anyhow::Result<()>
{
    let stack = Stack::start(options()).await?;
    let prompt = "Count me [[mock reasoning=4 tokens=3 tools=2]]";

    let url = start(&stack, "counted", prompt).await?;
    let events = payloads(&stack.read_all(&url).await?)?;

    // Without coalescing, every content event is one upstream delta.
    let streamed = events.iter().filter(|e| e["sequence"].is_u64()).count() as u64;
    let complete = events.last().cloned().unwrap_or_default();
    let totals = test_support::wait_until(TIMEOUT, std::time::Duration::from_millis(100), || {
        let stack = &stack;
        async move {
            let body: Value = stack
                .http
                .get(format!(
                    "{}/api/analytics/sessions/counted",
                    stack.gateway()
                ))
                .bearer_auth(crate::stack::API_KEY)
                .send()
                .await?
                .json()
                .await?;
            let totals = body["totals"].clone();
            Ok((totals["finished"] == 1).then_some(totals))
        }
    })
    .await?;
    assert_eq!(totals["tokensStreamed"], streamed, "{totals}");
    assert_eq!(totals["finishes"]["tool_calls"], 1, "{totals}");
    assert_eq!(
        totals["completionTokens"], complete["usage"]["completionTokens"],
        "{totals}"
    );
    Ok(())
}
