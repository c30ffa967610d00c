//! `runner-bench`: the Runner's benchmarks. Each workload measures its own baseline in the
//! same run (a bare heed loop for the store, the raw JetStream step for end to end), so the
//! ratio is what matters. See bench/README.md for results and the commands that produced them.

mod backlog;
mod cpu;
mod durability;
mod js;
mod orders;
mod pipeline;
mod plot;
mod progress;
mod raw;
mod report;
mod scaling;
mod step;
mod store;
mod workflow;

use clap::{Parser, Subcommand};

// The same allocator as the `runner` binary, so in-process workloads measure what it runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use report::Report;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "runner-bench", about = "Benchmarks of the Runner (results in bench/README.md)")]
struct Cli {
    /// Write results as JSON (and SVG plots, where a workload has them) into this folder.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Short runs (the test suite uses this so the harness cannot rot).
    #[arg(long, global = true)]
    quick: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    no_progress: bool,
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
    /// Raw JetStream step alone (fetch, publish with PubAck and Nats-Msg-Id, ack): the ceiling.
    Raw(RawArgs),
    /// Saga step end to end against the raw JetStream step in the same run: throughput and
    /// event → command PubAck latency (open loop).
    Step(step::Args),
    /// The example order workflow end to end: peak orders/s, then latency at 25/50/100% of it.
    Workflow(workflow::Args),
    /// Shard scaling 1..cores: the shard pipeline alone and the saga step end to end.
    Scaling(scaling::Args),
    /// Backlog drain: events already in the stream when the runner starts; rate and RSS.
    Backlog(backlog::Args),
    /// fsync against the unsafe durability modes, pipeline and end to end.
    Durability(durability::Args),
    /// The order workflow with every party in its own process (runner, nats-server, upstream,
    /// Gateway, load): closed loop and open-loop rates, latency to the final upstream call,
    /// CPU per process and runner thread, commits per order, exactly-once from the upstream's
    /// records, the raw JetStream step as the baseline (issue 16).
    Orders(orders::Args),
    /// (Used by `orders`.) The upstream process: records and answers HTTP effect calls.
    #[command(hide = true)]
    Upstream(orders::servers::UpstreamArgs),
    /// (Used by `orders`.) The Gateway process: answers aggregate commands, appends events.
    #[command(hide = true)]
    Gateway(orders::servers::GatewayArgs),
    /// (Used by `orders`.) The load process: publishes orders, hears of their final calls.
    #[command(hide = true)]
    OrdersLoad(orders::load::LoadArgs),
    /// Every end-to-end workload (step with its raw baseline, workflow, scaling, backlog,
    /// durability, orders) with default settings, then the goals table.
    All,
}

#[derive(clap::Args)]
struct RawArgs {
    /// Messages preloaded and drained.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
}

fn raw_only(a: RawArgs, quick: bool) -> Result<Report, String> {
    let n = if quick { 3_000 } else { a.events };
    let js = js::Js::start()?;
    let w = raw::Window::default();
    let (rate, cpu) = raw::throughput(&js, n, w)?;
    let mut r = Report::new("Raw JetStream step", &["messages", "steps in flight", "steps/s", "CPU µs per step"]);
    r.row(vec![n.to_string(), w.steps.to_string(), report::fmt_rate(rate), cpu.per_step(n)]);
    r.data = serde_json::json!({"events": n, "steps_per_s": rate});
    Ok(r)
}

/// Default arguments of a workload (as if given no options).
fn defaults<A: Parser>() -> A {
    A::try_parse_from(["runner-bench"]).unwrap_or_else(|e| unreachable!("defaults parse: {e}"))
}

fn emit(report: &Report, out: Option<&Path>) -> Result<(), String> {
    println!("{}", report.table());
    if let Some(dir) = out {
        report.write(dir).map_err(|e| format!("cannot write results to {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The goals of the benchmarks issue, read back from the reports of an `all` run.
fn goals(reports: &[Report]) -> Report {
    let find = |name: &str| reports.iter().find(|r| r.name == name).map(|r| &r.data);
    let mut g = Report::new("Goals", &["goal", "target", "measured", "met"]);
    // `ok`: None for a figure reported without a target.
    let mut row = |goal: &str, target: &str, measured: Option<(f64, String)>, ok: Option<&dyn Fn(f64) -> bool>| {
        let (m, met) = match (measured, ok) {
            (Some((v, text)), Some(ok)) => (text, if ok(v) { "yes" } else { "no" }),
            (Some((_, text)), None) => (text, "-"),
            (None, _) => ("not measured".into(), "-"),
        };
        g.row(vec![goal.into(), target.into(), m, met.into()]);
    };
    let step = find("Saga step");
    row(
        "saga step / raw JetStream step (same run)",
        "≥ 80%",
        step.and_then(|d| d["ratio"].as_f64()).map(|v| (v, format!("{:.0}%", v * 100.0))),
        Some(&|v| v >= 0.8),
    );
    let p99_at_50 = step.and_then(|d| {
        d["latency"].as_array()?.iter().find(|l| l["label"].as_str() == Some("saga step at 50% of peak")).cloned()
    });
    row(
        "p99 event → command at 50% of peak",
        "< 5 ms",
        p99_at_50.and_then(|l| l["p99_us"].as_f64()).map(|v| (v, format!("{:.2} ms", v / 1000.0))),
        Some(&|v| v < 5000.0),
    );
    let scaling = find("Shard scaling").and_then(|d| d["rows"].as_array().cloned()).unwrap_or_default();
    let pipe: Vec<_> = scaling.iter().filter(|r| r["stage"] == "shard pipeline (in-process)").collect();
    row(
        "shard pipeline per shard, fsync (1 shard)",
        "≥ 40k transitions/s",
        pipe.first().and_then(|r| r["per_shard"].as_f64()).map(|v| (v, report::fmt_rate(v))),
        Some(&|v| v >= 40_000.0),
    );
    if let Some(last) = pipe.last() {
        row(
            &format!("shard pipeline scaling efficiency at {} shards", last["shards"]),
            "≥ 0.85",
            last["efficiency"].as_f64().map(|v| (v, format!("{v:.2}"))),
            Some(&|v| v >= 0.85),
        );
    }
    let e2e: Vec<_> = scaling.iter().filter(|r| r["stage"] == "saga step end to end").collect();
    if let Some(last) = e2e.last().filter(|_| e2e.len() > 1) {
        row(
            &format!("end-to-end scaling efficiency at {} shards (reported, no target)", last["shards"]),
            "-",
            last["efficiency"].as_f64().map(|v| (v, format!("{v:.2}"))),
            None,
        );
    }
    row(
        "backlog drain: heap (RssAnon) peak, second half of the drain vs first half",
        "flat (< 10%)",
        find("Backlog drain")
            .and_then(|d| d["anon_growth_second_half"].as_f64())
            .map(|v| (v, format!("{:+.0}%", v * 100.0))),
        Some(&|v| v < 0.10),
    );
    // Issue 16's targets, from the separate-process order workflow (default loads only: a
    // quick run's loads are smaller and leave these "not measured").
    let runs =
        find("Order workflow in separate processes").and_then(|d| d["runs"].as_array().cloned()).unwrap_or_default();
    let closed = runs.iter().find(|r| r["closed_in_flight"].as_u64() == Some(256));
    let open = |rate: f64| runs.iter().find(|r| r["offered_per_s"].as_f64() == Some(rate));
    let ms = |r: Option<&serde_json::Value>, key: &str| {
        r.and_then(|r| r[key].as_f64()).map(|v| (v, format!("{:.2} ms", v / 1000.0)))
    };
    row(
        "order workflow, separate processes, 256 in flight (issue 16)",
        "≥ 3,000 orders/s",
        closed.and_then(|r| r["orders_per_s"].as_f64()).map(|v| (v, report::fmt_rate(v))),
        Some(&|v| v >= 3000.0),
    );
    row("order workflow at an open 300 orders/s: p50", "< 5 ms", ms(open(300.0), "p50_us"), Some(&|v| v < 5000.0));
    row("order workflow at an open 300 orders/s: p99", "< 15 ms", ms(open(300.0), "p99_us"), Some(&|v| v < 15_000.0));
    // Sustained: the completions keep up with the offered rate (within 2%).
    let sustained = open(1000.0).and_then(|r| r["orders_per_s"].as_f64()).is_some_and(|v| v >= 980.0);
    row(
        "order workflow at an open 1,000 orders/s: p99, sustained",
        "< 25 ms",
        ms(open(1000.0), "p99_us"),
        Some(&move |v| sustained && v < 25_000.0),
    );
    g
}

/// Runs every end-to-end workload, printing each table as soon as it is done (a failure
/// does not stop the others), then the goals table. Returns whether all succeeded.
fn run_all(quick: bool, out: Option<&Path>) -> bool {
    type Workload<'a> = Box<dyn Fn() -> Result<Report, String> + 'a>;
    let workloads: [(&str, Workload); 6] = [
        ("step", Box::new(|| step::run(defaults(), quick, out))),
        ("workflow", Box::new(|| workflow::run(defaults(), quick, out))),
        ("scaling", Box::new(|| scaling::run(defaults(), quick, out))),
        ("backlog", Box::new(|| backlog::run(defaults(), quick, out))),
        ("durability", Box::new(|| durability::run(defaults(), quick, out))),
        ("orders", Box::new(|| orders::run(defaults(), quick, out))),
    ];
    let mut ok = true;
    let mut reports = Vec::new();
    for (name, f) in workloads {
        match f().and_then(|r| emit(&r, out).map(|_| r)) {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("error: {name}: {e}");
                ok = false;
            }
        }
    }
    if let Err(e) = emit(&goals(&reports), out) {
        eprintln!("error: {e}");
        ok = false;
    }
    ok
}

/// `runner-bench runner ARGS…` is the `runner` binary itself (`runner::cli`): the harness of
/// `orders` starts it as the runner process when no `--runner-bin` is given, so the runner
/// it measures is always built from the same sources as the harness, without a second build.
fn runner_passthrough() -> Option<std::process::ExitCode> {
    let mut argv = std::env::args_os();
    let program = argv.next()?;
    if argv.next().is_none_or(|a| a != "runner") {
        return None;
    }
    let _ = program;
    let cli = <runner::cli::Cli as Parser>::parse_from(std::iter::once("runner".into()).chain(argv));
    Some(match runner::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// Exit status of a helper process of `orders`.
fn helper(r: Result<bool, String>) -> ! {
    match r {
        Ok(true) => std::process::exit(0),
        // The load wrote its (incomplete) results.
        Ok(false) => std::process::exit(3),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    if let Some(code) = runner_passthrough() {
        std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
    }
    let cli = Cli::parse();
    if cli.no_progress {
        progress::hide();
    }
    runner::logging::init(runner::config::LogFormat::Pretty, "warn");
    let out = cli.out.as_deref();
    let quick = cli.quick;
    let result = match cli.cmd {
        Cmd::Store(a) => store::run(a, quick),
        Cmd::Pipeline(a) => pipeline::run(a, quick),
        Cmd::Raw(a) => raw_only(a, quick),
        Cmd::Step(a) => step::run(a, quick, out),
        Cmd::Workflow(a) => workflow::run(a, quick, out),
        Cmd::Scaling(a) => scaling::run(a, quick, out),
        Cmd::Backlog(a) => backlog::run(a, quick, out),
        Cmd::Durability(a) => durability::run(a, quick, out),
        Cmd::Orders(a) => orders::run(a, quick, out),
        Cmd::Upstream(a) => helper(orders::servers::upstream(a).map(|_| true)),
        Cmd::Gateway(a) => helper(orders::servers::gateway(a).map(|_| true)),
        Cmd::OrdersLoad(a) => helper(orders::load::run(a)),
        Cmd::All => {
            let ok = run_all(quick, out);
            if let Some(dir) = out {
                println!("results written to {}", dir.display());
            }
            std::process::exit(if ok { 0 } else { 1 });
        }
    };
    match result.and_then(|r| emit(&r, out)) {
        Ok(()) => {
            if let Some(dir) = out {
                println!("results written to {}", dir.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
