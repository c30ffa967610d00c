//! The core on a temp-dir store with a manual clock: apply events, assert the actions the
//! core returns and the stored state. No NATS, no executor.

use super::*;
use crate::ids;
use crate::keys::{DeadLetterKey, OutboxKey};
use crate::manifest::ManifestSet;
use crate::message::{
    AdminAnswer, AdminError, ApplyOutcome, Control, DispatchResult, GateDecision, Query, RawLetter, Request,
    ResultInfo, reply_channel,
};
use crate::record::{DeadLetterKind, InstanceStatus, WorkKind};
use crate::relay::{RelayConfig, RelayState};
use crate::shell::Shell;
use crate::store::{Durability, StoreConfig};
use std::path::{Path, PathBuf};

const SAGA: &str = "order_fulfillment";
const T0: u64 = 1_700_000_000_000;

pub(crate) fn example_manifests(extra_dir: &Path) -> Arc<ManifestSet> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/order");
    let effects = extra_dir.join("effects.yaml");
    std::fs::write(
        &effects,
        "effects:\n  - { name: charge_payment, provider: noop }\n  - { name: ship_order, provider: noop }\n  - { name: refund_payment, provider: noop }\n",
    )
    .unwrap();
    Arc::new(ManifestSet::load(&[root.join("sagas.yaml"), effects], &crate::program::check_program).unwrap())
}

/// A manifest with one saga running `program` (triggers: `events.>` starting on `data.id`).
pub(crate) fn custom_manifests(dir: &Path, program: &str, policy: &str, attempts: u32) -> Arc<ManifestSet> {
    std::fs::write(dir.join("p.rhai"), program).unwrap();
    let m = dir.join("m.yaml");
    std::fs::write(
        &m,
        format!(
            "sagas:\n  - name: s\n    program: p.rhai\n    gas: 20000\n    on_poison: {policy}\n    retry: {{ attempts: {attempts}, backoff_ms: 100, max_backoff_ms: 100, jitter: 0 }}\n    triggers:\n      - {{ subject: \"events.>\", correlation: data.id, may_start: true }}\neffects:\n  - {{ name: e, provider: noop }}\n"
        ),
    )
    .unwrap();
    Arc::new(ManifestSet::load(&[m], &crate::program::check_program).unwrap())
}

/// A shard on a temp-dir store with a manual clock, driven through the shell's
/// [`Shell::step`] (the production commit protocol). Each step returns the actions the core
/// decided.
pub(crate) struct TestEnv {
    pub dir: tempfile::TempDir,
    pub shell: Option<Shell>,
    pub now: u64,
    manifests: Arc<ManifestSet>,
    seq: u64,
    /// The core's settings (the shard is opened with them).
    pub cfg: CoreConfig,
}

impl TestEnv {
    pub fn new(manifests: impl FnOnce(&Path) -> Arc<ManifestSet>) -> Self {
        let cfg = CoreConfig { retention_ms: Some(60_000), dispatch_attempts: Some(3), ..CoreConfig::default() };
        Self::with_config(manifests, cfg)
    }

    /// [`Self::new`] with the core's settings given.
    pub fn with_config(manifests: impl FnOnce(&Path) -> Arc<ManifestSet>, cfg: CoreConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manifests = manifests(dir.path());
        let mut env = Self { dir, shell: None, now: T0, manifests, seq: 0, cfg };
        env.open();
        env
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("shard-0")
    }

    fn open(&mut self) {
        let store = Store::open(
            &self.store_path(),
            0,
            64,
            &StoreConfig { durability: Durability::NoSync, ..StoreConfig::default() },
        )
        .unwrap();
        let core = ShardCore::new(0, Router::new(64, 1), self.cfg.clone(), store, self.manifests.clone()).unwrap();
        self.shell = Some(Shell::new(core, RelayState::new(RelayConfig::default())));
    }

    /// Drops the shard (as a crash after the last commit would) and opens it again.
    pub fn restart(&mut self) {
        self.shell = None;
        self.open();
    }

    pub fn shell(&mut self) -> &mut Shell {
        self.shell.as_mut().unwrap()
    }

    pub fn core(&mut self) -> &ShardCore {
        self.shell().core()
    }

    pub fn reload(&mut self, set: Arc<ManifestSet>) {
        self.manifests = set.clone();
        let (tx, mut rx) = reply_channel();
        self.shell().take(Request::Reload { set, reply: tx });
        self.shell().run_reloads();
        rx.try_recv().unwrap().unwrap().unwrap();
    }

    /// Takes the requests in and runs one step; the actions it carried out, or why the
    /// commit failed (the work then stays for the next step).
    pub fn run(&mut self, reqs: Vec<Request>) -> Result<Vec<Action>, crate::shell::StepError> {
        let now = self.now;
        let shell = self.shell();
        for r in reqs {
            shell.take(r);
        }
        let mut seen = Vec::new();
        shell.step_observed(now, &mut |a| seen.push(a.clone()))?;
        Ok(seen)
    }

    pub fn tick(&mut self) -> Vec<Action> {
        self.run(vec![]).unwrap()
    }

    pub fn event(&mut self, subject_kind: &str, ty: &str, data: serde_json::Value) -> Arc<Event> {
        self.seq += 1;
        Arc::new(Event {
            id: format!("ev-{}", self.seq),
            event_type: ty.into(),
            stream: "AGGREGATE_EVENTS".into(),
            seq: self.seq,
            subject: format!("events.acme.{subject_kind}.{ty}"),
            tenant: "acme".into(),
            timestamp: self.now,
            data,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            result: None,
            headers: Default::default(),
        })
    }

    pub fn result_event(
        &mut self,
        command_id: &str,
        effect: &str,
        outcome: &str,
        data: serde_json::Value,
    ) -> Arc<Event> {
        self.seq += 1;
        Arc::new(Event {
            id: format!("result:{command_id}"),
            event_type: format!("{effect}.{outcome}"),
            stream: "WORKFLOW_EVENTS".into(),
            seq: self.seq,
            subject: format!("workflow.events.acme.{effect}.{outcome}"),
            tenant: "acme".into(),
            timestamp: self.now,
            data,
            traceparent: None,
            result: Some(ResultInfo { command_id: command_id.into(), effect: effect.into(), outcome: outcome.into() }),
            headers: Default::default(),
        })
    }

    /// Applies one event to `(saga, cid)` in one step; the step's actions.
    pub fn apply(&mut self, event: Arc<Event>, saga: &str, cid: &str, may_start: bool) -> Vec<Action> {
        let (tx, _rx) = reply_channel();
        let target = Target { saga: saga.into(), correlation_id: cid.into(), may_start };
        self.run(vec![Request::Apply { event, targets: vec![target], reply: tx }]).unwrap()
    }

    /// Files an undecodable message as a dead letter in one step; fails unless it was filed.
    pub fn quarantine(&mut self, letter: RawLetter) {
        let (tx, mut rx) = reply_channel();
        self.run(vec![Request::Quarantine { letter, reply: tx }]).unwrap();
        assert_eq!(rx.try_recv().unwrap(), Some(()), "the letter was not filed");
    }

    /// One admin action in one step; its answer.
    pub fn admin(&mut self, op: AdminOp) -> Result<AdminAnswer, AdminError> {
        let (tx, mut rx) = reply_channel();
        self.run(vec![Request::Admin { op, reply: tx }]).unwrap();
        rx.try_recv().unwrap().unwrap()
    }

    pub fn record(&mut self, saga: &str, cid: &str) -> Option<crate::record::SagaRecord> {
        self.core().store().read().unwrap().saga(&SagaKey::new("acme", saga, cid)).unwrap()
    }

    pub fn state(&mut self, saga: &str, cid: &str) -> serde_json::Value {
        serde_json::from_str(self.record(saga, cid).unwrap().state.get()).unwrap()
    }

    pub fn outbox(&mut self) -> Vec<(OutboxKey, crate::record::OutboxItem)> {
        self.core().store().read().unwrap().outbox(None, 10_000).unwrap()
    }

    pub fn timers(&mut self, cid: &str) -> Vec<crate::keys::ScheduleKey> {
        let key = SagaKey::new("acme", SAGA, cid);
        self.core().store().read().unwrap().schedules_of(&key).unwrap().into_iter().map(|(k, _)| k).collect()
    }

    /// Hands whatever the relay has ready to a bridge that answers `outcome` for each, and
    /// runs the step that takes the answers in.
    pub fn dispatch(&mut self, outcome: DispatchOutcome) -> Vec<Action> {
        let now = self.now;
        let ready = self.shell().relay_mut().take_ready(now);
        let results = ready
            .dispatch
            .into_iter()
            .map(|d| (d.key, d.send))
            .chain(ready.suppressed)
            .map(|(key, send)| DispatchResult { key, send, outcome: outcome.clone() })
            .collect();
        assert!(!self.shell().take_control(Control::Dispatched(results)));
        self.tick()
    }

    pub fn confirm_all(&mut self) -> Vec<Action> {
        self.dispatch(DispatchOutcome::Delivered)
    }

    pub fn deadletters(&mut self) -> Vec<crate::record::DeadLetter> {
        self.core()
            .store()
            .read()
            .unwrap()
            .deadletters("acme", None, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, l)| l)
            .collect()
    }
}

/// The settlements in `actions`: `None` for an ack, `Some(reason)` for a `TERM`.
fn settles(actions: &[Action]) -> Vec<Option<String>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Settle { term, .. } => Some(term.clone()),
            _ => None,
        })
        .collect()
}

/// The outbox items `actions` offer to the relay.
fn offers(actions: &[Action]) -> Vec<crate::record::OutboxItem> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Offer { item, .. } => Some(item.clone()),
            _ => None,
        })
        .collect()
}

const ACK: [Option<String>; 1] = [None];

fn order_placed(env: &mut TestEnv, cid: &str) -> Arc<Event> {
    env.event(
        "order",
        "OrderPlaced",
        serde_json::json!({"order_id": cid, "sku": "sku-1", "qty": 2, "amount": 40, "customer": "c-1"}),
    )
}

/// Drives an order to the charging step; returns the charge command id.
fn to_charging(env: &mut TestEnv, cid: &str) -> String {
    let e = order_placed(env, cid);
    assert_eq!(settles(&env.apply(e, SAGA, cid, true)), ACK);
    env.confirm_all();
    let e = env.event("inventory", "InventoryReserved", serde_json::json!({"order_id": cid}));
    let reserved_id = e.id.clone();
    assert_eq!(settles(&env.apply(e, SAGA, cid, false)), ACK);
    ids::work_id("acme", SAGA, cid, &reserved_id, 0)
}

#[test]
fn run_batch_decides_without_changing_anything_and_decides_the_same_twice() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-0");
    let work = vec![Work::Apply(Pending {
        event: placed.clone(),
        target: Target { saga: SAGA.into(), correlation_id: "o-0".into(), may_start: true },
        origin: Origin::Delivery(RequestId(7)),
    })];
    let now = env.now;
    let core = env.core();
    let first = core.run_batch(&work, now).unwrap();
    // The decision, as data: one outbox item offered to the relay, then the message acked.
    match &first.actions[..] {
        [Action::Offer { item, .. }, Action::Settle { request: RequestId(7), term: None }] => {
            assert_eq!(item.work_id, ids::work_id("acme", SAGA, "o-0", &placed.id, 0));
        }
        other => panic!("unexpected actions {other:?}"),
    }
    assert_eq!(first.stats.applied, 1);
    assert_eq!(first.stats.outbox_written, 1);
    // Nothing was written or changed: the same work decides the same again.
    let second = core.run_batch(&work, now).unwrap();
    assert_eq!(format!("{:?}", first.actions), format!("{:?}", second.actions));
    assert_eq!(first.batch.len(), second.batch.len());
    drop((first, second));
    assert!(env.record(SAGA, "o-0").is_none(), "a staged batch that was dropped left a trace");
    assert!(env.outbox().is_empty());
}

#[test]
fn a_batch_that_borrows_a_cached_instance_and_is_dropped_decides_the_same_again() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-1");
    assert_eq!(settles(&env.apply(placed, SAGA, "o-1", true)), ACK);
    env.confirm_all();
    // o-1 is committed and cached; the next batch takes it out of the cache to change it.
    let reserved = env.event("inventory", "InventoryReserved", serde_json::json!({"order_id": "o-1"}));
    let work = vec![Work::Apply(Pending {
        event: reserved,
        target: Target { saga: SAGA.into(), correlation_id: "o-1".into(), may_start: false },
        origin: Origin::Delivery(RequestId(9)),
    })];
    let now = env.now;
    let first = env.core().run_batch(&work, now).unwrap();
    assert_eq!(first.stats.applied, 1);
    drop(first);
    // Never adopted: the instance is read from the store again, unchanged, and the same
    // work decides the same (one transition from version 1, one outbox item).
    let second = env.core().run_batch(&work, now).unwrap();
    assert_eq!(second.stats.applied, 1);
    assert_eq!(second.stats.outbox_written, 1);
    assert_eq!(env.record(SAGA, "o-1").unwrap().version, 1, "a dropped batch changed the store");
    let third = env.core().run_batch(&work, now).unwrap();
    assert_eq!(format!("{:?}", second.actions), format!("{:?}", third.actions));
}

#[test]
fn happy_path_emits_exact_work_items_and_completes() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-1");
    let placed_id = placed.id.clone();
    let actions = env.apply(placed, SAGA, "o-1", true);
    assert_eq!(settles(&actions), ACK);
    let offered = offers(&actions);
    assert_eq!(offered.len(), 1);
    assert_eq!(offered[0].work_id, ids::work_id("acme", SAGA, "o-1", &placed_id, 0));
    let outbox = env.outbox();
    assert_eq!(outbox.len(), 1);
    let item = &outbox[0].1;
    assert_eq!(item.work_id, ids::work_id("acme", SAGA, "o-1", &placed_id, 0));
    assert_eq!(
        item.kind,
        WorkKind::Command { command: "Reserve".into(), aggregate: "inventory".into(), aggregate_id: "sku-1".into() }
    );
    assert_eq!(item.payload.get(), r#"{"order_id":"o-1","qty":2,"sku":"sku-1"}"#);
    assert_eq!(item.traceparent.as_deref(), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    assert_eq!(env.state(SAGA, "o-1")["step"], "reserving");
    let actions = env.confirm_all();
    assert!(matches!(actions[..], [Action::Delivered { key }] if key == outbox[0].0));
    assert!(env.outbox().is_empty(), "confirmed item was not deleted");

    let e = env.event("inventory", "InventoryReserved", serde_json::json!({"order_id": "o-1"}));
    let reserved_id = e.id.clone();
    let reserved_at = e.timestamp;
    env.apply(e, SAGA, "o-1", false);
    let outbox = env.outbox();
    let charge_id = ids::work_id("acme", SAGA, "o-1", &reserved_id, 0);
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].1.work_id, charge_id);
    assert_eq!(outbox[0].1.kind, WorkKind::Effect { effect: "charge_payment".into() });
    assert_eq!(outbox[0].1.payload.get(), r#"{"amount":40,"customer":"c-1","order_id":"o-1"}"#);
    let timers = env.timers("o-1");
    assert_eq!(timers.len(), 1);
    assert_eq!(timers[0].due_at, reserved_at + 30_000);
    assert_eq!(timers[0].timer_id, ids::timer_id("acme", SAGA, "o-1", &reserved_id, 0));
    let rec = env.record(SAGA, "o-1").unwrap();
    assert!(rec.outstanding.contains(&charge_id));
    assert_eq!(rec.timers.unwrap().get(&timers[0].timer_id), Some(&timers[0].due_at), "the instance lists its timer");
    env.confirm_all();

    let r = env.result_event(&charge_id, "charge_payment", "succeeded", serde_json::json!({"payment_id": "p-9"}));
    let r_id = r.id.clone();
    assert_eq!(settles(&env.apply(r, SAGA, "o-1", false)), ACK);
    let ship_id = ids::work_id("acme", SAGA, "o-1", &r_id, 0);
    let outbox = env.outbox();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].1.kind, WorkKind::Effect { effect: "ship_order".into() });
    assert_eq!(outbox[0].1.work_id, ship_id);
    env.confirm_all();
    // The timeout fires later and is ignored (the step moved on).
    let r = env.result_event(&ship_id, "ship_order", "succeeded", serde_json::json!({}));
    env.apply(r, SAGA, "o-1", false);
    let rec = env.record(SAGA, "o-1").unwrap();
    assert_eq!(rec.status, InstanceStatus::Completed);
    assert_eq!(rec.version, 4);
    assert!(rec.outstanding.is_empty());
    assert_eq!(rec.last_seq["AGGREGATE_EVENTS"], 2);
    assert_eq!(rec.last_seq["WORKFLOW_EVENTS"], 4);
    assert_eq!(env.state(SAGA, "o-1")["step"], "shipped");
    assert!(env.outbox().is_empty());
    // The payment timer of a completed saga is dropped, not applied.
    env.now = reserved_at + 30_000;
    let actions = env.tick();
    assert!(actions.is_empty(), "a dropped timer decides nothing to carry out: {actions:?}");
    assert!(env.timers("o-1").is_empty());
    assert_eq!(env.record(SAGA, "o-1").unwrap().version, 4);
}

#[test]
fn payment_failure_compensates_by_releasing_inventory() {
    let mut env = TestEnv::new(example_manifests);
    let charge = to_charging(&mut env, "o-2");
    env.confirm_all();
    let r = env.result_event(&charge, "charge_payment", "failed", serde_json::json!({"reason": "card declined"}));
    let rid = r.id.clone();
    let actions = env.apply(r, SAGA, "o-2", false);
    let offered = offers(&actions);
    assert_eq!(offered.len(), 1);
    assert_eq!(offered[0].work_id, ids::work_id("acme", SAGA, "o-2", &rid, 0));
    assert_eq!(
        offered[0].kind,
        WorkKind::Command { command: "Release".into(), aggregate: "inventory".into(), aggregate_id: "sku-1".into() }
    );
    let rec = env.record(SAGA, "o-2").unwrap();
    assert_eq!(rec.status, InstanceStatus::Failed);
    let state = env.state(SAGA, "o-2");
    assert_eq!(state["step"], "payment_failed");
    assert_eq!(state["payment_error"], "card declined");
    assert_eq!(env.outbox().len(), 1);
}

#[test]
fn shipping_failure_releases_and_refunds() {
    let mut env = TestEnv::new(example_manifests);
    let charge = to_charging(&mut env, "o-3");
    env.confirm_all();
    let r = env.result_event(&charge, "charge_payment", "succeeded", serde_json::json!({"payment_id": "p"}));
    let ship = ids::work_id("acme", SAGA, "o-3", &r.id, 0);
    env.apply(r, SAGA, "o-3", false);
    env.confirm_all();
    let r = env.result_event(&ship, "ship_order", "failed", serde_json::json!({"reason": "no carrier"}));
    let rid = r.id.clone();
    env.apply(r, SAGA, "o-3", false);
    assert_eq!(env.record(SAGA, "o-3").unwrap().status, InstanceStatus::Failed);
    assert_eq!(env.state(SAGA, "o-3")["step"], "shipping_failed");
    let kinds: Vec<_> = env.outbox().into_iter().map(|(_, i)| (i.kind, i.work_id)).collect();
    assert_eq!(
        kinds,
        vec![
            (
                WorkKind::Command {
                    command: "Release".into(),
                    aggregate: "inventory".into(),
                    aggregate_id: "sku-1".into()
                },
                ids::work_id("acme", SAGA, "o-3", &rid, 0)
            ),
            (WorkKind::Effect { effect: "refund_payment".into() }, ids::work_id("acme", SAGA, "o-3", &rid, 1)),
        ]
    );
}

#[test]
fn payment_timeout_compensates_and_a_late_result_changes_nothing() {
    let mut env = TestEnv::new(example_manifests);
    let charge = to_charging(&mut env, "o-4");
    env.confirm_all();
    let due = env.timers("o-4")[0].clone();
    env.now = due.due_at - 1;
    assert!(env.tick().is_empty(), "fired early");
    assert_eq!(env.state(SAGA, "o-4")["step"], "charging");
    env.now = due.due_at;
    let actions = env.tick();
    let offered: Vec<_> = offers(&actions).into_iter().map(|i| (i.kind, i.work_id)).collect();
    assert_eq!(offered.len(), 2);
    assert_eq!(offered[0].1, ids::work_id("acme", SAGA, "o-4", &due.timer_id, 0));
    assert_eq!(offered[1].0, WorkKind::Effect { effect: "refund_payment".into() });
    assert!(settles(&actions).is_empty(), "a timer is not a message: nothing to settle");
    assert_eq!(env.state(SAGA, "o-4")["step"], "payment_timed_out");
    assert_eq!(env.record(SAGA, "o-4").unwrap().status, InstanceStatus::Failed);
    assert!(env.timers("o-4").is_empty(), "timer entry left behind");
    assert_eq!(env.outbox().len(), 2);
    let version = env.record(SAGA, "o-4").unwrap().version;
    let late = env.result_event(&charge, "charge_payment", "succeeded", serde_json::json!({}));
    assert_eq!(settles(&env.apply(late, SAGA, "o-4", false)), ACK);
    assert_eq!(env.record(SAGA, "o-4").unwrap().version, version);
}

#[test]
fn redelivered_and_replayed_events_change_nothing() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-5");
    env.apply(placed.clone(), SAGA, "o-5", true);
    let before = env.record(SAGA, "o-5").unwrap();
    let outbox_before = env.outbox().len();
    for _ in 0..3 {
        let actions = env.apply(placed.clone(), SAGA, "o-5", true);
        assert!(matches!(actions[..], [Action::Settle { term: None, .. }]), "{actions:?}");
    }
    // The same event twice within one batch, too.
    let (tx1, mut rx1) = reply_channel();
    let (tx2, mut rx2) = reply_channel();
    let t = Target { saga: SAGA.into(), correlation_id: "o-5".into(), may_start: true };
    env.run(vec![
        Request::Apply { event: placed.clone(), targets: vec![t.clone()], reply: tx1 },
        Request::Apply { event: placed, targets: vec![t], reply: tx2 },
    ])
    .unwrap();
    assert_eq!(rx1.try_recv().unwrap(), Some(ApplyOutcome::Ack));
    assert_eq!(rx2.try_recv().unwrap(), Some(ApplyOutcome::Ack));
    let after = env.record(SAGA, "o-5").unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(after.state.get(), before.state.get());
    assert_eq!(env.outbox().len(), outbox_before);
    // A result for a command that is not outstanding is skipped.
    let stray = env.result_event("not-a-command", "charge_payment", "succeeded", serde_json::json!({}));
    assert_eq!(settles(&env.apply(stray, SAGA, "o-5", false)), ACK);
    assert_eq!(env.record(SAGA, "o-5").unwrap().version, before.version);
    // An event that may not start an instance does not create one.
    let e = env.event("inventory", "InventoryReserved", serde_json::json!({"order_id": "nobody"}));
    assert_eq!(settles(&env.apply(e, SAGA, "nobody", false)), ACK);
    assert!(env.record(SAGA, "nobody").is_none());
}

#[test]
fn a_failed_commit_leaves_no_trace_answers_nothing_and_runs_again() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-6");
    let (tx, mut rx) = reply_channel();
    let t = Target { saga: SAGA.into(), correlation_id: "o-6".into(), may_start: true };
    env.core().store().inject_commit_failure_after(1);
    assert!(env.run(vec![Request::Apply { event: placed, targets: vec![t], reply: tx }]).is_err());
    assert_eq!(rx.try_recv().unwrap(), None, "answered although the commit failed");
    assert!(env.record(SAGA, "o-6").is_none());
    assert!(env.outbox().is_empty());
    assert_eq!(env.shell().relay().depth(), 0);
    assert!(env.shell().has_work(), "the failed batch's work was not kept");
    // The next step (no new input) runs the same work again and answers.
    let actions = env.tick();
    assert_eq!(settles(&actions), ACK);
    assert_eq!(rx.try_recv().unwrap(), Some(ApplyOutcome::Ack));
    assert_eq!(env.record(SAGA, "o-6").unwrap().version, 1);
    assert_eq!(env.outbox().len(), 1);
    assert_eq!(env.shell().relay().depth(), 1);
}

const BOMB: &str = r#"
fn on_event(state, event) {
    if event.data.bomb == true { loop { } }
    if event.data.poison == true { throw "poison event"; }
    let s = if state == () { #{ seen: [] } } else { state };
    s.seen.push(event.data.n);
    #{ state: s }
}
"#;

fn ev(env: &mut TestEnv, id: &str, extra: serde_json::Value) -> Arc<Event> {
    let mut data = serde_json::json!({ "id": id });
    if let (Some(m), serde_json::Value::Object(x)) = (data.as_object_mut(), extra) {
        m.extend(x);
    }
    env.event("thing", "Happened", data)
}

#[test]
fn a_gas_bomb_is_quarantined_after_its_retries_and_a_neighbour_commits() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 3));
    let bomb = ev(&mut env, "k-bad", serde_json::json!({"bomb": true, "n": 1}));
    let good = ev(&mut env, "k-good", serde_json::json!({"n": 1}));
    let t = |c: &str| Target { saga: "s".into(), correlation_id: c.into(), may_start: true };
    let (tx1, mut rx1) = reply_channel();
    let (tx2, mut rx2) = reply_channel();
    let actions = env
        .run(vec![
            Request::Apply { event: bomb, targets: vec![t("k-bad")], reply: tx1 },
            Request::Apply { event: good, targets: vec![t("k-good")], reply: tx2 },
        ])
        .unwrap();
    assert_eq!(settles(&actions), ACK, "only the neighbour settles while the bomb retries");
    assert_eq!(rx2.try_recv().unwrap(), Some(ApplyOutcome::Ack), "the neighbour waited for the bomb");
    assert_eq!(env.state("s", "k-good")["seen"], serde_json::json!([1]));
    assert_eq!(rx1.try_recv().unwrap(), None, "bomb answered before its retries");
    assert_eq!(env.core().blocked_keys(), 1);
    // Retries in place: 3 attempts in all, 100 ms apart.
    env.now += 100;
    assert!(settles(&env.tick()).is_empty());
    env.now += 100;
    let last = settles(&env.tick());
    assert!(matches!(&last[..], [Some(reason)] if reason.contains("ran out of gas")), "{last:?}");
    match rx1.try_recv().unwrap() {
        Some(ApplyOutcome::Term { reason }) => assert!(reason.contains("ran out of gas"), "{reason}"),
        other => panic!("expected TERM, got {other:?}"),
    }
    assert_eq!(env.core().blocked_keys(), 0);
    let letters = env.deadletters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].kind, DeadLetterKind::Poison);
    assert_eq!(letters[0].attempts, 3);
    assert!(letters[0].error.contains("20000 operations"));
    assert!(letters[0].event.as_ref().unwrap().get().contains("\"bomb\":true"));
}

#[test]
fn a_poisoned_key_blocks_only_itself_parks_in_order_and_requeues_after_a_fix() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 2));
    let t = |c: &str| Target { saga: "s".into(), correlation_id: c.into(), may_start: true };
    let mut rxs = Vec::new();
    let mut reqs = Vec::new();
    // key A: 1 ok, 2 poison, 3 ok, 4 ok ; key B: 1..4 ok, interleaved
    for n in 1..=4 {
        let poison = n == 2;
        let a = ev(&mut env, "A", serde_json::json!({"n": n, "poison": poison}));
        let b = ev(&mut env, "B", serde_json::json!({"n": n}));
        for (e, k) in [(a, "A"), (b, "B")] {
            let (tx, rx) = reply_channel();
            reqs.push(Request::Apply { event: e, targets: vec![t(k)], reply: tx });
            rxs.push((k, n, rx));
        }
    }
    env.run(reqs).unwrap();
    assert_eq!(env.state("s", "B")["seen"], serde_json::json!([1, 2, 3, 4]));
    assert_eq!(env.state("s", "A")["seen"], serde_json::json!([1]), "A applied out of order");
    env.now += 100;
    env.tick(); // second attempt fails: quarantined, A parked, 3 and 4 parked behind it
    let mut answers = Vec::new();
    for (k, n, mut rx) in rxs {
        answers.push((k, n, rx.try_recv().unwrap()));
    }
    assert!(answers.iter().all(|(_, _, a)| a.is_some()), "{answers:?}");
    assert!(matches!(answers[2].2, Some(ApplyOutcome::Term { .. })), "{answers:?}");
    let letters = env.deadletters();
    let kinds: Vec<_> = letters.iter().map(|l| (l.kind, l.seq)).collect();
    assert_eq!(kinds, [(DeadLetterKind::Poison, 3), (DeadLetterKind::Parked, 5), (DeadLetterKind::Parked, 7)]);
    assert!(env.record("s", "A").unwrap().parked.is_some());
    // A later event for A parks too, in order.
    let a5 = ev(&mut env, "A", serde_json::json!({"n": 5}));
    assert_eq!(settles(&env.apply(a5, "s", "A", true)), ACK);
    assert_eq!(env.deadletters().len(), 4);
    assert_eq!(env.state("s", "A")["seen"], serde_json::json!([1]));

    // Fix the program, reload, requeue: A's events apply in order, dead letters are gone.
    let fixed = BOMB.replace("throw \"poison event\";", "");
    let set = custom_manifests(env.dir.path(), &fixed, "park", 2);
    env.reload(set);
    let key = SagaKey::new("acme", "s", "A");
    let answer = env.admin(AdminOp::Requeue { key: key.clone(), skip_poison: false });
    assert_eq!(answer, Ok(AdminAnswer::Requeued { requeued: 4, skipped: None }));
    assert_eq!(env.state("s", "A")["seen"], serde_json::json!([1, 2, 3, 4, 5]));
    assert!(env.record("s", "A").unwrap().parked.is_none());
    assert!(env.deadletters().is_empty());
    // Requeued events passed the gate exactly once: requeue again finds nothing.
    assert_eq!(
        env.admin(AdminOp::Requeue { key: key.clone(), skip_poison: false }),
        Err(AdminError::NothingToRequeue { key })
    );
}

/// Key `K`: ticks 0..=7 in stream order, 4 poisoned (attempts 1): 0..=3 applied, 4 the poison
/// letter, 5..=7 parked. Returns the events.
fn parked_key(env: &mut TestEnv) -> Vec<Arc<Event>> {
    let events: Vec<Arc<Event>> = (0..8).map(|n| ev(env, "K", serde_json::json!({"n": n, "poison": n == 4}))).collect();
    for e in &events {
        env.apply(e.clone(), "s", "K", true);
    }
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(env.deadletters().len(), 4, "1 poison + 3 parked");
    events
}

#[test]
fn a_redelivered_event_of_a_parked_key_is_a_duplicate_not_a_second_letter() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 1));
    let events = parked_key(&mut env);
    // Consumers restart at their ack floor: every event comes again, after a restart too.
    for e in &events {
        env.apply(e.clone(), "s", "K", true);
    }
    env.restart();
    for e in &events {
        env.apply(e.clone(), "s", "K", true);
    }
    assert_eq!(env.deadletters().len(), 4, "redeliveries became dead letters");
    // The fix, then requeue: each event applied once, in stream order.
    env.reload(custom_manifests(env.dir.path(), &BOMB.replace("throw \"poison event\";", ""), "park", 1));
    let key = SagaKey::new("acme", "s", "K");
    let answer = env.admin(AdminOp::Requeue { key, skip_poison: false });
    assert_eq!(answer, Ok(AdminAnswer::Requeued { requeued: 4, skipped: None }));
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7]));
    assert!(env.deadletters().is_empty());
    // And again later: still duplicates.
    for e in &events {
        env.apply(e.clone(), "s", "K", true);
    }
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7]));
}

#[test]
fn skipping_the_poison_never_applies_it_even_when_it_comes_again() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 1));
    let events = parked_key(&mut env);
    env.apply(events[4].clone(), "s", "K", true);
    env.reload(custom_manifests(env.dir.path(), &BOMB.replace("throw \"poison event\";", ""), "park", 1));
    let key = SagaKey::new("acme", "s", "K");
    let answer = env.admin(AdminOp::Requeue { key, skip_poison: true });
    assert!(matches!(answer, Ok(AdminAnswer::Requeued { requeued: 3, skipped: Some(_) })), "{answer:?}");
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([0, 1, 2, 3, 5, 6, 7]));
    for e in &events {
        env.apply(e.clone(), "s", "K", true);
    }
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([0, 1, 2, 3, 5, 6, 7]), "the poison applied after all");
    assert!(env.deadletters().is_empty());
}

#[test]
fn a_letter_parked_in_the_batch_of_its_requeue_is_requeued_with_the_rest() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 1));
    parked_key(&mut env);
    env.reload(custom_manifests(env.dir.path(), &BOMB.replace("throw \"poison event\";", ""), "park", 1));
    // Event 8 parks and the requeue runs in the same batch.
    let late = ev(&mut env, "K", serde_json::json!({"n": 8}));
    let (tx, _rx) = reply_channel();
    let (atx, mut arx) = reply_channel();
    let target = Target { saga: "s".into(), correlation_id: "K".into(), may_start: true };
    env.run(vec![
        Request::Apply { event: late, targets: vec![target], reply: tx },
        Request::Admin { op: AdminOp::Requeue { key: SagaKey::new("acme", "s", "K"), skip_poison: false }, reply: atx },
    ])
    .unwrap();
    assert_eq!(arx.try_recv().unwrap().unwrap(), Ok(AdminAnswer::Requeued { requeued: 5, skipped: None }));
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7, 8]));
    assert!(env.deadletters().is_empty(), "a letter stranded: {:?}", env.deadletters());
}

#[test]
fn skip_policy_moves_the_key_past_the_poison_event() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "skip", 1));
    let e1 = ev(&mut env, "A", serde_json::json!({"n": 1, "poison": true}));
    let e2 = ev(&mut env, "A", serde_json::json!({"n": 2}));
    let terms = settles(&env.apply(e1, "s", "A", true));
    assert!(matches!(&terms[..], [Some(reason)] if reason.contains("poison event")), "{terms:?}");
    assert_eq!(settles(&env.apply(e2, "s", "A", true)), ACK);
    assert_eq!(env.state("s", "A")["seen"], serde_json::json!([2]));
}

#[test]
fn timers_survive_a_restart_and_fire_exactly_once() {
    let mut env = TestEnv::new(example_manifests);
    to_charging(&mut env, "o-7");
    let due = env.timers("o-7")[0].due_at;
    env.restart();
    env.now = due - 10;
    env.tick();
    assert_eq!(env.state(SAGA, "o-7")["step"], "charging");
    env.restart();
    // Due while "down": fires at the first batch after the restart.
    env.now = due + 5_000;
    env.tick();
    assert_eq!(env.state(SAGA, "o-7")["step"], "payment_timed_out");
    let version = env.record(SAGA, "o-7").unwrap().version;
    let outbox = env.outbox().len();
    env.restart();
    env.now += 60_000;
    env.tick();
    env.tick();
    assert_eq!(env.record(SAGA, "o-7").unwrap().version, version, "timer fired twice");
    assert_eq!(env.outbox().len(), outbox);
}

#[test]
fn a_failing_timer_commit_keeps_the_timer() {
    let mut env = TestEnv::new(example_manifests);
    to_charging(&mut env, "o-8");
    let due = env.timers("o-8")[0].due_at;
    env.now = due;
    env.core().store().inject_commit_failure_after(0);
    assert!(env.run(vec![]).is_err());
    assert_eq!(env.timers("o-8").len(), 1);
    env.restart();
    env.tick();
    assert_eq!(env.state(SAGA, "o-8")["step"], "payment_timed_out");
    assert!(env.timers("o-8").is_empty());
}

#[test]
fn the_effect_gate_runs_once_and_replays_the_recorded_result() {
    let mut env = TestEnv::new(example_manifests);
    let key = EffectKey::new("acme", "cmd-1");
    let gate = |env: &mut TestEnv, seq: u64| {
        let (tx, _rx) = reply_channel();
        let actions = env.run(vec![Request::EffectBegin { key: key.clone(), msg_seq: seq, reply: tx }]).unwrap();
        match &actions[..] {
            [Action::Gate { decision, .. }] => decision.clone(),
            other => panic!("expected one gate decision, got {other:?}"),
        }
    };
    assert_eq!(gate(&mut env, 10), GateDecision::Run { attempt: 1 });
    assert_eq!(gate(&mut env, 10), GateDecision::Busy { same_message: true });
    assert_eq!(gate(&mut env, 11), GateDecision::Busy { same_message: false });
    assert_eq!(env.core().effects_in_flight(), 1);
    // A crash while running: the next delivery runs attempt 2 (at least once).
    env.restart();
    assert_eq!(gate(&mut env, 10), GateDecision::Run { attempt: 2 });
    let (tx, mut rx) = reply_channel();
    let result = br#"{"command_id":"cmd-1","outcome":"succeeded"}"#.to_vec();
    env.run(vec![Request::EffectFinish {
        key: key.clone(),
        attempts: 2,
        subject: "workflow.events.acme.charge.succeeded".into(),
        outcome: "succeeded".into(),
        result: result.clone(),
        reply: tx,
    }])
    .unwrap();
    assert_eq!(rx.try_recv().unwrap(), Some(Ok(())));
    assert_eq!(env.core().effects_in_flight(), 0);
    for seq in [10, 12] {
        assert_eq!(
            gate(&mut env, seq),
            GateDecision::Completed {
                subject: "workflow.events.acme.charge.succeeded".into(),
                outcome: "succeeded".into(),
                result: result.clone()
            }
        );
    }
    env.restart();
    assert!(matches!(gate(&mut env, 13), GateDecision::Completed { .. }));
    let long = EffectKey::new("acme", "x".repeat(500));
    let (tx, mut rx) = reply_channel();
    env.run(vec![Request::EffectBegin { key: long, msg_seq: 1, reply: tx }]).unwrap();
    assert!(matches!(rx.try_recv().unwrap(), Some(GateDecision::Invalid { .. })));
    // A result that is not JSON is refused, naming the command.
    let (tx, mut rx) = reply_channel();
    let bad = EffectKey::new("acme", "cmd-2");
    env.run(vec![Request::EffectFinish {
        key: bad,
        attempts: 1,
        subject: "s".into(),
        outcome: "succeeded".into(),
        result: b"\xffnot json".to_vec(),
        reply: tx,
    }])
    .unwrap();
    assert_eq!(
        rx.try_recv().unwrap(),
        Some(Err(crate::message::FinishError::ResultNotJson { tenant: "acme".into(), command_id: "cmd-2".into() }))
    );
}

#[test]
fn dispatch_failures_retry_then_dead_letter_and_are_never_dropped() {
    let mut env = TestEnv::new(example_manifests);
    let e = order_placed(&mut env, "o-9");
    env.apply(e, SAGA, "o-9", true);
    let (key, _) = env.outbox()[0].clone();
    for attempt in 1..=3 {
        let actions = env.dispatch(DispatchOutcome::Retry { error: "503".into() });
        if attempt < 3 {
            let retried = match &actions[..] {
                [Action::RetryLater { key: k, item }] if *k == key => item.clone(),
                other => panic!("attempt {attempt}: expected a retry, got {other:?}"),
            };
            let item = env.outbox()[0].1.clone();
            assert_eq!(item.attempts, attempt);
            assert_eq!(retried.attempts, attempt);
            assert!(item.next_attempt_at > env.now);
            let now = env.now;
            assert!(env.shell().relay_mut().take_ready(now).dispatch.is_empty(), "retried before its backoff");
            env.now = item.next_attempt_at;
        } else {
            assert!(matches!(actions[..], [Action::Delivered { key: k }] if k == key), "{actions:?}");
        }
    }
    assert!(env.outbox().is_empty());
    let letters = env.deadletters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].kind, DeadLetterKind::Dispatch);
    assert!(letters[0].error.contains("503"));
    assert!(letters[0].work.is_some());
}

#[test]
fn dispatch_retries_without_a_limit_by_default_and_delivers_once() {
    let cfg = CoreConfig {
        retention_ms: Some(60_000),
        dispatch_retry: crate::manifest::RetrySpec {
            attempts: u32::MAX,
            backoff_ms: 1,
            max_backoff_ms: 10,
            jitter: 0.2,
        },
        ..CoreConfig::default()
    };
    assert_eq!(cfg.dispatch_attempts, None, "no attempt limit unless configured");
    let mut env = TestEnv::with_config(example_manifests, cfg);
    let e = order_placed(&mut env, "o-out");
    env.apply(e, SAGA, "o-out", true);
    let (key, _) = env.outbox()[0].clone();
    for attempt in 1..=200u32 {
        let actions = env.dispatch(DispatchOutcome::Retry { error: "503 gateway away".into() });
        assert!(
            matches!(&actions[..], [Action::RetryLater { key: k, item }] if *k == key && item.attempts == attempt),
            "attempt {attempt}: {actions:?}"
        );
        let item = env.outbox()[0].1.clone();
        assert!(item.next_attempt_at - env.now <= 12, "backoff above its 10 ms cap (+jitter)");
        env.now = item.next_attempt_at;
    }
    let stats = env.shell().core().stats().unwrap();
    assert_eq!(stats.outbox_window, 0, "the core's view; the shell adds the relay's figures");
    assert_eq!(env.shell().relay().retrying(), 1);
    assert_eq!(env.shell().relay().most_attempts(), 200);
    let actions = env.confirm_all();
    assert!(matches!(actions[..], [Action::Delivered { key: k }] if k == key), "{actions:?}");
    assert!(env.outbox().is_empty());
    assert!(env.deadletters().is_empty(), "nothing given up");
    env.now += 3_600_000;
    let now = env.now;
    assert!(env.shell().relay_mut().take_ready(now).dispatch.is_empty(), "delivered once, never again");
    assert_eq!(env.shell().relay().retrying(), 0);
}

#[test]
fn a_given_up_dispatch_can_be_resent_once_or_discarded() {
    let mut env = TestEnv::new(example_manifests);
    for cid in ["o-r1", "o-r2"] {
        let e = order_placed(&mut env, cid);
        env.apply(e, SAGA, cid, true);
    }
    let work: Vec<String> = env.outbox().iter().map(|(_, i)| i.work_id.clone()).collect();
    for _ in 0..3 {
        env.dispatch(DispatchOutcome::Retry { error: "503".into() });
        env.now += 60_000;
    }
    assert!(env.outbox().is_empty());
    let letters = env.deadletters();
    assert_eq!(letters.len(), 2, "both given up after 3 attempts (configured)");
    let dk = |l: &crate::record::DeadLetter| DeadLetterKey { tenant: l.tenant.clone(), at: l.at, id: l.id.clone() };
    // Re-send the first: back in the outbox as new, same work id, the letter gone.
    let answer = env.admin(AdminOp::Resend { key: dk(&letters[0]) });
    let Ok(AdminAnswer::Resent { work_id, .. }) = answer else { panic!("{answer:?}") };
    assert_eq!(work_id, letters[0].work.as_ref().unwrap().work_id);
    assert!(work.contains(&work_id));
    let outbox = env.outbox();
    assert_eq!(outbox.len(), 1);
    assert_eq!((outbox[0].1.work_id.as_str(), outbox[0].1.attempts), (work_id.as_str(), 0));
    assert_eq!(env.deadletters().len(), 1);
    // Re-sending it again finds nothing: one re-send per letter.
    let again = env.admin(AdminOp::Resend { key: dk(&letters[0]) });
    assert!(matches!(again, Err(AdminError::NoSuchLetter { .. })), "{again:?}");
    let actions = env.confirm_all();
    assert!(actions.iter().any(|a| matches!(a, Action::Delivered { .. })), "{actions:?}");
    assert!(env.outbox().is_empty());
    // The second is discarded: nothing is sent.
    assert!(env.admin(AdminOp::Discard { key: dk(&letters[1]) }).is_ok());
    assert!(env.deadletters().is_empty());
    let now = env.now;
    assert!(env.shell().relay_mut().take_ready(now).dispatch.is_empty());
}

#[test]
fn only_a_failed_dispatch_can_be_resent() {
    let mut env = TestEnv::new(example_manifests);
    env.quarantine(RawLetter {
        tenant: "acme".into(),
        stream: "AGGREGATE_EVENTS".into(),
        seq: 9,
        subject: "acme.order.events".into(),
        headers: Default::default(),
        raw: b"not json".to_vec(),
        error: "not JSON".into(),
    });
    let l = env.deadletters().remove(0);
    let answer = env.admin(AdminOp::Resend { key: DeadLetterKey { tenant: l.tenant, at: l.at, id: l.id } });
    assert!(matches!(answer, Err(AdminError::NotResendable { ref kind, .. }) if kind == "undecodable"), "{answer:?}");
    assert_eq!(env.deadletters().len(), 1, "a refused re-send writes nothing");
}

#[test]
fn a_stale_answer_for_a_resent_item_neither_resends_it_nor_outlives_its_delivery() {
    let mut env = TestEnv::new(example_manifests);
    let e = order_placed(&mut env, "o-stale");
    env.apply(e, SAGA, "o-stale", true);
    let now = env.now;
    let first = env.shell().relay_mut().take_ready(now).dispatch;
    assert_eq!(first.len(), 1);
    // Not confirmed in time: sent again.
    env.now += RelayConfig::default().confirm_timeout_ms;
    let now = env.now;
    let second = env.shell().relay_mut().take_ready(now).dispatch;
    assert_eq!(second.len(), 1, "re-sent after its confirmation deadline");
    // The first send's failure arrives late, while the second is still out.
    let stale = vec![DispatchResult {
        key: first[0].key,
        send: first[0].send,
        outcome: DispatchOutcome::Retry { error: "503".into() },
    }];
    assert!(!env.shell().take_control(Control::Dispatched(stale)));
    env.tick();
    assert_eq!(env.outbox()[0].1.attempts, 0, "a stale failure is not counted against the item");
    // Past its backoff, within the second send's deadline: not sent a third time.
    env.now += 5_000;
    let now = env.now;
    assert!(env.shell().relay_mut().take_ready(now).dispatch.is_empty(), "sent again on a stale failure");
    // The second send is confirmed: deleted, and never sent again.
    let confirmed =
        vec![DispatchResult { key: second[0].key, send: second[0].send, outcome: DispatchOutcome::Delivered }];
    assert!(!env.shell().take_control(Control::Dispatched(confirmed)));
    env.tick();
    assert!(env.outbox().is_empty());
    for _ in 0..3 {
        env.now += 120_000;
        let now = env.now;
        let ready = env.shell().relay_mut().take_ready(now);
        assert!(ready.dispatch.is_empty(), "sent after its delivery: {:?}", ready.dispatch);
    }
}

#[test]
fn undecodable_messages_become_dead_letters() {
    let mut env = TestEnv::new(example_manifests);
    env.quarantine(RawLetter {
        tenant: "acme".into(),
        stream: "AGGREGATE_EVENTS".into(),
        seq: 77,
        subject: "events.acme.x.y".into(),
        headers: [("x-tenant-id".to_owned(), "acme".to_owned())].into(),
        raw: b"\xff not json".to_vec(),
        error: "not JSON: expected value at line 1 column 1".into(),
    });
    let l = &env.deadletters()[0];
    assert_eq!((l.kind, l.seq), (DeadLetterKind::Undecodable, 77));
    assert!(l.raw.as_deref().unwrap().contains("not json"));
    assert!(l.error.contains("not JSON"));
}

#[test]
fn final_records_stay_readable_until_the_retention_removes_them() {
    let mut env = TestEnv::new(example_manifests);
    let charge = to_charging(&mut env, "o-10");
    let r = env.result_event(&charge, "charge_payment", "failed", serde_json::json!({"reason": "x"}));
    env.apply(r, SAGA, "o-10", false);
    assert_eq!(env.record(SAGA, "o-10").unwrap().status, InstanceStatus::Failed);
    env.now += 30_000;
    env.tick();
    assert!(env.record(SAGA, "o-10").is_some(), "removed before the retention");
    env.now += 31_000;
    env.tick();
    assert!(env.record(SAGA, "o-10").is_none(), "kept past the retention");
    // Gone from the cache too: a later event does not bring the old instance back.
    let e = env.event("inventory", "InventoryReserved", serde_json::json!({"order_id": "o-10"}));
    env.apply(e, SAGA, "o-10", false);
    assert!(env.record(SAGA, "o-10").is_none());
}

#[test]
fn replay_rebuilds_state_without_dispatching_again() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-11");
    env.apply(placed.clone(), SAGA, "o-11", true);
    env.confirm_all();
    let before = env.record(SAGA, "o-11").unwrap();
    let first = replay::begin(&mut env, SAGA, "o-11", 1);
    assert_eq!(first.refs[0].id, placed.id);
    // The source event applied again: same state, its work suppressed (deleted undispatched).
    let end = replay::step(&mut env, SAGA, &first, std::slice::from_ref(&placed));
    assert!(end.ended, "{end:?}");
    let after = env.record(SAGA, "o-11").unwrap();
    assert_eq!(after.state.get(), before.state.get());
    let outbox = env.outbox();
    assert_eq!(outbox.len(), 1);
    assert!(outbox[0].1.suppressed);
    let now = env.now;
    let ready = env.shell().relay_mut().take_ready(now);
    assert!(ready.dispatch.is_empty());
    assert_eq!(ready.suppressed.len(), 1);
}

#[test]
fn queries_show_instance_timers_outbox_and_stats() {
    let mut env = TestEnv::new(example_manifests);
    to_charging(&mut env, "o-12");
    let q = env.core().saga_view(&SagaKey::new("acme", SAGA, "o-12")).unwrap().unwrap();
    assert_eq!(q.record.status, InstanceStatus::Running);
    let state: serde_json::Value = serde_json::from_str(q.record.state.get()).unwrap();
    assert_eq!(state["step"], "charging");
    assert_eq!(q.pending_timers.len(), 1);
    assert_eq!(q.pending_outbox.len(), 1);
    assert!(!q.pending_outbox_truncated);
    // The JSON the operations API serves keeps the record's fields at the top level.
    let json = serde_json::to_value(&q).unwrap();
    assert_eq!(json["state"]["step"], "charging");
    assert_eq!(json["correlation_id"], "o-12");
    assert_eq!(json["pending_timers"][0]["name"], "payment_timeout");
    let (tx, mut rx) = reply_channel();
    env.shell().take(Request::Query(Query::Stats { reply: tx }));
    let s = rx.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(s.store.sagas, 1);
    assert_eq!(s.outbox_window, 1, "the relay's figures are filled in");
    assert!(env.core().saga_view(&SagaKey::new("acme", SAGA, "none")).unwrap().is_none());
}

#[test]
fn saga_listings_are_pages_of_one_saga_of_one_tenant() {
    let mut env = TestEnv::new(example_manifests);
    for i in 0..5 {
        let e = order_placed(&mut env, &format!("o-{i}"));
        env.apply(e, SAGA, &format!("o-{i}"), true);
    }
    let core = env.core();
    let first = core.saga_page("acme", SAGA, None, 2).unwrap();
    assert_eq!(first.correlation_ids, ["o-0", "o-1"]);
    let second = core.saga_page("acme", SAGA, first.next.as_deref(), 2).unwrap();
    assert_eq!(second.correlation_ids, ["o-2", "o-3"]);
    let third = core.saga_page("acme", SAGA, second.next.as_deref(), 2).unwrap();
    assert_eq!(third.correlation_ids, ["o-4"]);
    assert_eq!(third.next, None);
    assert!(core.saga_page("other", SAGA, None, 10).unwrap().correlation_ids.is_empty());
    assert!(core.saga_page("acme", "other_saga", None, 10).unwrap().correlation_ids.is_empty());
}

#[test]
fn during_a_replay_timers_wait_for_their_place_in_the_history() {
    let mut env = TestEnv::new(example_manifests);
    let placed = order_placed(&mut env, "o-13");
    env.apply(placed.clone(), SAGA, "o-13", true);
    let reserved = env.event("inventory", "InventoryReserved", serde_json::json!({"order_id": "o-13"}));
    env.apply(reserved.clone(), SAGA, "o-13", false);
    let due = env.timers("o-13")[0].clone();
    env.now = due.due_at;
    env.tick();
    assert_eq!(env.state(SAGA, "o-13")["step"], "payment_timed_out");
    let before = env.record(SAGA, "o-13").unwrap();
    let dispatchable_before = env.outbox().len();
    let history = [placed, reserved];
    let first = replay::begin(&mut env, SAGA, "o-13", 0);
    let applied: Vec<&str> = first.refs.iter().map(|a| a.stream.as_str()).collect();
    assert_eq!(applied, ["AGGREGATE_EVENTS", "AGGREGATE_EVENTS"], "a page ends before a timer's step");
    assert_eq!(first.total, 3);
    let second = replay::step(&mut env, SAGA, &first, &history);
    // The re-created timer is past due, but waits for its place in the history.
    env.tick();
    env.tick();
    assert_eq!(env.state(SAGA, "o-13")["step"], "charging");
    assert_eq!(second.refs.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), [due.timer_id.as_str()]);
    let end = replay::step(&mut env, SAGA, &second, &history);
    assert!(end.ended && end.aborted.is_none(), "{end:?}");
    let after = env.record(SAGA, "o-13").unwrap();
    assert_eq!(after.state.get(), before.state.get(), "replay did not rebuild the same state");
    assert_eq!(after.status, before.status);
    assert_eq!(after.replay_step, None);
    // Everything the replay produced is suppressed: nothing new is dispatched.
    let outbox = env.outbox();
    assert_eq!(outbox.iter().filter(|(_, i)| !i.suppressed).count(), dispatchable_before);
    assert_eq!(outbox.iter().filter(|(_, i)| i.suppressed).count(), 4, "Reserve, charge, Release, refund again");
}

#[test]
fn a_refused_admin_action_writes_nothing() {
    let mut env = TestEnv::new(example_manifests);
    let missing = DeadLetterKey { tenant: "acme".into(), at: 1, id: "nope".into() };
    let actions = env.run(vec![]).unwrap();
    assert!(actions.is_empty());
    assert_eq!(
        env.admin(AdminOp::Discard { key: missing }),
        Err(AdminError::NoSuchLetter { tenant: "acme".into(), id: "nope".into() })
    );
    let key = SagaKey::new("acme", SAGA, "none");
    assert_eq!(
        env.admin(AdminOp::ReplaySteps { key: key.clone(), at: 0, steps: vec![] }),
        Err(AdminError::NoReplay { key })
    );
    assert_eq!(env.core().stats().unwrap().store.deadletters, 0);
}

#[test]
fn the_instance_cache_is_bounded_and_evicts_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = example_manifests(dir.path());
    let store = Store::open(
        &dir.path().join("shard-0"),
        0,
        64,
        &StoreConfig { durability: Durability::NoSync, ..StoreConfig::default() },
    )
    .unwrap();
    let cfg = CoreConfig { cache_capacity: 3, ..CoreConfig::default() };
    let core = ShardCore::new(0, Router::new(64, 1), cfg, store, manifests).unwrap();
    let mut shell = Shell::new(core, RelayState::new(RelayConfig::default()));
    for i in 0..10u64 {
        let event = Arc::new(Event {
            id: format!("ev-{i}"),
            event_type: "OrderPlaced".into(),
            stream: "AGGREGATE_EVENTS".into(),
            seq: i + 1,
            subject: "events.acme.order.OrderPlaced".into(),
            tenant: "acme".into(),
            timestamp: T0,
            data: serde_json::json!({"order_id": format!("o-{i}"), "sku": "s", "qty": 1, "amount": 1, "customer": "c"}),
            traceparent: None,
            result: None,
            headers: Default::default(),
        });
        let (tx, _rx) = reply_channel();
        let target = Target { saga: SAGA.into(), correlation_id: format!("o-{i}"), may_start: true };
        shell.take(Request::Apply { event, targets: vec![target], reply: tx });
        shell.step(T0).unwrap();
    }
    assert_eq!(shell.core().cache.borrow().len(), 3, "the cache grew past its bound");
    let cached: Vec<String> = shell.core().cache.borrow().iter().map(|(k, _)| k.correlation_id.clone()).collect();
    assert_eq!(cached, ["o-9", "o-8", "o-7"], "not the most recently used");
}

mod json_dynamic {
    use super::super::apply::json_dynamic;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The type of every node, so an integer that became a float (or the reverse) shows.
    fn shape(d: &rhai::Dynamic) -> String {
        if let Some(a) = d.read_lock::<rhai::Array>() {
            return format!("[{}]", a.iter().map(shape).collect::<Vec<_>>().join(","));
        }
        if let Some(m) = d.read_lock::<rhai::Map>() {
            return format!("{{{}}}", m.iter().map(|(k, v)| format!("{k}:{}", shape(v))).collect::<Vec<_>>().join(","));
        }
        d.type_name().to_owned()
    }

    #[test]
    fn the_program_sees_every_field_of_the_event_and_of_its_result() {
        let mut e = crate::message::Event {
            id: "ev-1".into(),
            event_type: "charge_payment.failed".into(),
            stream: "WORKFLOW_EVENTS".into(),
            seq: 9,
            subject: "workflow.t.events".into(),
            tenant: "t".into(),
            timestamp: 1_700_000_000_000,
            data: serde_json::json!({"reason": "declined", "n": [1, 2.5]}),
            traceparent: None,
            result: None,
            headers: Default::default(),
        };
        let base = serde_json::json!({
            "id": "ev-1", "type": "charge_payment.failed", "stream": "WORKFLOW_EVENTS", "seq": 9,
            "subject": "workflow.t.events", "tenant": "t", "correlation_id": "o-1",
            "timestamp": 1_700_000_000_000u64, "data": {"reason": "declined", "n": [1, 2.5]},
        });
        let seen = serde_json::to_value(super::super::apply::event_dynamic(&e, "o-1")).unwrap();
        assert_eq!(seen, base);
        e.result = Some(crate::message::ResultInfo {
            command_id: "cmd-1".into(),
            effect: "charge_payment".into(),
            outcome: "failed".into(),
        });
        let mut with_result = base.clone();
        with_result["command_id"] = "cmd-1".into();
        with_result["effect"] = "charge_payment".into();
        with_result["outcome"] = "failed".into();
        let seen = serde_json::to_value(super::super::apply::event_dynamic(&e, "o-1")).unwrap();
        assert_eq!(seen, with_result);
    }

    proptest! {
        #[test]
        fn builds_the_value_rhais_serde_conversion_builds(v in json()) {
            let direct = json_dynamic(&v);
            let via_serde = rhai::serde::to_dynamic(&v).unwrap();
            prop_assert_eq!(shape(&direct), shape(&via_serde));
            prop_assert_eq!(serde_json::to_value(&direct).unwrap(), serde_json::to_value(&via_serde).unwrap());
        }
    }
}

/// The result of an effect run in place, as a caller reports it.
fn ran(env: &TestEnv, command_id: &str, effect: &str, outcome: &str, data: serde_json::Value) -> DispatchOutcome {
    DispatchOutcome::Ran(Box::new(crate::message::RanEffect {
        event: Event {
            id: format!("result:{command_id}"),
            event_type: format!("{effect}.{outcome}"),
            stream: "WORKFLOW_EVENTS".into(),
            seq: 0,
            subject: format!("workflow.events.acme.{effect}.{outcome}"),
            tenant: "acme".into(),
            timestamp: env.now,
            data,
            traceparent: None,
            result: Some(ResultInfo { command_id: command_id.into(), effect: effect.into(), outcome: outcome.into() }),
            headers: Default::default(),
        },
        command_subject: format!("workflow.commands.acme.{effect}"),
        command: format!(r#"{{"command_id":"{command_id}"}}"#).into_bytes(),
        result_subject: format!("workflow.events.acme.{effect}.{outcome}"),
        result: format!(r#"{{"command_id":"{command_id}","outcome":"{outcome}"}}"#).into_bytes(),
    }))
}

#[test]
fn an_effect_run_in_place_is_applied_in_the_commit_that_deletes_its_item_and_recorded() {
    let mut env = TestEnv::new(example_manifests);
    let charge = to_charging(&mut env, "o-20");
    let (charge_key, _) = env.outbox().into_iter().find(|(_, i)| i.work_id == charge).unwrap();
    let outcome = ran(&env, &charge, "charge_payment", "succeeded", serde_json::json!({"payment_id": "p-1"}));
    let actions = env.dispatch(outcome);
    // One step: the item is deleted, the saga moved on (ship offered), the call recorded.
    assert!(actions.iter().any(|a| matches!(a, Action::Delivered { key } if *key == charge_key)), "{actions:?}");
    let offered = offers(&actions);
    let kinds: Vec<_> = offered.iter().map(|i| i.kind.clone()).collect();
    assert_eq!(
        kinds,
        [WorkKind::Effect { effect: "ship_order".into() }, WorkKind::Audit { effect: "charge_payment".into() }]
    );
    let audit: serde_json::Value = serde_json::from_str(offered[1].payload.get()).unwrap();
    assert_eq!(audit["command"]["command_id"], charge.as_str());
    assert_eq!(audit["result_subject"], "workflow.events.acme.charge_payment.succeeded");
    assert_eq!(offered[1].work_id, format!("audit:{charge}"));
    assert_eq!(env.state(SAGA, "o-20")["step"], "shipping");
    let rec = env.record(SAGA, "o-20").unwrap();
    assert!(rec.outstanding.is_empty() || !rec.outstanding.contains(&charge));
    assert!(env.outbox().iter().all(|(k, _)| *k != charge_key), "the item outlived its result");
    // Kept for a replay: the result came from no stream.
    let key = crate::keys::ResultKey { saga: SagaKey::new("acme", SAGA, "o-20"), event_id: format!("result:{charge}") };
    let recorded = env.core().store().read().unwrap().result(&key).unwrap().unwrap();
    assert_eq!(recorded.data["payment_id"], "p-1");
    // The published copy of the result, consumed back, changes nothing.
    let copy = env.result_event(&charge, "charge_payment", "succeeded", serde_json::json!({"payment_id": "p-1"}));
    let version = env.record(SAGA, "o-20").unwrap().version;
    assert_eq!(settles(&env.apply(copy, SAGA, "o-20", false)), ACK);
    assert_eq!(env.record(SAGA, "o-20").unwrap().version, version);
    // The instance's removal takes its recorded results with it.
    let r = env.result_event(
        &ids::work_id("acme", SAGA, "o-20", &format!("result:{charge}"), 0),
        "ship_order",
        "failed",
        serde_json::json!({}),
    );
    env.apply(r, SAGA, "o-20", false);
    env.now += 120_000;
    env.tick();
    assert!(env.record(SAGA, "o-20").is_none());
    assert!(
        env.core().store().read().unwrap().result(&key).unwrap().is_none(),
        "a recorded result outlived its instance"
    );
}

#[test]
fn an_effect_to_try_again_is_stored_with_its_wait_and_an_open_breaker_costs_no_attempt() {
    let mut env = TestEnv::new(example_manifests);
    let charge = to_charging(&mut env, "o-21");
    let later = |attempt| DispatchOutcome::Later { wait_ms: 700, error: "upstream answered 503".into(), attempt };
    let actions = env.dispatch(later(true));
    assert!(
        matches!(&actions[..], [Action::RetryLater { item, .. }] if item.work_id == charge && item.attempts == 1),
        "{actions:?}"
    );
    let item = env.outbox().into_iter().find(|(_, i)| i.work_id == charge).unwrap().1;
    assert_eq!((item.attempts, item.next_attempt_at), (1, env.now + 700));
    env.now += 700;
    let actions = env.dispatch(later(false));
    assert!(matches!(&actions[..], [Action::RetryLater { item, .. }] if item.attempts == 1), "{actions:?}");
    assert!(env.deadletters().is_empty(), "an effect's retries are not dispatch failures");
}

#[test]
fn a_result_run_in_place_for_a_blocked_key_waits_with_its_item_kept() {
    let mut env = TestEnv::new(|d| {
        custom_manifests(
            d,
            "fn on_event(state, event) {\n  if event.type == \"e.succeeded\" && state.hold == true { throw \"not yet\"; }\n  let s = if state == () { #{ hold: false } } else { state };\n  if event.data.hold == true { s.hold = true; }\n  if event.type == \"Happened\" && event.data.start == true { return #{ state: s, work: [ #{ effect: \"e\", payload: #{} } ] }; }\n  #{ state: s }\n}\n",
            "park",
            5,
        )
    });
    let e = ev(&mut env, "A", serde_json::json!({"start": true, "hold": true}));
    let e_id = e.id.clone();
    env.apply(e, "s", "A", true);
    let (item_key, item) = env.outbox()[0].clone();
    let command_id = item.work_id.clone();
    assert_eq!(command_id, ids::work_id("acme", "s", "A", &e_id, 0));
    let actions = env.dispatch(ran(&env, &command_id, "e", "succeeded", serde_json::json!({})));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Delivered { .. })),
        "deleted before its result applied: {actions:?}"
    );
    assert_eq!(env.core().blocked_keys(), 1);
    assert!(env.outbox().iter().any(|(k, _)| *k == item_key), "the item went while its result waits in memory");
}

mod crashed;
mod deadletters;
mod limits;
mod prune;
mod replay;
