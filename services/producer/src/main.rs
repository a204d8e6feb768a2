//! The `producer` binary: `producer [--config PATH]`.

use anyhow::Context;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = service_kit::cli::parse(
        "producer",
        env!("CARGO_PKG_VERSION"),
        "Claims chat jobs, streams them from the model and writes every token to Redis.",
    );
    let settings = service_kit::Settings::load(args.config.as_deref()).context("configuration")?;
    // The runtime's size is a setting (`producer.runtime_threads`), so it is built after the
    // settings are read, not by `#[tokio::main]`.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if settings.producer.runtime_threads > 0 {
        runtime.worker_threads(settings.producer.runtime_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let telemetry = service_kit::telemetry::init(&settings.telemetry, "producer");
        let shutdown = service_kit::shutdown::on_signal();
        let app = producer::Application::build(settings, shutdown).await?;
        tracing::info!(port = app.port(), "producer health and metrics listening");
        let result = app.run_until_stopped().await;
        telemetry.shutdown().await;
        result
    })
}
