//! The effect gate (invariant 4): `started` is recorded durably before the provider runs,
//! `completed` (with the exact result event) only after the result's PubAck; a command
//! already completed is answered with its recorded result, and one running in this process
//! is not started twice.

use super::{Action, CoreError, RequestId, ShardCore, Staged};
use crate::keys::EffectKey;
use crate::message::{FinishError, GateDecision};
use crate::record::EffectRecord;

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
