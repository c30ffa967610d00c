//! `runner check` and read-only inspection.

use crate::cli::Source;
use std::path::Path;
use std::process::ExitCode;

pub fn check(_config: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("todo")
}
pub fn saga_get(_c: Option<&Path>, _s: &Source, _t: &str, _saga: &str, _cid: &str) -> anyhow::Result<ExitCode> {
    anyhow::bail!("todo")
}
pub fn deadletters(_c: Option<&Path>, _s: &Source, _t: &str, _l: usize) -> anyhow::Result<ExitCode> {
    anyhow::bail!("todo")
}
pub fn outbox_stats(_c: Option<&Path>, _s: &Source) -> anyhow::Result<ExitCode> {
    anyhow::bail!("todo")
}
