//! Durable timers and retention. A due timer becomes a `timer` event for its instance; the
//! schedule entry is deleted in the same transaction that applies it (or quarantines or
//! drops it), so a restart can neither lose nor repeat it.

use super::{CoreError, Origin, Pending, ShardCore, Staged};
use crate::message::{Event, Target};
use crate::record::InstanceStatus;
use std::sync::Arc;

/// Fires the timers due up to `until` (the streams' watermark, at most `now`).
pub(super) fn fire_due(core: &ShardCore, st: &mut Staged, until: u64, now: u64) -> Result<(), CoreError> {
    if core.next_due.is_none_or(|t| t > until) {
        return Ok(());
    }
    let due = core.store.read()?.due_schedules(until, core.cfg.timer_batch + core.held_count(st))?;
    for (sk, entry) in due {
        if core.is_held(st, &sk) {
            continue;
        }
        tracing::debug!(shard = core.shard, correlation_id = %sk.saga.correlation_id, timer_id = %sk.timer_id, due_at = sk.due_at, "timer fires");
        let event = timer_event(&sk, &entry);
        let target =
            Target { saga: sk.saga.saga.clone(), correlation_id: sk.saga.correlation_id.clone(), may_start: false };
        let lag = now.saturating_sub(sk.due_at);
        st.stats.timers_fired += 1;
        st.stats.timer_lag_ms_sum += lag;
        st.stats.timer_lag_ms_max = st.stats.timer_lag_ms_max.max(lag);
        st.overlay.schedules_changed = true;
        super::apply::route(core, st, &Pending { event: Arc::new(event), target, origin: Origin::Timer(sk) }, now)?;
    }
    Ok(())
}

/// The `timer` event a due schedule entry becomes.
pub(super) fn timer_event(sk: &crate::keys::ScheduleKey, entry: &crate::record::ScheduleEntry) -> Event {
    let payload = match serde_json::from_str::<serde_json::Value>(entry.payload.get()) {
        Ok(v) => v,
        Err(e) => {
            // Written by this shard from a program's value, so it parses; if the file was
            // damaged, the program sees `null` and the log says why.
            tracing::error!(timer_id = %sk.timer_id, error = %e, "stored timer payload is not JSON; the program sees null");
            serde_json::Value::Null
        }
    };
    let data = serde_json::json!({
        "name": entry.name,
        "payload": payload,
        "scheduled_at": entry.scheduled_at,
    });
    Event {
        id: sk.timer_id.clone(),
        event_type: "timer".into(),
        stream: "timers".into(),
        seq: 0,
        subject: format!("workflow.timers.{}.{}.{}", subject_token(&sk.saga.tenant), sk.saga.saga, entry.name),
        tenant: sk.saga.tenant.clone(),
        timestamp: sk.due_at,
        data,
        traceparent: entry.traceparent.clone(),
        result: None,
        headers: Default::default(),
    }
}

/// The NATS subject token for a tenant (`_` for the empty tenant).
pub fn subject_token(tenant: &str) -> &str {
    if tenant.is_empty() { "_" } else { tenant }
}

/// The earliest timer not held behind a blocked key (read after a commit changed the
/// schedule table).
pub(super) fn next_due(core: &ShardCore) -> Option<u64> {
    let next = core
        .store
        .read()
        .and_then(|v| v.due_schedules(u64::MAX, core.held_timers.len() + 1))
        .map(|due| due.into_iter().find(|(k, _)| !core.held_timers.contains(k)).map(|(k, _)| k.due_at));
    match next {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(shard = core.shard, error = %e, "cannot read the schedule table; timers are looked at again at once");
            Some(0)
        }
    }
}

#[derive(serde::Deserialize)]
struct Final {
    status: InstanceStatus,
    updated_at: u64,
    #[serde(default)]
    parked: Option<serde::de::IgnoredAny>,
}

/// Removes completed and failed instances older than the retention, a page at a time.
pub(super) fn sweep_retention(core: &ShardCore, st: &mut Staged, now: u64) -> Result<(), CoreError> {
    let Some(retention) = core.cfg.retention_ms else { return Ok(()) };
    if core.cfg.retention_sweep == 0 || now < core.next_sweep {
        return Ok(());
    }
    let page = core.store.read()?.sagas_page::<Final>(core.retention_cursor.as_ref(), core.cfg.retention_sweep)?;
    let cursor = if page.len() < core.cfg.retention_sweep { None } else { page.last().map(|(k, _)| k.clone()) };
    st.overlay.retention = Some((cursor, now + 10_000));
    for (key, rec) in page {
        if rec.status.is_final()
            && rec.parked.is_none()
            && rec.updated_at.saturating_add(retention) < now
            && !st.overlay.instances.contains_key(&key)
        {
            st.batch.delete_saga(&key);
            st.overlay.loaded.remove(&key);
            st.overlay.removed.push(key);
        }
    }
    Ok(())
}
