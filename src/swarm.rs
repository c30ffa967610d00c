//! Docker Swarm: tenant ranges, defined once in `swarm/ranges.yaml`, rendered into the stack
//! file (`swarm/stacks/platform.yml`) by `runner swarm render`.
//!
//! A range is a set of tenants (or explicit subject filters) owned by exactly one runner
//! service, pinned to one labelled node (`node.labels.tenant_range==<label>`) where its data
//! volume lives. The renderer refuses a ranges file in which two ranges could consume the same
//! subject, so no key ever has two owners. The output is deterministic (same file in, same
//! bytes out) so the checked-in stack can be held to a fresh render by a test.
//!
//! ```text
//! swarm/ranges.yaml ──parse──► RawRanges ──validate──► Stack ──render──► platform.yml
//!                                          (every problem, naming file and field)
//! ```
//!
//! - `ranges`: the ranges file, parsed and validated into a [`Stack`] (ownership checks).
//! - `render`: the stack file, written from a [`Stack`].

mod ranges;
mod render;

pub use ranges::{
    NatsPlan, RangePlan, RawDefaults, RawFilters, RawNats, RawRange, RawRanges, Scalar, Stack, SwarmErrors,
    filters_overlap, load, parse,
};
pub use render::render;

use anyhow::Context as _;
use std::path::Path;
use std::process::ExitCode;

/// The uid/gid the image runs as (`docker/Dockerfile` creates it); secrets are mounted for it.
pub const RUNTIME_UID: u32 = 10001;
/// The port of `/health`, `/ready` and `/metrics` inside the container.
pub const HTTP_PORT: u16 = 8080;
/// Where the data volume is mounted inside the container.
pub const DATA_DIR: &str = "/data";
/// Added to the drain deadline for `stop_grace_period`, so Swarm never SIGKILLs a drain.
pub const GRACE_MARGIN_MS: u64 = 10_000;

/// `runner swarm render`: validates the ranges file and writes the stack (stdout by default).
pub fn render_command(ranges: &Path, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    let stack = load(ranges).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = render(&stack);
    match out {
        None => print!("{text}"),
        Some(path) => {
            // Write beside the target and rename, so a failed write never leaves half a stack.
            let tmp = path.with_extension("yml.tmp");
            std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
            eprintln!("wrote {} ({} range(s)) from {}", path.display(), stack.ranges.len(), ranges.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
