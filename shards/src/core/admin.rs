//! Operator actions that write: requeue, re-send or discard dead letters, reset instances for a
//! controlled replay and step through it. Each is checked before anything is staged, so a
//! refused action writes nothing.

use super::{Action, CoreError, Origin, Pending, RequestId, ShardCore, Staged};
use crate::keys::{CheckpointKey, DeadLetterKey, OutboxKey, SagaKey, ScheduleKey};
use crate::message::{AdminAnswer, AdminError, AdminOp, Event, ReplayReset, ResetInstance, Target};
use crate::record::{DeadLetter, DeadLetterKind, InstanceStatus};
use rhai::Dynamic;
use std::collections::VecDeque;
use std::sync::Arc;

pub(super) fn run(
    core: &ShardCore,
    st: &mut Staged,
    request: RequestId,
    op: &AdminOp,
    now: u64,
) -> Result<(), CoreError> {
    let answer = match op {
        AdminOp::Requeue { key, skip_poison } => requeue(core, st, key, *skip_poison, now),
        AdminOp::Discard { key } => discard(core, st, key),
        AdminOp::Resend { key } => resend(core, st, key, now),
        AdminOp::Replay { tenant, saga, correlation_id, from_seq } => {
            replay(core, st, tenant, saga, correlation_id.as_deref(), *from_seq)
        }
        AdminOp::FireTimer { key, timer_id } => fire_timer(core, st, key, timer_id, now),
        AdminOp::EndReplay { key } => end_replay(core, st, key),
        AdminOp::ApplyRecorded { key, event_id } => apply_recorded(core, st, key, event_id, now),
    };
    let answer = match answer {
        Ok(answer) => answer,
        // Each action reads its instances before it stages anything: refused, nothing
        // written, and the shard goes on (invariant 12).
        Err(CoreError::Unreadable { key, why, .. }) => Err(AdminError::UnreadableInstance { key, error: why }),
        Err(e) => return Err(e),
    };
    st.actions.push(Action::Admin { request, answer });
    Ok(())
}

fn discard(
    core: &ShardCore,
    st: &mut Staged,
    key: &DeadLetterKey,
) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    if core.store.read()?.deadletter(key)?.is_none() {
        return Ok(Err(AdminError::NoSuchLetter { tenant: key.tenant.clone(), id: key.id.clone() }));
    }
    st.batch.delete_deadletter(key);
    Ok(Ok(AdminAnswer::Discarded { discarded: key.id.clone() }))
}

/// A dispatch given up after `relay.max_attempts`: its item goes back to the outbox as new
/// (same work id: the Gateway's idempotency key and the stream's `Nats-Msg-Id` still hold)
/// and the letter goes, in one commit.
fn resend(
    core: &ShardCore,
    st: &mut Staged,
    key: &DeadLetterKey,
    now: u64,
) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    let Some(letter) = core.store.read()?.deadletter(key)? else {
        return Ok(Err(AdminError::NoSuchLetter { tenant: key.tenant.clone(), id: key.id.clone() }));
    };
    let Some(mut item) = letter.work.filter(|_| letter.kind == DeadLetterKind::Dispatch) else {
        return Ok(Err(AdminError::NotResendable {
            tenant: key.tenant.clone(),
            id: key.id.clone(),
            kind: format!("{:?}", letter.kind).to_lowercase(),
        }));
    };
    item.attempts = 0;
    item.next_attempt_at = 0;
    item.last_error = None;
    let okey = OutboxKey { partition: letter.partition, seq: core.next_outbox_seq(st, now) };
    st.batch.put_outbox(okey, &item);
    st.batch.delete_deadletter(key);
    st.stats.outbox_written += 1;
    let work_id = item.work_id.clone();
    st.actions.push(Action::Offer { key: okey, item });
    Ok(Ok(AdminAnswer::Resent { resent: key.id.clone(), work_id }))
}

/// The dead letters of one instance that hold its events (poison and parked), committed or
/// written earlier in this batch, in the order the instance received them (see
/// [`received_order`]).
fn letters_of(core: &ShardCore, st: &Staged, key: &SagaKey) -> Result<Vec<(DeadLetterKey, DeadLetter)>, CoreError> {
    let mut out = committed_letters_of(core, key)?;
    for (k, l) in &st.overlay.letters {
        let mine = l.saga.as_deref() == Some(&key.saga) && l.correlation_id.as_deref() == Some(&key.correlation_id);
        if mine
            && matches!(l.kind, DeadLetterKind::Poison | DeadLetterKind::Parked)
            && l.event.is_some()
            && !out.iter().any(|(o, _)| o == k)
        {
            out.push((k.clone(), l.clone()));
        }
    }
    // Letters of this batch were stamped after every committed one.
    Ok(received_order(out))
}

fn committed_letters_of(core: &ShardCore, key: &SagaKey) -> Result<Vec<(DeadLetterKey, DeadLetter)>, CoreError> {
    let view = core.store.read()?;
    let mut out = Vec::new();
    let mut after: Option<DeadLetterKey> = None;
    loop {
        let page = view.deadletters(&key.tenant, after.as_ref(), 512)?;
        let done = page.len() < 512;
        for (k, l) in page {
            after = Some(k.clone());
            let mine = l.saga.as_deref() == Some(&key.saga) && l.correlation_id.as_deref() == Some(&key.correlation_id);
            if mine && matches!(l.kind, DeadLetterKind::Poison | DeadLetterKind::Parked) && l.event.is_some() {
                out.push((k, l));
            }
        }
        if done {
            return Ok(out);
        }
    }
}

/// Letters of one key, listed by stamp, put in the order the key received their events:
/// by stamp, except that the letters of one stream keep that stream's order among
/// themselves (stamps written before they survived restarts may disagree with it).
fn received_order(letters: Vec<(DeadLetterKey, DeadLetter)>) -> Vec<(DeadLetterKey, DeadLetter)> {
    let mut slots: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (i, (_, l)) in letters.iter().enumerate() {
        if let Some(stream) = &l.stream
            && l.seq > 0
        {
            slots.entry(stream.clone()).or_default().push(i);
        }
    }
    let mut out: Vec<Option<(DeadLetterKey, DeadLetter)>> = letters.into_iter().map(Some).collect();
    for places in slots.values() {
        let mut group: Vec<(DeadLetterKey, DeadLetter)> = places.iter().filter_map(|&i| out[i].take()).collect();
        group.sort_by_key(|(_, l)| l.seq);
        for (&i, letter) in places.iter().zip(group) {
            out[i] = Some(letter);
        }
    }
    out.into_iter().flatten().collect()
}

fn requeue(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    skip_poison: bool,
    now: u64,
) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    if core.is_blocked(st, key) {
        return Ok(Err(AdminError::RequeueWhileRetrying { key: key.clone() }));
    }
    let mut letters = letters_of(core, st, key)?;
    if letters.is_empty() {
        return Ok(Err(AdminError::NothingToRequeue { key: key.clone() }));
    }
    let parked = core.instance(st, key)?.is_some_and(|i| i.parked.is_some());
    let mut skipped = None;
    if skip_poison && let Some(pos) = letters.iter().position(|(_, l)| l.kind == DeadLetterKind::Poison) {
        skipped = Some(letters.remove(pos));
    }
    // Every event is read back before anything is staged.
    let mut queue = VecDeque::new();
    for (k, l) in &letters {
        let Some(raw) = &l.event else { continue };
        let event: Event = match serde_json::from_str(raw.get()) {
            Ok(e) => e,
            Err(e) => {
                return Ok(Err(AdminError::UnreadableLetter {
                    key: key.clone(),
                    id: l.id.clone(),
                    error: e.to_string(),
                }));
            }
        };
        let target = Target { saga: key.saga.clone(), correlation_id: key.correlation_id.clone(), may_start: true };
        queue.push_back(Pending { event: Arc::new(event), target, origin: Origin::Requeue(k.clone()) });
    }
    let skipped_at = skipped.as_ref().and_then(|(_, l)| l.stream.clone().map(|s| (s, l.seq)));
    let skipped = skipped.map(|(k, l)| {
        st.batch.delete_deadletter(&k);
        l.id
    });
    // Unpark, so the requeued events apply rather than park again. A skipped poison event
    // counts as passed: a redelivered copy of it is a duplicate.
    if (parked || skipped_at.is_some())
        && let Some(inst) = core.instance_mut(st, key, false)
    {
        inst.parked = None;
        inst.updated_at = now;
        if let Some((stream, seq)) = skipped_at.filter(|(_, seq)| *seq > 0) {
            let last = inst.last_seq.entry(stream).or_insert(0);
            *last = (*last).max(seq);
        }
    }
    let n = queue.len();
    tracing::info!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, events = n, skipped = ?skipped, "requeueing dead letters");
    super::apply::drive_requeued(core, st, key.clone(), queue, now)?;
    Ok(Ok(AdminAnswer::Requeued { requeued: n, skipped }))
}

fn replay(
    core: &ShardCore,
    st: &mut Staged,
    tenant: &str,
    saga: &str,
    correlation_id: Option<&str>,
    from_seq: u64,
) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    let keys: Vec<SagaKey> = match correlation_id {
        Some(cid) => vec![SagaKey::new(tenant, saga, cid)],
        None => core
            .store
            .read()?
            .sagas_of::<serde::de::IgnoredAny>(tenant, saga, None, usize::MAX)?
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
    };
    if let Some(key) = keys.iter().find(|k| core.is_blocked(st, k)) {
        return Ok(Err(AdminError::ReplayWhileRetrying { key: key.clone() }));
    }
    // Every instance is read before any is reset.
    for key in &keys {
        core.instance(st, key)?;
    }
    let mut instances = Vec::new();
    for key in keys {
        if core.instance(st, &key)?.is_none() {
            continue;
        }
        let Some(inst) = core.instance_mut(st, &key, false) else { continue };
        let truncated = inst.version > inst.applied.len() as u64;
        let applied = std::mem::take(&mut inst.applied);
        // Everything applied before is remembered so its work is not dispatched again.
        inst.replay_suppress.extend(applied.iter().map(|a| a.id.clone()));
        inst.state = Dynamic::UNIT;
        inst.status = InstanceStatus::Running;
        inst.version = 0;
        inst.last_seq.clear();
        inst.outstanding.clear();
        inst.parked = None;
        inst.replaying = true;
        instances.push(ResetInstance { correlation_id: key.correlation_id.clone(), applied, truncated });
    }
    let mut streams: Vec<String> = core
        .manifests
        .sagas
        .get(saga)
        .map(|s| s.spec.triggers.iter().map(|t| t.stream.clone()).collect())
        .unwrap_or_default();
    streams.sort();
    streams.dedup();
    for stream in &streams {
        st.batch.set_checkpoint(
            &CheckpointKey { tenant: tenant.to_owned(), saga: saga.to_owned(), stream: stream.clone() },
            from_seq.saturating_sub(1),
        );
    }
    Ok(Ok(AdminAnswer::Reset(ReplayReset { count: instances.len(), instances, from_seq, streams })))
}

/// The schedule key of one of the instance's pending timers.
fn find_timer(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    timer_id: &str,
) -> Result<Option<ScheduleKey>, CoreError> {
    let listed = core.instance(st, key)?.and_then(|i| i.timers.as_ref().map(|t| t.get(timer_id).copied()));
    let view = core.store.read()?;
    match listed {
        Some(Some(due_at)) => {
            let sk = ScheduleKey { due_at, saga: key.clone(), timer_id: timer_id.to_owned() };
            Ok(view.schedule(&sk)?.map(|_| sk))
        }
        Some(None) => Ok(None),
        // A record from before instances listed their timers.
        None => Ok(view.schedules_of(key)?.into_iter().map(|(k, _)| k).find(|k| k.timer_id == timer_id)),
    }
}

/// Applies the instance's timer `timer_id` now (its place in a replayed history).
fn fire_timer(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    timer_id: &str,
    now: u64,
) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    let Some(sk) = find_timer(core, st, key, timer_id)? else {
        return Ok(Err(AdminError::NoSuchTimer { key: key.clone(), timer_id: timer_id.to_owned() }));
    };
    let Some(entry) = core.store.read()?.schedule(&sk)? else {
        return Ok(Err(AdminError::NoSuchTimer { key: key.clone(), timer_id: timer_id.to_owned() }));
    };
    let event = super::timers::timer_event(&sk, &entry);
    let target = Target { saga: key.saga.clone(), correlation_id: key.correlation_id.clone(), may_start: false };
    core.set_held(st, sk.clone(), false);
    super::apply::route(core, st, &Pending { event: Arc::new(event), target, origin: Origin::ReplayTimer(sk) }, now)?;
    st.overlay.schedules_changed = true;
    Ok(Ok(AdminAnswer::TimerFired { fired: timer_id.to_owned() }))
}

/// Applies again a result the instance applied in place (its place in a replayed history).
fn apply_recorded(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    event_id: &str,
    now: u64,
) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    let rkey = crate::keys::ResultKey { saga: key.clone(), event_id: event_id.to_owned() };
    let Some(event) = core.store.read()?.result(&rkey)? else {
        return Ok(Err(AdminError::NoSuchResult { key: key.clone(), event_id: event_id.to_owned() }));
    };
    let target = Target { saga: key.saga.clone(), correlation_id: key.correlation_id.clone(), may_start: false };
    super::apply::route(core, st, &Pending { event: Arc::new(event), target, origin: Origin::Recorded }, now)?;
    Ok(Ok(AdminAnswer::RecordedApplied { applied: event_id.to_owned() }))
}

fn end_replay(core: &ShardCore, st: &mut Staged, key: &SagaKey) -> Result<Result<AdminAnswer, AdminError>, CoreError> {
    if core.instance(st, key)?.is_some_and(|i| i.replaying)
        && let Some(inst) = core.instance_mut(st, key, false)
    {
        inst.replaying = false;
        inst.replay_suppress.clear();
    }
    let mut held: Vec<ScheduleKey> = core.held_timers.iter().filter(|k| k.saga == *key).cloned().collect();
    held.extend(st.overlay.held.iter().filter(|(k, h)| **h && k.saga == *key).map(|(k, _)| k.clone()));
    for k in held {
        core.set_held(st, k, false);
    }
    st.overlay.schedules_changed = true;
    Ok(Ok(AdminAnswer::ReplayEnded { replay_ended: key.correlation_id.clone() }))
}
