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
