//! The imperative shell of one shard. [`Shell`] owns the core, the relay's bookkeeping and
//! the reply channels of the requests in progress; [`Shell::step`] is the one commit
//! protocol, used by production ([`run_shard`]) and by every test harness:
//!
//! ```text
//!   run (core decides) ─> commit (one LMDB txn) ─> adopt (core state) ─> carry out (answers, relay)
//! ```
//!
//! Nothing external happens before the commit (invariant 1: an ack is sent only after the
//! commit that reflects it). A failed commit keeps the batch's work, which runs again on
//! the next step; nothing of it was answered.
//!
//! [`run_shard`] runs on the shard's own glommio executor: the committer loop (inbox →
//! step) and the relay task, which hands outbox items to the bridge and never writes.

use crate::clock::SharedClock;
use crate::core::{Action, BatchStats, CoreConfig, CoreError, RequestId, ShardCore, Work};
use crate::layout::DataDir;
use crate::manifest::ManifestSet;
use crate::message::{
    AdminAnswer, AdminError, ApplyOutcome, Control, DispatchOutcome, DispatchRequest, FinishError, GateDecision, Query,
    Reply, Request, ShardError,
};
use crate::relay::{RelayConfig, RelayState};
use crate::store::{StoreConfig, StoreError};
use ahash::AHashMap;
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

/// A request waiting for the core's decision, with its reply channel.
enum Waiting {
    /// A stream message with targets on this shard: answered when every target settled.
    Apply {
        reply: Reply<ApplyOutcome>,
        remaining: usize,
        term: Option<String>,
    },
    Gate(Reply<GateDecision>),
    Finish(Reply<Result<(), FinishError>>),
    Quarantine(Reply<()>),
    Admin(Reply<Result<AdminAnswer, AdminError>>),
}

/// What one step did.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepReport {
    pub stats: BatchStats,
    /// Units of work the batch ran (requests, dispatch results, leftovers).
    pub work: usize,
    /// A non-empty batch was committed, taking this long.
    pub commit: Option<Duration>,
}

/// Why a step committed nothing (its work is kept and runs again on the next step).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Commit(#[from] StoreError),
}

/// One shard's core, relay bookkeeping and requests in progress. Owned by the shard's
/// thread (shared by its committer and relay tasks through `Rc<RefCell<_>>`).
pub struct Shell {
    core: ShardCore,
    relay: RelayState,
    waiting: AHashMap<RequestId, Waiting>,
    next_request: u64,
    /// Work taken in and not yet durable: the next step runs it (again, after a failed
    /// commit).
    work: Vec<Work>,
    reloads: Vec<Reload>,
}

/// A manifest swap asked for, done between steps.
type Reload = (Arc<ManifestSet>, Reply<Result<(), ShardError>>);

impl Shell {
    pub fn new(core: ShardCore, relay: RelayState) -> Self {
        Self { core, relay, waiting: AHashMap::new(), next_request: 0, work: Vec::new(), reloads: Vec::new() }
    }

    pub fn core(&self) -> &ShardCore {
        &self.core
    }

    pub fn relay(&self) -> &RelayState {
        &self.relay
    }

    pub fn relay_mut(&mut self) -> &mut RelayState {
        &mut self.relay
    }

    /// Refills the relay's window from the store when it asked for a scan.
    pub fn relay_scan(&mut self, now: u64) -> Result<(), StoreError> {
        if self.relay.needs_scan() { self.relay.scan(self.core.store(), now) } else { Ok(()) }
    }

    /// Whether work is waiting for a step.
    pub fn has_work(&self) -> bool {
        !self.work.is_empty()
    }

    /// Requests waiting for an answer (in batches not yet durable or behind blocked keys).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn wait(&mut self, w: Waiting) -> RequestId {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.waiting.insert(id, w);
        id
    }

    /// Takes one request in: work for the next step, queries answered at once from
    /// committed state, reloads kept for between steps.
    pub fn take(&mut self, req: Request) {
        match req {
            Request::Apply { event, targets, reply } => {
                if targets.is_empty() {
                    let _ = reply.send(ApplyOutcome::Ack);
                    return;
                }
                let request = self.wait(Waiting::Apply { reply, remaining: targets.len(), term: None });
                for target in targets {
                    self.work.push(Work::Apply(crate::core::Pending {
                        event: event.clone(),
                        target,
                        origin: crate::core::Origin::Delivery(request),
                    }));
                }
            }
            Request::EffectBegin { key, msg_seq, reply } => {
                let request = self.wait(Waiting::Gate(reply));
                self.work.push(Work::EffectBegin { request, key, msg_seq });
            }
            Request::EffectFinish { key, attempts, subject, outcome, result, reply } => {
                let request = self.wait(Waiting::Finish(reply));
                self.work.push(Work::EffectFinish { request, key, attempts, subject, outcome, result });
            }
            Request::EffectRelease { key } => self.work.push(Work::EffectRelease { key }),
            Request::Quarantine { letter, reply } => {
                let request = self.wait(Waiting::Quarantine(reply));
                self.work.push(Work::Quarantine { request, letter });
            }
            Request::Admin { op, reply } => {
                let request = self.wait(Waiting::Admin(reply));
                self.work.push(Work::Admin { request, op });
            }
            Request::Query(q) => self.answer(q),
            Request::Reload { set, reply } => self.reloads.push((set, reply)),
        }
    }

    /// Takes a control message in; `true` for stop.
    pub fn take_control(&mut self, c: Control) -> bool {
        match c {
            Control::Dispatched(results) => {
                for r in results {
                    // A failed dispatch re-stores the item as the relay sent it.
                    let item = match r.outcome {
                        DispatchOutcome::Delivered => None,
                        _ => self.relay.in_flight_item(&r.key).cloned(),
                    };
                    self.work.push(Work::Dispatched { key: r.key, outcome: r.outcome, item });
                }
                false
            }
            Control::Stop => true,
        }
    }

    fn answer(&self, q: Query) {
        let c = &self.core;
        // The asker may have gone (shutdown, timeout): nothing to do then.
        match q {
            Query::Saga { key, reply } => {
                let _ = reply.send(c.saga_view(&key).map_err(ShardError::from));
            }
            Query::Effect { key, reply } => {
                let _ = reply.send(c.effect_record(&key).map_err(ShardError::from));
            }
            Query::DeadLetters { tenant, after, limit, reply } => {
                let _ = reply.send(c.deadletter_views(&tenant, after.as_ref(), limit).map_err(ShardError::from));
            }
            Query::Sagas { tenant, saga, after, limit, reply } => {
                let _ = reply.send(c.saga_page(&tenant, &saga, after.as_deref(), limit).map_err(ShardError::from));
            }
            Query::Stats { reply } => {
                let stats = c.stats().map(|mut s| {
                    s.outbox_window = self.relay.depth();
                    s.outbox_in_flight = self.relay.in_flight();
                    s
                });
                let _ = reply.send(stats.map_err(ShardError::from));
            }
        }
    }

    /// One batch: the core runs the waiting work (plus due retries and timers) → one
    /// commit → the core adopts the batch's in-memory changes → answers and relay hints go
    /// out. On `Err` nothing was committed or answered and the work is kept.
    pub fn step(&mut self, now: u64) -> Result<StepReport, StepError> {
        self.step_observed(now, &mut |_| {})
    }

    /// [`Self::step`], showing each action to `observe` before it is carried out (tests
    /// assert on what the core decided).
    pub fn step_observed(&mut self, now: u64, observe: &mut dyn FnMut(&Action)) -> Result<StepReport, StepError> {
        let staged = self.core.run_batch(&self.work, now)?;
        if staged.stats.timers_fired > 0 {
            fail::fail_point!("shard.timer_fired_before_commit");
        }
        let commit = if staged.batch.is_empty() {
            None
        } else {
            let started = Instant::now();
            self.core.store().commit(&staged.batch)?;
            Some(started.elapsed())
        };
        // Crash points of the fault suite (no-ops unless built with `failpoints`).
        if staged.stats.applied > 0 {
            fail::fail_point!("shard.after_commit_before_ack");
        }
        if staged.stats.outbox_written > 0 {
            fail::fail_point!("shard.after_commit_before_dispatch");
        }
        let work = std::mem::take(&mut self.work).len();
        self.core.adopt(staged.overlay);
        for a in &staged.actions {
            observe(a);
        }
        self.carry_out(staged.actions, now);
        Ok(StepReport { stats: staged.stats, work, commit })
    }

    fn carry_out(&mut self, actions: Vec<Action>, now: u64) {
        for action in actions {
            match action {
                Action::Settle { request, term } => self.settle(request, term),
                Action::Gate { request, decision } => {
                    if let Some(Waiting::Gate(reply)) = self.waiting.remove(&request) {
                        let _ = reply.send(decision);
                    }
                }
                Action::Done { request, result } => match self.waiting.remove(&request) {
                    Some(Waiting::Finish(reply)) => {
                        let _ = reply.send(result);
                    }
                    Some(Waiting::Quarantine(reply)) => {
                        let _ = reply.send(());
                    }
                    _ => {}
                },
                Action::Admin { request, answer } => {
                    if let Some(Waiting::Admin(reply)) = self.waiting.remove(&request) {
                        let _ = reply.send(answer);
                    }
                }
                Action::Offer { key, item } => self.relay.offer(key, item, now),
                Action::Delivered { key } => self.relay.delivered(key),
                Action::RetryLater { key, item } => self.relay.retry_later(key, item),
            }
        }
    }

    fn settle(&mut self, request: RequestId, term: Option<String>) {
        let Some(Waiting::Apply { remaining, term: t, .. }) = self.waiting.get_mut(&request) else { return };
        if term.is_some() {
            *t = term;
        }
        *remaining = remaining.saturating_sub(1);
        if *remaining > 0 {
            return;
        }
        if let Some(Waiting::Apply { reply, term, .. }) = self.waiting.remove(&request) {
            let _ = reply.send(match term {
                Some(reason) => ApplyOutcome::Term { reason },
                None => ApplyOutcome::Ack,
            });
        }
    }

    /// Swaps the manifests asked for since the last call (between steps).
    pub fn run_reloads(&mut self) {
        for (set, reply) in std::mem::take(&mut self.reloads) {
            let r = self.core.reload(set);
            if let Err(e) = &r {
                tracing::error!(shard = self.core.shard(), error = %e, "manifest reload refused by shard");
            }
            let _ = reply.send(r);
        }
    }

    /// Shutdown: every message still waiting (behind a blocked key, or in work not yet
    /// durable) is answered with a NAK so it is redelivered; other requests are dropped
    /// (their askers see the channel close).
    pub fn abandon_waiting(&mut self) {
        for (_, w) in self.waiting.drain() {
            if let Waiting::Apply { reply, .. } = w {
                let _ = reply.send(ApplyOutcome::Nak { delay_ms: 1_000 });
            }
        }
        self.work.clear();
    }
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

    fn record(&self, report: &StepReport) {
        let stats = &report.stats;
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
        if stats.timers_fired > 0 {
            // One sample per batch: the mean lateness of its timers (the max goes to the log
            // when it is large).
            self.schedule_lag.record(stats.timer_lag_ms_sum as f64 / 1e3 / stats.timers_fired as f64);
        }
        if let Some(d) = report.commit {
            self.commit_seconds.record(d.as_secs_f64());
        }
        self.batch_requests.record(report.work as f64);
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
    ready: flume::Sender<Result<(), ShardError>>,
) {
    let setup = (|| {
        let store = data.open_store(index, &cfg.store)?;
        let core = ShardCore::new(index, data.router(), cfg.core.clone(), store, manifests)?;
        Ok::<_, ShardError>(Shell::new(core, RelayState::new(cfg.relay.clone())))
    })();
    let shell = match setup {
        Ok(s) => Rc::new(RefCell::new(s)),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let metrics = Metrics::new(index);
    let (wake_tx, wake_rx) = flume::bounded::<()>(1);
    let stop = Rc::new(Cell::new(false));
    let relay_task = glommio::spawn_local(relay_loop(
        index,
        shell.clone(),
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
        let backing_off = failed_until.is_some_and(|t| now < t);
        if !backing_off {
            failed_until = None;
        }
        // When to run without new input: a due timer or retry, or the next commit attempt.
        let wake_at = match failed_until {
            Some(t) => Some(t),
            None => shell.borrow().core().next_wake(),
        };
        let immediate = !backing_off && (shell.borrow().has_work() || wake_at.is_some_and(|t| t <= now));
        if !(immediate || stopping) {
            let wait = wake_at.map(|t| t.saturating_sub(now)).unwrap_or(1_000).clamp(1, 1_000);
            let control = async { chans.control.recv_async().await.map(Wake::Control).unwrap_or(Wake::Closed) };
            let timer = async {
                glommio::timer::sleep(Duration::from_millis(wait)).await;
                Wake::Timeout
            };
            let first = if backing_off {
                // The inbox waits (backpressure) while the disk refuses writes.
                future::or(control, timer).await
            } else {
                let inbox = async { chans.inbox.recv_async().await.map(Wake::Request).unwrap_or(Wake::Closed) };
                future::or(future::or(control, inbox), timer).await
            };
            let mut s = shell.borrow_mut();
            match first {
                Wake::Request(r) => s.take(r),
                Wake::Control(c) => stopping |= s.take_control(c),
                Wake::Closed => stopping = true,
                Wake::Timeout => {}
            }
        }
        if failed_until.is_some_and(|t| clock.now_ms() < t) && !stopping {
            continue;
        }
        failed_until = None;

        // Gather the batch: control first (it unblocks the relay), then the inbox.
        {
            let mut s = shell.borrow_mut();
            while let Ok(c) = chans.control.try_recv() {
                stopping |= s.take_control(c);
            }
            let mut requests = 0usize;
            while requests < cfg.max_batch {
                match chans.inbox.try_recv() {
                    Ok(r) => {
                        requests += 1;
                        s.take(r);
                    }
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                }
            }
        }

        let result = shell.borrow_mut().step(clock.now_ms());
        match result {
            Ok(report) => {
                if !health.writable.swap(true, Ordering::Relaxed) {
                    tracing::info!(shard = index, "commits succeed again");
                }
                retry_delay = cfg.commit_retry_ms;
                metrics.record(&report);
                if report.commit.is_some() {
                    health.commits.fetch_add(1, Ordering::Relaxed);
                }
                if report.stats.timer_lag_ms_max > 5_000 {
                    tracing::warn!(shard = index, lag_ms = report.stats.timer_lag_ms_max, "timers fired late");
                }
                health.requests.fetch_add(report.work as u64, Ordering::Relaxed);
                health.transitions.fetch_add(report.stats.applied, Ordering::Relaxed);
                health.program_ns.fetch_add(report.stats.program_ns, Ordering::Relaxed);
                if report.stats.outbox_written > 0 || report.stats.outbox_deleted > 0 {
                    let _ = wake_tx.try_send(());
                }
            }
            Err(e) => {
                // No answer was sent for anything in the failed batch (invariant 1); the
                // same work runs again after a backoff.
                tracing::error!(shard = index, error = %e, retry_in_ms = retry_delay, "batch commit failed; nothing acked, will retry");
                metrics.commit_failures.increment(1);
                health.failed_commits.fetch_add(1, Ordering::Relaxed);
                health.writable.store(false, Ordering::Relaxed);
                if let Ok(mut last) = health.last_error.lock() {
                    *last = Some(e.to_string());
                }
                failed_until = Some(clock.now_ms() + retry_delay);
                retry_delay = (retry_delay * 2).min(5_000);
                // The relay may hold items of the failed batch's view: let it re-read the store.
                shell.borrow_mut().relay_mut().request_scan();
            }
        }
        shell.borrow_mut().run_reloads();
        {
            let s = shell.borrow();
            let depth = s.relay().depth();
            health.outbox_window.store(depth as u64, Ordering::Relaxed);
            metrics.outbox_depth.set(depth as f64);
            let blocked = s.core().blocked_keys();
            health.blocked_keys.store(blocked as u64, Ordering::Relaxed);
            metrics.blocked_keys.set(blocked as f64);
        }
        if stopping && chans.inbox.is_empty() && !shell.borrow().has_work() {
            break;
        }
        if stopping && failed_until.is_some() {
            // Shutting down while the disk refuses writes: leave the rest for redelivery.
            break;
        }
    }
    stop.set(true);
    let _ = wake_tx.try_send(());
    shell.borrow_mut().abandon_waiting();
    if let Err(e) = shell.borrow().core().store().sync() {
        tracing::error!(shard = index, error = %e, "final sync failed");
    }
    relay_task.cancel();
    tracing::info!(shard = index, "shard stopped");
}

/// The relay task: hands ready outbox items to the bridge within the in-flight limits.
async fn relay_loop(
    index: usize,
    shell: Rc<RefCell<Shell>>,
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
            let mut s = shell.borrow_mut();
            if let Err(e) = s.relay_scan(now) {
                tracing::error!(shard = index, error = %e, "outbox scan failed; retrying");
            }
            s.relay_mut().take_ready(now)
        };
        if !ready.suppressed.is_empty() {
            let results = ready
                .suppressed
                .into_iter()
                .map(|key| crate::message::DispatchResult { key, outcome: DispatchOutcome::Delivered })
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
            let s = shell.borrow();
            let relay = s.relay();
            (relay.next_deadline(), relay.config().poll_ms, relay.has_ready(now))
        };
        let wait = deadline.map(|d| d.saturating_sub(now)).unwrap_or(poll).clamp(1, poll);
        if has_ready {
            // Ready items wait for in-flight room: a confirmation or a timeout wakes us.
            let _ = future::or(async { wake.recv_async().await.is_ok() }, async {
                glommio::timer::sleep(Duration::from_millis(wait)).await;
                true
            })
            .await;
            continue;
        }
        let woke = future::or(async { wake.recv_async().await.is_ok() }, async {
            glommio::timer::sleep(Duration::from_millis(wait)).await;
            // The safety net: look at the store now and then.
            shell.borrow_mut().relay_mut().request_scan();
            true
        })
        .await;
        if !woke {
            return;
        }
    }
}
