//! Fault suite, part 1: SIGKILL at every named crash point (the `runner` binary built with
//! `--features failpoints`), restart, finish; the independent checker finds nothing lost
//! and nothing repeated. Each test asserts that its crash really happened.

mod support;

use std::time::{Duration, Instant};
use support::fault::*;

const T: Duration = Duration::from_secs(90);

fn crash_at(name: &str, point: &str, nth: u32) {
    let _serial = serial();
    let mut sc = Scenario::new(name);
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    let log = sc.h.dir.path().join("crash.log");
    let mut p = RunnerProcess::start(&cfg, port, &[("RUNNER_FAILPOINTS", &format!("{point}:{nth}"))], &log);
    p.wait_ready(&sc.h, T);
    let load = sc.plan_load(TENANT, 10, 30);
    sc.h.publish_many(load);
    let signal = p.wait_exit(T);
    sc.crashes.push(Instant::now());
    let text = p.log();
    assert!(
        text.contains(&format!("failpoint {point} hit")),
        "the crash point {point} was never hit (was the runner built with --features failpoints?); log:\n{text}"
    );
    assert_eq!(signal, Some(9), "not killed by SIGKILL; log:\n{text}");
    let mut p = RunnerProcess::start(&cfg, port, &[], &sc.h.dir.path().join("after.log"));
    p.wait_ready(&sc.h, T);
    sc.wait_complete(&[port], T);
    let report = sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
    assert_eq!(report.events, 300);
}

#[test]
fn crash_after_the_saga_commit_before_the_ack() {
    crash_at("crash-after-commit-before-ack", "shard.after_commit_before_ack", 3);
}

#[test]
fn crash_after_the_commit_before_dispatch() {
    crash_at("crash-after-commit-before-dispatch", "shard.after_commit_before_dispatch", 3);
}

#[test]
fn crash_after_dispatch_before_the_outbox_delete() {
    crash_at("crash-after-dispatch-before-delete", "dispatch.after_confirm_before_delete", 3);
}

/// A split deployment: a saga runner, and an effect runner (the effect fleet) that dies at
/// `point`; the effect runner restarts, everything finishes, the checker reads both.
fn crash_effect_runner_at(name: &str, point: &str, nth: u32) {
    let _serial = serial();
    let mut sc = Scenario::new(name);
    let (saga_port, effect_port) = (free_port(), free_port());
    let dir = sc.h.dir.path().to_owned();
    let sagas = sc.config_mode("s", "saga", 2, saga_port, &dir.join("data-s"), "");
    let effects = sc.config_mode("e", "effect", 2, effect_port, &dir.join("data-e"), "");
    let mut s = RunnerProcess::start(&sagas, saga_port, &[], &dir.join("sagas.log"));
    let mut e = RunnerProcess::start(
        &effects,
        effect_port,
        &[("RUNNER_FAILPOINTS", &format!("{point}:{nth}"))],
        &dir.join("crash.log"),
    );
    s.wait_ready(&sc.h, T);
    e.wait_ready(&sc.h, T);
    let load = sc.plan_load(TENANT, 10, 30);
    sc.h.publish_many(load);
    let signal = e.wait_exit(T);
    sc.crashes.push(Instant::now());
    let text = e.log();
    assert!(text.contains(&format!("failpoint {point} hit")), "the crash point {point} was never hit; log:\n{text}");
    assert_eq!(signal, Some(9), "not killed by SIGKILL; log:\n{text}");
    let mut e = RunnerProcess::start(&effects, effect_port, &[], &dir.join("after.log"));
    e.wait_ready(&sc.h, T);
    sc.wait_complete(&[saga_port], T);
    let report = sc.finish(&mut [&mut s, &mut e], &[dir.join("data-s"), dir.join("data-e")]);
    assert_eq!(report.events, 300);
}

#[test]
fn crash_in_place_after_the_effect_call_before_its_result_commits() {
    // Combined mode: the saga's shard ran the call; the result dies with the process, the
    // outbox item stays, the call runs again after the restart (same idempotency key).
    crash_at("crash-in-place-after-call-before-commit", "effect.after_call_before_commit", 40);
}

#[test]
fn crash_after_the_effect_started_record_before_the_provider_call() {
    crash_effect_runner_at("crash-effect-started-before-call", "effect.after_started_before_call", 40);
}

#[test]
fn crash_after_the_provider_call_before_the_result_publish() {
    crash_effect_runner_at("crash-effect-after-call-before-publish", "effect.after_call_before_publish", 40);
}

#[test]
fn crash_after_the_result_puback_before_completed() {
    crash_effect_runner_at("crash-effect-after-puback-before-completed", "effect.after_puback_before_completed", 40);
}

#[test]
fn crash_during_a_timer_firing() {
    // The first batch that fires timers: with timers waiting for the streams' watermark, the
    // load's timers fall due in a few batches, not one per due time.
    crash_at("crash-timer-firing", "shard.timer_fired_before_commit", 1);
}

#[test]
fn crash_during_a_partition_move() {
    let _serial = serial();
    let mut sc = Scenario::new("crash-partition-move");
    let port = free_port();
    let two = sc.config("a", 2, port, "");
    let mut p = RunnerProcess::start(&two, port, &[], &sc.h.dir.path().join("two.log"));
    p.wait_ready(&sc.h, T);
    sc.publish_load(TENANT, 10, 20, 0);
    sc.wait_complete(&[port], T);
    assert!(p.sigterm());
    // Same data directory, three shards: the move dies after its first copy.
    let three = sc.config("a", 3, port, "");
    let mut p = RunnerProcess::start(
        &three,
        port,
        &[("RUNNER_FAILPOINTS", "move.after_copy:1")],
        &sc.h.dir.path().join("move.log"),
    );
    let signal = p.wait_exit(T);
    sc.crashes.push(Instant::now());
    assert!(p.log().contains("failpoint move.after_copy hit"), "{}", p.log());
    assert_eq!(signal, Some(9));
    let mut p = RunnerProcess::start(&three, port, &[], &sc.h.dir.path().join("after.log"));
    p.wait_ready(&sc.h, T);
    sc.publish_load(TENANT, 10, 10, 20);
    sc.wait_complete(&[port], T);
    sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
}

/// Dead letters of `TENANT` at `port`, or `None` while the runner does not answer.
fn letters_at(sc: &Scenario, port: u16) -> Option<Vec<serde_json::Value>> {
    let url = format!("http://127.0.0.1:{port}/admin/deadletters?tenant={TENANT}&limit=1000");
    let (status, body) = sc.h.http("GET", &url, None, None);
    if status != 200 {
        return None;
    }
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    Some(listed["deadletters"].as_array().cloned().unwrap_or_default())
}

/// The sum of a counter's series in the runner's `/metrics` at `port`.
fn counter(sc: &Scenario, port: u16, name: &str) -> f64 {
    let (status, text) = sc.h.http("GET", &format!("http://127.0.0.1:{port}/metrics"), None, None);
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the runner's log says it applied alone after a restart: messages and milliseconds,
/// summed over its consumers.
fn applied_alone(log: &str) -> (u64, u64) {
    let field = |line: &str, name: &str| -> u64 {
        line.split(name).nth(1).and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
    };
    log.lines()
        .filter(|l| l.contains("were applied one at a time"))
        .fold((0, 0), |(n, ms), l| (n + field(l, "suspects="), ms + field(l, "took_ms=")))
}

/// Issue 17 item 16: an event whose processing kills the process (a crash point armed at
/// every start, as a panic under `panic = "abort"`, a stack overflow or an abort in a
/// dependency would) is quarantined once it has crashed the process `consumers.max_crashes`
/// times (default 3), as a supervisor restarts it. The runner then stays up, and every
/// other event is applied exactly once.
#[test]
fn a_message_that_crashes_the_process_is_quarantined_after_three_crashes() {
    let _serial = serial();
    let mut sc = Scenario::new("crash-inducing-message");
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    let armed = [("RUNNER_FAILPOINTS", "shard.apply_marked")];
    let mut p = RunnerProcess::start(&cfg, port, &armed, &sc.h.dir.path().join("start-1.log"));
    p.wait_ready(&sc.h, T);
    let before = sc.plan_load(TENANT, 10, 10);
    sc.h.publish_many(before);
    let poison = "t-poison-e0";
    let body = serde_json::json!({"id": poison, "type": "Entry", "tenant_id": TENANT,
        "data": {"k": "t-poison", "n": 0, "crash_process": true}});
    let seq = sc.h.publish("events.t.ledger.Entry", &[("Nats-Msg-Id", poison)], &body);
    let after = sc.plan_events(TENANT, 10, 10, 10, &|_, _| None);
    sc.h.publish_many(after);

    let settled = |sc: &Scenario| {
        sc.incomplete_where(&[port], &|_| true).is_none() && letters_at(sc, port).is_some_and(|l| !l.is_empty())
    };
    let (mut p, died) = supervise(&mut sc, p, &cfg, &armed, 6, T, &settled);
    assert_eq!(died.len(), 3, "the runner should die three times on the message, then quarantine it");
    for log in &died {
        assert!(log.contains("failpoint shard.apply_marked hit"), "died of something else; log:\n{log}");
    }
    let letters = letters_at(&sc, port).unwrap();
    assert_eq!(letters.len(), 1, "only the crash-inducing message is a dead letter: {letters:#?}");
    let letter = &letters[0];
    assert_eq!(letter["kind"], "poison", "{letter:#}");
    assert_eq!(letter["seq"], seq, "{letter:#}");
    assert_eq!(letter["correlation_id"], "t-poison", "{letter:#}");
    let error = letter["error"].as_str().unwrap();
    let named = [
        "crashed the process 3 times".to_owned(),
        format!("stream AGGREGATE_EVENTS, sequence {seq}"),
        "tenant \"t\"".to_owned(),
        "saga \"ledger\"".to_owned(),
        "key \"t-poison\"".to_owned(),
    ];
    for part in &named {
        assert!(error.contains(part.as_str()), "the reason does not say {part:?}: {error}");
    }
    assert!(
        sc.h.read_stream("AGGREGATE_EVENTS").iter().any(|m| m.seq == seq),
        "the message was removed from the stream (only our consumer may settle it)"
    );
    // The runner stays up and goes on with new events.
    sc.publish_load(TENANT, 10, 5, 20);
    sc.wait_complete(&[port], T);
    assert!(p.child.try_wait().unwrap().is_none(), "the runner died after the quarantine; log:\n{}", p.log());
    let report = sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
    assert_eq!(report.events, 250);
    sc.record_with(&report, &format!(", deaths {}, dead letters 1", died.len()));
}

/// Issue 17 item 16, before a shard: a message whose decoding kills the process (a crash
/// point in the bridge's decoder) dies once more when its quarantine decodes it, and is then
/// filed raw, undecoded; everything else is applied exactly once.
#[test]
fn a_message_whose_decoding_crashes_the_process_is_filed_raw() {
    let _serial = serial();
    let mut sc = Scenario::new("crash-decoding-message");
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    let armed = [("RUNNER_FAILPOINTS", "bridge.decode_marked")];
    let mut p = RunnerProcess::start(&cfg, port, &armed, &sc.h.dir.path().join("start-1.log"));
    p.wait_ready(&sc.h, T);
    let before = sc.plan_load(TENANT, 5, 10);
    sc.h.publish_many(before);
    let body = serde_json::json!({"id": "t-bad-e0", "type": "Entry", "tenant_id": TENANT,
        "data": {"k": "t-bad", "n": 0, "crash_decode": true}});
    let seq = sc.h.publish("events.t.ledger.Entry", &[("Nats-Msg-Id", "t-bad-e0")], &body);
    let after = sc.plan_events(TENANT, 5, 10, 10, &|_, _| None);
    sc.h.publish_many(after);
    let settled = |sc: &Scenario| {
        sc.incomplete_where(&[port], &|_| true).is_none() && letters_at(sc, port).is_some_and(|l| !l.is_empty())
    };
    let (mut p, died) = supervise(&mut sc, p, &cfg, &armed, 7, T, &settled);
    // Delivered, then alone twice, then once more while its quarantine decoded it.
    assert_eq!(died.len(), 4, "deaths");
    for log in &died {
        assert!(log.contains("failpoint bridge.decode_marked hit"), "died of something else; log:\n{log}");
    }
    let letters = letters_at(&sc, port).unwrap();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!((&letter["kind"], &letter["seq"]), (&serde_json::json!("undecodable"), &serde_json::json!(seq)));
    let error = letter["error"].as_str().unwrap();
    assert!(error.contains("crashed the process 4 times"), "{error}");
    assert!(error.contains(&format!("stream AGGREGATE_EVENTS, sequence {seq}")), "{error}");
    assert!(error.contains("kept raw, undecoded"), "{error}");
    assert!(letter["raw"].as_str().unwrap().contains("crash_decode"), "{letter:#}");
    let report = sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
    assert_eq!(report.events, 100);
    sc.record_with(&report, &format!(", deaths {}, dead letters 1 (raw)", died.len()));
}

/// Issue 17 item 16, the other side: messages merely in flight when the process is killed
/// (here after a commit, before its acks) run again as usual after the restart, nothing runs
/// alone and nothing is quarantined.
#[test]
fn a_single_sigkill_with_messages_in_flight_quarantines_nothing() {
    let _serial = serial();
    let mut sc = Scenario::new("sigkill-quarantines-nothing");
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    let dir = sc.h.dir.path().to_owned();
    let armed = [("RUNNER_FAILPOINTS", "shard.after_commit_before_ack:3")];
    let mut p = RunnerProcess::start(&cfg, port, &armed, &dir.join("crash.log"));
    p.wait_ready(&sc.h, T);
    let load = sc.plan_load(TENANT, 10, 30);
    sc.h.publish_many(load);
    assert_eq!(p.wait_exit(T), Some(9), "not killed; log:\n{}", p.log());
    sc.crashes.push(Instant::now());
    let mut p = RunnerProcess::start(&cfg, port, &[], &dir.join("after.log"));
    p.wait_ready(&sc.h, T);
    sc.wait_complete(&[port], T);
    assert!(p.log().contains("were run again"), "nothing was in flight; log:\n{}", p.log());
    assert_eq!(counter(&sc, port, "runner_crash_suspects_total"), 0.0, "one crash made messages run alone");
    assert_eq!(letters_at(&sc, port).unwrap(), Vec::<serde_json::Value>::new(), "a message was quarantined");
    let report = sc.finish(&mut [&mut p], &[dir.join("data-a")]);
    assert_eq!(report.events, 300);
}

/// Issue 17 item 16: killed again while the messages in flight at the first kill run again,
/// the runner applies them one at a time at the next start, each counted first; none died
/// while it ran alone, so none is quarantined (`max_crashes` at its least, 3).
#[test]
fn two_sigkills_in_a_row_run_the_messages_alone_and_quarantine_nothing() {
    let _serial = serial();
    let mut sc = Scenario::new("two-sigkills-quarantine-nothing");
    let port = free_port();
    let cfg = sc.config("a", 2, port, "max_crashes = 3\n");
    let dir = sc.h.dir.path().to_owned();
    let mut p = RunnerProcess::start(
        &cfg,
        port,
        &[("RUNNER_FAILPOINTS", "shard.after_commit_before_ack:3")],
        &dir.join("crash-1.log"),
    );
    p.wait_ready(&sc.h, T);
    let load = sc.plan_load(TENANT, 10, 30);
    sc.h.publish_many(load);
    assert_eq!(p.wait_exit(T), Some(9), "not killed; log:\n{}", p.log());
    sc.crashes.push(Instant::now());
    // Killed again while the messages in flight run again (after the 20th is handed on).
    let mut p =
        RunnerProcess::start(&cfg, port, &[("RUNNER_FAILPOINTS", "bridge.rerun_handed:20")], &dir.join("crash-2.log"));
    assert_eq!(p.wait_exit(T), Some(9), "not killed; log:\n{}", p.log());
    assert!(p.log().contains("failpoint bridge.rerun_handed hit"), "{}", p.log());
    sc.crashes.push(Instant::now());
    let mut p = RunnerProcess::start(&cfg, port, &[], &dir.join("after.log"));
    p.wait_ready(&sc.h, T);
    sc.wait_complete(&[port], T);
    let alone = counter(&sc, port, "runner_crash_suspects_total");
    assert!(alone > 0.0, "no message was applied alone after two crashes in a row");
    assert_eq!(letters_at(&sc, port).unwrap(), Vec::<serde_json::Value>::new(), "a message was quarantined");
    let report = sc.finish(&mut [&mut p], &[dir.join("data-a")]);
    assert_eq!(report.events, 300);
    let (n, ms) = applied_alone(&p.log());
    sc.record_with(&report, &format!(", applied alone after the second restart {n} in {ms} ms"));
}
