//! Logging: one `tracing` subscriber for the process, human-readable by
//! default and JSON (one object per line) for log shippers.
//!
//! The filter comes from `RUST_LOG` when set, else from `log.filter`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::configuration::{LogFormat, LogSettings};

/// Builds the filter: `RUST_LOG` first, so an operator can turn up one module
/// without touching the configuration.
pub fn env_filter(settings: &LogSettings) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter))
}

/// Installs the global subscriber, writing to `sink` (stderr in the binary, so
/// that stdout stays free for command output such as `--json` reports).
///
/// Returns false if a subscriber was already installed (tests call this more
/// than once); the first one stays.
pub fn init<W>(settings: &LogSettings, sink: W) -> bool
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter(settings))
        .with_writer(sink)
        .with_target(true);
    match settings.format {
        LogFormat::Human => builder.try_init().is_ok(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
            .is_ok(),
    }
}
