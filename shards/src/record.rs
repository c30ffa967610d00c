//! The values stored in the per-shard databases (JSON-encoded, so that a stopped runner's
//! data can be inspected and a newer version can add fields).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, BTreeSet};

/// JSON text kept as text: parsed only where it is used.
pub type Json = Box<RawValue>;

/// `null` as a stored JSON value.
pub fn json_null() -> Json {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable_null())
}

fn unreachable_null() -> Json {
    // "null" is always valid JSON; this keeps the function total without a panic path.
    serde_json::value::to_raw_value(&serde_json::Value::Null).unwrap_or_default()
}

/// Lifecycle of a saga instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    Running,
    Completed,
    Failed,
}

impl InstanceStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, InstanceStatus::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
        }
    }
}

/// A key parked behind a quarantined event (policy `park`): later events wait in the
/// dead-letter queue, in order, until an operator requeues or skips.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    /// Id of the dead letter that holds the poison event.
    pub poison_event_id: String,
    pub since: u64,
    pub error: String,
    /// The highest stream sequence held in this key's dead letters (the poison event and
    /// those parked behind it), per stream: a redelivered copy (consumers restart at their
    /// ack floor) is a duplicate, not a second letter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seqs: BTreeMap<String, u64>,
}

impl Parked {
    /// Notes that the event at `seq` of `stream` is held in a dead letter of the key.
    pub fn hold(&mut self, stream: &str, seq: u64) {
        if seq > 0 {
            let s = self.seqs.entry(stream.to_owned()).or_insert(0);
            *s = (*s).max(seq);
        }
    }

    /// Whether the event at `seq` of `stream` is already held in a dead letter of the key.
    pub fn holds(&self, stream: &str, seq: u64) -> bool {
        seq > 0 && self.seqs.get(stream).is_some_and(|&s| s >= seq)
    }
}

/// One saga instance (db `sagas`). `S` is the state's representation: JSON text when
/// read for inspection, the program engine's value inside a shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaRecord<S = Json> {
    pub status: InstanceStatus,
    /// Last applied stream sequence per source stream (invariant 3).
    #[serde(default)]
    pub last_seq: BTreeMap<String, u64>,
    /// Effect command ids dispatched and not yet answered (invariant 4): a result event is
    /// applied only for one of these, once.
    #[serde(default)]
    pub outstanding: BTreeSet<String>,
    /// Number of transitions applied.
    pub version: u64,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<Parked>,
    /// The trace context of the event that started the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The events applied before the history table existed, oldest first: the last 64 at
    /// most. Read by a replay, never extended (new ones go to db `history`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedRef>,
    /// Where the rest of the instance's applied events lie in db `history`, oldest first:
    /// what a controlled replay applies again, in the order the instance first saw them.
    #[serde(default)]
    pub history: History,
    /// An operator's replay is re-applying this instance's history: how many of its steps
    /// are applied (written with the state they built, so a replay killed midway resumes
    /// from here). Events for the instance wait (its key is held) until the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_step: Option<u64>,
    /// Timers this instance set that may still be pending: timer id → due time (the
    /// schedule table is ordered by due time; this finds an instance's timers without a
    /// scan). An entry leaves when its timer is applied; one dropped unapplied (the
    /// instance had finished) may linger, so readers check the schedule table. `None` in
    /// records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timers: Option<BTreeMap<String, u64>>,
    /// The program's state (JSON).
    pub state: S,
}

/// How many applied-event references an instance kept in its record before the history
/// table: a record whose [`SagaRecord::applied`] is this long may have forgotten older ones.
pub const LEGACY_APPLIED_HISTORY: usize = 64;

/// One applied event, as remembered by its instance (db `history`, one entry per event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRef {
    pub stream: String,
    pub seq: u64,
    pub id: String,
}

impl AppliedRef {
    /// Stream name of the events a timer fired (they come from no stream).
    pub const TIMERS: &'static str = "timers";

    /// Whether the event came from a stream (and can be read back from it by sequence):
    /// not a timer, not an effect result applied in place (sequence 0).
    pub fn from_stream(&self) -> bool {
        self.seq > 0 && self.stream != Self::TIMERS
    }
}

/// An instance's entries in db `history`: indices `first..next` (keys
/// [`crate::keys::HistoryKey`]), one per applied event. A replay applies `first..next`
/// again and the rebuilt history is appended after them; the old entries go when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub first: u64,
    pub next: u64,
}

impl History {
    pub fn len(&self) -> u64 {
        self.next.saturating_sub(self.first)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An operator's replay of one instance (db `replays`, keyed by the instance): written when
/// the replay is asked for, so it survives a crash at any point until its last step, which
/// deletes it. A replay killed midway is resumed on start from `plan.done`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayMark {
    /// Stream events below this sequence are not applied again.
    pub from_seq: u64,
    /// Set when the instance was reset (its first step): the history being applied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<ReplayPlan>,
}

/// The history a started replay applies again: `legacy` (refs kept in an older record), then
/// entries `first..end` of db `history` (how many are applied is in the instance's record,
/// [`SagaRecord::replay_step`], committed with the state they built).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayPlan {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legacy: Vec<AppliedRef>,
    pub first: u64,
    pub end: u64,
    /// The instance's record as it was before the reset: an aborted replay puts it back.
    pub before: Json,
}

/// What an outbox item asks the bridge to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkKind {
    /// Publish an effect command to `WORKFLOW_COMMANDS`.
    Effect { effect: String },
    /// Submit an aggregate command to the Gateway.
    Command { command: String, aggregate: String, aggregate_id: String },
    /// Publish, for the record, an effect command that ran in place and its result (the
    /// payload holds both messages: `{"command_subject", "command", "result_subject",
    /// "result"}`).
    Audit { effect: String },
}

/// One outbox item (db `outbox`): written with the transition, deleted after dispatch is
/// durably confirmed (invariant 2).
///
/// Read through [`OutboxItemWire`]: the same JSON, without `#[serde(flatten)]`'s buffering of
/// every field (decoding items was a third of shard CPU when the relay refills its window).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "OutboxItemWire")]
pub struct OutboxItem {
    /// Deterministic id (invariant 5): the command id, the `Nats-Msg-Id`, the idempotency key.
    pub work_id: String,
    #[serde(flatten)]
    pub kind: WorkKind,
    pub tenant: String,
    pub saga: String,
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub source_event_id: String,
    pub payload: Json,
    pub created_at: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set when an operator replay re-created an item already dispatched once: the relay
    /// deletes it without dispatching.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suppressed: bool,
}

/// The stored form of an [`OutboxItem`] as read: the kind's fields at the top level.
#[derive(Deserialize)]
struct OutboxItemWire {
    work_id: String,
    kind: WireKind,
    #[serde(default)]
    effect: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    aggregate: Option<String>,
    #[serde(default)]
    aggregate_id: Option<String>,
    tenant: String,
    saga: String,
    correlation_id: String,
    #[serde(default)]
    traceparent: Option<String>,
    source_event_id: String,
    payload: Json,
    created_at: u64,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    next_attempt_at: u64,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    suppressed: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireKind {
    Effect,
    Command,
    Audit,
}

impl TryFrom<OutboxItemWire> for OutboxItem {
    type Error = String;

    fn try_from(w: OutboxItemWire) -> Result<Self, String> {
        let missing = |field: &str| format!("outbox item {}: missing field `{field}`", w.work_id);
        let kind = match w.kind {
            WireKind::Effect => WorkKind::Effect { effect: w.effect.ok_or_else(|| missing("effect"))? },
            WireKind::Audit => WorkKind::Audit { effect: w.effect.ok_or_else(|| missing("effect"))? },
            WireKind::Command => WorkKind::Command {
                command: w.command.ok_or_else(|| missing("command"))?,
                aggregate: w.aggregate.ok_or_else(|| missing("aggregate"))?,
                aggregate_id: w.aggregate_id.ok_or_else(|| missing("aggregate_id"))?,
            },
        };
        Ok(OutboxItem {
            work_id: w.work_id,
            kind,
            tenant: w.tenant,
            saga: w.saga,
            correlation_id: w.correlation_id,
            traceparent: w.traceparent,
            source_event_id: w.source_event_id,
            payload: w.payload,
            created_at: w.created_at,
            attempts: w.attempts,
            next_attempt_at: w.next_attempt_at,
            last_error: w.last_error,
            suppressed: w.suppressed,
        })
    }
}

/// One durable timer (db `schedules`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleEntry {
    pub name: String,
    pub payload: Json,
    pub source_event_id: String,
    pub scheduled_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The effect gate (db `effects`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EffectRecord {
    /// The provider may have been called `attempts` times; no result is recorded yet.
    Started { attempts: u32, updated_at: u64 },
    /// The result event was published and acknowledged; `result` is its exact body, so a
    /// redelivered command re-publishes the same bytes under the same `Nats-Msg-Id`. (Text,
    /// not nested JSON: internally tagged enums cannot hold raw JSON values.)
    Completed { attempts: u32, updated_at: u64, subject: String, outcome: String, result: String },
}

/// Why something became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// The program failed on this event past its attempts.
    Poison,
    /// An event of a parked key, held behind the poison one.
    Parked,
    /// The message could not be decoded.
    Undecodable,
    /// An outbox item whose dispatch failed past its limit.
    Dispatch,
}

/// One dead letter (db `deadletter`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub kind: DeadLetterKind,
    pub partition: u32,
    pub tenant: String,
    pub at: u64,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(default)]
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The message body as received, when it was not decodable JSON (lossy UTF-8, bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// The decoded event (what the program saw), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Json>,
    /// The outbox item, for a dispatch dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<OutboxItem>,
    #[serde(default)]
    pub attempts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: WorkKind) -> OutboxItem {
        OutboxItem {
            work_id: "w-1".into(),
            kind,
            tenant: "t".into(),
            saga: "order".into(),
            correlation_id: "o-1".into(),
            traceparent: Some("00-abc-def-01".into()),
            source_event_id: "ev-1".into(),
            payload: serde_json::value::to_raw_value(&serde_json::json!({"amount": 12, "sku": "a\"b"})).unwrap(),
            created_at: 5,
            attempts: 2,
            next_attempt_at: 9,
            last_error: Some("timeout".into()),
            suppressed: true,
        }
    }

    #[test]
    fn outbox_items_read_back_what_was_written_with_the_kind_at_the_top_level() {
        for kind in [
            WorkKind::Effect { effect: "charge_payment".into() },
            WorkKind::Command { command: "Reserve".into(), aggregate: "inventory".into(), aggregate_id: "a".into() },
        ] {
            let written = serde_json::to_string(&item(kind.clone())).unwrap();
            let top: serde_json::Value = serde_json::from_str(&written).unwrap();
            assert!(top.get("kind").is_some_and(|k| k.is_string()), "{written}");
            let back: OutboxItem = serde_json::from_str(&written).unwrap();
            assert_eq!(back.kind, kind);
            assert_eq!(serde_json::to_string(&back).unwrap(), written);
        }
        // Records written before optional fields existed still read; a kind without its
        // fields names the item and the field.
        let old = r#"{"work_id":"w","kind":"effect","effect":"e","tenant":"t","saga":"s","correlation_id":"c","source_event_id":"ev","payload":null,"created_at":1}"#;
        let back: OutboxItem = serde_json::from_str(old).unwrap();
        assert_eq!((back.attempts, back.suppressed, back.traceparent), (0, false, None));
        let bad = r#"{"work_id":"w","kind":"command","command":"C","tenant":"t","saga":"s","correlation_id":"c","source_event_id":"ev","payload":null,"created_at":1}"#;
        let err = serde_json::from_str::<OutboxItem>(bad).unwrap_err().to_string();
        assert!(err.contains("outbox item w: missing field `aggregate`"), "{err}");
    }
}
