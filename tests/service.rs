//! The service: operations endpoints (readiness with drain, health with an unwritable data
//! directory, reload of a broken manifest, replay confirmation, the admin token, Prometheus
//! metrics), the `runner` binary under SIGTERM during load, JSON logs, config errors,
//! inspection of a stopped runner's data, and CPU pinning under the process's affinity mask.

mod support;

use runner::config::Mode;
use runner::fixture::HttpFixture;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(30);

const NOTE_PROGRAM: &str = r#"
fn on_event(state, event) {
    let s = if state == () { #{ seen: [] } } else { state };
    s.seen.push(event.data.n);
    #{ state: s, work: [ #{ command: "Note", aggregate: "thing", aggregate_id: event.data.k, payload: #{ n: event.data.n } } ] }
}
"#;

/// A saga-mode runner whose Gateway is a fixture, and the base URL of its operations
/// endpoints; `tune` scripts the fixture and adjusts the config before the start.
fn with_gateway(
    h: &Harness,
    tune: impl FnOnce(&HttpFixture, &mut runner::config::Config),
) -> (HttpFixture, TestApp, String) {
    let gateway = HttpFixture::start().unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.gateway_url = Some(gateway.url());
    tune(&gateway, &mut cfg);
    let app = h.start(cfg);
    let base = format!("http://{}", app.http_addr().unwrap());
    (gateway, app, base)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn readiness_drops_on_drain_and_admin_needs_the_token() {
    let h = Harness::new();
    let mut cfg = h.config(Mode::Saga);
    cfg.admin_token = Some("0123456789abcdef-token".into());
    let app = h.start(cfg);
    let base = format!("http://{}", app.http_addr().unwrap());
    let token = Some("0123456789abcdef-token");
    assert_eq!(h.http("GET", &format!("{base}/health"), None, None).0, 200);
    assert_eq!(h.http("GET", &format!("{base}/ready"), None, None).0, 200);
    let (status, body) = h.http("POST", &format!("{base}/admin/drain"), None, None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"));
    assert_eq!(h.http("GET", &format!("{base}/admin/deadletters"), Some("wrong-token-wrong-token"), None).0, 401);
    assert_eq!(h.http("GET", &format!("{base}/sagas/acme/{SAGA}/o-1"), None, None).0, 401);
    let (status, body) = h.http("POST", &format!("{base}/admin/drain"), token, None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["drained"], true);
    let (status, body) = h.http("GET", &format!("{base}/ready"), None, None);
    assert_eq!(status, 503, "still ready after a drain: {body}");
    assert!(body.contains("\"draining\": true"));
    // Health is about whether the process works (storage), not draining.
    assert_eq!(h.http("GET", &format!("{base}/health"), None, None).0, 200);
    let (status, body) = h.http("GET", &format!("{base}/nope"), None, None);
    assert_eq!((status, body.contains("\"error\"")), (404, true));
    app.shutdown();
}

#[test]
fn health_fails_while_the_data_directory_is_unwritable() {
    let h = Harness::new();
    let app = h.start(h.config(Mode::Saga));
    let base = format!("http://{}", app.http_addr().unwrap());
    assert_eq!(h.http("GET", &format!("{base}/health"), None, None).0, 200);
    let dir = app.config().data_dir.clone();
    // Root ignores permissions; the immutable attribute stops even root.
    let chattr = |flag: &str| Command::new("chattr").arg(flag).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
    assert!(chattr("+i"), "chattr +i failed: the test needs e2fsprogs' chattr and an ext4/xfs data dir");
    // The probe runs once a second on its own thread (no disk I/O on the request path).
    let mut seen = (0, String::new(), 0);
    let turned_red = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(10), "health red", || {
            let (status, body) = h.http("GET", &format!("{base}/health"), None, None);
            seen = (status, body, h.http("GET", &format!("{base}/ready"), None, None).0);
            seen.0 == 503
        })
    }));
    // The attribute comes off whatever happened, or the temp dir cannot be removed.
    assert!(chattr("-i"));
    assert!(turned_red.is_ok(), "health never turned red");
    let (status, body, ready) = seen;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not writable"), "{body}");
    assert_eq!(ready, 503);
    wait_until(Duration::from_secs(10), "health green again", || {
        h.http("GET", &format!("{base}/health"), None, None).0 == 200
    });
    app.shutdown();
}

/// The first dispatch dead letter of `tenant`, once there is one.
fn wait_dispatch_letter(app: &runner::app::App, tenant: &str) -> serde_json::Value {
    let mut letter = serde_json::Value::Null;
    wait_until(T, "the dispatch is given up", || {
        letter = deadletters(app, tenant).into_iter().find(|l| l["kind"] == "dispatch").unwrap_or_default();
        !letter.is_null()
    });
    letter
}

#[test]
fn a_long_gateway_outage_ends_with_each_command_delivered_once() {
    // No `relay.max_attempts`: 200 failed attempts (backoff capped at 10 ms), then the
    // Gateway is back and the command goes through once; the wait is visible meanwhile.
    let h = Harness::new();
    let (gateway, app, base) = with_gateway(&h, |gateway, cfg| {
        gateway.script(|s| s.fail_next = 200);
        assert_eq!(cfg.relay.max_attempts, None, "no attempt limit by default");
        cfg.relay.retry.backoff_ms = 1;
        cfg.relay.retry.max_backoff_ms = 10;
    });
    h.place_order("p-out", "o-out");
    let mut seen_retrying = false;
    wait_until(T, "the outbox drains", || {
        let (_, stats) = h.http("GET", &format!("{base}/admin/stats"), None, None);
        seen_retrying |= stats.contains("\"outbox_retrying\": 1");
        saga_state(&app, "acme", SAGA, "o-out")["pending_outbox"].as_array().is_some_and(|a| a.is_empty())
    });
    let calls = gateway.records();
    assert_eq!(calls.len(), 201, "200 failures, then one delivery");
    let key = calls[0].header("idempotency-key").unwrap().to_owned();
    assert!(calls.iter().all(|c| c.header("idempotency-key") == Some(key.as_str())), "a retry changed the key");
    assert!(seen_retrying, "/admin/stats never showed the item waiting to retry");
    let (_, letters) = h.http("GET", &format!("{base}/admin/deadletters?tenant=acme"), None, None);
    assert!(!letters.contains("\"dispatch\""), "given up: {letters}");
    let (_, metrics) = h.http("GET", &format!("{base}/metrics"), None, None);
    assert!(metrics.contains("runner_outbox_retrying"), "no retry gauge");
    app.shutdown();
}

#[test]
fn a_dispatch_stopped_by_its_attempt_limit_can_be_resent_by_an_operator() {
    let h = Harness::new();
    let (gateway, app, base) = with_gateway(&h, |gateway, cfg| {
        gateway.script(|s| s.fail_next = 2);
        cfg.relay.max_attempts = Some(2);
        cfg.relay.retry.backoff_ms = 1;
        cfg.relay.retry.max_backoff_ms = 10;
    });
    h.place_order("p-dl", "o-dl");
    let letter = wait_dispatch_letter(&app, "acme");
    assert_eq!(gateway.records().len(), 2);
    let body = serde_json::json!({"tenant": "acme", "at": letter["at"], "id": letter["id"]});
    let (status, answer) = h.http("POST", &format!("{base}/admin/deadletters/resend"), None, Some(body.clone()));
    assert_eq!(status, 200, "{answer}");
    wait_until(T, "the re-sent command is delivered", || gateway.records().len() == 3);
    wait_outbox_drained(&app, "o-dl");
    let calls = gateway.records();
    assert_eq!(calls[2].header("idempotency-key"), calls[0].header("idempotency-key"), "re-sent under another key");
    let (status, answer) = h.http("POST", &format!("{base}/admin/deadletters/resend"), None, Some(body));
    assert_eq!(status, 404, "a letter re-sent twice: {answer}");
    assert_eq!(gateway.records().len(), 3, "one delivery");
    app.shutdown();
}

#[test]
fn nothing_is_dropped_without_a_trace() {
    // Events no trigger matches are counted by subject pattern (and, configured, kept as dead
    // letters); a result for a saga nobody runs becomes a dead letter naming it.
    let h = Harness::new();
    let mut cfg = h.config(Mode::Saga);
    cfg.dead_letter_unmatched = true;
    let app = h.start(cfg);
    let base = format!("http://{}", app.http_addr().unwrap());
    for tenant in ["acme", "beta", "acme"] {
        let body = serde_json::json!({"type": "InvoiceSent", "tenant_id": tenant, "data": {"invoice": "i-1"}});
        h.publish(&format!("events.{tenant}.billing.InvoiceSent"), &[], &body);
    }
    let result = serde_json::json!({"command_id": "c-1", "tenant_id": "acme", "effect": "charge_payment", "saga": "no_such_saga", "correlation_id": "x", "outcome": "succeeded"});
    h.publish("workflow.events.acme.charge_payment.succeeded", &[], &result);
    let stats = || -> serde_json::Value {
        serde_json::from_str(&h.http("GET", &format!("{base}/admin/stats"), None, None).1).unwrap_or_default()
    };
    wait_until(T, "three unmatched events counted", || stats()["unmatched"]["events.*.billing.InvoiceSent"] == 3);
    let letters = |tenant: &str| deadletters(&app, tenant);
    wait_until(T, "unmatched events and the orphan result kept", || {
        letters("acme").len() == 3 && letters("beta").len() == 1
    });
    let acme = letters("acme");
    assert_eq!(
        acme.iter().filter(|l| l["error"].as_str().unwrap_or("").contains("matches no saga trigger")).count(),
        2
    );
    assert!(
        acme.iter().any(|l| l["error"].as_str().unwrap_or("").contains("\"no_such_saga\", which is not loaded")),
        "{acme:?}"
    );
    let (_, metrics) = h.http("GET", &format!("{base}/metrics"), None, None);
    assert!(metrics.contains("runner_unmatched_events_total"), "no unmatched counter");
    app.shutdown();
}

#[test]
fn a_message_cannot_act_for_another_tenant_than_its_subject() {
    // Invariant 8: on `events.acme...`, a header or body naming `globex` makes a dead letter
    // (filed under acme, naming both), never a globex instance or a Gateway call as globex.
    let h = Harness::new();
    let (gateway, app, base) = with_gateway(&h, |_, _| {});
    let order = |id: &str, tenant: &str| {
        serde_json::json!({"id": id, "type": "OrderPlaced", "tenant_id": tenant, "aggregate_type": "order",
            "data": {"order_id": id, "sku": "s", "qty": 1, "amount": 1, "customer": "c"}})
    };
    let subject = "events.acme.order.OrderPlaced";
    h.publish(subject, &[("x-tenant-id", "globex")], &order("o-hdr", "globex"));
    h.publish(subject, &[("x-tenant-id", "globex")], &order("o-hdr-only", ""));
    h.publish(subject, &[], &order("o-body", "globex"));
    let result = serde_json::json!({"command_id": "c-1", "tenant_id": "globex", "effect": "charge_payment",
        "saga": SAGA, "correlation_id": "o-ok", "outcome": "succeeded"});
    h.publish("workflow.events.acme.charge_payment.succeeded", &[], &result);
    // The honest event of the same subject goes through.
    h.publish(subject, &[("x-tenant-id", "acme")], &order("o-ok", "acme"));
    wait_until(T, "the honest order reserves", || gateway.records().len() == 1);
    let letters = || deadletters(&app, "acme");
    wait_until(T, "four dead letters under acme", || letters().len() == 4);
    for l in letters() {
        let error = l["error"].as_str().unwrap_or("");
        assert!(error.contains("\"acme\"") && error.contains("\"globex\""), "{error}");
    }
    for id in ["o-hdr", "o-hdr-only", "o-body", "o-ok"] {
        let (status, _) = h.http("GET", &format!("{base}/sagas/globex/{SAGA}/{id}"), None, None);
        assert_eq!(status, 404, "an instance of globex was made for {id}");
    }
    let calls = gateway.records();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header("x-tenant-id"), Some("acme"), "a Gateway call as another tenant");
    assert!(deadletters(&app, "globex").is_empty(), "a dead letter filed under the claimed tenant");
    app.shutdown();
}

#[test]
fn without_a_token_the_admin_api_answers_only_on_loopback_and_bearer_is_case_insensitive() {
    let h = Harness::new();
    // Beyond loopback (every address), no token: admin and saga endpoints are off.
    let mut cfg = h.config(Mode::Saga);
    cfg.http_addr = "0.0.0.0:0".parse().unwrap();
    let app = h.start(cfg);
    let port = app.http_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let (status, body) = h.http("GET", &format!("{base}/admin/stats"), None, None);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("http.admin_token"), "{body}");
    assert_eq!(h.http("GET", &format!("{base}/sagas/acme/{SAGA}/o-1"), None, None).0, 403);
    assert_eq!(h.http("GET", &format!("{base}/health"), None, None).0, 200);
    assert_eq!(h.http("GET", &format!("{base}/metrics"), None, None).0, 200);
    app.shutdown();
    // With a token: `bearer` in any case, the token compared exactly.
    let mut cfg = h.config(Mode::Saga);
    cfg.http_addr = "0.0.0.0:0".parse().unwrap();
    cfg.admin_token = Some("0123456789abcdef-token".into());
    let app = h.start(cfg);
    let url = format!("http://127.0.0.1:{}/admin/stats", app.http_addr().unwrap().port());
    let get = |auth: &str| -> u16 {
        h.block_on(async {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let req = hyper::Request::get(&url).header("authorization", auth).body(Default::default()).unwrap();
            client.request(req).await.unwrap().status().as_u16()
        })
    };
    assert_eq!(get("Bearer 0123456789abcdef-token"), 200);
    assert_eq!(get("bearer 0123456789abcdef-token"), 200);
    assert_eq!(get("BEARER 0123456789abcdef-token"), 200);
    assert_eq!(get("Basic 0123456789abcdef-token"), 401);
    assert_eq!(get("Bearer 0123456789abcdef-tokeX"), 401);
    app.shutdown();
}

#[test]
fn a_data_directory_has_one_runner_at_a_time() {
    let h = Harness::new();
    let app = h.start(h.config(Mode::Saga));
    let second = runner::app::App::start(h.config(Mode::Saga), runner::app::AppOptions::default());
    let err = format!("{:#}", second.err().expect("a second runner started on the same data directory"));
    assert!(err.contains("is in use by process") && err.contains(&std::process::id().to_string()), "{err}");
    app.shutdown();
    // Released with the runner: the next one starts.
    h.start(h.config(Mode::Saga)).shutdown();
}

#[test]
fn the_cli_acts_on_a_running_runner_only_with_yes() {
    let h = Harness::new();
    let (gateway, app, base) = with_gateway(&h, |gateway, cfg| {
        gateway.script(|s| s.fail_next = 1);
        cfg.relay.max_attempts = Some(1);
    });
    h.place_order("p-cli", "o-cli");
    let letter = wait_dispatch_letter(&app, "acme");
    let at = letter["key"]["at"].as_u64().unwrap().to_string();
    let id = letter["key"]["id"].as_str().unwrap().to_owned();
    let resend = |extra: &[&str]| {
        runner_bin()
            .args(["deadletter", "resend", "--url", &base, "--tenant", "acme", "--at", &at, "--id", &id])
            .args(extra)
            .output()
            .unwrap()
    };
    let asked = resend(&[]);
    assert_eq!(asked.status.code(), Some(2), "{}", String::from_utf8_lossy(&asked.stderr));
    assert!(String::from_utf8_lossy(&asked.stderr).contains("--yes"));
    assert_eq!(resend(&["--dry-run"]).status.code(), Some(0));
    assert_eq!(gateway.records().len(), 1, "acted without --yes");
    let done = resend(&["--yes"]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(String::from_utf8_lossy(&done.stdout).contains(&id));
    wait_until(T, "the re-sent command is delivered", || gateway.records().len() == 2);
    let again = resend(&["--yes"]);
    assert_eq!(again.status.code(), Some(1), "a second re-send of the same letter succeeded");
    let reload = runner_bin().args(["reload", "--url", &base, "--yes"]).output().unwrap();
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    let drain = runner_bin().args(["drain", "--url", &base, "--yes"]).output().unwrap();
    assert!(drain.status.success(), "{}", String::from_utf8_lossy(&drain.stderr));
    assert_eq!(h.http("GET", &format!("{base}/ready"), None, None).0, 503, "not drained");
    // An order placed while drained waits in the stream; resume binds the consumers again.
    h.place_order("p-after-drain", "o-after-drain");
    let resume = runner_bin().args(["resume", "--url", &base, "--yes"]).output().unwrap();
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));
    wait_until(T, "ready again after resume", || h.http("GET", &format!("{base}/ready"), None, None).0 == 200);
    wait_until(T, "the order placed during the drain applied", || {
        h.http("GET", &format!("{base}/sagas/acme/{SAGA}/o-after-drain"), None, None).0 == 200
    });
    let again = runner_bin().args(["resume", "--url", &base, "--yes"]).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "a resume while not draining succeeded");
    app.shutdown();
}

#[test]
fn instances_are_listed_page_by_page_with_filters() {
    let h = Harness::new();
    let (_gateway, app, base) = with_gateway(&h, |_, _| {});
    let ids: Vec<String> = (0..30).map(|i| format!("o-{}-{i}", if i % 3 == 0 { "vip" } else { "std" })).collect();
    for id in &ids {
        h.place_order(&format!("p-{id}"), id);
    }
    let list = |q: &str| -> serde_json::Value {
        let (status, body) = h.http("GET", &format!("{base}/sagas?tenant=acme&saga={SAGA}{q}"), None, None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    wait_until(T, "30 instances", || list("&limit=1000")["count"] == 30);
    // Page by page: every instance once, in correlation-id order.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = list(&format!("&limit=7&cursor={cursor}"));
        assert!(page["count"].as_u64().unwrap() <= 7);
        seen.extend(
            page["instances"].as_array().unwrap().iter().map(|i| i["correlation_id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(n) => cursor = n.to_owned(),
            None => break,
        }
    }
    // Key order: correlation ids by length, then bytes.
    let mut expected = ids.clone();
    expected.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    assert_eq!(seen, expected);
    // Filters.
    assert_eq!(list("&correlation_prefix=o-vip")["count"], 10);
    assert_eq!(list("&status=running")["count"], 30);
    assert_eq!(list("&status=completed")["count"], 0);
    assert_eq!(list("&parked=true")["count"], 0);
    // Bad requests name the parameter; an unknown saga is a 404.
    assert_eq!(h.http("GET", &format!("{base}/sagas?tenant=acme"), None, None).0, 400);
    let (status, body) = h.http("GET", &format!("{base}/sagas?saga={SAGA}&status=maybe"), None, None);
    assert_eq!((status, body.contains("status")), (400, true), "{body}");
    assert_eq!(h.http("GET", &format!("{base}/sagas?saga=nope"), None, None).0, 404);
    // The CLI reads the same.
    let out = runner_bin()
        .args(["saga", "list", "--url", &base, "--tenant", "acme", "--saga", SAGA, "--correlation-prefix", "o-vip"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["count"], 10);
    app.shutdown();
}

#[test]
fn a_broken_reload_keeps_the_running_set_and_says_why() {
    let h = Harness::new();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = custom_saga(&dir, NOTE_PROGRAM, "", "");
    let gateway = HttpFixture::start().unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![manifest.clone()];
    cfg.effect_manifests = vec![];
    cfg.gateway_url = Some(gateway.url());
    let app = h.start(cfg);
    let base = format!("http://{}", app.http_addr().unwrap());
    // Break the program: the reload is refused with the file, saga, line.
    write(&dir, "p.rhai", "fn on_event(state, event) {\n  let x = ;\n}\n");
    let (status, body) = h.http("POST", &format!("{base}/admin/reload"), None, None);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("p.rhai") && body.contains("saga \\\"s\\\"") && body.contains("line 2"), "{body}");
    // The old program still runs.
    h.publish("events.t.x.E", &[], &serde_json::json!({"type": "E", "tenant_id": "t", "data": {"k": "a", "n": 1}}));
    wait_until(T, "the old program applied the event", || saga_state(&app, "t", "s", "a")["version"] == 1);
    // A good reload swaps it.
    write(&dir, "p.rhai", &NOTE_PROGRAM.replace("s.seen.push(event.data.n);", "s.seen.push(event.data.n * 10);"));
    let (status, body) = h.http("POST", &format!("{base}/admin/reload"), None, None);
    assert_eq!(status, 200, "{body}");
    h.publish("events.t.x.E", &[], &serde_json::json!({"type": "E", "tenant_id": "t", "data": {"k": "a", "n": 2}}));
    wait_until(T, "the new program applied", || {
        saga_state(&app, "t", "s", "a")["state"]["seen"] == serde_json::json!([1, 20])
    });
    app.shutdown();
}

#[test]
fn replay_needs_confirmation_and_then_rebuilds_without_dispatching_again() {
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.saga_manifests = vec![custom_saga(&dir, NOTE_PROGRAM, "", "")];
    cfg.effect_manifests = vec![];
    cfg.gateway_url = Some(gateway.url());
    let app = h.start(cfg);
    let base = format!("http://{}", app.http_addr().unwrap());
    for n in 1..=3 {
        h.publish("events.t.x.E", &[], &serde_json::json!({"type": "E", "tenant_id": "t", "data": {"k": "r", "n": n}}));
    }
    wait_until(T, "three notes at the gateway", || gateway.count() == 3);
    let before = saga_state(&app, "t", "s", "r");
    let req = serde_json::json!({"tenant": "t", "saga": "s", "correlation_id": "r"});
    let (status, body) = h.http("POST", &format!("{base}/admin/replay"), None, Some(req.clone()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("confirm") && body.contains("reset 1 instance"), "{body}");
    assert_eq!(saga_state(&app, "t", "s", "r")["version"], before["version"], "reset without confirmation");
    let mut confirmed = req;
    confirmed["confirm"] = serde_json::json!(true);
    let (status, body) = h.http("POST", &format!("{base}/admin/replay"), None, Some(confirmed));
    assert_eq!(status, 200, "{body}");
    let after = saga_state(&app, "t", "s", "r");
    assert_eq!(after["state"], before["state"]);
    assert_eq!(after["version"], before["version"]);
    wait_until(T, "suppressed items deleted", || {
        saga_state(&app, "t", "s", "r")["pending_outbox"].as_array().is_some_and(|a| a.is_empty())
    });
    assert_eq!(gateway.count(), 3, "replay dispatched again");
    app.shutdown();
}

#[test]
fn metrics_parse_as_prometheus_text_with_the_named_series() {
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    let mut cfg = h.config(Mode::Combined);
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    cfg.effect_manifests = vec![write(
        &dir,
        "effects.yaml",
        "effects:\n  - { name: charge_payment, provider: noop }\n  - { name: ship_order, provider: noop }\n  - { name: refund_payment, provider: noop }\n",
    )];
    cfg.gateway_url = Some(gateway.url());
    let app = h.start(cfg);
    let base = format!("http://{}", app.http_addr().unwrap());
    h.event(
        "acme",
        "order",
        "OrderPlaced",
        "p-1",
        serde_json::json!({"order_id": "m-1", "sku": "s", "qty": 1, "amount": 1, "customer": "c"}),
    );
    wait_until(T, "reserve", || gateway.count() == 1);
    h.event("acme", "inventory", "InventoryReserved", "r-1", serde_json::json!({"order_id": "m-1"}));
    wait_until(T, "completion", || h.saga(&app, "acme", "m-1")["status"] == "completed");
    let (status, text) = h.http("GET", &format!("{base}/metrics"), None, None);
    assert_eq!(status, 200);
    // Every line is a comment or `name{labels} value`.
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {line}");
    }
    for series in [
        "runner_consumer_lag",
        "runner_redeliveries_total",
        "runner_batch_size",
        "runner_commit_seconds",
        "runner_flush_seconds",
        "runner_transition_seconds",
        "runner_outbox_depth",
        "runner_dispatch_seconds",
        "runner_effect_outcomes_total",
        "runner_effect_seconds",
        "runner_breaker_state",
        "runner_deadletters_total",
        "runner_schedule_lag_seconds",
        "runner_transitions_total",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
    assert!(text.contains("shard=\"0\""), "series are not per shard");
    app.shutdown();
}

fn runner_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    // Tests read info lines: the caller's RUST_LOG must not filter them.
    cmd.env_remove("RUST_LOG");
    cmd
}

#[test]
fn sigterm_during_load_loses_nothing_and_repeats_nothing() {
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = custom_saga(&dir, NOTE_PROGRAM, "", "");
    let port = free_port();
    let config = write(
        h.dir.path(),
        "runner.toml",
        &format!(
            "mode = \"saga\"\ndata_dir = \"{}\"\nshards = 2\npin_cores = false\n[nats]\nurl = \"{}\"\n[sagas]\nmanifests = [\"{}\"]\n[effects]\nmanifests = []\n[gateway]\nurl = \"{}\"\n[http]\naddr = \"127.0.0.1:{port}\"\n",
            h.dir.path().join("data").display(),
            h.nats.url(),
            manifest.display(),
            gateway.url()
        ),
    );
    let start = || {
        runner_bin()
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = start();
    let base = format!("http://127.0.0.1:{port}");
    let ready = || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && h.http("GET", &format!("{base}/ready"), None, None).0 == 200
    };
    wait_until(T, "the runner ready", ready);
    const KEYS: u64 = 50;
    const PER: u64 = 200;
    let mut msgs = Vec::new();
    for n in 0..PER {
        for k in 0..KEYS {
            let body = serde_json::json!({"type": "E", "tenant_id": "t", "data": {"k": format!("k{k}"), "n": n}});
            msgs.push((format!("events.t.x.E{k}"), vec![], bytes::Bytes::from(serde_json::to_vec(&body).unwrap())));
        }
    }
    // Publish while the runner works, and stop it in the middle.
    let (status, at_signal) = std::thread::scope(|scope| {
        scope.spawn(|| h.publish_many(msgs));
        wait_until(T, "load under way", || gateway.count() >= 200);
        let at_signal = gateway.count();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        (child.wait().unwrap(), at_signal)
    });
    assert!(status.success(), "runner exited with {status} on SIGTERM");
    assert!(at_signal < (KEYS * PER) as usize, "the load finished before the signal; the test proved nothing");
    let mut child = start();
    wait_until(Duration::from_secs(60), "every event applied after the restart", || {
        (0..KEYS).all(|k| {
            let (s, body) = h.http("GET", &format!("{base}/sagas/t/s/k{k}"), None, None);
            s == 200 && serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"] == PER
        })
    });
    wait_until(T, "all notes at the gateway", || gateway.count() >= (KEYS * PER) as usize);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let mut per_key = std::collections::BTreeMap::new();
    for r in gateway.records() {
        *per_key.entry(r.header("idempotency-key").unwrap().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(per_key.len(), (KEYS * PER) as usize, "a command was lost");
    assert!(per_key.values().all(|&n| n == 1), "a command was sent twice");
    // Each instance saw its events in order, once.
    let app_data = h.dir.path().join("data");
    let out = runner_bin().args(["saga", "get", "t", "s", "k7", "--data"]).arg(&app_data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"]["seen"], serde_json::json!((0..PER).collect::<Vec<_>>()));
}

#[test]
fn json_logs_carry_tenant_correlation_command_and_trace_ids() {
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.fail_next = 1);
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let effects = write(
        &dir,
        "e.yaml",
        &format!(
            "effects:\n  - name: pay\n    provider: http\n    settings: {{ url: \"{}/pay\" }}\n    retry: {{ attempts: 2, backoff_ms: 10, max_backoff_ms: 10, jitter: 0 }}\n",
            upstream.url()
        ),
    );
    let config = write(
        h.dir.path(),
        "runner.yaml",
        &format!(
            "mode: effect\ndata_dir: {}\nshards: 1\npin_cores: false\nnats: {{ url: \"{}\" }}\neffects: {{ manifests: [\"{}\"] }}\nhttp: {{ addr: \"127.0.0.1:{}\" }}\nlog: {{ format: json, level: info }}\n",
            h.dir.path().join("data").display(),
            h.nats.url(),
            effects.display(),
            free_port()
        ),
    );
    let child = runner_bin()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = serde_json::json!({"command_id": "cmd-77", "tenant_id": "acme", "effect": "pay", "saga": "order", "correlation_id": "o-77", "payload": {}, "traceparent": tp});
    wait_until(T, "the runner's consumer", || h.block_on(async { h.js.get_stream("WORKFLOW_COMMANDS").await.is_ok() }));
    h.publish("workflow.commands.acme.pay", &[("Nats-Msg-Id", "cmd-77")], &body);
    wait_until(T, "the result", || h.read_stream("WORKFLOW_EVENTS").len() == 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> =
        logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}"))).collect();
    let retry = lines
        .iter()
        .find(|l| l["message"] == "effect call failed; retrying")
        .unwrap_or_else(|| panic!("no retry line in:\n{logs}"));
    let span = &retry["span"];
    assert_eq!(span["tenant"], "acme", "{retry}");
    assert_eq!(span["correlation_id"], "o-77");
    assert_eq!(span["command_id"], "cmd-77");
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(lines.iter().any(|l| l["message"] == "runner started"));
}

#[test]
fn config_errors_name_the_field_and_check_passes_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.toml", "shards = 0\n[consumers]\nbatch = 0\n[http]\naddr = \"x\"\n");
    let out = runner_bin().args(["check", "--config"]).arg(&bad).env_remove("RUNNER_CONFIG").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for f in ["field `shards` = 0", "field `consumers.batch` = 0", "field `http.addr` = \"x\""] {
        assert!(err.contains(f), "{f} missing in:\n{err}");
    }
    let out = runner_bin().arg("check").current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 saga(s) [order_fulfillment]"));
    let out = runner_bin().args(["saga", "get", "t", "s", "x", "--data"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a runner data directory"));
}

/// A `runner serve` process whose affinity mask is `cpus` (what `taskset -c` or
/// `docker --cpuset-cpus` give it), with one saga and `shards` shards.
fn serve_on_cpus(
    h: &Harness,
    label: &str,
    cpus: &'static [usize],
    shards: usize,
    pin: bool,
    port: u16,
) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let dir = h.dir.path().join(label);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = custom_saga(&dir, NOTE_PROGRAM, "", "");
    let config = write(
        &dir,
        "runner.toml",
        &format!(
            "mode = \"saga\"\ndata_dir = \"{}\"\nshards = {shards}\npin_cores = {pin}\n[nats]\nurl = \"{}\"\n[sagas]\nmanifests = [\"{}\"]\n[effects]\nmanifests = []\n[gateway]\nurl = \"http://127.0.0.1:9\"\n[http]\naddr = \"127.0.0.1:{port}\"\n",
            dir.join("data").display(),
            h.nats.url(),
            manifest.display(),
        ),
    );
    let mut cmd = runner_bin();
    cmd.args(["serve", "--config"]).arg(&config).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and makes one system call
    // on a set built on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Each thread of process `pid` by name, with the CPUs it may run on (`Cpus_allowed_list`).
fn thread_cpus(pid: u32) -> std::collections::BTreeMap<String, String> {
    let mut threads = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(name), Ok(status)) =
            (std::fs::read_to_string(task.join("comm")), std::fs::read_to_string(task.join("status")))
        else {
            continue; // the thread ended meanwhile
        };
        let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_owned();
        threads.insert(name.trim().to_owned(), cpus);
    }
    threads
}

/// The CPUs of the thread named `name` (glommio adds `-<executor id>` to a shard's name).
fn cpus_of<'a>(threads: &'a std::collections::BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    threads
        .iter()
        .find(|(t, _)| *t == name || t.strip_prefix(name).is_some_and(|rest| rest.starts_with('-')))
        .map(|(_, cpus)| cpus.as_str())
}

fn ready(h: &Harness, port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        && h.http("GET", &format!("http://127.0.0.1:{port}/ready"), None, None).0 == 200
}

fn stop(child: std::process::Child) -> String {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "runner exited with {} on SIGTERM", out.status);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sigterm_during_the_start_drains_and_stops_cleanly() {
    use std::io::BufRead;
    let h = Harness::new();
    let port = free_port();
    let mut child = serve_on_cpus(&h, "early", &[0, 1], 1, true, port);
    // The placement line comes from inside the start, before anything serves.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut logs = String::new();
    while !logs.contains("CPU placement") {
        assert!(stderr.read_line(&mut logs).unwrap() > 0, "the runner ended during its start:\n{logs}");
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
    assert!(status.success(), "a SIGTERM during the start ended the runner with {status}:\n{logs}");
    assert!(logs.contains("shutting down: draining"), "{logs}");
}

#[test]
fn pinning_follows_the_process_cpu_mask() {
    let h = Harness::new();
    // Under `taskset -c 1` the one shard pins to CPU 1, not to the machine's first CPU. The
    // mask has no CPU left, so the bridge stays unpinned within it.
    let port = free_port();
    let child = serve_on_cpus(&h, "mask-1", &[1], 1, true, port);
    wait_until(T, "the runner on CPU 1 ready", || ready(&h, port));
    let threads = thread_cpus(child.id());
    assert_eq!(cpus_of(&threads, "shard-0"), Some("1"), "{threads:?}");
    assert_eq!(cpus_of(&threads, "bridge"), Some("1"), "{threads:?}");
    stop(child);
    // With room in the mask, the bridge and the operations thread take the CPU the shard
    // does not use: they never share one.
    let port = free_port();
    let child = serve_on_cpus(&h, "mask-0-1", &[0, 1], 1, true, port);
    wait_until(T, "the runner on CPUs 0-1 ready", || ready(&h, port));
    let threads = thread_cpus(child.id());
    assert_eq!(cpus_of(&threads, "shard-0"), Some("0"), "{threads:?}");
    assert_eq!(cpus_of(&threads, "bridge"), Some("1"), "{threads:?}");
    assert_eq!(cpus_of(&threads, "ops-http"), Some("1"), "{threads:?}");
    let logs = stop(child);
    assert!(logs.contains("mask=0-1"), "the start does not say where threads run:\n{logs}");
}

#[test]
fn more_shards_than_the_mask_has_cpus_are_refused_when_pinned() {
    let h = Harness::new();
    let port = free_port();
    let mut child = serve_on_cpus(&h, "pinned", &[1], 2, true, port);
    let mut status = None;
    wait_until(T, "the runner to refuse or serve", || {
        status = child.try_wait().unwrap();
        status.is_some() || ready(&h, port)
    });
    if status.is_none() {
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        panic!("2 pinned shards started on a mask of 1 CPU");
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for part in ["2 shards", "1 CPU", "(mask 1)", "`shards`", "`pin_cores = false`"] {
        assert!(err.contains(part), "{part:?} missing in:\n{err}");
    }
    // Without pinning they run, sharing the mask's CPU, with a warning.
    let port = free_port();
    let child = serve_on_cpus(&h, "unpinned", &[1], 2, false, port);
    wait_until(T, "the unpinned runner ready", || ready(&h, port));
    let threads = thread_cpus(child.id());
    for t in ["shard-0", "shard-1", "bridge"] {
        assert_eq!(cpus_of(&threads, t), Some("1"), "{t}: {threads:?}");
    }
    let logs = stop(child);
    assert!(logs.contains("WARN") && logs.contains("mask=1"), "no warning about sharing CPUs:\n{logs}");
}
