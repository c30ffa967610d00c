//! Dispatch results from the bridge (invariant 2): an item is deleted only after its
//! dispatch was durably confirmed; a failed one is re-stored with its next attempt time,
//! and past its limit becomes a dead letter — never silently dropped.

use super::{Action, ShardCore, Staged};
use crate::ids;
use crate::keys::{DeadLetterKey, OutboxKey};
use crate::message::DispatchOutcome;
use crate::record::{DeadLetter, DeadLetterKind, OutboxItem};

/// `item` is the dispatched item as the relay tracks it; `None` for a late answer about an
/// item no longer in flight (the store decides on the next scan).
pub(super) fn dispatched(
    core: &ShardCore,
    st: &mut Staged,
    key: OutboxKey,
    outcome: &DispatchOutcome,
    item: Option<&OutboxItem>,
    now: u64,
) {
    match (outcome, item) {
        (DispatchOutcome::Delivered, _) => {
            // Deleting twice is harmless; an unknown key was confirmed after a re-dispatch.
            st.batch.delete_outbox(key);
            st.stats.outbox_deleted += 1;
            st.actions.push(Action::Delivered { key });
        }
        (DispatchOutcome::Retry { error }, Some(item)) => {
            let mut item = item.clone();
            item.attempts += 1;
            let limit = core.cfg.dispatch_attempts;
            if item.attempts >= limit {
                let error = format!("dispatch failed {limit} times, last: {error}");
                dead_letter(core, st, key, item, &error, now);
                return;
            }
            let unit = (crate::routing::stable_hash(
                &item.tenant,
                crate::routing::RouteKey::Effect { command_id: &item.work_id },
            ) % 1000) as f64
                / 1000.0;
            item.next_attempt_at = now + core.cfg.dispatch_retry.backoff_jittered(item.attempts, unit).max(1);
            tracing::warn!(shard = core.shard, tenant = %item.tenant, saga = %item.saga, correlation_id = %item.correlation_id, work_id = %item.work_id, attempts = item.attempts, error = %error, "dispatch failed; will retry");
            item.last_error = Some(error.clone());
            st.batch.put_outbox(key, &item);
            st.actions.push(Action::RetryLater { key, item });
        }
        (DispatchOutcome::Permanent { error }, Some(item)) => dead_letter(core, st, key, item.clone(), error, now),
        (_, None) => {
            // A late answer for an item no longer in flight: the store decides on the next scan.
        }
    }
}

fn dead_letter(core: &ShardCore, st: &mut Staged, key: OutboxKey, item: OutboxItem, error: &str, now: u64) {
    tracing::error!(shard = core.shard, tenant = %item.tenant, saga = %item.saga, correlation_id = %item.correlation_id, work_id = %item.work_id, error = %error, "dispatch given up; item moved to dead letters");
    let at = core.next_deadletter_at(st, now);
    let id = ids::deadletter_id("outbox", key.seq, &item.work_id, &item.saga, &item.correlation_id);
    let tenant = item.tenant.clone();
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
        work: Some(item),
    };
    st.batch.put_deadletter(&DeadLetterKey { tenant, at, id }, &letter);
    st.batch.delete_outbox(key);
    st.stats.deadletters += 1;
    st.stats.outbox_deleted += 1;
    st.actions.push(Action::Delivered { key });
}
