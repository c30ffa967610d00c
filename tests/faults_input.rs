//! Fault suite, part 3: bad programs and bad input with real processes — poison events
//! (quarantined in order, requeued after a fix), gas bombs and unbounded allocation, every
//! kind of malformed message, a bad config and manifest, a backlog with bounded memory, and
//! a full disk. Each scenario checks that nothing else was lost.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};
use support::fault::*;
use support::*;

const T: Duration = Duration::from_secs(180);

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

#[test]
fn poison_events_are_quarantined_in_order_and_complete_in_order_after_a_fix() {
    let _serial = serial();
    let poison = "if event.data.p == true { throw \"poisoned entry \" + event.data.n; }";
    let mut sc = Scenario::build("poison-requeue", &[], poison, "    retry: { attempts: 2, backoff_ms: 20 }\n");
    let port = free_port();
    let mut p = RunnerProcess::start(&sc.config("a", 2, port, ""), port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    // 1,000 events over 100 keys; event 3 of every tenth key (1%) throws.
    let poisoned = |k: usize, n: u64| k.is_multiple_of(10) && n == 3;
    let load = sc.plan_events(TENANT, 100, 10, 0, &|k, n| poisoned(k, n).then(|| serde_json::json!({"p": true})));
    sc.h.publish_many(load);
    let is_poisoned_key =
        |key: &str| key.strip_prefix("t-k").and_then(|k| k.parse::<usize>().ok()).is_some_and(|k| k.is_multiple_of(10));
    sc.wait_complete_where(&[port], T, &|key| !is_poisoned_key(key));
    // Each poisoned key: the poison event and the six behind it, parked in stream order.
    // Results and timer ticks of events 0..2 that arrive after the key parked wait behind
    // it too (strict order), so count only the source events.
    let source = |l: &&serde_json::Value| l["event"]["stream"] == "AGGREGATE_EVENTS";
    wait_until(T, "70 parked source events", || sc.deadletters(port, TENANT).iter().filter(source).count() >= 70);
    let letters: Vec<serde_json::Value> = sc.deadletters(port, TENANT).into_iter().filter(|l| source(&l)).collect();
    assert_eq!(letters.len(), 70, "{letters:#?}");
    for k in (0..100).step_by(10) {
        let key = format!("{TENANT}-k{k}");
        let mine: Vec<&serde_json::Value> = letters.iter().filter(|l| l["correlation_id"] == key.as_str()).collect();
        let ns: Vec<u64> = mine.iter().map(|l| l["event"]["data"]["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, (3..10).collect::<Vec<_>>(), "{key}: parked out of order");
        assert!(mine[0]["error"].as_str().unwrap().contains("poisoned entry 3"), "{:#?}", mine[0]);
        let state = sc.instance(port, &key).unwrap();
        assert_eq!(state["state"]["seen"], serde_json::json!([0, 1, 2]), "{key}: applied past its poison event");
    }
    // The fix: the program no longer throws; reload, then requeue each key.
    sc.set_prelude("");
    let (s, body) = sc.h.http("POST", &url(port, "/admin/reload"), None, Some(serde_json::json!({})));
    assert_eq!(s, 200, "{body}");
    for k in (0..100).step_by(10) {
        let req =
            serde_json::json!({"tenant": TENANT, "saga": LEDGER_SAGA, "correlation_id": format!("{TENANT}-k{k}")});
        let (s, body) = sc.h.http("POST", &url(port, "/admin/deadletters/requeue"), None, Some(req));
        assert_eq!(s, 200, "{body}");
    }
    sc.wait_complete(&[port], T);
    assert!(sc.deadletters(port, TENANT).is_empty(), "requeued dead letters are gone");
    let report = sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
    assert_eq!(report.events, 1000);
}

#[test]
fn gas_bombs_and_unbounded_allocation_are_stopped_and_quarantined_with_memory_bounded() {
    let _serial = serial();
    let bombs = r#"
    if event.data.bomb == "loop" { let i = 0; loop { i += 1; } }
    if event.data.bomb == "alloc" {
        let a = [];
        let chunk = "0123456789abcdef";
        loop { a.push(chunk + a.len()); chunk += chunk; }
    }
    if event.data.bomb == "wide" {
        let m = #{};
        let i = 0;
        loop { m[`k${i}`] = [i, i, i, i, i, i, i, i]; i += 1; }
    }
"#;
    let mut sc = Scenario::build("gas-bombs", &[], bombs, "    retry: { attempts: 2, backoff_ms: 20 }\n");
    let port = free_port();
    let mut p = RunnerProcess::start(&sc.config("a", 2, port, ""), port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    let base_rss = p.peak_rss_mib();
    // Neighbours: a normal load interleaved with the bombs.
    let load = sc.plan_load(TENANT, 20, 20);
    std::thread::scope(|s| {
        let h = &sc.h;
        s.spawn(move || h.publish_many(load));
        for i in 0..30 {
            let kind = ["loop", "alloc", "wide"][i % 3];
            let key = format!("bomb-{kind}-{i}");
            sc.h.publish("events.t.ledger.Entry", &[], &serde_json::json!({"id": key, "type": "Entry", "tenant_id": TENANT, "data": {"k": key, "n": 0, "bomb": kind}}));
        }
    });
    sc.wait_complete(&[port], T);
    wait_until(T, "30 bombs quarantined", || sc.deadletters(port, TENANT).len() >= 30);
    let letters = sc.deadletters(port, TENANT);
    assert_eq!(letters.len(), 30, "{letters:#?}");
    for l in &letters {
        let err = l["error"].as_str().unwrap();
        assert!(
            err.contains("operations") || err.contains("too large") || err.contains("size") || err.contains("wall"),
            "a bomb failed for another reason than a limit: {err}"
        );
    }
    let peak = p.peak_rss_mib();
    eprintln!("RSS: {base_rss} MiB at start, {peak} MiB peak");
    // Bound: the sandbox caps strings at 256 KiB and collections at 10,000 items per value.
    assert!(peak < 128, "peak RSS {peak} MiB with bombs running (start {base_rss} MiB)");
    assert_eq!(sc.h.http("GET", &url(port, "/health"), None, None).0, 200);
    assert!(p.sigterm());
    let report = sc.check(&[sc.h.dir.path().join("data-a")]);
    sc.record_with(
        &report,
        &format!(", bombs quarantined {}, RSS {base_rss} MiB at start, {peak} MiB peak", letters.len()),
    );
    assert!(report.ok(), "{report}");
}

/// Publishes with the raw NATS protocol, so that a header can carry bytes that are not UTF-8.
fn raw_hpub(nats_url: &str, subject: &str, headers: &[u8], body: &[u8]) {
    let mut s = std::net::TcpStream::connect(nats_url.trim_start_matches("nats://")).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\n").unwrap();
    let hdr = [b"NATS/1.0\r\n".as_slice(), headers, b"\r\n"].concat();
    s.write_all(format!("HPUB {subject} {} {}\r\n", hdr.len(), hdr.len() + body.len()).as_bytes()).unwrap();
    s.write_all(&hdr).unwrap();
    s.write_all(body).unwrap();
    s.write_all(b"\r\nPING\r\n").unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            break;
        }
    }
}

#[test]
fn bad_input_gets_a_clear_dead_letter_and_nothing_else_is_lost() {
    let _serial = serial();
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), "max_payload: 16777216\n").unwrap();
    let prelude =
        "if event.data.ueff == true { return #{ state: s, work: [ #{ effect: \"no_such_effect\", payload: #{} } ] }; }";
    let mut sc =
        Scenario::build("bad-input", &["-c", conf.path().to_str().unwrap()], prelude, "    retry: { attempts: 1 }\n");
    let port = free_port();
    let mut p = RunnerProcess::start(&sc.config("a", 2, port, ""), port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    let subject = "events.t.ledger.Entry";
    let ev = |id: &str, data: serde_json::Value| serde_json::json!({"id": id, "type": "Entry", "tenant_id": TENANT, "data": data});
    // Not JSON; wrong types; missing fields.
    sc.h.publish_raw(subject, &[("Nats-Msg-Id", "bad-json")], bytes::Bytes::from_static(b"{\"id\": \"x\", \"type\": "));
    sc.h.publish(
        subject,
        &[("Nats-Msg-Id", "bad-type")],
        &serde_json::json!({"id": "bad-type", "type": 42, "tenant_id": TENANT, "data": {"k": "t-wrong"}}),
    );
    sc.h.publish(
        subject,
        &[("Nats-Msg-Id", "bad-data")],
        &serde_json::json!({"id": "bad-data", "type": "Entry", "tenant_id": TENANT, "data": "not an object"}),
    );
    sc.h.publish(subject, &[("Nats-Msg-Id", "bad-empty")], &serde_json::json!({}));
    // 10 MiB, over limits.max_event_bytes (1 MiB).
    sc.h.publish(
        subject,
        &[("Nats-Msg-Id", "bad-big")],
        &ev("bad-big", serde_json::json!({"k": "t-big", "n": 0, "blob": "x".repeat(10 << 20)})),
    );
    // A program that names an effect nobody declared; a command for an unknown effect.
    sc.h.publish(
        subject,
        &[("Nats-Msg-Id", "bad-effect")],
        &ev("bad-effect", serde_json::json!({"k": "t-ueff", "n": 0, "ueff": true})),
    );
    sc.h.publish(
        "workflow.commands.t.no_such_effect",
        &[("Nats-Msg-Id", "bad-command")],
        &serde_json::json!({"command_id": "bad-command", "tenant_id": TENANT, "effect": "no_such_effect", "saga": LEDGER_SAGA, "correlation_id": "t-x", "payload": {}}),
    );
    // Invalid UTF-8 in a header value.
    raw_hpub(
        &sc.h.nats.url(),
        subject,
        b"Nats-Msg-Id: bad-utf8\r\nx-tenant-id: \xff\xfe\xfd\r\n",
        &serde_json::to_vec(&ev("bad-utf8", serde_json::json!({"k": "t-utf8", "n": 0}))).unwrap(),
    );
    // Then ordinary work, which must all complete.
    sc.publish_load(TENANT, 10, 10, 0);
    sc.wait_complete(&[port], T);
    // The platform's stream keeps every message, the unparseable one too: it is acknowledged
    // in the runner's consumer, never deleted.
    let (messages, first, last) = sc.h.block_on(async {
        let mut s = sc.h.js.get_stream("AGGREGATE_EVENTS").await.unwrap();
        let i = s.info().await.unwrap();
        (i.state.messages, i.state.first_sequence, i.state.last_sequence)
    });
    assert_eq!(messages, last - first + 1, "a message was deleted from AGGREGATE_EVENTS");
    let expect = [
        ("bad-json", "not JSON"),
        ("bad-type", "type"),
        ("bad-data", "data"),
        ("bad-empty", ""),
        ("bad-big", "limits.max_event_bytes"),
        ("bad-effect", "no_such_effect"),
        ("bad-command", "unknown effect \"no_such_effect\""),
        ("bad-utf8", ""),
    ];
    let letters = sc.deadletters(port, TENANT);
    let dump = serde_json::to_string_pretty(&letters).unwrap();
    eprintln!("{}", &dump[..dump.len().min(20_000)]);
    for (id, says) in expect {
        let found = letters.iter().any(|l| {
            let text = l.to_string();
            text.contains(id) && l["error"].as_str().is_some_and(|e| e.contains(says))
        });
        assert!(found, "no dead letter for {id} whose error mentions {says:?}");
    }
    // Unknown saga names at the operations API: refused with the name.
    let (s, body) = sc.h.http(
        "POST",
        &url(port, "/admin/replay"),
        None,
        Some(serde_json::json!({"tenant": TENANT, "saga": "no_such_saga", "confirm": true})),
    );
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("no_such_saga") && body.contains("is not loaded"), "{body}");
    assert_eq!(sc.h.http("GET", &url(port, "/health"), None, None).0, 200);
    sc.finish(&mut [&mut p], &[sc.h.dir.path().join("data-a")]);
}

#[test]
fn a_bad_manifest_and_a_config_with_every_field_wrong_are_refused_with_every_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    write(&m, "ok.rhai", "fn on_event(s, e) { #{ state: s } }");
    let manifest = write(
        &m,
        "sagas.yaml",
        "sagas:\n  - name: escape\n    program: ../../../../etc/passwd\n    triggers: [{ subject: \"events.>\", correlation: data.k, may_start: true }]\n  - name: abs\n    program: /etc/hostname\n    triggers: [{ subject: \"events.>\", correlation: data.k }]\n",
    );
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!("mode = \"saga\"\n[sagas]\nmanifests = [{:?}]\n[effects]\nmanifests = []\n", manifest),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for needle in ["saga \"escape\"", "saga \"abs\"", "program", manifest.to_str().unwrap()] {
        assert!(err.contains(needle), "{needle} missing in:\n{err}");
    }
    assert!(!err.contains("root:"), "the traversal read the file:\n{err}");

    let bad = write(
        dir.path(),
        "bad.toml",
        "mode = \"sideways\"\ndata_dir = \"\"\nshards = 0\npartitions = 0\npin_cores = \"yes\"\n[nats]\nurl = \"ftp://x\"\nconnect_timeout_ms = 0\n\
         [streams]\nduplicate_window_ms = 0\nreplicas = 9\n[consumers]\ndurable_prefix = \"bad prefix.*\"\naggregate_filters = [\"events..>\"]\nbatch = 0\n\
         max_ack_pending = 0\nack_wait_ms = 0\n[relay]\nmax_in_flight = 0\n[storage]\ndurability = \"sometimes\"\ninitial_map_size = 0\n\
         [http]\naddr = \"nowhere\"\n[log]\nformat = \"xml\"\n[shutdown]\ndrain_deadline_ms = 0\n[bogus]\nx = 1\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["check", "--config"])
        .arg(&bad)
        .env_remove("RUNNER_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let fields = [
        "mode",
        "data_dir",
        "shards",
        "partitions",
        "pin_cores",
        "nats.url",
        "nats.connect_timeout_ms",
        "streams.duplicate_window_ms",
        "streams.replicas",
        "consumers.durable_prefix",
        "consumers.aggregate_filters",
        "consumers.batch",
        "consumers.max_ack_pending",
        "consumers.ack_wait_ms",
        "relay.max_in_flight",
        "storage.durability",
        "storage.initial_map_size",
        "http.addr",
        "log.format",
        "shutdown.drain_deadline_ms",
        "bogus",
    ];
    for f in fields {
        assert!(err.contains(&format!("field `{f}`")), "field `{f}` not named in:\n{err}");
    }
    assert!(err.contains(&format!("{} configuration problem", fields.len())), "{err}");
}

#[test]
fn a_backlog_drains_with_bounded_memory() {
    let _serial = serial();
    let mut sc = Scenario::new("backlog");
    // A state-only saga: the backlog measures the consumer → shard path, not the fixtures.
    let dir = sc.h.dir.path().join("counter");
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir, "c.rhai", "fn on_event(s, e) { let c = if s == () { 0 } else { s }; #{ state: c + 1 } }");
    sc.manifests = write(
        &dir,
        "c.yaml",
        "sagas:\n  - name: counter\n    program: c.rhai\n    triggers:\n      - { subject: \"events.>\", correlation: data.k, may_start: true }\n",
    );
    let port = free_port();
    let cfg = sc.config("a", 2, port, "");
    // A first start creates the streams and consumers; then the backlog piles up while the
    // runner is down.
    let mut p = RunnerProcess::start(&cfg, port, &[], &sc.h.dir.path().join("first.log"));
    p.wait_ready(&sc.h, T);
    assert!(p.sigterm());
    let n: usize = 200_000;
    let keys = 1_000;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let body = serde_json::json!({"id": format!("b{i}"), "type": "Tick", "tenant_id": TENANT, "data": {"k": format!("c{}", i % keys), "pad": "x".repeat(120)}});
        batch.push((
            "events.t.counter.Tick".to_owned(),
            vec![],
            bytes::Bytes::from(serde_json::to_vec(&body).unwrap()),
        ));
        if batch.len() == 10_000 {
            sc.h.publish_many(std::mem::take(&mut batch));
        }
    }
    sc.h.publish_many(batch);
    let published = started.elapsed();
    let mut p = RunnerProcess::start(&cfg, port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    let started = Instant::now();
    let total = |sc: &Scenario| -> u64 {
        (0..keys)
            .map(|k| sc.h.http("GET", &url(port, &format!("/sagas/t/counter/c{k}")), None, None))
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).unwrap()["state"].as_u64().unwrap_or(0))
            .sum()
    };
    // Poll one key cheaply until it is done, then count all.
    let last = format!("/sagas/t/counter/c{}", keys - 1);
    wait_until(Duration::from_secs(600), "the last key drained", || {
        let (s, b) = sc.h.http("GET", &url(port, &last), None, None);
        s == 200 && serde_json::from_str::<serde_json::Value>(&b).unwrap()["state"].as_u64() == Some((n / keys) as u64)
    });
    wait_until(T, "every key drained", || total(&sc) == n as u64);
    let drained = started.elapsed();
    let peak = p.peak_rss_mib();
    let rate = n as f64 / drained.as_secs_f64();
    let line = format!(
        "backlog: {n} events published in {published:.1?}, drained in {drained:.1?} ({rate:.0}/s), peak RSS {peak} MiB"
    );
    eprintln!("{line}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/faults");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("backlog.txt"), format!("{line}\n"));
    // Bound: inbox and consumer windows are bounded (max_ack_pending 4,096 per consumer,
    // bounded shard inboxes), so memory does not grow with the backlog.
    assert!(peak < 256, "peak RSS {peak} MiB while draining {n} events");
    assert!(p.sigterm());
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_turns_health_red_acks_nothing_uncommitted_and_recovers() {
    let _serial = serial();
    let mut sc = Scenario::build("disk-full", &[], "if event.data.blob != () { s.blob = event.data.blob; }", "");
    let mnt = sc.h.dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"]).arg(&mnt).status();
    assert!(
        mounted.is_ok_and(|s| s.success()),
        "mounting a 48 MiB tmpfs failed: this scenario needs root (CAP_SYS_ADMIN), as CI and the dev machines have"
    );
    let _tmpfs = Tmpfs(mnt.clone());
    let port = free_port();
    let cfg = sc.config_at("a", 2, port, &mnt.join("data"), "");
    let mut p = RunnerProcess::start(&cfg, port, &[], &sc.h.dir.path().join("run.log"));
    p.wait_ready(&sc.h, T);
    sc.publish_load(TENANT, 10, 10, 0);
    sc.wait_complete(&[port], T);
    // Fill the disk.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 1 << 16];
        while f.write_all(&chunk).is_ok() {}
    }
    // Work whose states need new pages: 20 KiB blobs.
    let blob = "y".repeat(20_000);
    let load = sc.plan_events(TENANT, 10, 10, 10, &|_, _| Some(serde_json::json!({"blob": blob})));
    sc.h.publish_many(load);
    wait_until(T, "health red", || sc.h.http("GET", &url(port, "/health"), None, None).0 == 503);
    let (_, health) = sc.h.http("GET", &url(port, "/health"), None, None);
    assert!(health.contains("writable"), "{health}");
    assert_eq!(sc.h.http("GET", &url(port, "/ready"), None, None).0, 503);
    // Nothing that did not commit was acked: the first 100 events are acked, the rest not.
    let floor = sc.h.block_on(async {
        use futures::StreamExt;
        let s = sc.h.js.get_stream("AGGREGATE_EVENTS").await.unwrap();
        let names: Vec<String> = s.consumer_names().map(Result::unwrap).collect().await;
        assert_eq!(names.len(), 1, "{names:?}");
        let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer(&names[0]).await.unwrap();
        c.info().await.unwrap().ack_floor.stream_sequence
    });
    let applied: usize = (0..10)
        .map(|k| sc.instance(port, &format!("{TENANT}-k{k}")).unwrap()["state"]["seen"].as_array().unwrap().len())
        .sum();
    assert!(applied < 200, "every event committed on a full disk?");
    assert!(floor <= applied as u64, "ack floor {floor} is past the {applied} events that committed");
    // Space returns: the runner recovers by itself and finishes.
    std::fs::remove_file(&filler).unwrap();
    wait_until(T, "health green again", || sc.h.http("GET", &url(port, "/health"), None, None).0 == 200);
    sc.wait_complete(&[port], T);
    sc.finish(&mut [&mut p], &[mnt.join("data")]);
    assert!(p.log().contains("commits succeed again"), "{}", p.log());
}
