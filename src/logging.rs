//! Structured logs: pretty or JSON lines, filtered by `log.level`. Every span and event
//! carries its fields (tenant, saga, correlation_id, command_id, trace ids) as structured
//! data; in JSON each is a key.

use crate::config::LogFormat;

/// The filter in force: `RUST_LOG` when it is set and valid (EnvFilter syntax), else the
/// configured `log.level`, else `info`.
fn filter_spec(rust_log: Option<&str>, level: &str) -> String {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(spec) if tracing_subscriber::EnvFilter::try_new(spec).is_ok() => spec.to_owned(),
        Some(spec) => {
            eprintln!("warning: RUST_LOG={spec:?} is not a valid filter; using log.level {level:?}");
            level.to_owned()
        }
        None => level.to_owned(),
    }
}

/// Installs the global subscriber (once per process; later calls are ignored). `RUST_LOG`,
/// when set, replaces the configured level.
pub fn init(format: LogFormat, level: &str) {
    let spec = filter_spec(std::env::var("RUST_LOG").ok().as_deref(), level);
    let filter =
        tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a container log gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Pretty => builder.with_target(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::filter_spec;

    #[test]
    fn rust_log_replaces_the_configured_level_when_valid() {
        assert_eq!(filter_spec(Some("warn"), "info"), "warn");
        assert_eq!(filter_spec(Some("runner=debug,warn"), "info"), "runner=debug,warn");
        assert_eq!(filter_spec(None, "debug"), "debug");
        assert_eq!(filter_spec(Some("  "), "debug"), "debug");
        assert_eq!(filter_spec(Some("=[[bad"), "info"), "info");
    }
}
