//! Every table is bounded (invariant 12): completed effect-gate records are pruned after
//! their retention, in bounded slices.

use super::*;

const RETENTION_MS: u64 = 2_000;

fn env() -> TestEnv {
    let cfg = CoreConfig {
        effect_retention_ms: Some(RETENTION_MS),
        effect_sweep: 1_000,
        dispatch_attempts: Some(3),
        ..CoreConfig::default()
    };
    TestEnv::with_config(example_manifests, cfg)
}

fn effect_rows(env: &mut TestEnv) -> u64 {
    env.core().store().read().unwrap().stats().unwrap().effects
}

/// Runs `n` calls through the gate (`started`, then `completed`), `per_step` per step.
fn calls(env: &mut TestEnv, prefix: &str, n: usize, per_step: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(per_step) {
        let mut reqs = Vec::new();
        for i in chunk {
            let (tx, _rx) = reply_channel();
            let key = EffectKey::new("acme", format!("{prefix}-{i}"));
            reqs.push(Request::EffectBegin { key, msg_seq: *i as u64 + 1, reply: tx });
        }
        env.run(reqs).unwrap();
        let mut reqs = Vec::new();
        for i in chunk {
            let (tx, _rx) = reply_channel();
            let key = EffectKey::new("acme", format!("{prefix}-{i}"));
            let result =
                format!(r#"{{"command_id":"{prefix}-{i}","outcome":"succeeded","pad":"{}"}}"#, "x".repeat(900));
            reqs.push(Request::EffectFinish {
                key,
                attempts: 1,
                subject: "workflow.events.acme.e.succeeded".into(),
                outcome: "succeeded".into(),
                result: result.into_bytes(),
                reply: tx,
            });
        }
        env.run(reqs).unwrap();
    }
}

fn gate(env: &mut TestEnv, command_id: &str) -> GateDecision {
    let (tx, mut rx) = reply_channel();
    env.run(vec![Request::EffectBegin { key: EffectKey::new("acme", command_id), msg_seq: 99, reply: tx }]).unwrap();
    rx.try_recv().unwrap().unwrap()
}

#[test]
fn completed_effect_records_are_pruned_after_their_retention_in_bounded_slices() {
    let mut env = env();
    calls(&mut env, "old", 10_000, 1_000);
    assert_eq!(effect_rows(&mut env), 10_000);
    // A call still running keeps its record whatever its age.
    assert_eq!(gate(&mut env, "running"), GateDecision::Run { attempt: 1 });

    // Within the retention nothing goes, however many slices run.
    for _ in 0..30 {
        env.now += 60;
        env.tick();
    }
    assert_eq!(effect_rows(&mut env), 10_001);

    // Past it: the rows fall back, never more than one slice per step; calls completed
    // since stay. A deadline on the shard's own clock, not a sleep.
    env.now += RETENTION_MS;
    calls(&mut env, "fresh", 10, 10);
    let deadline = env.now + 60_000;
    let mut last = effect_rows(&mut env);
    while last > 11 {
        assert!(env.now < deadline, "still {last} effect records at the deadline");
        env.now += 100;
        env.tick();
        let rows = effect_rows(&mut env);
        assert!(last - rows <= 1_000, "one step pruned {} records, more than a slice", last - rows);
        last = rows;
    }
    assert_eq!(last, 11, "the running call and the fresh ones are kept");
    assert!(matches!(gate(&mut env, "fresh-3"), GateDecision::Completed { .. }));
    assert_eq!(gate(&mut env, "running"), GateDecision::Busy { same_message: true });
    // Past the horizon a command is new again (at least once; the streams' dedupe window is
    // far shorter than the retention).
    assert_eq!(gate(&mut env, "old-7"), GateDecision::Run { attempt: 1 });
}
