//! The `processor` binary: `processor [--config PATH]`.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = service_kit::cli::parse(
        "processor",
        env!("CARGO_PKG_VERSION"),
        "Applies the event shards' records to analytics counters and settles token quotas.",
    );
    let settings = service_kit::Settings::load(args.config.as_deref()).context("configuration")?;
    let telemetry = service_kit::telemetry::init(&settings.telemetry, "processor");
    let shutdown = service_kit::shutdown::on_signal();
    let app = processor::Application::build(settings, shutdown).await?;
    tracing::info!(port = app.port(), "processor health and metrics listening");
    let result = app.run_until_stopped().await;
    telemetry.shutdown().await;
    result
}
