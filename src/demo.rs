//! `runner demo`.

use crate::cli::DemoArgs;
use std::process::ExitCode;

pub fn run(_config: Option<&std::path::Path>, _args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("todo")
}
