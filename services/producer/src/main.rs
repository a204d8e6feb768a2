//! The `producer` binary: `producer [--config PATH]`.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = service_kit::cli::config_path()?;
    let settings = service_kit::Settings::load(path.as_deref()).context("configuration")?;
    let telemetry = service_kit::telemetry::init(&settings.telemetry, "producer");
    let shutdown = service_kit::shutdown::on_signal();
    let app = producer::Application::build(settings, shutdown).await?;
    tracing::info!(port = app.port(), "producer health and metrics listening");
    let result = app.run_until_stopped().await;
    telemetry.shutdown().await;
    result
}
