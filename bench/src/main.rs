//! `runner-bench`: the Runner's benchmarks. Each workload measures its own baseline in the
//! same run (a bare heed loop for the store, raw JetStream for end to end), so the ratio
//! is what matters. See bench/README.md for results and the commands that produced them.

mod pipeline;
mod report;
mod store;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "runner-bench", about = "Benchmarks of the Runner (results in bench/README.md)")]
struct Cli {
    /// Write results as JSON (and plots, where a workload has them) into this folder.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Short runs (the test suite uses this so the harness cannot rot).
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store micro-benchmark: commits/s and puts/s per shard for batch sizes 1..1000,
    /// 1 and 2 shards, against a bare heed loop in the same run.
    Store(store::Args),
    /// Shard pipeline: example-saga transitions handed in-process to shards (no NATS),
    /// fsync group commit; transition cost and throughput per shard.
    Pipeline(pipeline::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Store(a) => store::run(a, cli.quick),
        Cmd::Pipeline(a) => pipeline::run(a, cli.quick),
    };
    match result {
        Ok(report) => {
            println!("{}", report.table());
            if let Some(dir) = cli.out {
                if let Err(e) = report.write(&dir) {
                    eprintln!("error: cannot write results to {}: {e}", dir.display());
                    std::process::exit(1);
                }
                println!("results written to {}", dir.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
