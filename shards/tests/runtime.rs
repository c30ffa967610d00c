//! N shards on N glommio executors, each committing to its own env concurrently; an ordered
//! shutdown that commits what was accepted; a restart (also with another shard count)
//! that reads everything back from the right shard.

use futures_lite::future::block_on;
use shards::clock;
use shards::keys::SagaKey;
use shards::layout::DataDir;
use shards::manifest::ManifestSet;
use shards::message::{
    ApplyOutcome, Control, DispatchOutcome, DispatchResult, Event, Query, Reply, Request, ShardError, Target,
    reply_channel,
};
use shards::runtime::{Pinning, RuntimeConfig, ShardRuntime};
use shards::store::{Db, Durability};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROGRAM: &str = r#"
fn on_event(state, event) {
    let s = if state == () { #{ seen: [] } } else { state };
    s.seen.push(event.data.n);
    #{ state: s, work: [ #{ effect: "note", payload: #{ n: event.data.n } } ] }
}
"#;

fn manifests(dir: &Path) -> Arc<ManifestSet> {
    std::fs::write(dir.join("p.rhai"), PROGRAM).unwrap();
    std::fs::write(
        dir.join("m.yaml"),
        "sagas:\n  - name: s\n    program: p.rhai\n    triggers:\n      - { subject: \"events.>\", correlation: data.k, may_start: true }\neffects:\n  - { name: note, provider: noop }\n",
    )
    .unwrap();
    Arc::new(ManifestSet::load(&[dir.join("m.yaml")], &shards::program::check_program).unwrap())
}

/// A shard that holds its thread this long without yielding fails the test.
const STALL: Duration = Duration::from_millis(100);

fn config() -> RuntimeConfig {
    let mut cfg = RuntimeConfig { pinning: Pinning::None, stall_threshold: Some(STALL), ..RuntimeConfig::default() };
    cfg.shard.store.durability = Durability::NoSync;
    cfg
}

struct Running {
    rt: ShardRuntime,
    bridge: std::thread::JoinHandle<u64>,
}

/// Starts the runtime and a fake bridge that confirms every dispatch.
fn start(data: &DataDir, set: Arc<ManifestSet>) -> Running {
    start_with(&config(), data, set)
}

fn start_with(cfg: &RuntimeConfig, data: &DataDir, set: Arc<ManifestSet>) -> Running {
    let (dispatch_tx, dispatch_rx) = flume::bounded(64);
    let rt = ShardRuntime::start(cfg, data, set, clock::system(), dispatch_tx).unwrap();
    let handles = rt.handles().to_vec();
    let bridge = std::thread::spawn(move || {
        let mut confirmed = 0;
        while let Ok(req) = dispatch_rx.recv() {
            confirmed += req.items.len() as u64;
            let results = req
                .items
                .into_iter()
                .map(|d| DispatchResult { key: d.key, send: d.send, outcome: DispatchOutcome::Delivered })
                .collect();
            let _ = handles[req.shard].control(Control::Dispatched(results));
        }
        confirmed
    });
    Running { rt, bridge }
}

fn event(k: usize, n: usize, seq: u64) -> Arc<Event> {
    Arc::new(Event {
        id: format!("e-{seq}"),
        event_type: "Happened".into(),
        stream: "S".into(),
        seq,
        subject: "events.t.thing.Happened".into(),
        tenant: "t".into(),
        timestamp: 1_700_000_000_000,
        data: serde_json::json!({ "k": format!("k{k}"), "n": n }),
        traceparent: None,
        result: None,
        headers: Default::default(),
    })
}

fn query<T>(rt: &ShardRuntime, shard: usize, q: impl FnOnce(Reply<Result<T, ShardError>>) -> Query) -> T {
    let (tx, rx) = reply_channel();
    rt.handle(shard).send_blocking(Request::Query(q(tx))).unwrap();
    block_on(rx).unwrap().unwrap()
}

fn stats(rt: &ShardRuntime, shard: usize) -> shards::message::ShardStats {
    query(rt, shard, |reply| Query::Stats { reply })
}

fn saga(rt: &ShardRuntime, shard: usize, key: &SagaKey) -> Option<serde_json::Value> {
    let key = key.clone();
    query(rt, shard, |reply| Query::Saga { key, reply }).map(|v| serde_json::to_value(v).unwrap())
}

fn wait_outbox_empty(rt: &ShardRuntime) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let depth: u64 = (0..rt.router().shards()).map(|s| stats(rt, s).store.outbox).sum();
        if depth == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "outbox never drained ({depth} left)");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const KEYS: usize = 200;
const PER_KEY: usize = 10;

#[test]
fn shards_commit_concurrently_shut_down_in_order_and_restart_with_every_key_in_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let set = manifests(dir.path());
    let root = dir.path().join("data");
    let cfg = config();
    let data = DataDir::prepare(&root, 64, 3, &cfg.shard.store, |_| {}).unwrap();
    let run = start(&data, set.clone());
    let router = run.rt.router();

    // Send everything without waiting, interleaving keys; then wait for every answer.
    let mut replies = Vec::new();
    let mut seq = 0;
    for n in 0..PER_KEY {
        for k in 0..KEYS {
            seq += 1;
            let cid = format!("k{k}");
            let shard = router.shard("t", SagaKey::new("t", "s", &cid).route());
            let (tx, rx) = reply_channel();
            let target = Target { saga: "s".into(), correlation_id: cid, may_start: true };
            run.rt
                .handle(shard)
                .send_blocking(Request::Apply { event: event(k, n, seq), targets: vec![target], reply: tx })
                .unwrap();
            replies.push(rx);
        }
    }
    for rx in replies {
        assert_eq!(block_on(rx), Ok(ApplyOutcome::Ack));
    }
    // Every shard took part.
    for s in 0..3 {
        assert!(stats(&run.rt, s).store.sagas > 20, "shard {s} got too few keys");
    }
    wait_outbox_empty(&run.rt);
    assert_eq!(run.rt.stalls(), 0, "a shard held its thread past {STALL:?}");
    run.rt.shutdown();
    assert_eq!(run.bridge.join().unwrap(), (KEYS * PER_KEY) as u64, "each outbox item dispatched once");

    // Restart with 2 shards: partitions move, every key is read back from its shard.
    let data = DataDir::prepare(&root, 64, 2, &cfg.shard.store, |_| {}).unwrap();
    let run = start(&data, set.clone());
    let router = run.rt.router();
    assert_eq!(router.shards(), 2);
    for k in 0..KEYS {
        let key = SagaKey::new("t", "s", format!("k{k}"));
        let shard = router.shard("t", key.route());
        let v = saga(&run.rt, shard, &key).unwrap();
        let expected: Vec<usize> = (0..PER_KEY).collect();
        assert_eq!(v["state"]["seen"], serde_json::json!(expected), "{key}");
        assert_eq!(v["version"], PER_KEY as u64);
        let other = 1 - shard;
        assert_eq!(saga(&run.rt, other, &key), None, "a key in two shards");
    }
    assert_eq!(run.rt.stalls(), 0, "a shard held its thread past {STALL:?}");
    run.rt.shutdown();
    run.bridge.join().unwrap();

    // The envs themselves agree: each holds only keys of its own shard.
    for s in 0..2 {
        let store = data.open_store(s, &cfg.shard.store).unwrap();
        let v = store.read().unwrap();
        let mut n = 0;
        v.for_each_raw(Db::Sagas, |k, _| {
            let key = SagaKey::decode(k).unwrap();
            assert_eq!(router.shard(&key.tenant, key.route()), s);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert!(n > 0);
    }
}

#[test]
fn shutdown_lets_shards_commit_everything_they_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let set = manifests(dir.path());
    // With the production durability: the last batches' flushes finish before the answers.
    let mut cfg = config();
    cfg.shard.store.durability = Durability::Fsync;
    let data = DataDir::prepare(&dir.path().join("data"), 16, 2, &cfg.shard.store, |_| {}).unwrap();
    let run = start_with(&cfg, &data, set);
    let router = run.rt.router();
    let mut replies = Vec::new();
    for i in 0..2_000 {
        let cid = format!("k{}", i % 50);
        let shard = router.shard("t", SagaKey::new("t", "s", &cid).route());
        let (tx, rx) = reply_channel();
        let target = Target { saga: "s".into(), correlation_id: cid, may_start: true };
        run.rt
            .handle(shard)
            .send_blocking(Request::Apply { event: event(i % 50, i, i as u64 + 1), targets: vec![target], reply: tx })
            .unwrap();
        replies.push(rx);
    }
    // Stop at once: what is in the inboxes is still committed and answered.
    assert_eq!(run.rt.stalls(), 0, "a shard held its thread past {STALL:?}");
    run.rt.shutdown();
    let acked = replies.into_iter().map(block_on).filter(|r| *r == Ok(ApplyOutcome::Ack)).count();
    assert_eq!(acked, 2_000);
    run.bridge.join().unwrap();
    let total: u64 = (0..2)
        .map(|s| {
            let store = data.open_store(s, &cfg.shard.store).unwrap();
            let v = store.read().unwrap();
            let mut versions = 0;
            v.for_each_raw(Db::Sagas, |_, val| {
                versions += serde_json::from_slice::<serde_json::Value>(val).unwrap()["version"].as_u64().unwrap();
                Ok(())
            })
            .unwrap();
            versions
        })
        .sum();
    assert_eq!(total, 2_000, "transitions lost at shutdown");
}

#[test]
fn a_shard_that_holds_its_thread_past_the_threshold_is_counted_as_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spin.rhai"),
        "fn on_event(state, event) {\n  let n = 0;\n  while n < event.data.spin { n += 1; }\n  #{ state: n }\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        "sagas:\n  - name: s\n    program: spin.rhai\n    gas: 1000000000\n    max_wall_ms: 60000\n    triggers:\n      - { subject: \"events.>\", correlation: data.k, may_start: true }\neffects: []\n",
    )
    .unwrap();
    let set = Arc::new(ManifestSet::load(&[dir.path().join("m.yaml")], &shards::program::check_program).unwrap());
    let mut cfg = config();
    cfg.stall_threshold = Some(Duration::from_millis(20));
    let data = DataDir::prepare(&dir.path().join("data"), 4, 1, &cfg.shard.store, |_| {}).unwrap();
    let (dispatch_tx, _dispatch_rx) = flume::bounded(64);
    let rt = ShardRuntime::start(&cfg, &data, set, clock::system(), dispatch_tx).unwrap();
    let quick = |rt: &ShardRuntime, spin: u64, seq: u64| {
        let mut e = (*event(0, 0, seq)).clone();
        e.data = serde_json::json!({ "k": format!("k{seq}"), "spin": spin });
        let (tx, rx) = reply_channel();
        let target = Target { saga: "s".into(), correlation_id: format!("k{seq}"), may_start: true };
        rt.handle(0).send_blocking(Request::Apply { event: Arc::new(e), targets: vec![target], reply: tx }).unwrap();
        assert_eq!(block_on(rx), Ok(ApplyOutcome::Ack));
    };
    quick(&rt, 1, 1);
    assert_eq!(rt.stalls(), 0, "a one-step program counted as a stall");
    // A program that spins for a good while inside one batch holds the thread.
    let started = Instant::now();
    quick(&rt, 3_000_000, 2);
    assert!(started.elapsed() > Duration::from_millis(40), "the program did not spin long enough to tell");
    assert!(rt.stalls() >= 1, "the stall was not counted");
    rt.shutdown();
}
