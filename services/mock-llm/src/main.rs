//! `mock-llm [--config PATH]` (`--help`): loads the shared config, starts logging, serves until
//! SIGTERM.

use anyhow::Context;
use mock_llm::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = service_kit::cli::parse(
        "mock-llm",
        env!("CARGO_PKG_VERSION"),
        "An OpenAI-compatible streaming server with deterministic text and injectable faults \
         (section [mock_llm] of the settings).",
    );
    let settings = service_kit::config::Settings::load(args.config.as_deref())
        .context("cannot load the configuration")?;
    // Kept to the end and flushed, like every service: spans still buffered at exit are lost
    // without its `shutdown`.
    let telemetry = service_kit::telemetry::init(&settings.telemetry, "mock-llm");

    let shutdown = service_kit::shutdown::on_signal();
    let app =
        Application::build(settings.mock_llm.clone(), shutdown).context("cannot start mock-llm")?;
    tracing::info!(addr = %app.local_addr(), "mock-llm listening");
    let result = app
        .run_until_stopped()
        .await
        .context("mock-llm server failed");
    telemetry.shutdown().await;
    result
}
