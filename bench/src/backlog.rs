//! Backlog drain: `n` events already in `AGGREGATE_EVENTS` when the runner starts (the
//! saga-step saga: one transition and one effect command each). Drain rate, and the
//! resident memory of this process (which holds the runner) sampled while it drains.

use crate::js::{Js, Rss, mib, rss, step_event};
use crate::plot::{self, Series};
use crate::report::{Report, fmt_rate};
use crate::step::{SUBJECT, StepRunner};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// Events in the stream before the runner starts.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Shards (default: the CPUs available).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Pin each shard to a core.
    #[arg(long)]
    pub pin: bool,
    #[arg(long, default_value = "fsync")]
    pub durability: String,
}

#[derive(serde::Serialize, Clone, Copy)]
struct Sample {
    secs: f64,
    acked: u64,
    runner: Rss,
    nats_rss_kib: u64,
}

pub fn run(args: Args, quick: bool, out: Option<&Path>) -> Result<Report, String> {
    let d = crate::pipeline::parse_durability(&args.durability)?;
    let shards = args.shards.unwrap_or_else(shards::runtime::default_shards);
    let n = if quick { 5_000 } else { args.events };
    let js = Js::start()?;
    let r = StepRunner::new()?;
    js.create_stream("AGGREGATE_EVENTS", &["events.>"])?;
    let pb = crate::progress::bar(n, "backlog: preload");
    js.preload(
        n,
        |i| {
            let (id, body) = step_event(i, 0);
            (SUBJECT.into(), id, body)
        },
        &pb,
    )?;
    pb.finish_and_clear();
    let nats_pid = js.server.pid();
    let before = rss(None);
    let pb = crate::progress::bar(n, &format!("backlog: drain ({shards} shards)"));
    let started = Instant::now();
    let app = r.start(&js, "backlog", shards, args.pin, d)?;
    let mut samples = Vec::new();
    let mut last = (0u64, Instant::now());
    let res = loop {
        let acked = app.bridge().shared().acked.load(Ordering::Relaxed);
        samples.push(Sample {
            secs: started.elapsed().as_secs_f64(),
            acked,
            runner: rss(None),
            nats_rss_kib: nats_pid.map(|p| rss(Some(p)).vm_rss_kib).unwrap_or(0),
        });
        pb.set_position(acked.min(n));
        // Drained: every event acked and every command stored.
        if acked >= n && js.count("WORKFLOW_COMMANDS") >= n {
            break Ok(());
        }
        let progress = acked + js.count("WORKFLOW_COMMANDS");
        if progress != last.0 {
            last = (progress, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            break Err(format!("backlog drain stalled at {acked} of {n} acks"));
        }
        std::thread::sleep(Duration::from_millis(if acked >= n { 10 } else { 100 }));
    };
    let drain_secs = started.elapsed().as_secs_f64();
    let commands = js.count("WORKFLOW_COMMANDS");
    app.shutdown();
    pb.finish_and_clear();
    res?;
    if commands < n {
        return Err(format!("backlog: {commands} commands for {n} events"));
    }
    let steady = js.steady_rate("WORKFLOW_COMMANDS", n)?;
    let mut report = Report::new(
        "Backlog drain",
        &["point", "elapsed s", "events acked", "VmRSS MiB", "RssAnon MiB", "RssFile MiB", "nats-server RSS MiB"],
    );
    report.row(vec![
        "before start".into(),
        "0.0".into(),
        "0".into(),
        mib(before.vm_rss_kib),
        mib(before.rss_anon_kib),
        mib(before.rss_file_kib),
        mib(samples.first().map(|s| s.nats_rss_kib).unwrap_or(0)),
    ]);
    for q in [25u64, 50, 75, 100] {
        let target = n * q / 100;
        if let Some(s) = samples.iter().find(|s| s.acked >= target) {
            report.row(vec![
                format!("{q}% drained"),
                format!("{:.1}", s.secs),
                s.acked.to_string(),
                mib(s.runner.vm_rss_kib),
                mib(s.runner.rss_anon_kib),
                mib(s.runner.rss_file_kib),
                mib(s.nats_rss_kib),
            ]);
        }
    }
    let peak = samples.iter().map(|s| s.runner.vm_rss_kib).max().unwrap_or(0);
    let peak_anon = samples.iter().map(|s| s.runner.rss_anon_kib).max().unwrap_or(0);
    let peak_nats = samples.iter().map(|s| s.nats_rss_kib).max().unwrap_or(0);
    report.row(vec!["peak".into(), "-".into(), "-".into(), mib(peak), mib(peak_anon), "-".into(), mib(peak_nats)]);
    let anon_at = |q: u64| samples.iter().find(|s| s.acked >= n * q / 100).map(|s| s.runner.rss_anon_kib).unwrap_or(0);
    let (a25, a100) = (anon_at(25), anon_at(100));
    // Flat: the heap stops growing; its peak in the second half of the drain (from 50% acked
    // until every command is out) against its peak in the first half.
    let peak_in = |second: bool| {
        samples.iter().filter(|s| (s.acked >= n / 2) == second).map(|s| s.runner.rss_anon_kib).max().unwrap_or(0)
    };
    let growth = peak_in(true) as f64 / peak_in(false).max(1) as f64 - 1.0;
    report.notes.push(format!(
        "{n} step events ({} bytes) in the stream before the runner starts, {shards} shard(s), {} durability. Drain: \
         {} events/s from the runner's start to the last ack ({drain_secs:.1} s, start-up included), {} events/s \
         steady (5th–95th percentile of the commands). Memory sampled every 100 ms from /proc/self/status (the \
         runner runs in this process): RssAnon is the heap; RssFile is mostly the LMDB map's pages, which grow with \
         the data written and belong to the page cache. Heap at 25% and 100% drained: {} and {} MiB; its peak in the second half of the drain against the \
         first half: {:+.0}% (flat: no growth once the pipeline is full).",
        crate::js::BODY_BYTES,
        args.durability,
        fmt_rate(n as f64 / drain_secs),
        fmt_rate(steady),
        mib(a25),
        mib(a100),
        growth * 100.0
    ));
    report.data = serde_json::json!({
        "events": n, "shards": shards, "durability": args.durability, "drain_secs": drain_secs,
        "drain_per_s": n as f64 / drain_secs, "steady_per_s": steady, "rss_before": before,
        "peak_vm_rss_kib": peak, "peak_rss_anon_kib": peak_anon, "peak_nats_rss_kib": peak_nats,
        "anon_growth_second_half": growth, "samples": samples,
    });
    if let Some(dir) = out {
        let to = |f: &dyn Fn(&Sample) -> u64| samples.iter().map(|s| (s.secs, f(s) as f64 / 1024.0)).collect();
        let series = vec![
            Series::new("runner VmRSS", to(&|s| s.runner.vm_rss_kib)),
            Series::new("runner RssAnon (heap)", to(&|s| s.runner.rss_anon_kib)),
            Series::new("runner RssFile (LMDB map pages)", to(&|s| s.runner.rss_file_kib)),
            Series::new("nats-server RSS", to(&|s| s.nats_rss_kib)),
            Series::new("events acked (×1000)", samples.iter().map(|s| (s.secs, s.acked as f64 / 1000.0)).collect()),
        ];
        let xmax = samples.last().map(|s| s.secs).unwrap_or(1.0).max(0.1);
        plot::lines(
            &dir.join("backlog-rss.svg"),
            &format!("Backlog drain of {n} events: resident memory (MiB)"),
            plot::XAxis {
                desc: "seconds since the runner started",
                fmt: &|x| format!("{x:.1}"),
                range: (0.0, xmax),
                ticks: 10,
            },
            "MiB",
            &series,
        )?;
    }
    Ok(report)
}
