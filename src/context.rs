//! The bridge's shared state: [`Ctx`], what the tasks on the bridge thread (consumers,
//! dispatch, effect workers) share; [`BridgeShared`], what other threads (operations, the
//! main thread) can see of and do to the bridge. Its own module so that the bridge, the
//! effect workers and operations can all use it without depending on each other.

use crate::config::Config;
use shards::manifest::ManifestSet;
use shards::routing::Router;
use shards::runtime::ShardHandle;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use tokio::sync::watch;

/// What other threads can see of and do to the bridge.
#[derive(Debug, Default)]
pub struct BridgeShared {
    /// The NATS connection is up.
    pub connected: AtomicBool,
    /// Consumers are pulling (false once a drain began).
    pub pulling: AtomicBool,
    /// Messages taken from JetStream and not yet settled (acked, termed or naked).
    pub in_flight: AtomicI64,
    /// Dispatches handed to JetStream or the Gateway and not yet confirmed.
    pub dispatching: AtomicI64,
    pub consumed: AtomicU64,
    /// Messages settled after their shards answered.
    pub acked: AtomicU64,
    /// Records of calls run in place (`x-runner-ran: inline` commands and results) acked on
    /// receipt, without a shard.
    pub recorded_skipped: AtomicU64,
    /// Connections made (the first one counts): consumers re-bind after a reconnect.
    pub connections: AtomicU64,
    /// Circuit breaker states by upstream and shard (0 closed, 1 half-open, 2 open); each
    /// shard has its own breakers and writes here when one is first used or changes state.
    pub breaker_states: std::sync::Mutex<std::collections::BTreeMap<(String, usize), u8>>,
    /// How far the consumers feeding the sagas have caught up (wall-clock ms): the least of
    /// their marks (see `bridge::ingest::Marks`); the shards' timers wait for it.
    pub stream_watermark: Arc<shards::clock::StreamWatermark>,
    /// Aggregate events that matched no saga trigger, by subject pattern (the tenant token
    /// masked); at most [`UNMATCHED_PATTERNS`] patterns, the rest counted under `(other)`.
    pub unmatched: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Subject patterns of unmatched events kept apart (bounded memory).
pub const UNMATCHED_PATTERNS: usize = 256;

impl BridgeShared {
    /// Counts an aggregate event on `subject` that matched no trigger.
    pub fn note_unmatched(&self, subject: &str) {
        // `events.{tenant}.…`: the tenant token is the second.
        let pattern: String =
            subject.split('.').enumerate().map(|(i, t)| if i == 1 { "*" } else { t }).collect::<Vec<_>>().join(".");
        let mut m = self.unmatched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = if m.contains_key(&pattern) || m.len() < UNMATCHED_PATTERNS { pattern } else { "(other)".into() };
        *m.entry(key).or_default() += 1;
    }
}

impl BridgeShared {
    /// The state of each upstream's breaker: the worst over the shards (0 closed,
    /// 1 half-open, 2 open).
    pub fn breakers(&self) -> std::collections::BTreeMap<String, u8> {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(m) = self.breaker_states.lock() {
            for ((upstream, _), state) in m.iter() {
                let worst = out.entry(upstream.clone()).or_insert(0u8);
                *worst = (*worst).max(*state);
            }
        }
        out
    }
}

/// Everything the bridge's tasks share (bridge thread only).
pub struct Ctx {
    pub cfg: Config,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub shards: Vec<ShardHandle>,
    pub router: Router,
    pub manifests: RefCell<Arc<ManifestSet>>,
    pub shared: Arc<BridgeShared>,
    pub stop_pulling: watch::Receiver<bool>,
    /// How often the process died with each message in flight (`None`: not counted, see
    /// `consumers.max_crashes`).
    pub crashes: Option<Rc<crate::crashes::CrashLedger>>,
    /// Held while a message redelivered after a crash is handed on alone: one at a time
    /// over all consumers, so a death is charged to that message only.
    pub lane: tokio::sync::Mutex<()>,
}

impl Ctx {
    pub fn shard(&self, i: usize) -> &ShardHandle {
        &self.shards[i % self.shards.len()]
    }
}
