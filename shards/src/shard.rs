//! The imperative shell of one shard, running on its own glommio executor: drain the
//! inbox, run the core on the batch, commit once, then answer and wake the relay. Nothing
//! external happens before the commit (invariant 1: an ack is sent only after the commit
//! that reflects it).
//!
//! Two tasks share the thread: the committer (this loop) and the relay task, which hands
//! outbox items to the bridge and never writes to the store itself.

use crate::clock::SharedClock;
use crate::layout::DataDir;
use crate::manifest::ManifestSet;
use crate::message::{Control, DispatchOutcome, DispatchRequest, DispatchResult, Request};
use crate::pipeline::{BatchStats, CoreConfig, ShardCore};
use crate::relay::{RelayConfig, RelayState};
use crate::store::StoreConfig;
use futures_lite::future;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Settings of one shard (already validated).
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub core: CoreConfig,
    pub relay: RelayConfig,
    pub store: StoreConfig,
    /// Requests drained into one batch at most. Default 4,096.
    pub max_batch: usize,
    /// First wait after a failed commit; doubles up to 5 s. Default 50 ms.
    pub commit_retry_ms: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            relay: RelayConfig::default(),
            store: StoreConfig::default(),
            max_batch: 4_096,
            commit_retry_ms: 50,
        }
    }
}

/// What the rest of the process can see of a shard without asking it (health, metrics).
/// Written by the shard's thread, read by anyone.
#[derive(Debug, Default)]
pub struct ShardHealth {
    /// False while commits fail (disk full, unwritable data dir).
    pub writable: AtomicBool,
    pub commits: AtomicU64,
    pub failed_commits: AtomicU64,
    /// Outbox items known to the relay (a lower bound of the outbox depth).
    pub outbox_window: AtomicU64,
    pub blocked_keys: AtomicU64,
    /// Transitions applied and the time spent in programs for them (nanoseconds).
    pub transitions: AtomicU64,
    pub program_ns: AtomicU64,
    /// Requests taken into batches (with `commits`: the average batch size).
    pub requests: AtomicU64,
    /// The last commit error, for `/health` (touched only when commits fail).
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ShardHealth {
    pub fn new() -> Self {
        Self { writable: AtomicBool::new(true), ..Default::default() }
    }
}

/// The channels a shard is served by.
pub struct ShardChannels {
    pub inbox: flume::Receiver<Request>,
    pub control: flume::Receiver<Control>,
    pub control_tx: flume::Sender<Control>,
    pub dispatch: flume::Sender<DispatchRequest>,
}

/// Per-shard metric handles (created once; the hot path does not look up labels).
struct Metrics {
    batch_requests: metrics::Histogram,
    commit_seconds: metrics::Histogram,
    transition_seconds: metrics::Histogram,
    events: metrics::Counter,
    applied: metrics::Counter,
    duplicates: metrics::Counter,
    failures: metrics::Counter,
    quarantined: metrics::Counter,
    parked: metrics::Counter,
    deadletters: metrics::Counter,
    timers_fired: metrics::Counter,
    timers_dropped: metrics::Counter,
    outbox_written: metrics::Counter,
    outbox_deleted: metrics::Counter,
    effects_started: metrics::Counter,
    effects_completed: metrics::Counter,
    commit_failures: metrics::Counter,
    outbox_depth: metrics::Gauge,
    blocked_keys: metrics::Gauge,
    schedule_lag: metrics::Histogram,
}

impl Metrics {
    fn new(shard: usize) -> Self {
        let s = shard.to_string();
        Self {
            batch_requests: metrics::histogram!("runner_batch_size", "shard" => s.clone()),
            commit_seconds: metrics::histogram!("runner_commit_seconds", "shard" => s.clone()),
            transition_seconds: metrics::histogram!("runner_transition_seconds", "shard" => s.clone()),
            events: metrics::counter!("runner_events_total", "shard" => s.clone()),
            applied: metrics::counter!("runner_transitions_total", "shard" => s.clone()),
            duplicates: metrics::counter!("runner_duplicates_skipped_total", "shard" => s.clone()),
            failures: metrics::counter!("runner_transition_failures_total", "shard" => s.clone()),
            quarantined: metrics::counter!("runner_quarantined_total", "shard" => s.clone()),
            parked: metrics::counter!("runner_parked_events_total", "shard" => s.clone()),
            deadletters: metrics::counter!("runner_deadletters_total", "shard" => s.clone()),
            timers_fired: metrics::counter!("runner_timers_fired_total", "shard" => s.clone()),
            timers_dropped: metrics::counter!("runner_timers_dropped_total", "shard" => s.clone()),
            outbox_written: metrics::counter!("runner_outbox_written_total", "shard" => s.clone()),
            outbox_deleted: metrics::counter!("runner_outbox_deleted_total", "shard" => s.clone()),
            effects_started: metrics::counter!("runner_effect_gate_started_total", "shard" => s.clone()),
            effects_completed: metrics::counter!("runner_effect_gate_completed_total", "shard" => s.clone()),
            commit_failures: metrics::counter!("runner_commit_failures_total", "shard" => s.clone()),
            outbox_depth: metrics::gauge!("runner_outbox_depth", "shard" => s.clone()),
            blocked_keys: metrics::gauge!("runner_blocked_keys", "shard" => s.clone()),
            schedule_lag: metrics::histogram!("runner_schedule_lag_seconds", "shard" => s),
        }
    }

    fn record(&self, stats: &BatchStats) {
        self.events.increment(stats.events);
        self.applied.increment(stats.applied);
        self.duplicates.increment(stats.duplicates);
        self.failures.increment(stats.failures);
        self.quarantined.increment(stats.quarantined);
        self.parked.increment(stats.parked);
        self.deadletters.increment(stats.deadletters);
        self.timers_fired.increment(stats.timers_fired);
        self.timers_dropped.increment(stats.timers_dropped);
        self.outbox_written.increment(stats.outbox_written);
        self.outbox_deleted.increment(stats.outbox_deleted);
        self.effects_started.increment(stats.effects_started);
        self.effects_completed.increment(stats.effects_completed);
        if stats.applied > 0 {
            self.transition_seconds.record(stats.program_ns as f64 / 1e9 / stats.applied as f64);
        }
    }
}

enum Wake {
    Request(Request),
    Control(Control),
    Timeout,
    Closed,
}

/// Runs shard `index` until it is told to stop (or its inbox closes). `ready` is told
/// once the store is open and the programs compiled, or why not.
#[allow(clippy::too_many_arguments)]
pub async fn run_shard(
    index: usize,
    cfg: ShardConfig,
    data: DataDir,
    manifests: Arc<ManifestSet>,
    clock: SharedClock,
    chans: ShardChannels,
    health: Arc<ShardHealth>,
    ready: flume::Sender<Result<(), String>>,
) {
    let setup = (|| {
        let store = data.open_store(index, &cfg.store).map_err(|e| e.to_string())?;
        let relay = Rc::new(RefCell::new(RelayState::new(cfg.relay.clone())));
        ShardCore::new(index, data.router(), cfg.core.clone(), store, manifests, relay)
    })();
    let core = match setup {
        Ok(c) => Rc::new(RefCell::new(c)),
        Err(e) => {
            let _ = ready.send(Err(format!("shard {index}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let metrics = Metrics::new(index);
    let (wake_tx, wake_rx) = flume::bounded::<()>(1);
    let stop = Rc::new(Cell::new(false));
    let relay_task = glommio::spawn_local(relay_loop(
        index,
        core.clone(),
        clock.clone(),
        wake_rx,
        chans.dispatch.clone(),
        chans.control_tx.clone(),
        stop.clone(),
    ))
    .detach();

    let mut stopping = false;
    let mut retry_delay = cfg.commit_retry_ms;
    let mut failed_until: Option<u64> = None;
    loop {
        let now = clock.now_ms();
        // When to run without new input: a due timer or retry, or the next commit attempt.
        let wake_at = match failed_until {
            Some(t) => Some(t),
            None => core.borrow().next_wake(),
        };
        let immediate = failed_until.is_none() && (core.borrow().has_redo() || wake_at.is_some_and(|t| t <= now));
        let first = if immediate || stopping {
            Wake::Timeout
        } else {
            let wait = wake_at.map(|t| t.saturating_sub(now)).unwrap_or(1_000).clamp(1, 1_000);
            let inbox = async { chans.inbox.recv_async().await.map(Wake::Request).unwrap_or(Wake::Closed) };
            let control = async { chans.control.recv_async().await.map(Wake::Control).unwrap_or(Wake::Closed) };
            let timer = async {
                glommio::timer::sleep(Duration::from_millis(wait)).await;
                Wake::Timeout
            };
            future::or(future::or(control, inbox), timer).await
        };
        let first = if failed_until.is_some_and(|t| clock.now_ms() < t) {
            // Still backing off after a failed commit: keep the message for the next try.
            match first {
                Wake::Request(r) => requeue_front(&core, r),
                Wake::Control(c) => {
                    if handle_control(&core, c, &mut Vec::new()) {
                        stopping = true;
                    }
                }
                Wake::Closed => stopping = true,
                Wake::Timeout => {}
            }
            if !stopping {
                continue;
            }
            Wake::Timeout
        } else {
            first
        };
        failed_until = None;

        // Gather the batch: control first (it unblocks the relay), then the inbox.
        let mut work = Vec::new();
        let mut requests = 0usize;
        let mut reloads = Vec::new();
        {
            let mut c = core.borrow_mut();
            let mut take = |r: Request, work: &mut Vec<_>| {
                if let Some(Request::Reload { set, reply }) = c.intake(r, work) {
                    reloads.push((set, reply));
                }
            };
            match first {
                Wake::Request(r) => {
                    requests += 1;
                    take(r, &mut work);
                }
                Wake::Control(ctl) => {
                    if handle_control_work(ctl, &mut work) {
                        stopping = true;
                    }
                }
                Wake::Closed => stopping = true,
                Wake::Timeout => {}
            }
            while let Ok(ctl) = chans.control.try_recv() {
                if handle_control_work(ctl, &mut work) {
                    stopping = true;
                }
            }
            while requests < cfg.max_batch {
                match chans.inbox.try_recv() {
                    Ok(r) => {
                        requests += 1;
                        take(r, &mut work);
                    }
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                }
            }
        }

        let now = clock.now_ms();
        let (staged, result) = core.borrow_mut().run_batch(work, now);
        let outcome = match result {
            Ok(()) => {
                let started = Instant::now();
                if staged.stats.timers_fired > 0 {
                    fail::fail_point!("shard.timer_fired_before_commit");
                }
                let commit = if staged.batch.is_empty() {
                    Ok(())
                } else {
                    core.borrow().store().commit(&staged.batch).map(|_| ())
                };
                match commit {
                    Ok(()) => {
                        // Crash points of the fault suite (no-ops unless built with `failpoints`).
                        if staged.stats.applied > 0 {
                            fail::fail_point!("shard.after_commit_before_ack");
                        }
                        if staged.stats.outbox_written > 0 {
                            fail::fail_point!("shard.after_commit_before_dispatch");
                        }
                        if !staged.batch.is_empty() {
                            metrics.commit_seconds.record(started.elapsed().as_secs_f64());
                            health.commits.fetch_add(1, Ordering::Relaxed);
                        }
                        metrics.batch_requests.record(requests as f64);
                        health.requests.fetch_add(requests as u64, Ordering::Relaxed);
                        health.transitions.fetch_add(staged.stats.applied, Ordering::Relaxed);
                        health.program_ns.fetch_add(staged.stats.program_ns, Ordering::Relaxed);
                        metrics.record(&staged.stats);
                        let wake_relay = staged.stats.outbox_written > 0 || staged.stats.outbox_deleted > 0;
                        core.borrow_mut().after_commit(staged, clock.now_ms());
                        if wake_relay {
                            let _ = wake_tx.try_send(());
                        }
                        Ok(())
                    }
                    Err(e) => {
                        core.borrow_mut().rollback(staged);
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => {
                core.borrow_mut().rollback(staged);
                Err(e.to_string())
            }
        };
        match outcome {
            Ok(()) => {
                if !health.writable.swap(true, Ordering::Relaxed) {
                    tracing::info!(shard = index, "commits succeed again");
                }
                retry_delay = cfg.commit_retry_ms;
            }
            Err(e) => {
                // No answer was sent for anything in the failed batch (invariant 1); the
                // same work runs again after a backoff.
                tracing::error!(shard = index, error = %e, retry_in_ms = retry_delay, "batch commit failed; nothing acked, will retry");
                metrics.commit_failures.increment(1);
                health.failed_commits.fetch_add(1, Ordering::Relaxed);
                health.writable.store(false, Ordering::Relaxed);
                if let Ok(mut last) = health.last_error.lock() {
                    *last = Some(e);
                }
                failed_until = Some(clock.now_ms() + retry_delay);
                retry_delay = (retry_delay * 2).min(5_000);
            }
        }
        for (set, reply) in reloads {
            let r = core.borrow_mut().reload(set);
            if let Err(e) = &r {
                tracing::error!(shard = index, error = %e, "manifest reload refused by shard");
            }
            let _ = reply.send(r);
        }
        {
            let c = core.borrow();
            let relay = c.relay().borrow();
            health.outbox_window.store(relay.depth() as u64, Ordering::Relaxed);
            metrics.outbox_depth.set(relay.depth() as f64);
            health.blocked_keys.store(c.blocked_keys() as u64, Ordering::Relaxed);
            metrics.blocked_keys.set(c.blocked_keys() as f64);
        }
        if stopping && chans.inbox.is_empty() && !core.borrow().has_redo() {
            break;
        }
        if stopping && failed_until.is_some() {
            // Shutting down while the disk refuses writes: leave the rest for redelivery.
            break;
        }
    }
    stop.set(true);
    let _ = wake_tx.try_send(());
    core.borrow_mut().abandon_waiting();
    if let Err(e) = core.borrow().store().sync() {
        tracing::error!(shard = index, error = %e, "final sync failed");
    }
    relay_task.cancel();
    tracing::info!(shard = index, "shard stopped");
    let _ = metrics.schedule_lag;
}

/// Puts a request back so it is the first of the next batch (used while backing off).
fn requeue_front(core: &Rc<RefCell<ShardCore>>, r: Request) {
    let mut work = Vec::new();
    let mut c = core.borrow_mut();
    if let Some(Request::Reload { reply, .. }) = c.intake(r, &mut work) {
        let _ = reply.send(Err("shard is backing off after a failed commit; reload again".into()));
    }
    c.push_redo(work);
}

fn handle_control(core: &Rc<RefCell<ShardCore>>, c: Control, work: &mut Vec<crate::pipeline::Work>) -> bool {
    let stop = handle_control_work(c, work);
    core.borrow_mut().push_redo(std::mem::take(work));
    stop
}

fn handle_control_work(c: Control, work: &mut Vec<crate::pipeline::Work>) -> bool {
    match c {
        Control::Dispatched(results) => {
            work.extend(results.into_iter().map(crate::pipeline::Work::Dispatched));
            false
        }
        Control::Stop => true,
    }
}

/// The relay task: hands ready outbox items to the bridge within the in-flight limits.
async fn relay_loop(
    index: usize,
    core: Rc<RefCell<ShardCore>>,
    clock: SharedClock,
    wake: flume::Receiver<()>,
    dispatch: flume::Sender<DispatchRequest>,
    control: flume::Sender<Control>,
    stop: Rc<Cell<bool>>,
) {
    let dispatch_latency = metrics::histogram!("runner_outbox_handoff_seconds", "shard" => index.to_string());
    while !stop.get() {
        let now = clock.now_ms();
        let ready = {
            let c = core.borrow();
            let mut relay = c.relay().borrow_mut();
            if relay.needs_scan()
                && let Err(e) = relay.scan(c.store(), now)
            {
                tracing::error!(shard = index, error = %e, "outbox scan failed; retrying");
            }
            relay.take_ready(now)
        };
        if !ready.suppressed.is_empty() {
            let results = ready
                .suppressed
                .into_iter()
                .map(|key| DispatchResult { key, outcome: DispatchOutcome::Delivered })
                .collect();
            if control.send_async(Control::Dispatched(results)).await.is_err() {
                return;
            }
        }
        if !ready.dispatch.is_empty() {
            let started = Instant::now();
            if dispatch.send_async(DispatchRequest { shard: index, items: ready.dispatch }).await.is_err() {
                tracing::warn!(shard = index, "bridge gone; relay stops");
                return;
            }
            dispatch_latency.record(started.elapsed().as_secs_f64());
            continue;
        }
        let (deadline, poll, has_ready) = {
            let c = core.borrow();
            let relay = c.relay().borrow();
            (relay.next_deadline(), relay.config().poll_ms, relay.has_ready(now))
        };
        if has_ready {
            // Ready items wait for in-flight room: a confirmation or a timeout wakes us.
            let wait = deadline.map(|d| d.saturating_sub(now)).unwrap_or(poll).clamp(1, poll);
            let _ = future::or(async { wake.recv_async().await.is_ok() }, async {
                glommio::timer::sleep(Duration::from_millis(wait)).await;
                true
            })
            .await;
            continue;
        }
        let wait = deadline.map(|d| d.saturating_sub(now)).unwrap_or(poll).clamp(1, poll);
        let woke = future::or(async { wake.recv_async().await.is_ok() }, async {
            glommio::timer::sleep(Duration::from_millis(wait)).await;
            // The safety net: look at the store now and then.
            core.borrow().relay().borrow_mut().request_scan();
            true
        })
        .await;
        if !woke {
            return;
        }
    }
}
