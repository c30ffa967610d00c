//! SIGKILL during a partition move, then a restart: every key ends up present exactly once,
//! in the env of the shard that owns it.

use shards::keys::{EffectKey, SagaKey};
use shards::layout::{DataDir, shard_path};
use shards::record::{EffectRecord, InstanceStatus, SagaRecord};
use shards::store::{Batch, Db, Durability, StoreConfig};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const N: usize = 20_000;

fn cfg() -> StoreConfig {
    StoreConfig { durability: Durability::Fsync, ..StoreConfig::default() }
}

fn record(i: usize) -> SagaRecord {
    SagaRecord {
        status: InstanceStatus::Running,
        last_seq: BTreeMap::new(),
        outstanding: Default::default(),
        version: i as u64,
        created_at: 0,
        updated_at: 0,
        parked: None,
        traceparent: None,
        applied: vec![],
        history: Default::default(),
        replay_step: None,
        timers: None,
        state: serde_json::value::to_raw_value(&serde_json::json!({ "i": i, "pad": "x".repeat(200) })).unwrap(),
    }
}

fn fill(root: &Path, shards: usize) {
    let d = DataDir::prepare(root, 128, shards, &cfg(), |_| {}).unwrap();
    let r = d.router();
    let mut batches: Vec<Batch> = (0..shards).map(|_| Batch::new()).collect();
    for i in 0..N {
        let k = SagaKey::new(format!("t{}", i % 5), "order", format!("o-{i}"));
        batches[r.shard(&k.tenant, k.route())].put_saga(&k, &record(i));
        let e = EffectKey::new(format!("t{}", i % 5), format!("c-{i}"));
        batches[r.shard(&e.tenant, e.route())].put_effect(&e, &EffectRecord::Started { attempts: 1, updated_at: 0 });
    }
    for (s, b) in batches.iter().enumerate() {
        d.open_store(s, &cfg()).unwrap().commit(b).unwrap();
    }
}

fn verify(root: &Path, shards: usize) {
    let d = DataDir::prepare(root, 128, shards, &cfg(), |_| {}).unwrap();
    let r = d.router();
    let mut sagas = BTreeMap::<SagaKey, usize>::new();
    let mut effects = BTreeMap::<EffectKey, usize>::new();
    for s in 0..shards {
        let store = d.open_store(s, &cfg()).unwrap();
        let v = store.read().unwrap();
        v.for_each_raw(Db::Sagas, |k, val| {
            let key = SagaKey::decode(k).unwrap();
            assert_eq!(r.shard(&key.tenant, key.route()), s, "{key} read from the wrong shard");
            let rec: SagaRecord = serde_json::from_slice(val).unwrap();
            let i: usize = key.correlation_id[2..].parse().unwrap();
            assert_eq!(rec.version, i as u64, "{key} has another key's value");
            *sagas.entry(key).or_default() += 1;
            Ok(())
        })
        .unwrap();
        v.for_each_raw(Db::Effects, |k, _| {
            let key = EffectKey::decode(k).unwrap();
            assert_eq!(r.shard(&key.tenant, key.route()), s);
            *effects.entry(key).or_default() += 1;
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(sagas.len(), N, "saga instances lost");
    assert_eq!(effects.len(), N, "effect records lost");
    assert!(sagas.values().chain(effects.values()).all(|&c| c == 1), "a key is present twice");
    assert!(!shard_path(root, shards).exists(), "an env above the shard count is left");
}

/// Runs `shard-move DIR SHARDS` and SIGKILLs it after `kill_after_lines` progress lines
/// plus `extra` of wall time. Returns whether the kill landed before the move finished.
fn run_and_kill(root: &Path, shards: usize, kill_after_lines: usize, extra: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shard-move"))
        .arg(root)
        .arg(shards.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while seen.len() < kill_after_lines {
        match lines.next() {
            Some(Ok(l)) => seen.push(l),
            _ => break,
        }
    }
    let deadline = Instant::now() + extra;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::yield_now();
    }
    let finished_before_kill = child.try_wait().unwrap().is_some_and(|s| s.success());
    // SIGKILL: no destructors, no flushes.
    let _ = child.kill();
    let status = child.wait().unwrap();
    !finished_before_kill && !status.success()
}

#[test]
fn sigkill_at_many_points_during_a_move_then_restart_keeps_every_key_exactly_once() {
    let mut kills = 0;
    // (progress lines to wait for, then extra time) — spreads kills across both phases.
    let points = [(0, 2), (1, 0), (1, 15), (2, 5), (3, 0), (4, 3), (5, 0), (6, 1)];
    for (lines, extra_ms) in points {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path(), 2);
        if run_and_kill(dir.path(), 3, lines, Duration::from_millis(extra_ms)) {
            kills += 1;
        }
        // Restart with the new count: the move resumes and completes.
        verify(dir.path(), 3);
        // And moving back down after that is clean too.
        let dir2 = dir.path();
        if run_and_kill(dir2, 1, lines, Duration::from_millis(extra_ms)) {
            kills += 1;
        }
        verify(dir2, 1);
    }
    assert!(kills >= 8, "only {kills} kills landed during a move; the test did not test much");
}
