//! Runner's thread-per-core core. No tokio, no NATS: shards compute and commit; the I/O
//! bridge in the `runner` binary does all network work.
//!
//! - [`routing`]: stable `(tenant, key) -> partition -> shard`, one pure function.
//! - [`keys`]: key encodings of the per-shard databases (injective, ordered).
//! - [`record`]: the values stored in them (JSON).
//! - [`store`]: one LMDB environment per shard and the one write path, a batch commit.
//! - [`layout`]: the data directory, its partition count, and moving partitions when the
//!   shard count changes.
//! - [`manifest`]: saga and effect manifests, loaded and validated.
//! - [`program`]: the sandboxed, gas-limited saga programs (Rhai), compiled per shard.
//! - [`ids`]: deterministic work, timer and dead-letter ids.
//! - [`message`]: what crosses the thread boundary: requests, typed answers, dispatches.
//! - [`core`]: the functional core; decides a batch and returns actions as data.
//! - [`shell`]: the imperative shell; commits, adopts, carries out; the shard's loop.
//! - [`relay`]: the outbox relay's bounded window over the store.
//! - [`caller`]: the contract for calls a shard makes itself (HTTP effects, Gateway).
//! - [`runtime`]: one pinned glommio executor per shard and the handles that reach them.
//! - [`clock`]: time as a trait, with a manual clock for tests.
//! - [`cpus`]: the process's CPU mask and quota, and pinning threads to CPUs.

pub mod caller;
pub mod clock;
pub mod core;
pub mod cpus;
pub mod ids;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod message;
pub mod program;
pub mod record;
pub mod relay;
pub mod routing;
pub mod runtime;
pub mod shell;
pub mod store;
