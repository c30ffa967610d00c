//! What crosses between the I/O bridge (tokio) and the shards (glommio): requests into a
//! shard's inbox, control messages, answers on one-shot channels, and dispatch requests
//! from a shard's relay to the bridge. All of it is `Send`; none of it holds a lock.

use crate::keys::{DeadLetterKey, EffectKey, OutboxKey, SagaKey};
use crate::manifest::ManifestSet;
use crate::record::OutboxItem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A one-shot answer channel.
pub type Reply<T> = futures_channel::oneshot::Sender<T>;
pub type ReplyRx<T> = futures_channel::oneshot::Receiver<T>;

pub fn reply_channel<T>() -> (Reply<T>, ReplyRx<T>) {
    futures_channel::oneshot::channel()
}

/// An effect result carried by a `WORKFLOW_EVENTS` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultInfo {
    pub command_id: String,
    pub effect: String,
    /// `succeeded` or `failed`.
    pub outcome: String,
}

/// One decoded event, as the program sees it (plus transport details).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event id: the envelope's id / `Nats-Msg-Id`; for timers the timer id.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub stream: String,
    /// Stream sequence; 0 for events that do not come from a stream (timers).
    pub seq: u64,
    pub subject: String,
    pub tenant: String,
    /// Milliseconds since the Unix epoch: the event's own time, the only time a program sees.
    pub timestamp: u64,
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultInfo>,
    /// Headers as received (kept for dead letters).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Which saga instance an event is for, and whether it may start it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub saga: String,
    pub correlation_id: String,
    pub may_start: bool,
}

/// How the bridge should settle a JetStream message once a shard answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied, skipped as a duplicate, or parked in the dead-letter queue: ack.
    Ack,
    /// Quarantined as a dead letter: `TERM`.
    Term { reason: String },
    /// Not taken (shutting down): NAK with a delay so it comes back.
    Nak { delay_ms: u64 },
}

/// The effect gate's answer for one delivered command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateDecision {
    /// Call the provider; this is attempt `attempt` (durably recorded as started).
    Run { attempt: u32 },
    /// Already completed: re-publish this result (same `Nats-Msg-Id`) and ack.
    Completed { subject: String, outcome: String, result: Vec<u8> },
    /// Another delivery of this command is running in this process. `same_message` when it
    /// is a redelivery of the very same stream message (do nothing; the running one acks).
    Busy { same_message: bool },
    /// The command cannot be gated (bad key): dead-letter it.
    Invalid { reason: String },
}

/// A message that could not be decoded, to quarantine as a dead letter.
#[derive(Debug, Clone)]
pub struct RawLetter {
    pub tenant: String,
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    pub raw: Vec<u8>,
    pub error: String,
}

/// Read-only questions (inspection, admin listings).
#[derive(Debug, Clone)]
pub enum Query {
    Saga(SagaKey),
    /// The effect gate record of one command.
    Effect(EffectKey),
    DeadLetters {
        tenant: String,
        after: Option<DeadLetterKey>,
        limit: usize,
    },
    /// Correlation ids of every instance of `saga` for `tenant` on this shard.
    Sagas {
        tenant: String,
        saga: String,
    },
    Stats,
}

/// Answers to [`Query`], as JSON (what the HTTP and CLI layers print).
pub type QueryAnswer = Result<serde_json::Value, String>;

/// Operator actions that write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOp {
    /// Re-apply the dead letters of a parked (or quarantined) instance in order; with
    /// `skip_poison` the poison event itself is discarded first.
    Requeue { key: SagaKey, skip_poison: bool },
    /// Delete one dead letter.
    Discard { key: DeadLetterKey },
    /// Reset instances of a saga so their events can be applied again (controlled replay):
    /// every instance of `saga` for `tenant` (or only `correlation_id`) is cleared, its
    /// dispatched work ids remembered so nothing is dispatched twice, and the checkpoint set
    /// to `from_seq`. Answers, per reset instance, the events it had applied, in order
    /// (`applied`: stream, seq, id), so the caller can apply them again in that order.
    Replay { tenant: String, saga: String, correlation_id: Option<String>, from_seq: u64 },
    /// During a replay: apply the instance's timer `timer_id` now (its place in the history).
    FireTimer { key: SagaKey, timer_id: String },
    /// The replay of an instance is over: its timers fire normally again.
    EndReplay { key: SagaKey },
}

/// Requests into a shard's inbox.
pub enum Request {
    /// Apply an event to one or more saga instances owned by this shard.
    Apply {
        event: Arc<Event>,
        targets: Vec<Target>,
        reply: Reply<ApplyOutcome>,
    },
    /// The effect gate, before calling a provider. `msg_seq` is the command message's
    /// stream sequence.
    EffectBegin {
        key: EffectKey,
        msg_seq: u64,
        reply: Reply<GateDecision>,
    },
    /// Record completion after the result event's PubAck.
    EffectFinish {
        key: EffectKey,
        attempts: u32,
        subject: String,
        outcome: String,
        result: Vec<u8>,
        reply: Reply<Result<(), String>>,
    },
    /// A started run ended without a result (it will be redelivered): forget it in memory.
    EffectRelease {
        key: EffectKey,
    },
    /// Quarantine an undecodable message.
    Quarantine {
        letter: RawLetter,
        reply: Reply<Result<(), String>>,
    },
    Query {
        query: Query,
        reply: Reply<QueryAnswer>,
    },
    Admin {
        op: AdminOp,
        reply: Reply<Result<serde_json::Value, String>>,
    },
    /// Swap the manifests between batches.
    Reload {
        set: Arc<ManifestSet>,
        reply: Reply<Result<(), String>>,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Apply { event, targets, .. } => write!(f, "Apply({} -> {} targets)", event.id, targets.len()),
            Request::EffectBegin { key, .. } => write!(f, "EffectBegin({})", key.command_id),
            Request::EffectFinish { key, .. } => write!(f, "EffectFinish({})", key.command_id),
            Request::EffectRelease { key } => write!(f, "EffectRelease({})", key.command_id),
            Request::Quarantine { letter, .. } => write!(f, "Quarantine({}#{})", letter.stream, letter.seq),
            Request::Query { query, .. } => write!(f, "Query({query:?})"),
            Request::Admin { op, .. } => write!(f, "Admin({op:?})"),
            Request::Reload { .. } => write!(f, "Reload"),
        }
    }
}

/// How one dispatch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatchOutcome {
    /// Durably confirmed (PubAck, Gateway 2xx or duplicate): delete the item.
    Delivered,
    /// Failed, may succeed later: retry with backoff.
    Retry { error: String },
    /// Failed for good (e.g. Gateway 4xx): dead-letter the item.
    Permanent { error: String },
}

/// One dispatch result from the bridge.
#[derive(Debug, Clone)]
pub struct DispatchResult {
    pub key: OutboxKey,
    pub outcome: DispatchOutcome,
}

/// Control messages: never block the bridge (the relay bounds how many are in flight).
#[derive(Debug)]
pub enum Control {
    Dispatched(Vec<DispatchResult>),
    /// Finish what was accepted, commit, and stop.
    Stop,
}

/// A shard's relay asks the bridge to dispatch these items, in order.
#[derive(Debug)]
pub struct DispatchRequest {
    pub shard: usize,
    pub items: Vec<(OutboxKey, OutboxItem)>,
}
