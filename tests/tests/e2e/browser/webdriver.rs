//! Headless Chromium driven through ChromeDriver, with a small W3C WebDriver client over
//! `reqwest` (the few commands a page test needs, no extra crates).
//!
//! Chromium is started by the test itself (`--remote-debugging-port=0`, a fresh profile) and
//! ChromeDriver attaches to it, so both are children of the test: dropping a [`Browser`] kills
//! them, even when the test fails halfway. The binaries come from `$CHROMIUM` /
//! `$CHROMEDRIVER`, else `chromium` and `chromedriver` on `PATH` (Debian's `chromium` and
//! `chromium-driver` packages; `scripts/browser-test.sh` installs them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use serde_json::{Value, json};
use test_support::{ServiceProcess, find_on_path, free_port, wait_until};

/// How long Chromium and ChromeDriver get to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The key of an element reference in W3C WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Flags that work on these machines (closed network, root, no GPU), plus the ones that keep a
/// window that is not in front running at full speed (two windows follow one session).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--window-size=1280,1100",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
];

fn binary(env: &str, names: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    names
        .iter()
        .find_map(|name| find_on_path(name).ok())
        .ok_or_else(|| {
            anyhow!(
                "none of {names:?} is on PATH (set ${env}); scripts/browser-test.sh installs \
                 Debian's chromium and chromium-driver"
            )
        })
}

/// One browser with one WebDriver session.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`
    session: String,
    chromium: ServiceProcess,
    driver: ServiceProcess,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn launch() -> anyhow::Result<Self> {
        let chromium_bin = binary(
            "CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        )?;
        let driver_bin = binary("CHROMEDRIVER", &["chromedriver"])?;
        let profile = tempfile::tempdir().context("creating a Chromium profile dir")?;
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push("about:blank".to_owned());
        let chromium = ServiceProcess::spawn("chromium", &chromium_bin, &args, &[])?;

        // Chromium writes the port it bound to this file once DevTools listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let devtools_port: u16 = wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            let port_file = port_file.clone();
            async move {
                Ok(std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|text| text.lines().next()?.trim().parse().ok()))
            }
        })
        .await
        .with_context(|| {
            format!(
                "Chromium did not open its DevTools port; log: {}",
                chromium.log_path().display()
            )
        })?;

        let driver_port = free_port()?;
        let driver = ServiceProcess::spawn(
            "chromedriver",
            &driver_bin,
            &[format!("--port={driver_port}")],
            &[],
        )?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        let base = format!("http://127.0.0.1:{driver_port}");
        wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            let (http, base) = (&http, &base);
            async move {
                let status: Value = http
                    .get(format!("{base}/status"))
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok((status["value"]["ready"] == true).then_some(()))
            }
        })
        .await
        .with_context(|| {
            format!(
                "ChromeDriver did not become ready; log: {}",
                driver.log_path().display()
            )
        })?;

        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"debuggerAddress": format!("127.0.0.1:{devtools_port}")},
        }}});
        let created = call(
            &http,
            reqwest::Method::POST,
            &format!("{base}/session"),
            Some(capabilities),
        )
        .await
        .with_context(|| {
            format!(
                "creating the WebDriver session; logs: {} {}",
                driver.log_path().display(),
                chromium.log_path().display()
            )
        })?;
        let id = created["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {created}"))?;
        Ok(Self {
            session: format!("{base}/session/{id}"),
            http,
            chromium,
            driver,
            _profile: profile,
        })
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        call(&self.http, method, &format!("{}{path}", self.session), body).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.command(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({"url": url})).await.map(drop)
    }

    async fn element(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await
            .with_context(|| format!("finding {css}"))?;
        found[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no element reference for {css} in {found}"))
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = self.element(css).await?;
        self.post(&format!("/element/{element}/click"), json!({}))
            .await
            .with_context(|| format!("clicking {css}"))
            .map(drop)
    }

    /// Replaces the value of an input or textarea by typing `text` into it, as a user would.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = self.element(css).await?;
        self.post(&format!("/element/{element}/clear"), json!({}))
            .await
            .with_context(|| format!("clearing {css}"))?;
        self.post(&format!("/element/{element}/value"), json!({"text": text}))
            .await
            .with_context(|| format!("typing into {css}"))
            .map(drop)
    }

    /// Runs `body` as the body of a function in the page (`arguments` are `args`) and returns
    /// what it returns.
    pub async fn eval(&self, body: &str, args: Value) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({"script": body, "args": args}))
            .await
            .with_context(|| format!("running script {body:.60}…"))
    }

    /// Polls `body` until it returns something other than `null`/`false`, or fails after
    /// `timeout` saying what was awaited and what the script returned last.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        body: &str,
        args: Value,
    ) -> anyhow::Result<Value> {
        let last = std::sync::Mutex::new(Value::Null);
        let result = wait_until(timeout, Duration::from_millis(50), || {
            let (last, args) = (&last, args.clone());
            async move {
                let value = self.eval(body, args).await?;
                let done = !(value.is_null() || value == false);
                if let Ok(mut last) = last.lock() {
                    *last = value.clone();
                }
                Ok(done.then_some(value))
            }
        })
        .await;
        result.with_context(|| {
            let last = last.lock().map(|v| v.to_string()).unwrap_or_default();
            format!("waiting for {what} (last seen: {last:.400})")
        })
    }

    /// The viewport as PNG bytes.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let value = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        let encoded = value
            .as_str()
            .ok_or_else(|| anyhow!("screenshot is not a string"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
    }

    /// Opens a new top-level window (not a tab, so both stay "visible") and returns its handle.
    pub async fn new_window(&self) -> anyhow::Result<String> {
        let created = self.post("/window/new", json!({"type": "window"})).await?;
        created["handle"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no window handle in {created}"))
    }

    pub async fn window(&self) -> anyhow::Result<String> {
        let handle = self.command(reqwest::Method::GET, "/window", None).await?;
        handle
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("window handle is not a string: {handle}"))
    }

    pub async fn switch_to(&self, handle: &str) -> anyhow::Result<()> {
        self.post("/window", json!({"handle": handle}))
            .await
            .map(drop)
    }

    /// Ends the session and stops Chromium and ChromeDriver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let ended = self.command(reqwest::Method::DELETE, "", None).await;
        for process in [&mut self.chromium, &mut self.driver] {
            if process.sigterm().is_ok() {
                // Dropping the process kills it if it does not stop by itself.
                let _ = process.wait_exit(Duration::from_secs(5)).await;
            }
        }
        ended.map(drop)
    }
}

/// One WebDriver command; a W3C error answer becomes an `Err` with its error and message.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut request = http.request(method.clone(), url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let answer: Value = response
        .json()
        .await
        .with_context(|| format!("{method} {url}: answer is not JSON"))?;
    let value = answer
        .get("value")
        .cloned()
        .ok_or_else(|| anyhow!("{method} {url}: no value in {answer}"))?;
    if !status.is_success() {
        bail!(
            "{method} {url}: {status} {}: {}",
            value["error"].as_str().unwrap_or("error"),
            value["message"].as_str().unwrap_or_default()
        );
    }
    Ok(value)
}
