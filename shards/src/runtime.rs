//! The thread-per-core runtime: one glommio executor per shard, pinned to its CPU, and
//! the handles the I/O bridge uses to reach them. Requests go through bounded flume
//! channels, which work from any executor; flume guards each channel's queue with a short
//! mutex (held for a push or a pop, never across an await), so sending is not lock-free,
//! but a sender and the shard never wait on each other except for a full inbox. Answers
//! come back on one-shot channels (`futures-channel`: try-locks that never block).
//!
//! Shutdown is ordered: every shard is told to stop, finishes and commits what it already
//! accepted, answers what it can, and its thread is joined.

use crate::clock::SharedClock;
use crate::cpus::CpuMask;
use crate::layout::DataDir;
use crate::manifest::ManifestSet;
use crate::message::{Control, DispatchRequest, Request};
use crate::routing::Router;
use crate::shell::{ShardChannels, ShardConfig, ShardHealth, run_shard};
use glommio::{LocalExecutorBuilder, Placement};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("cannot start the executor of shard {shard}: {source}")]
    Spawn {
        shard: usize,
        #[source]
        source: glommio::GlommioError<()>,
    },
    #[error("shard {shard}: {source}")]
    Setup {
        shard: usize,
        #[source]
        source: crate::message::ShardError,
    },
    #[error("shard {0} stopped before it was ready")]
    Lost(usize),
    #[error("shard {shard} is gone (its thread ended): {why}")]
    Gone { shard: usize, why: String },
}

/// How shards are placed on CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Pinning {
    /// Shard i on the i-th CPU of the process's affinity mask ([`CpuMask::of_process`])
    /// when it holds at least as many CPUs as there are shards, else unbound.
    #[default]
    Auto,
    /// Never pin (tests, shared machines).
    None,
    /// Shard i on `cpus[i]`.
    Cpus(Vec<usize>),
}

/// Runtime settings (already validated).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub pinning: Pinning,
    /// Requests waiting per shard inbox. Default 8,192.
    pub inbox_capacity: usize,
    pub shard: ShardConfig,
    /// Log and count tasks that hold a shard's executor this long past their budget
    /// without yielding (test harnesses turn it on and fail on a stall).
    pub stall_threshold: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { pinning: Pinning::Auto, inbox_capacity: 8_192, shard: ShardConfig::default(), stall_threshold: None }
    }
}

/// The cheap, cloneable way to reach one shard.
#[derive(Debug, Clone)]
pub struct ShardHandle {
    pub index: usize,
    inbox: flume::Sender<Request>,
    control: flume::Sender<Control>,
    pub health: Arc<ShardHealth>,
}

impl ShardHandle {
    /// Sends a request, waiting while the inbox is full (backpressure). Works from any
    /// executor: tokio, glommio or a plain thread (`send` below).
    pub async fn send(&self, req: Request) -> Result<(), RuntimeError> {
        self.inbox
            .send_async(req)
            .await
            .map_err(|_| RuntimeError::Gone { shard: self.index, why: "inbox closed".into() })
    }

    /// Blocking send, for plain threads and tests.
    pub fn send_blocking(&self, req: Request) -> Result<(), RuntimeError> {
        self.inbox.send(req).map_err(|_| RuntimeError::Gone { shard: self.index, why: "inbox closed".into() })
    }

    /// Sends a control message without waiting. The relay bounds how many dispatch results
    /// can be outstanding, and the channel is sized above that, so this only fails when the
    /// shard is gone or something is badly wrong (then the result is dropped and the relay
    /// re-dispatches after its confirmation timeout: nothing is lost).
    pub fn control(&self, c: Control) -> Result<(), RuntimeError> {
        self.control.try_send(c).map_err(|e| RuntimeError::Gone { shard: self.index, why: e.to_string() })
    }

    /// Requests waiting in the inbox.
    pub fn queued(&self) -> usize {
        self.inbox.len()
    }
}

struct Executor {
    join: glommio::ExecutorJoinHandle<()>,
}

/// Running shards.
pub struct ShardRuntime {
    router: Router,
    handles: Vec<ShardHandle>,
    executors: Vec<Executor>,
}

/// glommio's stall detector with our threshold: it logs a backtrace of a task queue that
/// runs past its budget without yielding. The shard also times its own synchronous
/// sections and counts the ones over the threshold ([`ShardRuntime::stalls`]).
#[derive(Debug)]
struct StallLogger(Duration);

impl glommio::StallDetectionHandler for StallLogger {
    fn threshold(&self, _: glommio::TaskQueueHandle, _: Duration) -> Option<Duration> {
        Some(self.0)
    }
}

impl ShardRuntime {
    /// Starts one executor per shard of `data` and waits until every shard has opened its
    /// store and compiled its programs (or reports the first that could not).
    pub fn start(
        cfg: &RuntimeConfig,
        data: &DataDir,
        manifests: Arc<ManifestSet>,
        clock: SharedClock,
        dispatch: flume::Sender<DispatchRequest>,
    ) -> Result<Self, RuntimeError> {
        let router = data.router();
        let shards = router.shards();
        let cpus = CpuMask::of_process().cpus();
        let mut handles = Vec::with_capacity(shards);
        let mut executors = Vec::with_capacity(shards);
        let mut readies = Vec::with_capacity(shards);
        // Sized above what the relay can have outstanding, so `control` never blocks.
        let control_capacity = cfg.shard.relay.max_in_flight * 2 + 1_024;
        for index in 0..shards {
            let (inbox_tx, inbox_rx) = flume::bounded(cfg.inbox_capacity);
            let (control_tx, control_rx) = flume::bounded(control_capacity);
            let health = Arc::new(ShardHealth::new());
            let placement = match &cfg.pinning {
                Pinning::None => Placement::Unbound,
                Pinning::Cpus(list) => list.get(index).map(|&c| Placement::Fixed(c)).unwrap_or(Placement::Unbound),
                Pinning::Auto if shards <= cpus.len() => Placement::Fixed(cpus[index]),
                Pinning::Auto => Placement::Unbound,
            };
            let (ready_tx, ready_rx) = flume::bounded(1);
            let chans = ShardChannels {
                inbox: inbox_rx,
                control: control_rx,
                control_tx: control_tx.clone(),
                dispatch: dispatch.clone(),
            };
            let mut shard_cfg = cfg.shard.clone();
            shard_cfg.stall_threshold = cfg.stall_threshold;
            let (data, manifests, clock, h) = (data.clone(), manifests.clone(), clock.clone(), health.clone());
            let mut builder = LocalExecutorBuilder::new(placement).name(&format!("shard-{index}")).io_memory(1 << 20);
            if let Some(t) = cfg.stall_threshold {
                builder = builder.detect_stalls(Some(Box::new(StallLogger(t))));
            }
            let join = builder
                .spawn(move || run_shard(index, shard_cfg, data, manifests, clock, chans, h, ready_tx))
                .map_err(|source| RuntimeError::Spawn { shard: index, source })?;
            executors.push(Executor { join });
            readies.push(ready_rx);
            handles.push(ShardHandle { index, inbox: inbox_tx, control: control_tx, health });
        }
        let mut failure = None;
        for (index, ready) in readies.into_iter().enumerate() {
            match ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => failure = failure.or(Some(RuntimeError::Setup { shard: index, source })),
                Err(_) => failure = failure.or(Some(RuntimeError::Lost(index))),
            }
        }
        let rt = Self { router, handles, executors };
        if let Some(e) = failure {
            rt.shutdown();
            return Err(e);
        }
        tracing::info!(shards, partitions = router.partitions(), data = %data.root().display(), "shards started");
        Ok(rt)
    }

    pub fn router(&self) -> Router {
        self.router
    }

    /// Times a shard held its thread past `stall_threshold` without yielding, all shards
    /// (0 when the threshold is off).
    pub fn stalls(&self) -> u64 {
        self.handles.iter().map(|h| h.health.stalls.load(Ordering::Relaxed)).sum()
    }

    pub fn handles(&self) -> &[ShardHandle] {
        &self.handles
    }

    pub fn handle(&self, shard: usize) -> &ShardHandle {
        &self.handles[shard % self.handles.len()]
    }

    /// Tells every shard to stop, lets each finish and commit what it accepted, and joins
    /// the threads.
    pub fn shutdown(self) {
        for h in &self.handles {
            let _ = h.control.try_send(Control::Stop);
        }
        drop(self.handles);
        for (i, e) in self.executors.into_iter().enumerate() {
            if let Err(err) = e.join.join() {
                tracing::error!(shard = i, error = %err, "shard thread ended with an error");
            }
        }
    }
}

/// Default shard count: the CPUs in the process's affinity mask ([`CpuMask::of_process`]).
/// A CPU quota (`cpu.max`) does not lower it; the runner logs the quota beside it.
pub fn default_shards() -> usize {
    CpuMask::of_process().len()
}
