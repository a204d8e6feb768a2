//! The demo page (`GET /`), the AI SDK page (`GET /aisdk-demo`) across a reload, and the
//! README's `useChat` snippet as a React app (tests/clients/usechat) from another origin, in
//! headless Chromium against a whole running stack: a person's clicks and keystrokes through
//! WebDriver, assertions on what the page shows.
//!
//! Needs Chromium and ChromeDriver, so it is `#[ignore]`d in the plain test run;
//! `scripts/browser-test.sh` (a step of `make test`) installs them when missing and runs it.
//! It leaves a screenshot in `tests/artifacts/demo-page.png` (and in `docs/demo-page.png` with
//! `BRIDGE_UPDATE_DEMO_SCREENSHOT=1`).
//!
//! One browser and one stack go through the scenarios in order (each names itself in the error
//! if it fails, and a failure leaves `tests/artifacts/demo-page-failure.png`).

mod static_site;
mod webdriver;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use fred::prelude::*;
use fred::types::Value as RedisValue;
use serde_json::{Value, json};
use stream_schema::SessionEvent;
use test_support::wait_until;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use self::static_site::StaticSite;
use self::webdriver::Browser;
use crate::stack::{API_KEY, Stack, StackOptions, TIMEOUT, expected_text, options};
use service_kit::Settings;

/// Waits on the page: generous, because two cores run the stack and the browser.
const PAGE_TIMEOUT: Duration = Duration::from_secs(20);
const SESSION: &str = "browser-demo";

/// Leases short enough that a killed producer's request restarts within about two seconds.
fn short_leases(settings: &mut Settings) {
    settings.producer.lease_ms = 1500;
    settings.producer.lease_renew_ms = 300;
    settings.producer.reclaim_interval_ms = 250;
}

/// The newest exchange on the page (or the one of `arguments[0]`, a request id), as JSON.
const READ_EXCHANGE: &str = r#"
const all = document.querySelectorAll('#transcript article.exchange');
const a = arguments[0]
  ? document.querySelector('article.exchange[data-request-id="' + arguments[0] + '"]')
  : all[all.length - 1];
if (!a) return null;
return {
  requestId: a.dataset.requestId,
  state: a.dataset.state,
  mine: a.classList.contains('mine'),
  text: a.querySelector('.answer').textContent,
  notices: [...a.querySelectorAll('.notices li')].map((li) => li.className + ': ' + li.textContent),
  duplicates: Number(a.dataset.duplicates || 0),
  count: all.length,
};"#;

/// The live figures panel, the connection line and the status line.
const READ_PANEL: &str = r#"
const t = (id) => document.getElementById(id).textContent;
return {
  ttft: t('fig-ttft'), rate: t('fig-rate'), tokens: t('fig-tokens'), attempt: t('fig-attempt'),
  conn: document.getElementById('conn').dataset.conn, connText: t('conn'), status: t('status'),
  stopDisabled: document.getElementById('stop').disabled,
  sendDisabled: document.getElementById('send').disabled,
};"#;

#[tokio::test]
#[ignore = "needs Chromium and ChromeDriver: run by scripts/browser-test.sh (a step of make test)"]
async fn the_demo_page_streams_stops_resumes_and_follows_in_chromium() -> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            producers: 2,
            ..options()
        }
        .with_settings(short_leases),
    )
    .await?;
    let proxy = NetworkLink::start(stack.gateways[0].port).await?;
    let browser = Browser::launch().await?;
    let result = scenarios(&stack, &browser, &proxy).await;
    if let Err(error) = &result {
        let saved = save_screenshot(&browser, "demo-page-failure.png").await;
        let shown = browser.eval(READ_PANEL, json!([])).await;
        let gateway = stack.gateways[0].process.log_tail(20).await;
        eprintln!(
            "browser test failed: {error:#}\nscreenshot: {saved:?}\npage: {shown:?}\n\
             gateway log:\n{gateway}"
        );
    }
    let closed = browser.close().await;
    result?;
    closed
}

/// The AI SDK page (`/aisdk-demo`): a reload in the middle of an answer resumes it through
/// `GET /api/chat/{id}/stream`, and the page ends with the full answer exactly once.
#[tokio::test]
#[ignore = "needs Chromium and ChromeDriver: run by scripts/browser-test.sh (a step of make test)"]
async fn the_aisdk_page_resumes_an_answer_after_a_reload_in_chromium() -> anyhow::Result<()> {
    let stack = Stack::start(options()).await?;
    let browser = Browser::launch().await?;
    let result = aisdk_reload(&stack, &browser).await;
    if let Err(error) = &result {
        let saved = save_screenshot(&browser, "aisdk-page-failure.png").await;
        let gateway = stack.gateways[0].process.log_tail(20).await;
        eprintln!(
            "aisdk page test failed: {error:#}\nscreenshot: {saved:?}\ngateway log:\n{gateway}"
        );
    }
    let closed = browser.close().await;
    result?;
    closed
}

/// The newest assistant answer on the AI SDK page: its text, state and how many answers show.
const READ_AISDK_ANSWER: &str = r#"
const all = document.querySelectorAll('#transcript article.assistant');
const a = all[all.length - 1];
if (!a) return null;
return {
  text: a.querySelector('.text').textContent,
  state: a.dataset.state || 'stored',
  answers: all.length,
  users: document.querySelectorAll('#transcript article.user').length,
};"#;

async fn aisdk_reload(stack: &Stack, browser: &Browser) -> anyhow::Result<()> {
    let url = format!("{}/aisdk-demo?chat=browser-aisdk", stack.gateway());
    browser.goto(&url).await?;
    browser.type_into("#api-key", API_KEY).await?;
    let prompt = "Reload me mid-answer [[mock tokens=80 delay_ms=25]]";
    browser.type_into("#prompt", prompt).await?;
    browser.click("#send").await?;
    let partial = browser
        .wait_for(
            "part of the answer",
            PAGE_TIMEOUT,
            &format!(
                "const e = (() => {{ {READ_AISDK_ANSWER} }})(); \
                 return e && e.state === 'streaming' && e.text.length >= 20 ? e : null"
            ),
            json!([]),
        )
        .await?;
    // A reload: the page starts over, finds the running answer and replays it from its start.
    browser.goto(&url).await?;
    let done = browser
        .wait_for(
            "the resumed answer to finish",
            PAGE_TIMEOUT,
            &format!(
                "const e = (() => {{ {READ_AISDK_ANSWER} }})(); \
                 return e && e.state !== 'streaming' ? e : null"
            ),
            json!([]),
        )
        .await?;
    let full = expected_text(prompt, 80);
    let partial = partial["text"].as_str().unwrap_or_default();
    ensure!(
        partial.len() < full.len(),
        "the reload came after the end: {partial:?}"
    );
    // `done` (not `stored`): the answer came from the resumed stream, not from localStorage.
    ensure!(done["state"] == "done", "{done}");
    ensure!(
        done["text"] == full.as_str(),
        "text after the reload: {done}"
    );
    ensure!(done["answers"] == 1 && done["users"] == 1, "{done}");
    Ok(())
}

/// The README's `useChat` snippet as a React app (tests/clients/usechat, built by
/// `scripts/sdk-clients.sh`), served from its own origin: `@ai-sdk/react`'s `useChat` with
/// `resume: true` and `DefaultChatTransport` against the gateway, through CORS. A reload in the
/// middle of an answer resumes it, a reload after the end finds nothing running (204), and the
/// Stop button (`POST /api/chat/{id}/stop`) ends a running answer.
#[tokio::test]
#[ignore = "needs Chromium and ChromeDriver: run by scripts/browser-test.sh (a step of make test)"]
async fn the_usechat_app_resumes_after_a_reload_and_stops_in_chromium() -> anyhow::Result<()> {
    let site = StaticSite::serve(usechat_dir()?).await?;
    let origin = site.origin();
    let stack = Stack::start(options().with_settings(|s| {
        s.gateway.cors_allowed_origins = vec![origin.clone()];
    }))
    .await?;
    let browser = Browser::launch().await?;
    let result = usechat(&stack, &browser, &site).await;
    if let Err(error) = &result {
        let saved = save_screenshot(&browser, "usechat-failure.png").await;
        let shown = browser.eval(READ_USECHAT, json!([])).await;
        let gateway = stack.gateways[0].process.log_tail(20).await;
        eprintln!(
            "useChat app test failed: {error:#}\nscreenshot: {saved:?}\npage: {shown:?}\n\
             gateway log:\n{gateway}"
        );
    }
    let closed = browser.close().await;
    result?;
    closed
}

/// The built app: `BRIDGE_USECHAT_DIR`, else where `scripts/sdk-clients.sh` puts it.
fn usechat_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("BRIDGE_USECHAT_DIR").map_or_else(
        || {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".cache/llm-bridge/sdk-clients/usechat/dist"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    ensure!(
        dir.join("app.js").exists() && dir.join("index.html").exists(),
        "the useChat app is not built in {}: run scripts/sdk-clients.sh (make test does) or set \
         BRIDGE_USECHAT_DIR",
        dir.display()
    );
    Ok(dir)
}

/// What the useChat app shows: `useChat`'s status, the messages' roles and text parts, the
/// stop answer, an error, and the `GET /api/chat/{id}/stream` requests the page made (status).
const READ_USECHAT: &str = r#"
const status = document.getElementById('status');
if (!status) return null;
const messages = [...document.querySelectorAll('#transcript article')].map((a) => ({
  role: a.className, text: a.querySelector('.text').textContent }));
const stopped = document.getElementById('stopped');
const error = document.getElementById('error');
const resumes = performance.getEntriesByType('resource')
  .filter((e) => /\/api\/chat\/[^/]+\/stream$/.test(e.name))
  .map((e) => ({ status: e.responseStatus, done: e.responseEnd > 0 }));
return {
  status: status.dataset.status,
  messages,
  assistant: messages.filter((m) => m.role === 'assistant').map((m) => m.text),
  users: messages.filter((m) => m.role === 'user').length,
  stopped: stopped ? Number(stopped.dataset.status) : null,
  error: error ? error.textContent : null,
  resumes,
};"#;

async fn wait_usechat(browser: &Browser, what: &str, condition: &str) -> anyhow::Result<Value> {
    browser
        .wait_for(
            what,
            PAGE_TIMEOUT,
            &format!(
                "const e = (() => {{ {READ_USECHAT} }})(); return e && ({condition}) ? e : null"
            ),
            json!([]),
        )
        .await
}

async fn usechat(stack: &Stack, browser: &Browser, site: &StaticSite) -> anyhow::Result<()> {
    let chat = "browser-usechat";
    let url = format!(
        "{}/?gateway={}&key={API_KEY}&chat={chat}&model=mock",
        site.origin(),
        stack.gateway()
    );
    // First load: `resume: true` asks for a running answer; there is none (204).
    browser.goto(&url).await?;
    let fresh = wait_usechat(
        browser,
        "the app's first resume to find nothing",
        "e.status === 'ready' && e.resumes.length === 1 && e.resumes[0].done",
    )
    .await
    .context("opening the app")?;
    ensure!(
        fresh["resumes"][0]["status"] == 204 && fresh["messages"] == json!([]),
        "{fresh}"
    );

    // A slow answer, and a reload in its middle.
    let prompt = "Resume me in useChat [[mock tokens=80 delay_ms=25]]";
    browser.type_into("#prompt", prompt).await?;
    browser.click("#send").await?;
    let partial = wait_usechat(
        browser,
        "part of the answer",
        "e.status === 'streaming' && e.users === 1 && e.assistant.length === 1 \
         && e.assistant[0].length >= 20",
    )
    .await
    .context("scenario: a prompt streams")?;
    browser.goto(&url).await?;
    let resumed = wait_usechat(
        browser,
        "the resumed answer to finish",
        "e.status === 'ready' && e.assistant.length > 0",
    )
    .await
    .context("scenario: a reload mid-answer resumes it")?;
    let full = expected_text(prompt, 80);
    let partial = partial["assistant"][0].as_str().unwrap_or_default();
    ensure!(
        partial.len() < full.len(),
        "the reload came after the end: {partial:?}"
    );
    // The answer, whole and once. useChat keeps no history: after the reload it shows only the
    // resumed answer, not the question (the app has to load earlier messages itself).
    ensure!(
        resumed["assistant"] == json!([full]) && resumed["users"] == 0,
        "after the reload: {resumed}"
    );
    ensure!(
        resumed["resumes"] == json!([{"status": 200, "done": true}]) && resumed["error"].is_null(),
        "the resume request: {resumed}"
    );

    // A reload after the end: nothing runs any more, so nothing is shown.
    browser.goto(&url).await?;
    let after = wait_usechat(
        browser,
        "the resume after the end",
        "e.status === 'ready' && e.resumes.length === 1 && e.resumes[0].done",
    )
    .await
    .context("scenario: a reload after the end finds nothing running")?;
    ensure!(
        after["resumes"][0]["status"] == 204 && after["messages"] == json!([]),
        "{after}"
    );

    // Stop ends a running answer for everyone: the stream ends (`abort`) with part of the text.
    let long = "Stop me in useChat [[mock tokens=400 delay_ms=25]]";
    browser.type_into("#prompt", long).await?;
    browser.click("#send").await?;
    wait_usechat(
        browser,
        "part of the long answer",
        "e.status === 'streaming' && e.assistant.length === 1 && e.assistant[0].length >= 20",
    )
    .await
    .context("scenario: a long answer streams")?;
    browser.click("#stop").await?;
    let stopped = wait_usechat(
        browser,
        "the stopped answer",
        "e.stopped !== null && e.status !== 'streaming' && e.status !== 'submitted'",
    )
    .await
    .context("scenario: Stop ends the answer")?;
    let whole = expected_text(long, 400);
    let shown = stopped["assistant"][0].as_str().unwrap_or_default();
    ensure!(stopped["stopped"] == 202, "stop answered: {stopped}");
    ensure!(
        !shown.is_empty() && shown.len() < whole.len() && whole.starts_with(shown),
        "the stopped answer: {stopped}"
    );
    // Nothing runs any more: the gateway has no answer to resume.
    let running = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(format!("{}/api/chat/{chat}/stream", stack.gateway()))
        .bearer_auth(API_KEY)
        .send()
        .await?
        .status();
    ensure!(
        running == 204,
        "GET /api/chat/{chat}/stream after Stop: {running}"
    );
    Ok(())
}

async fn scenarios(stack: &Stack, browser: &Browser, proxy: &NetworkLink) -> anyhow::Result<()> {
    let page = open_page(proxy, browser, SESSION)
        .await
        .context("opening the page")?;
    streams_the_full_text(browser)
        .await
        .context("scenario: a prompt streams its full text")?;
    shows_reasoning_and_tool_calls(browser)
        .await
        .context("scenario: reasoning and tool calls are shown")?;
    shows_an_upstream_error(browser)
        .await
        .context("scenario: an upstream error is shown")?;
    stop_halts_a_long_generation(stack, browser)
        .await
        .context("scenario: Stop cancels a long generation")?;
    resumes_after_an_outage(stack, browser, proxy, Link::Down)
        .await
        .context("scenario: the stream resumes after a network drop")?;
    resumes_after_an_outage(stack, browser, proxy, Link::Failing)
        .await
        .context("scenario: the stream is reopened after 503 answers")?;
    shows_history_lost(stack, browser, proxy)
        .await
        .context("scenario: history_lost is shown")?;
    a_restart_drops_the_partial_text(stack, browser)
        .await
        .context("scenario: a producer restart drops the partial text")?;
    // A picture of much of what the page can show: history lost, a restart, the live figures.
    let saved = save_screenshot(browser, "demo-page.png").await?;
    if std::env::var_os("BRIDGE_UPDATE_DEMO_SCREENSHOT").is_some() {
        let docs = workspace_root().join("docs/demo-page.png");
        std::fs::copy(&saved, &docs).with_context(|| format!("copying to {}", docs.display()))?;
    }
    a_second_window_follows_the_session(proxy, browser, &page)
        .await
        .context("scenario: a second window follows the session")?;
    Ok(())
}

/// Loads the page on `session`, types the API key and picks the mock model; returns the window.
async fn open_page(
    proxy: &NetworkLink,
    browser: &Browser,
    session: &str,
) -> anyhow::Result<String> {
    browser
        .goto(&format!("{}/?session={session}", proxy.url()))
        .await?;
    browser
        .wait_for(
            "the model list",
            PAGE_TIMEOUT,
            "return document.getElementById('model').dataset.loaded === 'true'",
            json!([]),
        )
        .await?;
    let models = browser
        .eval(
            "return [...document.getElementById('model').options].map((o) => o.value)",
            json!([]),
        )
        .await?;
    ensure!(
        models
            .as_array()
            .is_some_and(|m| m.len() == 2 && m.contains(&json!("mock"))),
        "models: {models}"
    );
    let shown_session = browser
        .eval("return document.getElementById('session').value", json!([]))
        .await?;
    ensure!(shown_session == session, "session field: {shown_session}");
    browser.type_into("#api-key", API_KEY).await?;
    browser
        .eval(
            "const s = document.getElementById('model'); s.value = 'mock'; \
             s.dispatchEvent(new Event('change')); return s.value",
            json!([]),
        )
        .await?;
    // The key lives in sessionStorage, never in localStorage.
    let storage = browser
        .eval(
            "return [sessionStorage.getItem('llm-bridge.apiKey'), localStorage.length]",
            json!([]),
        )
        .await?;
    ensure!(storage == json!([API_KEY, 0]), "storage: {storage}");
    browser.window().await
}

/// Types `prompt`, clicks Send and waits for the new exchange; returns its request id.
async fn send(browser: &Browser, prompt: &str) -> anyhow::Result<String> {
    let count_exchanges = "return document.querySelectorAll('#transcript article.exchange').length";
    let before = browser.eval(count_exchanges, json!([])).await?;
    browser.type_into("#prompt", prompt).await?;
    browser.click("#send").await?;
    let started = browser
        .wait_for(
            "a new exchange after Send",
            PAGE_TIMEOUT,
            &format!(
                "const e = (() => {{ {READ_EXCHANGE} }})(); \
                 return e && e.count > arguments[1] ? e : null"
            ),
            json!([null, before]),
        )
        .await?;
    started["requestId"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("exchange without request id: {started}"))
}

async fn exchange(browser: &Browser, request_id: Option<&str>) -> anyhow::Result<Option<Value>> {
    let value = browser.eval(READ_EXCHANGE, json!([request_id])).await?;
    Ok((!value.is_null()).then_some(value))
}

/// Waits until the exchange of `request_id` reaches `state`; returns it.
async fn wait_state(browser: &Browser, request_id: &str, state: &str) -> anyhow::Result<Value> {
    browser
        .wait_for(
            &format!("request {request_id} to be {state}"),
            PAGE_TIMEOUT,
            &format!("const e = (() => {{ {READ_EXCHANGE} }})(); return e && e.state === arguments[1] ? e : null"),
            json!([request_id, state]),
        )
        .await
}

/// Waits until the exchange shows at least `chars` characters of answer.
async fn wait_text(browser: &Browser, request_id: &str, chars: usize) -> anyhow::Result<Value> {
    browser
        .wait_for(
            &format!("{chars} characters of request {request_id}"),
            PAGE_TIMEOUT,
            &format!("const e = (() => {{ {READ_EXCHANGE} }})(); return e && e.text.length >= arguments[1] ? e : null"),
            json!([request_id, chars]),
        )
        .await
}

/// Waits until the panel (`p`, as `READ_PANEL` returns it) satisfies the JS `condition`; the
/// figures are redrawn once per animation frame, so they may trail the exchange by a frame.
async fn wait_panel(browser: &Browser, what: &str, condition: &str) -> anyhow::Result<Value> {
    browser
        .wait_for(
            what,
            PAGE_TIMEOUT,
            &format!("const p = (() => {{ {READ_PANEL} }})(); return ({condition}) ? p : null"),
            json!([]),
        )
        .await
}

fn text(exchange: &Value) -> &str {
    exchange["text"].as_str().unwrap_or_default()
}

fn notices(exchange: &Value) -> Vec<String> {
    exchange["notices"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn streams_the_full_text(browser: &Browser) -> anyhow::Result<()> {
    let prompt = "Tell me a story about a dragon [[mock tokens=40 delay_ms=5]]";
    let request = send(browser, prompt).await?;
    let done = wait_state(browser, &request, "complete").await?;
    ensure!(
        text(&done) == expected_text(prompt, 40),
        "text: {:?}",
        text(&done)
    );
    ensure!(done["mine"] == true && notices(&done).is_empty(), "{done}");
    ensure!(done["duplicates"] == 0, "{done}");
    let figures = wait_panel(
        browser,
        "the figures of the finished request",
        "p.tokens === '40' && p.attempt === '1' && p.stopDisabled && !p.sendDisabled",
    )
    .await?;
    ensure!(
        figures["ttft"].as_str().is_some_and(|t| t.ends_with(" ms")),
        "figures: {figures}"
    );
    ensure!(
        figures["rate"]
            .as_str()
            .is_some_and(|r| r.parse::<f64>().is_ok_and(|r| r > 0.0)),
        "figures: {figures}"
    );
    ensure!(
        figures["status"]
            .as_str()
            .is_some_and(|s| s.contains("40 tokens")),
        "{figures}"
    );
    Ok(())
}

/// Reasoning collapsed above the answer, each tool call's name and arguments below it.
const READ_CONTENT: &str = r#"
const a = document.querySelector('article.exchange[data-request-id="' + arguments[0] + '"]');
const r = a.querySelector('details.reasoning');
return {
  reasoningShown: !r.hidden, reasoningOpen: r.open,
  reasoning: r.querySelector('.thought').textContent,
  calls: [...a.querySelectorAll('.tools .tool-call')].map((c) =>
    [c.querySelector('.tool-name').textContent, c.querySelector('pre').textContent]),
};"#;

async fn shows_reasoning_and_tool_calls(browser: &Browser) -> anyhow::Result<()> {
    use mock_llm::scenario::{Scenario, Shape};
    let prompt = "Plan a trip [[mock reasoning=6 tokens=3 tools=2 delay_ms=5]]";
    let request = send(browser, prompt).await?;
    let done = wait_state(browser, &request, "complete").await?;
    let planned = Scenario::plan(
        &mock_llm::text::prompt_text([prompt]),
        0,
        &Shape {
            text_tokens: 3,
            reasoning: 6,
            tool_calls: 2,
            ..Shape::default()
        },
    );
    ensure!(text(&done) == planned.text.concat(), "{done}");
    let shown = browser.eval(READ_CONTENT, json!([request])).await?;
    ensure!(
        shown["reasoningShown"] == true && shown["reasoningOpen"] == false,
        "reasoning is not shown collapsed: {shown}"
    );
    ensure!(shown["reasoning"] == planned.reasoning.concat(), "{shown}");
    let calls: Vec<Value> = planned
        .tool_calls
        .iter()
        .map(|c| json!([c.name, c.arguments]))
        .collect();
    ensure!(shown["calls"] == json!(calls), "{shown}");
    Ok(())
}

async fn shows_an_upstream_error(browser: &Browser) -> anyhow::Result<()> {
    let prompt = "This one breaks [[mock tokens=10 error_after=3]]";
    let request = send(browser, prompt).await?;
    let failed = wait_state(browser, &request, "error").await?;
    let notices = notices(&failed);
    ensure!(
        notices.len() == 1 && notices[0].starts_with("error: "),
        "notices: {notices:?}"
    );
    // The tokens written before the failure stay readable.
    let tokens = mock_llm::text::completion_tokens(&mock_llm::text::prompt_text([prompt]), 0, 10);
    ensure!(
        text(&failed) == tokens[..3].concat(),
        "text: {:?}",
        text(&failed)
    );
    Ok(())
}

async fn stop_halts_a_long_generation(stack: &Stack, browser: &Browser) -> anyhow::Result<()> {
    let prompt = "A very long story [[mock tokens=2000 delay_ms=20]]";
    let request = send(browser, prompt).await?;
    wait_text(browser, &request, 40).await?;
    wait_panel(browser, "Stop to be enabled", "!p.stopDisabled").await?;
    browser.click("#stop").await?;
    let stopped = wait_state(browser, &request, "cancelled").await?;
    let full = expected_text(prompt, 2000);
    let shown = text(&stopped).to_owned();
    ensure!(
        full.starts_with(&shown) && shown.len() < full.len() / 2,
        "{} of {} characters shown",
        shown.len(),
        full.len()
    );
    let status = browser.eval(READ_PANEL, json!([])).await?;
    ensure!(
        status["status"]
            .as_str()
            .is_some_and(|s| s.contains("cancelled")),
        "{status}"
    );
    // The text stops growing: the page shows every token written before the cancel, the
    // request's last entry is its `complete`, so no token can follow, and the page still shows
    // the same text after that was checked.
    let events = request_events(stack, &request).await?;
    let written: String = events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Token { content, .. } => Some(content.as_str()),
            _ => None,
        })
        .collect();
    ensure!(
        written == shown,
        "Redis has {} characters, the page {}",
        written.len(),
        shown.len()
    );
    ensure!(
        matches!(events.last(), Some(SessionEvent::Complete { .. })),
        "the last entry of the request is not its complete event: {:?}",
        events.last()
    );
    let after = exchange(browser, Some(&request)).await?;
    ensure!(
        after.as_ref().map(text) == Some(shown.as_str()),
        "the text changed after cancel"
    );
    Ok(())
}

/// The events of one request in the mock model's stream of `SESSION`, from Redis.
async fn request_events(stack: &Stack, request_id: &str) -> anyhow::Result<Vec<SessionEvent>> {
    let redis = stack.redis_client().await?;
    let entries: Vec<(String, HashMap<String, String>)> =
        redis.xrange(stream_key(SESSION), "-", "+", None).await?;
    let mut events = Vec::new();
    for (_, fields) in entries {
        let event = SessionEvent::decode(&fields)?;
        if event.request_id().to_string() == request_id {
            events.push(event);
        }
    }
    Ok(events)
}

/// The key of the mock model's stream of `SESSION`.
fn stream_key(session: &str) -> String {
    format!("llm:stream:{{{session}}}:mock")
}

/// Waits until the request's terminal event is in Redis.
async fn wait_terminal_in_redis(stack: &Stack, request_id: &str) -> anyhow::Result<()> {
    wait_until(TIMEOUT, Duration::from_millis(50), || async {
        let events = request_events(stack, request_id).await?;
        Ok(events.iter().any(SessionEvent::is_terminal).then_some(()))
    })
    .await
    .with_context(|| format!("request {request_id} never ended in Redis"))
}

/// The link goes `outage` halfway through a request and comes back after the request ended:
/// the page resumes after the last event it saw and ends with the whole text, once.
async fn resumes_after_an_outage(
    stack: &Stack,
    browser: &Browser,
    proxy: &NetworkLink,
    outage: Link,
) -> anyhow::Result<()> {
    let prompt =
        format!("Keep going through the outage ({outage:?}) [[mock tokens=80 delay_ms=25]]");
    let prompt = prompt.as_str();
    let request = send(browser, prompt).await?;
    wait_text(browser, &request, 30).await?;
    proxy.set(outage);
    let during_outage = async {
        browser
            .wait_for(
                "the page to notice the drop",
                PAGE_TIMEOUT,
                "return document.getElementById('conn').dataset.conn === 'reconnecting'",
                json!([]),
            )
            .await?;
        // Everything after the drop is produced while the page is offline.
        wait_terminal_in_redis(stack, &request).await?;
        let during = exchange(browser, Some(&request)).await?;
        ensure!(
            during.as_ref().is_some_and(|e| e["state"] == "streaming"),
            "not streaming while offline: {during:?}"
        );
        Ok(())
    }
    .await;
    proxy.set(Link::Up);
    during_outage?;
    let done = wait_state(browser, &request, "complete").await?;
    ensure!(
        text(&done) == expected_text(prompt, 80),
        "text after the resume: {:?}",
        text(&done)
    );
    // Resumed after the last event seen: the gateway sent nothing twice.
    ensure!(
        done["duplicates"] == 0 && notices(&done).is_empty(),
        "{done}"
    );
    if outage == Link::Failing {
        // EventSource gave up on the 503; the page reopened the stream itself, after its last id.
        let refused = proxy.refused();
        ensure!(
            refused
                .iter()
                .any(|line| line.contains(&request) && line.contains("lastEventId=")),
            "no reopen with lastEventId was tried: {refused:?}"
        );
    }
    Ok(())
}

async fn shows_history_lost(
    stack: &Stack,
    browser: &Browser,
    proxy: &NetworkLink,
) -> anyhow::Result<()> {
    let prompt = "Forgotten while offline [[mock tokens=300 delay_ms=20]]";
    let request = send(browser, prompt).await?;
    wait_text(browser, &request, 20).await?;
    proxy.set(Link::Down);
    let outage = async {
        browser
            .wait_for(
                "the page to notice the drop",
                PAGE_TIMEOUT,
                "return document.getElementById('conn').dataset.conn === 'reconnecting'",
                json!([]),
            )
            .await?;
        let redis = stack.redis_client().await?;
        let _: u64 = redis.xtrim(stream_key(SESSION), ("MAXLEN", "=", 0)).await?;
        anyhow::Ok(())
    }
    .await;
    proxy.set(Link::Up);
    outage?;
    let lost = wait_state(browser, &request, "history_lost").await?;
    let notices = notices(&lost);
    ensure!(
        notices.iter().any(|n| n.starts_with("error: History lost")),
        "notices: {notices:?}"
    );
    // Free the producer for the next scenarios.
    ensure!(stack.cancel(0, &request).await? == 202, "cancel refused");
    wait_terminal_in_redis(stack, &request).await
}

/// Index in `stack.producers` of the producer holding the only pending job.
async fn job_holder(stack: &Stack) -> anyhow::Result<usize> {
    let redis = stack.redis_client().await?;
    wait_until(TIMEOUT, Duration::from_millis(50), || {
        let redis = redis.clone();
        async move {
            let pending: RedisValue = redis
                .xpending("llm:requests", "llm:producers", ("-", "+", 10))
                .await?;
            let consumers: Vec<String> = pending
                .into_array()
                .into_iter()
                .filter_map(|entry| entry.into_array().get(1).cloned()?.into_string())
                .collect();
            let [consumer] = consumers.as_slice() else {
                return Ok(None);
            };
            // Consumer names are `producer-<host>-<pid>`.
            let pid: Option<u32> = consumer.rsplit('-').next().and_then(|p| p.parse().ok());
            Ok(pid.and_then(|pid| stack.producers.iter().position(|p| p.process.pid() == pid)))
        }
    })
    .await
}

async fn a_restart_drops_the_partial_text(stack: &Stack, browser: &Browser) -> anyhow::Result<()> {
    let prompt = "Survive a crash [[mock tokens=150 delay_ms=20]]";
    let request = send(browser, prompt).await?;
    wait_text(browser, &request, 40).await?;
    let holder = job_holder(stack).await?;
    stack.producers[holder].process.sigkill()?;
    let done = wait_state(browser, &request, "complete").await?;
    ensure!(
        text(&done) == expected_text(prompt, 150),
        "text after the restart: {:?}",
        text(&done)
    );
    let notices = notices(&done);
    ensure!(
        notices.len() == 1 && notices[0].starts_with("restart: Attempt 2 started (producer_lost)"),
        "notices: {notices:?}"
    );
    wait_panel(
        browser,
        "the figures of the second attempt",
        "p.attempt === '2' && p.tokens === '150'",
    )
    .await?;
    Ok(())
}

async fn a_second_window_follows_the_session(
    proxy: &NetworkLink,
    browser: &Browser,
    page: &str,
) -> anyhow::Result<()> {
    let follower = browser.new_window().await?;
    browser.switch_to(&follower).await?;
    open_page(proxy, browser, SESSION).await?;
    browser.click("#follow").await?;
    let following = "const c = document.getElementById('conn'); \
                     return c.dataset.conn === 'open' && c.textContent.startsWith('Following')";
    browser
        .wait_for(
            "the follower to connect",
            PAGE_TIMEOUT,
            following,
            json!([]),
        )
        .await?;

    // Following from before the request starts.
    browser.switch_to(page).await?;
    let prompt = "Watched from another tab [[mock tokens=60 delay_ms=10]]";
    let request = send(browser, prompt).await?;
    let sent = wait_state(browser, &request, "complete").await?;
    browser.switch_to(&follower).await?;
    let seen = wait_state(browser, &request, "complete").await?;
    ensure!(text(&seen) == expected_text(prompt, 60), "follower: {seen}");
    ensure!(
        text(&seen) == text(&sent) && seen["mine"] == false,
        "{seen}"
    );

    // Joining while a request is halfway: the follower replays it from its start.
    browser.click("#follow").await?;
    browser.switch_to(page).await?;
    let prompt = "Joined halfway [[mock tokens=150 delay_ms=20]]";
    let request = send(browser, prompt).await?;
    wait_text(browser, &request, 60).await?;
    browser.switch_to(&follower).await?;
    browser.click("#follow").await?;
    let seen = wait_state(browser, &request, "complete").await?;
    ensure!(
        text(&seen) == expected_text(prompt, 150),
        "late follower: {seen}"
    );
    ensure!(
        seen["duplicates"] == 0 && notices(&seen).is_empty(),
        "{seen}"
    );
    browser.switch_to(page).await?;
    let sent = wait_state(browser, &request, "complete").await?;
    ensure!(text(&sent) == text(&seen), "the two windows differ");
    Ok(())
}

/// What the network between the browser and the gateway does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Open connections are cut, new ones fail at once (a dropped Wi-Fi).
    Down,
    /// Open connections are cut, new requests are answered `503` (a proxy whose backend is
    /// restarting): EventSource gives up on such an answer, so the page must reopen it itself.
    Failing,
}

/// The browser reaches the gateway through this TCP forwarder, so the test can break the
/// network. (DevTools' offline emulation leaves an open EventSource response running.)
struct NetworkLink {
    port: u16,
    state: watch::Sender<Link>,
    /// The request lines answered `503` while `Failing`.
    refused: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NetworkLink {
    async fn start(gateway_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let (state, watcher) = watch::channel(Link::Up);
        let refused = Arc::new(Mutex::new(Vec::new()));
        let log = refused.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let link = *watcher.borrow();
                match link {
                    Link::Up => {
                        tokio::spawn(forward(client, gateway_port, watcher.clone()));
                    }
                    Link::Down => drop(client),
                    Link::Failing => {
                        tokio::spawn(answer_503(client, log.clone()));
                    }
                }
            }
        });
        Ok(Self {
            port,
            state,
            refused,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, link: Link) {
        self.state.send_replace(link);
    }

    fn refused(&self) -> Vec<String> {
        self.refused.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for NetworkLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes both ways until either side closes or the link stops being up.
async fn forward(mut client: TcpStream, gateway_port: u16, mut link: watch::Receiver<Link>) {
    let Ok(mut gateway) = TcpStream::connect((Ipv4Addr::LOCALHOST, gateway_port)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut gateway) => {}
        _ = link.wait_for(|state| *state != Link::Up) => {}
    }
}

/// Reads one request head and answers it with the gateway's `503 unavailable` error.
async fn answer_503(client: TcpStream, refused: Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) if first => {
                first = false;
                if let Ok(mut refused) = refused.lock() {
                    refused.push(line.trim_end().to_owned());
                }
            }
            Ok(_) => {}
        }
    }
    let body = r#"{"error":{"code":"unavailable","message":"the test's proxy is failing"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Retry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut client = reader.into_inner();
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Writes a screenshot of the current window to `tests/artifacts/<name>`.
async fn save_screenshot(browser: &Browser, name: &str) -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("tests/artifacts");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, browser.screenshot().await?)?;
    Ok(path)
}
