//! An operator's controlled replay: an instance is reset and its history — every event it
//! applied, in the order it applied them (db `history`) — is applied again, a page of steps
//! per batch, driven from outside (the operations thread reads stream events back by
//! sequence). While it runs the key is held like a blocked key: live events, effect results
//! and timers for it wait, in order, and apply after the history's last step.
//!
//! ```text
//!   Replay ──> mark (db `replays`, from_seq)           nothing reset, nothing held
//!   ReplaySteps at 0 ──> reset, plan = old history,    key held; steps 0..n applied,
//!                        record.replay_step = n        their work suppressed
//!   ReplaySteps at n ──> …                             progress committed with the state
//!   last step ──> old history entries and mark go,     what waited applies, in order
//!                 key released
//!   ReplayAbort ──> instance as it was before reset,   (a history event that now fails,
//!                   rebuilt entries go, key released    or one that cannot be read back)
//! ```
//!
//! Every step and the progress are in one commit, so a crash resumes at the first step not
//! applied; a replay started and not finished holds its key again when the shard starts.

use super::apply::{apply_one, hold_for_replay, release_replay};
use super::{CoreError, Instance, Origin, Pending, ShardCore, Staged};
use crate::keys::{CheckpointKey, HistoryKey, ResultKey, SagaKey, ScheduleKey};
use crate::message::{AdminAnswer, AdminError, REPLAY_PAGE, ReplayMarked, ReplayPage, ReplayStep, Target};
use crate::record::{AppliedRef, InstanceStatus, ReplayMark, ReplayPlan};
use rhai::Dynamic;
use std::sync::Arc;

type Answer = Result<Result<AdminAnswer, AdminError>, CoreError>;

/// Records a replay of the instances of `saga` for `tenant` (or of one of them).
pub(super) fn ask(
    core: &ShardCore,
    st: &mut Staged,
    tenant: &str,
    saga: &str,
    correlation_id: Option<&str>,
    from_seq: u64,
) -> Answer {
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
    // Every instance is read before any is recorded.
    let mut marked = Vec::new();
    let mut skipped = Vec::new();
    for key in keys {
        let Some(inst) = core.instance(st, &key)? else { continue };
        let remembered = inst.applied.len() as u64 + inst.history.len();
        if inst.version > remembered && inst.replay_step.is_none() {
            let refused = AdminError::HistoryIncomplete { key: key.clone(), applied: inst.version, remembered };
            if correlation_id.is_some() {
                return Ok(Err(refused));
            }
            skipped.push((key.correlation_id.clone(), refused.to_string()));
            continue;
        }
        marked.push(key);
    }
    for key in &marked {
        // One already asked for goes on where it stands.
        if core.replay_mark(st, key)?.is_none() {
            core.set_replay_mark(st, key.clone(), Some(ReplayMark { from_seq, plan: None }));
        }
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
    let instances = marked.into_iter().map(|k| k.correlation_id).collect();
    Ok(Ok(AdminAnswer::Marked(ReplayMarked { instances, skipped, from_seq, streams })))
}

/// The history a replay of `key` applies: the one recorded at its reset, or (not started
/// yet) the instance's as it stands.
struct Plan {
    legacy: Vec<AppliedRef>,
    first: u64,
    end: u64,
    done: u64,
}

impl Plan {
    fn of(core: &ShardCore, st: &mut Staged, key: &SagaKey, mark: &ReplayMark) -> Result<Self, CoreError> {
        let inst = core.instance(st, key)?;
        Ok(match (&mark.plan, inst) {
            (Some(p), inst) => Plan {
                legacy: p.legacy.clone(),
                first: p.first,
                end: p.end,
                done: inst.and_then(|i| i.replay_step).unwrap_or(0),
            },
            (None, Some(i)) => Plan { legacy: i.applied.clone(), first: i.history.first, end: i.history.next, done: 0 },
            (None, None) => Plan { legacy: Vec::new(), first: 0, end: 0, done: 0 },
        })
    }

    fn total(&self) -> u64 {
        self.legacy.len() as u64 + self.end.saturating_sub(self.first)
    }

    /// Steps `from..` of the history, at most `n`. A page ends before a timer's step unless
    /// it starts with one: the timer is set again by an earlier step, and its entry must be
    /// committed for the step that fires it to read it.
    fn refs(&self, core: &ShardCore, key: &SagaKey, from: u64, n: usize) -> Result<Vec<AppliedRef>, CoreError> {
        let total = self.total();
        let legacy = self.legacy.len() as u64;
        let mut out: Vec<AppliedRef> = Vec::new();
        let mut at = from;
        while out.len() < n && at < total {
            let more = if at < legacy {
                vec![self.legacy[at as usize].clone()]
            } else {
                let want = (n - out.len()).min((total - at) as usize);
                core.store.read()?.history(key, self.first + (at - legacy), want)?
            };
            if more.is_empty() {
                // An entry is missing: the page ends; its steps will not match.
                break;
            }
            for r in more {
                if r.stream == AppliedRef::TIMERS && !out.is_empty() {
                    return Ok(out);
                }
                out.push(r);
                at += 1;
            }
        }
        Ok(out)
    }

    fn page(&self, core: &ShardCore, key: &SagaKey, from_seq: u64) -> Result<ReplayPage, CoreError> {
        Ok(ReplayPage {
            correlation_id: key.correlation_id.clone(),
            at: self.done,
            refs: self.refs(core, key, self.done, REPLAY_PAGE)?,
            from_seq,
            total: self.total(),
            ended: false,
            aborted: None,
        })
    }
}

/// The next page of `key`'s replay.
pub(super) fn next(core: &ShardCore, st: &mut Staged, key: &SagaKey) -> Answer {
    let Some(mark) = core.replay_mark(st, key)? else { return Ok(Err(AdminError::NoReplay { key: key.clone() })) };
    let plan = Plan::of(core, st, key, &mark)?;
    Ok(Ok(AdminAnswer::Page(plan.page(core, key, mark.from_seq)?)))
}

fn ended(key: &SagaKey, at: u64, total: u64, from_seq: u64, aborted: Option<String>) -> AdminAnswer {
    AdminAnswer::Page(ReplayPage {
        correlation_id: key.correlation_id.clone(),
        at,
        refs: Vec::new(),
        from_seq,
        total,
        ended: true,
        aborted,
    })
}

/// Applies steps `at..` of `key`'s replay (see [`crate::message::AdminOp::ReplaySteps`]).
pub(super) fn steps(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    at: u64,
    steps: &[ReplayStep],
    now: u64,
) -> Answer {
    let Some(mut mark) = core.replay_mark(st, key)? else {
        return Ok(Err(AdminError::NoReplay { key: key.clone() }));
    };
    let started = mark.plan.is_some();
    if !started {
        let Some(parked) = core.instance(st, key)?.map(|i| i.parked.is_some()) else {
            // Removed (retention) since the replay was asked for: nothing to replay.
            core.set_replay_mark(st, key.clone(), None);
            return Ok(Ok(ended(key, 0, 0, mark.from_seq, None)));
        };
        if parked {
            return Ok(Err(AdminError::ReplayWhileParked { key: key.clone() }));
        }
        if core.is_blocked(st, key) {
            return Ok(Err(AdminError::ReplayWhileRetrying { key: key.clone() }));
        }
    }
    let plan = Plan::of(core, st, key, &mark)?;
    if at != plan.done {
        return Ok(Err(AdminError::ReplayConflict { key: key.clone(), at, done: plan.done }));
    }
    // Each step is checked against the history before anything is staged.
    let refs = plan.refs(core, key, at, steps.len())?;
    for (i, step) in steps.iter().enumerate() {
        let index = at + i as u64;
        let Some(r) = refs.get(i) else {
            let why = if index >= plan.total() { "it is past the history's end" } else { "a page ends before it" };
            return Ok(Err(AdminError::ReplayStepMismatch { key: key.clone(), index, why: why.into() }));
        };
        let read_back = r.from_stream() && r.seq >= mark.from_seq;
        let mismatch = match step {
            ReplayStep::Event(e) if !read_back || e.id != r.id => Some(format!("event {}", e.id)),
            ReplayStep::Own if read_back => Some("no event".to_owned()),
            _ => None,
        };
        if let Some(got) = mismatch {
            let why = format!("the history has {} #{} (event {}) there, the step {got}", r.stream, r.seq, r.id);
            return Ok(Err(AdminError::ReplayStepMismatch { key: key.clone(), index, why }));
        }
    }
    if !started {
        let Some(plan) = reset(core, st, key, now)? else {
            return Ok(Err(AdminError::UnreadableInstance {
                key: key.clone(),
                error: "its record cannot be kept for an abort".into(),
            }));
        };
        mark.plan = Some(plan);
        core.set_replay_mark(st, key.clone(), Some(mark.clone()));
    }
    let target = Target { saga: key.saga.clone(), correlation_id: key.correlation_id.clone(), may_start: false };
    for (i, (step, r)) in steps.iter().zip(&refs).enumerate() {
        let p = match step {
            ReplayStep::Event(event) => {
                Some(Pending { event: event.clone(), target: target.clone(), origin: Origin::Replayed })
            }
            ReplayStep::Own => own_step(core, st, key, r, &target)?,
        };
        // A step whose timer or result is gone (the event that set it was below
        // `from_seq`) is passed over.
        let Some(p) = p else { continue };
        if let Err(error) = apply_one(core, st, key, &p, now)? {
            // The program fails on an event the instance applied before (it changed): the
            // instance goes back to what it was, nothing of the replay stays.
            let why = format!("step {} ({} #{}, event {}) fails now: {error}", at + i as u64, r.stream, r.seq, r.id);
            tracing::error!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, error = %why, "replay given up; the instance is put back as it was");
            abort_started(core, st, key, &mark, now)?;
            return Ok(Ok(ended(key, at, plan.total(), mark.from_seq, Some(why))));
        }
    }
    let done = at + steps.len() as u64;
    if core.instance(st, key)?.is_some()
        && let Some(inst) = core.instance_mut(st, key, false)
    {
        inst.replay_step = Some(done);
    }
    let plan = Plan { done, ..plan };
    if done < plan.total() {
        return Ok(Ok(AdminAnswer::Page(plan.page(core, key, mark.from_seq)?)));
    }
    finish(core, st, key, &mark, now)?;
    Ok(Ok(ended(key, done, plan.total(), mark.from_seq, None)))
}

/// The event of a step the shard keeps itself: a timer (set again by an earlier step), a
/// result applied in place (db `results`); `None` for an event below `from_seq` or a timer or
/// result no longer there.
fn own_step(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    r: &AppliedRef,
    target: &Target,
) -> Result<Option<Pending>, CoreError> {
    if r.stream == AppliedRef::TIMERS {
        let due_at = core.instance(st, key)?.and_then(|i| i.timers.as_ref().and_then(|t| t.get(&r.id).copied()));
        let Some(due_at) = due_at else { return Ok(None) };
        let sk = ScheduleKey { due_at, saga: key.clone(), timer_id: r.id.clone() };
        let Some(entry) = core.store.read()?.schedule(&sk)? else { return Ok(None) };
        let event = super::timers::timer_event(&sk, &entry);
        st.overlay.schedules_changed = true;
        return Ok(Some(Pending { event: Arc::new(event), target: target.clone(), origin: Origin::ReplayTimer(sk) }));
    }
    if r.seq == 0 {
        let rkey = ResultKey { saga: key.clone(), event_id: r.id.clone() };
        let Some(event) = core.store.read()?.result(&rkey)? else { return Ok(None) };
        return Ok(Some(Pending { event: Arc::new(event), target: target.clone(), origin: Origin::Recorded }));
    }
    // A stream event below the replay's `from_seq`: not applied again.
    Ok(None)
}

/// Resets the instance for its replay and holds its key; the plan records the history to
/// apply again and the record as it was (for an abort). `None`: the record cannot be kept.
fn reset(core: &ShardCore, st: &mut Staged, key: &SagaKey, now: u64) -> Result<Option<ReplayPlan>, CoreError> {
    let Some(inst) = core.instance(st, key)? else { return Ok(None) };
    let Ok(before) = serde_json::value::to_raw_value(inst) else { return Ok(None) };
    let Some(inst) = core.instance_mut(st, key, false) else { return Ok(None) };
    let plan = ReplayPlan {
        legacy: std::mem::take(&mut inst.applied),
        first: inst.history.first,
        end: inst.history.next,
        before,
    };
    // The rebuilt history is appended after the old one, which goes at the end.
    inst.history.first = inst.history.next;
    inst.state = Dynamic::UNIT;
    inst.status = InstanceStatus::Running;
    inst.version = 0;
    inst.last_seq.clear();
    inst.outstanding.clear();
    inst.replay_step = Some(0);
    inst.updated_at = now;
    tracing::info!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, steps = plan.legacy.len() as u64 + plan.end - plan.first, "replay: instance reset, its key held");
    hold_for_replay(core, st, key.clone());
    Ok(Some(plan))
}

/// The last step is applied: the old history goes, the key is released.
fn finish(core: &ShardCore, st: &mut Staged, key: &SagaKey, mark: &ReplayMark, now: u64) -> Result<(), CoreError> {
    if let Some(plan) = &mark.plan {
        for index in plan.first..plan.end {
            st.batch.delete_history(&HistoryKey { saga: key.clone(), index });
        }
    }
    if core.instance(st, key)?.is_some()
        && let Some(inst) = core.instance_mut(st, key, false)
    {
        inst.replay_step = None;
        inst.updated_at = now;
    }
    core.set_replay_mark(st, key.clone(), None);
    tracing::info!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, "replay finished; its key released");
    release_replay(core, st, key, now)
}

/// Gives `key`'s replay up (see [`crate::message::AdminOp::ReplayAbort`]).
pub(super) fn abort(core: &ShardCore, st: &mut Staged, key: &SagaKey, reason: &str, now: u64) -> Answer {
    let Some(mark) = core.replay_mark(st, key)? else { return Ok(Err(AdminError::NoReplay { key: key.clone() })) };
    tracing::warn!(shard = core.shard, tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, reason, started = mark.plan.is_some(), "replay given up");
    if mark.plan.is_none() {
        core.set_replay_mark(st, key.clone(), None);
        return Ok(Ok(AdminAnswer::Aborted { aborted: key.correlation_id.clone(), restored: false }));
    }
    abort_started(core, st, key, &mark, now)?;
    Ok(Ok(AdminAnswer::Aborted { aborted: key.correlation_id.clone(), restored: true }))
}

/// Puts a started replay's instance back as it was before its reset: its record, its
/// history (the rebuilt entries go), its pending timers (those the replay set again go);
/// then releases the key. The work the replay staged was all suppressed.
fn abort_started(
    core: &ShardCore,
    st: &mut Staged,
    key: &SagaKey,
    mark: &ReplayMark,
    now: u64,
) -> Result<(), CoreError> {
    core.set_replay_mark(st, key.clone(), None);
    let Some(plan) = &mark.plan else { return Ok(()) };
    let before: Instance = serde_json::from_str(plan.before.get()).map_err(|e| CoreError::Unreadable {
        shard: core.shard,
        key: key.clone(),
        why: format!("the record kept for its replay: {e}"),
    })?;
    if let Some((rebuilt, set)) = core.instance(st, key)?.map(|i| (i.history, i.timers.clone())) {
        for index in rebuilt.first..rebuilt.next {
            st.batch.delete_history(&HistoryKey { saga: key.clone(), index });
        }
        if let (Some(set), Some(kept)) = (set, &before.timers) {
            for (timer_id, due_at) in set.into_iter().filter(|(id, _)| !kept.contains_key(id)) {
                st.batch.delete_schedule(&ScheduleKey { due_at, saga: key.clone(), timer_id });
            }
        }
        if let Some(inst) = core.instance_mut(st, key, true) {
            *inst = before;
            inst.updated_at = now;
        }
    }
    st.overlay.schedules_changed = true;
    release_replay(core, st, key, now)
}
