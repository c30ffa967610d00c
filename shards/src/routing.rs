//! Stable routing: which partition, and so which shard, owns a key.
//!
//! The hash is part of the on-disk format. Stored keys were placed by it, so a change to
//! the algorithm, the seed or the byte layout below would strand them in the wrong shard.
//! `tests::fixed_vectors` pins the output; if it fails, the change is a data migration.
//!
//! Specification:
//! - algorithm: XXH3-64 (`xxhash_rust::xxh3::xxh3_64_with_seed`), seed [`ROUTING_SEED`];
//! - input bytes: for the tenant and then each key part, a 4-byte big-endian length followed
//!   by the UTF-8 bytes (so `("ab","c")` and `("a","bc")` hash differently);
//! - `partition = hash % partitions`, `shard = partition % shards`.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of the routing hash. Never change it: stored keys were placed with it.
pub const ROUTING_SEED: u64 = 0x5255_4e4e_4552_0001; // "RUNNER" + format 1

/// Default number of partitions of a new data directory.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// What a key is, for routing. Each variant hashes a distinct tag so that a saga named like a
/// command id can never collide with it by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKey<'a> {
    /// A saga instance: `(tenant, saga, correlation_id)`.
    Saga { saga: &'a str, correlation_id: &'a str },
    /// An effect gate entry: `(tenant, command_id)`.
    Effect { command_id: &'a str },
    /// A message that could not be decoded; placed by its stream and sequence.
    Raw { stream: &'a str, seq: u64 },
}

/// The stable 64-bit hash of `(tenant, key)`.
pub fn stable_hash(tenant: &str, key: RouteKey<'_>) -> u64 {
    let mut buf = Vec::with_capacity(64);
    push_part(&mut buf, tenant.as_bytes());
    match key {
        RouteKey::Saga { saga, correlation_id } => {
            push_part(&mut buf, b"saga");
            push_part(&mut buf, saga.as_bytes());
            push_part(&mut buf, correlation_id.as_bytes());
        }
        RouteKey::Effect { command_id } => {
            push_part(&mut buf, b"effect");
            push_part(&mut buf, command_id.as_bytes());
        }
        RouteKey::Raw { stream, seq } => {
            push_part(&mut buf, b"raw");
            push_part(&mut buf, stream.as_bytes());
            push_part(&mut buf, &seq.to_be_bytes());
        }
    }
    xxh3_64_with_seed(&buf, ROUTING_SEED)
}

fn push_part(buf: &mut Vec<u8>, part: &[u8]) {
    // Parts longer than u32::MAX cannot occur (NATS payloads are far smaller); saturate
    // rather than panic so that routing stays a total function.
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(part);
}

/// The partition that owns `(tenant, key)`. `partitions` must be non-zero.
pub fn partition_for(tenant: &str, key: RouteKey<'_>, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    (stable_hash(tenant, key) % u64::from(partitions.max(1))) as u32
}

/// The shard that owns a partition. `shards` must be non-zero.
pub fn shard_for_partition(partition: u32, shards: usize) -> usize {
    debug_assert!(shards > 0);
    partition as usize % shards.max(1)
}

/// Routing for one data directory: its partition count and the shard count of this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    partitions: u32,
    shards: usize,
}

impl Router {
    pub fn new(partitions: u32, shards: usize) -> Self {
        Self { partitions: partitions.max(1), shards: shards.max(1) }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn partition(&self, tenant: &str, key: RouteKey<'_>) -> u32 {
        partition_for(tenant, key, self.partitions)
    }

    pub fn shard(&self, tenant: &str, key: RouteKey<'_>) -> usize {
        shard_for_partition(self.partition(tenant, key), self.shards)
    }

    pub fn shard_of_partition(&self, partition: u32) -> usize {
        shard_for_partition(partition, self.shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pinned outputs (cross-checked against Python's `xxhash.xxh3_64_intdigest` over the
    /// same bytes). If this test fails, the routing of every stored key changed:
    /// that is a data-format change and needs a migration, not a new expected value.
    #[test]
    fn fixed_vectors() {
        let cases: [(&str, RouteKey<'_>, u64); 6] = [
            ("", RouteKey::Saga { saga: "order", correlation_id: "o-1" }, 0xd56f_c6e9_b5b7_ec37),
            ("acme", RouteKey::Saga { saga: "order", correlation_id: "o-1" }, 0x4a3f_baf7_39bc_b05b),
            ("acme", RouteKey::Saga { saga: "order", correlation_id: "" }, 0xcc4f_dc30_c8f8_6904),
            ("acme", RouteKey::Effect { command_id: "cmd-42" }, 0xb092_b8cb_a55a_0f62),
            ("t-9", RouteKey::Effect { command_id: "x" }, 0x5003_fc15_5b96_fbc2),
            ("acme", RouteKey::Raw { stream: "AGGREGATE_EVENTS", seq: 7 }, 0x10e9_a3e2_e2cb_38f3),
        ];
        let got: Vec<String> = cases.iter().map(|(t, k, _)| format!("{:#018x}", stable_hash(t, *k))).collect();
        let want: Vec<String> = cases.iter().map(|(_, _, h)| format!("{h:#018x}")).collect();
        assert_eq!(got, want);
        // And the partition/shard arithmetic on top of it.
        assert_eq!(partition_for("acme", cases[1].1, 256), (cases[1].2 % 256) as u32);
        assert_eq!(shard_for_partition(255, 4), 3);
        assert_eq!(Router::new(256, 3).shard_of_partition(10), 1);
    }

    #[test]
    fn length_prefix_separates_parts() {
        let a = stable_hash("ab", RouteKey::Saga { saga: "c", correlation_id: "d" });
        let b = stable_hash("a", RouteKey::Saga { saga: "bc", correlation_id: "d" });
        let c = stable_hash("a", RouteKey::Saga { saga: "b", correlation_id: "cd" });
        assert_ne!(a, b);
        assert_ne!(b, c);
        let saga = stable_hash("t", RouteKey::Saga { saga: "x", correlation_id: "" });
        let effect = stable_hash("t", RouteKey::Effect { command_id: "x" });
        assert_ne!(saga, effect);
    }

    #[test]
    fn uniform_enough_over_100k_keys() {
        let partitions = 256u32;
        let mut counts = vec![0u32; partitions as usize];
        let mut rng = 0x1234_5678_9abc_def0u64;
        for i in 0..100_000u64 {
            // xorshift for reproducible "random" keys
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let tenant = format!("tenant-{}", rng % 50);
            let cid = format!("{:x}-{i}", rng);
            let p = partition_for(&tenant, RouteKey::Saga { saga: "order", correlation_id: &cid }, partitions);
            counts[p as usize] += 1;
        }
        let mean = 100_000f64 / f64::from(partitions);
        let max = *counts.iter().max().unwrap_or(&0);
        let min = *counts.iter().min().unwrap_or(&0);
        assert!(f64::from(max) < 2.0 * mean, "max partition {max} >= 2x mean {mean}");
        assert!(min > 0, "an empty partition");
    }

    proptest! {
        #[test]
        fn routing_is_within_bounds(tenant in ".{0,12}", cid in ".{0,24}", partitions in 1u32..2048, shards in 1usize..64) {
            let r = Router::new(partitions, shards);
            let key = RouteKey::Saga { saga: "s", correlation_id: &cid };
            let p = r.partition(&tenant, key);
            prop_assert!(p < partitions);
            prop_assert!(r.shard(&tenant, key) < shards);
            prop_assert_eq!(r.shard(&tenant, key), p as usize % shards);
        }
    }
}
