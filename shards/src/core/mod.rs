//! The functional core of a shard: it decides, it never acts. [`ShardCore::run_batch`] is a
//! function of (committed state, work, now) that returns a [`Staged`] value — the LMDB
//! [`Batch`] to commit, an [`Overlay`] of the in-memory changes the batch makes (cached
//! instances, blocked keys, effects in flight, held timers) and the [`Action`]s to carry out
//! once the batch is durable (settle a message, answer a request, hand an outbox item to the
//! relay). It takes `&self`: it cannot change the shard's state in place, reads no clock
//! (time is passed in), sends on no channel and awaits nothing.
//!
//! The shell ([`crate::shell`]) commits the batch, then [`ShardCore::adopt`]s the overlay and
//! carries out the actions. A failed commit drops the `Staged` value and runs the same work
//! again: there is nothing to undo.
//!
//! ```text
//!   work ──run_batch(&self)──> Staged { batch, overlay, actions }
//!                                 │ commit ok            │ commit failed
//!                                 v                      v
//!                  adopt(overlay); carry out actions    drop; run the same work again
//! ```
//!
//! Owned by its shard's thread (`Rc`, rhai values: nothing here is `Send`).
//!
//! Files: [`action`] what the core asks for; [`apply`] saga transitions, blocked keys and
//! quarantine; [`effects`] the effect gate; [`outbox`] dispatch results; [`timers`] durable
//! timers and retention; [`admin`] requeue, re-send and discard; [`replay`] an operator's
//! controlled replay; [`query`] read-only answers.

mod action;
mod admin;
mod apply;
mod effects;
mod outbox;
mod query;
mod replay;
mod timers;

#[cfg(test)]
mod tests;

pub use action::{Action, RequestId};
pub use apply::{event_dynamic, json_dynamic};
pub use query::deadletter_order;
pub use timers::subject_token;

use crate::keys::{EffectKey, OutboxKey, SagaKey, ScheduleKey};
use crate::manifest::{ManifestSet, RetrySpec};
use crate::message::{AdminOp, DispatchOutcome, Event, RawLetter, ShardError, Target};
use crate::program::Programs;
use crate::record::{EffectRecord, OutboxItem, SagaRecord};
use crate::routing::Router;
use crate::store::{Batch, Store, StoreError};
use ahash::{AHashMap, AHashSet};
use rhai::Dynamic;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;

/// Core settings (already validated).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Parsed instances kept in memory per shard (least recently used go first). Default
    /// 10,000.
    pub cache_capacity: usize,
    /// Timers fired per batch at most. Default 1,000.
    pub timer_batch: usize,
    /// Completed and failed instances are removed this long after they finished; `None`
    /// keeps them. Default 7 days.
    pub retention_ms: Option<u64>,
    /// Instances examined per retention sweep. Default 1,000.
    pub retention_sweep: usize,
    /// Completed effect-gate records are removed this long after they completed; `None`
    /// keeps them. Must outlast every way a command can be delivered again (the streams'
    /// `Nats-Msg-Id` dedupe window, redeliveries, re-sends): past it a command runs again.
    /// Default 7 days.
    pub effect_retention_ms: Option<u64>,
    /// Effect-gate records examined per slice of the prune (one slice per batch at most).
    /// Default 1,000.
    pub effect_sweep: usize,
    /// Backoff between failed dispatches of an outbox item. The shell sets it from the
    /// relay's settings (`RelayConfig::retry`).
    pub dispatch_retry: RetrySpec,
    /// Failed dispatches after which an item becomes a dead letter (`None`: no limit). The
    /// shell sets it from the relay's settings (`RelayConfig::max_attempts`).
    pub dispatch_attempts: Option<u32>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        let relay = crate::relay::RelayConfig::default();
        Self {
            cache_capacity: 10_000,
            timer_batch: 1_000,
            retention_ms: Some(7 * 24 * 3_600_000),
            retention_sweep: 1_000,
            effect_retention_ms: Some(7 * 24 * 3_600_000),
            effect_sweep: 1_000,
            dispatch_retry: relay.retry,
            dispatch_attempts: relay.max_attempts,
        }
    }
}

/// Where an event to apply came from, which decides what settling it means.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A stream message: settle it (ack or term) once the batch is durable.
    Delivery(RequestId),
    /// A stream message the process died with in flight `crashes` times (issue 17 item
    /// 16): settled like [`Origin::Delivery`], but never run; where it would run it is
    /// quarantined as a poison event of its key (the key's `on_poison` policy applies).
    Crashed { request: RequestId, crashes: u32 },
    /// A durable timer: delete its schedule entry in the same transaction.
    Timer(ScheduleKey),
    /// A requeued dead letter: delete it in the same transaction; passes the sequence gate.
    Requeue(crate::keys::DeadLetterKey),
    /// A timer fired on an operator's replay, at its place in the instance's history.
    ReplayTimer(ScheduleKey),
    /// A stream event applied again by an operator's replay, read back by its sequence.
    Replayed,
    /// The result of an effect run in place (outbox item `key`): settling it deletes the
    /// item and records the call for the streams.
    Ran { key: OutboxKey, audit: Box<outbox::RanAudit> },
    /// A recorded in-place result applied again by an operator's replay.
    Recorded,
}

impl Origin {
    /// The schedule entry, for timer origins.
    fn timer(&self) -> Option<&ScheduleKey> {
        match self {
            Origin::Timer(k) | Origin::ReplayTimer(k) => Some(k),
            _ => None,
        }
    }

    /// A step of an operator's replay: the instance applied this event before its reset,
    /// and the work it produced then was dispatched then (or is still in the outbox), so the
    /// work it produces now is not dispatched again.
    fn replayed(&self) -> bool {
        matches!(self, Origin::Replayed | Origin::ReplayTimer(_) | Origin::Recorded)
    }
}

/// One event for one saga instance.
#[derive(Debug, Clone)]
pub struct Pending {
    pub event: Arc<Event>,
    pub target: Target,
    pub origin: Origin,
}

impl Pending {
    fn key(&self) -> SagaKey {
        SagaKey::new(self.event.tenant.clone(), self.target.saga.clone(), self.target.correlation_id.clone())
    }
}

/// One unit of work for a batch. The shell keeps the work of a batch until it is durable: a
/// failed commit runs the same slice again.
#[derive(Debug, Clone)]
pub enum Work {
    Apply(Pending),
    EffectBegin {
        request: RequestId,
        key: EffectKey,
        msg_seq: u64,
    },
    EffectFinish {
        request: RequestId,
        key: EffectKey,
        attempts: u32,
        subject: String,
        outcome: String,
        result: Vec<u8>,
    },
    EffectRelease {
        key: EffectKey,
    },
    Quarantine {
        request: RequestId,
        letter: RawLetter,
    },
    /// A dispatch result; `item` is the dispatched item as the relay holds it (failed
    /// outcomes re-store or dead-letter it), `None` when the relay no longer tracks it.
    Dispatched {
        key: OutboxKey,
        outcome: DispatchOutcome,
        item: Option<OutboxItem>,
    },
    Admin {
        request: RequestId,
        op: AdminOp,
    },
}

/// A key whose events wait, in order (invariant 7): its head event failed and waits for its
/// retry, or an operator's replay is re-applying its history (timers of the key are held,
/// not queued: the replay fires those of its history at their place, the rest fire after).
#[derive(Debug, Clone)]
pub(crate) struct Blocked {
    /// The failed event and its retry; `None` while a replay holds the key.
    retry: Option<Retry>,
    queue: VecDeque<Pending>,
}

/// The head event of a blocked key and its next attempt.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    head: Pending,
    attempts: u32,
    retry_at: u64,
    error: String,
}

impl Blocked {
    /// A key held by a replay.
    fn replay() -> Self {
        Self { retry: None, queue: VecDeque::new() }
    }
}

/// An instance as the core works on it: metadata plus the program's state value.
pub(crate) type Instance = SagaRecord<Dynamic>;

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
    /// Completed effect-gate records deleted past their retention.
    pub effects_pruned: u64,
    /// Program time in this batch, nanoseconds.
    pub program_ns: u64,
    /// Lateness of the timers fired in this batch (`now − due_at`), milliseconds.
    pub timer_lag_ms_sum: u64,
    pub timer_lag_ms_max: u64,
}

/// The in-memory changes one batch makes, adopted by the core once the batch is durable.
/// Read through the core's lookups, so later work of the same batch sees earlier work's
/// changes. Every map holds the batch's last word per key.
#[derive(Debug, Default)]
pub struct Overlay {
    /// Instances changed in this batch (written into the batch by `finish`).
    instances: AHashMap<SagaKey, Instance>,
    /// Instances read from the store unchanged (cached on adoption).
    loaded: AHashMap<SagaKey, Rc<Instance>>,
    /// Instances deleted by the retention sweep.
    removed: Vec<SagaKey>,
    /// `Some`: the key is blocked this way; `None`: it is no longer blocked.
    blocked: AHashMap<SagaKey, Option<Blocked>>,
    /// Effect runs in flight in this process (`Some(message sequence)`) or ended (`None`).
    in_flight: AHashMap<EffectKey, Option<u64>>,
    /// Timers held behind a blocked key or a replay (`true`) or released (`false`).
    held: AHashMap<ScheduleKey, bool>,
    /// Effect records written in this batch (read back by later work of the batch).
    effects: AHashMap<EffectKey, EffectRecord>,
    /// Dead letters of saga keys written in this batch (a requeue later in the batch reads
    /// them with the committed ones).
    letters: Vec<(crate::keys::DeadLetterKey, crate::record::DeadLetter)>,
    /// Replay records written (`Some`) or deleted (`None`) in this batch.
    replays: AHashMap<SagaKey, Option<crate::record::ReplayMark>>,
    outbox_seq: u64,
    deadletter_at: u64,
    /// The retention sweep ran: where the next one starts and when.
    retention: Option<(Option<SagaKey>, u64)>,
    /// A slice of the effect prune ran: where the next one starts and when.
    effect_prune: Option<(Option<EffectKey>, u64)>,
    /// The schedule table changed (the next due time is recomputed on adoption).
    schedules_changed: bool,
}

/// What one batch decided: the writes, the in-memory changes and the actions.
pub struct Staged {
    pub batch: Batch,
    pub overlay: Overlay,
    pub actions: Vec<Action>,
    pub stats: BatchStats,
}

impl Staged {
    /// Whether the batch holds anything to commit or carry out.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.actions.is_empty()
    }
}

/// Errors that abort a whole batch (nothing of it is kept; the same work runs again later),
/// and one that belongs to a single key.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored instance cannot be decoded (a state nested deeper than serde_json reads,
    /// written by a version without output limits, or a damaged record). It belongs to its
    /// key: the event that needed it is quarantined (invariant 12), an operator action on
    /// the key is refused.
    #[error("shard {shard}: the stored instance {key} cannot be read: {why}")]
    Unreadable { shard: usize, key: SagaKey, why: String },
}

/// One shard's saga executor, effect gate, outbox bookkeeping and scheduler state.
/// Owned by the shard's shell; changed only by [`ShardCore::adopt`] and [`ShardCore::reload`]
/// (the instance cache aside: a batch borrows cached instances, see [`ShardCore::instance`]).
pub struct ShardCore {
    shard: usize,
    router: Router,
    cfg: CoreConfig,
    store: Store,
    manifests: Arc<ManifestSet>,
    programs: Programs,
    /// Committed instances, most recently used first. `None`: a batch has taken the
    /// instance (it comes back on adoption); to everyone else that is a miss.
    cache: RefCell<lru::LruCache<SagaKey, Option<Rc<Instance>>, ahash::RandomState>>,
    blocked: AHashMap<SagaKey, Blocked>,
    in_flight_effects: AHashMap<EffectKey, u64>,
    held_timers: AHashSet<ScheduleKey>,
    next_due: Option<u64>,
    outbox_seq: u64,
    deadletter_at: u64,
    retention_cursor: Option<SagaKey>,
    next_sweep: u64,
    effect_cursor: Option<EffectKey>,
    next_effect_prune: u64,
}

impl ShardCore {
    pub fn new(
        shard: usize,
        router: Router,
        cfg: CoreConfig,
        store: Store,
        manifests: Arc<ManifestSet>,
    ) -> Result<Self, ShardError> {
        let programs = Programs::build(&manifests)?;
        let (outbox_seq, next_due, deadletter_at, replaying) = {
            let view = store.read()?;
            // A replay killed after its first step holds its key again until it is resumed.
            let replaying: AHashMap<SagaKey, Blocked> = view
                .replays(None, usize::MAX)?
                .into_iter()
                .filter(|(_, mark)| mark.plan.is_some())
                .map(|(key, _)| (key, Blocked::replay()))
                .collect();
            (view.max_outbox_seq()?, view.next_due()?, view.deadletter_clock()?, replaying)
        };
        let capacity = NonZeroUsize::new(cfg.cache_capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            shard,
            router,
            cfg,
            store,
            manifests,
            programs,
            cache: RefCell::new(lru::LruCache::with_hasher(capacity, ahash::RandomState::new())),
            blocked: replaying,
            in_flight_effects: AHashMap::new(),
            held_timers: AHashSet::new(),
            next_due,
            outbox_seq,
            deadletter_at,
            retention_cursor: None,
            next_sweep: 0,
            effect_cursor: None,
            next_effect_prune: 0,
        })
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Keys waiting for a retry.
    pub fn blocked_keys(&self) -> usize {
        self.blocked.len()
    }

    /// Effect runs in flight in this process.
    pub fn effects_in_flight(&self) -> usize {
        self.in_flight_effects.len()
    }

    /// The highest outbox sequence given out so far.
    pub fn outbox_seq(&self) -> u64 {
        self.outbox_seq
    }

    /// Due time of the earliest timer not held.
    pub fn next_due(&self) -> Option<u64> {
        self.next_due
    }

    /// The earliest retry of a blocked key.
    pub fn next_retry(&self) -> Option<u64> {
        self.blocked.values().filter_map(|b| b.retry.as_ref().map(|r| r.retry_at)).min()
    }

    /// When the core wants to run again without new input: the earliest timer or retry.
    pub fn next_wake(&self) -> Option<u64> {
        match (self.next_due, self.next_retry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Swaps the manifests (between batches). Compiles first; a failure changes nothing.
    pub fn reload(&mut self, set: Arc<ManifestSet>) -> Result<(), ShardError> {
        let programs = Programs::build(&set)?;
        self.programs = programs;
        self.manifests = set;
        Ok(())
    }

    /// Runs one batch: `work`, then due retries, due timers, the retention sweep and a slice
    /// of the effect prune.
    pub fn run_batch(&self, work: &[Work], now: u64) -> Result<Staged, CoreError> {
        self.run_batch_with(work, now, now)
    }

    /// [`Self::run_batch`] with timers due up to `timers_until` (≤ `now`: the streams'
    /// watermark) firing, not those due up to `now`.
    pub fn run_batch_with(&self, work: &[Work], now: u64, timers_until: u64) -> Result<Staged, CoreError> {
        let mut st = Staged {
            batch: Batch::new(),
            overlay: Overlay { outbox_seq: self.outbox_seq, deadletter_at: self.deadletter_at, ..Overlay::default() },
            actions: Vec::new(),
            stats: BatchStats::default(),
        };
        for w in work {
            self.process(&mut st, w, now)?;
        }
        apply::retry_due(self, &mut st, now)?;
        timers::fire_due(self, &mut st, timers_until.min(now), now)?;
        timers::sweep_retention(self, &mut st, now)?;
        effects::prune(self, &mut st, now)?;
        self.finish(&mut st);
        Ok(st)
    }

    fn process(&self, st: &mut Staged, work: &Work, now: u64) -> Result<(), CoreError> {
        match work {
            Work::Apply(p) => {
                st.stats.events += 1;
                apply::route(self, st, p, now)
            }
            Work::EffectBegin { request, key, msg_seq } => effects::begin(self, st, *request, key, *msg_seq, now),
            Work::EffectFinish { request, key, attempts, subject, outcome, result } => {
                effects::finish(st, *request, key, *attempts, subject, outcome, result, now);
                Ok(())
            }
            Work::EffectRelease { key } => {
                effects::release(self, st, key);
                Ok(())
            }
            Work::Quarantine { request, letter } => {
                apply::quarantine_raw(self, st, letter, now);
                st.actions.push(Action::Done { request: *request, result: Ok(()) });
                Ok(())
            }
            Work::Dispatched { key, outcome, item } => outbox::dispatched(self, st, *key, outcome, item.as_ref(), now),
            Work::Admin { request, op } => admin::run(self, st, *request, op, now),
        }
    }

    /// Writes the changed instances into the batch (once each, however many events), and
    /// the dead-letter stamp if the batch gave any out.
    fn finish(&self, st: &mut Staged) {
        if st.overlay.deadletter_at > self.deadletter_at {
            st.batch.set_deadletter_clock(st.overlay.deadletter_at);
        }
        let mut failed = Vec::new();
        for (key, inst) in &st.overlay.instances {
            match serde_json::to_vec(inst) {
                Ok(bytes) => st.batch.put_saga_encoded(key, bytes),
                Err(e) => {
                    // A state the program built always serialises (rhai values are JSON-like);
                    // if not, keep the old record rather than write garbage.
                    tracing::error!(shard = self.shard, saga = %key.saga, tenant = %key.tenant, correlation_id = %key.correlation_id, error = %e, "cannot serialise saga state");
                    failed.push(key.clone());
                }
            }
        }
        for key in failed {
            st.overlay.instances.remove(&key);
        }
    }

    /// The batch is durable: its in-memory changes become the shard's state.
    pub fn adopt(&mut self, overlay: Overlay) {
        let Overlay {
            instances,
            loaded,
            removed,
            blocked,
            in_flight,
            held,
            effects: _,
            letters: _,
            replays: _,
            outbox_seq,
            deadletter_at,
            retention,
            effect_prune,
            schedules_changed,
        } = overlay;
        let cache = self.cache.get_mut();
        for (key, inst) in loaded {
            cache.put(key, Some(inst));
        }
        for (key, inst) in instances {
            cache.put(key, Some(Rc::new(inst)));
        }
        for key in removed {
            cache.pop(&key);
        }
        for (key, b) in blocked {
            match b {
                Some(b) => self.blocked.insert(key, b),
                None => self.blocked.remove(&key),
            };
        }
        for (key, seq) in in_flight {
            match seq {
                Some(s) => self.in_flight_effects.insert(key, s),
                None => self.in_flight_effects.remove(&key),
            };
        }
        for (key, h) in held {
            if h {
                self.held_timers.insert(key);
            } else {
                self.held_timers.remove(&key);
            }
        }
        self.outbox_seq = outbox_seq;
        self.deadletter_at = deadletter_at;
        if let Some((cursor, next)) = retention {
            self.retention_cursor = cursor;
            self.next_sweep = next;
        }
        if let Some((cursor, next)) = effect_prune {
            self.effect_cursor = cursor;
            self.next_effect_prune = next;
        }
        if schedules_changed {
            self.next_due = timers::next_due(self);
        }
    }

    /// Events waiting in blocked keys that came from stream messages (shutdown NAKs them).
    pub fn waiting_deliveries(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.blocked.values().flat_map(|b| b.retry.iter().map(|r| &r.head).chain(b.queue.iter())).filter_map(
            |p| match p.origin {
                Origin::Delivery(r) | Origin::Crashed { request: r, .. } => Some(r),
                _ => None,
            },
        )
    }

    // --- lookups and overlay writes shared by the submodules ---

    /// The key's blocked state as of this point of the batch. Nothing blocked is the
    /// common case: no hashing then.
    fn blocked(&self, st: &Staged, key: &SagaKey) -> Option<Blocked> {
        if self.blocked.is_empty() && st.overlay.blocked.is_empty() {
            return None;
        }
        match st.overlay.blocked.get(key) {
            Some(b) => b.clone(),
            None => self.blocked.get(key).cloned(),
        }
    }

    fn is_blocked(&self, st: &Staged, key: &SagaKey) -> bool {
        if self.blocked.is_empty() && st.overlay.blocked.is_empty() {
            return false;
        }
        match st.overlay.blocked.get(key) {
            Some(b) => b.is_some(),
            None => self.blocked.contains_key(key),
        }
    }

    fn set_blocked(&self, st: &mut Staged, key: SagaKey, value: Option<Blocked>) {
        st.overlay.blocked.insert(key, value);
    }

    /// Whether a replay holds the key, as of this point of the batch.
    fn is_replaying(&self, st: &Staged, key: &SagaKey) -> bool {
        self.blocked(st, key).is_some_and(|b| b.retry.is_none())
    }

    /// The replay recorded for `key`, as of this point of the batch.
    fn replay_mark(&self, st: &Staged, key: &SagaKey) -> Result<Option<crate::record::ReplayMark>, CoreError> {
        match st.overlay.replays.get(key) {
            Some(m) => Ok(m.clone()),
            None => Ok(self.store.read()?.replay(key)?),
        }
    }

    fn set_replay_mark(&self, st: &mut Staged, key: SagaKey, mark: Option<crate::record::ReplayMark>) {
        match &mark {
            Some(m) => st.batch.put_replay(&key, m),
            None => st.batch.delete_replay(&key),
        }
        st.overlay.replays.insert(key, mark);
    }

    /// Blocked keys whose retry is due, as of this point of the batch.
    fn due_retries(&self, st: &Staged, now: u64) -> Vec<SagaKey> {
        let mut due: Vec<SagaKey> = self
            .blocked
            .iter()
            .filter(|(k, b)| {
                b.retry.as_ref().is_some_and(|r| r.retry_at <= now) && !st.overlay.blocked.contains_key(*k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        due.extend(
            st.overlay
                .blocked
                .iter()
                .filter(|(_, b)| b.as_ref().and_then(|b| b.retry.as_ref()).is_some_and(|r| r.retry_at <= now))
                .map(|(k, _)| k.clone()),
        );
        due
    }

    fn in_flight(&self, st: &Staged, key: &EffectKey) -> Option<u64> {
        match st.overlay.in_flight.get(key) {
            Some(s) => *s,
            None => self.in_flight_effects.get(key).copied(),
        }
    }

    fn set_in_flight(&self, st: &mut Staged, key: EffectKey, seq: Option<u64>) {
        st.overlay.in_flight.insert(key, seq);
    }

    fn is_held(&self, st: &Staged, key: &ScheduleKey) -> bool {
        match st.overlay.held.get(key) {
            Some(h) => *h,
            None => self.held_timers.contains(key),
        }
    }

    fn set_held(&self, st: &mut Staged, key: ScheduleKey, held: bool) {
        if self.is_held(st, &key) != held {
            st.overlay.held.insert(key, held);
        }
    }

    /// Timers held, as of this point of the batch (an upper bound is enough).
    fn held_count(&self, st: &Staged) -> usize {
        self.held_timers.len() + st.overlay.held.values().filter(|h| **h).count()
    }

    fn next_outbox_seq(&self, st: &mut Staged, now: u64) -> u64 {
        st.overlay.outbox_seq = (st.overlay.outbox_seq + 1).max(now << 12);
        st.overlay.outbox_seq
    }

    /// Dead-letter stamps are strictly increasing per shard, also across restarts (the last
    /// one is stored with the letters), so that a key's letters keep the order it received
    /// them. A stamp is the time in ms unless a burst ran it ahead of the clock.
    fn next_deadletter_at(&self, st: &mut Staged, now: u64) -> u64 {
        st.overlay.deadletter_at = (st.overlay.deadletter_at + 1).max(now);
        st.overlay.deadletter_at
    }

    /// The instance as of this point of the batch: changed in it, taken by it from the cache,
    /// or read from the store (then kept in the overlay, so it is read once per batch).
    ///
    /// The batch takes a cached instance out of the cache rather than copy it (a saga's
    /// state is cloned nowhere on the hot path); adoption puts it back. A batch that is never
    /// adopted (its commit failed, or a test ran it only to look) leaves the key uncached,
    /// and the next batch reads the store, which holds exactly what the cache held: the cache
    /// only ever holds committed instances. So no decision depends on the cache.
    fn instance<'a>(&'a self, st: &'a mut Staged, key: &SagaKey) -> Result<Option<&'a Instance>, CoreError> {
        if !st.overlay.instances.contains_key(key) && !st.overlay.loaded.contains_key(key) {
            // The entry stays (no node freed and allocated again): only its value moves.
            let cached = self.cache.borrow_mut().peek_mut(key).and_then(Option::take);
            let inst = match cached {
                Some(rc) => rc,
                None => match self.read_instance(key)? {
                    Some(inst) => Rc::new(inst),
                    None => return Ok(None),
                },
            };
            st.overlay.loaded.insert(key.clone(), inst);
        }
        Ok(Self::peek(st, key))
    }

    /// The instance if the batch holds it.
    fn peek<'a>(st: &'a Staged, key: &SagaKey) -> Option<&'a Instance> {
        st.overlay.instances.get(key).or_else(|| st.overlay.loaded.get(key).map(|i| &**i))
    }

    /// The instance to change in this batch: the overlay's own copy (moved from the one the
    /// batch loaded, copied only if something else still shares it; the program's state is
    /// left out of a copy when `without_state`, because the caller replaces it). Call
    /// [`Self::instance`] first.
    fn instance_mut<'a>(&self, st: &'a mut Staged, key: &SagaKey, without_state: bool) -> Option<&'a mut Instance> {
        if !st.overlay.instances.contains_key(key) {
            let rc = st.overlay.loaded.remove(key)?;
            let own =
                Rc::try_unwrap(rc).unwrap_or_else(|rc| if without_state { copy_meta(&rc) } else { (*rc).clone() });
            st.overlay.instances.insert(key.clone(), own);
        }
        st.overlay.instances.get_mut(key)
    }

    fn read_instance(&self, key: &SagaKey) -> Result<Option<Instance>, CoreError> {
        let view = self.store.read()?;
        let Some(raw) = view.saga_raw(key)? else { return Ok(None) };
        let inst: Instance = serde_json::from_slice(raw).map_err(|e| CoreError::Unreadable {
            shard: self.shard,
            key: key.clone(),
            why: e.to_string(),
        })?;
        Ok(Some(inst))
    }
}

/// An instance's metadata with an empty state (the caller sets the new state).
fn copy_meta(i: &Instance) -> Instance {
    SagaRecord {
        status: i.status,
        last_seq: i.last_seq.clone(),
        outstanding: i.outstanding.clone(),
        version: i.version,
        created_at: i.created_at,
        updated_at: i.updated_at,
        parked: i.parked.clone(),
        traceparent: i.traceparent.clone(),
        applied: i.applied.clone(),
        history: i.history,
        replay_step: i.replay_step,
        timers: i.timers.clone(),
        state: Dynamic::UNIT,
    }
}
