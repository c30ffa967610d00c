//! `shard-move DATA_DIR SHARDS [fill N PARTITIONS]`: prepares a data directory for SHARDS
//! shards, moving whole partitions if it was last run with another count — what `runner
//! serve` does at start. Prints one line per step. Used by the kill-during-move test and
//! usable by operators to move ahead of a start.
//!
//! `fill N PARTITIONS` first creates the directory with N test entries (test helper).

use shards::layout::{DataDir, MoveProgress};
use shards::store::{Durability, StoreConfig};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: shard-move DATA_DIR SHARDS";
    let (Some(dir), Some(shards)) = (args.get(1), args.get(2).and_then(|s| s.parse::<usize>().ok())) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let durability = match std::env::var("SHARD_MOVE_DURABILITY").as_deref() {
        Ok("no_sync") => Durability::NoSync,
        _ => Durability::Fsync,
    };
    let config = StoreConfig { durability, ..StoreConfig::default() };
    let mut out = std::io::stdout();
    let result = DataDir::prepare(std::path::Path::new(dir), 256, shards, &config, |p| {
        let line = match p {
            MoveProgress::Started { from, to } => format!("started {from} -> {to}"),
            MoveProgress::Copied { env, entries } => format!("copied env {env}: {entries}"),
            MoveProgress::Deleted { env, entries } => format!("deleted env {env}: {entries}"),
            MoveProgress::Finished { moved } => format!("finished: {moved} moved"),
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });
    match result {
        Ok(d) => {
            println!("ready: {} partitions, {} shards", d.router().partitions(), d.router().shards());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
