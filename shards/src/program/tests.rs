use super::*;
use crate::manifest::{SagaSpec, TriggerSpec};

fn loaded(source: &str) -> LoadedSaga {
    LoadedSaga {
        spec: SagaSpec {
            name: "s".into(),
            program: "p.rhai".into(),
            on_event: "on_event".into(),
            compensation: None,
            gas: 10_000,
            max_wall_ms: 1_000,
            on_poison: Default::default(),
            retry: Default::default(),
            triggers: vec![TriggerSpec {
                stream: "S".into(),
                subject: "a.>".into(),
                correlation: "id".into(),
                may_start: true,
            }],
        },
        program_path: "p.rhai".into(),
        source: source.into(),
        manifest: "m.yaml".into(),
    }
}

fn programs(source: &str, effects: &[&str]) -> Programs {
    let mut set = ManifestSet::default();
    set.sagas.insert("s".into(), loaded(source));
    for e in effects {
        set.effects
            .insert((*e).into(), serde_json::from_value(serde_json::json!({"name": e, "provider": "noop"})).unwrap());
    }
    check_program(&set.sagas["s"]).unwrap();
    Programs::build(&set).unwrap()
}

fn ev(v: serde_json::Value) -> Dynamic {
    rhai::serde::to_dynamic(v).unwrap()
}

#[test]
fn clock_and_randomness_do_not_load() {
    for (src, needle) in [
        ("fn on_event(s, e) { let t = timestamp(); #{} }", "`timestamp` reads the clock"),
        ("fn on_event(s, e) { #{ state: rand() } }", "`rand` is random"),
        ("fn on_event(s, e) { let x = e.now(); #{} }", "`now` reads the clock"),
        ("fn on_event(s, e) { frobnicate(1) }", "unknown function `frobnicate`"),
    ] {
        let err = check_program(&loaded(src)).unwrap_err();
        assert!(err.contains(needle), "{src}: {err}");
        assert!(err.contains("line 1"), "{err}");
    }
    let err = check_program(&loaded("fn on_event(s, e) {\n  eval(\"1\")\n}")).unwrap_err();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn compile_errors_and_missing_entry_points_name_line_and_column() {
    let err = check_program(&loaded("fn on_event(s, e) {\n  let x = ;\n}")).unwrap_err();
    assert!(err.starts_with("compile error at line 2, column"), "{err}");
    let err = check_program(&loaded("fn handle(s, e) { #{} }")).unwrap_err();
    assert!(err.contains("entry point `on_event`"), "{err}");
    let err = check_program(&loaded("fn on_event(s) { #{} }")).unwrap_err();
    assert!(err.contains("takes 1 parameters"), "{err}");
}

#[test]
fn a_transition_is_validated_into_work_and_schedules() {
    let p = programs(
        r#"
        fn on_event(state, event) {
            let s = if state == () { #{ n: 0 } } else { state };
            s.n += 1;
            #{
                state: s,
                status: "running",
                work: [ #{ effect: "charge", payload: #{ amount: event.data.amount } },
                        #{ command: "Reserve", aggregate: "inventory", aggregate_id: "sku-1", payload: #{} } ],
                schedules: [ #{ name: "timeout", after_ms: 30000, payload: #{} } ]
            }
        }
        "#,
        &["charge"],
    );
    let t = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({"data": {"amount": 5}})), "e1").unwrap();
    assert_eq!(serde_json::to_string(&t.state).unwrap(), r#"{"n":1}"#);
    assert_eq!(t.status, InstanceStatus::Running);
    assert!(matches!(&t.work[0], WorkSpec::Effect { effect, .. } if effect == "charge"));
    assert!(
        matches!(&t.work[1], WorkSpec::Command { command, aggregate_id, .. } if command == "Reserve" && aggregate_id == "sku-1")
    );
    assert_eq!(t.schedules[0].after_ms, 30_000);
}

#[test]
fn bad_output_is_a_clear_error() {
    for (body, needle) in [
        (r#"#{ work: [ #{ effect: "nope" } ] }"#, "\"nope\" is not a known effect (known: charge)"),
        (r#"#{ status: "done" }"#, "status \"done\" is not one of"),
        (r#"#{ schedules: [ #{ name: "t" } ] }"#, "schedules[0] has no `after_ms`"),
        (r#"#{ extra: 1 }"#, "unknown field `extra`"),
        (r#"42"#, "expected a map"),
        (r#"#{ work: [ #{ command: "C", aggregate: "a" } ] }"#, "work[0] has no `aggregate_id`"),
    ] {
        let p = programs(&format!("fn on_event(s, e) {{ {body} }}"), &["charge"]);
        let err = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({})), "e-7").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ProgramError::BadOutput { .. }), "{msg}");
        assert!(msg.contains(needle) && msg.contains("e-7") && msg.contains("saga \"s\""), "{body}: {msg}");
    }
}

#[test]
fn a_throw_names_saga_program_line_and_event() {
    let p = programs("fn on_event(s, e) {\n  if e.bad { throw \"poison\"; }\n  #{}\n}", &[]);
    let err = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({"bad": true})), "evt-9").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ProgramError::Failed { line: 2, .. }), "{msg}");
    assert!(msg.contains("evt-9") && msg.contains("poison") && msg.contains("p.rhai"), "{msg}");
}

#[test]
fn an_infinite_loop_stops_within_its_gas() {
    let p = programs("fn on_event(s, e) { loop { } }", &[]);
    let started = Instant::now();
    let err = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({})), "e").unwrap_err();
    assert!(matches!(err, ProgramError::OutOfGas { gas: 10_000, .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // The engine is fine afterwards.
    let ok = programs("fn on_event(s, e) { #{ state: 1 } }", &[]);
    assert!(ok.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({})), "e").is_ok());
    assert!(p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({})), "e").is_err());
}

#[test]
fn unbounded_allocation_is_stopped_by_the_size_limits() {
    let p = programs("fn on_event(s, e) { let x = \"xxxxxxxxxxxxxxxx\"; loop { x += x; } }", &[]);
    let err = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({})), "e").unwrap_err();
    assert!(err.to_string().contains("size limit"), "{err}");
    let p = programs("fn on_event(s, e) { let a = []; loop { a.push(a.len()); } }", &[]);
    let err = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(serde_json::json!({})), "e").unwrap_err();
    assert!(matches!(err, ProgramError::Failed { .. } | ProgramError::OutOfGas { .. }), "{err}");
}

#[test]
fn the_same_input_gives_byte_identical_output() {
    let src = r#"
        fn on_event(state, event) {
            let m = #{ z: 1, a: 2, m: [3, 4.5, "x"] };
            for k in event.data.keys() { m[k] = event.data[k]; }
            #{ state: m, work: [ #{ effect: "e", payload: m } ] }
        }
    "#;
    let event = serde_json::json!({"data": {"q": 1, "b": {"y": 2, "c": 3}, "a": true}});
    let first = {
        let p = programs(src, &["e"]);
        let t = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(event.clone()), "e").unwrap();
        serde_json::to_string(&t.state).unwrap()
    };
    // Separate engines stand in for separate shards.
    for _ in 0..3 {
        let p = programs(src, &["e"]);
        for _ in 0..1_000 {
            let t = p.run("s", Entry::OnEvent, Dynamic::UNIT, ev(event.clone()), "e").unwrap();
            assert_eq!(serde_json::to_string(&t.state).unwrap(), first);
        }
    }
    assert!(first.starts_with(r#"{"a":true,"b":{"c":3,"y":2},"m":[3,4.5,"x"]"#), "{first}");
}
