//! An operator's replay, driven here as the operations thread drives it: a page of steps per
//! batch, stream events handed in, live events arriving between the pages.

use super::*;
use crate::message::{REPLAY_PAGE, ReplayPage, ReplayStep};
use crate::record::AppliedRef;

/// Each event seen once, in order, and a Gateway command per event.
const NOTES: &str = r#"
fn on_event(state, event) {
    if event.data.poison == true { throw "poison event"; }
    let s = if state == () { #{ seen: [] } } else { state };
    s.seen.push(event.data.n);
    #{ state: s, work: [ #{ command: "Note", aggregate: "a", aggregate_id: "x", payload: #{ n: event.data.n } } ] }
}
"#;

pub(super) fn key(cid: &str) -> SagaKey {
    SagaKey::new("acme", "s", cid)
}

/// Applies events `n` in `ns` to instance `cid` of saga `s`, one step for all; the events.
fn feed(env: &mut TestEnv, cid: &str, ns: std::ops::RangeInclusive<u64>) -> Vec<Arc<Event>> {
    let mut events = Vec::new();
    let mut reqs = Vec::new();
    for n in ns {
        let e = ev(env, cid, serde_json::json!({ "n": n }));
        let (tx, _rx) = reply_channel();
        let target = Target { saga: "s".into(), correlation_id: cid.into(), may_start: true };
        reqs.push(Request::Apply { event: e.clone(), targets: vec![target], reply: tx });
        events.push(e);
    }
    env.run(reqs).unwrap();
    events
}

fn page(answer: Result<AdminAnswer, AdminError>) -> ReplayPage {
    match answer {
        Ok(AdminAnswer::Page(p)) => p,
        other => panic!("not a page: {other:?}"),
    }
}

/// The steps of `page` as the operations thread builds them: stream events read back (here
/// looked up among `events`), the rest left to the shard.
pub(super) fn steps_of(page: &ReplayPage, events: &[Arc<Event>]) -> Vec<ReplayStep> {
    page.refs
        .iter()
        .map(|r| match events.iter().find(|e| e.id == r.id) {
            Some(e) if r.from_stream() && r.seq >= page.from_seq => ReplayStep::Event(e.clone()),
            _ => ReplayStep::Own,
        })
        .collect()
}

/// Asks for a replay of `cid` and returns its first page.
pub(super) fn begin(env: &mut TestEnv, saga: &str, cid: &str, from_seq: u64) -> ReplayPage {
    let answer = env.admin(AdminOp::Replay {
        tenant: "acme".into(),
        saga: saga.into(),
        correlation_id: Some(cid.into()),
        from_seq,
    });
    let Ok(AdminAnswer::Marked(m)) = answer else { panic!("{answer:?}") };
    assert_eq!(m.instances, [cid]);
    let k = SagaKey::new("acme", saga, cid);
    page(env.admin(AdminOp::ReplayNext { key: k }))
}

/// Applies one page; the next.
pub(super) fn step(env: &mut TestEnv, saga: &str, p: &ReplayPage, events: &[Arc<Event>]) -> ReplayPage {
    let k = SagaKey::new("acme", saga, &p.correlation_id);
    page(env.admin(AdminOp::ReplaySteps { key: k, at: p.at, steps: steps_of(p, events) }))
}

/// One live event for `cid`; the settlements of its step (empty while the key is held).
fn live(env: &mut TestEnv, event: Arc<Event>, cid: &str) -> Vec<Option<String>> {
    settles(&env.apply(event, "s", cid, true))
}

fn seen(env: &mut TestEnv, cid: &str) -> Vec<u64> {
    let v = env.state("s", cid)["seen"].clone();
    v.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
}

#[test]
fn a_replay_holds_its_key_so_live_events_wait_and_apply_once_after_the_whole_history() {
    let mut env = TestEnv::new(|d| custom_manifests(d, NOTES, "park", 1));
    // 70 events: more than the 64 an instance once remembered.
    let history = feed(&mut env, "A", 1..=70);
    // Every command went out (one at a time: one in flight per instance and target).
    while !env.outbox().is_empty() {
        env.confirm_all();
    }
    let first = begin(&mut env, "s", "A", 0);
    assert_eq!((first.at, first.total, first.refs.len()), (0, 70, REPLAY_PAGE));
    let second = step(&mut env, "s", &first, &history);
    assert_eq!(second.at, REPLAY_PAGE as u64);
    let rec = env.record("s", "A").unwrap();
    assert_eq!(rec.replay_step, Some(REPLAY_PAGE as u64), "progress is committed with the state");
    assert_eq!(seen(&mut env, "A"), (1..=32).collect::<Vec<_>>());

    // Live traffic while the key is held: a new event, a redelivered old one, and an event
    // for another key, which goes on.
    let new = ev(&mut env, "A", serde_json::json!({ "n": 71 }));
    assert_eq!(live(&mut env, new, "A"), [], "a live event was settled while the replay holds its key");
    assert_eq!(live(&mut env, history[40].clone(), "A"), []);
    let other = ev(&mut env, "B", serde_json::json!({ "n": 1 }));
    assert_eq!(live(&mut env, other, "B"), ACK);
    let view = env.core().saga_view(&key("A")).unwrap().unwrap();
    assert_eq!(view.blocked.as_ref().map(|b| (b.replaying, b.queued)), Some((true, 2)));
    assert_eq!(seen(&mut env, "A"), (1..=32).collect::<Vec<_>>(), "a live event landed on a half-rebuilt state");
    let (tx, mut rx) = reply_channel();
    env.shell().take(Request::Admin { op: AdminOp::Requeue { key: key("A"), skip_poison: false }, reply: tx });
    env.tick();
    assert_eq!(rx.try_recv().unwrap().unwrap(), Err(AdminError::RequeueWhileReplaying { key: key("A") }));

    let third = step(&mut env, "s", &second, &history);
    assert!(!third.ended);
    let (tx, _rx) = reply_channel();
    let k = key("A");
    env.shell().take(Request::Admin {
        op: AdminOp::ReplaySteps { key: k.clone(), at: third.at, steps: steps_of(&third, &history) },
        reply: tx,
    });
    let actions = env.tick();
    // The history's last step releases the key: what waited applies in its order, once.
    assert_eq!(settles(&actions), [None, None], "the waiting events are acked once the history is applied");
    assert_eq!(seen(&mut env, "A"), (1..=71).collect::<Vec<_>>());
    let rec = env.record("s", "A").unwrap();
    assert_eq!((rec.version, rec.history.len(), rec.replay_step), (71, 71, None));
    assert_eq!(env.core().stats().unwrap().store.replays, 0);
    assert_eq!(env.core().stats().unwrap().store.history, 71 + 1, "the old history is gone (B has one)");
    // The replay's work is suppressed, the live event's goes out.
    let out = env.outbox();
    let live_items: Vec<_> =
        out.iter().filter(|(_, i)| !i.suppressed).map(|(_, i)| i.payload.get().to_owned()).collect();
    assert_eq!(live_items, [r#"{"n":1}"#, r#"{"n":71}"#], "B's, written while A was held, then A's");
    assert_eq!(out.iter().filter(|(_, i)| i.suppressed).count(), 70);
}

#[test]
fn a_replay_killed_midway_holds_its_key_again_on_start_and_resumes_where_it_stood() {
    let mut env = TestEnv::new(|d| custom_manifests(d, NOTES, "park", 1));
    let history = feed(&mut env, "A", 1..=40);
    let first = begin(&mut env, "s", "A", 0);
    step(&mut env, "s", &first, &history);
    // A crash after the first page's commit.
    env.restart();
    let new = ev(&mut env, "A", serde_json::json!({ "n": 41 }));
    assert_eq!(live(&mut env, new, "A"), [], "the key is not held after a restart");
    let (tx, mut rx) = reply_channel();
    env.shell().take(Request::Query(Query::Replays { after: None, limit: 10, reply: tx }));
    assert_eq!(rx.try_recv().unwrap().unwrap().unwrap(), [(key("A"), true)]);
    let resumed = page(env.admin(AdminOp::ReplayNext { key: key("A") }));
    assert_eq!((resumed.at, resumed.total), (REPLAY_PAGE as u64, 40));
    // A second driver starting over is refused; the resumed one goes on.
    let stale = ReplayPage { at: 0, ..first.clone() };
    let answer = env.admin(AdminOp::ReplaySteps { key: key("A"), at: 0, steps: steps_of(&stale, &history) });
    assert_eq!(answer, Err(AdminError::ReplayConflict { key: key("A"), at: 0, done: 32 }));
    let end = step(&mut env, "s", &resumed, &history);
    assert!(end.ended && end.aborted.is_none(), "{end:?}");
    assert_eq!(seen(&mut env, "A"), (1..=41).collect::<Vec<_>>());
}

#[test]
fn a_history_the_program_now_fails_on_gives_the_replay_up_and_puts_the_instance_back() {
    let mut env = TestEnv::new(|d| custom_manifests(d, NOTES, "park", 1));
    let history = feed(&mut env, "A", 1..=40);
    let before = env.record("s", "A").unwrap();
    let first = begin(&mut env, "s", "A", 0);
    let second = step(&mut env, "s", &first, &history);
    let new = ev(&mut env, "A", serde_json::json!({ "n": 41 }));
    assert_eq!(live(&mut env, new, "A"), []);
    // The program changed: it fails on event 35 of the history.
    let changed = NOTES.replace("event.data.poison == true", "event.data.n == 35");
    let set = custom_manifests(env.dir.path(), &changed, "park", 1);
    env.reload(set);
    let k = key("A");
    let (tx, mut rx) = reply_channel();
    env.shell().take(Request::Admin {
        op: AdminOp::ReplaySteps { key: k.clone(), at: second.at, steps: steps_of(&second, &history) },
        reply: tx,
    });
    let actions = env.tick();
    let end = page(rx.try_recv().unwrap().unwrap());
    assert!(end.ended && end.aborted.as_deref().is_some_and(|a| a.contains("poison event")), "{end:?}");
    // As it was, with its history; the waiting event applied on it (and acked).
    assert_eq!(settles(&actions), ACK);
    let after = env.record("s", "A").unwrap();
    assert_eq!(after.version, before.version + 1);
    assert_eq!(after.history.len(), 41);
    assert_eq!(seen(&mut env, "A"), (1..=41).collect::<Vec<_>>());
    assert!(env.deadletters().is_empty());
    assert_eq!(env.core().stats().unwrap().store.replays, 0);
}

#[test]
fn an_instance_recorded_before_whole_histories_is_refused_by_name_and_skipped_otherwise() {
    let mut env = TestEnv::new(|d| custom_manifests(d, NOTES, "park", 1));
    feed(&mut env, "A", 1..=3);
    feed(&mut env, "B", 1..=3);
    // As an older version wrote it: the last 64 of 70 events kept in the record.
    let mut old = env.record("s", "A").unwrap();
    old.version = 70;
    old.history = Default::default();
    old.applied =
        (7..=70).map(|n| AppliedRef { stream: "AGGREGATE_EVENTS".into(), seq: n, id: format!("e{n}") }).collect();
    let mut b = Batch::new();
    b.put_saga(&key("A"), &old);
    env.core().store().commit(&b).unwrap();
    env.restart();
    let answer = env.admin(AdminOp::Replay {
        tenant: "acme".into(),
        saga: "s".into(),
        correlation_id: Some("A".into()),
        from_seq: 0,
    });
    let Err(refused @ AdminError::HistoryIncomplete { .. }) = answer else { panic!("{answer:?}") };
    assert!(refused.to_string().contains("remembers only the last 64"), "{refused}");
    let answer =
        env.admin(AdminOp::Replay { tenant: "acme".into(), saga: "s".into(), correlation_id: None, from_seq: 0 });
    let Ok(AdminAnswer::Marked(m)) = answer else { panic!("{answer:?}") };
    assert_eq!((m.instances, m.skipped.len()), (vec!["B".to_owned()], 1));
}

#[test]
fn a_parked_instance_is_not_reset_and_its_replay_is_forgotten_when_given_up() {
    let mut env = TestEnv::new(|d| custom_manifests(d, NOTES, "park", 1));
    let history = feed(&mut env, "A", 1..=3);
    let poison = ev(&mut env, "A", serde_json::json!({ "n": 4, "poison": true }));
    live(&mut env, poison, "A");
    let before = env.record("s", "A").unwrap();
    assert!(before.parked.is_some());
    let first = begin(&mut env, "s", "A", 0);
    let answer = env.admin(AdminOp::ReplaySteps { key: key("A"), at: 0, steps: steps_of(&first, &history) });
    assert_eq!(answer, Err(AdminError::ReplayWhileParked { key: key("A") }));
    let answer = env.admin(AdminOp::ReplayAbort { key: key("A"), reason: "parked".into() });
    assert_eq!(answer, Ok(AdminAnswer::Aborted { aborted: "A".into(), restored: false }));
    let after = env.record("s", "A").unwrap();
    assert_eq!((after.version, after.state.get()), (before.version, before.state.get()));
    assert_eq!(env.core().stats().unwrap().store.replays, 0);
    let answer = env.admin(AdminOp::ReplayNext { key: key("A") });
    assert_eq!(answer, Err(AdminError::NoReplay { key: key("A") }));
}
