//! The effect gate (invariant 4): `started` is recorded durably before the provider runs,
//! `completed` (with the exact result event) only after the result's PubAck; a command
//! already completed is answered with its recorded result, and one running in this process
//! is not started twice.
//!
//! Completed records are pruned once they are older than the retention
//! (`CoreConfig::effect_retention_ms`), one slice of the table per batch at most
//! (invariant 12: every table is bounded).

use super::{Action, CoreError, RequestId, ShardCore, Staged};
use crate::keys::EffectKey;
use crate::message::{FinishError, GateDecision};
use crate::record::EffectRecord;

/// Wait between two slices of one pass over the effect table: at most twenty slices a
/// second, so a large table costs the shard a small share of its thread.
const SLICE_PAUSE_MS: u64 = 50;
/// Wait between the end of one pass and the start of the next, at most (a quarter of the
/// retention when that is shorter, so a record outlives its retention by little).
const PASS_PAUSE_MS: u64 = 10_000;

pub(super) fn begin(
    core: &ShardCore,
    st: &mut Staged,
    request: RequestId,
    key: &EffectKey,
    msg_seq: u64,
    now: u64,
) -> Result<(), CoreError> {
    if let Err(e) = key.validate() {
        st.actions.push(Action::Gate { request, decision: GateDecision::Invalid { reason: e.to_string() } });
        return Ok(());
    }
    if let Some(seq) = core.in_flight(st, key) {
        st.actions.push(Action::Gate { request, decision: GateDecision::Busy { same_message: seq == msg_seq } });
        return Ok(());
    }
    let record = match st.overlay.effects.get(key) {
        Some(r) => Some(r.clone()),
        None => core.store.read()?.effect(key)?,
    };
    let decision = match record {
        Some(EffectRecord::Completed { subject, outcome, result, .. }) => {
            GateDecision::Completed { subject, outcome, result: result.into_bytes() }
        }
        started => {
            let attempts = match started {
                Some(EffectRecord::Started { attempts, .. }) => attempts + 1,
                _ => 1,
            };
            let record = EffectRecord::Started { attempts, updated_at: now };
            st.batch.put_effect(key, &record);
            st.overlay.effects.insert(key.clone(), record);
            core.set_in_flight(st, key.clone(), Some(msg_seq));
            st.stats.effects_started += 1;
            GateDecision::Run { attempt: attempts }
        }
    };
    st.actions.push(Action::Gate { request, decision });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn finish(
    st: &mut Staged,
    request: RequestId,
    key: &EffectKey,
    attempts: u32,
    subject: &str,
    outcome: &str,
    result: &[u8],
    now: u64,
) {
    let result =
        match std::str::from_utf8(result).ok().filter(|s| serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()) {
            Some(r) => r.to_owned(),
            None => {
                let e = FinishError::ResultNotJson { tenant: key.tenant.clone(), command_id: key.command_id.clone() };
                st.actions.push(Action::Done { request, result: Err(e) });
                return;
            }
        };
    let record = EffectRecord::Completed {
        attempts,
        updated_at: now,
        subject: subject.to_owned(),
        outcome: outcome.to_owned(),
        result,
    };
    st.batch.put_effect(key, &record);
    st.overlay.effects.insert(key.clone(), record);
    // Whether or not this process ran it, it is no longer in flight.
    st.overlay.in_flight.insert(key.clone(), None);
    st.stats.effects_completed += 1;
    st.actions.push(Action::Done { request, result: Ok(()) });
}

pub(super) fn release(core: &ShardCore, st: &mut Staged, key: &EffectKey) {
    if core.in_flight(st, key).is_some() {
        core.set_in_flight(st, key.clone(), None);
    }
}

/// What the prune reads of a gate record (the result body is skipped, not decoded).
#[derive(serde::Deserialize)]
struct Age {
    status: AgeStatus,
    updated_at: u64,
}

#[derive(serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum AgeStatus {
    Started,
    Completed,
}

/// Deletes completed gate records older than the retention: one slice of at most
/// `effect_sweep` records per call, resuming where the last one stopped. `started` records
/// stay (the provider may be running, or a crash left the command to be delivered again),
/// and so does a record this batch wrote or a call in flight here.
pub(super) fn prune(core: &ShardCore, st: &mut Staged, now: u64) -> Result<(), CoreError> {
    let Some(retention) = core.cfg.effect_retention_ms else { return Ok(()) };
    if core.cfg.effect_sweep == 0 || now < core.next_effect_prune {
        return Ok(());
    }
    let page = core.store.read()?.effects_page::<Age>(core.effect_cursor.as_ref(), core.cfg.effect_sweep)?;
    let more = page.len() >= core.cfg.effect_sweep;
    let cursor = if more { page.last().map(|(k, _)| k.clone()) } else { None };
    let pause = if more { SLICE_PAUSE_MS } else { (retention / 4).clamp(SLICE_PAUSE_MS, PASS_PAUSE_MS) };
    st.overlay.effect_prune = Some((cursor, now + pause));
    for (key, age) in page {
        let age = match age {
            Ok(a) => a,
            Err(e) => {
                // Left for an operator; the gate reports the same error for this command.
                tracing::warn!(shard = core.shard, tenant = %key.tenant, command_id = %key.command_id, error = %e, "effect record cannot be read; not pruned");
                continue;
            }
        };
        if age.status == AgeStatus::Completed
            && age.updated_at.saturating_add(retention) < now
            && !st.overlay.effects.contains_key(&key)
            && core.in_flight(st, &key).is_none()
        {
            st.batch.delete_effect(&key);
            st.stats.effects_pruned += 1;
        }
    }
    Ok(())
}
