//! Runner's thread-per-core core. No tokio, no NATS: shards compute and commit; the I/O
//! bridge in the `runner` binary does all network work.
//!
//! - [`routing`]: stable `(tenant, key) -> partition -> shard`.
//! - [`keys`]: key encodings of the per-shard databases.
//! - [`record`]: the values stored in them.
//! - [`store`]: one LMDB environment per shard and the batch commit.

pub mod clock;
pub mod ids;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod message;
pub mod pipeline;
pub mod program;
pub mod record;
pub mod relay;
pub mod routing;
pub mod runtime;
pub mod shard;
pub mod store;
