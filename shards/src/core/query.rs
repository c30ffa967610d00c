//! Read-only answers from committed state (inspection, listings, stats). Each reads a
//! bounded amount: one instance, its timers by key, its partition's outbox up to a cap, a
//! page of a listing.

use super::ShardCore;
use crate::keys::{DeadLetterKey, EffectKey, SagaKey, ScheduleKey};
use crate::message::{BlockedView, DeadLetterView, SagaPage, SagaView, ShardStats, TimerView};
use crate::record::EffectRecord;
use crate::store::StoreError;

/// Where a dead letter lists: letters of a stream message by (stream, sequence), which a
/// restart or a clock cannot change; then the others (timers, results applied in place,
/// dispatch failures) by their stamp. Ties (one message dead-lettered for several sagas,
/// or twice) by stamp and id.
pub fn deadletter_order(v: &DeadLetterView) -> (bool, &str, u64, u64, &str) {
    match (&v.letter.stream, v.letter.seq) {
        (Some(stream), seq) if seq > 0 => (false, stream, seq, v.key.at, &v.key.id),
        _ => (true, "", 0, v.key.at, &v.key.id),
    }
}

/// Outbox items of an instance's partition read for one saga query at most.
const OUTBOX_SCAN: usize = 4_096;

impl ShardCore {
    /// One instance with its pending timers, outbox items and retry state.
    pub fn saga_view(&self, key: &SagaKey) -> Result<Option<SagaView>, StoreError> {
        let view = self.store.read()?;
        let Some(record) = view.saga(key)? else { return Ok(None) };
        let timers: Vec<(ScheduleKey, crate::record::ScheduleEntry)> = match &record.timers {
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (timer_id, &due_at) in list {
                    let sk = ScheduleKey { due_at, saga: key.clone(), timer_id: timer_id.clone() };
                    if let Some(entry) = view.schedule(&sk)? {
                        out.push((sk, entry));
                    }
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                out
            }
            None => view.schedules_of(key)?,
        };
        let pending_timers = timers
            .into_iter()
            .map(|(k, e)| TimerView { timer_id: k.timer_id, due_at: k.due_at, name: e.name, payload: e.payload })
            .collect();
        let partition = self.router.partition(&key.tenant, key.route());
        let (items, truncated) = view.outbox_of_partition(partition, OUTBOX_SCAN)?;
        let pending_outbox = items
            .into_iter()
            .filter(|(_, i)| i.saga == key.saga && i.correlation_id == key.correlation_id && i.tenant == key.tenant)
            .map(|(_, i)| i)
            .collect();
        let blocked = self.blocked.get(key).map(|b| match &b.retry {
            Some(r) => BlockedView {
                attempts: r.attempts,
                retry_at: r.retry_at,
                error: r.error.clone(),
                queued: b.queue.len(),
                event_id: r.head.event.id.clone(),
                replaying: false,
            },
            None => BlockedView {
                attempts: 0,
                retry_at: 0,
                error: String::new(),
                queued: b.queue.len(),
                event_id: String::new(),
                replaying: true,
            },
        });
        Ok(Some(SagaView {
            tenant: key.tenant.clone(),
            saga: key.saga.clone(),
            correlation_id: key.correlation_id.clone(),
            shard: self.shard,
            record,
            pending_timers,
            pending_outbox,
            pending_outbox_truncated: truncated,
            blocked,
        }))
    }

    /// The effect gate record of one command.
    pub fn effect_record(&self, key: &EffectKey) -> Result<Option<EffectRecord>, StoreError> {
        self.store.read()?.effect(key)
    }

    /// Dead letters of a tenant: the first `limit` written after `after`, listed in
    /// [`deadletter_order`].
    pub fn deadletter_views(
        &self,
        tenant: &str,
        after: Option<&DeadLetterKey>,
        limit: usize,
    ) -> Result<Vec<DeadLetterView>, StoreError> {
        let mut views: Vec<DeadLetterView> = self
            .store
            .read()?
            .deadletters(tenant, after, limit)?
            .into_iter()
            .map(|(key, letter)| DeadLetterView { letter, key, shard: self.shard })
            .collect();
        views.sort_by(|a, b| deadletter_order(a).cmp(&deadletter_order(b)));
        Ok(views)
    }

    /// A page of the instances of one saga of one tenant.
    pub fn saga_page(
        &self,
        tenant: &str,
        saga: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<SagaPage, StoreError> {
        let limit = limit.max(1);
        let found = self.store.read()?.sagas_of::<serde::de::IgnoredAny>(tenant, saga, after, limit)?;
        let full = found.len() == limit;
        let correlation_ids: Vec<String> = found.into_iter().map(|(k, _)| k.correlation_id).collect();
        let next = if full { correlation_ids.last().cloned() } else { None };
        Ok(SagaPage { correlation_ids, next })
    }

    /// One shard's page of a listing (see [`Query::List`](crate::message::Query::List)).
    pub fn saga_list(
        &self,
        tenant: &str,
        saga: &str,
        filter: &crate::message::ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::message::SagaList, StoreError> {
        /// The fields a listing reads of a record (the state is not decoded).
        #[derive(serde::Deserialize)]
        struct Summary {
            status: crate::record::InstanceStatus,
            version: u64,
            updated_at: u64,
            #[serde(default)]
            parked: Option<serde::de::IgnoredAny>,
        }
        let limit = limit.max(1);
        let prefix = filter.correlation_prefix.as_deref().unwrap_or("");
        let scan = crate::message::LIST_SCAN;
        let read = self.store.read()?.sagas_of::<Summary>(tenant, saga, after, scan)?;
        let exhausted = read.len() < scan;
        let mut instances = Vec::new();
        let mut scanned_to = None;
        for (key, s) in read {
            let keep = key.correlation_id.starts_with(prefix)
                && filter.status.is_none_or(|st| st == s.status)
                && filter.parked.is_none_or(|p| p == s.parked.is_some())
                && filter.updated_after.is_none_or(|t| s.updated_at >= t);
            if keep {
                instances.push(crate::message::SagaSummary {
                    correlation_id: key.correlation_id.clone(),
                    status: s.status,
                    version: s.version,
                    updated_at: s.updated_at,
                    parked: s.parked.is_some(),
                    shard: self.shard,
                });
            }
            scanned_to = Some(key.correlation_id);
            if instances.len() >= limit {
                return Ok(crate::message::SagaList { instances, scanned_to });
            }
        }
        Ok(crate::message::SagaList { instances, scanned_to: if exhausted { None } else { scanned_to } })
    }

    /// Replays recorded and not finished, after `after`, at most `limit`; `true` for those
    /// started (see [`Query::Replays`](crate::message::Query::Replays)).
    pub fn replays(&self, after: Option<&SagaKey>, limit: usize) -> Result<Vec<(SagaKey, bool)>, StoreError> {
        let marks = self.store.read()?.replays(after, limit.max(1))?;
        Ok(marks.into_iter().map(|(key, mark)| (key, mark.plan.is_some())).collect())
    }

    /// Store counts and in-memory state; the shell adds the relay's figures.
    pub fn stats(&self) -> Result<ShardStats, StoreError> {
        Ok(ShardStats {
            shard: self.shard,
            store: self.store.read()?.stats()?,
            map_size: self.store.map_size(),
            outbox_window: 0,
            outbox_in_flight: 0,
            outbox_retrying: 0,
            outbox_most_attempts: 0,
            blocked_keys: self.blocked.len(),
            effects_in_flight: self.in_flight_effects.len(),
            next_timer_due: self.next_due,
        })
    }
}
