//! Time for the shards' shell: the wall clock in production, a manual clock in tests.
//! Programs never see it; they get the event's own timestamp.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_ms)))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub type SharedClock = Arc<dyn Clock>;

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// How far the streams that feed this runner's sagas have been consumed, in milliseconds
/// since the Unix epoch: every message published before it has been handed to its shard.
/// The bridge moves it; a shard fires a timer only once it has passed the timer's due time
/// (invariant 9: an outage or a lagging consumer never lets a timeout overtake an event
/// already in the stream). Starts at 0: nothing fires before the consumers have caught up.
#[derive(Debug, Default)]
pub struct StreamWatermark(AtomicU64);

impl StreamWatermark {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Release);
    }
}
