//! The command line (placeholder until the service issue lands the full CLI).

use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
