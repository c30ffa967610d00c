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

use crate::caller::Caller;
use crate::clock::SharedClock;
use crate::core::{Action, BatchStats, CoreConfig, CoreError, RequestId, ShardCore, Work};
use crate::layout::DataDir;
use crate::manifest::ManifestSet;
use crate::message::{
    AdminAnswer, AdminError, ApplyOutcome, Control, Dispatch, DispatchOutcome, DispatchRequest, DispatchResult,
    FinishError, GateDecision, Query, Reply, Request, ShardError,
};
use crate::record::WorkKind;
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
    /// Time a batch should take to decide, at most: the shard takes fewer requests into a
    /// batch when recent ones cost more per request, so one step never holds the thread
    /// for long (queries, the relay and timers wait meanwhile). Default 50 ms: at saturation
    /// a commit rewrites the B-tree pages its batch touched, so smaller batches write the
    /// same pages more often (20 ms cost 12% of the pipeline benchmark's throughput, see
    /// bench/README.md); below saturation batches are small anyway.
    pub batch_budget: Duration,
    /// First wait after a failed commit; doubles up to 5 s. Default 50 ms.
    pub commit_retry_ms: u64,
    /// Count (and log) every time the shard holds its thread longer than this without
    /// yielding; `None` (the default) does not time. Set from `RuntimeConfig`.
    pub stall_threshold: Option<Duration>,
    /// Makes the shard's caller (HTTP effects, Gateway commands run in place); `None`: the
    /// relay hands every item to the bridge.
    pub caller: Option<crate::caller::CallerFactory>,
    /// Timers wait for the streams: a due timer fires only once this watermark has passed
    /// its due time. `None`: timers fire on the clock alone (no bridge feeds the shard).
    pub watermark: Option<Arc<crate::clock::StreamWatermark>>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            relay: RelayConfig::default(),
            store: StoreConfig::default(),
            max_batch: 4_096,
            batch_budget: Duration::from_millis(50),
            commit_retry_ms: 50,
            stall_threshold: None,
            caller: None,
            watermark: None,
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
    /// Times the shard held its thread past the stall threshold.
    pub stalls: AtomicU64,
    /// Batches the core decided (committed or not yet).
    pub batches_decided: AtomicU64,
    /// When (ms) the shard last logged late timers: the warning goes out at most every 10 s.
    pub late_timers_logged_ms: AtomicU64,
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

/// A batch the core decided, with how much of the shell's work it covers.
pub struct StagedWork {
    staged: crate::core::Staged,
    /// Units of the shell's work the batch covers.
    pub work: usize,
}

impl StagedWork {
    /// The batch writes nothing to the store (it may still change memory and answer).
    pub fn writes_nothing(&self) -> bool {
        self.staged.batch.is_empty()
    }
}

/// A committed batch whose actions wait for its flush.
pub struct Committed {
    actions: Vec<Action>,
    report: StepReport,
    /// The transaction to flush first (`None`: nothing to wait for).
    unflushed: Option<u64>,
    outbox_seq: u64,
    /// Suspects ([`Request::ApplySuspect`]) the batch took in.
    suspects: Vec<RequestId>,
}

impl Committed {
    pub fn unflushed(&self) -> Option<u64> {
        self.unflushed
    }

    /// Whether anything waits to be carried out.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    pub fn report(&self) -> &StepReport {
        &self.report
    }
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
    /// Work that need not commit on its own: confirmed publishes of the records of calls run
    /// in place (deleting their outbox items). It joins the next batch that commits anyway,
    /// or commits by itself once the oldest waited [`DEFER_MS`] (a crash before then only
    /// publishes a record again, which its readers ack on receipt).
    deferred: Vec<Work>,
    /// When the oldest deferred work was first seen by [`Self::promote_deferred`].
    deferred_since: Option<u64>,
    reloads: Vec<Reload>,
    caller: Option<Rc<dyn Caller>>,
    /// Due timers up to this time may fire in the next step (see [`Self::set_timers_until`]);
    /// `None`: up to the step's `now`.
    timers_until: Option<u64>,
    /// Messages redelivered after a crash ([`Request::ApplySuspect`]) whose bridge waits to
    /// hear that the batch that took them in is durable.
    suspects: AHashMap<RequestId, Reply<()>>,
}

/// A manifest swap asked for, done between steps.
type Reload = (Arc<ManifestSet>, Reply<Result<(), ShardError>>);

impl Shell {
    pub fn new(core: ShardCore, relay: RelayState) -> Self {
        Self {
            core,
            relay,
            waiting: AHashMap::new(),
            next_request: 0,
            work: Vec::new(),
            deferred: Vec::new(),
            deferred_since: None,
            reloads: Vec::new(),
            caller: None,
            timers_until: None,
            suspects: AHashMap::new(),
        }
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

    /// Whether deferred work waits (see [`Self::promote_deferred`]).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Moves the deferred work into the next batch when that batch has other work (it
    /// commits anyway), when the oldest deferred work has waited [`DEFER_MS`], when there
    /// is a lot of it, or when `force`d (stopping, or a caller stepping by hand).
    pub fn promote_deferred(&mut self, now: u64, force: bool) {
        if self.deferred.is_empty() {
            return;
        }
        let since = *self.deferred_since.get_or_insert(now);
        if force || !self.work.is_empty() || now >= since + DEFER_MS || self.deferred.len() >= DEFER_MAX {
            self.work.append(&mut self.deferred);
            self.deferred_since = None;
        }
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
    /// committed state, reloads kept for between steps, calls started on the caller.
    pub fn take(&mut self, req: Request) {
        match req {
            Request::Apply { event, targets, reply } => {
                self.take_apply(event, targets, reply, None);
            }
            Request::ApplySuspect { event, targets, reply, ran, crashed } => {
                if let Some(request) = self.take_apply(event, targets, reply, crashed) {
                    self.suspects.insert(request, ran);
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
            Request::RunEffect { command, reply } => match &self.caller {
                Some(caller) => {
                    // Runs on the shard's executor; the answer goes back when it is done.
                    let call = caller.call(*command);
                    glommio::spawn_local(async move {
                        let _ = reply.send(call.await);
                    })
                    .detach();
                }
                None => {
                    let error = format!("shard {} runs no effects in this process", self.core.shard());
                    let _ = reply.send(DispatchOutcome::Permanent { error });
                }
            },
        }
    }

    /// One stream message for `targets` on this shard (`crashed`: not to be run, see
    /// [`Request::ApplySuspect`]); its request, unless there is nothing to apply.
    fn take_apply(
        &mut self,
        event: Arc<crate::message::Event>,
        targets: Vec<crate::message::Target>,
        reply: Reply<ApplyOutcome>,
        crashed: Option<u32>,
    ) -> Option<RequestId> {
        if targets.is_empty() {
            let _ = reply.send(ApplyOutcome::Ack);
            return None;
        }
        let request = self.wait(Waiting::Apply { reply, remaining: targets.len(), term: None });
        let origin = match crashed {
            Some(crashes) => crate::core::Origin::Crashed { request, crashes },
            None => crate::core::Origin::Delivery(request),
        };
        for target in targets {
            self.work.push(Work::Apply(crate::core::Pending { event: event.clone(), target, origin: origin.clone() }));
        }
        Some(request)
    }

    /// The shard's caller (calls made in place), if it has one.
    pub fn caller(&self) -> Option<&Rc<dyn Caller>> {
        self.caller.as_ref()
    }

    /// Sets the caller (on the shard's thread, before the loop starts).
    pub fn set_caller(&mut self, caller: Rc<dyn Caller>) {
        self.caller = Some(caller);
    }

    /// Takes a control message in; `true` for stop.
    pub fn take_control(&mut self, c: Control) -> bool {
        match c {
            Control::Dispatched(results) => {
                for r in results {
                    // An answer to the item's current send holds it (not sent again on its
                    // deadline while the commit that settles it waits: a full disk, a blocked
                    // key); a failed dispatch re-stores the item as the relay sent it, a call
                    // that ran in place is recorded from it.
                    match (self.relay.answer(&r.key, r.send), r.outcome) {
                        (Some(item), DispatchOutcome::Delivered) if matches!(item.kind, WorkKind::Audit { .. }) => {
                            self.deferred.push(Work::Dispatched {
                                key: r.key,
                                outcome: DispatchOutcome::Delivered,
                                item: Some(item),
                            })
                        }
                        (Some(item), outcome) => {
                            self.work.push(Work::Dispatched { key: r.key, outcome, item: Some(item) })
                        }
                        // An earlier send was confirmed after the item went again: delivered
                        // all the same (deleting twice is harmless).
                        (None, DispatchOutcome::Delivered) => self.work.push(Work::Dispatched {
                            key: r.key,
                            outcome: DispatchOutcome::Delivered,
                            item: None,
                        }),
                        // Any other answer to an earlier send is stale: the current send
                        // answers for the item (one retry per attempt, none after delivery).
                        (None, outcome) => {
                            tracing::debug!(
                                shard = self.core.shard(),
                                seq = r.key.seq,
                                send = r.send,
                                ?outcome,
                                "stale dispatch answer ignored"
                            )
                        }
                    }
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
            Query::List { tenant, saga, filter, after, limit, reply } => {
                let _ =
                    reply.send(c.saga_list(&tenant, &saga, &filter, after.as_deref(), limit).map_err(ShardError::from));
            }
            Query::Stats { reply } => {
                let stats = c.stats().map(|mut s| {
                    s.outbox_window = self.relay.depth();
                    s.outbox_in_flight = self.relay.in_flight();
                    s.outbox_retrying = self.relay.retrying();
                    s.outbox_most_attempts = self.relay.most_attempts();
                    s
                });
                let _ = reply.send(stats.map_err(ShardError::from));
            }
            Query::Replays { after, limit, reply } => {
                let _ = reply.send(c.replays(after.as_ref(), limit).map_err(ShardError::from));
            }
        }
    }

    /// One batch, flushed in place: [`Self::stage`] → [`Self::commit`] → flush →
    /// [`Self::release`]. On `Err` nothing was committed or answered and the work is kept.
    /// The shard's own loop runs the same three steps with the flush on another thread.
    pub fn step(&mut self, now: u64) -> Result<StepReport, StepError> {
        self.step_observed(now, &mut |_| {})
    }

    /// [`Self::step`], showing each action to `observe` before it is carried out (tests
    /// assert on what the core decided).
    pub fn step_observed(&mut self, now: u64, observe: &mut dyn FnMut(&Action)) -> Result<StepReport, StepError> {
        self.promote_deferred(now, true);
        let staged = self.stage(now)?;
        let committed = self.commit(staged)?;
        if let Some(txn) = committed.unflushed {
            self.core.store().flusher()?.flush(txn)?;
        }
        for a in &committed.actions {
            observe(a);
        }
        let report = committed.report;
        self.release(committed, now);
        Ok(report)
    }

    /// The core decides a batch from the work taken in so far (plus due retries and
    /// timers). Nothing changes; a previous batch's flush may still be running.
    pub fn stage(&self, now: u64) -> Result<StagedWork, StepError> {
        let timers_until = self.timers_until.map_or(now, |t| t.min(now));
        Ok(StagedWork { staged: self.core.run_batch_with(&self.work, now, timers_until)?, work: self.work.len() })
    }

    /// Due timers fire only up to `until` (the streams' watermark, read before the work of
    /// the step was taken in, so every event published before it is in that work or was
    /// applied earlier); `None` lifts the limit.
    pub fn set_timers_until(&mut self, until: Option<u64>) {
        self.timers_until = until;
    }

    /// When the shard should run without new input: the core's next timer or retry; a
    /// timer that is due but waits for the streams is looked at again every
    /// [`STREAM_WAIT_POLL_MS`] (the watermark moves without waking the shard).
    pub fn next_wake(&self, now: u64) -> Option<u64> {
        let deferred = (!self.deferred.is_empty()).then(|| self.deferred_since.map_or(now, |t| t + DEFER_MS));
        let wake = match (self.core.next_wake(), deferred) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (self.core.next_due(), self.timers_until) {
            (Some(due), Some(until)) if due <= now && due > until => {
                let poll = now + STREAM_WAIT_POLL_MS;
                Some(self.core.next_retry().map_or(poll, |r| r.min(poll)))
            }
            _ => wake,
        }
    }

    /// Commits a staged batch (without waiting for the disk) and adopts its in-memory
    /// changes; its actions wait in the returned value until the commit is durable. Call only
    /// once the previous batch is durable. Work taken in after staging stays for the next
    /// batch. On `Err` nothing was committed and the work is kept.
    pub fn commit(&mut self, staged: StagedWork) -> Result<Committed, StepError> {
        let StagedWork { staged, work } = staged;
        if staged.stats.timers_fired > 0 {
            fail::fail_point!("shard.timer_fired_before_commit");
        }
        let durable_before = self.core.outbox_seq();
        let (commit, unflushed) = if staged.batch.is_empty() {
            (None, None)
        } else {
            let started = Instant::now();
            let info = self.core.store().commit_unflushed(&staged.batch)?;
            (Some(started.elapsed()), info.unflushed)
        };
        tracing::debug!(shard = self.core.shard(), txn = ?unflushed, timers_fired = staged.stats.timers_fired, applied = staged.stats.applied, "committed");
        let taken = work.min(self.work.len());
        let suspects = if self.suspects.is_empty() { Vec::new() } else { self.suspects_in(taken) };
        self.work.drain(..taken);
        self.core.adopt(staged.overlay);
        if unflushed.is_some() {
            // The relay must not dispatch this batch's items from the store before the flush.
            self.relay.set_durable(durable_before);
        }
        Ok(Committed {
            actions: staged.actions,
            report: StepReport { stats: staged.stats, work, commit },
            unflushed,
            outbox_seq: self.core.outbox_seq(),
            suspects,
        })
    }

    /// The suspects ([`Request::ApplySuspect`]) among the first `taken` units of work.
    fn suspects_in(&self, taken: usize) -> Vec<RequestId> {
        let mut out: Vec<RequestId> = self.work[..taken]
            .iter()
            .filter_map(|w| match w {
                Work::Apply(p) => match p.origin {
                    crate::core::Origin::Delivery(r) | crate::core::Origin::Crashed { request: r, .. } => Some(r),
                    _ => None,
                },
                _ => None,
            })
            .filter(|r| self.suspects.contains_key(r))
            .collect();
        out.dedup();
        out
    }

    /// The committed batch is durable: answers, settlements and relay hints go out.
    pub fn release(&mut self, committed: Committed, now: u64) {
        // Crash points of the fault suite (no-ops unless built with `failpoints`).
        if committed.report.stats.applied > 0 {
            fail::fail_point!("shard.after_commit_before_ack");
        }
        if committed.report.stats.outbox_written > 0 {
            fail::fail_point!("shard.after_commit_before_dispatch");
        }
        self.relay.set_durable(committed.outbox_seq);
        self.carry_out(committed.actions, now);
        // Suspects the batch took in: one that settled was answered; one that still waits
        // (its key is blocked) is reported as taken, so the bridge hands on the next.
        for request in committed.suspects {
            if let Some(ran) = self.suspects.remove(&request)
                && self.waiting.contains_key(&request)
            {
                let _ = ran.send(());
            }
        }
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
            let r = self.core.reload(set.clone());
            match &r {
                Err(e) => tracing::error!(shard = self.core.shard(), error = %e, "manifest reload refused by shard"),
                Ok(()) => {
                    if let Some(c) = &self.caller {
                        c.reload(&set);
                    }
                }
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
        self.suspects.clear();
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
    effects_pruned: metrics::Counter,
    commit_failures: metrics::Counter,
    outbox_depth: metrics::Gauge,
    outbox_retrying: metrics::Gauge,
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
            effects_pruned: metrics::counter!("runner_effect_gate_pruned_total", "shard" => s.clone()),
            commit_failures: metrics::counter!("runner_commit_failures_total", "shard" => s.clone()),
            outbox_depth: metrics::gauge!("runner_outbox_depth", "shard" => s.clone()),
            outbox_retrying: metrics::gauge!("runner_outbox_retrying", "shard" => s.clone()),
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
        self.effects_pruned.increment(stats.effects_pruned);
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

/// Counts and logs a synchronous section that held the shard's thread past `threshold`.
fn note_stall(shard: usize, health: &ShardHealth, task: &str, held: Duration, threshold: Duration) {
    if held > threshold {
        health.stalls.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            shard,
            task,
            held_ms = held.as_millis() as u64,
            threshold_ms = threshold.as_millis() as u64,
            "shard held its thread past the stall threshold"
        );
    }
}

/// The core's settings: its own, plus the dispatch retry policy, which is configured with
/// the relay (`relay.max_attempts`, `relay.backoff_ms`, `relay.max_backoff_ms`).
fn core_config(cfg: &ShardConfig) -> CoreConfig {
    CoreConfig { dispatch_retry: cfg.relay.retry, dispatch_attempts: cfg.relay.max_attempts, ..cfg.core.clone() }
}

enum Wake {
    Request(Request),
    Control(Control),
    Flushed(Result<(), StoreError>),
    Timeout,
    Closed,
}

/// A flush this slow is logged (the disk, not the shard, held the batch that long).
const SLOW_FLUSH: Duration = Duration::from_millis(250);

/// The shard's flusher: a thread that syncs committed transactions to disk, one at a time,
/// so the shard's own thread never waits on the disk ([`crate::store::Durability::Fsync`]).
struct FlushThread {
    requests: flume::Sender<u64>,
    done: flume::Receiver<Result<(), StoreError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FlushThread {
    fn start(index: usize, mut flusher: crate::store::Flusher) -> Result<Self, ShardError> {
        let (requests, rx) = flume::bounded::<u64>(1);
        let (tx, done) = flume::bounded(1);
        let thread = std::thread::Builder::new()
            .name(format!("flush-{index}"))
            .spawn(move || {
                let seconds = metrics::histogram!("runner_flush_seconds", "shard" => index.to_string());
                while let Ok(txn) = rx.recv() {
                    let started = std::time::Instant::now();
                    let result = flusher.flush(txn);
                    let took = started.elapsed();
                    seconds.record(took.as_secs_f64());
                    if took >= SLOW_FLUSH {
                        // The disk held this shard's acks, dispatches and next commit that long.
                        tracing::warn!(shard = index, txn, took_ms = took.as_millis() as u64, "slow flush");
                    }
                    if tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| {
                ShardError::Store(StoreError::Flush { shard: index, path: "flush thread".into(), source })
            })?;
        Ok(Self { requests, done, thread: Some(thread) })
    }
}

impl Drop for FlushThread {
    fn drop(&mut self) {
        // Closing the request channel ends the thread once its flush (if any) is done.
        let (closed, _) = flume::bounded(1);
        self.requests = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs shard `index` until it is told to stop (or its inbox closes). `ready` is told
/// once the store is open and the programs compiled, or why not.
///
/// The loop keeps the shard's thread busy only with deciding and committing: a committed
/// batch is flushed by the flusher thread while the shard takes in and decides the next
/// one, answers queries and runs its relay; the batch's acks, answers and dispatches leave
/// once its flush is done, and the next commit comes only after it.
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
    let manifests_for_caller = manifests.clone();
    let setup = (|| {
        let store = data.open_store(index, &cfg.store)?;
        let flush = match cfg.store.durability {
            crate::store::Durability::Fsync => Some(FlushThread::start(index, store.flusher()?)?),
            _ => None,
        };
        let core = ShardCore::new(index, data.router(), core_config(&cfg), store, manifests)?;
        Ok::<_, ShardError>((Shell::new(core, RelayState::new(cfg.relay.clone())), flush))
    })();
    let (shell, flush) = match setup {
        Ok((mut s, f)) => {
            if let Some(factory) = &cfg.caller {
                s.set_caller((factory.0)(index, &manifests_for_caller));
            }
            (Rc::new(RefCell::new(s)), f)
        }
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
        health.clone(),
        cfg.stall_threshold,
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
    // Committed batches waiting for the running flush: the first one's transaction is being
    // flushed; later ones wrote nothing and only wait to answer in order.
    let mut flushing: Vec<Committed> = Vec::new();
    let mut store_failed = false;
    // Recent cost of deciding one unit of work (nanoseconds, moving average); it starts
    // high, so a first burst does not go into one huge batch before anything is measured.
    let mut cost_ns = 50_000f64;
    loop {
        let now = clock.now_ms();
        let backing_off = failed_until.is_some_and(|t| now < t);
        if !backing_off {
            failed_until = None;
        }
        // When to run without new input: a due timer or retry, or the next commit attempt.
        let wake_at = match failed_until {
            Some(t) => Some(t),
            None => shell.borrow().next_wake(now),
        };
        let immediate = !backing_off && (shell.borrow().has_work() || wake_at.is_some_and(|t| t <= now));
        // Stopping, the loop still waits for a running flush (and answers its batch).
        if !immediate && (!stopping || !flushing.is_empty()) {
            let wait = wake_at.map(|t| t.saturating_sub(now)).unwrap_or(1_000).clamp(1, 1_000);
            let running = flush.as_ref().filter(|_| !flushing.is_empty());
            let first = next_wake(&chans, running, backing_off, wait).await;
            match first {
                Wake::Request(r) => shell.borrow_mut().take(r),
                Wake::Control(c) => stopping |= shell.borrow_mut().take_control(c),
                Wake::Flushed(r) => {
                    store_failed |= !flushed(index, &shell, &health, &metrics, &mut flushing, r, clock.now_ms());
                }
                Wake::Closed => stopping = true,
                Wake::Timeout => {}
            }
        }
        if store_failed {
            break;
        }
        // From here to the next await the shard holds its thread.
        let busy = Held::start(cfg.stall_threshold.is_some());
        if failed_until.is_some_and(|t| clock.now_ms() < t) && !stopping {
            continue;
        }
        failed_until = None;

        // Gather the batch: control first (it unblocks the relay), then the inbox. The
        // streams' watermark is read first: every event published before it is in the inbox
        // by then, so when the inbox is drained the batch's timers cannot overtake one.
        {
            let watermark = cfg.watermark.as_ref().map(|w| w.get());
            let mut s = shell.borrow_mut();
            while let Ok(c) = chans.control.try_recv() {
                stopping |= s.take_control(c);
            }
            let mut requests = 0usize;
            let mut drained = false;
            let take = batch_size(cfg.max_batch, cfg.batch_budget, cost_ns);
            while requests < take {
                match chans.inbox.try_recv() {
                    Ok(r) => {
                        requests += 1;
                        s.take(r);
                    }
                    Err(flume::TryRecvError::Empty) => {
                        drained = true;
                        break;
                    }
                    Err(flume::TryRecvError::Disconnected) => {
                        stopping = true;
                        drained = true;
                        break;
                    }
                }
            }
            // Events left in the inbox may be older than the watermark: timers wait a step.
            s.set_timers_until(watermark.map(|w| if drained { w } else { 0 }));
            s.promote_deferred(clock.now_ms(), stopping);
        }

        // Decide the next batch now, while the previous one may still be flushing.
        let deciding = Instant::now();
        let staged = shell.borrow().stage(clock.now_ms());
        health.batches_decided.fetch_add(1, Ordering::Relaxed);
        if let Ok(st) = &staged
            && st.work > 0
        {
            let per = deciding.elapsed().as_nanos() as f64 / st.work as f64;
            cost_ns = cost_ns * 0.7 + per * 0.3;
        }
        note_busy(index, &health, cfg.stall_threshold, &busy);
        // A batch that writes nothing needs no commit: its in-memory changes are adopted at
        // once and its answers queue behind the running flush (they may depend on it).
        let writes = staged.as_ref().is_ok_and(|st| !st.writes_nothing());
        if writes && !flushing.is_empty() {
            // The next commit comes only after the previous one is on disk.
            if let Some(f) = &flush {
                let r = wait_flush(f, &chans, &shell, &mut stopping, cfg.max_batch).await;
                store_failed |= !flushed(index, &shell, &health, &metrics, &mut flushing, r, clock.now_ms());
                if store_failed {
                    break;
                }
            }
        }
        let busy = Held::start(cfg.stall_threshold.is_some());
        let committed = staged.and_then(|st| shell.borrow_mut().commit(st));
        match committed {
            Ok(c) => {
                if !health.writable.swap(true, Ordering::Relaxed) {
                    tracing::info!(shard = index, "commits succeed again");
                }
                retry_delay = cfg.commit_retry_ms;
                let txn = c.unflushed();
                if txn.is_some() || c.has_actions() {
                    flushing.push(c);
                }
                match (txn, &flush) {
                    (Some(txn), Some(f)) if f.requests.try_send(txn).is_err() => {
                        tracing::error!(shard = index, "the flusher thread is gone; the shard stops");
                        store_failed = true;
                    }
                    (Some(_), Some(_)) => {}
                    _ if !flushing.first().is_some_and(|c| c.unflushed().is_some() && flush.is_some()) => {
                        // Nothing to flush and nothing earlier to wait for: answer now.
                        store_failed |=
                            !flushed(index, &shell, &health, &metrics, &mut flushing, Ok(()), clock.now_ms());
                    }
                    _ => {}
                }
            }
            Err(e) => {
                // No answer was sent for anything in the failed batch (invariant 1); the
                // same work runs again after a backoff.
                // Only the store fails a whole batch (errors of one key quarantine the key).
                let what = match &e {
                    StepError::Core(_) => "batch cannot be decided: reading the store failed",
                    StepError::Commit(_) => "batch commit failed",
                };
                tracing::error!(shard = index, error = %e, retry_in_ms = retry_delay, "{what}; the shard holds its work (nothing acked, not ready) and will retry");
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
        if shell.borrow().relay().has_ready(clock.now_ms()) {
            let _ = wake_tx.try_send(());
        }
        shell.borrow_mut().run_reloads();
        {
            let s = shell.borrow();
            let depth = s.relay().depth();
            health.outbox_window.store(depth as u64, Ordering::Relaxed);
            metrics.outbox_depth.set(depth as f64);
            metrics.outbox_retrying.set(s.relay().retrying() as f64);
            let blocked = s.core().blocked_keys();
            health.blocked_keys.store(blocked as u64, Ordering::Relaxed);
            metrics.blocked_keys.set(blocked as f64);
        }
        note_busy(index, &health, cfg.stall_threshold, &busy);
        if store_failed {
            break;
        }
        if stopping
            && chans.inbox.is_empty()
            && !shell.borrow().has_work()
            && !shell.borrow().has_deferred()
            && flushing.is_empty()
        {
            break;
        }
        if stopping && failed_until.is_some() {
            // Shutting down while the disk refuses writes: leave the rest for redelivery.
            break;
        }
    }
    // A flush still running finishes before the shard answers for its batch.
    if let Some(f) = &flush
        && !flushing.is_empty()
        && !store_failed
    {
        let r = f.done.recv_async().await.unwrap_or(Ok(()));
        flushed(index, &shell, &health, &metrics, &mut flushing, r, clock.now_ms());
    }
    stop.set(true);
    let _ = wake_tx.try_send(());
    shell.borrow_mut().abandon_waiting();
    if !store_failed && let Err(e) = shell.borrow().core().store().sync() {
        tracing::error!(shard = index, error = %e, "final sync failed");
    }
    relay_task.cancel();
    drop(flush);
    tracing::info!(shard = index, "shard stopped");
}

/// Waits for the next input: a control message, a request (unless backing off: the inbox
/// then waits, as backpressure), the running flush, or the timer.
async fn next_wake(chans: &ShardChannels, flush: Option<&FlushThread>, backing_off: bool, wait_ms: u64) -> Wake {
    let control = async { chans.control.recv_async().await.map(Wake::Control).unwrap_or(Wake::Closed) };
    let timer = async {
        glommio::timer::sleep(Duration::from_millis(wait_ms)).await;
        Wake::Timeout
    };
    let flushed = async {
        match flush {
            Some(f) => f.done.recv_async().await.map(Wake::Flushed).unwrap_or(Wake::Closed),
            None => future::pending().await,
        }
    };
    let inbox = async {
        if backing_off {
            future::pending().await
        } else {
            chans.inbox.recv_async().await.map(Wake::Request).unwrap_or(Wake::Closed)
        }
    };
    future::or(future::or(flushed, control), future::or(inbox, timer)).await
}

/// Waits for the running flush while still taking requests in: queries are answered at
/// once, other requests wait for the next batch (at most `max_batch` of them; then the
/// inbox waits too).
async fn wait_flush(
    flush: &FlushThread,
    chans: &ShardChannels,
    shell: &Rc<RefCell<Shell>>,
    stopping: &mut bool,
    max_batch: usize,
) -> Result<(), StoreError> {
    let mut taken = 0;
    loop {
        let done = async { Some(flush.done.recv_async().await.unwrap_or(Ok(()))) };
        let more = async {
            if taken >= max_batch {
                return future::pending().await;
            }
            match future::or(
                async { chans.control.recv_async().await.map(Wake::Control).unwrap_or(Wake::Closed) },
                async { chans.inbox.recv_async().await.map(Wake::Request).unwrap_or(Wake::Closed) },
            )
            .await
            {
                Wake::Request(r) => {
                    shell.borrow_mut().take(r);
                }
                Wake::Control(c) => *stopping |= shell.borrow_mut().take_control(c),
                _ => *stopping = true,
            }
            None
        };
        if let Some(r) = future::or(done, more).await {
            return r;
        }
        taken += 1;
    }
}

/// The running flush ended with `result`: on success the waiting batches' actions go out,
/// in order; a failed flush leaves the disk in doubt, so the shard stops (its messages are
/// redelivered after a restart, which reopens the store at its last durable snapshot).
/// Returns whether the store is still good.
fn flushed(
    index: usize,
    shell: &Rc<RefCell<Shell>>,
    health: &ShardHealth,
    metrics: &Metrics,
    waiting: &mut Vec<Committed>,
    result: Result<(), StoreError>,
    now: u64,
) -> bool {
    if let Err(e) = result {
        tracing::error!(shard = index, error = %e, "cannot flush a commit to disk; the shard stops, and its unanswered messages will be redelivered after a restart");
        metrics.commit_failures.increment(1);
        health.failed_commits.fetch_add(1, Ordering::Relaxed);
        health.writable.store(false, Ordering::Relaxed);
        if let Ok(mut last) = health.last_error.lock() {
            *last = Some(e.to_string());
        }
        return false;
    }
    for c in waiting.drain(..) {
        metrics.record(c.report());
        if c.report().commit.is_some() {
            health.commits.fetch_add(1, Ordering::Relaxed);
        }
        let stats = &c.report().stats;
        if stats.timer_lag_ms_max > 5_000 && now >= health.late_timers_logged_ms.load(Ordering::Relaxed) + 10_000 {
            health.late_timers_logged_ms.store(now, Ordering::Relaxed);
            tracing::warn!(
                shard = index,
                lag_ms = stats.timer_lag_ms_max,
                "timers fired late (logged at most every 10 s; see the schedule-lag metric)"
            );
        }
        health.requests.fetch_add(c.report().work as u64, Ordering::Relaxed);
        health.transitions.fetch_add(stats.applied, Ordering::Relaxed);
        health.program_ns.fetch_add(stats.program_ns, Ordering::Relaxed);
        shell.borrow_mut().release(c, now);
    }
    true
}

/// Requests to take into the next batch: as many as fit the time budget at the recent
/// cost per unit of work, between a floor (so batches still group under load) and
/// `max_batch`.
fn batch_size(max_batch: usize, budget: Duration, cost_ns: f64) -> usize {
    let floor = 64.min(max_batch);
    if cost_ns <= 0.0 {
        return max_batch;
    }
    ((budget.as_nanos() as f64 / cost_ns) as usize).clamp(floor, max_batch)
}

/// Counts a synchronous section that held the shard's thread past the stall threshold.
fn note_busy(index: usize, health: &ShardHealth, threshold: Option<Duration>, since: &Held) {
    if let Some(t) = threshold {
        note_stall(index, health, "committer", since.held(), t);
    }
}

/// How often a shard looks again at a due timer that waits for the streams.
pub const STREAM_WAIT_POLL_MS: u64 = 20;

/// Longest deferred work waits for a batch to join (see [`Shell::promote_deferred`]).
pub const DEFER_MS: u64 = 100;
/// At most this much deferred work waits.
pub const DEFER_MAX: usize = 1_024;

/// The start of a synchronous section on the shard's thread, to tell how long the shard
/// held its thread: wall time less the time the thread sat runnable on the run queue while
/// the kernel gave the CPU to someone else (`/proc/thread-self/schedstat`, field 2). A
/// shard that blocks (an fsync, a lock) is holding its thread; a shard preempted on a
/// crowded machine is not, and counting that as a stall made the check flaky on 2 cores.
/// Reads the run-queue time only when `measure` is set (stall detection is on).
pub(crate) struct Held {
    at: Instant,
    queued_ns: Option<u64>,
}

impl Held {
    pub(crate) fn start(measure: bool) -> Self {
        Self { at: Instant::now(), queued_ns: if measure { run_queue_ns() } else { None } }
    }

    pub(crate) fn held(&self) -> Duration {
        let wall = self.at.elapsed();
        match (self.queued_ns, run_queue_ns()) {
            (Some(before), Some(after)) => wall.saturating_sub(Duration::from_nanos(after.saturating_sub(before))),
            _ => wall,
        }
    }
}

/// Nanoseconds this thread has spent runnable but waiting for a CPU, or `None` where the
/// kernel does not tell.
fn run_queue_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The relay task: hands ready outbox items to the bridge within the in-flight limits.
#[allow(clippy::too_many_arguments)]
async fn relay_loop(
    index: usize,
    shell: Rc<RefCell<Shell>>,
    health: Arc<ShardHealth>,
    stall_threshold: Option<Duration>,
    clock: SharedClock,
    wake: flume::Receiver<()>,
    dispatch: flume::Sender<DispatchRequest>,
    control: flume::Sender<Control>,
    stop: Rc<Cell<bool>>,
) {
    let dispatch_latency = metrics::histogram!("runner_outbox_handoff_seconds", "shard" => index.to_string());
    while !stop.get() {
        let now = clock.now_ms();
        let busy = Held::start(stall_threshold.is_some());
        let ready = {
            let mut s = shell.borrow_mut();
            if let Err(e) = s.relay_scan(now) {
                tracing::error!(shard = index, error = %e, "outbox scan failed; retrying");
            }
            s.relay_mut().take_ready(now)
        };
        if let Some(threshold) = stall_threshold {
            note_stall(index, &health, "relay", busy.held(), threshold);
        }
        if !ready.suppressed.is_empty() {
            let results = ready
                .suppressed
                .into_iter()
                .map(|(key, send)| DispatchResult { key, send, outcome: DispatchOutcome::Delivered })
                .collect();
            if control.send_async(Control::Dispatched(results)).await.is_err() {
                return;
            }
        }
        let caller = shell.borrow().caller().cloned();
        let items = match caller {
            Some(caller) => {
                // Calls this shard makes itself run here; the rest go to the bridge.
                let (local, bridged): (Vec<_>, Vec<_>) = ready.dispatch.into_iter().partition(|d| caller.runs(&d.item));
                for Dispatch { key, send, item } in local {
                    let call = caller.call(item);
                    let control = control.clone();
                    glommio::spawn_local(async move {
                        let outcome = call.await;
                        let _ =
                            control.send_async(Control::Dispatched(vec![DispatchResult { key, send, outcome }])).await;
                    })
                    .detach();
                }
                bridged
            }
            None => ready.dispatch,
        };
        if !items.is_empty() {
            let started = Instant::now();
            if dispatch.send_async(DispatchRequest { shard: index, items }).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_shrink_to_the_time_budget_when_work_is_slow() {
        let budget = Duration::from_millis(20);
        assert_eq!(batch_size(4_096, budget, 0.0), 4_096, "no measurement yet: take what is there");
        assert_eq!(batch_size(4_096, budget, 2_000.0), 4_096, "10k fit the budget: capped");
        assert_eq!(batch_size(4_096, budget, 100_000.0), 200);
        assert_eq!(batch_size(4_096, budget, 10_000_000.0), 64, "never below the floor");
        assert_eq!(batch_size(10, budget, 10_000_000.0), 10);
    }

    /// Spins on the calling thread for `wall` of wall-clock time.
    fn spin(wall: Duration) {
        let until = Instant::now() + wall;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    fn pin_to(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
        }
    }

    #[test]
    fn blocking_counts_as_holding_the_thread() {
        let held = Held::start(true);
        std::thread::sleep(Duration::from_millis(40));
        assert!(held.held() >= Duration::from_millis(40), "a blocked shard holds its thread: {:?}", held.held());
    }

    #[test]
    fn time_preempted_by_another_thread_does_not_count_as_holding() {
        assert!(run_queue_ns().is_some(), "this kernel reports run-queue time");
        // Two spinning threads on one CPU: each runs about half the wall time and waits
        // on the run queue for the rest.
        let cpu = 0;
        let rival = std::thread::spawn(move || {
            pin_to(cpu);
            spin(Duration::from_millis(400));
        });
        let measured = std::thread::spawn(move || {
            pin_to(cpu);
            let held = Held::start(true);
            let wall = Instant::now();
            spin(Duration::from_millis(300));
            (held.held(), wall.elapsed())
        })
        .join()
        .expect("measuring thread");
        rival.join().expect("rival thread");
        let (held, wall) = measured;
        assert!(held < wall.mul_f64(0.8), "held {held:?} of {wall:?} wall while sharing its CPU");
        assert!(Held::start(false).queued_ns.is_none(), "no /proc read while stall detection is off");
    }

    #[test]
    fn the_dispatch_retry_policy_comes_from_the_relay_settings() {
        let mut cfg = ShardConfig::default();
        cfg.relay.max_attempts = Some(7);
        cfg.relay.retry.backoff_ms = 11;
        cfg.relay.retry.max_backoff_ms = 13;
        cfg.core.cache_capacity = 5;
        let core = core_config(&cfg);
        assert_eq!(core.dispatch_attempts, Some(7));
        assert_eq!((core.dispatch_retry.backoff_ms, core.dispatch_retry.max_backoff_ms), (11, 13));
        assert_eq!(core.cache_capacity, 5);
    }
}
