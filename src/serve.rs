//! `runner serve`.

use crate::config::Config;
use std::process::ExitCode;

pub fn run(_cfg: Config) -> anyhow::Result<ExitCode> {
    anyhow::bail!("todo")
}
