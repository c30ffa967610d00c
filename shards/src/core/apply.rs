//! Saga transitions: the sequence gate, the program call, staging of state, outbox items,
//! timers and checkpoints; blocked keys, retries in place and quarantine (invariants 3, 5,
//! 7).

use super::{Action, Blocked, CoreError, Instance, Origin, Pending, Retry, ShardCore, Staged};
use crate::ids;
use crate::keys::{CheckpointKey, DeadLetterKey, HistoryKey, OutboxKey, ResultKey, SagaKey, ScheduleKey};
use crate::manifest::PoisonPolicy;
use crate::message::{Event, RawLetter};
use crate::program::{Entry, ScheduleSpec, Transition, WorkSpec};
use crate::record::{
    AppliedRef, DeadLetter, DeadLetterKind, InstanceStatus, Json, OutboxItem, Parked, ScheduleEntry, WorkKind,
};
use crate::routing::RouteKey;
use rhai::Dynamic;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// Largest raw body kept in a dead letter.
const MAX_RAW: usize = 64 << 10;

/// An event whose `data` holds `"crash_process": true` passes the crash point
/// `shard.apply_marked` just before its program runs (the fault suite's crash-inducing
/// input; without the `failpoints` feature, or unarmed, nothing happens).
#[cfg(feature = "failpoints")]
pub const CRASH_MARK: &str = "crash_process";

/// Routes one event: behind its key's blocked head if there is one, else applied now.
/// Borrows `p`: the shell keeps the batch's work for a redo, so only a key that blocks
/// keeps a copy.
pub(super) fn route(core: &ShardCore, st: &mut Staged, p: &Pending, now: u64) -> Result<(), CoreError> {
    let key = p.key();
    if let Err(e) = key.validate() {
        // Cannot be stored under this key at all: quarantine at once.
        quarantine(core, st, p, &e.to_string(), 0, now);
        return Ok(());
    }
    if core.is_blocked(st, &key) {
        if let Some(sk) = p.origin.timer() {
            core.set_held(st, sk.clone(), true);
        }
        if let Some(b) = blocked_mut(core, st, &key) {
            // A replay fires the timers of the history at their place and releases the
            // others at its end: a held timer is not queued as well.
            if b.retry.is_some() || p.origin.timer().is_none() {
                b.queue.push_back(p.clone());
            }
        }
        return Ok(());
    }
    if let Err(error) = apply_one(core, st, &key, p, now)? {
        return on_failure(core, st, key, p.clone(), error, 1, VecDeque::new(), now);
    }
    Ok(())
}

/// The batch's own copy of a blocked key's state (copied from the shard's once per batch).
fn blocked_mut<'a>(core: &ShardCore, st: &'a mut Staged, key: &SagaKey) -> Option<&'a mut Blocked> {
    if !st.overlay.blocked.contains_key(key) {
        let b = core.blocked.get(key)?.clone();
        st.overlay.blocked.insert(key.clone(), Some(b));
    }
    st.overlay.blocked.get_mut(key).and_then(Option::as_mut)
}

/// Takes a key's blocked state out (the key is unblocked unless it is set again).
fn take_blocked(core: &ShardCore, st: &mut Staged, key: &SagaKey) -> Option<Blocked> {
    let b = match st.overlay.blocked.get_mut(key) {
        Some(b) => b.take(),
        None => core.blocked(st, key),
    };
    if b.is_some() {
        core.set_blocked(st, key.clone(), None);
    }
    b
}

/// Applies a key's events in order until one fails; that one blocks the key.
fn drive(
    core: &ShardCore,
    st: &mut Staged,
    key: SagaKey,
    mut queue: VecDeque<Pending>,
    now: u64,
) -> Result<(), CoreError> {
    while let Some(p) = queue.pop_front() {
        if let Err(error) = apply_one(core, st, &key, &p, now)? {
            return on_failure(core, st, key, p, error, 1, queue, now);
        }
    }
    Ok(())
}

/// Applies requeued dead letters of one key in order (they pass the sequence gate).
pub(super) fn drive_requeued(
    core: &ShardCore,
    st: &mut Staged,
    key: SagaKey,
    queue: VecDeque<Pending>,
    now: u64,
) -> Result<(), CoreError> {
    drive(core, st, key, queue, now)
}

/// Holds a key for a replay: from here on its events, results and timers wait.
pub(super) fn hold_for_replay(core: &ShardCore, st: &mut Staged, key: SagaKey) {
    core.set_blocked(st, key, Some(Blocked::replay()));
}

/// Ends a replay's hold on a key: what waited applies now, in the order it came; the timers
/// held meanwhile fire when due.
pub(super) fn release_replay(core: &ShardCore, st: &mut Staged, key: &SagaKey, now: u64) -> Result<(), CoreError> {
    let mut held: Vec<ScheduleKey> = core.held_timers.iter().filter(|k| k.saga == *key).cloned().collect();
    held.extend(st.overlay.held.iter().filter(|(k, h)| **h && k.saga == *key).map(|(k, _)| k.clone()));
    for k in held {
        core.set_held(st, k, false);
    }
    st.overlay.schedules_changed = true;
    match take_blocked(core, st, key) {
        Some(b) => drive(core, st, key.clone(), b.queue, now),
        None => Ok(()),
    }
}

/// Retries the heads of blocked keys whose time has come.
pub(super) fn retry_due(core: &ShardCore, st: &mut Staged, now: u64) -> Result<(), CoreError> {
    if core.blocked.is_empty() && st.overlay.blocked.is_empty() {
        return Ok(());
    }
    for key in core.due_retries(st, now) {
        let Some(Blocked { retry: Some(r), queue }) = take_blocked(core, st, &key) else { continue };
        match apply_one(core, st, &key, &r.head, now)? {
            Ok(()) => {
                tracing::info!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, attempts = r.attempts + 1, "blocked key recovered");
                drive(core, st, key, queue, now)?;
            }
            Err(error) => on_failure(core, st, key, r.head, error, r.attempts + 1, queue, now)?,
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn on_failure(
    core: &ShardCore,
    st: &mut Staged,
    key: SagaKey,
    head: Pending,
    error: String,
    attempts: u32,
    rest: VecDeque<Pending>,
    now: u64,
) -> Result<(), CoreError> {
    st.stats.failures += 1;
    let spec = core.manifests.sagas.get(&key.saga).map(|s| (s.spec.retry, s.spec.on_poison));
    let (retry, policy) =
        spec.unwrap_or((crate::manifest::RetrySpec { attempts: 1, ..Default::default() }, PoisonPolicy::Park));
    // An event that crashed the process is not retried: a retry would crash it again.
    let (attempts, crashed) = match head.origin {
        Origin::Crashed { crashes, .. } => (crashes, true),
        _ => (attempts, false),
    };
    if attempts < retry.attempts && !crashed {
        let unit = (crate::routing::stable_hash(&key.tenant, key.route()) % 1000) as f64 / 1000.0;
        let retry_at = now + retry.backoff_jittered(attempts, unit).max(1);
        tracing::warn!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, event_id = %head.event.id, attempts, retry_in_ms = retry_at - now, error = %error, "transition failed; key blocked, will retry");
        for p in std::iter::once(&head).chain(rest.iter()) {
            if let Some(sk) = p.origin.timer() {
                core.set_held(st, sk.clone(), true);
            }
        }
        core.set_blocked(
            st,
            key,
            Some(Blocked { retry: Some(Retry { head, attempts, retry_at, error }), queue: rest }),
        );
        return Ok(());
    }
    tracing::error!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, event_id = %head.event.id, attempts, error = %error, policy = ?policy, "event quarantined");
    let letter_id = quarantine(core, st, &head, &error, attempts, now);
    if policy == PoisonPolicy::Park {
        let mut parked = Parked { poison_event_id: letter_id, since: now, error, seqs: BTreeMap::new() };
        parked.hold(&head.event.stream, head.event.seq);
        match core.instance(st, &key) {
            Ok(Some(_)) => {
                if let Some(inst) = core.instance_mut(st, &key, false) {
                    inst.parked = Some(parked);
                    inst.updated_at = now;
                }
            }
            Ok(None) => {
                let mut inst = new_instance(&head.event, now);
                inst.parked = Some(parked);
                st.overlay.instances.insert(key.clone(), inst);
            }
            // The record cannot be marked without overwriting it: it stays as it is for an
            // operator, and each later event of the key fails the same way and is
            // quarantined in its turn.
            Err(CoreError::Unreadable { .. }) => {}
            Err(e) => return Err(e),
        }
    } else if head.event.seq > 0
        && matches!(core.instance(st, &key), Ok(Some(_)))
        && let Some(inst) = core.instance_mut(st, &key, false)
    {
        // Skipped for good: a redelivered copy is a duplicate, not a second poison.
        let last = inst.last_seq.entry(head.event.stream.clone()).or_insert(0);
        *last = (*last).max(head.event.seq);
    }
    // Parked: the rest become dead letters in order (apply_one sees the mark). Skip: they
    // apply normally.
    drive(core, st, key, rest, now)
}

fn new_instance(event: &Event, now: u64) -> Instance {
    Instance {
        status: InstanceStatus::Running,
        last_seq: BTreeMap::new(),
        outstanding: Default::default(),
        version: 0,
        created_at: now,
        updated_at: now,
        parked: None,
        traceparent: event.traceparent.clone(),
        applied: Vec::new(),
        history: Default::default(),
        replay_step: None,
        timers: Some(BTreeMap::new()),
        state: Dynamic::UNIT,
    }
}

/// What the gate decided for one event and its instance.
enum Gate {
    /// Run the program; `state` is the instance's state (`None`: a new instance).
    Apply { state: Option<Dynamic>, traceparent: Option<String>, suppressed: bool },
    /// Nothing to apply: acked and counted.
    Skip { duplicate: bool },
    /// The key is parked: the event becomes a dead letter behind the poison one.
    Park { why: String },
}

fn gate(core: &ShardCore, st: &mut Staged, key: &SagaKey, p: &Pending) -> Result<Gate, CoreError> {
    let event = &p.event;
    let Some(inst) = core.instance(st, key)? else {
        let may_start = p.target.may_start && event.result.is_none() && p.origin.timer().is_none();
        return Ok(if may_start {
            Gate::Apply { state: None, traceparent: event.traceparent.clone(), suppressed: false }
        } else {
            Gate::Skip { duplicate: false }
        });
    };
    // The sequence gate (invariant 3), for requeued events too: each applies once.
    let applied = event.seq > 0 && inst.last_seq.get(&event.stream).is_some_and(|&last| last >= event.seq);
    // A parked key: later events wait behind the poison one, in order; a redelivered copy
    // of one already applied or already held in a dead letter is a duplicate.
    if let Some(parked) = &inst.parked {
        if applied || parked.holds(&event.stream, event.seq) {
            return Ok(Gate::Skip { duplicate: true });
        }
        return Ok(Gate::Park { why: format!("key parked behind dead letter {}", parked.poison_event_id) });
    }
    if inst.status.is_final() {
        return Ok(Gate::Skip { duplicate: false });
    }
    if applied {
        return Ok(Gate::Skip { duplicate: true });
    }
    // A result is applied only for an outstanding command, once (invariant 4).
    if let Some(r) = &event.result
        && !inst.outstanding.contains(&r.command_id)
    {
        return Ok(Gate::Skip { duplicate: true });
    }
    Ok(Gate::Apply {
        state: Some(inst.state.clone()),
        traceparent: event.traceparent.clone().or_else(|| inst.traceparent.clone()),
        suppressed: p.origin.replayed(),
    })
}

/// Applies one event to its instance. `Ok(Err(message))` is a failure of the key (retried
/// by policy, then quarantined): the program failed, or its stored instance cannot be read;
/// `Err` aborts the batch.
pub(super) fn apply_one(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    p: &Pending,
    now: u64,
) -> Result<Result<(), String>, CoreError> {
    match apply_read(core, st, key, p, now) {
        // The gate reads the instance before anything is staged, so nothing of this event
        // is in the batch.
        Err(e @ CoreError::Unreadable { .. }) => Ok(Err(e.to_string())),
        other => other,
    }
}

fn apply_read(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    p: &Pending,
    now: u64,
) -> Result<Result<(), String>, CoreError> {
    let event = &p.event;
    let Some(saga) = core.manifests.sagas.get(&key.saga) else {
        // The saga was removed by a reload: nothing can apply this; quarantine at once.
        quarantine(core, st, p, &format!("saga {:?} is not in the loaded manifests", key.saga), 0, now);
        return Ok(Ok(()));
    };
    let (state, traceparent, suppressed) = match gate(core, st, key, p)? {
        Gate::Apply { state, traceparent, suppressed } => (state, traceparent, suppressed),
        Gate::Skip { duplicate } => {
            if duplicate {
                st.stats.duplicates += 1;
            } else {
                st.stats.skipped += 1;
                if p.origin.timer().is_some() {
                    st.stats.timers_dropped += 1;
                }
            }
            settle(core, st, p, None, now);
            return Ok(Ok(()));
        }
        Gate::Park { why } => {
            st.stats.parked += 1;
            if let Some(inst) = core.instance_mut(st, key, false)
                && let Some(parked) = inst.parked.as_mut()
            {
                parked.hold(&event.stream, event.seq);
            }
            write_deadletter(core, st, p, DeadLetterKind::Parked, &why, 0, now);
            settle(core, st, p, None, now);
            return Ok(Ok(()));
        }
    };

    if let Origin::Crashed { crashes, .. } = p.origin {
        // It would run now: it killed the process every time it did.
        return Ok(Err(crashed_reason(key, event, crashes)));
    }
    let entry = match &event.result {
        Some(r) if r.outcome == "failed" && saga.spec.compensation.is_some() => Entry::Compensation,
        _ => Entry::OnEvent,
    };
    #[cfg(feature = "failpoints")]
    if event.data.get(CRASH_MARK).and_then(serde_json::Value::as_bool) == Some(true) {
        // A crash-inducing input for the fault suite: the process dies running this event.
        fail::fail_point!("shard.apply_marked");
    }
    let is_new = state.is_none();
    let input_event = event_dynamic(event, &key.correlation_id);
    let started = Instant::now();
    let result = core.programs.run(&key.saga, entry, state.unwrap_or(Dynamic::UNIT), input_event, &event.id);
    st.stats.program_ns += started.elapsed().as_nanos() as u64;
    let t: Transition = match result {
        Ok(t) => t,
        Err(e) => return Ok(Err(e.to_string())),
    };

    // Stage the transition: outbox items, timers, then the instance.
    let partition = core.router.partition(&key.tenant, key.route());
    let mut outstanding = Vec::new();
    for (i, w) in t.work.into_iter().enumerate() {
        let work_id = ids::work_id(&key.tenant, &key.saga, &key.correlation_id, &event.id, i);
        let (kind, payload) = match w {
            WorkSpec::Effect { effect, payload } => {
                outstanding.push(work_id.clone());
                (WorkKind::Effect { effect }, payload)
            }
            WorkSpec::Command { command, aggregate, aggregate_id, payload } => {
                (WorkKind::Command { command, aggregate, aggregate_id }, payload)
            }
        };
        let item = OutboxItem {
            work_id,
            kind,
            tenant: key.tenant.clone(),
            saga: key.saga.clone(),
            correlation_id: key.correlation_id.clone(),
            traceparent: traceparent.clone(),
            source_event_id: event.id.clone(),
            payload: to_json(&payload),
            created_at: now,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            suppressed,
        };
        let okey = OutboxKey { partition, seq: core.next_outbox_seq(st, now) };
        st.batch.put_outbox(okey, &item);
        st.actions.push(Action::Offer { key: okey, item });
        st.stats.outbox_written += 1;
    }
    let mut timers = Vec::new();
    for (i, ScheduleSpec { name, after_ms, payload }) in t.schedules.into_iter().enumerate() {
        let timer_id = ids::timer_id(&key.tenant, &key.saga, &key.correlation_id, &event.id, i);
        let due_at = event.timestamp.saturating_add(after_ms);
        let entry = ScheduleEntry {
            name,
            payload: to_json(&payload),
            source_event_id: event.id.clone(),
            scheduled_at: event.timestamp,
            traceparent: event.traceparent.clone(),
        };
        let sk = ScheduleKey { due_at, saga: key.clone(), timer_id };
        st.batch.put_schedule(&sk, &entry);
        timers.push((sk.timer_id, due_at));
        st.overlay.schedules_changed = true;
    }
    if event.seq > 0 {
        st.batch.advance_checkpoint(
            &CheckpointKey { tenant: key.tenant.clone(), saga: key.saga.clone(), stream: event.stream.clone() },
            event.seq,
        );
    }
    if is_new {
        st.overlay.instances.insert(key.clone(), new_instance(event, now));
    }
    let Some(inst) = core.instance_mut(st, key, true) else {
        // Unreachable: the gate found the instance (or it was just inserted).
        return Ok(Err(format!("{key}: instance vanished within its batch")));
    };
    inst.outstanding.extend(outstanding);
    let fired = p.origin.timer().map(|sk| &sk.timer_id);
    if !timers.is_empty() || fired.is_some() {
        let list = inst.timers.get_or_insert_with(BTreeMap::new);
        if let Some(id) = fired {
            list.remove(id);
        }
        list.extend(timers);
    }
    if let Some(r) = &event.result {
        inst.outstanding.remove(&r.command_id);
    }
    if event.seq > 0 {
        let last = inst.last_seq.entry(event.stream.clone()).or_insert(0);
        *last = (*last).max(event.seq);
    }
    let index = inst.history.next;
    inst.history.next += 1;
    inst.state = t.state;
    inst.status = t.status;
    inst.version += 1;
    inst.updated_at = now;
    st.stats.applied += 1;
    // The instance's history, in full (what a replay applies again): one small entry.
    st.batch.put_history(
        &HistoryKey { saga: key.clone(), index },
        &AppliedRef { stream: event.stream.clone(), seq: event.seq, id: event.id.clone() },
    );
    if event.seq == 0 && event.result.is_some() {
        // A result applied in place came from no stream: keep it, so a replay can apply it
        // again at its place in the history.
        st.batch.put_result(&ResultKey { saga: key.clone(), event_id: event.id.clone() }, event);
    }
    settle(core, st, p, None, now);
    Ok(Ok(()))
}

/// Why an event that crashed the process is quarantined: what it did, and where it is.
fn crashed_reason(key: &SagaKey, event: &Event, crashes: u32) -> String {
    format!(
        "crashed the process {crashes} times (stream {}, sequence {}, tenant {:?}, saga {:?}, key {:?}): the process died each time this event was in flight, the last time while it ran alone after a restart; quarantined instead of run again (consumers.max_crashes)",
        event.stream, event.seq, key.tenant, key.saga, key.correlation_id
    )
}

/// The program's view of an event (DESIGN "Saga programs").
pub fn event_dynamic(event: &Event, correlation_id: &str) -> Dynamic {
    // Built in key order: a sorted bulk build of the map, not a dozen inserts.
    let mut m: Vec<(rhai::Identifier, Dynamic)> = Vec::with_capacity(12);
    if let Some(r) = &event.result {
        m.push(("command_id".into(), r.command_id.as_str().into()));
    }
    m.push(("correlation_id".into(), correlation_id.into()));
    m.push(("data".into(), json_dynamic(&event.data)));
    if let Some(r) = &event.result {
        m.push(("effect".into(), r.effect.as_str().into()));
    }
    m.push(("id".into(), event.id.as_str().into()));
    if let Some(r) = &event.result {
        m.push(("outcome".into(), r.outcome.as_str().into()));
    }
    m.push(("seq".into(), Dynamic::from_int(event.seq as i64)));
    m.push(("stream".into(), event.stream.as_str().into()));
    m.push(("subject".into(), event.subject.as_str().into()));
    m.push(("tenant".into(), event.tenant.as_str().into()));
    m.push(("timestamp".into(), Dynamic::from_int(event.timestamp as i64)));
    m.push(("type".into(), event.event_type.as_str().into()));
    Dynamic::from_map(m.into_iter().collect())
}

/// A JSON value as the program sees it: the same value `rhai::serde::to_dynamic` gives
/// (integers that fit `i64` as integers, others as floats), built directly rather than
/// through a serializer (that detour was an eighth of the transition's cost).
pub fn json_dynamic(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Dynamic::from_int(i),
            (None, Some(f)) => Dynamic::from_float(f),
            (None, None) => Dynamic::UNIT,
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json_dynamic).collect()),
        Value::Object(o) => Dynamic::from_map(o.iter().map(|(k, v)| (k.as_str().into(), json_dynamic(v))).collect()),
    }
}

fn to_json(v: &Dynamic) -> Json {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| crate::record::json_null())
}

/// Marks `p` done: settles its message after the commit, deletes its timer entry or its
/// requeued dead letter in the same transaction.
fn settle(core: &ShardCore, st: &mut Staged, p: &Pending, term: Option<String>, now: u64) {
    match &p.origin {
        Origin::Delivery(request) | Origin::Crashed { request, .. } => {
            st.actions.push(Action::Settle { request: *request, term })
        }
        Origin::Timer(sk) | Origin::ReplayTimer(sk) => {
            st.batch.delete_schedule(sk);
            st.overlay.schedules_changed = true;
            core.set_held(st, sk.clone(), false);
        }
        Origin::Requeue(dk) => st.batch.delete_deadletter(dk),
        Origin::Replayed => {}
        Origin::Ran { key, audit } => {
            st.batch.delete_outbox(*key);
            st.stats.outbox_deleted += 1;
            st.actions.push(Action::Delivered { key: *key });
            let item = audit.outbox_item(now);
            let okey = OutboxKey { partition: key.partition, seq: core.next_outbox_seq(st, now) };
            st.batch.put_outbox(okey, &item);
            st.actions.push(Action::Offer { key: okey, item });
            st.stats.outbox_written += 1;
        }
        Origin::Recorded => {}
    }
}

/// Writes `p` as a dead letter; returns its id.
fn write_deadletter(
    core: &ShardCore,
    st: &mut Staged,
    p: &Pending,
    kind: DeadLetterKind,
    error: &str,
    attempts: u32,
    now: u64,
) -> String {
    let event = &p.event;
    let key = p.key();
    let id = ids::deadletter_id(&event.stream, event.seq, &event.id, &key.saga, &key.correlation_id);
    let at = core.next_deadletter_at(st, now);
    let letter = DeadLetter {
        id: id.clone(),
        kind,
        partition: core
            .router
            .partition(&key.tenant, RouteKey::Saga { saga: &key.saga, correlation_id: &key.correlation_id }),
        tenant: key.tenant.clone(),
        at,
        error: error.to_owned(),
        saga: Some(key.saga.clone()),
        correlation_id: Some(key.correlation_id.clone()),
        stream: Some(event.stream.clone()),
        seq: event.seq,
        subject: Some(event.subject.clone()),
        headers: event.headers.clone(),
        raw: None,
        event: serde_json::value::to_raw_value(event.as_ref()).ok(),
        work: None,
        attempts,
    };
    let dk = DeadLetterKey { tenant: key.tenant.clone(), at, id: id.clone() };
    st.batch.put_deadletter(&dk, &letter);
    st.overlay.letters.push((dk, letter));
    st.stats.deadletters += 1;
    id
}

/// Quarantines `p`: a dead letter with the decoded context and the error, and a `TERM`.
fn quarantine(core: &ShardCore, st: &mut Staged, p: &Pending, error: &str, attempts: u32, now: u64) -> String {
    st.stats.quarantined += 1;
    let id = write_deadletter(core, st, p, DeadLetterKind::Poison, error, attempts, now);
    settle(core, st, p, Some(error.to_owned()), now);
    id
}

/// Quarantines a message the bridge could not decode.
pub(super) fn quarantine_raw(core: &ShardCore, st: &mut Staged, letter: &RawLetter, now: u64) {
    let raw = &letter.raw[..letter.raw.len().min(MAX_RAW)];
    let id = ids::deadletter_id(&letter.stream, letter.seq, "", "", "");
    let at = core.next_deadletter_at(st, now);
    let tenant = if crate::keys::check_len("tenant", &letter.tenant, crate::keys::MAX_TENANT).is_ok() {
        letter.tenant.clone()
    } else {
        String::new()
    };
    let dl = DeadLetter {
        id: id.clone(),
        kind: DeadLetterKind::Undecodable,
        partition: core.router.partition(&tenant, RouteKey::Raw { stream: &letter.stream, seq: letter.seq }),
        tenant: tenant.clone(),
        at,
        error: letter.error.clone(),
        saga: None,
        correlation_id: None,
        stream: Some(letter.stream.clone()),
        seq: letter.seq,
        subject: Some(letter.subject.clone()),
        headers: letter.headers.clone(),
        raw: Some(String::from_utf8_lossy(raw).into_owned()),
        event: None,
        work: None,
        attempts: 0,
    };
    st.batch.put_deadletter(&DeadLetterKey { tenant, at, id }, &dl);
    st.stats.deadletters += 1;
    st.stats.quarantined += 1;
}
