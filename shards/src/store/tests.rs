use super::*;
use crate::record::{DeadLetterKind, InstanceStatus, Json, WorkKind};
use proptest::prelude::*;

fn json(s: &str) -> Json {
    serde_json::value::RawValue::from_string(s.to_owned()).unwrap()
}

fn open(dir: &Path, config: &StoreConfig) -> Store {
    Store::open(dir, 0, 16, config).unwrap()
}

fn saga_record(state: &str, version: u64) -> SagaRecord {
    SagaRecord {
        status: InstanceStatus::Running,
        last_seq: [("AGGREGATE_EVENTS".to_owned(), version)].into(),
        outstanding: Default::default(),
        version,
        created_at: 1,
        updated_at: 2,
        parked: None,
        traceparent: None,
        applied: vec![],
        history: Default::default(),
        replay_step: None,
        timers: None,
        state: json(state),
    }
}

fn outbox_item(id: &str) -> OutboxItem {
    OutboxItem {
        work_id: id.to_owned(),
        kind: WorkKind::Effect { effect: "charge".into() },
        tenant: "t".into(),
        saga: "order".into(),
        correlation_id: "o1".into(),
        traceparent: None,
        source_event_id: "e1".into(),
        payload: json(r#"{"amount":5}"#),
        created_at: 1,
        attempts: 0,
        next_attempt_at: 0,
        last_error: None,
        suppressed: false,
    }
}

fn schedule(name: &str) -> ScheduleEntry {
    ScheduleEntry {
        name: name.into(),
        payload: json("{}"),
        source_event_id: "e".into(),
        scheduled_at: 0,
        traceparent: None,
    }
}

fn letter(tenant: &str, at: u64, id: &str) -> (DeadLetterKey, DeadLetter) {
    (
        DeadLetterKey { tenant: tenant.into(), at, id: id.into() },
        DeadLetter {
            id: id.into(),
            kind: DeadLetterKind::Poison,
            partition: 1,
            tenant: tenant.into(),
            at,
            error: "boom".into(),
            saga: None,
            correlation_id: None,
            stream: None,
            seq: 0,
            subject: None,
            headers: Default::default(),
            raw: None,
            event: None,
            work: None,
            attempts: 1,
        },
    )
}

/// Everything readable from a store, as comparable text.
fn snapshot(store: &Store) -> Vec<(Db, Vec<u8>, Vec<u8>)> {
    let view = store.read().unwrap();
    let mut out = Vec::new();
    for db in Db::ALL {
        view.for_each_raw(db, |k, v| {
            out.push((db, k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    }
    out
}

#[test]
fn round_trips_every_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreConfig::default());
    let sk = SagaKey::new("t", "order", "o1");
    let ek = EffectKey::new("t", "cmd-1");
    let ck = CheckpointKey { tenant: "t".into(), saga: "order".into(), stream: "S".into() };
    let (dk, dl) = letter("t", 5, "d1");
    let mut b = Batch::new();
    b.put_saga(&sk, &saga_record(r#"{"step":"reserved"}"#, 3));
    b.put_outbox(OutboxKey { partition: 2, seq: 10 }, &outbox_item("w1"));
    b.put_outbox(OutboxKey { partition: 1, seq: 11 }, &outbox_item("w2"));
    b.put_schedule(&ScheduleKey { due_at: 100, saga: sk.clone(), timer_id: "a".into() }, &schedule("late"));
    b.put_schedule(&ScheduleKey { due_at: 50, saga: sk.clone(), timer_id: "b".into() }, &schedule("early"));
    b.put_effect(&ek, &EffectRecord::Started { attempts: 1, updated_at: 3 });
    b.advance_checkpoint(&ck, 7);
    b.advance_checkpoint(&ck, 4); // never lowers
    b.put_deadletter(&dk, &dl);
    store.commit(&b).unwrap();

    let v = store.read().unwrap();
    let rec = v.saga(&sk).unwrap().unwrap();
    assert_eq!(rec.state.get(), r#"{"step":"reserved"}"#);
    assert_eq!(rec.version, 3);
    assert!(matches!(v.effect(&ek).unwrap(), Some(EffectRecord::Started { attempts: 1, .. })));
    assert_eq!(v.checkpoint(&ck).unwrap(), Some(7));
    let outbox: Vec<_> = v.outbox(None, 10).unwrap().into_iter().map(|(k, i)| (k.partition, i.work_id)).collect();
    assert_eq!(outbox, vec![(1, "w2".to_owned()), (2, "w1".to_owned())]);
    assert_eq!(v.outbox(Some(OutboxKey { partition: 1, seq: 11 }), 10).unwrap().len(), 1);
    let due: Vec<_> = v.due_schedules(99, 10).unwrap().into_iter().map(|(_, e)| e.name).collect();
    assert_eq!(due, vec!["early"]);
    let due: Vec<_> = v.due_schedules(100, 10).unwrap().into_iter().map(|(_, e)| e.name).collect();
    assert_eq!(due, vec!["early", "late"]);
    assert_eq!(v.next_due().unwrap(), Some(50));
    assert_eq!(v.deadletters("t", None, 10).unwrap().len(), 1);
    assert_eq!(v.deadletters("", None, 10).unwrap().len(), 0);
    assert_eq!(v.max_outbox_seq().unwrap(), 11);
    let stats = v.stats().unwrap();
    assert_eq!(
        (stats.sagas, stats.outbox, stats.schedules, stats.effects, stats.checkpoints, stats.deadletters),
        (1, 2, 2, 1, 1, 1)
    );
    drop(v);

    let mut b = Batch::new();
    b.delete_outbox(OutboxKey { partition: 2, seq: 10 });
    b.delete_schedule(&ScheduleKey { due_at: 50, saga: sk.clone(), timer_id: "b".into() });
    b.delete_deadletter(&dk);
    store.commit(&b).unwrap();
    let v = store.read().unwrap();
    assert_eq!(v.outbox(None, 10).unwrap().len(), 1);
    assert_eq!(v.next_due().unwrap(), Some(100));
    assert!(v.deadletters("t", None, 10).unwrap().is_empty());
}

#[test]
fn deadletters_list_per_tenant_in_time_order_with_paging() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreConfig::default());
    let mut b = Batch::new();
    for (t, at, id) in [("a", 30, "x"), ("a", 10, "y"), ("ab", 5, "z"), ("a", 20, "w")] {
        let (k, l) = letter(t, at, id);
        b.put_deadletter(&k, &l);
    }
    store.commit(&b).unwrap();
    let v = store.read().unwrap();
    let ids: Vec<_> = v.deadletters("a", None, 10).unwrap().into_iter().map(|(k, _)| k.id).collect();
    assert_eq!(ids, ["y", "w", "x"]);
    let first = v.deadletters("a", None, 1).unwrap();
    let next: Vec<_> = v.deadletters("a", Some(&first[0].0), 10).unwrap().into_iter().map(|(k, _)| k.id).collect();
    assert_eq!(next, ["w", "x"]);
}

#[test]
fn refuses_another_shards_environment() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), 1, 16, &StoreConfig::default()).unwrap());
    let err = Store::open(dir.path(), 0, 16, &StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StoreError::WrongEnv { found: 1, shard: 0, .. }), "{err}");
    let err = Store::open(dir.path(), 1, 32, &StoreConfig::default()).unwrap_err();
    assert!(err.to_string().contains("16 partitions"), "{err}");
}

#[test]
fn the_map_grows_itself_and_names_the_setting_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { durability: Durability::NoSync, initial_map_size: 256 << 10, max_map_size: 8 << 20 };
    let store = open(dir.path(), &config);
    let start = store.map_size();
    let value = "x".repeat(1000);
    // ~2 MiB in batches of 100 records: far above the initial 256 KiB map.
    for round in 0..20 {
        let mut b = Batch::new();
        for i in 0..100 {
            b.put_saga(&SagaKey::new("t", "s", format!("{round}-{i}")), &saga_record(&format!("\"{value}\""), 1));
        }
        store.commit(&b).unwrap();
    }
    assert!(store.map_size() > start, "map did not grow");
    assert_eq!(store.read().unwrap().stats().unwrap().sagas, 2000);

    // Now exceed the 8 MiB ceiling: the error names shard, path and setting.
    let mut err = None;
    for round in 0..40 {
        let mut b = Batch::new();
        for i in 0..200 {
            b.put_saga(&SagaKey::new("t", "big", format!("{round}-{i}")), &saga_record(&format!("\"{value}\""), 1));
        }
        if let Err(e) = store.commit(&b) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("the map limit was never reached");
    let msg = err.to_string();
    assert!(matches!(err, StoreError::MapFull { shard: 0, .. }), "{msg}");
    assert!(msg.contains("storage.max_map_size") && msg.contains(&dir.path().display().to_string()), "{msg}");
    // The failed batch left nothing behind and the store still works.
    assert_eq!(store.read().unwrap().stats().unwrap().sagas % 200, 0);
    let mut b = Batch::new();
    b.put_saga(&SagaKey::new("t", "s", "after"), &saga_record("1", 1));
    store.commit(&b).unwrap();
}

#[test]
fn reopening_keeps_data_and_a_grown_map() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { durability: Durability::Fsync, initial_map_size: 128 << 10, max_map_size: 64 << 20 };
    {
        let store = open(dir.path(), &config);
        let mut b = Batch::new();
        for i in 0..500 {
            b.put_saga(&SagaKey::new("t", "s", i.to_string()), &saga_record(&format!("\"{}\"", "y".repeat(900)), 1));
        }
        store.commit(&b).unwrap();
    }
    let store = open(dir.path(), &config);
    assert_eq!(store.read().unwrap().stats().unwrap().sagas, 500);
}

#[derive(Debug, Clone)]
enum TestOp {
    PutSaga(u8, u8),
    DelSaga(u8),
    PutOutbox(u8),
    DelOutbox(u8),
    PutSchedule(u8),
    DelSchedule(u8),
    PutEffect(u8),
    Advance(u8, u64),
    PutLetter(u8),
    DelLetter(u8),
}

fn test_op() -> impl Strategy<Value = TestOp> {
    prop_oneof![
        (0u8..8, any::<u8>()).prop_map(|(k, v)| TestOp::PutSaga(k, v)),
        (0u8..8).prop_map(TestOp::DelSaga),
        (0u8..8).prop_map(TestOp::PutOutbox),
        (0u8..8).prop_map(TestOp::DelOutbox),
        (0u8..8).prop_map(TestOp::PutSchedule),
        (0u8..8).prop_map(TestOp::DelSchedule),
        (0u8..8).prop_map(TestOp::PutEffect),
        (0u8..4, 0u64..100).prop_map(|(k, s)| TestOp::Advance(k, s)),
        (0u8..8).prop_map(TestOp::PutLetter),
        (0u8..8).prop_map(TestOp::DelLetter),
    ]
}

fn to_batch(ops: &[TestOp]) -> Batch {
    let mut b = Batch::new();
    for op in ops {
        match *op {
            TestOp::PutSaga(k, v) => {
                b.put_saga(&SagaKey::new("t", "s", k.to_string()), &saga_record(&v.to_string(), u64::from(v)))
            }
            TestOp::DelSaga(k) => b.delete_saga(&SagaKey::new("t", "s", k.to_string())),
            TestOp::PutOutbox(k) => {
                b.put_outbox(OutboxKey { partition: u32::from(k % 3), seq: u64::from(k) }, &outbox_item(&k.to_string()))
            }
            TestOp::DelOutbox(k) => b.delete_outbox(OutboxKey { partition: u32::from(k % 3), seq: u64::from(k) }),
            TestOp::PutSchedule(k) => b.put_schedule(
                &ScheduleKey { due_at: u64::from(k) * 7, saga: SagaKey::new("t", "s", "x"), timer_id: k.to_string() },
                &schedule("n"),
            ),
            TestOp::DelSchedule(k) => b.delete_schedule(&ScheduleKey {
                due_at: u64::from(k) * 7,
                saga: SagaKey::new("t", "s", "x"),
                timer_id: k.to_string(),
            }),
            TestOp::PutEffect(k) => {
                b.put_effect(&EffectKey::new("t", k.to_string()), &EffectRecord::Started { attempts: 1, updated_at: 0 })
            }
            TestOp::Advance(k, s) => {
                b.advance_checkpoint(&CheckpointKey { tenant: "t".into(), saga: k.to_string(), stream: "S".into() }, s)
            }
            TestOp::PutLetter(k) => {
                let (key, l) = letter("t", u64::from(k), "d");
                b.put_deadletter(&key, &l)
            }
            TestOp::DelLetter(k) => b.delete_deadletter(&letter("t", u64::from(k), "d").0),
        }
    }
    b
}

#[test]
fn an_outbox_walk_decodes_at_most_what_was_asked_and_resumes_after_its_last_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreConfig::default());
    let mut b = Batch::new();
    for seq in 1..=10 {
        b.put_outbox(OutboxKey { partition: 0, seq }, &outbox_item(&seq.to_string()));
    }
    store.commit(&b).unwrap();
    let v = store.read().unwrap();
    let odd = |k: &OutboxKey| k.seq % 2 == 1;
    let (page, last, done) = v.outbox_where(std::ops::Bound::Unbounded, 100, 2, odd).unwrap();
    assert_eq!(page.iter().map(|(k, _)| k.seq).collect::<Vec<_>>(), [1, 3]);
    assert_eq!((last.map(|k| k.seq), done), (Some(3), false));
    let from = std::ops::Bound::Excluded(last.unwrap());
    let (page, last, done) = v.outbox_where(from, 100, 100, odd).unwrap();
    assert_eq!(page.iter().map(|(k, _)| k.seq).collect::<Vec<_>>(), [5, 7, 9]);
    assert_eq!((last.map(|k| k.seq), done), (Some(10), true));
    // A walk that stops exactly at the last key still reports the end.
    let (page, _, done) = v.outbox_where(std::ops::Bound::Unbounded, 10, 100, |_| true).unwrap();
    assert_eq!((page.len(), done), (10, true));
    let (_, _, done) = v.outbox_where(std::ops::Bound::Unbounded, 9, 100, |_| true).unwrap();
    assert!(!done);
}

#[test]
fn advances_of_one_checkpoint_in_a_batch_are_one_write_until_the_checkpoint_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreConfig::default());
    let ck = CheckpointKey { tenant: "t".into(), saga: "order".into(), stream: "S".into() };
    let other = CheckpointKey { stream: "T".into(), ..ck.clone() };
    let mut b = Batch::new();
    for seq in (1..=1000).rev() {
        b.advance_checkpoint(&ck, seq);
        b.advance_checkpoint(&other, seq + 5);
    }
    assert_eq!(b.len(), 2, "one op per checkpoint key");
    store.commit(&b).unwrap();
    assert_eq!(store.read().unwrap().checkpoint(&ck).unwrap(), Some(1000));
    assert_eq!(store.read().unwrap().checkpoint(&other).unwrap(), Some(1005));

    // In order: raised to 2000, set down to 3, raised to 5. Merging the last advance into
    // the first would end at 3 (or 2000); it must end at 5.
    let mut b = Batch::new();
    b.advance_checkpoint(&ck, 2000);
    b.set_checkpoint(&ck, 3);
    b.advance_checkpoint(&ck, 5);
    b.advance_checkpoint(&ck, 4);
    assert_eq!(b.len(), 3);
    store.commit(&b).unwrap();
    assert_eq!(store.read().unwrap().checkpoint(&ck).unwrap(), Some(5));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A commit writes everything in it or nothing: a failure injected after any number of
    /// writes inside the transaction leaves the store exactly as before; the same batch
    /// without the failure then lands whole.
    #[test]
    fn a_commit_is_all_or_nothing(
        before in prop::collection::vec(test_op(), 0..30),
        batch in prop::collection::vec(test_op(), 1..40),
        fail_at in 0usize..45,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), &StoreConfig { durability: Durability::NoSync, ..StoreConfig::default() });
        store.commit(&to_batch(&before)).unwrap();
        let snap = snapshot(&store);

        let b = to_batch(&batch);
        store.inject_commit_failure_after(fail_at);
        let err = store.commit(&b).unwrap_err();
        let injected = matches!(err, StoreError::Injected { .. });
        prop_assert!(injected, "unexpected error {}", err);
        prop_assert_eq!(snapshot(&store), snap);

        // Reference: the same ops applied to a fresh store in one commit after `before`.
        let reference_dir = tempfile::tempdir().unwrap();
        let reference = open(reference_dir.path(), &StoreConfig { durability: Durability::NoSync, ..StoreConfig::default() });
        let mut all = to_batch(&before);
        all.extend(to_batch(&batch));
        reference.commit(&all).unwrap();

        store.commit(&b).unwrap();
        prop_assert_eq!(snapshot(&store), snapshot(&reference));
    }
}

#[test]
fn a_read_only_view_sees_committed_data_and_refuses_a_missing_env() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &StoreConfig::default());
    let mut b = Batch::new();
    b.put_saga(&SagaKey::new("t", "s", "c"), &saga_record("1", 1));
    store.commit(&b).unwrap();
    // A stopped runner (heed opens an env once per process; a running one is another process).
    drop(store);
    let ro = Store::open_read_only(dir.path(), 0).unwrap();
    assert_eq!(ro.partitions(), 16);
    assert_eq!(ro.read().unwrap().stats().unwrap().sagas, 1);
    let mut b = Batch::new();
    b.put_saga(&SagaKey::new("t", "s", "x"), &saga_record("3", 1));
    assert!(ro.commit(&b).is_err(), "a read-only store wrote");
    let err = Store::open_read_only(&dir.path().join("nope"), 3).unwrap_err();
    assert!(err.to_string().contains("shard 3"), "{err}");
}

fn fsync() -> StoreConfig {
    StoreConfig { durability: Durability::Fsync, ..StoreConfig::default() }
}

#[test]
fn a_commit_the_flusher_did_not_finish_is_discarded_at_open_and_a_flushed_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let key = |n: &str| SagaKey::new("t", "order", n);
    {
        let store = open(dir.path(), &fsync());
        let mut b = Batch::new();
        b.put_saga(&key("flushed"), &saga_record("1", 1));
        let info = store.commit_unflushed(&b).unwrap();
        let txn = info.unflushed.expect("fsync mode leaves the flush to the caller");
        store.flusher().unwrap().flush(txn).unwrap();
        // Visible at once, before (and whether or not) it is flushed.
        let mut b = Batch::new();
        b.put_saga(&key("unflushed"), &saga_record("2", 1));
        store.commit_unflushed(&b).unwrap();
        assert!(store.read().unwrap().saga(&key("unflushed")).unwrap().is_some());
        // The process ends before the flusher recorded it (a crash during its flush).
    }
    let store = open(dir.path(), &fsync());
    let v = store.read().unwrap();
    assert!(v.saga(&key("flushed")).unwrap().is_some(), "a flushed commit was lost");
    assert!(v.saga(&key("unflushed")).unwrap().is_none(), "a commit not known to be on disk was kept");
    drop(v);
    // The store goes on from the durable snapshot: new commits land and are kept.
    let mut b = Batch::new();
    b.put_saga(&key("after"), &saga_record("3", 1));
    store.commit(&b).unwrap();
    drop(store);
    let store = open(dir.path(), &fsync());
    assert!(store.read().unwrap().saga(&key("after")).unwrap().is_some());
    assert!(store.read().unwrap().saga(&key("flushed")).unwrap().is_some());
}

#[test]
fn a_marker_that_does_not_match_the_environment_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), &fsync()));
    std::fs::write(dir.path().join("durable"), 9_999u64.to_be_bytes()).unwrap();
    let err = Store::open(dir.path(), 0, 16, &fsync()).unwrap_err();
    assert!(matches!(err, StoreError::Marker { marker: 9_999, .. }), "{err}");
    assert!(err.to_string().contains("durable"), "{err}");
    // An unsafe mode drops the marker (it promises nothing about the disk); fsync then
    // starts over from what is there.
    drop(open(dir.path(), &StoreConfig { durability: Durability::NoSync, ..StoreConfig::default() }));
    assert!(!dir.path().join("durable").exists());
    drop(open(dir.path(), &fsync()));
}

#[test]
fn a_crashed_process_s_unflushed_commit_is_discarded_at_open() {
    // The writer is a child process that dies without closing the environment (as a
    // SIGKILL leaves it: lock file and page cache as they were): this test binary run again
    // for this test alone, which finds the directory in its environment. (A fork of the
    // multi-threaded test process could deadlock in the child on a lock another test thread
    // held.)
    const CHILD_DIR: &str = "RUNNER_STORE_TEST_WRITER_DIR";
    let key = |n: &str| SagaKey::new("t", "order", n);
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        let dir = std::path::PathBuf::from(dir);
        let store = open(&dir, &fsync());
        let mut b = Batch::new();
        b.put_saga(&key("kept"), &saga_record("1", 1));
        b.put_saga(&key("deleted-later"), &saga_record("1", 1));
        store.commit(&b).unwrap();
        let mut b = Batch::new();
        b.delete_saga(&key("deleted-later"));
        b.put_saga(&key("unflushed"), &saga_record("2", 1));
        store.commit_unflushed(&b).unwrap();
        // SAFETY: ends the child at once, without closing the environment.
        unsafe { libc::_exit(0) };
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::a_crashed_process_s_unflushed_commit_is_discarded_at_open",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the writer process failed: {status}");
    let store = open(dir.path(), &fsync());
    let v = store.read().unwrap();
    assert!(v.saga(&key("kept")).unwrap().is_some());
    assert!(v.saga(&key("deleted-later")).unwrap().is_some(), "the unflushed delete survived the crash");
    assert!(v.saga(&key("unflushed")).unwrap().is_none(), "the unflushed put survived the crash");
    drop(v);
    // After the recovery, a commit is seen by the next read at once (LMDB's previous-snapshot
    // mode once showed readers the older snapshot after the first commit).
    let mut b = Batch::new();
    b.delete_saga(&key("kept"));
    store.commit_unflushed(&b).unwrap();
    assert!(store.read().unwrap().saga(&key("kept")).unwrap().is_none(), "a read missed the last commit");
}
