//! The functional core of a shard: a synchronous function of (store, work, now) that
//! decides and records. It stages writes into one [`Batch`] and the intents that must wait
//! for the commit (answers, relay hints) as [`After`] actions. It never awaits, never reads
//! a clock (time is passed in), never sends on a channel. The shell in [`crate::shard`]
//! commits the batch and then calls [`ShardCore::after_commit`], or
//! [`ShardCore::rollback`] when the commit failed, after which the same work runs again.
//!
//! Owned by its shard's thread (`Rc`, `RefCell`, rhai values: nothing here is `Send`).
//!
//! Files: [`apply`] saga transitions, blocked keys and quarantine; [`effects`] the effect
//! gate; [`outbox`] dispatch results; [`timers`] durable timers and retention; [`admin`]
//! queries, requeue, discard and replay.

mod admin;
mod apply;

pub use apply::event_dynamic;
pub use timers::subject_token;
mod effects;
mod outbox;
mod timers;

#[cfg(test)]
mod tests;

use crate::keys::{DeadLetterKey, EffectKey, OutboxKey, SagaKey, ScheduleKey};
use crate::manifest::ManifestSet;
use crate::message::{
    AdminOp, ApplyOutcome, DispatchResult, Event, GateDecision, Query, QueryAnswer, RawLetter, Reply, Request, Target,
};
use crate::program::Programs;
use crate::record::{EffectRecord, OutboxItem, SagaRecord};
use crate::relay::RelayState;
use crate::routing::Router;
use crate::store::{Batch, Store, StoreError};
use ahash::{AHashMap, AHashSet};
use rhai::Dynamic;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

/// Core settings (already validated).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Parsed instances kept in memory per shard. Default 10,000.
    pub cache_capacity: usize,
    /// Timers fired per batch at most. Default 1,000.
    pub timer_batch: usize,
    /// Completed and failed instances are removed this long after they finished; `None`
    /// keeps them. Default 7 days.
    pub retention_ms: Option<u64>,
    /// Instances examined per retention sweep. Default 1,000.
    pub retention_sweep: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            cache_capacity: 10_000,
            timer_batch: 1_000,
            retention_ms: Some(7 * 24 * 3_600_000),
            retention_sweep: 1_000,
        }
    }
}

/// A one-shot answer shared by the copies of a work item (a failed commit runs the same
/// work again, so the answer must survive the first run).
pub(crate) type ReplyCell<T> = Rc<RefCell<Option<Reply<T>>>>;

fn cell<T>(r: Reply<T>) -> ReplyCell<T> {
    Rc::new(RefCell::new(Some(r)))
}

fn answer<T>(cell: &ReplyCell<T>, value: T) {
    if let Some(tx) = cell.borrow_mut().take() {
        // The asker may have gone (shutdown, timeout): nothing to do then.
        let _ = tx.send(value);
    }
}

/// One JetStream message waiting for all its targets on this shard.
#[derive(Debug)]
pub(crate) struct Delivery {
    reply: RefCell<Option<Reply<ApplyOutcome>>>,
    remaining: Cell<usize>,
    term: RefCell<Option<String>>,
}

/// Where an event to apply came from, which decides what settling it means.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A stream message: answer it.
    Delivery(Rc<Delivery>),
    /// A durable timer: delete its schedule entry in the same transaction.
    Timer(ScheduleKey),
    /// A requeued dead letter: delete it in the same transaction; passes the sequence gate.
    Requeue(DeadLetterKey),
    /// A timer fired on an operator's replay, at its place in the instance's history.
    ReplayTimer(ScheduleKey),
}

impl Origin {
    /// The schedule entry, for timer origins.
    fn timer(&self) -> Option<&ScheduleKey> {
        match self {
            Origin::Timer(k) | Origin::ReplayTimer(k) => Some(k),
            _ => None,
        }
    }
}

/// One event for one saga instance.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    event: Arc<Event>,
    target: Target,
    origin: Origin,
}

impl Pending {
    fn key(&self) -> SagaKey {
        SagaKey::new(self.event.tenant.clone(), self.target.saga.clone(), self.target.correlation_id.clone())
    }
}

/// Work for one batch (a request after intake; cloneable so a failed commit can redo it).
#[derive(Debug, Clone)]
pub(crate) enum Work {
    Apply(Pending),
    EffectBegin {
        key: EffectKey,
        msg_seq: u64,
        reply: ReplyCell<GateDecision>,
    },
    EffectFinish {
        key: EffectKey,
        attempts: u32,
        subject: String,
        outcome: String,
        result: Rc<Vec<u8>>,
        reply: ReplyCell<Result<(), String>>,
    },
    EffectRelease {
        key: EffectKey,
    },
    Quarantine {
        letter: Rc<RawLetter>,
        reply: ReplyCell<Result<(), String>>,
    },
    Dispatched(DispatchResult),
    Admin {
        op: AdminOp,
        reply: ReplyCell<Result<serde_json::Value, String>>,
    },
}

/// A key whose head event failed and waits for its retry; later events of the key queue
/// behind it (invariant 7).
#[derive(Debug, Clone)]
pub(crate) struct Blocked {
    head: Pending,
    attempts: u32,
    retry_at: u64,
    queue: VecDeque<Pending>,
    error: String,
}

/// An instance as the core works on it: metadata plus the program's state value.
pub(crate) type Instance = SagaRecord<Dynamic>;

/// In-memory changes to undo when a commit fails (applied in reverse).
#[derive(Debug)]
enum Undo {
    Blocked(SagaKey, Option<Box<Blocked>>),
    InFlight(EffectKey, Option<u64>),
    HeldTimer(ScheduleKey, bool),
}

/// Intents that wait for the commit.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum After {
    Resolved { delivery: Rc<Delivery>, term: Option<String> },
    Gate(ReplyCell<GateDecision>, GateDecision),
    Done(ReplyCell<Result<(), String>>, Result<(), String>),
    Admin(ReplyCell<Result<serde_json::Value, String>>, Result<serde_json::Value, String>),
    RelayDelivered(OutboxKey),
    RelayRetry(OutboxKey, OutboxItem),
}

/// Counters of one batch (the shell turns them into metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    pub events: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub skipped: u64,
    pub failures: u64,
    pub quarantined: u64,
    pub parked: u64,
    pub timers_fired: u64,
    pub timers_dropped: u64,
    pub outbox_written: u64,
    pub outbox_deleted: u64,
    pub deadletters: u64,
    pub effects_started: u64,
    pub effects_completed: u64,
    /// Program time in this batch, nanoseconds.
    pub program_ns: u64,
}

/// Everything one batch staged.
pub struct Staged {
    pub batch: Batch,
    instances: AHashMap<SagaKey, Instance>,
    effects: AHashMap<EffectKey, EffectRecord>,
    after: Vec<After>,
    undo: Vec<Undo>,
    redo: Vec<Work>,
    new_outbox: Vec<(OutboxKey, OutboxItem)>,
    pub stats: BatchStats,
    /// The batch touched the schedule table (the next due time must be recomputed).
    schedules_changed: bool,
}

impl Staged {
    fn new() -> Self {
        Self {
            batch: Batch::new(),
            instances: AHashMap::new(),
            effects: AHashMap::new(),
            after: Vec::new(),
            undo: Vec::new(),
            redo: Vec::new(),
            new_outbox: Vec::new(),
            stats: BatchStats::default(),
            schedules_changed: false,
        }
    }

    /// Whether the batch holds anything to commit or answer.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.after.is_empty() && self.instances.is_empty()
    }
}

/// Errors that abort a whole batch (it is rolled back and run again later).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One shard's saga executor, effect gate, outbox bookkeeping and scheduler state.
pub struct ShardCore {
    shard: usize,
    router: Router,
    cfg: CoreConfig,
    store: Store,
    manifests: Arc<ManifestSet>,
    programs: Programs,
    cache: AHashMap<SagaKey, Instance>,
    blocked: AHashMap<SagaKey, Blocked>,
    in_flight_effects: AHashMap<EffectKey, u64>,
    held_timers: AHashSet<ScheduleKey>,
    relay: Rc<RefCell<RelayState>>,
    next_due: Option<u64>,
    outbox_seq: u64,
    deadletter_at: u64,
    retention_cursor: Option<SagaKey>,
    next_sweep: u64,
    /// Work left over from a batch whose commit failed, run first next time.
    redo: VecDeque<Work>,
}

impl ShardCore {
    pub fn new(
        shard: usize,
        router: Router,
        cfg: CoreConfig,
        store: Store,
        manifests: Arc<ManifestSet>,
        relay: Rc<RefCell<RelayState>>,
    ) -> Result<Self, String> {
        let programs = Programs::build(&manifests)?;
        let (outbox_seq, next_due) = {
            let view = store.read().map_err(|e| e.to_string())?;
            (view.max_outbox_seq().map_err(|e| e.to_string())?, view.next_due().map_err(|e| e.to_string())?)
        };
        Ok(Self {
            shard,
            router,
            cfg,
            store,
            manifests,
            programs,
            cache: AHashMap::new(),
            blocked: AHashMap::new(),
            in_flight_effects: AHashMap::new(),
            held_timers: AHashSet::new(),
            relay,
            next_due,
            outbox_seq,
            deadletter_at: 0,
            retention_cursor: None,
            next_sweep: 0,
            redo: VecDeque::new(),
        })
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn relay(&self) -> &Rc<RefCell<RelayState>> {
        &self.relay
    }

    /// Keys waiting for a retry.
    pub fn blocked_keys(&self) -> usize {
        self.blocked.len()
    }

    /// When the core wants to run again without new input: the earliest timer or retry.
    pub fn next_wake(&self) -> Option<u64> {
        let retry = self.blocked.values().map(|b| b.retry_at).min();
        match (self.next_due, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Queues work to run first in the next batch (a request taken while backing off).
    pub(crate) fn push_redo(&mut self, work: Vec<Work>) {
        self.redo.extend(work);
    }

    /// Whether work is left over from a failed commit.
    pub fn has_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Swaps the manifests (between batches). Compiles first; a failure changes nothing.
    pub fn reload(&mut self, set: Arc<ManifestSet>) -> Result<(), String> {
        let programs = Programs::build(&set)?;
        self.programs = programs;
        self.manifests = set;
        Ok(())
    }

    /// Answers a read-only question from the store.
    pub fn query(&self, q: &Query) -> QueryAnswer {
        admin::query(self, q)
    }

    /// Turns requests into work (queries are answered at once, reloads by the shell).
    pub(crate) fn intake(&mut self, req: Request, into: &mut Vec<Work>) -> Option<Request> {
        match req {
            Request::Apply { event, targets, reply } => {
                let delivery = Rc::new(Delivery {
                    reply: RefCell::new(Some(reply)),
                    remaining: Cell::new(targets.len()),
                    term: RefCell::new(None),
                });
                if targets.is_empty() {
                    answer_delivery(&delivery, ApplyOutcome::Ack);
                }
                for target in targets {
                    into.push(Work::Apply(Pending {
                        event: event.clone(),
                        target,
                        origin: Origin::Delivery(delivery.clone()),
                    }));
                }
                None
            }
            Request::EffectBegin { key, msg_seq, reply } => {
                into.push(Work::EffectBegin { key, msg_seq, reply: cell(reply) });
                None
            }
            Request::EffectFinish { key, attempts, subject, outcome, result, reply } => {
                into.push(Work::EffectFinish {
                    key,
                    attempts,
                    subject,
                    outcome,
                    result: Rc::new(result),
                    reply: cell(reply),
                });
                None
            }
            Request::EffectRelease { key } => {
                into.push(Work::EffectRelease { key });
                None
            }
            Request::Quarantine { letter, reply } => {
                into.push(Work::Quarantine { letter: Rc::new(letter), reply: cell(reply) });
                None
            }
            Request::Admin { op, reply } => {
                into.push(Work::Admin { op, reply: cell(reply) });
                None
            }
            Request::Query { query, reply } => {
                let _ = reply.send(self.query(&query));
                None
            }
            other @ Request::Reload { .. } => Some(other),
        }
    }

    /// Runs one batch: leftover work first, then `work`, due retries and due timers.
    /// On `Err` the staged batch must be passed to [`Self::rollback`], not committed.
    pub(crate) fn run_batch(&mut self, work: Vec<Work>, now: u64) -> (Staged, Result<(), CoreError>) {
        let mut st = Staged::new();
        let all: Vec<Work> = if self.redo.is_empty() {
            work
        } else {
            let mut all: Vec<Work> = self.redo.drain(..).collect();
            all.extend(work);
            all
        };
        let result = (|| -> Result<(), CoreError> {
            for w in &all {
                self.process(&mut st, w, now)?;
            }
            apply::retry_due(self, &mut st, now)?;
            timers::fire_due(self, &mut st, now)?;
            timers::sweep_retention(self, &mut st, now)?;
            self.finish(&mut st);
            Ok(())
        })();
        // Kept (not copied) for a redo if the commit fails.
        st.redo = all;
        (st, result)
    }

    fn process(&mut self, st: &mut Staged, work: &Work, now: u64) -> Result<(), CoreError> {
        match work {
            Work::Apply(p) => {
                st.stats.events += 1;
                apply::route(self, st, p, now)
            }
            Work::EffectBegin { key, msg_seq, reply } => {
                effects::begin(self, st, key.clone(), *msg_seq, reply.clone(), now)
            }
            Work::EffectFinish { key, attempts, subject, outcome, result, reply } => {
                effects::finish(self, st, key.clone(), *attempts, subject, outcome, result, reply.clone(), now);
                Ok(())
            }
            Work::EffectRelease { key } => {
                effects::release(self, st, key.clone());
                Ok(())
            }
            Work::Quarantine { letter, reply } => {
                apply::quarantine_raw(self, st, letter, now);
                st.after.push(After::Done(reply.clone(), Ok(())));
                Ok(())
            }
            Work::Dispatched(r) => {
                outbox::dispatched(self, st, r, now);
                Ok(())
            }
            Work::Admin { op, reply } => admin::run(self, st, op.clone(), reply.clone(), now),
        }
    }

    /// Writes the staged instances into the batch (once each, however many events).
    fn finish(&mut self, st: &mut Staged) {
        for (key, inst) in &st.instances {
            match serde_json::to_vec(inst) {
                Ok(bytes) => st.batch.put_saga_encoded(key, bytes),
                Err(e) => {
                    // A state the program built always serialises (rhai values are JSON-like);
                    // if not, keep the old record rather than write garbage.
                    tracing::error!(shard = self.shard, saga = %key.saga, tenant = %key.tenant, correlation_id = %key.correlation_id, error = %e, "cannot serialise saga state");
                }
            }
        }
    }

    /// The batch is durable: answer, hand new outbox items to the relay, keep the states.
    pub(crate) fn after_commit(&mut self, st: Staged, now: u64) {
        {
            let mut relay = self.relay.borrow_mut();
            for (key, item) in st.new_outbox {
                relay.offer(key, item, now);
            }
        }
        for a in st.after {
            match a {
                After::Resolved { delivery, term } => {
                    if let Some(t) = term {
                        *delivery.term.borrow_mut() = Some(t);
                    }
                    let left = delivery.remaining.get().saturating_sub(1);
                    delivery.remaining.set(left);
                    if left == 0 {
                        let outcome = match delivery.term.borrow_mut().take() {
                            Some(reason) => ApplyOutcome::Term { reason },
                            None => ApplyOutcome::Ack,
                        };
                        answer_delivery(&delivery, outcome);
                    }
                }
                After::Gate(c, d) => answer(&c, d),
                After::Done(c, r) => answer(&c, r),
                After::Admin(c, r) => answer(&c, r),
                After::RelayDelivered(k) => self.relay.borrow_mut().delivered(k),
                After::RelayRetry(k, item) => self.relay.borrow_mut().retry_later(k, item),
            }
        }
        if self.cache.len() + st.instances.len() > self.cfg.cache_capacity {
            self.cache.clear();
        }
        self.cache.extend(st.instances);
        if st.schedules_changed {
            timers::recompute_next_due(self);
        }
    }

    /// The commit failed: undo in-memory changes and keep the work to run again.
    pub(crate) fn rollback(&mut self, st: Staged) {
        for u in st.undo.into_iter().rev() {
            match u {
                Undo::Blocked(k, Some(b)) => {
                    self.blocked.insert(k, *b);
                }
                Undo::Blocked(k, None) => {
                    self.blocked.remove(&k);
                }
                Undo::InFlight(k, Some(s)) => {
                    self.in_flight_effects.insert(k, s);
                }
                Undo::InFlight(k, None) => {
                    self.in_flight_effects.remove(&k);
                }
                Undo::HeldTimer(k, true) => {
                    self.held_timers.insert(k);
                }
                Undo::HeldTimer(k, false) => {
                    self.held_timers.remove(&k);
                }
            }
        }
        // States staged by the failed batch were never cached; the cache may still hold
        // states the failed batch read and then replaced in `instances` only.
        self.redo = st.redo.into();
        self.relay.borrow_mut().request_scan();
    }

    /// Answers every waiting delivery with a NAK (shutdown): they will be redelivered.
    pub(crate) fn abandon_waiting(&mut self) {
        let blocked: Vec<Blocked> = self.blocked.drain().map(|(_, b)| b).collect();
        for b in blocked {
            for p in std::iter::once(b.head).chain(b.queue) {
                if let Origin::Delivery(d) = p.origin {
                    answer_delivery(&d, ApplyOutcome::Nak { delay_ms: 1_000 });
                }
            }
        }
        for w in self.redo.drain(..) {
            if let Work::Apply(Pending { origin: Origin::Delivery(d), .. }) = w {
                answer_delivery(&d, ApplyOutcome::Nak { delay_ms: 1_000 });
            }
        }
    }

    // --- helpers shared by the submodules ---

    fn set_blocked(&mut self, st: &mut Staged, key: SagaKey, value: Option<Blocked>) {
        let old = match value {
            Some(b) => self.blocked.insert(key.clone(), b),
            None => self.blocked.remove(&key),
        };
        st.undo.push(Undo::Blocked(key, old.map(Box::new)));
    }

    fn take_blocked(&mut self, st: &mut Staged, key: &SagaKey) -> Option<Blocked> {
        // Nothing blocked is the common case: no hashing of the key then.
        if self.blocked.is_empty() {
            return None;
        }
        let old = self.blocked.remove(key);
        if let Some(b) = &old {
            st.undo.push(Undo::Blocked(key.clone(), Some(Box::new(b.clone()))));
        }
        old
    }

    fn set_in_flight(&mut self, st: &mut Staged, key: EffectKey, seq: Option<u64>) {
        let old = match seq {
            Some(s) => self.in_flight_effects.insert(key.clone(), s),
            None => self.in_flight_effects.remove(&key),
        };
        st.undo.push(Undo::InFlight(key, old));
    }

    fn set_held_timer(&mut self, st: &mut Staged, key: ScheduleKey, held: bool) {
        let was = if held { !self.held_timers.insert(key.clone()) } else { self.held_timers.remove(&key) };
        st.undo.push(Undo::HeldTimer(key, was));
    }

    fn next_outbox_seq(&mut self, now: u64) -> u64 {
        self.outbox_seq = (self.outbox_seq + 1).max(now << 12);
        self.outbox_seq
    }

    /// Dead-letter times are strictly increasing per shard so that a key's letters list in
    /// the order they were written.
    fn next_deadletter_at(&mut self, now: u64) -> u64 {
        self.deadletter_at = (self.deadletter_at + 1).max(now);
        self.deadletter_at
    }

    /// Takes the instance as of this batch out of the staged set, the cache or the store.
    /// Give it back with [`Self::put_back`].
    fn take(&mut self, st: &mut Staged, key: &SagaKey) -> Result<Option<(Instance, Source)>, CoreError> {
        if let Some(i) = st.instances.remove(key) {
            return Ok(Some((i, Source::Staged)));
        }
        if let Some(i) = self.cache.remove(key) {
            return Ok(Some((i, Source::Clean)));
        }
        let view = self.store.read()?;
        let Some(raw) = view.saga_raw(key)? else { return Ok(None) };
        let inst: Instance = serde_json::from_slice(raw).map_err(|e| {
            CoreError::Store(StoreError::Corrupt {
                shard: self.shard,
                path: self.store.path().to_owned(),
                db: "sagas",
                why: format!("{key}: {e}"),
            })
        })?;
        Ok(Some((inst, Source::Clean)))
    }

    /// Returns an instance taken with [`Self::take`]; `changed` stages it for writing.
    fn put_back(&mut self, st: &mut Staged, key: SagaKey, inst: Instance, source: Source, changed: bool) {
        if changed || source == Source::Staged {
            st.instances.insert(key, inst);
        } else {
            self.cache.insert(key, inst);
        }
    }
}

/// Where [`ShardCore::take`] found an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Changed earlier in this batch.
    Staged,
    /// As committed.
    Clean,
}

fn answer_delivery(d: &Delivery, outcome: ApplyOutcome) {
    if let Some(tx) = d.reply.borrow_mut().take() {
        let _ = tx.send(outcome);
    }
}
