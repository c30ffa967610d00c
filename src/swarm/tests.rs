use super::ranges::memory_bytes;
use super::render::q;
use super::*;
use crate::config::Mode;

const BASE: &str = r#"
secrets: [payments_token]
ranges:
  - name: r0
    tenants: [acme, globex]
  - name: r1
    tenants: [initech]
    shards: 4
"#;

fn errors(text: &str) -> Vec<String> {
    match parse(text, "swarm/ranges.yaml") {
        Ok(s) => panic!("expected errors, got {s:?}"),
        Err(e) => e.0,
    }
}

fn has(errs: &[String], parts: &[&str]) -> bool {
    errs.iter().any(|e| parts.iter().all(|p| e.contains(p)))
}

#[test]
fn tenants_become_per_role_filters_and_own_durables() {
    let s = parse(BASE, "swarm/ranges.yaml").unwrap();
    assert_eq!(s.source, "ranges.yaml");
    let r0 = &s.ranges[0];
    assert_eq!(r0.node_label, "r0");
    assert_eq!(r0.mode, Mode::Combined);
    assert_eq!(r0.aggregate_filters, ["events.acme.>", "events.globex.>"]);
    assert_eq!(r0.result_filters, ["workflow.events.acme.>", "workflow.events.globex.>"]);
    assert_eq!(r0.command_filters, ["workflow.commands.acme.>", "workflow.commands.globex.>"]);
    assert_eq!(r0.env["RUNNER_CONSUMERS__AGGREGATE_FILTERS"], r#"["events.acme.>","events.globex.>"]"#);
    assert_eq!(r0.env["RUNNER_CONSUMERS__DURABLE_PREFIX"], "runner-r0");
    assert_eq!(r0.env["RUNNER_NATS__URL"], "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222");
    assert_eq!(s.ranges[1].env["RUNNER_SHARDS"], "4");
    assert_eq!(r0.grace_period_s(), 30);
}

#[test]
fn the_env_filter_lists_load_as_the_runner_reads_them() {
    let s = parse(BASE, "x.yaml").unwrap();
    let env: Vec<(String, String)> =
        s.ranges[0].env.iter().filter(|(k, _)| k.starts_with("RUNNER_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let cfg = crate::config::load(None, &env).unwrap();
    assert_eq!(cfg.aggregate_filters, ["events.acme.>", "events.globex.>"]);
    assert_eq!(cfg.command_filters, ["workflow.commands.acme.>", "workflow.commands.globex.>"]);
    assert_eq!(cfg.durable_prefix, "runner-r0");
    assert_eq!(cfg.shards, 2);
    assert_eq!(cfg.http_addr.port(), HTTP_PORT);
    assert_eq!(cfg.drain_deadline_ms, 20_000);
}

#[test]
fn rendering_is_deterministic_and_mounts_secrets_only_where_effects_run() {
    let text = r#"
secrets: [payments_token]
ranges:
  - name: sagas
    mode: saga
    tenants: [acme]
  - name: effects
    mode: effect
    tenants: [acme]
"#;
    let s = parse(text, "ranges.yaml").unwrap();
    let a = render(&s);
    assert_eq!(a, render(&parse(text, "ranges.yaml").unwrap()));
    let sagas = a.split("  runner-sagas:").nth(1).unwrap().split("  runner-effects:").next().unwrap();
    assert!(!sagas.contains("secrets:"), "saga-only service gets no secrets");
    assert!(!sagas.contains("COMMAND_FILTERS"));
    let effects = a.split("  runner-effects:").nth(1).unwrap();
    assert!(effects.contains("- source: payments_token"));
    assert!(!effects.contains("AGGREGATE_FILTERS"));
}

#[test]
fn two_ranges_owning_one_tenant_or_overlapping_filters_are_refused() {
    let errs = errors("ranges:\n  - {name: a, tenants: [acme]}\n  - {name: b, tenants: [acme]}\n");
    assert!(has(&errs, &["ranges \"a\" and \"b\"", "aggregate", "events.acme.>"]), "{errs:?}");
    let errs = errors(
        "ranges:\n  - {name: a, tenants: [acme]}\n  - name: b\n    filters: {aggregate: ['events.*.>'], results: \
         ['workflow.events.zed.>'], commands: ['workflow.commands.zed.>']}\n",
    );
    assert!(has(&errs, &["ranges \"a\" and \"b\"", "events.*.>"]), "{errs:?}");
    // A saga range and an effect range may share tenants: they read different streams.
    assert!(
        parse("ranges:\n  - {name: a, mode: saga, tenants: [t]}\n  - {name: b, mode: effect, tenants: [t]}\n", "x")
            .is_ok()
    );
}

#[test]
fn a_tenant_whose_effects_run_nowhere_is_refused() {
    let errs = errors("ranges:\n  - {name: a, mode: saga, tenants: [acme]}\n");
    assert!(has(&errs, &["range \"a\"", "\"acme\"", "no range runs its effects"]), "{errs:?}");
}

#[test]
fn errors_name_the_file_and_the_field() {
    let errs = errors("ranges:\n  - {name: a, tenants: [acme], colour: red}\n");
    assert!(has(&errs, &["swarm/ranges.yaml", "colour"]), "{errs:?}");
    let errs = errors("ranges:\n  - {name: A_1, tenants: [a.b], shards: 0, memory: lots}\n");
    assert!(has(&errs, &["swarm/ranges.yaml", "`ranges[0].name` = \"A_1\""]), "{errs:?}");
    assert!(has(&errs, &["`ranges[0].tenants[0]` = \"a.b\""]), "{errs:?}");
    assert!(has(&errs, &["`ranges[0].shards` = 0"]), "{errs:?}");
    assert!(has(&errs, &["`ranges[0].memory` = \"lots\""]), "{errs:?}");
    let errs = errors("ranges:\n  - {name: a}\n  - {name: a, node: a, tenants: [x]}\n");
    assert!(has(&errs, &["`ranges[0]`", "exactly one of `tenants` and `filters`"]), "{errs:?}");
    assert!(has(&errs, &["`ranges[1].name` = \"a\"", "another range"]), "{errs:?}");
    assert!(has(&errs, &["`ranges[1].node` = \"a\"", "same node label"]), "{errs:?}");
    let errs = errors("nats: {servers: 1}\nenv: {RUNNER_STREAMS__REPLICAS: 3}\nranges:\n  - {name: a, tenants: [t]}\n");
    assert!(has(&errs, &["`env.RUNNER_STREAMS__REPLICAS` = \"3\"", "nats.servers (1)"]), "{errs:?}");
    let errs = errors("nats: {servers: 2}\nranges: []\n");
    assert!(has(&errs, &["`nats.servers` = 2"]) && has(&errs, &["`ranges`", "at least one"]), "{errs:?}");
    let errs =
        errors("ranges:\n  - name: a\n    mode: saga\n    filters: {aggregate: ['events.a.>'], commands: ['x.>']}\n");
    assert!(has(&errs, &["`ranges[0].filters.results`", "needs at least one"]), "{errs:?}");
    assert!(has(&errs, &["`ranges[0].filters.commands`", "does not read these"]), "{errs:?}");
}

#[test]
fn credentials_and_renderer_owned_variables_are_refused_in_env() {
    let errs = errors(
        "env: {PAYMENTS_API_KEY: hunter2, RUNNER_HTTP__ADMIN_TOKEN: s3cr3t-s3cr3t-s3cr3t, RUNNER_SHARDS: 8}\n\
         ranges:\n  - {name: a, tenants: [t]}\n",
    );
    assert!(has(&errs, &["`env.PAYMENTS_API_KEY`", "Swarm secret"]), "{errs:?}");
    assert!(has(&errs, &["`env.RUNNER_HTTP__ADMIN_TOKEN`", "Swarm secret"]), "{errs:?}");
    assert!(has(&errs, &["`env.RUNNER_SHARDS`", "ranges[].shards"]), "{errs:?}");
    assert!(errs.iter().all(|e| !e.contains("hunter2") && !e.contains("s3cr3t")), "values never echoed: {errs:?}");
}

#[test]
fn filter_overlap_follows_nats_wildcards() {
    let cases = [
        ("events.a.>", "events.b.>", false),
        ("events.a.>", "events.a.x", true),
        ("events.*.>", "events.b.c", true),
        ("events.*", "events.b.c", false),
        ("events.>", "events", false),
        ("a.*.c", "a.b.*", true),
        ("a.b", "a.b", true),
        (">", "x", true),
        ("a.b.c", "a.b", false),
    ];
    for (a, b, want) in cases {
        assert_eq!(filters_overlap(a, b), want, "{a} vs {b}");
        assert_eq!(filters_overlap(b, a), want, "{b} vs {a}");
    }
}

#[test]
fn sizes_parse_like_docker() {
    assert_eq!(memory_bytes("512M"), Some(512 << 20));
    assert_eq!(memory_bytes("4G"), Some(4 << 30));
    assert_eq!(memory_bytes("1.5GiB"), Some(3 << 29));
    assert_eq!(memory_bytes("1024"), Some(1024));
    assert_eq!(memory_bytes("4X"), None);
    assert_eq!(memory_bytes(""), None);
}

#[test]
fn scalars_quote_when_yaml_would_misread_them() {
    assert_eq!(q("combined"), "combined");
    assert_eq!(q("/data"), "/data");
    assert_eq!(q("true"), "'true'");
    assert_eq!(q("4"), "'4'");
    assert_eq!(q("0.0.0.0:8080"), "'0.0.0.0:8080'");
    assert_eq!(q("it's"), "'it''s'");
    assert_eq!(q(r#"["events.a.>"]"#), r#"'["events.a.>"]'"#);
}
