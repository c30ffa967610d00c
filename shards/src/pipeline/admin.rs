//! Read-only queries and operator actions: requeue or discard dead letters, reset
//! instances for a controlled replay.

use super::{After, CoreError, Origin, Pending, ReplyCell, ShardCore, Staged};
use crate::keys::{CheckpointKey, DeadLetterKey, SagaKey};
use crate::message::{AdminOp, Event, Query, QueryAnswer, Target};
use crate::record::{DeadLetter, DeadLetterKind, InstanceStatus};
use rhai::Dynamic;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Arc;

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub(super) fn query(core: &ShardCore, q: &Query) -> QueryAnswer {
    let view = core.store.read().map_err(|e| e.to_string())?;
    match q {
        Query::Saga(key) => {
            let Some(rec) = view.saga(key).map_err(|e| e.to_string())? else {
                return Ok(Value::Null);
            };
            let timers: Vec<Value> = view
                .schedules_of(key)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(k, e)| json!({ "timer_id": k.timer_id, "due_at": k.due_at, "name": e.name, "payload": to_value(&e.payload) }))
                .collect();
            let partition = core.router.partition(&key.tenant, key.route());
            let mut outbox = Vec::new();
            let mut after = None;
            loop {
                let page = view.outbox(after, 512).map_err(|e| e.to_string())?;
                let done = page.len() < 512;
                for (k, item) in page {
                    after = Some(k);
                    if k.partition == partition && item.saga == key.saga && item.correlation_id == key.correlation_id {
                        outbox.push(to_value(&item));
                    }
                }
                if done {
                    break;
                }
            }
            let blocked = core.blocked.get(key).map(|b| {
                json!({ "attempts": b.attempts, "retry_at": b.retry_at, "error": b.error, "queued": b.queue.len(), "event_id": b.head.event.id })
            });
            let mut v = to_value(&rec);
            if let Value::Object(m) = &mut v {
                m.insert("tenant".into(), key.tenant.clone().into());
                m.insert("saga".into(), key.saga.clone().into());
                m.insert("correlation_id".into(), key.correlation_id.clone().into());
                m.insert("shard".into(), core.shard.into());
                m.insert("pending_timers".into(), Value::Array(timers));
                m.insert("pending_outbox".into(), Value::Array(outbox));
                m.insert("blocked".into(), blocked.unwrap_or(Value::Null));
            }
            Ok(v)
        }
        Query::Effect(key) => {
            Ok(view.effect(key).map_err(|e| e.to_string())?.map(|r| to_value(&r)).unwrap_or(Value::Null))
        }
        Query::DeadLetters { tenant, after, limit } => {
            let letters = view.deadletters(tenant, after.as_ref(), *limit).map_err(|e| e.to_string())?;
            Ok(Value::Array(
                letters
                    .into_iter()
                    .map(|(k, l)| {
                        let mut v = to_value(&l);
                        if let Value::Object(m) = &mut v {
                            m.insert("key".into(), json!({ "tenant": k.tenant, "at": k.at, "id": k.id }));
                            m.insert("shard".into(), core.shard.into());
                        }
                        v
                    })
                    .collect(),
            ))
        }
        Query::Sagas { tenant, saga } => Ok(Value::Array(
            view.sagas_page::<serde::de::IgnoredAny>(None, usize::MAX)
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|(k, _)| k.tenant == *tenant && k.saga == *saga)
                .map(|(k, _)| Value::String(k.correlation_id))
                .collect(),
        )),
        Query::Stats => {
            let s = view.stats().map_err(|e| e.to_string())?;
            let relay = core.relay.borrow();
            Ok(json!({
                "shard": core.shard,
                "store": to_value(&s),
                "map_size": core.store.map_size(),
                "outbox_window": relay.depth(),
                "outbox_in_flight": relay.in_flight(),
                "blocked_keys": core.blocked.len(),
                "effects_in_flight": core.in_flight_effects.len(),
                "next_timer_due": core.next_due,
            }))
        }
    }
}

/// The dead letters of one instance that hold its events (poison and parked), in order.
fn letters_of(core: &ShardCore, key: &SagaKey) -> Result<Vec<(DeadLetterKey, DeadLetter)>, CoreError> {
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

pub(super) fn run(
    core: &mut ShardCore,
    st: &mut Staged,
    op: AdminOp,
    reply: ReplyCell<Result<Value, String>>,
    now: u64,
) -> Result<(), CoreError> {
    let answer = match op {
        AdminOp::Requeue { key, skip_poison } => requeue(core, st, key, skip_poison, now)?,
        AdminOp::Discard { key } => {
            let exists = core.store.read()?.deadletters(&key.tenant, None, usize::MAX)?.iter().any(|(k, _)| *k == key);
            if exists {
                st.batch.delete_deadletter(&key);
                Ok(json!({ "discarded": key.id }))
            } else {
                Err(format!("no dead letter {} for tenant {:?}", key.id, key.tenant))
            }
        }
        AdminOp::Replay { tenant, saga, correlation_id, from_seq } => {
            replay(core, st, tenant, saga, correlation_id, from_seq)?
        }
        AdminOp::FireTimer { key, timer_id } => fire_timer(core, st, key, timer_id, now)?,
        AdminOp::EndReplay { key } => {
            if let Some((mut inst, source)) = core.take(st, &key)? {
                let changed = inst.replaying;
                inst.replaying = false;
                inst.replay_suppress.clear();
                core.put_back(st, key.clone(), inst, source, changed);
            }
            let held: Vec<_> = core.held_timers.iter().filter(|k| k.saga == key).cloned().collect();
            for k in held {
                core.set_held_timer(st, k, false);
            }
            st.schedules_changed = true;
            Ok(json!({ "replay_ended": key.correlation_id }))
        }
    };
    st.after.push(After::Admin(reply, answer));
    Ok(())
}

fn requeue(
    core: &mut ShardCore,
    st: &mut Staged,
    key: SagaKey,
    skip_poison: bool,
    now: u64,
) -> Result<Result<Value, String>, CoreError> {
    if core.blocked.contains_key(&key) {
        return Ok(Err(format!("{key} is retrying its head event; requeue after it is quarantined")));
    }
    let mut letters = letters_of(core, &key)?;
    if letters.is_empty() {
        return Ok(Err(format!("no dead letters to requeue for {key}")));
    }
    let mut skipped = None;
    if skip_poison && let Some(pos) = letters.iter().position(|(_, l)| l.kind == DeadLetterKind::Poison) {
        let (k, l) = letters.remove(pos);
        st.batch.delete_deadletter(&k);
        skipped = Some(l.id);
    }
    // Unpark, so the requeued events apply rather than park again.
    if let Some((mut inst, source)) = core.take(st, &key)? {
        let was_parked = inst.parked.take().is_some();
        inst.updated_at = now;
        core.put_back(st, key.clone(), inst, source, was_parked);
    }
    let mut queue = VecDeque::new();
    for (k, l) in &letters {
        let Some(raw) = &l.event else { continue };
        let event: Event = match serde_json::from_str(raw.get()) {
            Ok(e) => e,
            Err(e) => return Ok(Err(format!("dead letter {} holds an unreadable event: {e}", l.id))),
        };
        let target = Target { saga: key.saga.clone(), correlation_id: key.correlation_id.clone(), may_start: true };
        queue.push_back(Pending { event: Arc::new(event), target, origin: Origin::Requeue(k.clone()) });
    }
    let n = queue.len();
    tracing::info!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, events = n, skipped = ?skipped, "requeueing dead letters");
    super::apply::drive_requeued(core, st, key, queue, now)?;
    Ok(Ok(json!({ "requeued": n, "skipped": skipped })))
}

fn replay(
    core: &mut ShardCore,
    st: &mut Staged,
    tenant: String,
    saga: String,
    correlation_id: Option<String>,
    from_seq: u64,
) -> Result<Result<Value, String>, CoreError> {
    let keys: Vec<SagaKey> = match &correlation_id {
        Some(cid) => vec![SagaKey::new(tenant.clone(), saga.clone(), cid.clone())],
        None => {
            let view = core.store.read()?;
            view.sagas_of_tenant(&tenant, usize::MAX)?.into_iter().map(|(k, _)| k).filter(|k| k.saga == saga).collect()
        }
    };
    let mut reset = Vec::new();
    for key in keys {
        if core.blocked.contains_key(&key) {
            return Ok(Err(format!("{key} is retrying an event; replay it after that settles")));
        }
        let Some((mut inst, _)) = core.take(st, &key)? else { continue };
        let truncated = inst.version > inst.applied.len() as u64;
        let applied: Vec<Value> =
            inst.applied.iter().map(|a| json!({ "stream": a.stream, "seq": a.seq, "id": a.id })).collect();
        // Everything applied before is remembered so its work is not dispatched again.
        inst.replay_suppress.extend(inst.applied.drain(..).map(|a| a.id));
        inst.state = Dynamic::UNIT;
        inst.status = InstanceStatus::Running;
        inst.version = 0;
        inst.last_seq.clear();
        inst.outstanding.clear();
        inst.parked = None;
        inst.replaying = true;
        reset.push(json!({ "correlation_id": key.correlation_id, "applied": applied, "truncated": truncated }));
        core.put_back(st, key, inst, super::Source::Staged, true);
    }
    let mut streams: Vec<String> = core
        .manifests
        .sagas
        .get(&saga)
        .map(|s| s.spec.triggers.iter().map(|t| t.stream.clone()).collect())
        .unwrap_or_default();
    streams.sort();
    streams.dedup();
    for stream in &streams {
        st.batch.set_checkpoint(
            &CheckpointKey { tenant: tenant.clone(), saga: saga.clone(), stream: stream.clone() },
            from_seq.saturating_sub(1),
        );
    }
    Ok(Ok(json!({ "instances": reset, "count": reset.len(), "from_seq": from_seq, "streams": streams })))
}

/// Applies the instance's timer `timer_id` now (its place in a replayed history).
fn fire_timer(
    core: &mut ShardCore,
    st: &mut Staged,
    key: SagaKey,
    timer_id: String,
    now: u64,
) -> Result<Result<Value, String>, CoreError> {
    let found = core.store.read()?.schedules_of(&key)?.into_iter().find(|(k, _)| k.timer_id == timer_id);
    let Some((sk, entry)) = found else {
        return Ok(Err(format!("no pending timer {timer_id} for {key}")));
    };
    let event = super::timers::timer_event(&sk, &entry);
    let target = Target { saga: key.saga.clone(), correlation_id: key.correlation_id.clone(), may_start: false };
    if core.held_timers.contains(&sk) {
        core.set_held_timer(st, sk.clone(), false);
    }
    super::apply::route(core, st, &Pending { event: Arc::new(event), target, origin: Origin::ReplayTimer(sk) }, now)?;
    st.schedules_changed = true;
    Ok(Ok(json!({ "fired": timer_id })))
}
