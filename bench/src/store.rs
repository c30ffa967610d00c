//! Store micro-benchmark: the project's batch commit against a bare heed loop.

use crate::report::{Report, fmt_rate};
use heed::types::Bytes;
use heed::{Database, EnvOpenOptions};
use shards::keys::SagaKey;
use shards::store::{Batch, Durability, Store, StoreConfig};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per case.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Record size in bytes (a realistic saga record is ~1 KiB).
    #[arg(long, default_value_t = 1024)]
    record: usize,
    /// Rounds per case, alternating which loop goes first; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Clone, Copy)]
enum Impl {
    Bare,
    Project,
}

/// Commits for `secs` with `batch` puts per commit; returns commits done.
fn run_one(which: Impl, dir: &std::path::Path, batch: usize, record: usize, secs: f64) -> Result<u64, String> {
    let value = vec![b'x'; record];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut commits = 0u64;
    let mut n = 0u64;
    match which {
        Impl::Bare => {
            let mut opts = EnvOpenOptions::new().read_txn_without_tls();
            opts.map_size(4 << 30).max_dbs(8);
            let env = unsafe { opts.open(dir) }.map_err(|e| e.to_string())?;
            let mut w = env.write_txn().map_err(|e| e.to_string())?;
            let db: Database<Bytes, Bytes> = env.create_database(&mut w, Some("sagas")).map_err(|e| e.to_string())?;
            w.commit().map_err(|e| e.to_string())?;
            while Instant::now() < deadline {
                let mut w = env.write_txn().map_err(|e| e.to_string())?;
                for _ in 0..batch {
                    n += 1;
                    let key = SagaKey::new("tenant", "order", format!("order-{n}")).encode();
                    db.put(&mut w, &key, &value).map_err(|e| e.to_string())?;
                }
                w.commit().map_err(|e| e.to_string())?;
                commits += 1;
            }
        }
        Impl::Project => {
            let cfg = StoreConfig { durability: Durability::Fsync, initial_map_size: 4 << 30, max_map_size: 8 << 30 };
            let store = Store::open(dir, 0, 256, &cfg).map_err(|e| e.to_string())?;
            while Instant::now() < deadline {
                let mut b = Batch::new();
                for _ in 0..batch {
                    n += 1;
                    b.put_saga_encoded(&SagaKey::new("tenant", "order", format!("order-{n}")), value.clone());
                }
                store.commit(&b).map_err(|e| e.to_string())?;
                commits += 1;
            }
        }
    }
    Ok(commits)
}

pub fn run(args: Args, quick: bool) -> Result<Report, String> {
    let secs = if quick { 0.3 } else { args.secs };
    let batches: &[usize] = if quick { &[1, 100] } else { &[1, 10, 100, 1000] };
    let mut report = Report::new(
        "Store",
        &[
            "shards",
            "batch",
            "bare heed commits/s per shard",
            "project commits/s per shard",
            "project puts/s per shard",
            "project puts/s total",
            "project / bare",
        ],
    );
    let mut data = Vec::new();
    for shards in [1usize, 2] {
        for &batch in batches {
            let rounds = if quick { 1 } else { args.rounds.max(1) };
            let mut samples = [Vec::new(), Vec::new()];
            for round in 0..rounds {
                let order = if round % 2 == 0 {
                    [(0, Impl::Bare), (1, Impl::Project)]
                } else {
                    [(1, Impl::Project), (0, Impl::Bare)]
                };
                for (i, which) in order {
                    let dirs: Vec<tempfile::TempDir> = (0..shards)
                        .map(|_| tempfile::tempdir_in(bench_dir()).map_err(|e| e.to_string()))
                        .collect::<Result<_, _>>()?;
                    let threads: Vec<_> = dirs
                        .iter()
                        .map(|d| {
                            let path = d.path().to_owned();
                            std::thread::spawn(move || run_one(which, &path, batch, args.record, secs))
                        })
                        .collect();
                    let mut total = 0u64;
                    for t in threads {
                        total += t.join().map_err(|_| "bench thread panicked".to_string())??;
                    }
                    samples[i].push(total as f64 / secs / shards as f64);
                }
            }
            let rates = samples.map(|mut v| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            });
            let ratio = rates[1] / rates[0];
            report.row(vec![
                shards.to_string(),
                batch.to_string(),
                fmt_rate(rates[0]),
                fmt_rate(rates[1]),
                fmt_rate(rates[1] * batch as f64),
                fmt_rate(rates[1] * batch as f64 * shards as f64),
                format!("{:.0}%", ratio * 100.0),
            ]);
            data.push(serde_json::json!({"shards": shards, "batch": batch, "bare_commits_per_s": rates[0], "project_commits_per_s": rates[1], "ratio": ratio}));
        }
    }
    report.notes.push(format!("fsync mode, {}-byte records, {secs} s per case, median of {} rounds alternating which loop runs first; both loops write the same keys and values, each shard its own env.", args.record, if quick { 1 } else { args.rounds }));
    report.data = serde_json::Value::Array(data);
    Ok(report)
}

/// Where benchmark envs live: a real disk (not tmpfs), so fsync costs what it costs.
pub fn bench_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("RUNNER_BENCH_DIR").map(Into::into).unwrap_or_else(std::env::temp_dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}
