//! The effect gate (invariant 4): `started` is recorded durably before the provider runs,
//! `completed` (with the exact result event) only after the result's PubAck; a command
//! already completed is answered with its recorded result, and one running in this process
//! is not started twice.

use super::{After, CoreError, ReplyCell, ShardCore, Staged};
use crate::keys::EffectKey;
use crate::message::GateDecision;
use crate::record::EffectRecord;

pub(super) fn begin(
    core: &mut ShardCore,
    st: &mut Staged,
    key: EffectKey,
    msg_seq: u64,
    reply: ReplyCell<GateDecision>,
    now: u64,
) -> Result<(), CoreError> {
    if let Err(e) = key.validate() {
        st.after.push(After::Gate(reply, GateDecision::Invalid { reason: e.to_string() }));
        return Ok(());
    }
    if let Some(&seq) = core.in_flight_effects.get(&key) {
        st.after.push(After::Gate(reply, GateDecision::Busy { same_message: seq == msg_seq }));
        return Ok(());
    }
    let record = match st.effects.get(&key) {
        Some(r) => Some(r.clone()),
        None => core.store.read()?.effect(&key)?,
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
            st.batch.put_effect(&key, &record);
            st.effects.insert(key.clone(), record);
            core.set_in_flight(st, key, Some(msg_seq));
            st.stats.effects_started += 1;
            GateDecision::Run { attempt: attempts }
        }
    };
    st.after.push(After::Gate(reply, decision));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn finish(
    core: &mut ShardCore,
    st: &mut Staged,
    key: EffectKey,
    attempts: u32,
    subject: &str,
    outcome: &str,
    result: &[u8],
    reply: ReplyCell<Result<(), String>>,
    now: u64,
) {
    let result =
        match std::str::from_utf8(result).ok().filter(|s| serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()) {
            Some(r) => r.to_owned(),
            None => {
                st.after.push(After::Done(reply, Err(format!("result of command {} is not JSON", key.command_id))));
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
    st.batch.put_effect(&key, &record);
    st.effects.insert(key.clone(), record);
    if core.in_flight_effects.contains_key(&key) {
        core.set_in_flight(st, key, None);
    }
    st.stats.effects_completed += 1;
    st.after.push(After::Done(reply, Ok(())));
}

pub(super) fn release(core: &mut ShardCore, st: &mut Staged, key: EffectKey) {
    if core.in_flight_effects.contains_key(&key) {
        core.set_in_flight(st, key, None);
    }
}
