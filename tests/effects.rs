//! Effect workers against a real nats-server and an HTTP upstream fixture: the idempotency
//! gate under duplicate deliveries, a result publish across a NATS outage, retry backoff,
//! per-attempt timeouts, the circuit breaker's states, 409 as "in progress", the retry
//! budget for unknown outcomes, and URL templates that percent-encode event data.

mod support;

use runner::config::{Config, Mode};
use runner::fixture::HttpFixture;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(30);

fn effect_config(h: &Harness, upstream: &HttpFixture, effect_yaml: &str) -> Config {
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = effect_yaml.replace("UPSTREAM", &upstream.url());
    let mut cfg = h.config(Mode::Effect);
    cfg.saga_manifests = vec![];
    cfg.effect_manifests = vec![write(&dir, "effects.yaml", &format!("effects:\n{yaml}"))];
    cfg.ack_wait_ms = 2_000;
    cfg
}

const PAY: &str = "  - name: pay\n    provider: http\n    settings: { method: POST, url: \"UPSTREAM/pay\", body: { order: \"{{payload.order}}\" } }\n";

fn command(h: &Harness, id: &str, msg_id: &str) {
    let body = serde_json::json!({
        "command_id": id, "tenant_id": "acme", "effect": "pay", "saga": "order", "correlation_id": format!("o-{id}"),
        "payload": {"order": id}, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    });
    h.publish("workflow.commands.acme.pay", &[("Nats-Msg-Id", msg_id)], &body);
}

fn results(h: &Harness) -> Vec<serde_json::Value> {
    h.read_stream("WORKFLOW_EVENTS").into_iter().map(|m| m.json()).collect()
}

fn gate(app: &runner::app::App, id: &str) -> serde_json::Value {
    use shards::keys::EffectKey;
    use shards::message::{Query, Request, reply_channel};
    let key = EffectKey::new("acme", id);
    let shard = app.runtime().router().shard("acme", key.route());
    let (tx, rx) = reply_channel();
    app.runtime().handle(shard).send_blocking(Request::Query(Query::Effect { key, reply: tx })).unwrap();
    serde_json::to_value(futures::executor::block_on(rx).unwrap().unwrap()).unwrap()
}

fn settled(h: &Harness) -> bool {
    h.block_on(async {
        use futures::StreamExt;
        let s = h.js.get_stream("WORKFLOW_COMMANDS").await.unwrap();
        let names: Vec<String> = s.consumer_names().map(Result::unwrap).collect().await;
        let Some(name) = names.first() else { return false };
        let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer(name).await.unwrap();
        let info = c.info().await.unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
}

#[test]
fn the_same_command_delivered_five_times_calls_the_upstream_once() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.delay_ms = 300);
    let app = h.start(effect_config(&h, &upstream, PAY));
    command(&h, "c1", "c1");
    command(&h, "c1", "c1"); // deduped by the stream
    for dup in ["c1-a", "c1-b", "c1-c"] {
        command(&h, "c1", dup); // a duplicate publish beyond the dedupe window: new messages
    }
    assert_eq!(h.read_stream("WORKFLOW_COMMANDS").len(), 4);
    wait_until(T, "every delivery settled", || settled(&h));
    assert_eq!(upstream.count(), 1, "the upstream was called more than once");
    let r = results(&h);
    assert_eq!(r.len(), 1, "more than one result event");
    assert_eq!(r[0]["outcome"], "succeeded");
    assert_eq!(gate(&app, "c1")["status"], "completed");
    let call = &upstream.records()[0];
    assert_eq!(call.header("idempotency-key"), Some("c1"));
    assert_eq!(call.header("x-tenant-id"), Some("acme"));
    assert_eq!(call.header("x-correlation-id"), Some("o-c1"));
    assert_eq!(call.header("traceparent"), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_eq!(call.json(), serde_json::json!({"order": "c1"}));
    app.shutdown();
}

#[test]
fn a_failed_result_publish_leaves_the_command_open_until_the_server_is_back() {
    let mut h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.delay_ms = 1_000);
    let app = h.start(effect_config(&h, &upstream, PAY));
    command(&h, "c2", "c2");
    assert!(upstream.wait_for(T, |r| !r.is_empty()));
    h.nats.kill();
    // The provider answers while the server is down: the result cannot be published, so the
    // command is not completed.
    assert_eq!(gate(&app, "c2")["status"], "started");
    let answered = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < answered {
        assert_eq!(gate(&app, "c2")["status"], "started", "completed before the result's PubAck");
        std::thread::sleep(Duration::from_millis(50));
    }
    h.nats.restart().unwrap();
    wait_until(T, "the result published", || results(&h).len() == 1);
    wait_until(T, "completed", || gate(&app, "c2")["status"] == "completed");
    wait_until(T, "settled", || settled(&h));
    assert_eq!(results(&h).len(), 1);
    let calls = upstream.records();
    assert!(calls.len() <= 2, "called {} times", calls.len());
    assert!(calls.iter().all(|c| c.header("idempotency-key") == Some("c2")));
    app.shutdown();
}

#[test]
fn retries_back_off_exponentially_with_the_same_idempotency_key() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.fail_next = 2);
    let yaml = format!("{PAY}    retry: {{ attempts: 4, backoff_ms: 200, max_backoff_ms: 5000, jitter: 0 }}\n");
    let app = h.start(effect_config(&h, &upstream, &yaml));
    command(&h, "c3", "c3");
    wait_until(T, "a result", || results(&h).len() == 1);
    assert_eq!(results(&h)[0]["outcome"], "succeeded");
    let calls = upstream.records();
    assert_eq!(calls.len(), 3);
    let gap1 = calls[1].at - calls[0].at;
    let gap2 = calls[2].at - calls[1].at;
    assert!(gap1 >= Duration::from_millis(190), "first backoff {gap1:?} < 200 ms");
    assert!(gap2 >= Duration::from_millis(390), "second backoff {gap2:?} < 400 ms (not exponential)");
    assert!(gap2 < Duration::from_millis(2_000), "second backoff {gap2:?} far too long");
    assert!(calls.iter().all(|c| c.header("idempotency-key") == Some("c3")));
    app.shutdown();
}

#[test]
fn each_attempt_has_its_own_timeout_and_a_permanent_failure_publishes_a_failed_result() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.delay_ms = 3_000);
    let yaml = format!(
        "{PAY}    timeout_ms: 200\n    retry: {{ attempts: 2, backoff_ms: 50, max_backoff_ms: 50, jitter: 0 }}\n"
    );
    let app = h.start(effect_config(&h, &upstream, &yaml));
    let started = Instant::now();
    command(&h, "c4", "c4");
    wait_until(T, "a result", || results(&h).len() == 1);
    let elapsed = started.elapsed();
    let r = &results(&h)[0];
    assert_eq!(r["outcome"], "failed");
    assert!(r["error"].as_str().unwrap().contains("timed out after 200 ms"), "{r}");
    assert_eq!(upstream.count(), 2);
    assert!(elapsed < Duration::from_millis(2_500), "attempts were not cut at their timeout: {elapsed:?}");
    let calls = upstream.records();
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(240), "second attempt before the first timed out");
    // A 4xx is permanent: one call, a failed result naming the reason.
    upstream.script(|s| s.delay_ms = 0);
    upstream.set_handler(std::sync::Arc::new(|_| {
        Some(runner::fixture::Reply::new(402, serde_json::json!({"reason": "card declined"})))
    }));
    command(&h, "c5", "c5");
    wait_until(T, "a second result", || results(&h).len() == 2);
    let r = &results(&h)[1];
    assert_eq!((r["outcome"].as_str(), r["error"].as_str()), (Some("failed"), Some("card declined")));
    assert_eq!(upstream.count(), 3);
    app.shutdown();
}

#[test]
fn the_breaker_opens_waits_half_opens_and_closes() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.status = Some(500));
    let yaml = format!(
        "{PAY}    retry: {{ attempts: 1, backoff_ms: 10, max_backoff_ms: 10, jitter: 0 }}\n    circuit_breaker: {{ failures: 2, window_ms: 10000, open_ms: 1500 }}\n"
    );
    let app = h.start(effect_config(&h, &upstream, &yaml));
    let key = upstream.addr().to_string();
    let state = || app.bridge().shared().breakers().get(&key).copied();
    command(&h, "b1", "b1");
    wait_until(T, "first failure", || results(&h).len() == 1);
    assert_eq!(state(), Some(0), "closed after one failure");
    command(&h, "b2", "b2");
    wait_until(T, "the breaker opens", || state() == Some(2));
    assert_eq!(results(&h).len(), 2);
    // While open, a command waits (NAK with delay) instead of calling the upstream.
    upstream.script(|s| {
        s.status = None;
        s.delay_ms = 600;
    });
    command(&h, "b3", "b3");
    // The next call is the half-open probe, after open_ms: b3 was not called while open.
    wait_until(T, "half-open probe", || state() == Some(1));
    // The probe is recorded when the (delayed) upstream has seen it; then exactly one call more.
    wait_until(T, "the probe at the upstream", || upstream.count() >= 3);
    assert_eq!(upstream.count(), 3, "a call went through while the breaker was open");
    wait_until(T, "closed after the probe succeeded", || state() == Some(0));
    wait_until(T, "b3's result", || results(&h).len() == 3);
    assert_eq!(results(&h)[2]["outcome"], "succeeded");
    assert_eq!(upstream.count(), 3);
    app.shutdown();
}

/// A command for the effect `effect` with `payload`.
fn command_with(h: &Harness, id: &str, effect: &str, payload: serde_json::Value) {
    let body = serde_json::json!({
        "command_id": id, "tenant_id": "acme", "effect": effect, "saga": "order", "correlation_id": format!("o-{id}"),
        "payload": payload,
    });
    h.publish(&format!("workflow.commands.acme.{effect}"), &[("Nats-Msg-Id", id)], &body);
}

#[test]
fn an_upstream_409_means_in_progress_and_is_retried_with_the_same_key() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = answered.clone();
    upstream.set_handler(std::sync::Arc::new(move |_| {
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            Some(runner::fixture::Reply::new(409, serde_json::json!({"error": "same idempotency key in progress"})))
        } else {
            Some(runner::fixture::Reply::new(200, serde_json::json!({"charged": true})))
        }
    }));
    let yaml = format!("{PAY}    retry: {{ backoff_ms: 50, max_backoff_ms: 100, jitter: 0 }}\n");
    let app = h.start(effect_config(&h, &upstream, &yaml));
    command(&h, "c6", "c6");
    wait_until(T, "a result", || results(&h).len() == 1);
    let r = &results(&h)[0];
    assert_eq!(r["outcome"], "succeeded", "a 409 (in progress) became a final failure: {r}");
    assert_eq!(r["payload"], serde_json::json!({"charged": true}));
    let calls = upstream.records();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.header("idempotency-key") == Some("c6")));
    // The upstream answered every time: a 409 is no reason to open its breaker.
    assert_eq!(app.bridge().shared().breakers().get(&upstream.addr().to_string()).copied(), Some(0));
    app.shutdown();
}

#[test]
fn unknown_outcomes_are_retried_well_past_three_attempts_by_default() {
    // No `attempts` and no `give_up_after_ms`: the defaults. Five 500s in a row (an
    // upstream restarting) must not end in a failed result and a compensation.
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.fail_next = 5);
    let yaml = format!("{PAY}    retry: {{ backoff_ms: 20, max_backoff_ms: 40, jitter: 0 }}\n");
    let app = h.start(effect_config(&h, &upstream, &yaml));
    command(&h, "c7", "c7");
    wait_until(T, "a result", || results(&h).len() == 1);
    assert_eq!(results(&h)[0]["outcome"], "succeeded", "{}", results(&h)[0]);
    let calls = upstream.records();
    assert_eq!(calls.len(), 6);
    assert!(calls.iter().all(|c| c.header("idempotency-key") == Some("c7")));
    app.shutdown();
}

#[test]
fn the_retry_budget_ends_in_a_failed_result_that_says_so() {
    // Waits of 20, 40, 40 ms fit into 100 ms; the next would not: four attempts.
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.status = Some(503));
    let yaml = format!("{PAY}    retry: {{ backoff_ms: 20, max_backoff_ms: 40, jitter: 0, give_up_after_ms: 100 }}\n");
    let app = h.start(effect_config(&h, &upstream, &yaml));
    command(&h, "c8", "c8");
    wait_until(T, "a result", || results(&h).len() == 1);
    let r = &results(&h)[0];
    assert_eq!(r["outcome"], "failed");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("gave up after 4 attempts") && error.contains("503"), "{r}");
    assert_eq!(upstream.count(), 4);
    app.shutdown();
}

const ROUTE: &str = "  - name: route\n    provider: http\n    settings: { method: PUT, url: \"UPSTREAM/orders/{{payload.order}}/pay?note={{payload.note}}&id={{command_id}}\" }\n    retry: { attempts: 1 }\n";

#[test]
fn url_templates_percent_encode_values_from_event_data() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    let app = h.start(effect_config(&h, &upstream, ROUTE));
    command_with(&h, "u1", "route", serde_json::json!({"order": "../admin?x=1#top", "note": "a&b=c #50% /x"}));
    wait_until(T, "a result", || results(&h).len() == 1);
    assert_eq!(results(&h)[0]["outcome"], "succeeded", "{}", results(&h)[0]);
    let calls = upstream.records();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "/orders/..%2Fadmin%3Fx%3D1%23top/pay?note=a%26b%3Dc%20%2350%25%20%2Fx&id=u1");
    // A value that would be a whole `..` segment is refused: no call, a failed result.
    command_with(&h, "u2", "route", serde_json::json!({"order": "..", "note": "n"}));
    wait_until(T, "a second result", || results(&h).len() == 2);
    let r = &results(&h)[1];
    assert_eq!(r["outcome"], "failed");
    assert!(r["error"].as_str().unwrap_or_default().contains("dot segment"), "{r}");
    assert_eq!(upstream.count(), 1, "a call with a `..` segment was made");
    app.shutdown();
}
