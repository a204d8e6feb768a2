//! Logs and traces. Logs go to stderr as text or JSON, filtered by `RUST_LOG` or the config.
//! Traces go to an OTLP/HTTP collector when `telemetry.otlp_endpoint` is set; otherwise no
//! OpenTelemetry layer is installed at all, so tracing costs what plain `tracing` spans cost.
//!
//! W3C `traceparent` strings carry a trace across services through stream entries:
//! [`current_traceparent`] writes the current span's context, [`continue_trace`] makes a span
//! the child of one read from an entry.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, OtlpProtocol, TelemetrySettings};

/// Flushes and stops trace export on shutdown.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports what is buffered. Runs off the async runtime: the SDK's shutdown blocks.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

fn tracer_provider(
    settings: &TelemetrySettings,
    service: &'static str,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    let Some(endpoint) = &settings.otlp_endpoint else {
        return Ok(None);
    };
    let protocol = match settings.otlp_protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .with_protocol(protocol)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    Ok(Some(provider))
}

/// Installs the global subscriber once; later calls (several services in one test process)
/// keep the first one.
pub fn init(settings: &TelemetrySettings, service: &'static str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = match tracer_provider(settings, service) {
        Ok(provider) => provider,
        Err(error) => {
            // Logging is not up yet; stderr is where a startup problem must show.
            eprintln!("tracing export disabled: cannot build the OTLP exporter: {error}");
            None
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match settings.log_format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr),
        ),
    };
    // Each layer has its own filter: the log level decides what is logged, not what is
    // traced, so `log_level = "warn"` still exports every (info) span. Without an exporter
    // there is no trace layer, and spans the log filter rejects cost nothing.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init();
    if installed.is_ok() {
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            traces = settings.otlp_endpoint.is_some(),
            "starting"
        );
    }
    TelemetryGuard { provider }
}

/// The W3C `traceparent` of the current span, when traces are exported and it is sampled.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the trace in `traceparent` (read from a job or an event entry).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}
