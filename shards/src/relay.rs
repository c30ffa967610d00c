//! The outbox relay's bookkeeping, one per shard (owned by the shard's thread, shared by
//! its committer and its relay task through `Rc<RefCell<_>>`).
//!
//! The store is the truth; this is a bounded window over it. Commits offer their new items
//! as hints; when the window is full the hint is dropped and a rescan of the outbox is
//! scheduled, so nothing is lost. An item leaves the window only when the committer has
//! durably deleted it (dispatch confirmed) or re-stored it with a retry time.
//!
//! ```text
//!   commit ──offer──> pending ──take_ready──> in_flight ──Delivered──> (deleted)
//!                        ^                       │  └─Retry──> delayed ──due──┐
//!   rescan (store) ──────┘                       └─confirm timeout──> pending <┘
//! ```

use crate::keys::OutboxKey;
use crate::message::Dispatch;
use crate::record::{OutboxItem, WorkKind};
use crate::store::{Store, StoreError};
use ahash::{AHashMap, AHashSet};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Relay settings (validated by the runner's config).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Dispatches in flight per shard. Default 1024.
    pub max_in_flight: usize,
    /// Dispatches in flight per tenant per shard. Default 256.
    pub max_in_flight_per_tenant: usize,
    /// Items per dispatch request to the bridge. Default 256.
    pub batch: usize,
    /// Items kept in memory waiting for dispatch. Default 8192.
    pub window: usize,
    /// A dispatch not confirmed within this time is sent again. Default 30 s.
    pub confirm_timeout_ms: u64,
    /// Safety-net poll of the store. Default 1 s.
    pub poll_ms: u64,
    /// Backoff between failed dispatches (capped exponential, jittered).
    pub retry: crate::manifest::RetrySpec,
    /// Failed dispatches after which an item becomes a dead letter (an operator can re-send
    /// or discard it). Default `None`: retried until delivered, however long the Gateway or
    /// NATS is away — an outage of hours ends with every command delivered once.
    pub max_attempts: Option<u32>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            max_in_flight_per_tenant: 256,
            batch: 256,
            window: 8192,
            confirm_timeout_ms: 30_000,
            poll_ms: 1_000,
            retry: crate::manifest::RetrySpec {
                attempts: u32::MAX,
                backoff_ms: 200,
                max_backoff_ms: 30_000,
                jitter: 0.2,
            },
            max_attempts: None,
        }
    }
}

/// What [`RelayState::take_ready`] hands out.
#[derive(Debug, Default)]
pub struct Ready {
    /// Items to dispatch, in order.
    pub dispatch: Vec<Dispatch>,
    /// Items created by a replay for work already dispatched: delete without dispatching
    /// (key and send, answered like a send).
    pub suppressed: Vec<(OutboxKey, u64)>,
}

/// One instance's items for one target (the Gateway, or one effect): sent one at a time, in
/// outbox order — a later command never overtakes an earlier one, retried or not. A lane is
/// a 64-bit hash of (tenant, saga, correlation id, target), computed without allocating on
/// the relay's path; two instances whose hashes collide only take turns, which costs
/// concurrency, never order or delivery.
type Lane = u64;

/// The lane of `item`; records of calls made in place and suppressed items have none.
fn lane_of(item: &OutboxItem) -> Option<Lane> {
    // Fixed seeds: the same lane for the same item whenever it is looked at.
    const LANES: ahash::RandomState = ahash::RandomState::with_seeds(0x6c61, 0x6e65, 0x7265, 0x6c79);
    let target = match &item.kind {
        WorkKind::Command { .. } => None,
        WorkKind::Effect { effect } => Some(effect.as_str()),
        WorkKind::Audit { .. } => return None,
    };
    (!item.suppressed).then(|| LANES.hash_one((&item.tenant, &item.saga, &item.correlation_id, target)))
}

#[derive(Debug)]
struct InFlight {
    item: OutboxItem,
    deadline: u64,
    send: u64,
}

/// Every known item is in exactly one of `pending`, `parked`, `delayed` and `in_flight`.
#[derive(Debug)]
pub struct RelayState {
    cfg: RelayConfig,
    pending: VecDeque<(OutboxKey, OutboxItem)>,
    known: AHashSet<OutboxKey>,
    /// Sent and not answered: the item, its confirmation deadline and the send's id.
    in_flight: AHashMap<OutboxKey, InFlight>,
    /// The id of the next send.
    next_send: u64,
    /// The in-flight items by confirmation deadline (expiry is found without walking them all).
    deadlines: BTreeSet<(u64, OutboxKey)>,
    delayed: BTreeMap<(u64, OutboxKey), OutboxItem>,
    /// Items of tenants that were at their in-flight limit when reached, in order per tenant:
    /// stepped over once (not re-queued on every call), served first when the tenant has room.
    parked: AHashMap<String, VecDeque<(OutboxKey, OutboxItem)>>,
    /// The parked tenant served last (the next call starts after it).
    parked_last: Option<String>,
    per_tenant: AHashMap<String, usize>,
    /// The item that holds each lane: sent, and not yet delivered (it keeps the lane while
    /// it waits for a retry or is sent again).
    lane_owner: AHashMap<Lane, OutboxKey>,
    owned: AHashMap<OutboxKey, Lane>,
    /// Items that reached a held lane, in order; the first goes when the holder is delivered.
    lane_queue: AHashMap<Lane, VecDeque<(OutboxKey, OutboxItem)>>,
    needs_scan: bool,
    /// Where the next scan starts: `None` from the first key (a fresh shard, a rolled-back
    /// batch, the idle poll); else the smallest key the window had no room for — items below
    /// it are all in the window already, so a scan under load does not re-walk them.
    scan_from: Option<OutboxKey>,
    /// Items with a higher sequence were committed but may not be on disk yet: a scan
    /// leaves them to the commit's own offer, made once it is durable.
    durable_seq: u64,
}

impl RelayState {
    pub fn new(cfg: RelayConfig) -> Self {
        Self {
            cfg,
            pending: VecDeque::new(),
            known: AHashSet::new(),
            in_flight: AHashMap::new(),
            next_send: 1,
            deadlines: BTreeSet::new(),
            delayed: BTreeMap::new(),
            parked: AHashMap::new(),
            parked_last: None,
            per_tenant: AHashMap::new(),
            lane_owner: AHashMap::new(),
            owned: AHashMap::new(),
            lane_queue: AHashMap::new(),
            // A fresh shard may have items left from before a restart.
            needs_scan: true,
            scan_from: None,
            durable_seq: u64::MAX,
        }
    }

    /// Outbox sequences up to `seq` are on disk (the shell tells after each flush).
    pub fn set_durable(&mut self, seq: u64) {
        self.durable_seq = seq;
    }

    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    /// Items known to the relay (pending, in flight, delayed).
    pub fn depth(&self) -> usize {
        self.known.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn needs_scan(&self) -> bool {
        self.needs_scan
    }

    /// A full scan from the first key.
    pub fn request_scan(&mut self) {
        self.needs_scan = true;
        self.scan_from = None;
    }

    /// A scan from `key` on (kept at the smallest such key until a scan runs).
    fn scan_from_key(&mut self, key: OutboxKey) {
        if !self.needs_scan {
            self.needs_scan = true;
            self.scan_from = Some(key);
        } else if let Some(from) = self.scan_from {
            self.scan_from = Some(from.min(key));
        }
    }

    /// A freshly committed item. Dropped (and a rescan scheduled) when the window is full.
    pub fn offer(&mut self, key: OutboxKey, item: OutboxItem, now: u64) {
        if self.known.contains(&key) {
            return;
        }
        if self.known.len() >= self.cfg.window {
            self.scan_from_key(key);
            return;
        }
        self.admit(key, item, now);
    }

    fn admit(&mut self, key: OutboxKey, item: OutboxItem, now: u64) {
        self.known.insert(key);
        if item.next_attempt_at > now {
            self.delayed.insert((item.next_attempt_at, key), item);
        } else {
            self.pending.push_back((key, item));
        }
    }

    /// Refills the window from the store (items not known yet, in key order). Known items are
    /// walked past without decoding, and a scan waits until a useful share of the window is
    /// free (a batch, or an eighth of it), so a full window under load is not re-read per commit.
    pub fn scan(&mut self, store: &Store, now: u64) -> Result<(), StoreError> {
        let room = self.cfg.window.saturating_sub(self.known.len());
        if room == 0 || (room < self.cfg.batch.min(self.cfg.window / 8).max(1) && !self.known.is_empty()) {
            // Still (nearly) full: scan again once more of the window has drained.
            return Ok(());
        }
        let view = store.read()?;
        let mut from = match self.scan_from {
            Some(k) => std::ops::Bound::Included(k),
            None => std::ops::Bound::Unbounded,
        };
        loop {
            let room = self.cfg.window.saturating_sub(self.known.len());
            let (known, durable) = (&self.known, self.durable_seq);
            let (page, last, done) =
                view.outbox_where(from, 4_096, room, |k| k.seq <= durable && !known.contains(k))?;
            for (key, item) in page {
                self.admit(key, item, now);
            }
            if done {
                self.needs_scan = false;
                self.scan_from = None;
                return Ok(());
            }
            if self.known.len() >= self.cfg.window {
                // Full again: the next scan starts at the last key walked (everything before
                // it is in the window, and it is skipped without decoding).
                self.scan_from = last;
                return Ok(());
            }
            if let Some(k) = last {
                from = std::ops::Bound::Excluded(k);
            }
        }
    }

    /// Moves due retries to pending, re-queues dispatches whose confirmation timed out, and
    /// takes what may be dispatched now within the in-flight limits.
    pub fn take_ready(&mut self, now: u64) -> Ready {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, key), item) = entry.remove_entry();
            self.pending.push_back((key, item));
        }
        while let Some(&(deadline, key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            // Only the deadline of the item's current send counts.
            if self.in_flight.get(&key).is_some_and(|f| f.deadline == deadline)
                && let Some(item) = self.untrack(&key)
            {
                tracing::warn!(work_id = %item.work_id, tenant = %item.tenant, "dispatch not confirmed in time; sending again");
                // Sent again before the tenant's newer items, parked or not.
                match self.parked.get_mut(&item.tenant) {
                    Some(q) if !item.suppressed => q.push_front((key, item)),
                    _ => self.pending.push_front((key, item)),
                }
            }
        }
        let mut ready = Ready::default();
        let deadline = now + self.cfg.confirm_timeout_ms;
        // Parked items of tenants with room again go first (they are older than the tenant's
        // items still in `pending`).
        if !self.parked.is_empty() {
            // Round robin over the parked tenants, starting after the last one served, so that
            // the first names do not take every free slot.
            let mut tenants: Vec<String> = self.parked.keys().cloned().collect();
            tenants.sort_unstable();
            if let Some(last) = &self.parked_last {
                let start = tenants.partition_point(|t| t <= last);
                tenants.rotate_left(start);
            }
            for tenant in tenants {
                if self.in_flight.len() >= self.cfg.max_in_flight || ready.dispatch.len() >= self.cfg.batch {
                    break;
                }
                let before = ready.dispatch.len();
                while self.in_flight.len() < self.cfg.max_in_flight && ready.dispatch.len() < self.cfg.batch {
                    if self.per_tenant.get(&tenant).copied().unwrap_or(0) >= self.cfg.max_in_flight_per_tenant {
                        break;
                    }
                    let Some((key, item)) = self.parked.get_mut(&tenant).and_then(|q| q.pop_front()) else { break };
                    let Some((key, item)) = self.wait_for_lane(key, item) else { continue };
                    self.send(&mut ready, key, item, deadline);
                }
                if self.parked.get(&tenant).is_some_and(|q| q.is_empty()) {
                    self.parked.remove(&tenant);
                }
                if ready.dispatch.len() > before {
                    self.parked_last = Some(tenant);
                }
            }
        }
        while self.in_flight.len() < self.cfg.max_in_flight && ready.dispatch.len() < self.cfg.batch {
            let Some((key, item)) = self.pending.pop_front() else { break };
            if item.suppressed {
                let send = self.track(key, item, deadline);
                ready.suppressed.push((key, send));
                continue;
            }
            let Some((key, item)) = self.wait_for_lane(key, item) else { continue };
            let at_limit = self.per_tenant.get(&item.tenant).copied().unwrap_or(0) >= self.cfg.max_in_flight_per_tenant;
            if at_limit || self.parked.contains_key(&item.tenant) {
                // Stepped over once, in order behind the tenant's other parked items.
                self.parked.entry(item.tenant.clone()).or_default().push_back((key, item));
                continue;
            }
            self.send(&mut ready, key, item, deadline);
        }
        ready
    }

    /// Queues `item` behind its lane's holder and gives `None`, or gives it back when its
    /// lane is free or held by the item itself.
    fn wait_for_lane(&mut self, key: OutboxKey, item: OutboxItem) -> Option<(OutboxKey, OutboxItem)> {
        if let Some(lane) = lane_of(&item)
            && self.lane_owner.get(&lane).is_some_and(|holder| *holder != key)
        {
            self.lane_queue.entry(lane).or_default().push_back((key, item));
            return None;
        }
        Some((key, item))
    }

    fn send(&mut self, ready: &mut Ready, key: OutboxKey, item: OutboxItem, deadline: u64) {
        if let Some(lane) = lane_of(&item) {
            self.lane_owner.insert(lane, key);
            self.owned.insert(key, lane);
        }
        let send = self.track(key, item.clone(), deadline);
        ready.dispatch.push(Dispatch { key, send, item });
    }

    /// Starts tracking a dispatch of `key` until `deadline`: in flight, by deadline, and (unless
    /// suppressed) in its tenant's count. A send over a key already in flight replaces it, so
    /// a key never holds two deadlines or two tenant slots. Returns the send's id.
    fn track(&mut self, key: OutboxKey, item: OutboxItem, deadline: u64) -> u64 {
        self.untrack(&key);
        if !item.suppressed {
            *self.per_tenant.entry(item.tenant.clone()).or_default() += 1;
        }
        let send = self.next_send;
        self.next_send += 1;
        self.deadlines.insert((deadline, key));
        self.in_flight.insert(key, InFlight { item, deadline, send });
        send
    }

    /// Stops tracking `key`'s dispatch (the reverse of [`Self::track`]); returns its item.
    fn untrack(&mut self, key: &OutboxKey) -> Option<OutboxItem> {
        let f = self.in_flight.remove(key)?;
        self.deadlines.remove(&(f.deadline, *key));
        if !f.item.suppressed {
            self.dec_tenant(&f.item.tenant);
        }
        Some(f.item)
    }

    fn dec_tenant(&mut self, tenant: &str) {
        if let Some(c) = self.per_tenant.get_mut(tenant) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }

    /// The item an in-flight dispatch is for.
    pub fn in_flight_item(&self, key: &OutboxKey) -> Option<&OutboxItem> {
        self.in_flight.get(key).map(|f| &f.item)
    }

    /// An answer to send `send` of `key` came in. When it answers the item's current send,
    /// the item is held (see [`Self::hold`]) and returned; an answer to an earlier send
    /// (the item was sent again since, or settled) gets `None`.
    pub fn answer(&mut self, key: &OutboxKey, send: u64) -> Option<OutboxItem> {
        let f = self.in_flight.get(key).filter(|f| f.send == send)?;
        let item = f.item.clone();
        self.hold(key);
        Some(item)
    }

    /// `key`'s dispatch was confirmed (or its call ran in place) and the commit that
    /// deletes it is on its way: it is not sent again on its deadline, even if that commit
    /// waits (a full disk). It keeps its in-flight slot until [`Self::delivered`] or
    /// [`Self::retry_later`].
    pub fn hold(&mut self, key: &OutboxKey) {
        if let Some(f) = self.in_flight.get_mut(key) {
            self.deadlines.remove(&(f.deadline, *key));
            f.deadline = u64::MAX;
        }
    }

    /// The committer durably deleted `key`. An item confirmed by an earlier send may sit
    /// in a queue to go again (its deadline passed, or a retry was due): it leaves that
    /// queue too, so nothing is sent after its delivery.
    pub fn delivered(&mut self, key: OutboxKey) {
        let was_in_flight = self.untrack(&key).is_some();
        if self.known.remove(&key) && !was_in_flight {
            self.pending.retain(|(k, _)| *k != key);
            self.delayed.retain(|(_, k), _| *k != key);
            self.parked.retain(|_, q| {
                q.retain(|(k, _)| *k != key);
                !q.is_empty()
            });
            self.lane_queue.retain(|_, q| {
                q.retain(|(k, _)| *k != key);
                !q.is_empty()
            });
        }
        // Its lane passes to the next item of the instance and target, which goes next.
        if let Some(lane) = self.owned.remove(&key) {
            self.lane_owner.remove(&lane);
            if let Some(q) = self.lane_queue.get_mut(&lane) {
                if let Some(next) = q.pop_front() {
                    self.pending.push_front(next);
                }
                if q.is_empty() {
                    self.lane_queue.remove(&lane);
                }
            }
        }
    }

    /// The committer re-stored `key` with a later `next_attempt_at`.
    pub fn retry_later(&mut self, key: OutboxKey, item: OutboxItem) {
        self.untrack(&key);
        self.known.insert(key);
        self.delayed.insert((item.next_attempt_at, key), item);
    }

    /// When the relay should look again without being woken: the next retry or the next
    /// confirmation deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        let delayed = self.delayed.keys().next().map(|(t, _)| *t);
        let confirm = self.deadlines.first().map(|(d, _)| *d);
        match (delayed, confirm) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Items waiting for their next attempt after a failed dispatch (or an open breaker).
    pub fn retrying(&self) -> usize {
        self.delayed.len()
    }

    /// The most failed attempts of an item waiting to be retried (walks the waiting items:
    /// for stats, not for every batch).
    pub fn most_attempts(&self) -> u32 {
        self.delayed.values().map(|i| i.attempts).max().unwrap_or(0)
    }

    /// Whether anything is waiting that could be dispatched right now.
    pub fn has_ready(&self, now: u64) -> bool {
        ((!self.pending.is_empty() || !self.parked.is_empty()) && self.in_flight.len() < self.cfg.max_in_flight)
            || self.delayed.keys().next().is_some_and(|(t, _)| *t <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::WorkKind;

    fn item(tenant: &str, id: &str) -> OutboxItem {
        OutboxItem {
            work_id: id.into(),
            kind: WorkKind::Effect { effect: "e".into() },
            tenant: tenant.into(),
            saga: "s".into(),
            // An instance of its own: one item per lane unless a test says otherwise.
            correlation_id: format!("c-{id}"),
            traceparent: None,
            source_event_id: "ev".into(),
            payload: crate::record::json_null(),
            created_at: 0,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            suppressed: false,
        }
    }

    fn key(seq: u64) -> OutboxKey {
        OutboxKey { partition: 0, seq }
    }

    fn cfg() -> RelayConfig {
        RelayConfig {
            max_in_flight: 3,
            max_in_flight_per_tenant: 2,
            batch: 10,
            window: 5,
            confirm_timeout_ms: 100,
            ..RelayConfig::default()
        }
    }

    #[test]
    fn a_scan_admits_only_unknown_items_in_key_order_and_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0, 1, &crate::store::StoreConfig::default()).unwrap();
        let mut batch = crate::store::Batch::new();
        for seq in 1..=20 {
            batch.put_outbox(key(seq), &item("a", &seq.to_string()));
        }
        store.commit(&batch).unwrap();
        let cfg = RelayConfig {
            window: 16,
            batch: 16,
            max_in_flight: 100,
            max_in_flight_per_tenant: 100,
            ..RelayConfig::default()
        };
        let mut r = RelayState::new(cfg);
        // Items 1..=14 arrive as commit hints; the scan adds 15 and 16 (window 16), not again 1..=14.
        for seq in 1..=14 {
            r.offer(key(seq), item("a", &seq.to_string()), 0);
        }
        r.scan(&store, 0).unwrap();
        assert_eq!(r.depth(), 16);
        assert!(r.needs_scan(), "items 17..=20 are still in the store only");
        let ready: Vec<u64> = r.take_ready(0).dispatch.into_iter().map(|d| d.key.seq).collect();
        assert_eq!(ready, (1..=16).collect::<Vec<_>>());
        // One slot free is less than the scan threshold (min(batch 16, window/8 = 2)): no scan yet.
        let delete = |seq: u64| {
            let mut b = crate::store::Batch::new();
            b.delete_outbox(key(seq));
            store.commit(&b).unwrap();
        };
        delete(1);
        r.delivered(key(1));
        r.scan(&store, 0).unwrap();
        assert_eq!(r.depth(), 15);
        delete(2);
        r.delivered(key(2));
        r.scan(&store, 0).unwrap();
        assert_eq!(r.depth(), 16);
        let ready: Vec<u64> = r.take_ready(0).dispatch.into_iter().map(|d| d.key.seq).collect();
        assert_eq!(ready, [17, 18]);
    }

    #[test]
    fn limits_in_flight_overall_and_per_tenant_keeping_order() {
        let mut r = RelayState::new(cfg());
        r.offer(key(1), item("a", "1"), 0);
        r.offer(key(2), item("a", "2"), 0);
        r.offer(key(3), item("a", "3"), 0);
        r.offer(key(4), item("b", "4"), 0);
        let ready: Vec<_> = r.take_ready(0).dispatch.into_iter().map(|d| d.key.seq).collect();
        assert_eq!(ready, [1, 2, 4]); // tenant a capped at 2, overall at 3
        r.delivered(key(1));
        let ready: Vec<_> = r.take_ready(0).dispatch.into_iter().map(|d| d.key.seq).collect();
        assert_eq!(ready, [3]);
        assert_eq!(r.depth(), 3);
    }

    #[test]
    fn a_tenant_at_its_limit_does_not_hold_back_others_and_keeps_its_own_order() {
        let cfg = RelayConfig {
            max_in_flight: 100,
            max_in_flight_per_tenant: 2,
            batch: 10,
            window: 1_000,
            confirm_timeout_ms: 100,
            ..RelayConfig::default()
        };
        let mut r = RelayState::new(cfg);
        for seq in 1..=500 {
            r.offer(key(seq), item("a", &seq.to_string()), 0);
        }
        r.offer(key(501), item("b", "501"), 0);
        let seqs = |r: &mut RelayState| r.take_ready(0).dispatch.into_iter().map(|d| d.key.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&mut r), [1, 2, 501]);
        r.offer(key(502), item("b", "502"), 0);
        assert_eq!(seqs(&mut r), [502]);
        r.delivered(key(2));
        r.offer(key(503), item("a", "503"), 0);
        assert_eq!(seqs(&mut r), [3], "tenant a goes on in its own order");
        for seq in [1, 3] {
            r.delivered(key(seq));
        }
        assert_eq!(seqs(&mut r), [4, 5]);
        assert_eq!(r.depth(), 500);
    }

    #[test]
    fn a_resend_keeps_its_place_before_the_tenants_parked_items() {
        let cfg = RelayConfig {
            max_in_flight: 10,
            max_in_flight_per_tenant: 1,
            batch: 10,
            window: 100,
            confirm_timeout_ms: 100,
            ..RelayConfig::default()
        };
        let mut r = RelayState::new(cfg);
        for seq in 1..=3 {
            r.offer(key(seq), item("a", &seq.to_string()), 0);
        }
        let seqs =
            |r: &mut RelayState, now| r.take_ready(now).dispatch.into_iter().map(|d| d.key.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&mut r, 0), [1]);
        assert_eq!(seqs(&mut r, 50), Vec::<u64>::new());
        assert_eq!(seqs(&mut r, 100), [1], "the unconfirmed item goes again, before 2 and 3");
        r.delivered(key(1));
        assert_eq!(seqs(&mut r, 110), [2]);
    }

    #[test]
    fn parked_tenants_take_turns_for_free_slots() {
        let cfg = RelayConfig {
            max_in_flight: 5,
            max_in_flight_per_tenant: 2,
            batch: 1,
            window: 100,
            confirm_timeout_ms: 1_000,
            ..RelayConfig::default()
        };
        let mut r = RelayState::new(cfg);
        for seq in 1..=4 {
            r.offer(key(seq), item("a", &seq.to_string()), 0);
        }
        for seq in 5..=8 {
            r.offer(key(seq), item("b", &seq.to_string()), 0);
        }
        r.offer(key(9), item("c", "9"), 0);
        let seqs = |r: &mut RelayState| r.take_ready(0).dispatch.into_iter().map(|d| d.key.seq).collect::<Vec<_>>();
        // a1 a2, then a3 a4 are parked on the way to b1; b2, then b3 b4 parked on the way to c.
        let sent: Vec<Vec<u64>> = (0..5).map(|_| seqs(&mut r)).collect();
        assert_eq!(sent, [vec![1], vec![2], vec![5], vec![6], vec![9]]);
        for seq in [1, 2, 5, 6, 9] {
            r.delivered(key(seq));
        }
        // One slot per call: a and b alternate instead of a taking its turn twice.
        let sent: Vec<Vec<u64>> = (0..4).map(|_| seqs(&mut r)).collect();
        assert_eq!(sent, [vec![3], vec![7], vec![4], vec![8]]);
    }

    #[test]
    fn a_full_window_drops_hints_and_asks_for_a_scan() {
        let mut r = RelayState::new(cfg());
        r.needs_scan = false;
        for i in 0..7 {
            r.offer(key(i), item("a", &i.to_string()), 0);
        }
        assert_eq!(r.depth(), 5);
        assert!(r.needs_scan());
    }

    #[test]
    fn retries_wait_and_unconfirmed_dispatches_are_sent_again() {
        let mut r = RelayState::new(cfg());
        r.offer(key(1), item("a", "1"), 0);
        assert_eq!(r.take_ready(0).dispatch.len(), 1);
        let mut later = item("a", "1");
        later.next_attempt_at = 50;
        r.retry_later(key(1), later);
        assert!(r.take_ready(49).dispatch.is_empty());
        assert_eq!(r.next_deadline(), Some(50));
        assert_eq!(r.take_ready(50).dispatch.len(), 1);
        // not confirmed within 100 ms: dispatched again
        assert!(r.take_ready(149).dispatch.is_empty());
        assert_eq!(r.take_ready(150).dispatch.len(), 1);
        r.delivered(key(1));
        assert_eq!(r.depth(), 0);
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn a_held_dispatch_is_not_sent_again_on_its_deadline() {
        let mut r = RelayState::new(cfg());
        r.offer(key(1), item("a", "1"), 0);
        r.offer(key(2), item("a", "2"), 0);
        assert_eq!(r.take_ready(0).dispatch.len(), 2);
        r.hold(&key(1));
        let again: Vec<u64> = r.take_ready(500).dispatch.into_iter().map(|d| d.key.seq).collect();
        assert_eq!(again, [2], "a confirmed dispatch went out again");
        assert_eq!(r.next_deadline(), Some(600));
        r.delivered(key(1));
        assert_eq!(r.in_flight(), 1);
    }

    #[test]
    fn a_delivered_item_is_never_sent_again_from_any_queue() {
        let mut r = RelayState::new(RelayConfig { batch: 1, ..cfg() });
        r.offer(key(1), item("a", "1"), 0);
        r.offer(key(2), item("b", "2"), 0);
        assert_eq!(r.take_ready(0).dispatch.len(), 1);
        assert_eq!(r.take_ready(0).dispatch.len(), 1);
        // Both unconfirmed at 100: one goes again now (a batch of one), the other waits.
        let again = r.take_ready(100).dispatch;
        assert_eq!(again.len(), 1);
        let waiting = if again[0].key == key(1) { key(2) } else { key(1) };
        // The waiting one's first send is confirmed late, and its item deleted.
        r.delivered(waiting);
        let later: Vec<OutboxKey> = r.take_ready(100).dispatch.into_iter().map(|d| d.key).collect();
        assert!(!later.contains(&waiting), "sent after its delivery");
        assert_eq!(r.depth(), 1);
        // A retry waiting for its time, then a late confirmation of an earlier send.
        r.offer(key(3), item("c", "3"), 100);
        assert_eq!(r.take_ready(100).dispatch.len(), 1);
        let mut retry = item("c", "3");
        retry.next_attempt_at = 150;
        r.retry_later(key(3), retry);
        r.delivered(key(3));
        let later: Vec<OutboxKey> = r.take_ready(150).dispatch.into_iter().map(|d| d.key).collect();
        assert!(!later.contains(&key(3)), "a delivered item's retry went out");
        assert_eq!(r.next_deadline().filter(|&d| d <= 150), None, "a deleted item keeps a wake-up");
    }

    /// An item of instance `cid` for the Gateway (`command`) or an effect.
    fn work(cid: &str, id: &str, gateway: bool) -> OutboxItem {
        let mut i = item("a", id);
        i.correlation_id = cid.into();
        if gateway {
            i.kind = WorkKind::Command { command: "C".into(), aggregate: "x".into(), aggregate_id: "1".into() };
        }
        i
    }

    fn sent(r: &mut RelayState, now: u64) -> Vec<u64> {
        r.take_ready(now).dispatch.into_iter().map(|d| d.key.seq).collect()
    }

    #[test]
    fn one_item_per_instance_and_target_in_flight_in_outbox_order() {
        let cfg = RelayConfig { max_in_flight: 100, max_in_flight_per_tenant: 100, ..cfg() };
        let mut r = RelayState::new(cfg);
        // Instance c1: two Gateway commands and an effect; c2: one Gateway command.
        r.offer(key(1), work("c1", "1", true), 0);
        r.offer(key(2), work("c1", "2", true), 0);
        r.offer(key(3), work("c1", "3", false), 0);
        r.offer(key(4), work("c2", "4", true), 0);
        assert_eq!(sent(&mut r, 0), [1, 3, 4], "c1's second Gateway command went out beside its first");
        r.delivered(key(3));
        r.delivered(key(4));
        // The first fails and waits for its retry: the second still waits behind it.
        let mut retry = work("c1", "1", true);
        retry.next_attempt_at = 50;
        r.retry_later(key(1), retry);
        assert!(sent(&mut r, 10).is_empty(), "a later command overtook a retrying one");
        assert_eq!(sent(&mut r, 50), [1]);
        // Not confirmed in time: sent again, still ahead of the second.
        assert_eq!(sent(&mut r, 150), [1]);
        r.delivered(key(1));
        assert_eq!(sent(&mut r, 150), [2], "the next command of the instance goes once the first is delivered");
        r.delivered(key(2));
        assert!(sent(&mut r, 150).is_empty());
        assert_eq!(r.depth(), 0);
    }

    #[test]
    fn suppressed_items_are_deleted_without_dispatch() {
        let mut r = RelayState::new(cfg());
        let mut i = item("a", "1");
        i.suppressed = true;
        r.offer(key(1), i, 0);
        let ready = r.take_ready(0);
        assert!(ready.dispatch.is_empty());
        assert_eq!(ready.suppressed.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [key(1)]);
    }
}
