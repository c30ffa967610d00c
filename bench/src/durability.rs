//! The price of durability: the shard pipeline and the saga step end to end in each
//! storage mode (`fsync`, and the unsafe `no_meta_sync` and `no_sync`).

use crate::js::Js;
use crate::report::{Report, fmt_rate, pct};
use crate::step::StepRunner;
use std::path::Path;

pub const MODES: [&str; 3] = ["fsync", "no_meta_sync", "no_sync"];

#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// Orders (four transitions each) per mode for the pipeline (1 shard).
    #[arg(long, default_value_t = 50_000)]
    pub orders: usize,
    /// Events per mode end to end.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Shards end to end (default: the CPUs available).
    #[arg(long)]
    pub shards: Option<usize>,
    #[arg(long)]
    pub pin: bool,
}

pub fn run(args: Args, quick: bool, _out: Option<&Path>) -> Result<Report, String> {
    let (orders, events) = if quick { (500, 2_000) } else { (args.orders, args.events) };
    let shards = args.shards.unwrap_or_else(shards::runtime::default_shards);
    let mdir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let set = crate::pipeline::manifests(mdir.path())?;
    let js = Js::start()?;
    let r = StepRunner::new()?;
    let mut report = Report::new(
        "Durability modes",
        &[
            "mode",
            "pipeline transitions/s (1 shard)",
            "vs fsync",
            "avg batch",
            "saga steps/s end to end",
            "vs fsync",
            "avg batch",
        ],
    );
    let mut rows = Vec::new();
    for mode in MODES {
        let d = crate::pipeline::parse_durability(mode)?;
        let pb = crate::progress::bar(MODES.len() as u64, &format!("durability: pipeline, {mode}"));
        let p = crate::pipeline::throughput(set.clone(), 1, orders, d)?;
        pb.finish_and_clear();
        let s = crate::step::throughput(&js, &r, events, shards, args.pin, d)?;
        rows.push((mode, p.transitions_per_s, p.avg_batch, s.rate, s.avg_batch));
    }
    let (p0, s0) = (rows[0].1, rows[0].3);
    for &(mode, p, pb, s, sb) in &rows {
        report.row(vec![
            mode.into(),
            fmt_rate(p),
            pct(p / p0),
            format!("{pb:.0}"),
            fmt_rate(s),
            pct(s / s0),
            format!("{sb:.0}"),
        ]);
    }
    report.notes.push(format!(
        "`fsync`: every commit is on disk before its events are acked. `no_meta_sync` (unsafe): data pages synced, \
         the meta page not; an OS crash or power loss may roll back the last commits of acked events. `no_sync` \
         (unsafe): no fsync; an OS crash may lose any number of acked commits. A process crash loses nothing in any \
         mode. Pipeline: {orders} example-saga orders, 1 pinned shard. End to end: \
         {events} saga-step events drained through JetStream, {shards} shard(s). On this nats-server the PubAck of \
         a file-store publish does not wait for an fsync, so JetStream's side costs the same in every mode."
    ));
    report.data = serde_json::json!({"rows": rows.iter().map(|r| serde_json::json!({
        "mode": r.0, "pipeline_per_s": r.1, "pipeline_avg_batch": r.2, "step_per_s": r.3, "step_avg_batch": r.4
    })).collect::<Vec<_>>()});
    Ok(report)
}
