use super::*;
use crate::keys::DeadLetterKey;
use crate::record::{DeadLetterKind, EffectRecord};
use crate::store::Durability;

pub(crate) fn cfg() -> StoreConfig {
    StoreConfig { durability: Durability::NoSync, ..StoreConfig::default() }
}

#[test]
fn a_new_directory_records_partitions_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = DataDir::prepare(dir.path(), 64, 2, &cfg(), |_| {}).unwrap();
    assert_eq!(d.router().partitions(), 64);
    // A later run asking for another partition count keeps the recorded one.
    let d = DataDir::prepare(dir.path(), 256, 2, &cfg(), |_| {}).unwrap();
    assert_eq!(d.router().partitions(), 64);
    assert_eq!(DataDir::inspect(dir.path()).unwrap(), Some(LayoutFile { version: 1, partitions: 64, shards: 2 }));
}

#[test]
fn zero_shards_is_refused_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = DataDir::prepare(dir.path(), 64, 0, &cfg(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("setting: shards"), "{err}");
}

/// Writes `n` saga instances, effect records and dead letters, each into the env of the
/// shard that owns it under `shards` shards; returns the saga keys.
pub(crate) fn fill(root: &Path, partitions: u32, shards: usize, n: usize) {
    let d = DataDir::prepare(root, partitions, shards, &cfg(), |_| {}).unwrap();
    let stores: Vec<Store> = (0..shards).map(|i| d.open_store(i, &cfg()).unwrap()).collect();
    let mut batches: Vec<Batch> = (0..shards).map(|_| Batch::new()).collect();
    let r = d.router();
    for i in 0..n {
        let key = SagaKey::new(format!("t{}", i % 7), "order", format!("o-{i}"));
        let s = r.shard(&key.tenant, key.route());
        batches[s].put_raw(Db::Sagas, key.encode(), format!("{{\"i\":{i}}}").into_bytes());
        let ek = EffectKey::new(format!("t{}", i % 7), format!("c-{i}"));
        let s = r.shard(&ek.tenant, ek.route());
        batches[s].put_effect(&ek, &EffectRecord::Started { attempts: 1, updated_at: i as u64 });
        if i % 10 == 0 {
            let p = r.partition(&key.tenant, key.route());
            let letter = DeadLetter {
                id: format!("d-{i}"),
                kind: DeadLetterKind::Poison,
                partition: p,
                tenant: key.tenant.clone(),
                at: i as u64,
                error: "x".into(),
                saga: Some("order".into()),
                correlation_id: Some(key.correlation_id.clone()),
                stream: None,
                seq: 0,
                subject: None,
                headers: Default::default(),
                raw: None,
                event: None,
                work: None,
                attempts: 1,
            };
            let dk = DeadLetterKey { tenant: key.tenant.clone(), at: i as u64, id: letter.id.clone() };
            batches[r.shard_of_partition(p)].put_deadletter(&dk, &letter);
        }
    }
    for (s, b) in batches.iter().enumerate() {
        stores[s].commit(b).unwrap();
    }
}

/// Asserts every filled entry is present exactly once, in the env of its owning shard.
pub(crate) fn verify(root: &Path, n: usize) {
    let layout = DataDir::inspect(root).unwrap().unwrap();
    let d = DataDir::prepare(root, layout.partitions, layout.shards, &cfg(), |_| {}).unwrap();
    let r = d.router();
    let mut sagas = std::collections::BTreeMap::<Vec<u8>, usize>::new();
    let mut effects = std::collections::BTreeMap::<Vec<u8>, usize>::new();
    let mut letters = 0usize;
    for s in 0..layout.shards {
        let store = d.open_store(s, &cfg()).unwrap();
        let view = store.read().unwrap();
        view.for_each_raw(Db::Sagas, |k, _| {
            let key = SagaKey::decode(k).unwrap();
            assert_eq!(r.shard(&key.tenant, key.route()), s, "{key} in the wrong shard");
            *sagas.entry(k.to_vec()).or_default() += 1;
            Ok(())
        })
        .unwrap();
        view.for_each_raw(Db::Effects, |k, _| {
            let key = EffectKey::decode(k).unwrap();
            assert_eq!(r.shard(&key.tenant, key.route()), s);
            *effects.entry(k.to_vec()).or_default() += 1;
            Ok(())
        })
        .unwrap();
        view.for_each_raw(Db::DeadLetter, |_, v| {
            let l: DeadLetter = serde_json::from_slice(v).unwrap();
            assert_eq!(r.shard_of_partition(l.partition), s);
            letters += 1;
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(sagas.len(), n, "saga instances lost");
    assert!(sagas.values().all(|&c| c == 1), "a saga instance is present twice");
    assert_eq!(effects.len(), n, "effect records lost");
    assert!(effects.values().all(|&c| c == 1), "an effect record is present twice");
    assert_eq!(letters, n.div_ceil(10), "dead letters lost or doubled");
    for s in layout.shards..layout.shards + 4 {
        assert!(!shard_path(root, s).exists(), "env {s} left behind");
    }
    assert!(!root.join(MOVE_FILE).exists());
}

#[test]
fn changing_the_shard_count_moves_whole_partitions() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 64, 2, 3_000);
    verify(dir.path(), 3_000);
    let mut events = vec![];
    for shards in [3, 1, 4, 2] {
        DataDir::prepare(dir.path(), 64, shards, &cfg(), |p| events.push(p)).unwrap();
        assert_eq!(DataDir::inspect(dir.path()).unwrap().unwrap().shards, shards);
        verify(dir.path(), 3_000);
    }
    assert!(events.contains(&MoveProgress::Started { from: 2, to: 3 }));
    assert!(matches!(events.last(), Some(MoveProgress::Finished { moved }) if *moved > 0));
}

/// A move that dies after any of its steps (a panic out of the progress callback, so the
/// process goes on) is finished by the next start; the real SIGKILL version is in
/// `tests/reshard_kill.rs`.
#[test]
fn an_interrupted_move_resumes_from_any_step() {
    for stop_at in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path(), 32, 2, 1_000);
        let mut step = 0;
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DataDir::prepare(dir.path(), 32, 3, &cfg(), |_| {
                if step == stop_at {
                    panic!("simulated crash at step {step}");
                }
                step += 1;
            })
        }));
        // 8 steps: started, copied x3 envs, deleted x3 envs, finished.
        assert!(died.is_err(), "step {stop_at} was never reached");
        DataDir::prepare(dir.path(), 32, 3, &cfg(), |_| {}).unwrap();
        verify(dir.path(), 1_000);
        assert_eq!(DataDir::inspect(dir.path()).unwrap().unwrap().shards, 3);
    }
}

#[test]
fn a_move_interrupted_towards_one_count_then_started_with_another_ends_right() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 32, 2, 500);
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        DataDir::prepare(dir.path(), 32, 4, &cfg(), |p| {
            if matches!(p, MoveProgress::Copied { env: 1, .. }) {
                panic!("crash");
            }
        })
    }));
    assert!(died.is_err());
    DataDir::prepare(dir.path(), 32, 1, &cfg(), |_| {}).unwrap();
    verify(dir.path(), 500);
    assert_eq!(DataDir::inspect(dir.path()).unwrap().unwrap().shards, 1);
}
