//! The full order workflow end to end: the example saga in `combined` mode with `noop`
//! effects (effect workers in the same runner) and the Gateway fixture, which the benchmark
//! answers like the inventory aggregate would (Reserve → `InventoryReserved`).
//!
//! ```text
//! OrderPlaced ─> saga ─Reserve─> Gateway fixture ─> InventoryReserved ─> saga ─charge_payment─>
//!   effect worker (noop) ─> result ─> saga ─ship_order─> effect worker ─> result ─> saga: completed
//! ```
//!
//! First the peak: orders published as fast as possible. Then open loop at fixed shares of
//! that peak; latency from each order's scheduled publish time to its saga's completion.

use crate::js::{Js, err, now_us, order_placed, padded_event};
use crate::plot::{self, Series};
use crate::report::{Report, fmt_rate, pct};
use crate::step::{Latency, wait_ready};
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use runner::app::{App, AppOptions};
use runner::config::Mode;
use runner::fixture::HttpFixture;
use shards::keys::SagaKey;
use shards::record::InstanceStatus;
use shards::store::Durability;
use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TENANT: &str = "bench";
const SAGA: &str = "order_fulfillment";

#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// Orders of the peak run (published as fast as possible).
    #[arg(long, default_value_t = 20_000)]
    pub orders: u64,
    /// Seconds per open-loop run.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Offered loads, in percent of the measured peak.
    #[arg(long, value_delimiter = ',', default_values_t = vec![25.0, 50.0, 100.0])]
    pub loads: Vec<f64>,
    /// Shards (default: the CPUs available).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Pin each shard to a core.
    #[arg(long)]
    pub pin: bool,
    #[arg(long, default_value = "fsync")]
    pub durability: String,
}

struct Run {
    lat: Latency,
    completed: u64,
}

/// One run: `count` orders at `rate` (infinite: as fast as possible).
#[allow(clippy::too_many_arguments)]
fn run_once(
    js: &Js,
    dir: &Path,
    label: String,
    rate: f64,
    count: u64,
    warm: f64,
    shards: usize,
    pin: bool,
    d: Durability,
) -> Result<Run, String> {
    js.reset();
    js.create_stream("AGGREGATE_EVENTS", &["events.>"])?;
    // The inventory aggregate: answers each Reserve with InventoryReserved.
    let gateway = HttpFixture::start().map_err(err("gateway fixture"))?;
    let (tx, rx) = flume::unbounded::<String>();
    gateway.set_handler(Arc::new(move |r| {
        let body = r.json();
        if body["command"] == "Reserve"
            && let Some(o) = body["correlation_id"].as_str()
        {
            let _ = tx.send(o.to_owned());
        }
        None
    }));
    let js2 = js.js.clone();
    let reserver = js.rt.spawn(async move {
        let mut acks = FuturesUnordered::new();
        loop {
            tokio::select! {
                o = rx.recv_async() => {
                    let Ok(o) = o else { break };
                    let id = format!("reserved-{o}");
                    let body = padded_event(&id, "InventoryReserved", &format!(r#""order_id":"{o}""#));
                    let p = PublishMessage::build().payload(body).message_id(id);
                    if let Ok(f) = js2.send_publish("events.bench.inventory.InventoryReserved", p).await {
                        acks.push(f.into_future());
                    }
                }
                Some(_) = acks.next(), if !acks.is_empty() => {}
            }
        }
    });
    let mdir = dir.join(format!("m-{}", now_us()));
    std::fs::create_dir_all(&mdir).map_err(err("manifest dir"))?;
    let manifests = crate::pipeline::manifests(&mdir)?;
    let mut cfg = crate::step::config(js, &dir.join(format!("wf-{}", now_us())), Mode::Combined, shards, pin, d);
    cfg.gateway_url = Some(gateway.url());
    let app = App::start(cfg, AppOptions { manifests: Some(manifests), ..AppOptions::default() })
        .map_err(|e| format!("runner does not start: {e:#}"))?;
    let res = wait_ready(&app).and_then(|_| drive(js, &app, &label, rate, count, warm));
    app.shutdown();
    reserver.abort();
    drop(gateway);
    res
}

fn drive(js: &Js, app: &App, label: &str, rate: f64, count: u64, warm: f64) -> Result<Run, String> {
    let sent = RefCell::new(vec![0u64; count as usize]);
    let pb = crate::progress::bar(count, &format!("{label}: publish"));
    let (start_us, late) = js.open_loop(
        rate,
        count,
        |i, t| {
            sent.borrow_mut()[i as usize] = t;
            order_placed(i)
        },
        &pb,
    )?;
    pb.finish_and_clear();
    // Two effect results per order (charge, ship), then the final transitions.
    let pb = crate::progress::bar(2 * count, &format!("{label}: effect results"));
    let res = js.wait_count("WORKFLOW_EVENTS", 2 * count, Duration::from_secs(30), &pb);
    pb.finish_and_clear();
    res?;
    let pb = crate::progress::bar(count, &format!("{label}: completions"));
    let done = completions(js, app, count, &pb)?;
    pb.finish_and_clear();
    let sent = sent.into_inner();
    let warm_until = if rate.is_finite() { start_us + (warm * 1e6) as u64 } else { 0 };
    let mut lat = Latency::new(label.to_owned(), rate)?;
    lat.publisher_late_us = late;
    let (mut first, mut last, mut n) = (u64::MAX, 0u64, 0u64);
    for (i, at_ms) in done.iter().enumerate() {
        let t = sent[i];
        first = first.min(t);
        last = last.max(at_ms * 1000);
        if t < warm_until {
            continue;
        }
        lat.hist.record((at_ms * 1000).saturating_sub(t).max(1)).map_err(err("histogram"))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("{label}: no orders after the warm-up"));
    }
    lat.achieved = done.len() as f64 / ((last.saturating_sub(first)).max(1) as f64 / 1e6);
    Ok(Run { lat, completed: done.len() as u64 })
}

/// Waits until every order's saga is final; returns each one's completion time (the saga's
/// `updated_at`, ms since the epoch). Fails if one did not complete.
fn completions(js: &Js, app: &App, count: u64, pb: &indicatif::ProgressBar) -> Result<Vec<u64>, String> {
    let mut done = vec![0u64; count as usize];
    let mut open: Vec<u64> = (0..count).collect();
    let mut last_progress = Instant::now();
    while !open.is_empty() {
        let mut still = Vec::new();
        for chunk in open.chunks(512) {
            let answers = js.rt.block_on(futures::future::join_all(
                chunk.iter().map(|i| app.ops().saga(SagaKey::new(TENANT, SAGA, format!("order-{i}")))),
            ));
            for (i, a) in chunk.iter().zip(answers) {
                match a {
                    Ok(v) if v.record.status == InstanceStatus::Completed => {
                        done[*i as usize] = v.record.updated_at;
                        pb.inc(1);
                    }
                    Ok(v) if v.record.status.is_final() => {
                        return Err(format!("order-{i} ended {} ({})", v.record.status.as_str(), v.record.state.get()));
                    }
                    _ => still.push(*i),
                }
            }
        }
        if still.len() < open.len() {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(30) {
            return Err(format!("{} orders still running after 30 s without progress", still.len()));
        }
        open = still;
        if !open.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(done)
}

pub fn run(args: Args, quick: bool, out: Option<&Path>) -> Result<Report, String> {
    let d = crate::pipeline::parse_durability(&args.durability)?;
    let shards = args.shards.unwrap_or_else(shards::runtime::default_shards);
    let (orders, secs, warm) = if quick { (300, 0.5, 0.2) } else { (args.orders, args.secs, 1.0) };
    let js = Js::start()?;
    let dir = tempfile::tempdir_in(crate::store::bench_dir()).map_err(err("temp dir"))?;
    let mut report = Report::new(
        "Order workflow",
        &["load", "offered orders/s", "completed orders/s", "orders", "p50 ms", "p99 ms", "p99.9 ms", "max ms"],
    );
    let peak = run_once(
        &js,
        dir.path(),
        "peak (as fast as possible)".into(),
        f64::INFINITY,
        orders,
        0.0,
        shards,
        args.pin,
        d,
    )?;
    let peak_rate = peak.lat.achieved;
    let mut runs = vec![peak];
    for load in &args.loads {
        let rate = (peak_rate * load / 100.0).max(20.0);
        let count = ((rate * (secs + warm)) as u64).max(20);
        runs.push(run_once(&js, dir.path(), format!("{load:.0}% of peak"), rate, count, warm, shards, args.pin, d)?);
    }
    for r in &runs {
        let offered = if r.lat.offered.is_finite() { fmt_rate(r.lat.offered) } else { "max".into() };
        let mut row = vec![r.lat.label.clone(), offered, fmt_rate(r.lat.achieved), r.completed.to_string()];
        row.extend(r.lat.cells());
        report.row(row);
    }
    report.notes.push(format!(
        "The example order saga (`examples/order`), `combined` mode, {shards} shard(s), {} durability; effects \
         `noop` (the runner's own effect workers publish the results), Reserve answered by the Gateway fixture with \
         `InventoryReserved`: five JetStream steps and one HTTP call per order. Peak: {orders} orders published as \
         fast as possible; completed orders/s = orders / (last completion − first publish) = {}. Open loop at {} \
         of that for {secs} s after {warm} s of warm-up; latency from the scheduled publish time of `OrderPlaced` \
         to the saga's completion (its `updated_at`: millisecond resolution, taken when the final batch starts, \
         so up to ~1 ms plus the final commit below the true value).",
        args.durability,
        fmt_rate(peak_rate),
        args.loads.iter().map(|l| pct(l / 100.0)).collect::<Vec<_>>().join(", "),
    ));
    report.data = serde_json::json!({
        "shards": shards, "durability": args.durability, "peak_orders_per_s": peak_rate,
        "runs": runs.iter().map(|r| r.lat.json()).collect::<Vec<_>>(),
    });
    if let Some(dir) = out {
        let series: Vec<Series> =
            runs.iter().map(|r| Series::new(&r.lat.label, plot::percentile_points(&r.lat.hist))).collect();
        plot::percentiles(&dir.join("order-workflow-latency.svg"), "Order workflow: event → completion", &series)?;
    }
    Ok(report)
}
