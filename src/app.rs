//! Wiring: start everything in order, stop it in the reverse order.
//!
//! Start: manifests → data directory (partition move if the shard count changed) →
//! embedded nats-server (when no URL is configured) → shards → bridge (connect, streams,
//! consumers). Stop: stop pulling → wait for in-flight messages to settle → wait for the
//! outbox to flush → stop the shards (they commit what they accepted) → stop the bridge →
//! stop the embedded server. A deadline bounds the waiting; what is cut off is simply
//! redelivered or re-dispatched later, never lost.

use crate::bridge::{Bridge, BridgeInputs};
use crate::config::Config;
use crate::context::BridgeShared;
use crate::nats_server::NatsServer;
use crate::ops::{DrainReport, Ops};
use crate::placement::Placement;
use anyhow::Context;
use shards::clock::SharedClock;
use shards::cpus::CpuMask;
use shards::layout::{DataDir, MoveProgress};
use shards::manifest::ManifestSet;
use shards::runtime::{Pinning, RuntimeConfig, ShardRuntime};
use std::sync::Arc;
use std::time::Duration;

/// Options a caller may set beyond the config (tests, the demo).
#[derive(Clone)]
pub struct AppOptions {
    /// Use these manifests instead of loading the configured files.
    pub manifests: Option<Arc<ManifestSet>>,
    pub clock: SharedClock,
    /// Serve the operations endpoints on `http.addr`. Default true.
    pub serve_http: bool,
    /// Count every time a shard holds its thread longer than this without yielding
    /// ([`App::stalls`]). Default off; the test harness turns it on and fails on a stall.
    pub stall_threshold: Option<Duration>,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self { manifests: None, clock: shards::clock::system(), serve_http: true, stall_threshold: None }
    }
}

pub struct App {
    cfg: Config,
    ops: Arc<Ops>,
    http_addr: Option<std::net::SocketAddr>,
    runtime: Option<ShardRuntime>,
    bridge: Option<Bridge>,
    server: Option<crate::http::OpsServer>,
    nats: Option<NatsServer>,
    nats_url: String,
    manifests: Arc<ManifestSet>,
    /// Held for the app's life; dropped last.
    _lock: DataLock,
}

/// The data directory's owner lock: an advisory lock on `runner.lock` (which names the
/// holder's pid), held while the app runs and released by the kernel when the process dies.
/// A second runner on the same directory refuses to start, naming the holder; read-only
/// inspection (`--data`) does not take it.
struct DataLock(#[expect(dead_code, reason = "held for its lock, never read")] std::fs::File);

fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<DataLock> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("runner.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| writeln!(file, "{}", std::process::id()))
                .with_context(|| format!("cannot write the lock file {}", path.display()))?;
            Ok(DataLock(file))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "the data directory {} is in use by process {} (lock {}): one runner per data directory; \
                 stop it first (read-only inspection with --data works meanwhile)",
                dir.display(),
                holder.trim(),
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock the data directory {}", dir.display()))
        }
    }
}

/// Plans where the threads run (see [`Placement`]) and says so in the log: the mask, each
/// thread's CPUs, and a CPU quota when the cgroup has one.
fn place_threads(cfg: &Config) -> anyhow::Result<Placement> {
    let mask = CpuMask::of_process();
    let placement = Placement::plan(cfg.shards, cfg.pin_cores, cfg.bridge_cpu, mask)?;
    let quota = shards::cpus::cpu_quota();
    tracing::info!(
        mask = %mask,
        shards = cfg.shards,
        shard_cpus = %shards::cpus::show(&placement.shards),
        bridge_cpus = %shards::cpus::show(&placement.bridge),
        ops_cpus = %shards::cpus::show(&placement.ops),
        quota_cpus = %quota.map_or_else(|| "none".to_owned(), |q| q.to_string()),
        "CPU placement"
    );
    if !cfg.pin_cores && cfg.shards > mask.len() {
        tracing::warn!(
            shards = cfg.shards,
            mask = %mask,
            "more shards than CPUs in the process's mask: unpinned, they share CPUs (and the bridge's)"
        );
    }
    if let Some(q) = quota.filter(|&q| q < mask.len() as f64) {
        if cfg.shards_from_mask {
            tracing::warn!(
                shards = cfg.shards,
                mask = %mask,
                quota_cpus = q,
                "`shards` defaults to the CPUs of the process's mask, not to its CPU quota (cgroup cpu.max): \
                 the mask says where threads may run, the quota only how much time they get, so the shards \
                 share the quota's time; set `shards` to give each a whole CPU"
            );
        } else {
            tracing::info!(shards = cfg.shards, quota_cpus = q, "the cgroup's CPU quota is below the mask's CPU count");
        }
    }
    Ok(placement)
}

impl App {
    pub fn start(cfg: Config, opts: AppOptions) -> anyhow::Result<Self> {
        // The recorder must exist before the shards and the bridge create their metric handles.
        let _ = crate::ops::metrics_handle();
        let manifests = match opts.manifests {
            Some(m) => m,
            None => Arc::new(crate::config::load_manifests(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?),
        };
        // Refused before anything changes on disk (a shard-count change moves partitions).
        let placement = place_threads(&cfg)?;
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create the data directory {}", cfg.data_dir.display()))?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        let store_cfg = cfg.store_config();
        let data =
            DataDir::prepare(&cfg.data_dir.join("shards"), cfg.partitions, cfg.shards, &store_cfg, |p| match p {
                MoveProgress::Started { from, to } => {
                    tracing::warn!(from, to, "shard count changed; moving partitions")
                }
                MoveProgress::Copied { env, entries } => tracing::info!(env, entries, "partition move: copied"),
                MoveProgress::Deleted { env, entries } => tracing::info!(env, entries, "partition move: cleaned"),
                MoveProgress::Finished { moved } => tracing::warn!(moved, "partition move finished"),
            })
            .with_context(|| format!("cannot prepare the data directory {}", cfg.data_dir.display()))?;

        let (nats, nats_url) = match &cfg.nats_url {
            Some(url) => (None, url.clone()),
            None => {
                let server = NatsServer::start(cfg.nats_server_binary.as_deref(), &cfg.data_dir.join("nats"))
                    .context("cannot start the embedded nats-server (set nats.url to use an existing server)")?;
                let url = server.url();
                tracing::info!(url = %url, store = %cfg.data_dir.join("nats").display(), "embedded nats-server started");
                (Some(server), url)
            }
        };

        let mut rcfg = RuntimeConfig {
            pinning: if placement.shards.is_empty() { Pinning::None } else { Pinning::Cpus(placement.shards.clone()) },
            inbox_capacity: cfg.inbox_capacity,
            stall_threshold: opts.stall_threshold,
            ..RuntimeConfig::default()
        };
        rcfg.shard.store = store_cfg;
        rcfg.shard.relay = cfg.relay.clone();
        rcfg.shard.core.retention_ms = cfg.retention_ms;
        rcfg.shard.core.effect_retention_ms = cfg.effect_retention_ms;
        // Shards call HTTP effects and the Gateway themselves; NATS requests go through the
        // bridge.
        let shared = Arc::new(BridgeShared::default());
        if cfg.mode.runs_sagas() {
            // Timers wait for the streams (invariant 9): the bridge moves the watermark.
            rcfg.shard.watermark = Some(shared.stream_watermark.clone());
        }
        let (nats_calls_tx, nats_calls_rx) = flume::bounded(cfg.effect_concurrency.max(64));
        if cfg.mode.runs_sagas() || cfg.mode.runs_effects() {
            let settings = crate::effects::caller::CallerSettings::of(&cfg);
            rcfg.shard.caller = Some(crate::effects::caller::factory(settings, nats_calls_tx, shared.clone()));
        }
        let (dispatch_tx, dispatch_rx) = flume::bounded(cfg.shards * 8 + 64);
        let runtime = ShardRuntime::start(&rcfg, &data, manifests.clone(), opts.clock.clone(), dispatch_tx)
            .map_err(|e| anyhow::anyhow!("cannot start the shards: {e}"))?;
        let http = if opts.serve_http {
            match std::net::TcpListener::bind(cfg.http_addr) {
                Ok(l) => Some(l),
                Err(e) => {
                    runtime.shutdown();
                    return Err(anyhow::anyhow!("cannot listen on http.addr {}: {e}", cfg.http_addr));
                }
            }
        } else {
            None
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (manifests_tx, manifests_rx) = flume::unbounded();
        let ops = Arc::new(Ops::new(
            cfg.clone(),
            runtime.handles().to_vec(),
            runtime.router(),
            shared,
            stop_tx,
            manifests_tx,
            manifests.clone(),
            nats_url.clone(),
        ));
        let inputs = BridgeInputs {
            dispatch: dispatch_rx,
            stop_pulling: stop_rx,
            manifests: manifests_rx,
            nats_calls: nats_calls_rx,
        };
        let bridge =
            match Bridge::start(ops.clone(), nats_url.clone(), manifests.clone(), inputs, placement.bridge.clone()) {
                Ok(b) => b,
                Err(e) => {
                    runtime.shutdown();
                    return Err(e).context("cannot start the I/O bridge");
                }
            };
        let server = match crate::http::OpsServer::start(ops.clone(), http, placement.ops.clone()) {
            Ok(s) => s,
            Err(e) => {
                bridge.shutdown();
                runtime.shutdown();
                return Err(e).context("cannot start the operations endpoints' threads");
            }
        };
        tracing::info!(mode = ?cfg.mode, shards = cfg.shards, nats = %nats_url, sagas = manifests.sagas.len(), effects = manifests.effects.len(), "runner started");
        Ok(Self {
            cfg,
            ops,
            http_addr,
            runtime: Some(runtime),
            bridge: Some(bridge),
            server: Some(server),
            nats,
            nats_url,
            manifests,
            _lock: lock,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    pub fn manifests(&self) -> &Arc<ManifestSet> {
        &self.manifests
    }

    pub fn runtime(&self) -> &ShardRuntime {
        self.runtime.as_ref().unwrap_or_else(|| unreachable!("runtime taken only by shutdown"))
    }

    /// Times a shard held its thread past `AppOptions::stall_threshold`.
    pub fn stalls(&self) -> u64 {
        self.runtime.as_ref().map_or(0, |rt| rt.stalls())
    }

    pub fn bridge(&self) -> &Bridge {
        self.bridge.as_ref().unwrap_or_else(|| unreachable!("bridge taken only by shutdown"))
    }

    /// The embedded nats-server, if this app started one.
    pub fn embedded_nats(&mut self) -> Option<&mut NatsServer> {
        self.nats.as_mut()
    }

    pub fn ops(&self) -> &Arc<Ops> {
        &self.ops
    }

    /// Where the operations endpoints listen (when served).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// Stops pulling, then waits (until `deadline`) for in-flight messages to settle and the
    /// outbox to flush.
    pub fn drain(&self, deadline: Duration) -> DrainReport {
        let report = self.ops.drain_blocking(deadline);
        tracing::info!(
            drained = report.drained,
            in_flight = report.in_flight,
            outbox_window = report.outbox_window,
            millis = report.millis,
            "drain finished"
        );
        report
    }

    /// Drains (bounded by `shutdown.drain_deadline_ms`) and stops everything in order.
    pub fn shutdown(mut self) -> DrainReport {
        self.ops.mark_exiting();
        let report = self.drain(Duration::from_millis(self.cfg.drain_deadline_ms));
        if let Some(rt) = self.runtime.take() {
            rt.shutdown();
        }
        if let Some(b) = self.bridge.take() {
            b.shutdown();
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
        if let Some(mut n) = self.nats.take() {
            n.stop();
        }
        report
    }

    /// Stops without draining (what a crash looks like to the outside, minus the OS).
    pub fn abort(mut self) {
        self.ops.mark_exiting();
        let _ = self.ops.drain_blocking(Duration::ZERO);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown();
        }
        if let Some(b) = self.bridge.take() {
            b.shutdown();
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}
