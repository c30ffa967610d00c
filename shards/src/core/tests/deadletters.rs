//! Dead letters list in stream order and requeue in the order their key received them,
//! also when they were written across a restart (the counter that orders the ones without
//! a stream position survives it).

use super::*;

fn apply_many(env: &mut TestEnv, events: Vec<(String, Arc<Event>)>) {
    let mut reqs = Vec::new();
    for (cid, event) in events {
        let (tx, _rx) = reply_channel();
        let target = Target { saga: "s".into(), correlation_id: cid, may_start: true };
        reqs.push(Request::Apply { event, targets: vec![target], reply: tx });
    }
    env.run(reqs).unwrap();
}

fn listed_seqs(env: &mut TestEnv) -> Vec<u64> {
    env.core().deadletter_views("acme", None, 1_000).unwrap().into_iter().map(|v| v.letter.seq).collect()
}

#[test]
fn dead_letters_written_across_a_restart_list_in_stream_order_and_requeue_in_order() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 1));
    // A burst: key A's poison event, thirty other poison events, then A's next event, which
    // parks behind its poison one.
    let mut burst = vec![("A".to_owned(), ev(&mut env, "A", serde_json::json!({"n": 1, "poison": true})))];
    for i in 0..30 {
        let cid = format!("B{i}");
        let e = ev(&mut env, &cid, serde_json::json!({"n": 1, "poison": true}));
        burst.push((cid, e));
    }
    burst.push(("A".to_owned(), ev(&mut env, "A", serde_json::json!({"n": 2}))));
    apply_many(&mut env, burst);
    assert_eq!(listed_seqs(&mut env), (1..=32).collect::<Vec<_>>());

    // A restart a moment later (the clock has not caught up with the burst's stamps), then
    // A's third event parks too.
    env.restart();
    env.now += 1;
    let a3 = ev(&mut env, "A", serde_json::json!({"n": 3}));
    apply_many(&mut env, vec![("A".to_owned(), a3)]);
    assert_eq!(listed_seqs(&mut env), (1..=33).collect::<Vec<_>>(), "not in stream order");
    env.restart();
    assert_eq!(listed_seqs(&mut env), (1..=33).collect::<Vec<_>>(), "the order changed with a restart");

    // Fixed and requeued: A's events apply in the order A received them.
    let fixed = BOMB.replace("throw \"poison event\";", "");
    let set = custom_manifests(env.dir.path(), &fixed, "park", 1);
    env.reload(set);
    let answer = env.admin(AdminOp::Requeue { key: SagaKey::new("acme", "s", "A"), skip_poison: false });
    assert_eq!(answer, Ok(AdminAnswer::Requeued { requeued: 3, skipped: None }));
    assert_eq!(env.state("s", "A")["seen"], serde_json::json!([1, 2, 3]));
}

#[test]
fn letters_an_older_version_stamped_out_of_order_requeue_in_stream_order() {
    let mut env = TestEnv::new(|d| custom_manifests(d, BOMB, "park", 1));
    // As a version whose stamps reset at start could leave them: A's third event stamped
    // before its second, and a timer (no stream position) between them.
    let events: Vec<Arc<Event>> = (1..=3).map(|n| ev(&mut env, "A", serde_json::json!({"n": n}))).collect();
    let mut batch = Batch::new();
    for (event, at) in events.iter().zip([T0, T0 + 300, T0 + 200]) {
        let id = format!("dl-{}", event.seq);
        let letter = crate::record::DeadLetter {
            id: id.clone(),
            kind: if event.seq == 1 { DeadLetterKind::Poison } else { DeadLetterKind::Parked },
            partition: 0,
            tenant: "acme".into(),
            at,
            error: "old".into(),
            saga: Some("s".into()),
            correlation_id: Some("A".into()),
            stream: Some(event.stream.clone()),
            seq: event.seq,
            subject: Some(event.subject.clone()),
            headers: Default::default(),
            raw: None,
            event: serde_json::value::to_raw_value(event.as_ref()).ok(),
            work: None,
            attempts: 1,
        };
        batch.put_deadletter(&DeadLetterKey { tenant: "acme".into(), at, id }, &letter);
    }
    env.core().store().commit(&batch).unwrap();
    env.restart();
    assert_eq!(listed_seqs(&mut env), vec![1, 2, 3]);
    let answer = env.admin(AdminOp::Requeue { key: SagaKey::new("acme", "s", "A"), skip_poison: false });
    assert_eq!(answer, Ok(AdminAnswer::Requeued { requeued: 3, skipped: None }));
    assert_eq!(env.state("s", "A")["seen"], serde_json::json!([1, 2, 3]));
    // New letters are stamped after every stored one, whatever the clock says.
    let poison = ev(&mut env, "C", serde_json::json!({"n": 1, "poison": true}));
    apply_many(&mut env, vec![("C".to_owned(), poison)]);
    let stamps: Vec<u64> = env.deadletters().iter().map(|l| l.at).collect();
    assert_eq!(stamps, vec![T0 + 301]);
}
