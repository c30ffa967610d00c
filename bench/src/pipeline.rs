//! Shard pipeline benchmark: the example order saga driven in-process (no NATS).
//!
//! 1. Transition cost: one program call of the example saga, with the event's conversion
//!    into the engine, per event type (p50/p99).
//! 2. Throughput: complete orders (OrderPlaced, InventoryReserved, payment result, shipping
//!    result: four transitions) sent to 1..N shards on their executors, fsync group commit,
//!    a fake bridge confirming every dispatch at once.

use crate::report::{Report, fmt_rate};
use futures_lite::future::block_on;
use hdrhistogram::Histogram;
use shards::clock;
use shards::core::event_dynamic;
use shards::ids;
use shards::keys::SagaKey;
use shards::layout::DataDir;
use shards::manifest::ManifestSet;
use shards::message::{
    ApplyOutcome, Control, DispatchOutcome, DispatchResult, Event, Request, ResultInfo, Target, reply_channel,
};
use shards::program::{Entry, Programs};
use shards::runtime::{Pinning, RuntimeConfig, ShardRuntime};
use shards::store::Durability;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub const SAGA: &str = "order_fulfillment";

#[derive(clap::Args)]
pub struct Args {
    /// Orders per shard count (four transitions each).
    #[arg(long, default_value_t = 50_000)]
    orders: usize,
    /// Largest shard count to run (default: the CPUs available).
    #[arg(long)]
    max_shards: Option<usize>,
    /// Durability mode of the shard stores: fsync, no_meta_sync or no_sync.
    #[arg(long, default_value = "fsync")]
    durability: String,
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/order")
}

/// The example saga with development (`noop`) effects.
pub fn manifests(dir: &Path) -> Result<Arc<ManifestSet>, String> {
    let effects = dir.join("effects.yaml");
    std::fs::write(
        &effects,
        "effects:\n  - { name: charge_payment, provider: noop }\n  - { name: ship_order, provider: noop }\n  - { name: refund_payment, provider: noop }\n",
    )
    .map_err(|e| e.to_string())?;
    ManifestSet::load(&[examples_dir().join("sagas.yaml"), effects], &shards::program::check_program)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn event(
    id: String,
    ty: &str,
    stream: &str,
    seq: u64,
    data: serde_json::Value,
    result: Option<ResultInfo>,
) -> Arc<Event> {
    Arc::new(Event {
        id,
        event_type: ty.into(),
        stream: stream.into(),
        seq,
        subject: format!("events.bench.x.{ty}"),
        tenant: "bench".into(),
        timestamp: 1_700_000_000_000 + seq,
        data,
        traceparent: None,
        result,
        headers: Default::default(),
    })
}

/// The four events of order `i` (sequence numbers from `seq`), in order.
pub fn order_events(i: usize, seq: &mut u64) -> Vec<Arc<Event>> {
    let cid = format!("order-{i}");
    let mut next = || {
        *seq += 1;
        *seq
    };
    let placed = event(
        format!("placed-{i}"),
        "OrderPlaced",
        "AGGREGATE_EVENTS",
        next(),
        serde_json::json!({"order_id": cid, "sku": format!("sku-{}", i % 100), "qty": 1 + i % 3, "amount": 10 + i % 90, "customer": format!("cust-{}", i % 1000), "note": "x".repeat(96)}),
        None,
    );
    let reserved = event(
        format!("reserved-{i}"),
        "InventoryReserved",
        "AGGREGATE_EVENTS",
        next(),
        serde_json::json!({"order_id": cid, "sku": "s"}),
        None,
    );
    let charge = ids::work_id("bench", SAGA, &cid, &reserved.id, 0);
    let paid = event(
        format!("result:{charge}"),
        "charge_payment.succeeded",
        "WORKFLOW_EVENTS",
        next(),
        serde_json::json!({"payment_id": format!("pay-{i}")}),
        Some(ResultInfo { command_id: charge.clone(), effect: "charge_payment".into(), outcome: "succeeded".into() }),
    );
    let ship = ids::work_id("bench", SAGA, &cid, &paid.id, 0);
    let shipped = event(
        format!("result:{ship}"),
        "ship_order.succeeded",
        "WORKFLOW_EVENTS",
        next(),
        serde_json::json!({"tracking": format!("trk-{i}")}),
        Some(ResultInfo { command_id: ship, effect: "ship_order".into(), outcome: "succeeded".into() }),
    );
    vec![placed, reserved, paid, shipped]
}

fn transition_cost(set: &ManifestSet, quick: bool) -> Result<Vec<(String, Histogram<u64>)>, String> {
    let programs = Programs::build(set).map_err(|e| e.to_string())?;
    let n = if quick { 2_000 } else { 50_000 };
    let mut hists: Vec<(String, Histogram<u64>)> = Vec::new();
    let mut seq = 0;
    let mut all = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for i in 0..n {
        let mut state = rhai::Dynamic::UNIT;
        for e in order_events(i, &mut seq) {
            let started = Instant::now();
            let input = event_dynamic(&e, &format!("order-{i}"));
            let entry = Entry::OnEvent;
            let t = programs.run(SAGA, entry, state.clone(), input, &e.id).map_err(|e| e.to_string())?;
            // What the pipeline does with the output per transition: serialise the state.
            let bytes = serde_json::to_vec(&t.state).map_err(|e| e.to_string())?;
            let ns = started.elapsed().as_nanos() as u64;
            std::hint::black_box(bytes);
            state = t.state;
            let name = e.event_type.clone();
            match hists.iter_mut().find(|(k, _)| *k == name) {
                Some((_, h)) => h.record(ns).map_err(|e| e.to_string())?,
                None => {
                    let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
                    h.record(ns).map_err(|e| e.to_string())?;
                    hists.push((name, h));
                }
            }
            all.record(ns).map_err(|e| e.to_string())?;
        }
    }
    hists.push(("all".into(), all));
    Ok(hists)
}

pub struct Throughput {
    pub transitions_per_s: f64,
    pub per_shard: f64,
    pub avg_batch: f64,
    pub engine_share: f64,
    pub secs: f64,
}

pub fn throughput(
    set: Arc<ManifestSet>,
    shards: usize,
    orders: usize,
    durability: Durability,
) -> Result<Throughput, String> {
    let dir = tempfile::tempdir_in(crate::store::bench_dir()).map_err(|e| e.to_string())?;
    let mut cfg = RuntimeConfig { pinning: Pinning::Auto, ..RuntimeConfig::default() };
    cfg.shard.store.durability = durability;
    cfg.stall_threshold = None;
    let data = DataDir::prepare(dir.path(), 256, shards, &cfg.shard.store, |_| {}).map_err(|e| e.to_string())?;
    let (dispatch_tx, dispatch_rx) = flume::bounded(1024);
    let rt = ShardRuntime::start(&cfg, &data, set, clock::system(), dispatch_tx).map_err(|e| e.to_string())?;
    let handles = rt.handles().to_vec();
    let bridge = std::thread::spawn(move || {
        while let Ok(req) = dispatch_rx.recv() {
            let results = req
                .items
                .into_iter()
                .map(|d| DispatchResult { key: d.key, send: d.send, outcome: DispatchOutcome::Delivered })
                .collect();
            let _ = handles[req.shard].control(Control::Dispatched(results));
        }
    });
    // Pre-build every request's event so the driver only sends.
    let mut seq = 0;
    let events: Vec<(usize, Vec<Arc<Event>>)> = (0..orders).map(|i| (i, order_events(i, &mut seq))).collect();
    let router = rt.router();
    let (rx_tx, rx_rx) = flume::bounded(200_000);
    let collector = std::thread::spawn(move || {
        let mut ok = 0u64;
        while let Ok(rx) = rx_rx.recv() {
            if block_on(rx) == Ok(ApplyOutcome::Ack) {
                ok += 1;
            }
        }
        ok
    });
    let started = Instant::now();
    for (i, evs) in events {
        let cid = format!("order-{i}");
        let shard = router.shard("bench", SagaKey::new("bench", SAGA, &cid).route());
        for (n, e) in evs.into_iter().enumerate() {
            let (tx, rx) = reply_channel();
            let target = Target { saga: SAGA.into(), correlation_id: cid.clone(), may_start: n == 0 };
            rt.handle(shard)
                .send_blocking(Request::Apply { event: e, targets: vec![target], reply: tx })
                .map_err(|e| e.to_string())?;
            rx_tx.send(rx).map_err(|e| e.to_string())?;
        }
    }
    drop(rx_tx);
    let acked = collector.join().map_err(|_| "collector panicked".to_string())?;
    let secs = started.elapsed().as_secs_f64();
    let mut transitions = 0;
    let mut program_ns = 0;
    let mut requests = 0;
    let mut commits = 0;
    for h in rt.handles() {
        transitions += h.health.transitions.load(Ordering::Relaxed);
        program_ns += h.health.program_ns.load(Ordering::Relaxed);
        requests += h.health.requests.load(Ordering::Relaxed);
        commits += h.health.commits.load(Ordering::Relaxed);
    }
    rt.shutdown();
    let _ = bridge.join();
    // Every event answered once; a payment timer that falls due between an order's events
    // adds a transition (a no-op) or ends the order early (its later events are skipped),
    // so transitions are 3 to 5 per order.
    let events = (orders * 4) as u64;
    if acked != events || transitions < (orders * 3) as u64 || transitions > (orders * 5) as u64 {
        return Err(format!(
            "expected {events} events acked and 3-5 transitions per order, got {transitions} applied and {acked} acked"
        ));
    }
    Ok(Throughput {
        transitions_per_s: transitions as f64 / secs,
        per_shard: transitions as f64 / secs / shards as f64,
        avg_batch: requests as f64 / commits.max(1) as f64,
        engine_share: program_ns as f64 / 1e9 / (secs * shards as f64),
        secs,
    })
}

pub fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "no_meta_sync" => Ok(Durability::NoMetaSync),
        "no_sync" => Ok(Durability::NoSync),
        other => Err(format!("durability {other:?} is not one of fsync, no_meta_sync, no_sync")),
    }
}

pub fn run(args: Args, quick: bool) -> Result<Report, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let set = manifests(dir.path())?;
    let durability = parse_durability(&args.durability)?;
    let mut report = Report::new(
        "Pipeline",
        &["case", "shards", "transitions/s", "per shard", "avg batch", "engine share", "p50 µs", "p99 µs"],
    );
    let mut data = serde_json::Map::new();
    let costs = transition_cost(&set, quick)?;
    let mut cost_json = Vec::new();
    for (name, h) in &costs {
        let (p50, p99) = (h.value_at_quantile(0.5) as f64 / 1000.0, h.value_at_quantile(0.99) as f64 / 1000.0);
        report.row(vec![
            format!("one transition: {name}"),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            format!("{p50:.1}"),
            format!("{p99:.1}"),
        ]);
        cost_json.push(serde_json::json!({"event": name, "p50_us": p50, "p99_us": p99}));
    }
    data.insert("transition_cost".into(), serde_json::Value::Array(cost_json));
    let max_shards = args.max_shards.unwrap_or_else(shards::runtime::default_shards);
    let orders = if quick { 2_000 } else { args.orders };
    let mut tp_json = Vec::new();
    let mut base = None;
    for shards in 1..=max_shards {
        let t = throughput(set.clone(), shards, orders, durability)?;
        let eff = base.map(|b: f64| t.per_shard / b).unwrap_or(1.0);
        base.get_or_insert(t.per_shard);
        report.row(vec![
            format!("throughput ({})", args.durability),
            shards.to_string(),
            fmt_rate(t.transitions_per_s),
            fmt_rate(t.per_shard),
            format!("{:.0}", t.avg_batch),
            format!("{:.0}%", t.engine_share * 100.0),
            "-".into(),
            "-".into(),
        ]);
        tp_json.push(serde_json::json!({"shards": shards, "transitions_per_s": t.transitions_per_s, "per_shard": t.per_shard, "scaling_efficiency": eff, "avg_batch": t.avg_batch, "engine_share": t.engine_share, "secs": t.secs}));
    }
    data.insert("throughput".into(), serde_json::Value::Array(tp_json));
    report.notes.push(format!(
        "{orders} orders x 4 transitions per shard count; one driver thread sends, one collects answers, one fake bridge confirms dispatches — all on the same {} cores as the shards. Engine share: time in the program engine (call + conversions) / shard wall time.",
        report.machine.cores
    ));
    report.data = serde_json::Value::Object(data);
    Ok(report)
}
