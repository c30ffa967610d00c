//! Dispatch results from the bridge (invariant 2): an item is deleted only after its
//! dispatch was durably confirmed; a failed one is re-stored with its next attempt time,
//! and past its limit becomes a dead letter — never silently dropped.

use super::{After, ShardCore, Staged};
use crate::ids;
use crate::keys::DeadLetterKey;
use crate::message::{DispatchOutcome, DispatchResult};
use crate::record::{DeadLetter, DeadLetterKind};

pub(super) fn dispatched(core: &mut ShardCore, st: &mut Staged, r: &DispatchResult, now: u64) {
    // The item is copied only for a failed dispatch (it is re-stored or dead-lettered).
    let item = match r.outcome {
        DispatchOutcome::Delivered => None,
        _ => core.relay.borrow().in_flight_item(&r.key).cloned(),
    };
    match (&r.outcome, item) {
        (DispatchOutcome::Delivered, _) => {
            // Deleting twice is harmless; an unknown key was confirmed after a re-dispatch.
            st.batch.delete_outbox(r.key);
            st.stats.outbox_deleted += 1;
            st.after.push(After::RelayDelivered(r.key));
        }
        (DispatchOutcome::Retry { error }, Some(mut item)) => {
            item.attempts += 1;
            let cfg = core.relay.borrow().config().clone();
            if item.attempts >= cfg.max_attempts {
                dead_letter(
                    core,
                    st,
                    r.key,
                    item,
                    &format!("dispatch failed {} times, last: {error}", cfg.max_attempts),
                    now,
                );
                return;
            }
            let unit = (crate::routing::stable_hash(
                &item.tenant,
                crate::routing::RouteKey::Effect { command_id: &item.work_id },
            ) % 1000) as f64
                / 1000.0;
            item.next_attempt_at = now + cfg.retry.backoff_jittered(item.attempts, unit).max(1);
            tracing::warn!(shard = core.shard, tenant = %item.tenant, saga = %item.saga, correlation_id = %item.correlation_id, work_id = %item.work_id, attempts = item.attempts, error = %error, "dispatch failed; will retry");
            item.last_error = Some(error.clone());
            st.batch.put_outbox(r.key, &item);
            st.after.push(After::RelayRetry(r.key, item));
        }
        (DispatchOutcome::Permanent { error }, Some(item)) => dead_letter(core, st, r.key, item, error, now),
        (_, None) => {
            // A late answer for an item no longer in flight: the store decides on the next scan.
        }
    }
}

fn dead_letter(
    core: &mut ShardCore,
    st: &mut Staged,
    key: crate::keys::OutboxKey,
    item: crate::record::OutboxItem,
    error: &str,
    now: u64,
) {
    tracing::error!(shard = core.shard, tenant = %item.tenant, saga = %item.saga, correlation_id = %item.correlation_id, work_id = %item.work_id, error = %error, "dispatch given up; item moved to dead letters");
    let at = core.next_deadletter_at(now);
    let id = ids::deadletter_id("outbox", key.seq, &item.work_id, &item.saga, &item.correlation_id);
    let letter = DeadLetter {
        id: id.clone(),
        kind: DeadLetterKind::Dispatch,
        partition: key.partition,
        tenant: item.tenant.clone(),
        at,
        error: error.to_owned(),
        saga: Some(item.saga.clone()),
        correlation_id: Some(item.correlation_id.clone()),
        stream: None,
        seq: 0,
        subject: None,
        headers: Default::default(),
        raw: None,
        event: None,
        attempts: item.attempts,
        work: Some(item.clone()),
    };
    st.batch.put_deadletter(&DeadLetterKey { tenant: item.tenant.clone(), at, id }, &letter);
    st.batch.delete_outbox(key);
    st.stats.deadletters += 1;
    st.stats.outbox_deleted += 1;
    st.after.push(After::RelayDelivered(key));
}
