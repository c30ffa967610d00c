//! One key never stops a shard (invariant 12): outputs too deep or too large to store and
//! read back, and stored states that cannot be read, quarantine their own key only.

use super::*;

/// A program that builds a state `deep` levels deep, or larger than the size limit (`big`),
/// or a small one.
const BUILDER: &str = r#"
fn on_event(state, event) {
    if event.data.deep != () {
        let s = #{ leaf: true };
        for i in 0..event.data.deep { s = #{ inner: s }; }
        return #{ state: s };
    }
    if event.data.deep_payload != () {
        let p = #{ leaf: true };
        for i in 0..event.data.deep_payload { p = [p]; }
        return #{ state: #{ n: 1 }, work: [#{ effect: "e", payload: #{ p: p } }] };
    }
    if event.data.big == true {
        let k = "0123456789abcdef";
        k += k; k += k; k += k; k += k;
        let m = #{};
        for i in 0..5000 { m[k + i] = i; }
        return #{ state: m };
    }
    let s = if state == () || state.seen == () { #{ seen: [] } } else { state };
    s.seen.push(event.data.n);
    #{ state: s }
}
"#;

/// [`custom_manifests`] with room for the builder's loops.
fn manifests(dir: &Path) -> Arc<ManifestSet> {
    std::fs::write(dir.join("p.rhai"), BUILDER).unwrap();
    let m = dir.join("m.yaml");
    std::fs::write(
        &m,
        "sagas:\n  - name: s\n    program: p.rhai\n    gas: 1000000\n    max_wall_ms: 5000\n    on_poison: park\n    retry: { attempts: 1 }\n    triggers:\n      - { subject: \"events.>\", correlation: data.id, may_start: true }\neffects:\n  - { name: e, provider: noop }\n",
    )
    .unwrap();
    Arc::new(ManifestSet::load(&[m], &crate::program::check_program).unwrap())
}

fn target(cid: &str) -> Target {
    Target { saga: "s".into(), correlation_id: cid.into(), may_start: true }
}

/// Applies each `(cid, event)` as one message in one step; the answers, in order.
fn apply_all(env: &mut TestEnv, events: Vec<(&str, Arc<Event>)>) -> Vec<Option<ApplyOutcome>> {
    let mut rxs = Vec::new();
    let mut reqs = Vec::new();
    for (cid, event) in events {
        let (tx, rx) = reply_channel();
        reqs.push(Request::Apply { event, targets: vec![target(cid)], reply: tx });
        rxs.push(rx);
    }
    env.run(reqs).expect("the step commits");
    rxs.into_iter().map(|mut rx| rx.try_recv().unwrap()).collect()
}

fn term_reason(answer: &Option<ApplyOutcome>) -> &str {
    match answer {
        Some(ApplyOutcome::Term { reason }) => reason,
        other => panic!("expected TERM, got {other:?}"),
    }
}

#[test]
fn outputs_too_deep_or_too_large_quarantine_their_key_and_the_shard_keeps_going() {
    let mut env = TestEnv::new(manifests);
    let deep = ev(&mut env, "k-deep", serde_json::json!({"deep": 200}));
    let big = ev(&mut env, "k-big", serde_json::json!({"big": true}));
    let deep_payload = ev(&mut env, "k-payload", serde_json::json!({"deep_payload": 200}));
    let good = ev(&mut env, "k-good", serde_json::json!({"n": 1}));
    let answers =
        apply_all(&mut env, vec![("k-deep", deep), ("k-big", big), ("k-payload", deep_payload), ("k-good", good)]);
    assert!(term_reason(&answers[0]).contains("deeper than 64 levels"), "{answers:?}");
    assert!(term_reason(&answers[1]).contains("larger than 1048576 bytes"), "{answers:?}");
    assert!(term_reason(&answers[2]).contains("deeper than 64 levels"), "{answers:?}");
    assert_eq!(answers[3], Some(ApplyOutcome::Ack), "the neighbour completes");
    assert_eq!(env.state("s", "k-good")["seen"], serde_json::json!([1]));

    // Each rejected key has its poison letter naming the limit; nothing of its output was
    // written (no outbox item for the deep payload).
    let letters = env.deadletters();
    let poison: Vec<(&str, &str)> = letters
        .iter()
        .filter(|l| l.kind == DeadLetterKind::Poison)
        .map(|l| (l.correlation_id.as_deref().unwrap_or(""), l.error.as_str()))
        .collect();
    assert_eq!(poison.len(), 3, "{letters:?}");
    assert!(poison.iter().any(|(k, e)| *k == "k-deep" && e.contains("state") && e.contains("64 levels")));
    assert!(poison.iter().any(|(k, e)| *k == "k-big" && e.contains("state") && e.contains("1048576 bytes")));
    assert!(poison.iter().any(|(k, e)| *k == "k-payload" && e.contains("work[0].payload")));
    assert!(env.outbox().is_empty(), "a rejected output wrote an outbox item");
    for k in ["k-deep", "k-big", "k-payload"] {
        let rec = env.record("s", k).expect("the key is parked");
        assert!(rec.parked.is_some(), "{k} is not parked");
        assert_eq!(rec.version, 0, "{k}: the rejected output was applied");
    }

    // The shard keeps going, also after a restart: the neighbour applies, a rejected key
    // parks its next event behind the poison one.
    env.restart();
    let good2 = ev(&mut env, "k-good", serde_json::json!({"n": 2}));
    let deep2 = ev(&mut env, "k-deep", serde_json::json!({"n": 2}));
    let answers = apply_all(&mut env, vec![("k-good", good2), ("k-deep", deep2)]);
    assert_eq!(answers, vec![Some(ApplyOutcome::Ack), Some(ApplyOutcome::Ack)]);
    assert_eq!(env.state("s", "k-good")["seen"], serde_json::json!([1, 2]));
    let parked = env.deadletters().into_iter().filter(|l| l.kind == DeadLetterKind::Parked).count();
    assert_eq!(parked, 1);
}

/// A record whose state nests `depth` levels (as an older version could write it).
fn deep_record(depth: usize) -> Vec<u8> {
    let state = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    format!(r#"{{"status":"running","version":1,"created_at":1,"updated_at":1,"state":{state}}}"#).into_bytes()
}

#[test]
fn a_stored_state_that_cannot_be_read_quarantines_its_key_not_the_shard() {
    let mut env = TestEnv::new(manifests);
    let bad = SagaKey::new("acme", "s", "k-legacy");
    let mut batch = Batch::new();
    batch.put_saga_encoded(&bad, deep_record(200));
    env.core().store().commit(&batch).unwrap();
    // A fresh start: nothing cached.
    env.restart();

    let e1 = ev(&mut env, "k-legacy", serde_json::json!({"n": 1}));
    let good = ev(&mut env, "k-good", serde_json::json!({"n": 1}));
    let answers = apply_all(&mut env, vec![("k-legacy", e1), ("k-good", good)]);
    assert!(term_reason(&answers[0]).contains("cannot be read"), "{answers:?}");
    assert_eq!(answers[1], Some(ApplyOutcome::Ack));
    let letters = env.deadletters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].kind, DeadLetterKind::Poison);
    assert_eq!(letters[0].correlation_id.as_deref(), Some("k-legacy"));
    // The stored record is left as it was (an operator may still rescue it).
    let raw = env.core().store().read().unwrap().saga_raw(&bad).unwrap().map(<[u8]>::to_vec);
    assert_eq!(raw, Some(deep_record(200)));

    // Later events of the key are quarantined too, after a restart as well; the shard goes on.
    env.restart();
    let e2 = ev(&mut env, "k-legacy", serde_json::json!({"n": 2}));
    let good2 = ev(&mut env, "k-good", serde_json::json!({"n": 2}));
    let answers = apply_all(&mut env, vec![("k-legacy", e2), ("k-good", good2)]);
    assert!(term_reason(&answers[0]).contains("cannot be read"), "{answers:?}");
    assert_eq!(answers[1], Some(ApplyOutcome::Ack));
    assert_eq!(env.state("s", "k-good")["seen"], serde_json::json!([1, 2]));

    // An operator action on the key is refused, writes nothing, and holds nothing up.
    let answer = env.admin(AdminOp::Requeue { key: bad.clone(), skip_poison: false });
    assert!(matches!(answer, Err(AdminError::UnreadableInstance { ref key, .. }) if *key == bad), "{answer:?}");
    assert_eq!(env.deadletters().len(), 2);
    let good3 = ev(&mut env, "k-good", serde_json::json!({"n": 3}));
    assert_eq!(apply_all(&mut env, vec![("k-good", good3)]), vec![Some(ApplyOutcome::Ack)]);
}

#[test]
fn a_state_at_the_depth_limit_is_kept_and_reads_back_one_past_it_is_refused() {
    let mut env = TestEnv::new(manifests);
    // `deep: n` builds n + 1 levels.
    let at_limit = ev(&mut env, "k-64", serde_json::json!({"deep": 63}));
    let past = ev(&mut env, "k-65", serde_json::json!({"deep": 64}));
    let answers = apply_all(&mut env, vec![("k-64", at_limit), ("k-65", past)]);
    assert_eq!(answers[0], Some(ApplyOutcome::Ack));
    assert!(term_reason(&answers[1]).contains("deeper than 64 levels"), "{answers:?}");
    env.restart();
    let next = ev(&mut env, "k-64", serde_json::json!({"n": 1}));
    assert_eq!(apply_all(&mut env, vec![("k-64", next)]), vec![Some(ApplyOutcome::Ack)]);
    assert_eq!(env.record("s", "k-64").unwrap().version, 2);
}
