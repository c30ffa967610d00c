//! Operations: health, readiness, info, metrics, drain, reload, replay, dead letters and
//! saga inspection — what `/health`, `/ready`, `/metrics`, `/info`, `/admin/*` and `/sagas/*`
//! serve. Shared (`Arc`) by the HTTP server on the bridge thread and the main thread.

use crate::config::Config;
use crate::context::BridgeShared;
use serde_json::{Value, json};
use shards::keys::{DeadLetterKey, SagaKey};
use shards::manifest::ManifestSet;
use shards::message::{
    AdminAnswer, AdminError, AdminOp, DeadLetterView, Query, Reply, Request, SagaView, ShardError, ShardStats,
    reply_channel,
};
use shards::routing::Router;
use shards::runtime::ShardHandle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod replay;

/// The process-wide Prometheus recorder (installed once; later runners in the same process
/// share it).
pub fn metrics_handle() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .ok()?;
            builder.install_recorder().ok()
        })
        .clone()
}

/// What a drain achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrainReport {
    pub drained: bool,
    pub in_flight: i64,
    pub outbox_window: u64,
    pub dispatching: i64,
    pub millis: u64,
}

pub struct Ops {
    pub cfg: Config,
    pub shards: Vec<ShardHandle>,
    pub router: Router,
    pub bridge: Arc<BridgeShared>,
    stop_pulling: tokio::sync::watch::Sender<bool>,
    manifests_tx: flume::Sender<Arc<ManifestSet>>,
    manifests: Mutex<Arc<ManifestSet>>,
    draining: AtomicBool,
    /// The process is stopping (its final drain began): no resume.
    exiting: AtomicBool,
    started: Instant,
    nats_url: String,
    /// Set by the bridge once connected (replay reads stored messages).
    pub js: OnceLock<async_nats::jetstream::Context>,
    /// The data directory's last probe (see [`Ops::probe_data_dir`]).
    probe: Mutex<Result<(), String>>,
}

/// An error with its HTTP status.
#[derive(Debug)]
pub struct OpsError {
    pub status: u16,
    pub reason: String,
}

impl OpsError {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Self { status, reason: reason.into() }
    }
}

type OpsResult = Result<Value, OpsError>;

/// `/admin/stats`: every shard's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsReport {
    pub partitions: u32,
    /// Outbox items stored, all shards.
    pub outbox_total: u64,
    pub shards: Vec<ShardStats>,
    /// Aggregate events that matched no saga trigger, by subject pattern.
    pub unmatched: std::collections::BTreeMap<String, u64>,
}

/// `GET /sagas?…`: one page of a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SagaListing {
    pub tenant: String,
    pub saga: String,
    pub count: usize,
    pub instances: Vec<shards::message::SagaSummary>,
    /// Pass as `cursor` for the next page; absent when the listing is complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `/admin/deadletters`: a tenant's dead letters in the order they were written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterList {
    pub tenant: String,
    pub count: usize,
    pub deadletters: Vec<DeadLetterView>,
}

impl Ops {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        shards: Vec<ShardHandle>,
        router: Router,
        bridge: Arc<BridgeShared>,
        stop_pulling: tokio::sync::watch::Sender<bool>,
        manifests_tx: flume::Sender<Arc<ManifestSet>>,
        manifests: Arc<ManifestSet>,
        nats_url: String,
    ) -> Self {
        Self {
            cfg,
            shards,
            router,
            bridge,
            stop_pulling,
            manifests_tx,
            manifests: Mutex::new(manifests),
            draining: AtomicBool::new(false),
            exiting: AtomicBool::new(false),
            started: Instant::now(),
            nats_url,
            js: OnceLock::new(),
            probe: Mutex::new(Ok(())),
        }
    }

    pub fn manifests(&self) -> Arc<ManifestSet> {
        // A panic elsewhere cannot leave the set half-written (it is swapped whole), so a
        // poisoned lock still holds the running set; an empty default would hide it.
        self.manifests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Liveness: storage writable (every shard's last commit succeeded and the data directory
    /// takes a file). NATS is reported, not counted (see [`Self::ready`]).
    pub fn health(&self) -> (bool, Value) {
        let failing: Vec<usize> =
            self.shards.iter().filter(|s| !s.health.writable.load(Ordering::SeqCst)).map(|s| s.index).collect();
        let errors: Vec<String> = self
            .shards
            .iter()
            .filter(|s| !s.health.writable.load(Ordering::SeqCst))
            .filter_map(|s| s.health.last_error.lock().ok().and_then(|e| e.clone()))
            .collect();
        // The data directory's last probe (a thread of its own writes and syncs a file every
        // second; nothing touches the disk on the request path).
        let probe = self.probe.lock().map(|p| p.clone()).unwrap_or_else(|p| p.into_inner().clone());
        // Reported, not counted: liveness is whether this process works. A NATS outage is
        // not cured by replacing the process (it makes the runner not ready instead).
        let nats = self.bridge.connected.load(Ordering::SeqCst);
        let ok = failing.is_empty() && probe.is_ok();
        (
            ok,
            json!({
                "status": if ok { "ok" } else { "failing" },
                "storage": { "writable": failing.is_empty() && probe.is_ok(), "failing_shards": failing, "errors": errors,
                             "data_dir": probe.err() },
                "nats": { "connected": nats },
            }),
        )
    }

    /// Healthy, connected to NATS, pulling, and not draining.
    pub fn ready(&self) -> (bool, Value) {
        let (healthy, _) = self.health();
        let draining = self.is_draining();
        let pulling = self.bridge.pulling.load(Ordering::SeqCst);
        let nats = self.bridge.connected.load(Ordering::SeqCst);
        let ok = healthy && nats && !draining && pulling;
        (
            ok,
            json!({ "ready": ok, "healthy": healthy, "nats_connected": nats, "draining": draining, "pulling": pulling }),
        )
    }

    pub fn info(&self) -> Value {
        let m = self.manifests();
        let cfg = &self.cfg;
        json!({
            "name": "runner",
            "version": env!("CARGO_PKG_VERSION"),
            "mode": cfg.mode,
            "uptime_s": self.started.elapsed().as_secs(),
            "shards": self.router.shards(),
            "partitions": self.router.partitions(),
            "durability": cfg.durability,
            "nats": self.nats_url,
            "streams": { "aggregate_events": cfg.aggregate_stream, "workflow_commands": cfg.commands_stream, "workflow_events": cfg.events_stream },
            "consumers": {
                "aggregate": cfg.aggregate_filters.iter().map(|f| json!({"filter": f, "durable": crate::config::durable_name(&cfg.durable_prefix, "events", f)})).collect::<Vec<_>>(),
                "results": cfg.result_filters.iter().map(|f| json!({"filter": f, "durable": crate::config::durable_name(&cfg.durable_prefix, "results", f)})).collect::<Vec<_>>(),
                "commands": cfg.command_filters.iter().map(|f| json!({"filter": f, "durable": crate::config::durable_name(&cfg.durable_prefix, "effects", f)})).collect::<Vec<_>>(),
            },
            "sagas": m.sagas.keys().collect::<Vec<_>>(),
            "effects": m.effects.keys().collect::<Vec<_>>(),
            "manifests": m.files,
        })
    }

    /// Prometheus text: everything recorded, plus gauges sampled now. An error when this
    /// process has no Prometheus recorder (another metrics recorder was installed first).
    pub fn metrics(&self) -> Result<String, OpsError> {
        let b = &self.bridge;
        metrics::gauge!("runner_messages_in_flight").set(b.in_flight.load(Ordering::SeqCst) as f64);
        metrics::gauge!("runner_dispatches_in_flight").set(b.dispatching.load(Ordering::SeqCst) as f64);
        metrics::gauge!("runner_nats_connected").set(if b.connected.load(Ordering::SeqCst) { 1.0 } else { 0.0 });
        metrics::gauge!("runner_ready").set(if self.ready().0 { 1.0 } else { 0.0 });
        for s in &self.shards {
            let shard = s.index.to_string();
            metrics::gauge!("runner_inbox_depth", "shard" => shard.clone()).set(s.queued() as f64);
            metrics::gauge!("runner_storage_writable", "shard" => shard)
                .set(if s.health.writable.load(Ordering::SeqCst) { 1.0 } else { 0.0 });
        }
        metrics_handle().map(|h| h.render()).ok_or_else(|| {
            OpsError::new(500, "no Prometheus recorder: another metrics recorder was installed in this process first")
        })
    }

    fn drain_state(&self) -> (i64, u64, i64) {
        let window = self.shards.iter().map(|h| h.health.outbox_window.load(Ordering::SeqCst)).sum();
        (self.bridge.in_flight.load(Ordering::SeqCst), window, self.bridge.dispatching.load(Ordering::SeqCst))
    }

    /// The process is stopping: a drain from now on is the last one (no resume).
    pub fn mark_exiting(&self) {
        self.exiting.store(true, Ordering::SeqCst);
    }

    /// Ends a drain: consumers bind again (at their ack floors) and pull; the runner is
    /// ready again once they do. Refused when not draining or when the process is stopping.
    pub fn resume(&self) -> Result<Value, OpsError> {
        if self.exiting.load(Ordering::SeqCst) {
            return Err(OpsError::new(409, "the runner is shutting down; it cannot resume"));
        }
        if !self.draining.swap(false, Ordering::SeqCst) {
            return Err(OpsError::new(409, "the runner is not draining; nothing to resume"));
        }
        tracing::info!("resuming: consumers bind again");
        let _ = self.stop_pulling.send(false);
        Ok(json!({ "resumed": true }))
    }

    fn begin_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: not ready, stopping pulls");
        }
        self.bridge.pulling.store(false, Ordering::SeqCst);
        let _ = self.stop_pulling.send(true);
    }

    fn report(&self, started: Instant) -> DrainReport {
        let (in_flight, outbox_window, dispatching) = self.drain_state();
        DrainReport {
            drained: in_flight <= 0 && outbox_window == 0 && dispatching <= 0,
            in_flight,
            outbox_window,
            dispatching,
            millis: started.elapsed().as_millis() as u64,
        }
    }

    /// Stops pulling, waits (blocking) until in-flight messages settled and the outbox is
    /// flushed, or the deadline passes.
    pub fn drain_blocking(&self, deadline: Duration) -> DrainReport {
        let started = Instant::now();
        self.begin_drain();
        while started.elapsed() < deadline {
            let r = self.report(started);
            if r.drained {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.report(started)
    }

    /// [`Self::drain_blocking`] for async callers (the HTTP server).
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        let started = Instant::now();
        self.begin_drain();
        while started.elapsed() < deadline {
            let r = self.report(started);
            if r.drained {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.report(started)
    }

    /// Asks shard `shard` a question and waits for its typed answer.
    async fn ask<T>(
        &self,
        shard: usize,
        query: impl FnOnce(Reply<Result<T, ShardError>>) -> Query,
    ) -> Result<T, OpsError> {
        let (tx, rx) = reply_channel();
        let h = &self.shards[shard % self.shards.len()];
        h.send(Request::Query(query(tx))).await.map_err(|e| OpsError::new(503, e.to_string()))?;
        rx.await
            .map_err(|_| OpsError::new(503, format!("shard {shard} did not answer")))?
            .map_err(|e| OpsError::new(500, e.to_string()))
    }

    async fn admin(&self, shard: usize, op: AdminOp) -> Result<AdminAnswer, OpsError> {
        self.admin_raw(shard, op).await?.map_err(|e| {
            let status = if e.is_not_found() { 404 } else { 409 };
            OpsError::new(status, e.to_string())
        })
    }

    /// An operator action and the shard's answer as it came (`Err`: no answer).
    async fn admin_raw(&self, shard: usize, op: AdminOp) -> Result<Result<AdminAnswer, AdminError>, OpsError> {
        let (tx, rx) = reply_channel();
        let h = &self.shards[shard % self.shards.len()];
        h.send(Request::Admin { op, reply: tx }).await.map_err(|e| OpsError::new(503, e.to_string()))?;
        rx.await.map_err(|_| OpsError::new(503, format!("shard {shard} did not answer")))
    }

    pub async fn saga(&self, key: SagaKey) -> Result<SagaView, OpsError> {
        key.validate().map_err(|e| OpsError::new(400, e.to_string()))?;
        let shard = self.router.shard(&key.tenant, key.route());
        let k = key.clone();
        self.ask(shard, |reply| Query::Saga { key: k, reply })
            .await?
            .ok_or_else(|| OpsError::new(404, format!("no saga instance for {key}")))
    }

    /// Store counts, outbox depth and blocked keys of every shard.
    pub async fn stats(&self) -> Result<StatsReport, OpsError> {
        let mut shards = Vec::new();
        for s in 0..self.shards.len() {
            shards.push(self.ask(s, |reply| Query::Stats { reply }).await?);
        }
        let outbox_total = shards.iter().map(|s| s.store.outbox).sum();
        let unmatched = self.bridge.unmatched.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        Ok(StatsReport { partitions: self.router.partitions(), outbox_total, shards, unmatched })
    }

    /// One page of the instances of `saga` for `tenant` matching `filter`, every shard merged
    /// in key order (correlation ids by length, then bytes) after `cursor`; `next` continues it (absent at the end). Each
    /// shard reads a bounded number of records per page, so a sparse filter may give a short
    /// (even empty) page with a `next`.
    pub async fn list(
        &self,
        tenant: &str,
        saga: &str,
        filter: shards::message::ListFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<SagaListing, OpsError> {
        if !self.manifests().sagas.contains_key(saga) {
            return Err(OpsError::new(404, format!("saga {saga:?} is not loaded")));
        }
        let limit = limit.clamp(1, 1_000);
        let mut pages = Vec::with_capacity(self.shards.len());
        for s in 0..self.shards.len() {
            let (t, g, f, after) = (tenant.to_owned(), saga.to_owned(), filter.clone(), cursor.clone());
            pages.push(self.ask(s, |reply| Query::List { tenant: t, saga: g, filter: f, after, limit, reply }).await?);
        }
        // A shard that stopped early has listed everything up to where it stopped: the page
        // ends at the least such place, so no shard's instances are skipped.
        use shards::message::listing_order as order;
        let bound = pages.iter().filter_map(|p| p.scanned_to.clone()).min_by(|a, b| order(a).cmp(&order(b)));
        let mut instances: Vec<shards::message::SagaSummary> = pages
            .into_iter()
            .flat_map(|p| p.instances)
            .filter(|i| bound.as_ref().is_none_or(|b| order(&i.correlation_id) <= order(b)))
            .collect();
        instances.sort_by(|a, b| order(&a.correlation_id).cmp(&order(&b.correlation_id)));
        let next = if instances.len() > limit {
            instances.truncate(limit);
            instances.last().map(|i| i.correlation_id.clone())
        } else {
            bound
        };
        Ok(SagaListing { tenant: tenant.to_owned(), saga: saga.to_owned(), count: instances.len(), instances, next })
    }

    pub async fn deadletters(&self, tenant: &str, limit: usize) -> Result<DeadLetterList, OpsError> {
        let mut all = Vec::new();
        for s in 0..self.shards.len() {
            let t = tenant.to_owned();
            all.extend(self.ask(s, |reply| Query::DeadLetters { tenant: t, after: None, limit, reply }).await?);
        }
        // Stream order across shards too (each shard's stamps are its own).
        all.sort_by(|a, b| shards::core::deadletter_order(a).cmp(&shards::core::deadletter_order(b)));
        all.truncate(limit);
        Ok(DeadLetterList { tenant: tenant.to_owned(), count: all.len(), deadletters: all })
    }

    /// Correlation ids of every instance of `saga` for `tenant`, all shards, page by page.
    async fn instances(&self, tenant: &str, saga: &str) -> Result<Vec<String>, OpsError> {
        let mut out = Vec::new();
        for s in 0..self.shards.len() {
            let mut after = None;
            loop {
                let (t, g) = (tenant.to_owned(), saga.to_owned());
                let page = self.ask(s, |reply| Query::Sagas { tenant: t, saga: g, after, limit: 1_000, reply }).await?;
                out.extend(page.correlation_ids);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn requeue(&self, key: SagaKey, skip_poison: bool) -> Result<AdminAnswer, OpsError> {
        key.validate().map_err(|e| OpsError::new(400, e.to_string()))?;
        let shard = self.router.shard(&key.tenant, key.route());
        self.admin(shard, AdminOp::Requeue { key, skip_poison }).await
    }

    pub async fn discard(&self, key: DeadLetterKey) -> Result<AdminAnswer, OpsError> {
        self.on_letter(key, |key| AdminOp::Discard { key }).await
    }

    /// Puts a failed dispatch back in the outbox (see [`AdminOp::Resend`]).
    pub async fn resend(&self, key: DeadLetterKey) -> Result<AdminAnswer, OpsError> {
        self.on_letter(key, |key| AdminOp::Resend { key }).await
    }

    /// Runs `op` on the shard that holds the dead letter `key`.
    async fn on_letter(
        &self,
        key: DeadLetterKey,
        op: impl Fn(DeadLetterKey) -> AdminOp,
    ) -> Result<AdminAnswer, OpsError> {
        // A dead letter lives in the shard of its partition; ask each (a point lookup).
        let mut last = OpsError::new(404, format!("no dead letter {} for tenant {:?}", key.id, key.tenant));
        for s in 0..self.shards.len() {
            match self.admin(s, op(key.clone())).await {
                Ok(v) => return Ok(v),
                Err(e) if e.status == 404 => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Loads the configured manifests; if they validate, every shard swaps them between
    /// batches, then the bridge. A bad set changes nothing and answers every problem.
    pub async fn reload(&self) -> OpsResult {
        let set = match crate::config::load_manifests(&self.cfg) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running manifests stay");
                return Err(OpsError::new(422, e.to_string()));
            }
        };
        for h in &self.shards {
            let (tx, rx) = reply_channel();
            h.send(Request::Reload { set: set.clone(), reply: tx })
                .await
                .map_err(|e| OpsError::new(503, e.to_string()))?;
            rx.await
                .map_err(|_| OpsError::new(503, "a shard did not answer"))?
                .map_err(|e| OpsError::new(422, e.to_string()))?;
        }
        let _ = self.manifests_tx.send(set.clone());
        if let Ok(mut m) = self.manifests.lock() {
            *m = set.clone();
        }
        tracing::info!(sagas = set.sagas.len(), effects = set.effects.len(), "manifests reloaded");
        Ok(
            json!({ "reloaded": true, "sagas": set.sagas.keys().collect::<Vec<_>>(), "effects": set.effects.keys().collect::<Vec<_>>() }),
        )
    }
}

impl Ops {
    /// Checks that the data directory takes a new file (create, write, sync, remove) and
    /// keeps the answer for `/health`. Blocks on the disk: called by the probe thread.
    pub fn probe_data_dir(&self) {
        let r = probe_dir(&self.cfg.data_dir);
        if let Err(e) = &r {
            tracing::warn!(error = %e, "data directory probe failed");
        }
        match self.probe.lock() {
            Ok(mut p) => *p = r,
            Err(p) => *p.into_inner() = r,
        }
    }
}

/// Checks that the data directory takes a new file (create, write, sync, remove).
fn probe_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join(".health-probe");
    let r = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(b"ok")?;
        f.sync_all()?;
        std::fs::remove_file(&path)
    })();
    r.map_err(|e| format!("data directory {} is not writable: {e}", dir.display()))
}
