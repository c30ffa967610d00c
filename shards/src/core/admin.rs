//! Operator actions that write: requeue, re-send or discard dead letters; a controlled replay
//! (in [`super::replay`]). Each is checked before anything is staged, so a refused action
//! writes nothing.

use super::{Action, CoreError, Origin, Pending, RequestId, ShardCore, Staged};
use crate::keys::{DeadLetterKey, OutboxKey, SagaKey};
use crate::message::{AdminAnswer, AdminError, AdminOp, Event, Target};
use crate::record::{DeadLetter, DeadLetterKind};
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
            super::replay::ask(core, st, tenant, saga, correlation_id.as_deref(), *from_seq)
        }
        AdminOp::ReplayNext { key } => super::replay::next(core, st, key),
        AdminOp::ReplaySteps { key, at, steps } => super::replay::steps(core, st, key, *at, steps, now),
        AdminOp::ReplayAbort { key, reason } => super::replay::abort(core, st, key, reason, now),
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
    if core.is_replaying(st, key) {
        return Ok(Err(AdminError::RequeueWhileReplaying { key: key.clone() }));
    }
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
