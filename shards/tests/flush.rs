//! A shard never answers for a batch before it is on disk, and never waits for the disk
//! itself: with a batch's flush held (failpoint `store.flush` paused on the flusher thread),
//! no ack, dispatch or answer of that batch leaves, while the shard decides the next batch
//! and answers queries. Its own test binary: failpoints are process-wide.
#![cfg(feature = "failpoints")]

use futures_lite::future::block_on;
use shards::clock;
use shards::keys::SagaKey;
use shards::layout::DataDir;
use shards::manifest::ManifestSet;
use shards::message::{
    ApplyOutcome, Control, DispatchOutcome, DispatchRequest, DispatchResult, Event, Query, Request, Target,
    reply_channel,
};
use shards::runtime::{Pinning, RuntimeConfig, ShardRuntime};
use shards::store::Durability;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const PROGRAM: &str = r#"
fn on_event(state, event) {
    #{ state: event.data.n, work: [ #{ effect: "note", payload: #{ n: event.data.n } } ] }
}
"#;

fn event(k: &str, seq: u64) -> Arc<Event> {
    Arc::new(Event {
        id: format!("e-{seq}"),
        event_type: "Happened".into(),
        stream: "AGGREGATE_EVENTS".into(),
        seq,
        subject: "events.t.thing.Happened".into(),
        tenant: "t".into(),
        timestamp: 1_700_000_000_000,
        data: serde_json::json!({ "k": k, "n": seq }),
        traceparent: None,
        result: None,
        headers: Default::default(),
    })
}

fn apply(rt: &ShardRuntime, k: &str, seq: u64) -> shards::message::ReplyRx<ApplyOutcome> {
    let (tx, rx) = reply_channel();
    let target = Target { saga: "s".into(), correlation_id: k.into(), may_start: true };
    rt.handle(0).send_blocking(Request::Apply { event: event(k, seq), targets: vec![target], reply: tx }).unwrap();
    rx
}

/// The instance's version as committed (0 when absent); answered by the shard's thread.
fn version(rt: &ShardRuntime, k: &str) -> u64 {
    let (tx, rx) = reply_channel();
    let key = SagaKey::new("t", "s", k);
    rt.handle(0).send_blocking(Request::Query(Query::Saga { key, reply: tx })).unwrap();
    let answer = block_on(async { futures_lite::future::or(async { Some(rx.await) }, timeout(5)).await });
    answer
        .expect("the shard did not answer a query while a flush was held")
        .unwrap()
        .unwrap()
        .map_or(0, |v| v.record.version)
}

async fn timeout<T>(secs: u64) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        std::thread::yield_now();
        futures_lite::future::yield_now().await;
    }
    None
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_held_flush_holds_the_batchs_acks_and_dispatches_but_not_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.rhai"), PROGRAM).unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        "sagas:\n  - name: s\n    program: p.rhai\n    triggers:\n      - { subject: \"events.>\", correlation: data.k, may_start: true }\neffects:\n  - { name: note, provider: noop }\n",
    )
    .unwrap();
    let set = Arc::new(ManifestSet::load(&[dir.path().join("m.yaml")], &shards::program::check_program).unwrap());
    let mut cfg = RuntimeConfig { pinning: Pinning::None, ..RuntimeConfig::default() };
    cfg.shard.store.durability = Durability::Fsync;
    let data = DataDir::prepare(&dir.path().join("data"), 4, 1, &cfg.shard.store, |_| {}).unwrap();
    let (dispatch_tx, dispatch_rx) = flume::bounded::<DispatchRequest>(64);
    let rt = ShardRuntime::start(&cfg, &data, set, clock::system(), dispatch_tx).unwrap();
    let confirm = |req: DispatchRequest| {
        let results = req
            .items
            .iter()
            .map(|d| DispatchResult { key: d.key, send: d.send, outcome: DispatchOutcome::Delivered })
            .collect();
        rt.handle(0).control(Control::Dispatched(results)).unwrap();
        req.items.len()
    };

    // A batch as usual: acked and dispatched once on disk.
    assert_eq!(block_on(apply(&rt, "a", 1)), Ok(ApplyOutcome::Ack));
    confirm(dispatch_rx.recv_timeout(Duration::from_secs(10)).expect("a's item dispatched"));

    // a's item is deleted once confirmed, and that batch is on disk (the relay forgot it).
    wait_until("a's delivery to be durable", || {
        let (tx, rx) = reply_channel();
        rt.handle(0).send_blocking(Request::Query(Query::Stats { reply: tx })).unwrap();
        let s = block_on(rx).unwrap().unwrap();
        s.store.outbox == 0 && s.outbox_window == 0
    });

    // Hold the next flush.
    fail::cfg("store.flush", "pause").unwrap();
    let mut b = apply(&rt, "b", 2);
    wait_until("b's batch to be committed", || version(&rt, "b") == 1);
    // Committed (queries see it), not on disk: nothing of it leaves.
    assert_eq!(b.try_recv(), Ok(None), "b was acked before its flush");
    assert!(dispatch_rx.try_recv().is_err(), "b's item was dispatched before its flush");

    // The shard goes on: it decides the next batch (it cannot commit it yet) and answers.
    let health = rt.handles()[0].health.clone();
    let decided = health.batches_decided.load(Ordering::Relaxed);
    let mut c = apply(&rt, "c", 3);
    wait_until("c's batch to be decided", || health.batches_decided.load(Ordering::Relaxed) > decided);
    assert_eq!(version(&rt, "c"), 0, "c was committed before the previous flush finished");
    assert_eq!(version(&rt, "b"), 1);
    assert_eq!(b.try_recv(), Ok(None), "b was acked before its flush");
    assert_eq!(c.try_recv(), Ok(None));
    assert!(dispatch_rx.try_recv().is_err());

    // Released: b, then c, are acked and dispatched.
    fail::cfg("store.flush", "off").unwrap();
    assert_eq!(block_on(b), Ok(ApplyOutcome::Ack));
    assert_eq!(block_on(c), Ok(ApplyOutcome::Ack));
    let mut dispatched = 0;
    while dispatched < 2 {
        dispatched += confirm(dispatch_rx.recv_timeout(Duration::from_secs(10)).expect("b's and c's items dispatched"));
    }
    assert_eq!(version(&rt, "c"), 1);
    rt.shutdown();
}
