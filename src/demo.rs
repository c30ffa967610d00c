//! `runner demo`: the order workflow on an embedded NATS, as in production but in one process.
//!
//! ```text
//!  demo publisher ──OrderPlaced──> AGGREGATE_EVENTS ──> runner (combined mode)
//!  runner ──Reserve──> dev Gateway ──InventoryReserved──> AGGREGATE_EVENTS ──> runner
//!  runner's shards ──charge_payment / ship_order / refund_payment (HTTP, in place)──> built-in upstream
//!  (each command and its result are published to WORKFLOW_COMMANDS / WORKFLOW_EVENTS for the record)
//! ```
//!
//! A share of payments is declined (compensation: release inventory) and a share is too
//! slow: their reservation is back-dated by 29.5 s, so the saga's 30 s payment timeout
//! fires after half a second (compensation: release and refund). At the end it prints a
//! summary and checks exactly-once against the upstream's and the Gateway's own records and
//! the command stream: every command executed once, none missing. Exit code 1 if not.
//!
//! Completion is observed at the fixtures (an order's last call), not by asking the shards,
//! so the demo does not slow the runner down; the sagas' own end states are read once, at
//! the end. The fixtures run on their own threads.

use crate::app::{App, AppOptions};
use crate::fixture::{HttpFixture, Reply};
use clap::Args;
use shards::clock::Clock;
use shards::manifest::ManifestSet;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Orders to run.
    #[arg(long, default_value_t = 10_000)]
    pub orders: usize,
    /// Percent of orders whose payment is declined (compensation).
    #[arg(long, default_value_t = 5.0)]
    pub payment_failures: f64,
    /// Percent of orders whose payment is too slow (payment timeout, compensation).
    #[arg(long, default_value_t = 1.0)]
    pub timeouts: f64,
    /// Orders published per second (0: as fast as the runner takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Keep the demo's data directory here (default: a temporary directory).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// No progress bar (plain log lines instead).
    #[arg(long)]
    pub no_progress: bool,
}

const SAGAS: &str = include_str!("../examples/order/sagas.yaml");
const PROGRAM: &str = include_str!("../examples/order/order.rhai");
const EFFECTS: &str = include_str!("../examples/order/effects.yaml");
const TENANT: &str = "demo";
const SAGA: &str = "order_fulfillment";

fn now_ms() -> u64 {
    shards::clock::SystemClock.now_ms()
}

/// Deterministic, well-spread choice of orders: order `i` is in the first `pct` percent.
fn chosen(i: usize, pct: f64, offset: f64) -> bool {
    ((i as f64 * 0.618_033_988_749 + offset) % 1.0) < pct / 100.0
}

/// An order's last calls, as the fixtures see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Final {
    Shipped,
    Released,
    Refunded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    Declined,
    Slow,
}

fn kind_of(i: usize, args: &DemoArgs) -> Kind {
    if chosen(i, args.payment_failures, 0.0) {
        Kind::Declined
    } else if chosen(i, args.timeouts, 0.5) {
        Kind::Slow
    } else {
        Kind::Ok
    }
}

pub fn run(config: Option<&Path>, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = crate::config::load_from_process(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::logging::init(cfg.log_format, if cfg.log_level == "info" { "warn" } else { &cfg.log_level });
    let _ = crate::ops::metrics_handle();
    let tmp = tempfile::tempdir()?;
    let data = args.data.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&data)?;

    // The built-in upstream for the effects.
    let orders = args.orders;
    let kinds: Arc<Vec<Kind>> = Arc::new((0..orders).map(|i| kind_of(i, &args)).collect());
    // Completion is seen where it happens, at the fixtures (an order's last call), not by
    // asking the shards: the demo does not load the runner it measures.
    let (final_tx, final_rx) = flume::unbounded::<(usize, Final, u64)>();
    let index_of = |order: &str| order.strip_prefix("order-").and_then(|n| n.parse::<usize>().ok());
    let upstream = HttpFixture::start()?;
    let k2 = kinds.clone();
    let finals = final_tx.clone();
    upstream.set_handler(Arc::new(move |r| {
        let order = r.json()["order_id"].as_str().unwrap_or_default().to_owned();
        let index = index_of(&order);
        let kind = index.and_then(|i| k2.get(i).copied()).unwrap_or(Kind::Ok);
        if let Some(i) = index {
            match r.path.as_str() {
                "/shipping/ship" => {
                    let _ = finals.send((i, Final::Shipped, now_ms()));
                }
                "/payments/refund" => {
                    let _ = finals.send((i, Final::Refunded, now_ms()));
                }
                _ => {}
            }
        }
        match (r.path.as_str(), kind) {
            ("/payments/charge", Kind::Declined) => {
                Some(Reply::new(402, serde_json::json!({"reason": "card declined"})))
            }
            ("/payments/charge", Kind::Slow) => {
                Some(Reply { status: 200, body: serde_json::json!({"payment_id": "late"}), delay_ms: 1_500 })
            }
            ("/payments/charge", _) => Some(Reply::new(200, serde_json::json!({"payment_id": format!("pay-{order}")}))),
            ("/shipping/ship", _) => Some(Reply::new(200, serde_json::json!({"tracking": format!("trk-{order}")}))),
            _ => None,
        }
    }));

    // The development Gateway: answers Reserve by publishing InventoryReserved, as the
    // inventory aggregate would.
    let (reserve_tx, reserve_rx) = flume::unbounded::<String>();
    let gateway = HttpFixture::start()?;
    gateway.set_handler(Arc::new(move |r| {
        let body = r.json();
        match (body["command"].as_str(), body["correlation_id"].as_str()) {
            (Some("Reserve"), Some(o)) => {
                let _ = reserve_tx.send(o.to_owned());
            }
            (Some("Release"), Some(o)) => {
                if let Some(i) = index_of(o) {
                    let _ = final_tx.send((i, Final::Released, now_ms()));
                }
            }
            _ => {}
        }
        None
    }));

    // Manifests: the example set, effects pointed at the built-in upstream.
    let mdir = data.join("manifests");
    std::fs::create_dir_all(&mdir)?;
    std::fs::write(mdir.join("sagas.yaml"), SAGAS)?;
    std::fs::write(mdir.join("order.rhai"), PROGRAM)?;
    std::fs::write(mdir.join("effects.yaml"), EFFECTS)?;
    let secrets = data.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    std::fs::write(secrets.join("payments_token"), "demo-token")?;
    let up = upstream.url();
    let manifests = ManifestSet::load_with_vars(
        &[mdir.join("sagas.yaml"), mdir.join("effects.yaml")],
        &shards::program::check_program,
        &|name| matches!(name, "PAYMENTS_URL" | "SHIPPING_URL").then(|| up.clone()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    cfg.mode = crate::config::Mode::Combined;
    cfg.nats_url = None;
    cfg.data_dir = data.join("runner");
    cfg.gateway_url = Some(gateway.url());
    cfg.secrets_dir = secrets;
    cfg.http_addr = "127.0.0.1:0".parse()?;
    println!(
        "runner demo: {orders} orders ({:.1}% payments declined, {:.1}% payments timing out), {} shard(s)",
        args.payment_failures, args.timeouts, cfg.shards
    );
    let app = App::start(cfg, AppOptions { manifests: Some(Arc::new(manifests)), ..AppOptions::default() })?;
    println!(
        "embedded NATS at {}; operations at http://{}",
        app.nats_url(),
        app.http_addr().map(|a| a.to_string()).unwrap_or_default()
    );

    let nats_url = app.nats_url().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let client = rt.block_on(async_nats::connect(nats_url.as_str()))?;
    let js = rt.block_on(async { async_nats::jetstream::new(client.clone()) });

    // The inventory aggregate's answers.
    let js2 = js.clone();
    let k3 = kinds.clone();
    let reserver = rt.spawn(async move {
        let mut acks = Vec::new();
        while let Ok(o) = reserve_rx.recv_async().await {
            let slow = o.strip_prefix("order-").and_then(|n| n.parse::<usize>().ok()).and_then(|i| k3.get(i).copied()) == Some(Kind::Slow);
            let ts = if slow { now_ms() - 29_500 } else { now_ms() };
            let body = serde_json::json!({"id": format!("reserved-{o}"), "type": "InventoryReserved", "tenant_id": TENANT, "timestamp": ts, "data": {"order_id": o}});
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("reserved-{o}").as_str());
            if let Ok(ack) = js2.publish_with_headers(format!("events.{TENANT}.inventory.InventoryReserved"), h, body.to_string().into()).await {
                acks.push(ack);
            }
            if acks.len() >= 256 || reserve_rx.is_empty() {
                for a in acks.drain(..) {
                    let _ = a.await;
                }
            }
        }
    });

    // Publish the orders.
    let started = Instant::now();
    let mut published_at = vec![0u64; orders];
    let progress =
        if args.no_progress { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(orders as u64) };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg:10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.set_message("published");
    rt.block_on(async {
        let mut acks = Vec::new();
        for (i, at) in published_at.iter_mut().enumerate() {
            if args.rate > 0 {
                let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let o = format!("order-{i}");
            let body = serde_json::json!({"id": format!("placed-{o}"), "type": "OrderPlaced", "tenant_id": TENANT,
                "data": {"order_id": o, "sku": format!("sku-{}", i % 50), "qty": 1 + i % 3, "amount": 10 + i % 90, "customer": format!("cust-{}", i % 500)}});
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("placed-{o}").as_str());
            *at = now_ms();
            acks.push(
                js.publish_with_headers(format!("events.{TENANT}.order.OrderPlaced"), h, body.to_string().into())
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot publish order {i}: {e}"))?,
            );
            if acks.len() >= 512 {
                for a in acks.drain(..) {
                    a.await.map_err(|e| anyhow::anyhow!("order not acknowledged by JetStream: {e}"))?;
                }
            }
            progress.inc(1);
        }
        for a in acks {
            a.await.map_err(|e| anyhow::anyhow!("order not acknowledged by JetStream: {e}"))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // Wait for every order's last call (ship; release for a declined payment; release and
    // refund for a payment that timed out).
    progress.set_position(0);
    progress.set_message("finished");
    progress.reset_eta();
    let mut seen: Vec<Vec<Final>> = vec![Vec::new(); orders];
    let mut finished_at: BTreeMap<usize, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120 + orders as u64 / 100);
    while finished_at.len() < orders && Instant::now() < deadline {
        let Ok((i, what, at)) = final_rx.recv_timeout(Duration::from_millis(200)) else { continue };
        let Some(calls) = seen.get_mut(i) else { continue };
        calls.push(what);
        let done = match kinds[i] {
            Kind::Ok => calls.contains(&Final::Shipped),
            Kind::Declined => calls.contains(&Final::Released),
            Kind::Slow => calls.contains(&Final::Released) && calls.contains(&Final::Refunded),
        };
        if done && !finished_at.contains_key(&i) {
            finished_at.insert(i, at);
            progress.inc(1);
        }
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    // Then, once, what each saga says of itself (the summary, and a check that an order's
    // last call matched how its saga ended).
    let mut open: BTreeSet<usize> = BTreeSet::new();
    let mut finished: BTreeMap<usize, (String, u64)> = BTreeMap::new();
    for i in 0..orders {
        let v = rt.block_on(app.ops().saga(shards::keys::SagaKey::new(TENANT, SAGA, format!("order-{i}"))));
        match (v, finished_at.get(&i)) {
            (Ok(v), Some(at)) if v.record.status.is_final() => {
                let state: serde_json::Value = serde_json::from_str(v.record.state.get())?;
                let step = state["step"].as_str().unwrap_or("?").to_owned();
                finished.insert(i, (step, *at));
            }
            _ => {
                open.insert(i);
            }
        }
    }
    // Let in-flight side calls (late payments, refunds) land, read the command stream while
    // the embedded server still runs, then stop.
    let report = app.drain(Duration::from_secs(30));
    let commands =
        rt.block_on(read_commands(&js)).map_err(|e| anyhow::anyhow!("cannot read WORKFLOW_COMMANDS back: {e}"))?;
    app.shutdown();
    drop(reserver);

    // Exactly-once: the command stream against what the upstream and the Gateway saw.
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    for r in upstream.records().into_iter().chain(gateway.records()) {
        *calls.entry(r.header("idempotency-key").unwrap_or("<none>").to_owned()).or_default() += 1;
    }
    let duplicated: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k.clone()).collect();
    let missing: Vec<_> = commands.iter().filter(|c| !calls.contains_key(*c)).cloned().collect();

    let mut by_step: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies: Vec<u64> = Vec::new();
    for (i, (step, at)) in &finished {
        *by_step.entry(step.clone()).or_default() += 1;
        latencies.push(at.saturating_sub(published_at[*i]));
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let completed = by_step.get("shipped").copied().unwrap_or(0);
    println!("\n== runner demo summary ==");
    println!("orders:                 {orders}");
    println!("sagas completed:        {completed}");
    println!(
        "sagas compensated:      {} (payment declined {}, payment timed out {}, shipping failed {})",
        finished.len() - completed,
        by_step.get("payment_failed").copied().unwrap_or(0),
        by_step.get("payment_timed_out").copied().unwrap_or(0),
        by_step.get("shipping_failed").copied().unwrap_or(0)
    );
    println!("sagas not finished:     {}", open.len());
    println!("effects executed:       {} upstream calls, {} gateway commands", upstream.count(), gateway.count());
    println!("effect commands:        {} on WORKFLOW_COMMANDS", commands.len());
    println!(
        "throughput:             {:.0} orders/s ({:.2} s)",
        finished.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "event→completion:       p50 {} ms, p99 {} ms, max {} ms",
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(0)
    );
    println!("drain at stop:          {}", if report.drained { "clean" } else { "deadline reached" });
    let ok = duplicated.is_empty() && missing.is_empty() && open.is_empty();
    if ok {
        println!("exactly-once check:     PASSED (no command executed twice, none missing, every saga finished)");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "exactly-once check:     FAILED: {} executed twice {:?}, {} missing {:?}, {} sagas unfinished",
            duplicated.len(),
            duplicated.iter().take(5).collect::<Vec<_>>(),
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            open.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Every command id on `WORKFLOW_COMMANDS` (read with an ephemeral consumer).
async fn read_commands(js: &async_nats::jetstream::Context) -> anyhow::Result<Vec<String>> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures::StreamExt;
    let stream = js.get_stream("WORKFLOW_COMMANDS").await?;
    let total = stream.get_info().await?.state.messages;
    let consumer = stream.create_consumer(pull::Config { ack_policy: AckPolicy::None, ..Default::default() }).await?;
    let mut ids = Vec::with_capacity(total as usize);
    let mut messages = consumer.messages().await?;
    while (ids.len() as u64) < total {
        let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.ok().flatten() else {
            break;
        };
        if let Some(id) = serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v["command_id"].as_str().map(str::to_owned))
        {
            ids.push(id);
        }
    }
    Ok(ids)
}
