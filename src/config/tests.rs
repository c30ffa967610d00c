use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn defaults_are_valid_and_sensible() {
    let c = load(None, &[]).unwrap();
    assert_eq!(c.mode, Mode::Combined);
    assert_eq!(c.partitions, 256);
    assert!(c.nats_url.is_none(), "default must be the embedded server");
    assert_eq!(c.durability, Durability::Fsync);
    assert_eq!(c.aggregate_stream, "AGGREGATE_EVENTS");
    assert_eq!(c.max_deliver, -1);
    assert_eq!(c.max_crashes, 3);
}

#[test]
fn file_then_environment_overrides() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "c.toml",
            "mode = \"saga\"\nshards = 2\n[nats]\nurl = \"nats://127.0.0.1:4222\"\n[consumers]\nack_wait_ms = 5000\n",
        ),
        ("c.yaml", "mode: saga\nshards: 2\nnats:\n  url: nats://127.0.0.1:4222\nconsumers:\n  ack_wait_ms: 5000\n"),
        (
            "c.json",
            r#"{"mode":"saga","shards":2,"nats":{"url":"nats://127.0.0.1:4222"},"consumers":{"ack_wait_ms":5000}}"#,
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let c = load(
            Some(&p),
            &env(&[
                ("RUNNER_SHARDS", "3"),
                ("RUNNER_CONSUMERS__BATCH", "64"),
                ("RUNNER_LOG__FORMAT", "json"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Saga, "{name}");
        assert_eq!(c.shards, 3, "{name}: env must override the file");
        assert_eq!(c.batch, 64);
        assert_eq!(c.ack_wait_ms, 5_000);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
    }
}

#[test]
fn every_problem_names_field_value_and_rule_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "shards = 0\npartitions = 0\n[consumers]\nbatch = 0\nack_wait_ms = 10\nmax_deliver = 0\nmax_crashes = 1\naggregate_filters = [\"events..x\"]\n[http]\naddr = \"nowhere\"\nadmin_token = \"short\"\n[gateway]\nurl = \"ftp://x\"\n[storage]\ninitial_map_size = 10\n[log]\nlevel = \"[[[\"\n",
    )
    .unwrap();
    let err = load(Some(&p), &[]).unwrap_err();
    let text = err.to_string();
    for needle in [
        "field `shards` = 0: must be between 1 and 1024",
        "field `partitions` = 0",
        "field `consumers.batch` = 0",
        "field `consumers.ack_wait_ms` = 10",
        "field `consumers.max_deliver` = 0",
        "field `consumers.max_crashes` = 1: must be 0 (off) or at least 3",
        "field `consumers.aggregate_filters` = \"events..x\"",
        "field `http.addr` = \"nowhere\"",
        "field `http.admin_token`: must be at least 16 characters (value not shown)",
        "field `gateway.url` = \"ftp://x\"",
        "field `storage.initial_map_size` = 10",
        "field `log.level`",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains("\"short\""), "the token leaked into the error");
    assert!(err.0.len() >= 11);
}

#[test]
fn overlapping_consumer_filters_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("overlap.toml");
    std::fs::write(
        &p,
        "[consumers]\naggregate_filters = [\"events.t1.>\", \"events.t2.>\", \"events.*.order.*\"]\nresult_filters = [\"workflow.events.t1.>\", \"workflow.events.t2.>\"]\n",
    )
    .unwrap();
    let text = load(Some(&p), &[]).unwrap_err().to_string();
    for needle in [
        "field `consumers.aggregate_filters`: \"events.t1.>\" and \"events.*.order.*\" overlap",
        "field `consumers.aggregate_filters`: \"events.t2.>\" and \"events.*.order.*\" overlap",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains("result_filters"), "disjoint filters refused:\n{text}");
}

#[test]
fn an_environment_variable_that_names_no_setting_is_ignored_and_bad_ones_are_named() {
    let cfg =
        load(None, &env(&[("RUNNER_BIN", "/usr/local/bin/runner"), ("RUNNER_NATS__URL", "nats://x:4222")])).unwrap();
    assert_eq!(cfg.nats_url.as_deref(), Some("nats://x:4222"));
    let text = load(None, &env(&[("RUNNER_RELAY__MAX_ATTEMPTS", "many")])).unwrap_err().to_string();
    assert!(
        text.contains("relay.max_attempts") && text.contains("environment variable RUNNER_RELAY__MAX_ATTEMPTS"),
        "{text}"
    );
    assert!(!text.contains("alloc::") && !text.contains("figment::"), "a Rust type name in {text}");
}

#[test]
fn unknown_fields_and_wrong_types_are_rejected_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(&p, "nats:\n  urll: x\n").unwrap();
    let text = load(Some(&p), &[]).unwrap_err().to_string();
    assert!(text.contains("urll"), "{text}");
    let text = load(None, &env(&[("RUNNER_SHARDS", "many")])).unwrap_err().to_string();
    assert!(text.contains("shards"), "{text}");
    let text = load(Some(Path::new("/nope/runner.toml")), &[]).unwrap_err().to_string();
    assert!(text.contains("does not exist"), "{text}");
}

#[test]
fn effect_record_retention_defaults_to_a_week_and_may_not_undercut_the_dedupe_window() {
    let c = load(None, &[]).unwrap();
    assert_eq!(c.effect_retention_ms, Some(7 * 24 * 3_600_000));
    let keep = load(None, &env(&[("RUNNER_RETENTION__EFFECT_RECORDS_MS", "0")])).unwrap();
    assert_eq!(keep.effect_retention_ms, None);
    let short =
        env(&[("RUNNER_STREAMS__DUPLICATE_WINDOW_MS", "1000"), ("RUNNER_RETENTION__EFFECT_RECORDS_MS", "2000")]);
    assert_eq!(load(None, &short).unwrap().effect_retention_ms, Some(2_000));
    let below = env(&[("RUNNER_RETENTION__EFFECT_RECORDS_MS", "60000")]);
    let err = load(None, &below).unwrap_err().to_string();
    assert!(err.contains("retention.effect_records_ms") && err.contains("120000 ms"), "{err}");
}

#[test]
fn shards_default_to_the_masks_cpus_and_a_bridge_cpu_needs_pinning() {
    let c = load(None, &[]).unwrap();
    assert_eq!(c.shards, shards::cpus::CpuMask::of_process().len());
    assert!(c.shards_from_mask && c.pin_cores && c.bridge_cpu.is_none());
    let c = load(None, &env(&[("RUNNER_SHARDS", "1"), ("RUNNER_BRIDGE_CPU", "1")])).unwrap();
    assert_eq!((c.shards, c.shards_from_mask, c.bridge_cpu), (1, false, Some(1)));
    let err = load(None, &env(&[("RUNNER_BRIDGE_CPU", "1"), ("RUNNER_PIN_CORES", "false")])).unwrap_err().to_string();
    assert!(err.contains("field `bridge_cpu` = 1") && err.contains("`pin_cores = false`"), "{err}");
}
