//! What the core asks the shell to do once a batch is durable: answers to the requests that
//! brought work in (by id; the shell holds the reply channels) and hints for the relay.
//! Pushed in the order they were decided; the shell carries them out in that order.

use crate::keys::OutboxKey;
use crate::message::{AdminAnswer, AdminError, FinishError, GateDecision};
use crate::record::OutboxItem;

/// Names a request whose answer the shell keeps until the core decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// One thing to do after the commit.
#[derive(Debug, Clone)]
pub enum Action {
    /// One target of a stream message is settled: applied, skipped or parked (`term` is
    /// `None`: ack), or quarantined (`term` says why: `TERM`). The message is answered when
    /// all its targets are.
    Settle { request: RequestId, term: Option<String> },
    /// The effect gate's decision for a delivered command.
    Gate { request: RequestId, decision: GateDecision },
    /// A completion was recorded (or refused), or a message was quarantined.
    Done { request: RequestId, result: Result<(), FinishError> },
    /// An operator action was carried out, or refused with nothing written.
    Admin { request: RequestId, answer: Result<AdminAnswer, AdminError> },
    /// A committed outbox item for the relay to dispatch.
    Offer { key: OutboxKey, item: OutboxItem },
    /// The item's dispatch was confirmed and the item deleted.
    Delivered { key: OutboxKey },
    /// The item was stored again to be retried at its `next_attempt_at`.
    RetryLater { key: OutboxKey, item: OutboxItem },
}
