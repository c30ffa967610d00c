//! The bridge against a real nats-server: no ack without a commit, dispatch across a NATS
//! outage, a Gateway call not held back by a publish stuck on a frozen server, Gateway
//! retries and duplicates, per-key order under interleaving with a poisoned
//! key, and undecodable messages quarantined while the consumer keeps going.

mod support;

use bytes::Bytes;
use runner::app::App;
use runner::config::Mode;
use runner::fixture::HttpFixture;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(30);

fn ev(k: &str, n: u64, extra: serde_json::Value) -> serde_json::Value {
    let mut data = serde_json::json!({"k": k, "n": n});
    if let (Some(m), serde_json::Value::Object(x)) = (data.as_object_mut(), extra) {
        m.extend(x);
    }
    serde_json::json!({"type": "Happened", "tenant_id": "t", "data": data})
}

#[test]
fn a_failed_commit_is_never_acked() {
    let h = Harness::new();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    // The state keeps the whole event, so one big event overflows a 1 MiB map.
    let program = "fn on_event(s, e) { #{ state: e.data } }";
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![custom_saga(&dir, program, "", "")];
    cfg.effect_manifests = vec![];
    cfg.initial_map_size = 1 << 20;
    cfg.max_map_size = 1 << 20;
    cfg.shards = 1;
    let app = h.start(cfg);
    h.publish("events.t.x.Small", &[], &ev("small", 1, serde_json::json!({})));
    wait_until(T, "small event applied", || saga_state(&app, "t", "s", "small")["version"] == 1);
    // 200 KiB states (under the sandbox's string limit) until the 1 MiB map is full.
    let unhealthy =
        || app.runtime().handles().iter().any(|s| !s.health.writable.load(std::sync::atomic::Ordering::SeqCst));
    let mut sent = 0;
    while sent < 40 && !unhealthy() {
        let body = serde_json::json!({"type": "Big", "tenant_id": "t", "data": {"k": format!("big{sent}"), "blob": "x".repeat(200_000)}});
        h.publish("events.t.x.Big", &[], &body);
        sent += 1;
        let key = format!("big{}", sent - 1);
        wait_until(T, "applied or failed", || unhealthy() || saga_state(&app, "t", "s", &key)["version"] == 1);
    }
    assert!(unhealthy(), "40 big states fit into a 1 MiB map?");
    let applied: Vec<bool> =
        (0..sent).map(|i| saga_state(&app, "t", "s", &format!("big{i}"))["version"] == 1).collect();
    let missing = applied.iter().filter(|a| !**a).count();
    assert!(missing > 0, "every big event was applied: {applied:?}");
    // Whatever did not commit was not acked: exactly those are pending at the consumer.
    let (pending, floor) = h.block_on(async {
        use futures::StreamExt;
        let s = h.js.get_stream("AGGREGATE_EVENTS").await.unwrap();
        let names: Vec<String> = s.consumer_names().map(Result::unwrap).collect().await;
        let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer(&names[0]).await.unwrap();
        let info = c.info().await.unwrap();
        (info.num_ack_pending as usize, info.ack_floor.stream_sequence)
    });
    assert_eq!(pending, missing, "acked {} events that were never committed", missing - pending.min(missing));
    let first_missing = applied.iter().position(|a| !*a).unwrap() as u64;
    assert!(floor < first_missing + 2, "ack floor {floor} passed an uncommitted event");
    app.abort();
}

/// A transition that fails until the program is swapped: `Go` waits (blocked, retried in
/// place) until a reload, so its work is decided while the server is away (a timer cannot do
/// that any more: timers wait for the streams).
const HELD_PROGRAM: &str = r#"
fn on_event(state, event) {
    if event.type == "Go" { throw "not yet"; }
    #{ state: #{ fired: false } }
}
"#;

const HELD_RETRY: &str = "    retry: { attempts: 10000, backoff_ms: 50, max_backoff_ms: 100 }\n";

/// Starts `k1` and makes its `Go` event wait, retried in place.
fn hold_go(h: &Harness, app: &App) {
    h.publish("events.t.x.Start", &[], &serde_json::json!({"type": "Start", "tenant_id": "t", "data": {"k": "k1"}}));
    wait_until(T, "instance started", || saga_state(app, "t", "s", "k1")["version"] == 1);
    h.publish("events.t.x.Go", &[], &serde_json::json!({"type": "Go", "tenant_id": "t", "data": {"k": "k1"}}));
    wait_until(T, "Go waits for its retry", || saga_state(app, "t", "s", "k1")["blocked"].is_object());
}

/// Lets `Go` through: `work` is what it emits.
fn release_go(h: &Harness, app: &App, dir: &std::path::Path, work: &str) {
    let program = format!(
        "fn on_event(state, event) {{\n    if event.type == \"Go\" {{ return #{{ state: #{{ fired: true }}, work: [ {work} ] }}; }}\n    #{{ state: #{{ fired: false }} }}\n}}\n"
    );
    write(dir, "p.rhai", &program);
    let base = format!("http://{}", app.http_addr().unwrap());
    let (status, body) = h.http("POST", &format!("{base}/admin/reload"), None, None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_publish_failure_keeps_the_outbox_item_until_the_server_is_back_then_delivers_once() {
    let mut h = Harness::new();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![custom_saga(&dir, HELD_PROGRAM, HELD_RETRY, "")];
    cfg.effect_manifests = vec![];
    cfg.relay.retry.backoff_ms = 100;
    cfg.relay.retry.max_backoff_ms = 500;
    let app = h.start(cfg);
    hold_go(&h, &app);
    // The server goes away; then `Go` is applied and its command cannot be published.
    h.nats.kill();
    release_go(&h, &app, &dir, r#"#{ effect: "e", payload: #{ k: event.data.k } }"#);
    wait_until(T, "Go applied while NATS is down", || saga_state(&app, "t", "s", "k1")["state"]["fired"] == true);
    wait_until(T, "a failed dispatch is recorded", || {
        saga_state(&app, "t", "s", "k1")["pending_outbox"]
            .as_array()
            .is_some_and(|a| a.first().is_some_and(|i| i["attempts"].as_u64().unwrap_or(0) >= 1))
    });
    h.nats.restart().unwrap();
    wait_until(T, "the outbox drains", || {
        saga_state(&app, "t", "s", "k1")["pending_outbox"].as_array().is_some_and(|a| a.is_empty())
    });
    let commands = h.read_stream("WORKFLOW_COMMANDS");
    assert_eq!(commands.len(), 1, "delivered {} times", commands.len());
    assert_eq!(commands[0].json()["payload"]["k"], "k1");
    app.shutdown();
}

use shards::clock::Clock;

/// One transition emits an effect command (a JetStream publish) and a Gateway command; they
/// go to the bridge in the same dispatch request. With the server frozen (SIGSTOP) the
/// publish's ack cannot come, yet the Gateway call's confirmation must reach the shard at
/// once: held behind the ack (up to the 5 s publish timeout, or the whole outage), it would
/// pass the relay's confirmation timeout and the Gateway would be called again.
#[test]
fn a_publish_stuck_on_a_frozen_server_does_not_hold_back_the_gateway_call_sent_with_it() {
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![custom_saga(&dir, HELD_PROGRAM, HELD_RETRY, "")];
    cfg.effect_manifests = vec![];
    cfg.gateway_url = Some(gateway.url());
    let app = h.start(cfg);
    hold_go(&h, &app);
    let pid = h.nats.pid().expect("nats-server running") as libc::pid_t;
    // SAFETY: signals the test's own nats-server child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    release_go(
        &h,
        &app,
        &dir,
        r#"#{ effect: "e", payload: #{ k: event.data.k } }, #{ command: "Reserve", aggregate: "inventory", aggregate_id: "a-1", payload: #{ k: event.data.k } }"#,
    );
    wait_until(T, "Go applied with the server frozen", || saga_state(&app, "t", "s", "k1")["state"]["fired"] == true);
    let kinds = || -> Vec<String> {
        saga_state(&app, "t", "s", "k1")["pending_outbox"]
            .as_array()
            .map(|a| a.iter().map(|i| i["kind"].as_str().unwrap_or("").to_owned()).collect())
            .unwrap_or_default()
    };
    wait_until(Duration::from_millis(2_500), "the Gateway command confirmed while the publish waits", || {
        kinds() == ["effect"]
    });
    assert_eq!(gateway.records().len(), 1);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    wait_until(T, "the outbox drains", || kinds().is_empty());
    assert_eq!(h.read_stream("WORKFLOW_COMMANDS").len(), 1);
    assert_eq!(gateway.records().len(), 1, "the Gateway was called again");
    app.shutdown();
}

#[test]
fn gateway_failures_are_retried_and_a_duplicate_409_counts_as_delivered() {
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    gateway.script(|s| s.fail_next = 2);
    let mut cfg = h.config(Mode::Saga);
    cfg.gateway_url = Some(gateway.url());
    cfg.relay.retry.backoff_ms = 50;
    cfg.relay.retry.max_backoff_ms = 200;
    let app = h.start(cfg);
    h.place_order("p-1", "o-1");
    wait_outbox_drained(&app, "o-1");
    let calls = gateway.records();
    assert_eq!(calls.len(), 3, "two 500s then one success");
    let keys: Vec<_> = calls.iter().map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "retries changed the idempotency key");

    gateway.script(|s| s.conflict_next = 1);
    h.place_order("p-2", "o-2");
    wait_outbox_drained(&app, "o-2");
    assert_eq!(gateway.records().len(), 4, "a 409 was retried");
    app.shutdown();
}

#[test]
fn a_gateway_409_that_is_not_a_duplicate_is_retried_not_delivered() {
    // The Gateway contract: only a 409 whose body is `{"error":"duplicate"}` means "already
    // done". Any other 409 (here a conflict) is a failed attempt, retried with the same key.
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = answered.clone();
    gateway.set_handler(std::sync::Arc::new(move |_| match n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => Some(runner::fixture::Reply::new(409, serde_json::json!({"error": "version conflict"}))),
        1 => Some(runner::fixture::Reply::new(409, serde_json::json!("busy"))),
        _ => None,
    }));
    let mut cfg = h.config(Mode::Saga);
    cfg.gateway_url = Some(gateway.url());
    cfg.relay.retry.backoff_ms = 50;
    cfg.relay.retry.max_backoff_ms = 200;
    let app = h.start(cfg);
    h.place_order("p-9", "o-9");
    wait_outbox_drained(&app, "o-9");
    let calls = gateway.records();
    assert_eq!(calls.len(), 3, "a 409 that is not a duplicate counted as delivered");
    assert!(calls.iter().all(|c| c.header("idempotency-key") == calls[0].header("idempotency-key")));
    assert!(deadletters(&app, "acme").is_empty(), "a conflict was dead-lettered");
    app.shutdown();
}

const ORDER_PROGRAM: &str = r#"
fn on_event(state, event) {
    if event.data.poison == true { throw "poisoned event " + event.data.n; }
    let s = if state == () { #{ seen: [] } } else { state };
    s.seen.push(event.data.n);
    #{ state: s }
}
"#;

#[test]
fn per_key_order_holds_under_interleaving_and_a_poisoned_key_blocks_only_itself() {
    let h = Harness::new();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests =
        vec![custom_saga(&dir, ORDER_PROGRAM, "    retry: { attempts: 3, backoff_ms: 50, max_backoff_ms: 100 }\n", "")];
    cfg.effect_manifests = vec![];
    cfg.durability = shards::store::Durability::NoSync;
    let app = h.start(cfg);
    const KEYS: u64 = 1_000;
    const PER: u64 = 20;
    let mut msgs = Vec::new();
    for n in 0..PER {
        for k in 0..KEYS {
            let poison = k == 7 && n == 5;
            let body = ev(&format!("k{k}"), n, serde_json::json!({"poison": poison}));
            msgs.push((format!("events.t.x.E{}", k % 10), vec![], Bytes::from(serde_json::to_vec(&body).unwrap())));
        }
    }
    h.publish_many(msgs);
    wait_until(Duration::from_secs(120), "all healthy keys finished", || {
        (0..KEYS).filter(|k| *k != 7).all(|k| saga_state(&app, "t", "s", &format!("k{k}"))["version"] == PER)
    });
    let expected: Vec<u64> = (0..PER).collect();
    for k in (0..KEYS).filter(|k| *k != 7) {
        assert_eq!(
            saga_state(&app, "t", "s", &format!("k{k}"))["state"]["seen"],
            serde_json::json!(expected),
            "k{k} out of order"
        );
    }
    // k7: events 0..4 applied; 5 quarantined after 3 attempts; 6..19 parked behind it, in order.
    wait_until(T, "k7 quarantined and parked", || deadletters(&app, "t").len() == 15);
    let k7 = saga_state(&app, "t", "s", "k7");
    assert_eq!(k7["state"]["seen"], serde_json::json!([0, 1, 2, 3, 4]));
    assert!(k7["parked"].is_object());
    let letters = deadletters(&app, "t");
    let poison: Vec<_> = letters.iter().filter(|l| l["kind"] == "poison").collect();
    assert_eq!(poison.len(), 1);
    assert_eq!(poison[0]["attempts"], 3);
    assert!(poison[0]["error"].as_str().unwrap().contains("poisoned event 5"));
    let parked: Vec<u64> =
        letters.iter().filter(|l| l["kind"] == "parked").map(|l| l["event"]["data"]["n"].as_u64().unwrap()).collect();
    assert_eq!(parked, (6..PER).collect::<Vec<_>>(), "parked events out of order");
    app.shutdown();
}

#[test]
fn undecodable_messages_become_dead_letters_and_the_consumer_keeps_going() {
    let h = Harness::new();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![custom_saga(&dir, ORDER_PROGRAM, "", "")];
    cfg.effect_manifests = vec![];
    cfg.tenancy_required = true;
    cfg.max_event_bytes = 64 << 10;
    let app = h.start(cfg);
    h.publish_raw("events.t.x.Bad", &[("x-tenant-id", "t")], Bytes::from_static(b"{not json"));
    h.publish("events.x.Bad", &[], &serde_json::json!({"type": "Happened", "data": {"k": "nt", "n": 1}}));
    h.publish(
        "events.t.x.Huge",
        &[("x-tenant-id", "t")],
        &ev("huge", 1, serde_json::json!({"blob": "y".repeat(512 << 10)})),
    );
    // A date that does not exist (chrono refuses it; a lenient parser made it March 3rd).
    let mut bad_date = ev("bad-date", 1, serde_json::json!({}));
    bad_date["timestamp"] = "2023-02-31T00:00:00Z".into();
    h.publish("events.t.x.BadDate", &[], &bad_date);
    h.publish("events.t.x.Fine", &[], &ev("fine", 0, serde_json::json!({})));
    wait_until(T, "the good event after the bad ones", || saga_state(&app, "t", "s", "fine")["version"] == 1);
    wait_until(T, "four dead letters", || deadletters(&app, "t").len() + deadletters(&app, "").len() == 4);
    let mut errors: Vec<String> = deadletters(&app, "t")
        .into_iter()
        .chain(deadletters(&app, ""))
        .map(|l| {
            assert_eq!(l["kind"], "undecodable");
            l["error"].as_str().unwrap().to_owned()
        })
        .collect();
    errors.sort();
    assert!(errors.iter().any(|e| e.starts_with("not JSON")), "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("no tenant")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("exceeds the limit of 65536 bytes")), "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("timestamp \"2023-02-31T00:00:00Z\"")), "{errors:?}");
    assert!(saga_state(&app, "t", "s", "bad-date").is_null(), "the bad-date event reached its saga");
    app.shutdown();
}

const TIMEOUT_PROGRAM: &str = r#"
fn on_event(state, event) {
    let s = if state == () { #{ paid: false, timed_out: false } } else { state };
    if event.type == "Started" {
        return #{ state: s, schedules: [ #{ name: "pay_timeout", after_ms: 1500, payload: #{} } ] };
    }
    if event.type == "Paid" { s.paid = true; }
    if event.type == "timer" && !s.paid { s.timed_out = true; }
    #{ state: s }
}
"#;

#[test]
fn timers_wait_for_events_already_in_the_stream_after_an_outage() {
    // The runner is down while the payments arrive and the timeouts fall due; started again,
    // it applies the payments before any timer fires (invariant 9).
    const KEYS: usize = 20;
    let h = Harness::new();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![custom_saga(&dir, TIMEOUT_PROGRAM, "", "")];
    cfg.effect_manifests = vec![];
    let app = h.start(cfg.clone());
    for k in 0..KEYS {
        let mut e = ev(&format!("k{k}"), 0, serde_json::json!({}));
        e["type"] = "Started".into();
        h.publish(&format!("events.t.x.S{k}"), &[], &e);
    }
    wait_until(T, "every timer armed", || {
        (0..KEYS).all(|k| saga_state(&app, "t", "s", &format!("k{k}"))["version"] == 1)
    });
    let due = (0..KEYS)
        .map(|k| saga_state(&app, "t", "s", &format!("k{k}"))["pending_timers"][0]["due_at"].as_u64().unwrap())
        .max()
        .unwrap();
    app.shutdown();
    for k in 0..KEYS {
        let mut e = ev(&format!("k{k}"), 1, serde_json::json!({}));
        e["type"] = "Paid".into();
        h.publish(&format!("events.t.x.P{k}"), &[], &e);
    }
    wait_until(T, "every timer overdue", || shards::clock::SystemClock.now_ms() > due + 300);
    let app = h.start(cfg);
    wait_until(T, "payments and timers applied", || {
        (0..KEYS).all(|k| saga_state(&app, "t", "s", &format!("k{k}"))["version"] == 3)
    });
    for k in 0..KEYS {
        let s = saga_state(&app, "t", "s", &format!("k{k}"));
        assert_eq!(s["state"]["paid"], true, "k{k}: {s}");
        assert_eq!(s["state"]["timed_out"], false, "k{k}: a timeout overtook a payment in the stream");
    }
    app.shutdown();
}
