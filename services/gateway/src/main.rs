//! The `gateway` binary: `gateway [--config PATH]`.

use anyhow::Context;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = service_kit::cli::parse(
        "gateway",
        env!("CARGO_PKG_VERSION"),
        "The bridge's HTTP front: starts chats, delivers their tokens over SSE from Redis streams.",
    );
    let settings = service_kit::Settings::load(args.config.as_deref()).context("configuration")?;
    let telemetry = service_kit::telemetry::init(&settings.telemetry, "gateway");
    let shutdown = service_kit::shutdown::on_signal();
    let app = gateway::Application::build(settings, shutdown).await?;
    tracing::info!(port = app.port(), "gateway listening");
    let result = app.run_until_stopped().await;
    telemetry.shutdown().await;
    result
}
