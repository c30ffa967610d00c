//! Key encodings of the per-shard LMDB databases.
//!
//! Every string component is written as a 4-byte big-endian length and its bytes; every
//! number as fixed-width big-endian. Within one database the layout is fixed, so the
//! encoding is injective (the property tests below prove it) and decodable. Numbers that
//! must sort (due time, outbox sequence, dead-letter time) come first where the database
//! is scanned in that order.
//!
//! | db | layout |
//! |---|---|
//! | `sagas` | tenant, saga, correlation_id |
//! | `outbox` | partition u32, seq u64 |
//! | `schedules` | due_at u64 (ms), tenant, saga, correlation_id, timer_id |
//! | `effects` | tenant, command_id |
//! | `checkpoints` | tenant, saga, stream |
//! | `deadletter` | tenant, at u64 (ms), id |
//! | `results` | tenant, saga, correlation_id, event id |
//! | `history` | tenant, saga, correlation_id, index u64 |
//! | `replays` | tenant, saga, correlation_id |

use thiserror::Error;

/// Limits that keep every key below LMDB's 511-byte key limit with room to spare.
pub const MAX_TENANT: usize = 64;
pub const MAX_NAME: usize = 64;
pub const MAX_CORRELATION_ID: usize = 256;
pub const MAX_ID: usize = 128;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{what} is {len} bytes long, above the limit of {max} bytes (value starts {prefix:?})")]
    TooLong { what: &'static str, len: usize, max: usize, prefix: String },
    #[error("malformed {db} key: {why}")]
    Malformed { db: &'static str, why: &'static str },
}

/// Checks one key component against its limit.
pub fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), KeyError> {
    if value.len() > max {
        let prefix: String = value.chars().take(32).collect();
        return Err(KeyError::TooLong { what, len: value.len(), max, prefix });
    }
    Ok(())
}

struct KeyBuf(Vec<u8>);

impl KeyBuf {
    fn new() -> Self {
        Self(Vec::with_capacity(96))
    }
    fn str(mut self, s: &str) -> Self {
        // Lengths are bounded by the MAX_* checks done before encoding.
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
}

struct KeyReader<'a> {
    db: &'static str,
    rest: &'a [u8],
}

impl<'a> KeyReader<'a> {
    fn new(db: &'static str, bytes: &'a [u8]) -> Self {
        Self { db, rest: bytes }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyError> {
        if self.rest.len() < n {
            return Err(KeyError::Malformed { db: self.db, why: "truncated" });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn str(&mut self) -> Result<String, KeyError> {
        let len = u32::from_be_bytes(self.fixed::<4>()?) as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| KeyError::Malformed { db: self.db, why: "not utf-8" })
    }
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], KeyError> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
    fn u64(&mut self) -> Result<u64, KeyError> {
        Ok(u64::from_be_bytes(self.fixed::<8>()?))
    }
    fn u32(&mut self) -> Result<u32, KeyError> {
        Ok(u32::from_be_bytes(self.fixed::<4>()?))
    }
    fn end(self) -> Result<(), KeyError> {
        if self.rest.is_empty() { Ok(()) } else { Err(KeyError::Malformed { db: self.db, why: "trailing bytes" }) }
    }
}

/// `(tenant, saga, correlation_id)`: one saga instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct SagaKey {
    pub tenant: String,
    pub saga: String,
    pub correlation_id: String,
}

impl SagaKey {
    pub fn new(tenant: impl Into<String>, saga: impl Into<String>, correlation_id: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), saga: saga.into(), correlation_id: correlation_id.into() }
    }

    /// Checks the component limits; call before storing a key that came from input.
    pub fn validate(&self) -> Result<(), KeyError> {
        check_len("tenant", &self.tenant, MAX_TENANT)?;
        check_len("saga name", &self.saga, MAX_NAME)?;
        check_len("correlation id", &self.correlation_id, MAX_CORRELATION_ID)
    }

    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new().str(&self.tenant).str(&self.saga).str(&self.correlation_id).0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("sagas", bytes);
        let key = Self { tenant: r.str()?, saga: r.str()?, correlation_id: r.str()? };
        r.end()?;
        Ok(key)
    }

    pub fn route(&self) -> crate::routing::RouteKey<'_> {
        crate::routing::RouteKey::Saga { saga: &self.saga, correlation_id: &self.correlation_id }
    }
}

impl std::fmt::Display for SagaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tenant {:?} saga {:?} correlation id {:?}", self.tenant, self.saga, self.correlation_id)
    }
}

/// `(tenant, saga, correlation_id, event id)`: an effect result one instance applied in
/// place. The instance's key is a prefix of each of its results' keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResultKey {
    pub saga: SagaKey,
    pub event_id: String,
}

impl ResultKey {
    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new().str(&self.saga.tenant).str(&self.saga.saga).str(&self.saga.correlation_id).str(&self.event_id).0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("results", bytes);
        let saga = SagaKey { tenant: r.str()?, saga: r.str()?, correlation_id: r.str()? };
        let key = Self { saga, event_id: r.str()? };
        r.end()?;
        Ok(key)
    }
}

/// `(tenant, saga, correlation_id, index)`: one applied event of an instance's history. The
/// instance's key is a prefix of its entries' keys, which sort by index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistoryKey {
    pub saga: SagaKey,
    pub index: u64,
}

impl HistoryKey {
    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new().str(&self.saga.tenant).str(&self.saga.saga).str(&self.saga.correlation_id).u64(self.index).0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("history", bytes);
        let saga = SagaKey { tenant: r.str()?, saga: r.str()?, correlation_id: r.str()? };
        let key = Self { saga, index: r.u64()? };
        r.end()?;
        Ok(key)
    }
}

/// Prefix of all saga keys of one tenant (for listings).
pub fn saga_tenant_prefix(tenant: &str) -> Vec<u8> {
    KeyBuf::new().str(tenant).0
}

/// Prefix of all saga keys of one saga of one tenant (instance listings).
pub fn saga_prefix(tenant: &str, saga: &str) -> Vec<u8> {
    KeyBuf::new().str(tenant).str(saga).0
}

/// `(partition, seq)`: one outbox item; `seq` is time-ordered and monotonic per shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboxKey {
    pub partition: u32,
    pub seq: u64,
}

impl OutboxKey {
    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&self.partition.to_be_bytes());
        out[4..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("outbox", bytes);
        let key = Self { partition: r.u32()?, seq: r.u64()? };
        r.end()?;
        Ok(key)
    }
}

/// `(due_at, tenant, saga, correlation_id, timer_id)`: one durable timer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduleKey {
    pub due_at: u64,
    pub saga: SagaKey,
    pub timer_id: String,
}

impl ScheduleKey {
    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new()
            .u64(self.due_at)
            .str(&self.saga.tenant)
            .str(&self.saga.saga)
            .str(&self.saga.correlation_id)
            .str(&self.timer_id)
            .0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("schedules", bytes);
        let due_at = r.u64()?;
        let saga = SagaKey { tenant: r.str()?, saga: r.str()?, correlation_id: r.str()? };
        let timer_id = r.str()?;
        r.end()?;
        Ok(Self { due_at, saga, timer_id })
    }
}

/// The first schedule key strictly after every entry due at or before `due_at`.
pub fn schedule_upper_bound(due_at: u64) -> Vec<u8> {
    match due_at.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    }
}

/// `(tenant, command_id)`: one effect gate entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EffectKey {
    pub tenant: String,
    pub command_id: String,
}

impl EffectKey {
    pub fn new(tenant: impl Into<String>, command_id: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), command_id: command_id.into() }
    }

    pub fn validate(&self) -> Result<(), KeyError> {
        check_len("tenant", &self.tenant, MAX_TENANT)?;
        check_len("command id", &self.command_id, MAX_ID)
    }

    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new().str(&self.tenant).str(&self.command_id).0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("effects", bytes);
        let key = Self { tenant: r.str()?, command_id: r.str()? };
        r.end()?;
        Ok(key)
    }

    pub fn route(&self) -> crate::routing::RouteKey<'_> {
        crate::routing::RouteKey::Effect { command_id: &self.command_id }
    }
}

/// `(tenant, saga, stream)`: highest stream sequence this shard applied for a saga.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointKey {
    pub tenant: String,
    pub saga: String,
    pub stream: String,
}

impl CheckpointKey {
    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new().str(&self.tenant).str(&self.saga).str(&self.stream).0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("checkpoints", bytes);
        let key = Self { tenant: r.str()?, saga: r.str()?, stream: r.str()? };
        r.end()?;
        Ok(key)
    }
}

/// `(tenant, at, id)`: one dead letter, listed per tenant in time order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterKey {
    pub tenant: String,
    pub at: u64,
    pub id: String,
}

impl DeadLetterKey {
    pub fn encode(&self) -> Vec<u8> {
        KeyBuf::new().str(&self.tenant).u64(self.at).str(&self.id).0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = KeyReader::new("deadletter", bytes);
        let key = Self { tenant: r.str()?, at: r.u64()?, id: r.str()? };
        r.end()?;
        Ok(key)
    }
}

/// Prefix of all dead letters of one tenant.
pub fn deadletter_tenant_prefix(tenant: &str) -> Vec<u8> {
    KeyBuf::new().str(tenant).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s() -> impl Strategy<Value = String> {
        // Short strings with separators, empties and multi-byte characters, where naive
        // concatenation encodings would collide.
        prop::collection::vec(prop::sample::select(vec!["", "a", "b", ":", "/", "\0", "é", "ab", "\u{1F600}"]), 0..4)
            .prop_map(|parts| parts.concat())
    }

    fn saga_key() -> impl Strategy<Value = SagaKey> {
        (s(), s(), s()).prop_map(|(t, n, c)| SagaKey::new(t, n, c))
    }

    proptest! {
        #[test]
        fn saga_keys_are_injective_and_round_trip(a in saga_key(), b in saga_key()) {
            prop_assert_eq!(SagaKey::decode(&a.encode()).unwrap(), a.clone());
            prop_assert_eq!(a == b, a.encode() == b.encode());
        }

        #[test]
        fn schedule_keys_are_injective_round_trip_and_sort_by_due(
            a in (0u64..u64::MAX, saga_key(), s()), b in (0u64..u64::MAX, saga_key(), s())
        ) {
            let ka = ScheduleKey { due_at: a.0, saga: a.1, timer_id: a.2 };
            let kb = ScheduleKey { due_at: b.0, saga: b.1, timer_id: b.2 };
            prop_assert_eq!(ScheduleKey::decode(&ka.encode()).unwrap(), ka.clone());
            prop_assert_eq!(ka == kb, ka.encode() == kb.encode());
            if ka.due_at < kb.due_at {
                prop_assert!(ka.encode() < kb.encode());
            }
            // every key due at or before t sorts below the upper bound of t
            prop_assert!(ka.encode() < schedule_upper_bound(ka.due_at));
            if ka.due_at > 0 {
                prop_assert!(ka.encode() >= schedule_upper_bound(ka.due_at - 1));
            }
        }

        #[test]
        fn effect_checkpoint_deadletter_outbox_keys_are_injective(
            t1 in s(), c1 in s(), t2 in s(), c2 in s(), x1 in s(), x2 in s(),
            n1 in any::<u64>(), n2 in any::<u64>(), p1 in any::<u32>(), p2 in any::<u32>()
        ) {
            let (e1, e2) = (EffectKey::new(t1.clone(), c1.clone()), EffectKey::new(t2.clone(), c2.clone()));
            prop_assert_eq!(EffectKey::decode(&e1.encode()).unwrap(), e1.clone());
            prop_assert_eq!(e1 == e2, e1.encode() == e2.encode());

            let k1 = CheckpointKey { tenant: t1.clone(), saga: c1.clone(), stream: x1.clone() };
            let k2 = CheckpointKey { tenant: t2.clone(), saga: c2.clone(), stream: x2.clone() };
            prop_assert_eq!(CheckpointKey::decode(&k1.encode()).unwrap(), k1.clone());
            prop_assert_eq!(k1 == k2, k1.encode() == k2.encode());

            let d1 = DeadLetterKey { tenant: t1.clone(), at: n1, id: x1 };
            let d2 = DeadLetterKey { tenant: t2.clone(), at: n2, id: x2 };
            prop_assert_eq!(DeadLetterKey::decode(&d1.encode()).unwrap(), d1.clone());
            prop_assert_eq!(d1 == d2, d1.encode() == d2.encode());
            prop_assert!(d1.encode().starts_with(&deadletter_tenant_prefix(&t1)));
            if t1 == t2 && n1 < n2 {
                prop_assert!(d1.encode() < d2.encode());
            }

            let o1 = OutboxKey { partition: p1, seq: n1 };
            let o2 = OutboxKey { partition: p2, seq: n2 };
            prop_assert_eq!(OutboxKey::decode(&o1.encode()).unwrap(), o1);
            prop_assert_eq!(o1 == o2, o1.encode() == o2.encode());
            prop_assert_eq!(o1 < o2, o1.encode() < o2.encode());
        }
    }

    proptest! {
        #[test]
        fn history_keys_are_injective_and_sort_by_index_within_an_instance(
            a in (saga_key(), any::<u64>()), b in (saga_key(), any::<u64>())
        ) {
            let (ka, kb) = (HistoryKey { saga: a.0, index: a.1 }, HistoryKey { saga: b.0, index: b.1 });
            prop_assert_eq!(HistoryKey::decode(&ka.encode()).unwrap(), ka.clone());
            prop_assert_eq!(ka == kb, ka.encode() == kb.encode());
            prop_assert!(ka.encode().starts_with(&ka.saga.encode()));
            if ka.saga == kb.saga {
                prop_assert_eq!(ka.index < kb.index, ka.encode() < kb.encode());
            } else {
                prop_assert!(!kb.encode().starts_with(&ka.saga.encode()));
            }
        }
    }

    #[test]
    fn tenant_prefix_does_not_match_a_longer_tenant() {
        let k = DeadLetterKey { tenant: "ab".into(), at: 1, id: "x".into() };
        assert!(!k.encode().starts_with(&deadletter_tenant_prefix("a")));
        assert!(k.encode().starts_with(&deadletter_tenant_prefix("ab")));
    }

    #[test]
    fn limits_name_the_component() {
        let long = "x".repeat(MAX_CORRELATION_ID + 1);
        let err = SagaKey::new("t", "order", long).validate().unwrap_err();
        assert!(err.to_string().starts_with("correlation id is 257 bytes long"), "{err}");
        assert!(matches!(SagaKey::decode(b"\0\0\0\x05ab"), Err(KeyError::Malformed { db: "sagas", .. })));
    }
}
