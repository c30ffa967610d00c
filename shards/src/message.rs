//! What crosses between the I/O bridge (tokio) and the shards (glommio): requests into a
//! shard's inbox, control messages, answers on one-shot channels, and dispatch requests
//! from a shard's relay to the bridge. All of it is `Send`; none of it holds a lock.

use crate::keys::{DeadLetterKey, EffectKey, OutboxKey, SagaKey};
use crate::manifest::ManifestSet;
use crate::program::ProgramError;
use crate::record::{AppliedRef, DeadLetter, EffectRecord, Json, OutboxItem, SagaRecord};
use crate::store::{StoreError, StoreStats};
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

/// Read-only questions (inspection, admin listings), each with its typed answer channel.
/// Answered by the shard at once from committed state, between batches.
pub enum Query {
    /// One instance with its pending timers, outbox items and retry state.
    Saga {
        key: SagaKey,
        reply: Reply<Result<Option<SagaView>, ShardError>>,
    },
    /// The effect gate record of one command.
    Effect {
        key: EffectKey,
        reply: Reply<Result<Option<EffectRecord>, ShardError>>,
    },
    /// Dead letters of a tenant in the order they were written, after `after`, at most `limit`.
    DeadLetters {
        tenant: String,
        after: Option<DeadLetterKey>,
        limit: usize,
        reply: Reply<Result<Vec<DeadLetterView>, ShardError>>,
    },
    /// Correlation ids of the instances of `saga` for `tenant` on this shard, in key order,
    /// after `after`, at most `limit` (a page; `next` continues it).
    Sagas {
        tenant: String,
        saga: String,
        after: Option<String>,
        limit: usize,
        reply: Reply<Result<SagaPage, ShardError>>,
    },
    /// Instances of `saga` for `tenant` on this shard matching `filter`, in key order
    /// ([`listing_order`]) after `after`: at most `limit`, reading at most [`LIST_SCAN`]
    /// records per call (a page that stops early says where it stopped).
    List {
        tenant: String,
        saga: String,
        filter: ListFilter,
        after: Option<String>,
        limit: usize,
        reply: Reply<Result<SagaList, ShardError>>,
    },
    Stats {
        reply: Reply<Result<ShardStats, ShardError>>,
    },
    /// Replays recorded on this shard and not finished, in key order after `after`, at most
    /// `limit`; `true` for those already started (their keys are held).
    Replays {
        after: Option<SagaKey>,
        limit: usize,
        reply: Reply<Result<Vec<(SagaKey, bool)>, ShardError>>,
    },
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Query::Saga { key, .. } => write!(f, "Saga({key})"),
            Query::Effect { key, .. } => write!(f, "Effect({}/{})", key.tenant, key.command_id),
            Query::DeadLetters { tenant, limit, .. } => write!(f, "DeadLetters({tenant:?}, {limit})"),
            Query::Sagas { tenant, saga, limit, .. } => write!(f, "Sagas({tenant:?}, {saga:?}, {limit})"),
            Query::List { tenant, saga, limit, .. } => write!(f, "List({tenant:?}, {saga:?}, {limit})"),
            Query::Stats { .. } => write!(f, "Stats"),
            Query::Replays { limit, .. } => write!(f, "Replays({limit})"),
        }
    }
}

/// One saga instance as an operator sees it (`GET /sagas/...`): the stored record plus what
/// is pending for it.
#[derive(Debug, Clone, Serialize)]
pub struct SagaView {
    pub tenant: String,
    pub saga: String,
    pub correlation_id: String,
    pub shard: usize,
    #[serde(flatten)]
    pub record: SagaRecord,
    pub pending_timers: Vec<TimerView>,
    pub pending_outbox: Vec<OutboxItem>,
    /// Set when the outbox of the instance's partition was larger than one query reads.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending_outbox_truncated: bool,
    /// The key's head event failed and waits for its retry.
    pub blocked: Option<BlockedView>,
}

/// A timer of an instance that has not fired yet.
#[derive(Debug, Clone, Serialize)]
pub struct TimerView {
    pub timer_id: String,
    pub due_at: u64,
    pub name: String,
    pub payload: Json,
}

/// A key whose head event failed and waits for a retry in place, or that a replay holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedView {
    pub attempts: u32,
    pub retry_at: u64,
    pub error: String,
    /// Later events of the key waiting behind the head one (or behind the replay).
    pub queued: usize,
    pub event_id: String,
    /// Held by a replay (no head event, no retry).
    pub replaying: bool,
}

/// A dead letter with the key it is stored under and the shard that holds it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub key: DeadLetterKey,
    pub shard: usize,
}

/// The order of a listing: the store's key order, correlation ids by length, then bytes.
pub fn listing_order(correlation_id: &str) -> (usize, &str) {
    (correlation_id.len(), correlation_id)
}

/// Records one listing reads at most per shard and call (a bounded scan on the shard's thread).
pub const LIST_SCAN: usize = 5_000;

/// What a listing keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<crate::record::InstanceStatus>,
    /// Only parked instances (`Some(true)`) or only unparked ones (`Some(false)`).
    pub parked: Option<bool>,
    pub correlation_prefix: Option<String>,
    /// Changed at or after this time (ms since the epoch).
    pub updated_after: Option<u64>,
}

/// One listed instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SagaSummary {
    pub correlation_id: String,
    pub status: crate::record::InstanceStatus,
    pub version: u64,
    pub updated_at: u64,
    pub parked: bool,
    pub shard: usize,
}

/// A page of one shard's listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SagaList {
    pub instances: Vec<SagaSummary>,
    /// The last correlation id read, when the shard may hold more after it.
    pub scanned_to: Option<String>,
}

/// A page of instance correlation ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SagaPage {
    pub correlation_ids: Vec<String>,
    /// Where the next page starts (`after`), when there may be more.
    pub next: Option<String>,
}

/// What one shard holds and is doing (`/admin/stats`).
#[derive(Debug, Clone, Serialize)]
pub struct ShardStats {
    pub shard: usize,
    pub store: StoreStats,
    pub map_size: usize,
    /// Outbox items the relay holds in memory (at most its window).
    pub outbox_window: usize,
    pub outbox_in_flight: usize,
    /// Items waiting for their next attempt after a failed dispatch.
    pub outbox_retrying: usize,
    /// The most failed attempts among them (0 when none is waiting).
    pub outbox_most_attempts: u32,
    pub blocked_keys: usize,
    pub effects_in_flight: usize,
    pub next_timer_due: Option<u64>,
}

/// Steps of a replay per [`AdminOp::ReplaySteps`] at most (a page: one batch each).
pub const REPLAY_PAGE: usize = 32;

/// One step of an instance's replayed history, as the driver hands it to the shard.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayStep {
    /// A stream event read back by its sequence.
    Event(Arc<Event>),
    /// A step the shard takes from its own records: a timer, an effect result applied in
    /// place, or a stream event below the replay's `from_seq` (skipped).
    Own,
}

/// Operator actions that write.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminOp {
    /// Re-apply the dead letters of a parked (or quarantined) instance in order; with
    /// `skip_poison` the poison event itself is discarded first.
    Requeue { key: SagaKey, skip_poison: bool },
    /// Delete one dead letter.
    Discard { key: DeadLetterKey },
    /// Put the work item of a dispatch dead letter back in the outbox (attempts from 0,
    /// same work id, so the receiver's dedupe still holds) and delete the letter.
    Resend { key: DeadLetterKey },
    /// A controlled replay of instances of a saga: every instance of `saga` for `tenant` (or
    /// only `correlation_id`) is recorded as to be replayed (db `replays`, so the replay
    /// survives a crash) and the checkpoints set to `from_seq`. Nothing is reset yet: each
    /// instance is, by its first [`AdminOp::ReplaySteps`]. Instances whose history is
    /// incomplete are left out (refused when named).
    Replay { tenant: String, saga: String, correlation_id: Option<String>, from_seq: u64 },
    /// The next page of an instance's replay (where it stands, the history refs to apply
    /// next). Writes nothing.
    ReplayNext { key: SagaKey },
    /// Applies the next steps of an instance's replay: `steps[i]` is step `at + i` of its
    /// history. The first step resets the instance and holds its key (events, results and
    /// timers for it wait, in order); the last releases it and applies what waited. Answers
    /// the next page.
    ReplaySteps { key: SagaKey, at: u64, steps: Vec<ReplayStep> },
    /// Gives an instance's replay up: one not started is forgotten; a started one puts the
    /// instance back exactly as it was before its reset and releases its key.
    ReplayAbort { key: SagaKey, reason: String },
}

/// What an [`AdminOp`] did (serialised as the admin API's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AdminAnswer {
    Requeued { requeued: usize, skipped: Option<String> },
    Discarded { discarded: String },
    Resent { resent: String, work_id: String },
    Marked(ReplayMarked),
    Page(ReplayPage),
    Aborted { aborted: String, restored: bool },
}

/// The instances a replay was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayMarked {
    /// Correlation ids of the instances recorded for the replay (or recorded already).
    pub instances: Vec<String>,
    /// Instances left out, with the reason (an incomplete history).
    pub skipped: Vec<(String, String)>,
    pub from_seq: u64,
    pub streams: Vec<String>,
}

/// Where one instance's replay stands and what it applies next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayPage {
    pub correlation_id: String,
    /// The step the first of `refs` is (steps applied so far).
    pub at: u64,
    /// The history's next steps (at most [`REPLAY_PAGE`]); each one a stream event to read
    /// back unless [`AppliedRef::from_stream`] says otherwise or it lies below `from_seq`.
    pub refs: Vec<AppliedRef>,
    pub from_seq: u64,
    /// Steps in the whole history.
    pub total: u64,
    /// The replay is over: its key is released (and the instance rebuilt, unless aborted).
    pub ended: bool,
    /// Why the replay was given up and the instance put back as it was (a history event
    /// the program now fails on).
    pub aborted: Option<String>,
}

/// Why an operator action was refused (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("{key} is retrying its head event; requeue after it is quarantined")]
    RequeueWhileRetrying { key: SagaKey },
    #[error("no dead letters to requeue for {key}")]
    NothingToRequeue { key: SagaKey },
    #[error("dead letter {id} of {key} holds an unreadable event: {error}")]
    UnreadableLetter { key: SagaKey, id: String, error: String },
    #[error("no dead letter {id} for tenant {tenant:?}")]
    NoSuchLetter { tenant: String, id: String },
    #[error("dead letter {id} of tenant {tenant:?} is a {kind} letter, not a failed dispatch: requeue or discard it")]
    NotResendable { tenant: String, id: String, kind: String },
    #[error("{key} is retrying an event; replay it after that settles")]
    ReplayWhileRetrying { key: SagaKey },
    #[error("{key} is parked behind a dead letter; requeue or skip its dead letters before a replay")]
    ReplayWhileParked { key: SagaKey },
    #[error("{key} is being replayed; requeue after the replay")]
    RequeueWhileReplaying { key: SagaKey },
    #[error(
        "{key} applied {applied} events but remembers only the last {remembered}: its record was written before instances kept their whole history, so it cannot be replayed exactly; leave it as it is (a replay of the whole saga skips it); instances started since keep their whole history"
    )]
    HistoryIncomplete { key: SagaKey, applied: u64, remembered: u64 },
    #[error("no replay of {key} is under way")]
    NoReplay { key: SagaKey },
    #[error("the replay of {key} stands at step {done}, not {at}: another request is driving it")]
    ReplayConflict { key: SagaKey, at: u64, done: u64 },
    #[error("step {index} of the replay of {key} does not match its history: {why}")]
    ReplayStepMismatch { key: SagaKey, index: u64, why: String },
    #[error("the stored instance {key} cannot be read: {error}")]
    UnreadableInstance { key: SagaKey, error: String },
}

impl AdminError {
    /// The thing the action names does not exist (as opposed to a conflict with its state).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            AdminError::NoSuchLetter { .. } | AdminError::NothingToRequeue { .. } | AdminError::NoReplay { .. }
        )
    }
}

/// Failures a shard reports across the thread boundary.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Program(#[from] ProgramError),
}

/// Why an effect's completion was not recorded (the command is redelivered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FinishError {
    #[error("the result of command {command_id:?} of tenant {tenant:?} is not JSON")]
    ResultNotJson { tenant: String, command_id: String },
}

/// Requests into a shard's inbox.
pub enum Request {
    /// Apply an event to one or more saga instances owned by this shard.
    Apply {
        event: Arc<Event>,
        targets: Vec<Target>,
        reply: Reply<ApplyOutcome>,
    },
    /// Apply an event that was in flight when the process last died (issue 17 item 16):
    /// the bridge hands these on one at a time. Like [`Request::Apply`], and `ran` is told
    /// once the batch that took the event in is durable while the event still waits (its
    /// key is blocked); when it settles in that batch, `reply` answers instead and `ran` is
    /// dropped. With `crashed`, the process has died that many times with the event in
    /// flight: it is not run but quarantined as a poison event of each target's key.
    ApplySuspect {
        event: Arc<Event>,
        targets: Vec<Target>,
        reply: Reply<ApplyOutcome>,
        ran: Reply<()>,
        crashed: Option<u32>,
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
        reply: Reply<Result<(), FinishError>>,
    },
    /// A started run ended without a result (it will be redelivered): forget it in memory.
    EffectRelease {
        key: EffectKey,
    },
    /// Run one attempt of an effect command on this shard's thread (effect mode: the gate
    /// said run). The answer is `Ran` (final), `Later` (try again) or `Permanent`.
    RunEffect {
        command: Box<OutboxItem>,
        reply: Reply<DispatchOutcome>,
    },
    /// Quarantine an undecodable message; answered once the dead letter is committed.
    Quarantine {
        letter: RawLetter,
        reply: Reply<()>,
    },
    Query(Query),
    Admin {
        op: AdminOp,
        reply: Reply<Result<AdminAnswer, AdminError>>,
    },
    /// Swap the manifests between batches.
    Reload {
        set: Arc<ManifestSet>,
        reply: Reply<Result<(), ShardError>>,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Apply { event, targets, .. } => write!(f, "Apply({} -> {} targets)", event.id, targets.len()),
            Request::ApplySuspect { event, targets, crashed, .. } => {
                write!(f, "ApplySuspect({} -> {} targets, crashed {crashed:?})", event.id, targets.len())
            }
            Request::EffectBegin { key, .. } => write!(f, "EffectBegin({})", key.command_id),
            Request::EffectFinish { key, .. } => write!(f, "EffectFinish({})", key.command_id),
            Request::EffectRelease { key } => write!(f, "EffectRelease({})", key.command_id),
            Request::RunEffect { command, .. } => write!(f, "RunEffect({})", command.work_id),
            Request::Quarantine { letter, .. } => write!(f, "Quarantine({}#{})", letter.stream, letter.seq),
            Request::Query(query) => write!(f, "Query({query:?})"),
            Request::Admin { op, .. } => write!(f, "Admin({op:?})"),
            Request::Reload { .. } => write!(f, "Reload"),
        }
    }
}

/// How one dispatch ended.
#[derive(Debug, Clone, PartialEq)]
pub enum DispatchOutcome {
    /// Durably confirmed (PubAck, Gateway 2xx or duplicate): delete the item.
    Delivered,
    /// Failed, may succeed later: retry with the relay's backoff.
    Retry { error: String },
    /// Failed for good (e.g. Gateway 4xx): dead-letter the item.
    Permanent { error: String },
    /// An effect ran in place (combined mode) and has its final result: it is applied to
    /// the saga in the commit that deletes the item, and recorded for the streams.
    Ran(Box<RanEffect>),
    /// Try the item again in `wait_ms`: a call that failed and may succeed (`attempt`:
    /// counted against the effect's retry policy, which chose the wait), or one not made
    /// because its upstream's breaker is open (not counted).
    Later { wait_ms: u64, error: String, attempt: bool },
}

/// The final result of an effect run in place, as the saga sees it and as it is published
/// for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct RanEffect {
    /// The result event (id `result:{command_id}`, no stream sequence).
    pub event: Event,
    /// What to publish, once the result is applied: the command and its result, each under
    /// its `Nats-Msg-Id`, exactly as an effect worker would have seen and published them.
    pub command_subject: String,
    pub command: Vec<u8>,
    pub result_subject: String,
    pub result: Vec<u8>,
}

/// One dispatch result from the bridge.
#[derive(Debug, Clone)]
pub struct DispatchResult {
    pub key: OutboxKey,
    /// The send it answers ([`Dispatch::send`]): an answer to an earlier send of an item
    /// sent again is stale, and only a confirmation of it counts.
    pub send: u64,
    pub outcome: DispatchOutcome,
}

/// One send of an outbox item, as the relay hands it out.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub key: OutboxKey,
    /// Names this send among the sends of the item (unique per shard until restart).
    pub send: u64,
    pub item: OutboxItem,
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
    pub items: Vec<Dispatch>,
}
