//! Shard scaling: 1, 2, … up to the cores available, for the shard pipeline alone (events
//! handed in-process to the shards, no NATS) and end to end (the saga step through
//! JetStream, with the raw JetStream step as the ceiling).

use crate::js::Js;
use crate::plot::{self, Series};
use crate::raw::{self, Window};
use crate::report::{Report, fmt_rate, pct};
use crate::step::StepRunner;
use std::path::Path;

#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// Orders (four transitions each) per shard count for the pipeline.
    #[arg(long, default_value_t = 50_000)]
    pub orders: usize,
    /// Events per shard count end to end.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Largest shard count (default: the CPUs available).
    #[arg(long)]
    pub max_shards: Option<usize>,
    /// Pin each shard to a core end to end (the pipeline always pins).
    #[arg(long)]
    pub pin: bool,
    #[arg(long, default_value = "fsync")]
    pub durability: String,
}

pub fn run(args: Args, quick: bool, out: Option<&Path>) -> Result<Report, String> {
    let d = crate::pipeline::parse_durability(&args.durability)?;
    let max = args.max_shards.unwrap_or_else(shards::runtime::default_shards).max(1);
    let (orders, events) = if quick { (500, 2_000) } else { (args.orders, args.events) };
    let mdir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let set = crate::pipeline::manifests(mdir.path())?;
    let mut report =
        Report::new("Shard scaling", &["stage", "shards", "rate /s", "per shard", "scaling efficiency", "avg batch"]);
    let mut pipe = Vec::new();
    for s in 1..=max {
        let pb = crate::progress::bar(max as u64, &format!("pipeline scaling: {s} shard(s)"));
        pb.set_position(s as u64 - 1);
        let t = crate::pipeline::throughput(set.clone(), s, orders, d)?;
        pb.finish_and_clear();
        pipe.push((s, t.transitions_per_s, t.avg_batch));
    }
    let js = Js::start()?;
    let r = StepRunner::new()?;
    let (raw_rate, _) = raw::throughput(&js, events, Window::default())?;
    let mut e2e = Vec::new();
    for s in 1..=max {
        let t = crate::step::throughput(&js, &r, events, s, args.pin, d)?;
        e2e.push((s, t.rate, t.avg_batch));
    }
    let mut rows_json = Vec::new();
    for (stage, list) in [("shard pipeline (in-process)", &pipe), ("saga step end to end", &e2e)] {
        let base = list[0].1;
        for &(s, rate, batch) in list.iter() {
            let eff = rate / s as f64 / base;
            report.row(vec![
                stage.into(),
                s.to_string(),
                fmt_rate(rate),
                fmt_rate(rate / s as f64),
                pct(eff),
                format!("{batch:.0}"),
            ]);
            rows_json.push(serde_json::json!({"stage": stage, "shards": s, "rate": rate, "per_shard": rate / s as f64, "efficiency": eff, "avg_batch": batch}));
        }
    }
    report.row(vec![
        "raw JetStream step (ceiling)".into(),
        "-".into(),
        fmt_rate(raw_rate),
        "-".into(),
        "-".into(),
        "-".into(),
    ]);
    report.notes.push(format!(
        "{} durability. Pipeline: {orders} example-saga orders (4 transitions each) per shard count, handed \
         in-process to pinned shards, a fake bridge confirming dispatches (see the pipeline benchmark). End to end: \
         {events} saga-step events preloaded and drained through JetStream (see the saga-step benchmark), shards {}. \
         Scaling efficiency = per-shard rate / the 1-shard rate. All on the same {} cores as the driver threads and \
         nats-server.",
        args.durability,
        if args.pin { "pinned" } else { "not pinned" },
        report.machine.cores
    ));
    report.data = serde_json::json!({"durability": args.durability, "raw_steps_per_s": raw_rate, "rows": rows_json});
    if let Some(dir) = out {
        let pts = |l: &[(usize, f64, f64)]| l.iter().map(|&(s, r, _)| (s as f64, r)).collect::<Vec<_>>();
        let ideal = |l: &[(usize, f64, f64)]| l.iter().map(|&(s, _, _)| (s as f64, l[0].1 * s as f64)).collect();
        let series = vec![
            Series::new("shard pipeline (transitions/s)", pts(&pipe)),
            Series::new("shard pipeline, linear", ideal(&pipe)),
            Series::new("saga step end to end (steps/s)", pts(&e2e)),
            Series::new("saga step, linear", ideal(&e2e)),
            Series::new("raw JetStream step", (1..=max).map(|s| (s as f64, raw_rate)).collect()),
        ];
        plot::lines(
            &dir.join("shard-scaling.svg"),
            "Throughput against shard count",
            plot::XAxis { desc: "shards", fmt: &plot::whole_x, range: (0.8, max as f64 + 0.2), ticks: max + 1 },
            "per second",
            &series,
        )?;
    }
    Ok(report)
}
