use super::*;

fn ok_check(_: &LoadedSaga) -> Result<(), String> {
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = r#"
sagas:
  - name: order
    program: order.rhai
    triggers:
      - subject: "events.*.order.OrderPlaced"
        correlation: data.order_id
        may_start: true
effects:
  - name: charge
    provider: http
    settings:
      url: "http://127.0.0.1:1/charge"
      headers: { authorization: "secret:pay_token" }
"#;

#[test]
fn loads_yaml_and_json_manifests() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "order.rhai", "fn on_event(s, e) { #{} }");
    let yaml = write(dir.path(), "m.yaml", GOOD);
    let json = write(
        dir.path(),
        "e.json",
        r#"{"effects":[{"name":"ship","provider":"noop","retry":{"attempts":5},"timeout_ms":100}]}"#,
    );
    let set = ManifestSet::load(&[yaml, json], &ok_check).unwrap();
    assert_eq!(set.sagas["order"].spec.gas, 100_000);
    assert_eq!(set.sagas["order"].spec.on_poison, PoisonPolicy::Park);
    assert_eq!(set.effects["ship"].retry.attempts, Some(5));
    assert_eq!(set.effects["charge"].retry, EffectRetrySpec::default());
    assert_eq!(set.effects["charge"].secret_refs().into_iter().collect::<Vec<_>>(), ["pay_token"]);
    let hits: Vec<_> = set
        .triggers_for("AGGREGATE_EVENTS", "events.acme.order.OrderPlaced")
        .map(|(s, _)| s.spec.name.clone())
        .collect();
    assert_eq!(hits, ["order"]);
    assert_eq!(set.triggers_for("AGGREGATE_EVENTS", "events.acme.order.Other").count(), 0);
    assert_eq!(set.triggers_for("OTHER", "events.acme.order.OrderPlaced").count(), 0);
}

#[test]
fn every_problem_is_reported_with_file_item_and_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "order.rhai", "fn on_event(s, e) { #{} }");
    let bad = write(
        dir.path(),
        "bad.yaml",
        r#"
sagas:
  - name: order
    program: ../outside.rhai
    triggers:
      - subject: "events..x"
        correlation: ""
  - name: order
    program: missing.rhai
    gas: 0
    triggers:
      - subject: "a.>.b"
        correlation: data.id
        may_start: true
  - name: "bad name"
    program: /etc/passwd
    triggers: []
effects:
  - name: pay
    provider: http
    settings: { url: "ftp://x", verb: "POST" }
    retry: { attempts: 0 }
  - name: ask
    provider: nats_request
"#,
    );
    let errs = ManifestSet::load(std::slice::from_ref(&bad), &ok_check).unwrap_err();
    let text = errs.to_string();
    let expect = [
        "saga \"order\" (sagas[0]): field `program`: ../outside.rhai leaves the manifest's directory",
        "saga \"order\" (sagas[0]): field `triggers[0].subject`: \"events..x\" has an empty token",
        "saga \"order\" (sagas[0]): field `triggers[0].correlation`",
        "saga \"order\" (sagas[0]): field `triggers`: no trigger has `may_start: true`",
        "saga \"order\" (sagas[1]): field `gas`: must be above 0",
        "saga \"order\" (sagas[1]): field `triggers[0].subject`: \"a.>.b\": `>` must be the last token",
        "saga \"bad name\" (sagas[2]): field `name`",
        "saga \"bad name\" (sagas[2]): field `program`: /etc/passwd is absolute",
        "effect \"pay\" (effects[0]): field `settings.url`: \"ftp://x\" is not an http(s) URL",
        "effect \"pay\" (effects[0]): field `settings.verb`: unknown setting",
        "effect \"pay\" (effects[0]): field `retry.attempts`: must be at least 1",
        "effect \"ask\" (effects[1]): field `settings.subject`: is required",
    ];
    for e in expect {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    assert!(errs.0.iter().all(|e| e.file == bad));

    // Duplicates across files and missing programs.
    let a = write(dir.path(), "a.yaml", GOOD);
    let b = write(dir.path(), "b.yaml", &GOOD.replace("order.rhai", "nope.rhai"));
    let text = ManifestSet::load(&[a, b], &ok_check).unwrap_err().to_string();
    assert!(text.contains("duplicate saga name, first defined in"), "{text}");
    assert!(text.contains("duplicate effect name"), "{text}");
}

#[test]
fn unknown_fields_and_syntax_errors_are_rejected_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.yaml", "sagas:\n  - name: x\n    program: p.rhai\n    trigers: []\n");
    let text = ManifestSet::load(&[p], &ok_check).unwrap_err().to_string();
    assert!(text.contains("unknown field `trigers`") && text.contains("line"), "{text}");
    let p = write(dir.path(), "m.json", "{\"sagas\": [}");
    let text = ManifestSet::load(&[p], &ok_check).unwrap_err().to_string();
    assert!(text.contains("m.json") && text.contains("line 1"), "{text}");
}

#[test]
fn the_program_check_is_reported_against_the_saga() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "order.rhai", "fn on_event(s, e) { timestamp() }");
    let m = write(dir.path(), "m.yaml", GOOD);
    let text = ManifestSet::load(&[m], &crate::program::check_program).unwrap_err().to_string();
    assert!(text.contains("saga \"order\" (sagas[0]): field `program`") && text.contains("reads the clock"), "{text}");
}

#[test]
fn subject_matching_follows_nats_rules() {
    assert!(subject_matches("a.*.c", "a.b.c"));
    assert!(!subject_matches("a.*.c", "a.b.d"));
    assert!(subject_matches("a.>", "a.b.c"));
    assert!(!subject_matches("a.>", "a"));
    assert!(!subject_matches("a.b", "a.b.c"));
    assert!(subject_matches("a.b", "a.b"));
}

#[test]
fn filters_overlap_when_one_subject_matches_both() {
    use crate::manifest::filters_overlap;
    for (a, b) in [("t1.>", "t1.order.*"), ("*.order.x", "t2.*.x"), ("a.b", "a.b"), ("a.>", ">"), ("*.*", "a.b")] {
        assert!(filters_overlap(a, b) && filters_overlap(b, a), "{a} / {b}");
    }
    for (a, b) in [("t1.>", "t2.>"), ("a.>", "a"), ("a.b", "a.b.c"), ("a.*", "b.*"), ("*.x", "*.y")] {
        assert!(!filters_overlap(a, b) && !filters_overlap(b, a), "{a} / {b}");
    }
}

#[test]
fn lookup_path_reads_nested_values() {
    let v = serde_json::json!({"data": {"order_id": "o-1", "n": 7, "list": [{"x": "y"}]}, "aggregate_id": "a"});
    assert_eq!(lookup_path(&v, "data.order_id").as_deref(), Some("o-1"));
    assert_eq!(lookup_path(&v, "data.n").as_deref(), Some("7"));
    assert_eq!(lookup_path(&v, "data.list.0.x").as_deref(), Some("y"));
    assert_eq!(lookup_path(&v, "data.missing"), None);
    assert_eq!(lookup_path(&v, "data"), None);
}

#[test]
fn backoff_grows_and_caps() {
    let r = RetrySpec { attempts: 5, backoff_ms: 100, max_backoff_ms: 1_000, jitter: 0.5 };
    assert_eq!([1, 2, 3, 4, 5].map(|a| r.backoff(a)), [100, 200, 400, 800, 1_000]);
    assert_eq!(r.backoff_jittered(2, 0.0), 150);
    assert_eq!(r.backoff_jittered(2, 1.0), 250);
}

#[test]
fn effect_retries_keep_going_for_minutes_by_default_and_stop_at_the_budget() {
    // Attempts until the policy gives up, and the backoff waited by then.
    let run = |r: &EffectRetrySpec| {
        let mut attempt = 1;
        let mut waited = 0;
        while let Some(wait) = r.next_wait(attempt, 0.5) {
            waited += wait;
            attempt += 1;
        }
        (attempt, waited)
    };
    let d = EffectRetrySpec::default();
    let (attempts, waited) = run(&d);
    assert_eq!(attempts, 27);
    assert_eq!(d.waited_ms(attempts - 1), 591_000);
    // A unit of 0.5 is the middle of each wait's spread: the schedule itself.
    assert_eq!(waited, 591_000);
    // Never more than the cap between two attempts.
    assert!((1..40).all(|a| d.next_wait(a, 0.99).is_none_or(|w| w <= 33_000)));
    // An explicit limit of attempts ends it first; a budget of 0 means no retry.
    assert_eq!(run(&EffectRetrySpec { attempts: Some(3), ..d }).0, 3);
    assert_eq!(run(&EffectRetrySpec { give_up_after_ms: 0, ..d }).0, 1);
    // The waits fit the budget: 20 + 40 + 40 = 100 ms, the next one would not.
    let small = EffectRetrySpec { backoff_ms: 20, max_backoff_ms: 40, jitter: 0.0, give_up_after_ms: 100, ..d };
    assert_eq!(run(&small), (4, 100));
    // Past 32 attempts the capped backoff is counted without overflow.
    assert_eq!(d.waited_ms(1_000), 51_000 + 992 * 30_000);
    assert!(EffectRetrySpec { backoff_ms: u64::MAX, max_backoff_ms: u64::MAX, ..d }.waited_ms(u32::MAX) == u64::MAX);
}

#[test]
fn an_effect_url_with_a_placeholder_in_its_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "e.yaml",
        "effects:\n  - { name: a, provider: http, settings: { url: \"http://{{payload.host}}/pay\" } }\n  - { name: b, provider: http, settings: { url: \"http://up:{{payload.port}}\" } }\n  - { name: c, provider: http, settings: { url: \"http://up/o/{{payload.id}}?n={{payload.n}}\" } }\n",
    );
    let errs = ManifestSet::load(&[m], &ok_check).unwrap_err();
    let fields: Vec<_> = errs.0.iter().map(|e| (e.item.as_str(), e.field.as_str())).collect();
    assert_eq!(fields, [("effect \"a\" (effects[0])", "settings.url"), ("effect \"b\" (effects[1])", "settings.url")]);
    assert!(errs.0[0].message.contains("values may only fill the path or the query"), "{errs}");
}

#[test]
fn variables_expand_with_defaults_and_missing_ones_are_named() {
    let vars = |n: &str| (n == "HOST").then(|| "example.org".to_owned());
    assert_eq!(expand_vars("a ${HOST} b ${PORT:-80} c", &vars).unwrap(), "a example.org b 80 c");
    assert!(expand_vars("${NOPE}", &vars).unwrap_err().contains("variable NOPE is not set"));
    assert!(expand_vars("${bad name}", &vars).is_err());
}

#[test]
fn the_example_manifests_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/order");
    let set = ManifestSet::load(&[root.join("sagas.yaml"), root.join("effects.yaml")], &crate::program::check_program)
        .unwrap();
    assert_eq!(set.sagas.len(), 1);
    assert_eq!(set.effects.len(), 3);
    assert!(set.effects["charge_payment"].settings["url"].as_str().unwrap().starts_with("http://127.0.0.1:18081/"));
}
