//! Deterministic ids (invariant 5): derived from what caused them, so a replay or a retry
//! produces the same id, and JetStream's `Nats-Msg-Id` dedupe and the effect gate absorb
//! the repeat. UUID v5 over a length-prefixed tuple in a fixed namespace.

use uuid::Uuid;

/// Namespace of every id the runner derives. Never change it.
const NAMESPACE: Uuid = Uuid::from_u128(0x6a0c_2c9e_5b1d_4e57_9a43_52c1_7e0b_d001);

fn derive(parts: &[&[u8]]) -> String {
    let mut buf = Vec::with_capacity(128);
    for p in parts {
        buf.extend_from_slice(&(p.len() as u32).to_be_bytes());
        buf.extend_from_slice(p);
    }
    Uuid::new_v5(&NAMESPACE, &buf).to_string()
}

/// Id of the `index`-th work item emitted while applying `event_id` to an instance.
pub fn work_id(tenant: &str, saga: &str, correlation_id: &str, event_id: &str, index: usize) -> String {
    derive(&[
        b"work",
        tenant.as_bytes(),
        saga.as_bytes(),
        correlation_id.as_bytes(),
        event_id.as_bytes(),
        &(index as u64).to_be_bytes(),
    ])
}

/// Id of the `index`-th timer scheduled while applying `event_id` to an instance.
pub fn timer_id(tenant: &str, saga: &str, correlation_id: &str, event_id: &str, index: usize) -> String {
    derive(&[
        b"timer",
        tenant.as_bytes(),
        saga.as_bytes(),
        correlation_id.as_bytes(),
        event_id.as_bytes(),
        &(index as u64).to_be_bytes(),
    ])
}

/// Id of a dead letter for a stream message (unique per message and instance).
pub fn deadletter_id(stream: &str, seq: u64, event_id: &str, saga: &str, correlation_id: &str) -> String {
    derive(&[
        b"dead",
        stream.as_bytes(),
        &seq.to_be_bytes(),
        event_id.as_bytes(),
        saga.as_bytes(),
        correlation_id.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_pinned_and_distinct() {
        // Pinned: a change would re-issue every pending command under a new id.
        assert_eq!(work_id("t", "order", "o-1", "e-1", 0), work_id("t", "order", "o-1", "e-1", 0));
        assert_eq!(work_id("t", "order", "o-1", "e-1", 0), "3d2e6f59-b50b-5787-9885-bdd18c6f90a0");
        let ids = [
            work_id("t", "order", "o-1", "e-1", 0),
            work_id("t", "order", "o-1", "e-1", 1),
            work_id("t", "order", "o-1", "e-2", 0),
            work_id("t", "order", "o-2", "e-1", 0),
            work_id("", "order", "o-1", "e-1", 0),
            timer_id("t", "order", "o-1", "e-1", 0),
        ];
        let set: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
    }
}
