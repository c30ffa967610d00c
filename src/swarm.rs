//! Docker Swarm: tenant ranges (defined once in `swarm/ranges.yaml`) rendered into the stack.
//! (Filled in by the packaging issue.)

use std::path::Path;
use std::process::ExitCode;

pub fn render_command(_ranges: &Path, _out: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("swarm render is not implemented yet")
}
