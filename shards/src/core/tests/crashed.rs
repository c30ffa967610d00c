//! Messages redelivered after the process died with them in flight (issue 17 item 16): a
//! suspect that waits behind its key tells the bridge it was taken in; one that crashed the
//! process too often is quarantined as a poison event of its key, never run.

use super::*;

/// One suspect for key `cid` of saga `s`: its answer and `ran` channels.
fn suspect(
    env: &mut TestEnv,
    event: Arc<Event>,
    cid: &str,
    crashed: Option<u32>,
) -> (crate::message::ReplyRx<ApplyOutcome>, crate::message::ReplyRx<()>, Vec<Action>) {
    let (tx, rx) = reply_channel();
    let (ran_tx, ran) = reply_channel();
    let target = Target { saga: "s".into(), correlation_id: cid.into(), may_start: true };
    let actions =
        env.run(vec![Request::ApplySuspect { event, targets: vec![target], reply: tx, ran: ran_tx, crashed }]).unwrap();
    (rx, ran, actions)
}

#[test]
fn an_event_that_crashed_the_process_is_quarantined_unrun_and_parks_its_key() {
    // Three attempts per event: a failing program would block the key and retry.
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 3));
    let first = ev(&mut env, "K", serde_json::json!({"n": 1}));
    env.apply(first, "s", "K", true);
    // A gas bomb: had it run, it would have blocked the key and retried.
    let bomb = ev(&mut env, "K", serde_json::json!({"n": 2, "bomb": true}));
    let seq = bomb.seq;
    let (mut rx, mut ran, actions) = suspect(&mut env, bomb, "K", Some(3));
    let reason = match rx.try_recv().unwrap() {
        Some(ApplyOutcome::Term { reason }) => reason,
        other => panic!("expected TERM, got {other:?}"),
    };
    assert_eq!(settles(&actions), [Some(reason.clone())]);
    for part in [
        "crashed the process 3 times".to_owned(),
        format!("stream AGGREGATE_EVENTS, sequence {seq}"),
        "tenant \"acme\", saga \"s\", key \"K\"".to_owned(),
        "while it ran alone".to_owned(),
    ] {
        assert!(reason.contains(&part), "{part:?} missing: {reason}");
    }
    assert!(ran.try_recv().is_err(), "settled in its batch: the answer says so, not `ran`");
    assert_eq!(env.core().blocked_keys(), 0, "not retried");
    let letters = env.deadletters();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].kind, letters[0].seq, letters[0].attempts), (DeadLetterKind::Poison, seq, 3));
    assert_eq!(letters[0].error, reason);
    assert!(env.record("s", "K").unwrap().parked.is_some(), "the key's poison policy (park) applies");
    // The key's next event parks behind it, as behind any poison event.
    let next = ev(&mut env, "K", serde_json::json!({"n": 3}));
    assert_eq!(settles(&env.apply(next, "s", "K", true)), ACK);
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([1]));
    assert_eq!(env.deadletters()[1].kind, DeadLetterKind::Parked);
}

#[test]
fn an_event_already_applied_is_a_duplicate_even_when_it_crashed_the_process() {
    // The process died after the event's commit (in what followed it): it was applied, so
    // it is acked as a duplicate, not quarantined.
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 1));
    let e = ev(&mut env, "K", serde_json::json!({"n": 1}));
    env.apply(e.clone(), "s", "K", true);
    let (mut rx, _ran, _) = suspect(&mut env, e, "K", Some(3));
    assert_eq!(rx.try_recv().unwrap(), Some(ApplyOutcome::Ack));
    assert!(env.deadletters().is_empty());
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([1]));
}

#[test]
fn a_suspect_behind_a_blocked_key_is_reported_taken_and_settles_in_its_turn() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "skip", 2));
    let poison = ev(&mut env, "K", serde_json::json!({"n": 1, "poison": true}));
    env.apply(poison, "s", "K", true);
    assert_eq!(env.core().blocked_keys(), 1);
    // Behind it: a suspect that runs (n 2), and one that crashed the process (a bomb).
    let fine = ev(&mut env, "K", serde_json::json!({"n": 2}));
    let (mut rx_fine, mut ran_fine, _) = suspect(&mut env, fine, "K", None);
    assert_eq!(rx_fine.try_recv().unwrap(), None, "waits behind the blocked key");
    assert_eq!(ran_fine.try_recv().unwrap(), Some(()), "taken in: the bridge may hand on the next");
    let bomb = ev(&mut env, "K", serde_json::json!({"n": 3, "bomb": true}));
    let (mut rx_bomb, mut ran_bomb, _) = suspect(&mut env, bomb, "K", Some(3));
    assert_eq!(ran_bomb.try_recv().unwrap(), Some(()));
    // The head's second attempt fails: skipped; the suspects behind it apply in order, and
    // the one that crashed the process is quarantined in its turn, not run.
    env.now += 100;
    env.tick();
    assert_eq!(rx_fine.try_recv().unwrap(), Some(ApplyOutcome::Ack));
    match rx_bomb.try_recv().unwrap() {
        Some(ApplyOutcome::Term { reason }) => assert!(reason.contains("crashed the process 3 times"), "{reason}"),
        other => panic!("expected TERM, got {other:?}"),
    }
    assert_eq!(env.state("s", "K")["seen"], serde_json::json!([2]));
    assert_eq!(env.core().blocked_keys(), 0);
    let kinds: Vec<_> = env.deadletters().iter().map(|l| (l.kind, l.attempts)).collect();
    assert_eq!(kinds, [(DeadLetterKind::Poison, 2), (DeadLetterKind::Poison, 3)]);
}
