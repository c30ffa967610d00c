//! Fault suite, part 2: runs under load with real processes — random SIGKILLs, NATS
//! restarts, two instances with disjoint tenant ranges and a rolling restart, a shard-count
//! change mid-run, a controlled replay. Each ends with the independent checker passing.
//! CI-sized by default; `RUNNER_SOAK=1` runs the long variants (see tests/FAULTS.md).

mod support;

use std::time::{Duration, Instant};
use support::fault::*;
use support::*;

const T: Duration = Duration::from_secs(180);

fn soak() -> bool {
    std::env::var_os("RUNNER_SOAK").is_some()
}

/// xorshift64*, seeded from the clock and printed so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("RUNNER_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("RUNNER_FAULT_SEED={seed}");
        Rng(seed)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        lo + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (hi - lo + 1)
    }
}

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

#[test]
fn random_sigkills_during_a_run() {
    let _serial = serial();
    let mut sc = Scenario::new("random-sigkills");
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    // One "order" here is one ledger event: a transition, a Gateway call, an effect call
    // through the upstream, its result, and a timer on every tenth.
    let (keys, per) = if soak() { (200, 100) } else { (100, 50) };
    let load = sc.plan_load(TENANT, keys, per);
    let total = load.len();
    let mut rng = Rng::seeded();
    let dir = sc.h.dir.path().to_owned();
    let mut p = RunnerProcess::start(&cfg, port, &[], &dir.join("run-0.log"));
    p.wait_ready(&sc.h, T);
    // Kills land at random points of the load's progress (effect calls seen upstream), then
    // a random 0–300 ms later, wherever the runner is: timing does not depend on how fast
    // this build or machine runs, so every planned kill lands while work is in flight.
    let kills = if soak() { 10 } else { 5 };
    let mut points: Vec<usize> =
        (0..kills).map(|_| rng.between(total as u64 / 20, total as u64 * 9 / 10) as usize).collect();
    points.sort_unstable();
    let mut crashes = Vec::new();
    std::thread::scope(|s| {
        let h = &sc.h;
        s.spawn(move || h.publish_many(load));
        for point in points {
            wait_until(T, &format!("{point} of {total} effect calls before a kill"), || sc.upstream.count() >= point);
            // Fault timing, not synchronisation.
            std::thread::sleep(Duration::from_millis(rng.between(0, 300)));
            p.sigkill();
            crashes.push((Instant::now(), sc.upstream.count()));
            p = RunnerProcess::start(&cfg, port, &[], &dir.join(format!("run-{}.log", crashes.len())));
            p.wait_ready(&sc.h, T);
        }
    });
    let during = crashes.iter().filter(|(_, calls)| *calls < total).count();
    assert!(during >= 3, "only {during} of {kills} kills landed before the last effect call ({crashes:?})");
    sc.crashes = crashes.into_iter().map(|(at, _)| at).collect();
    sc.wait_complete(&[port], T);
    let report = sc.finish(&mut [&mut p], &[dir.join("data-a")]);
    assert_eq!(report.events, total);
}

#[test]
fn nats_server_killed_and_restarted_twice_during_a_run() {
    let _serial = serial();
    let mut sc = Scenario::new("nats-restarts");
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    let mut p = RunnerProcess::start(&cfg, port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    for round in 0..3u64 {
        sc.publish_load(TENANT, 20, 10, round * 10);
        if round == 2 {
            break;
        }
        let target = sc.upstream.count() + 20;
        wait_until(T, "work under way", || sc.upstream.count() >= target);
        sc.h.nats.kill();
        // A result publish in flight may fail and its effect run again: a crash in between.
        sc.crashes.push(Instant::now());
        wait_until(T, "the runner to report NATS down", || {
            let (status, body) = sc.h.http("GET", &url(port, "/ready"), None, None);
            status == 503 && body.contains("\"nats_connected\": false")
        });
        // Liveness is not readiness: an outage of NATS must not make an orchestrator kill
        // and replace a runner that works (/health), only stop sending it traffic (/ready).
        let (status, body) = sc.h.http("GET", &url(port, "/health"), None, None);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"connected\": false"), "{body}");
        // The outage ends here: an effect called during it (its command fetched before the
        // kill) whose result could not be published runs again after the restart.
        sc.crashes.push(Instant::now());
        sc.h.nats.restart().unwrap();
        wait_until(T, "the runner ready again", || sc.h.http("GET", &url(port, "/ready"), None, None).0 == 200);
    }
    sc.wait_complete(&[port], T);
    assert!(p.log().contains("nats connected") || p.log().contains("reconnected"), "{}", p.log());
    let report = sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
    assert_eq!(report.events, 600);
}

/// Consumer settings of an instance that owns one tenant.
fn tenant_range(t: &str) -> String {
    format!(
        "durable_prefix = \"runner-{t}\"\naggregate_filters = [\"events.{t}.>\"]\nresult_filters = [\"workflow.events.{t}.>\"]\ncommand_filters = [\"workflow.commands.{t}.>\"]\n"
    )
}

#[test]
fn two_instances_with_disjoint_tenant_ranges_survive_a_rolling_restart() {
    let _serial = serial();
    let mut sc = Scenario::new("tenant-ranges-rolling-restart");
    let dir = sc.h.dir.path().to_owned();
    let (pa, pb) = (free_port(), free_port());
    let ca = sc.config("a", 2, pa, &tenant_range("a"));
    let cb = sc.config("b", 2, pb, &tenant_range("b"));
    let mut a = RunnerProcess::start(&ca, pa, &[], &dir.join("a-0.log"));
    let mut b = RunnerProcess::start(&cb, pb, &[], &dir.join("b-0.log"));
    a.wait_ready(&sc.h, T);
    b.wait_ready(&sc.h, T);
    let la = sc.plan_load("a", 20, 30);
    let lb = sc.plan_load("b", 20, 30);
    let load: Vec<Outgoing> = la.into_iter().zip(lb).flat_map(|(x, y)| [x, y]).collect();
    std::thread::scope(|s| {
        let h = &sc.h;
        s.spawn(move || h.publish_many(load));
        wait_until(T, "load under way", || sc.upstream.count() >= 150);
        // One at a time: stop (drain), start, ready; then the other.
        assert!(a.sigterm(), "instance a did not drain cleanly:\n{}", a.log());
        a = RunnerProcess::start(&ca, pa, &[], &dir.join("a-1.log"));
        a.wait_ready(&sc.h, T);
        // Calls go on after the restart (or the load was done by then: 1,200 calls in all).
        let target = (sc.upstream.count() + 150).min(1_200);
        wait_until(T, "load under way after a's restart", || sc.upstream.count() >= target);
        assert!(b.sigterm(), "instance b did not drain cleanly:\n{}", b.log());
        b = RunnerProcess::start(&cb, pb, &[], &dir.join("b-1.log"));
        b.wait_ready(&sc.h, T);
    });
    sc.wait_complete(&[pa, pb], T);
    assert!(a.sigterm() && b.sigterm());
    // Each range's instances live only in its own runner's data dir.
    let holds = |data: &str, tenant: &str, key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["saga", "get", tenant, LEDGER_SAGA, key, "--data"])
            .arg(dir.join(data))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(holds("data-a", "a", "a-k0") && holds("data-b", "b", "b-k0"));
    assert!(!holds("data-a", "b", "b-k0") && !holds("data-b", "a", "a-k0"), "a range was processed by both instances");
    let report = sc.finish(&mut [], &[dir.join("data-a"), dir.join("data-b")]);
    assert_eq!(report.events, 1200);
}

#[test]
fn restart_with_a_different_shard_count_during_a_run() {
    let _serial = serial();
    let mut sc = Scenario::new("shard-count-change");
    let dir = sc.h.dir.path().to_owned();
    let port = free_port();
    let load = sc.plan_load(TENANT, 30, 40);
    let total = load.len();
    let mut p = RunnerProcess::start(&sc.config("a", 2, port, ""), port, &[], &dir.join("two.log"));
    p.wait_ready(&sc.h, T);
    std::thread::scope(|s| {
        let h = &sc.h;
        s.spawn(move || h.publish_many(load));
        wait_until(T, "load under way", || sc.upstream.count() >= 200);
        // A planned scale-up (drain, restart with three shards) ...
        assert!(p.sigterm());
        p = RunnerProcess::start(&sc.config("a", 3, port, ""), port, &[], &dir.join("three.log"));
        p.wait_ready(&sc.h, T);
        wait_until(T, "more load done", || sc.upstream.count() >= 600);
        // ... then a crash, and a restart on one shard.
        p.sigkill();
        sc.crashes.push(Instant::now());
        p = RunnerProcess::start(&sc.config("a", 1, port, ""), port, &[], &dir.join("one.log"));
        p.wait_ready(&sc.h, T);
    });
    let moves: Vec<String> =
        ["three.log", "one.log"].iter().map(|f| std::fs::read_to_string(dir.join(f)).unwrap()).collect();
    for (log, (from, to)) in moves.iter().zip([(2, 3), (3, 1)]) {
        assert!(
            log.contains("partition move finished")
                && log.contains(&format!("from={from}"))
                && log.contains(&format!("to={to}")),
            "no {from}->{to} move:\n{log}"
        );
    }
    sc.wait_complete(&[port], T);
    let report = sc.finish(&mut [&mut p], &[dir.join("data-a")]);
    assert_eq!(report.events, total);
}

#[test]
fn a_controlled_replay_from_sequence_zero_rebuilds_identically_without_dispatching() {
    let _serial = serial();
    let mut sc = Scenario::new("replay-from-zero");
    let port = free_port();
    let mut p = RunnerProcess::start(&sc.config("a", 2, port, ""), port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    sc.publish_load(TENANT, 10, 20, 0);
    sc.wait_complete(&[port], T);
    let keys: Vec<String> = (0..10).map(|k| format!("{TENANT}-k{k}")).collect();
    let before: Vec<serde_json::Value> = keys.iter().map(|k| sc.instance(port, k).unwrap()).collect();
    let calls = (sc.gateway.count(), sc.upstream.count());
    let commands = sc.h.read_stream("WORKFLOW_COMMANDS").len();
    let req = serde_json::json!({"tenant": TENANT, "saga": LEDGER_SAGA, "from_seq": 0});
    let (status, body) = sc.h.http("POST", &url(port, "/admin/replay"), None, Some(req.clone()));
    assert_eq!(status, 400, "replay without confirmation: {body}");
    assert!(body.contains("reset 10 instance"), "{body}");
    let mut confirmed = req;
    confirmed["confirm"] = serde_json::json!(true);
    let (status, body) = sc.h.http("POST", &url(port, "/admin/replay"), None, Some(confirmed));
    assert_eq!(status, 200, "{body}");
    sc.wait_complete(&[port], T);
    for (k, was) in keys.iter().zip(&before) {
        let now = sc.instance(port, k).unwrap();
        assert_eq!(now["state"], was["state"], "{k}: state differs after the replay");
        assert_eq!(now["version"], was["version"], "{k}: version differs after the replay");
    }
    assert_eq!((sc.gateway.count(), sc.upstream.count()), calls, "the replay called the Gateway or the upstream again");
    assert_eq!(sc.h.read_stream("WORKFLOW_COMMANDS").len(), commands, "the replay published commands again");
    sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
}

/// Keys per tenant in the replay scenarios: tenant `r` is replayed, tenant `w` is its twin,
/// fed the same events and never replayed.
const TWIN_KEYS: usize = 20;

/// One event per key of both tenants per slice, `r` and `w` interleaved.
fn twin_slices(sc: &mut Scenario, per: u64, first_n: u64) -> Vec<Vec<Outgoing>> {
    let mut slices = Vec::new();
    for n in first_n..first_n + per {
        let r = sc.plan_events("r", TWIN_KEYS, 1, n, &|_, _| None);
        let w = sc.plan_events("w", TWIN_KEYS, 1, n, &|_, _| None);
        slices.push(r.into_iter().zip(w).flat_map(|(a, b)| [a, b]).collect());
    }
    slices
}

/// Publishes `slices` one every 20 ms (fault timing: the load keeps arriving while the
/// replay runs, whatever this machine's speed) and returns when each went out.
fn publish_paced(h: &Harness, slices: Vec<Vec<Outgoing>>, sent: &std::sync::atomic::AtomicUsize) -> Vec<Instant> {
    let mut at = Vec::new();
    for slice in slices {
        h.publish_many(slice);
        at.push(Instant::now());
        sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
    }
    at
}

/// Every replayed instance `r-kN` ends exactly like its twin `w-kN`: same state (every event,
/// result and tick, in order), same number of transitions, same status, not replaying.
fn assert_like_their_twins(sc: &Scenario, port: u16) {
    for k in 0..TWIN_KEYS {
        let r = sc.instance(port, &format!("r-k{k}")).unwrap();
        let w = sc.instance(port, &format!("w-k{k}")).unwrap();
        assert_eq!(r["state"], w["state"], "r-k{k} ended unlike its twin");
        assert_eq!(r["version"], w["version"], "r-k{k}: transitions differ from its twin's");
        assert_eq!(r["status"], w["status"], "r-k{k}: status differs from its twin's");
        assert!(r.get("replaying").is_none_or(|v| v == false), "r-k{k} is still replaying: {r}");
    }
}

/// Replays not yet finished, as `/admin/stats` counts them (`None`: not reported).
fn replays_left(sc: &Scenario, port: u16) -> Option<u64> {
    let (status, body) = sc.h.http("GET", &url(port, "/admin/stats"), None, None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["shards"].as_array()?.iter().map(|s| s["store"]["replays"].as_u64()).sum()
}

#[test]
fn a_replay_under_live_traffic_ends_each_instance_like_its_unreplayed_twin() {
    let _serial = serial();
    let mut sc = Scenario::new("replay-under-traffic");
    let port = free_port();
    let mut p = RunnerProcess::start(&sc.config("a", 2, port, ""), port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    // A history of 25 events per key (with results and ticks, 53 transitions), then 20 more
    // per key published while tenant r is replayed.
    for slice in twin_slices(&mut sc, 25, 0) {
        sc.h.publish_many(slice);
    }
    sc.wait_complete(&[port], T);
    let live = twin_slices(&mut sc, 20, 25);
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let req = serde_json::json!({"tenant": "r", "saga": LEDGER_SAGA, "confirm": true});
    let (published, (began, ended), (status, body)) = std::thread::scope(|s| {
        let h = &sc.h;
        let sent = &sent;
        let publisher = s.spawn(move || publish_paced(h, live, sent));
        wait_until(T, "live load under way", || sent.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        let began = Instant::now();
        let answer = sc.h.http("POST", &url(port, "/admin/replay"), None, Some(req));
        (publisher.join().unwrap(), (began, Instant::now()), answer)
    });
    assert_eq!(status, 200, "{body}");
    let during = published.iter().filter(|t| **t >= began && **t <= ended).count();
    assert!(during >= 1, "no live event was published while the replay ran ({} slices)", published.len());
    sc.wait_complete(&[port], T);
    assert_like_their_twins(&sc, port);
    sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
}

#[test]
fn a_replay_killed_midway_resumes_on_start_and_ends_each_instance_like_its_twin() {
    let _serial = serial();
    let mut sc = Scenario::new("replay-killed-midway");
    let port = free_port();
    let dir = sc.h.dir.path().to_owned();
    let cfg = sc.config("a", 2, port, "");
    // Killed after the second page of steps: the first instance is part-way through its
    // history of 40 events per key (84 transitions, more than the 64 a replay once allowed).
    let mut p =
        RunnerProcess::start(&cfg, port, &[("RUNNER_FAILPOINTS", "replay.after_step:2")], &dir.join("run-0.log"));
    p.wait_ready(&sc.h, T);
    for slice in twin_slices(&mut sc, 40, 0) {
        sc.h.publish_many(slice);
    }
    sc.wait_complete(&[port], T);
    let live = twin_slices(&mut sc, 20, 40);
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let req = serde_json::json!({"tenant": "r", "saga": LEDGER_SAGA, "confirm": true});
    std::thread::scope(|s| {
        let h = &sc.h;
        let sent = &sent;
        let publisher = s.spawn(move || publish_paced(h, live, sent));
        wait_until(T, "live load under way", || sent.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        let (status, body) = sc.h.http("POST", &url(port, "/admin/replay"), None, Some(req));
        assert_eq!(status, 0, "the replay answered rather than dying midway: {body}");
        assert_eq!(p.wait_exit(T), Some(9), "not killed by the failpoint; log:\n{}", p.log());
        assert!(p.log().contains("failpoint replay.after_step hit"), "{}", p.log());
        sc.crashes.push(Instant::now());
        p = RunnerProcess::start(&cfg, port, &[], &dir.join("run-1.log"));
        p.wait_ready(&sc.h, T);
        publisher.join().unwrap();
    });
    wait_until(T, "every replay finished", || replays_left(&sc, port) == Some(0));
    sc.wait_complete(&[port], T);
    let log = p.log();
    // The instance killed part-way (its key held again at start) is resumed first.
    assert!(
        log.lines().any(|l| l.contains("resuming replay") && l.contains("started=true")),
        "the restarted runner did not resume the replay it was killed in:\n{log}"
    );
    assert_like_their_twins(&sc, port);
    sc.finish(&mut [&mut p], &[dir.join("data-a")]);
}
