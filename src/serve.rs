//! `runner serve`: start, wait for SIGTERM or Ctrl-C, drain, stop.
//!
//! On the signal: `/ready` turns false, consumers stop pulling, in-flight messages settle,
//! the relay flushes, the shards commit what they accepted, then everything stops — within
//! `shutdown.drain_deadline_ms`. What the deadline cuts off is not acked, so JetStream
//! redelivers it: nothing is lost and nothing runs twice.

use crate::app::{App, AppOptions};
use crate::config::Config;
use std::process::ExitCode;

pub fn run(cfg: Config) -> anyhow::Result<ExitCode> {
    crate::logging::init(cfg.log_format, &cfg.log_level);
    let _ = crate::ops::metrics_handle();
    let app = App::start(cfg, AppOptions::default())?;
    if let Some(addr) = app.http_addr() {
        tracing::info!(addr = %addr, "serving; SIGTERM or Ctrl-C drains and stops");
    }
    let signal = wait_for_signal()?;
    tracing::info!(signal, "shutting down: draining");
    let report = app.shutdown();
    if report.drained {
        tracing::info!(millis = report.millis, "drained and stopped");
    } else {
        tracing::warn!(
            in_flight = report.in_flight,
            outbox = report.outbox_window,
            "drain deadline reached; unsettled messages will be redelivered"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Blocks until SIGTERM or SIGINT; returns its name.
pub fn wait_for_signal() -> anyhow::Result<&'static str> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        })
    })
}
