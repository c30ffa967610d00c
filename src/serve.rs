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
    // Caught from before the start: a SIGTERM that comes as soon as `/ready` answers drains
    // and stops, instead of ending the process by the signal's default action.
    let signals = Signals::install()?;
    let app = App::start(cfg, AppOptions::default())?;
    if let Some(addr) = app.http_addr() {
        tracing::info!(addr = %addr, "serving; SIGTERM or Ctrl-C drains and stops");
    }
    let signal = signals.wait()?;
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

/// SIGTERM and SIGINT, caught from [`Signals::install`] on (one that comes before
/// [`Signals::wait`] is kept for it).
pub struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (term, int) = {
            let _in_runtime = rt.enter();
            (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
        };
        Ok(Self { rt, term, int })
    }

    /// Blocks until SIGTERM or SIGINT; returns its name.
    pub fn wait(mut self) -> anyhow::Result<&'static str> {
        let (term, int) = (&mut self.term, &mut self.int);
        Ok(self.rt.block_on(async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        }))
    }
}
