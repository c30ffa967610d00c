//! Dispatch results from the bridge (invariant 2): an item is deleted only after its
//! dispatch was durably confirmed; a failed one is re-stored with its next attempt time,
//! and past its limit (if one is configured) becomes a dead letter — never silently
//! dropped; an operator can re-send it (see `admin::resend`).

use super::{Action, CoreError, Origin, Pending, ShardCore, Staged};
use crate::ids;
use crate::keys::{DeadLetterKey, OutboxKey};
use crate::message::{DispatchOutcome, Target};
use crate::record::{DeadLetter, DeadLetterKind, OutboxItem, WorkKind};
use std::sync::Arc;

/// `item` is the dispatched item as the relay tracks it; `None` for a late answer about an
/// item no longer in flight (the store decides on the next scan).
pub(super) fn dispatched(
    core: &ShardCore,
    st: &mut Staged,
    key: OutboxKey,
    outcome: &DispatchOutcome,
    item: Option<&OutboxItem>,
    now: u64,
) -> Result<(), CoreError> {
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
            if let Some(limit) = core.cfg.dispatch_attempts
                && item.attempts >= limit
            {
                let error = format!("dispatch failed {limit} times, last: {error}");
                dead_letter(core, st, key, item, &error, now);
                return Ok(());
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
        (DispatchOutcome::Ran(ran), Some(item)) => {
            // The result applies to the saga like a consumed one; settling it deletes the item
            // and records the call for the streams (see `apply::settle`). Until then (a
            // blocked key) the item stays in the store, so a crash runs the call again.
            let target =
                Target { saga: item.saga.clone(), correlation_id: item.correlation_id.clone(), may_start: false };
            let audit = Box::new(RanAudit {
                item: item.clone(),
                command_subject: ran.command_subject.clone(),
                command: ran.command.clone(),
                result_subject: ran.result_subject.clone(),
                result: ran.result.clone(),
            });
            let pending = Pending { event: Arc::new(ran.event.clone()), target, origin: Origin::Ran { key, audit } };
            st.stats.events += 1;
            super::apply::route(core, st, &pending, now)?;
        }
        (DispatchOutcome::Later { wait_ms, error, attempt }, Some(item)) => {
            // The effect's own retry policy chose the wait (or its breaker is open); it gives
            // up with a failed result, so nothing is dead-lettered here.
            let mut item = item.clone();
            if *attempt {
                item.attempts += 1;
            }
            item.next_attempt_at = now + (*wait_ms).max(1);
            item.last_error = Some(error.clone());
            st.batch.put_outbox(key, &item);
            st.actions.push(Action::RetryLater { key, item });
        }
        (_, None) => {
            // A late answer for an item no longer in flight: the store decides on the next scan.
        }
    }
    Ok(())
}

/// The record of an effect run in place, published once its result is settled.
#[derive(Debug, Clone)]
pub struct RanAudit {
    pub item: OutboxItem,
    pub command_subject: String,
    pub command: Vec<u8>,
    pub result_subject: String,
    pub result: Vec<u8>,
}

impl PartialEq for RanAudit {
    fn eq(&self, other: &Self) -> bool {
        self.item.work_id == other.item.work_id && self.command == other.command && self.result == other.result
    }
}

impl RanAudit {
    /// The outbox item that publishes the command and its result (deterministic id, so a
    /// crash between its commit and its publish cannot make a second record).
    pub(super) fn outbox_item(&self, now: u64) -> OutboxItem {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let json = |b: &[u8]| serde_json::from_slice::<&serde_json::value::RawValue>(b).is_ok();
        // Both bodies are JSON the caller encoded; kept as JSON when they parse, as text if
        // not (the publish then carries the same bytes either way).
        let body = |b: &[u8]| {
            if json(b) {
                serde_json::value::RawValue::from_string(text(b)).unwrap_or_else(|_| crate::record::json_null())
            } else {
                serde_json::value::to_raw_value(&text(b)).unwrap_or_else(|_| crate::record::json_null())
            }
        };
        let payload = format!(
            r#"{{"command_subject":{},"command":{},"result_subject":{},"result":{}}}"#,
            serde_json::Value::String(self.command_subject.clone()),
            body(&self.command).get(),
            serde_json::Value::String(self.result_subject.clone()),
            body(&self.result).get(),
        );
        let effect = match &self.item.kind {
            WorkKind::Effect { effect } => effect.clone(),
            _ => String::new(),
        };
        OutboxItem {
            work_id: format!("audit:{}", self.item.work_id),
            kind: WorkKind::Audit { effect },
            tenant: self.item.tenant.clone(),
            saga: self.item.saga.clone(),
            correlation_id: self.item.correlation_id.clone(),
            traceparent: self.item.traceparent.clone(),
            source_event_id: self.item.source_event_id.clone(),
            payload: serde_json::value::RawValue::from_string(payload).unwrap_or_else(|_| crate::record::json_null()),
            created_at: now,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            suppressed: self.item.suppressed,
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
