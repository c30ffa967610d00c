//! Calls a shard makes itself: HTTP effects and Gateway commands run on the shard that owns
//! them, on its own thread, so that work scales with the shards and the NATS bridge's
//! thread does NATS only. The `runner` binary supplies the implementation (providers,
//! breakers, an HTTP client for glommio); this crate only knows the contract, so it stays
//! free of tokio and NATS.

use crate::manifest::ManifestSet;
use crate::message::DispatchOutcome;
use crate::record::OutboxItem;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

/// One attempt at an outbox item, resolving to how it went.
pub type Call = Pin<Box<dyn Future<Output = DispatchOutcome>>>;

/// Runs outbox items on one shard's thread. Made there by a [`CallerFactory`]; nothing of
/// it is `Send`.
pub trait Caller {
    /// Whether this shard runs `item` itself; the relay hands the others to the bridge.
    fn runs(&self, item: &OutboxItem) -> bool;
    /// One attempt at `item`. An effect answers `Ran` with its final result, or `Later`
    /// when it should be tried again (its retry policy decides when it gives up and fails);
    /// a Gateway command answers `Delivered`, `Retry` or `Permanent`.
    fn call(&self, item: OutboxItem) -> Call;
    /// The manifests changed (a reload): providers are rebuilt.
    fn reload(&self, set: &Arc<ManifestSet>);
}

/// Makes shard `index`'s caller for the manifests loaded at start, on that shard's thread.
pub type MakeCaller = dyn Fn(usize, &Arc<ManifestSet>) -> Rc<dyn Caller> + Send + Sync;

/// Makes each shard's caller (see [`MakeCaller`]).
#[derive(Clone)]
pub struct CallerFactory(pub Arc<MakeCaller>);

impl std::fmt::Debug for CallerFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerFactory")
    }
}
