//! The order saga end to end through a real nats-server, with the runner in `saga` mode and
//! the test playing the aggregates (answering the Gateway's Reserve with InventoryReserved)
//! and the effect workers (answering commands on WORKFLOW_COMMANDS with results).

mod support;

use runner::config::Mode;
use runner::fixture::HttpFixture;
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

const TENANT: &str = "acme";

fn placed(h: &Harness, cid: &str) {
    h.event(
        TENANT,
        "order",
        "OrderPlaced",
        &format!("placed-{cid}"),
        serde_json::json!({"order_id": cid, "sku": "sku-1", "qty": 1, "amount": 42, "customer": "c"}),
    );
}

/// Answers every effect command on the stream that has not been answered yet.
fn answer_commands(
    h: &Harness,
    answered: &mut BTreeMap<String, ()>,
    outcome: impl Fn(&serde_json::Value) -> &'static str,
) -> usize {
    let mut n = 0;
    for m in h.read_stream("WORKFLOW_COMMANDS") {
        let cmd = m.json();
        let id = cmd["command_id"].as_str().unwrap().to_owned();
        if answered.contains_key(&id) {
            continue;
        }
        let oc = outcome(&cmd);
        let effect = cmd["effect"].as_str().unwrap();
        let result = serde_json::json!({
            "command_id": id, "tenant_id": cmd["tenant_id"], "effect": effect, "saga": cmd["saga"],
            "correlation_id": cmd["correlation_id"], "outcome": oc, "payload": {"ref": "x"},
            "error": if oc == "failed" { serde_json::json!("declined") } else { serde_json::Value::Null },
        });
        h.publish(
            &format!("workflow.events.{TENANT}.{effect}.{oc}"),
            &[("Nats-Msg-Id", &format!("result:{id}"))],
            &result,
        );
        answered.insert(id, ());
        n += 1;
    }
    n
}

#[test]
fn order_saga_runs_end_to_end_exactly_once_and_survives_a_full_replay() {
    let h = Harness::new();
    let gateway = HttpFixture::start().unwrap();
    let mut cfg = h.config(Mode::Saga);
    cfg.gateway_url = Some(gateway.url());
    let app = h.start(cfg.clone());

    let orders = ["o-1", "o-2", "o-3"];
    for o in orders {
        placed(&h, o);
    }
    // Reserve reaches the Gateway once per order, with every header.
    assert!(gateway.wait_for(Duration::from_secs(20), |r| r.len() >= 3), "Reserve commands did not reach the gateway");
    for r in gateway.records() {
        let body = r.json();
        assert_eq!(r.path, "/commands");
        assert_eq!(body["command"], "Reserve");
        assert_eq!(body["aggregate_type"], "inventory");
        assert_eq!(r.header("x-tenant-id"), Some(TENANT));
        let cid = body["correlation_id"].as_str().unwrap();
        assert_eq!(r.header("x-correlation-id"), Some(cid));
        assert_eq!(r.header("traceparent"), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(r.header("idempotency-key"), body["command_id"].as_str());
        // The aggregate answers.
        h.event(
            TENANT,
            "inventory",
            "InventoryReserved",
            &format!("reserved-{cid}"),
            serde_json::json!({"order_id": cid}),
        );
    }
    // Payment commands land on WORKFLOW_COMMANDS once each, with Nats-Msg-Id = command id.
    wait_until(Duration::from_secs(20), "charge commands", || h.read_stream("WORKFLOW_COMMANDS").len() >= 3);
    let mut answered = BTreeMap::new();
    for m in h.read_stream("WORKFLOW_COMMANDS") {
        let cmd = m.json();
        assert_eq!(cmd["effect"], "charge_payment");
        assert_eq!(m.header("Nats-Msg-Id"), cmd["command_id"].as_str());
        assert_eq!(m.header("x-tenant-id"), Some(TENANT));
        assert_eq!(m.header("x-correlation-id"), cmd["correlation_id"].as_str());
        assert!(m.header("traceparent").is_some());
        assert_eq!(m.subject, "workflow.commands.acme.charge_payment");
    }
    // o-3's payment fails: it compensates (Release at the Gateway).
    answer_commands(&h, &mut answered, |c| if c["correlation_id"] == "o-3" { "failed" } else { "succeeded" });
    wait_until(Duration::from_secs(20), "ship commands", || h.read_stream("WORKFLOW_COMMANDS").len() >= 5);
    answer_commands(&h, &mut answered, |_| "succeeded");
    wait_until(Duration::from_secs(20), "sagas finished", || {
        orders.iter().all(|o| h.saga(&app, TENANT, o)["status"] != "running")
    });
    assert_eq!(h.saga(&app, TENANT, "o-1")["status"], "completed");
    assert_eq!(h.saga(&app, TENANT, "o-2")["state"]["step"], "shipped");
    assert_eq!(h.saga(&app, TENANT, "o-3")["state"]["step"], "payment_failed");
    wait_until(Duration::from_secs(20), "release at the gateway", || gateway.requests_to("/commands").len() == 4);
    let commands = h.read_stream("WORKFLOW_COMMANDS");
    assert_eq!(commands.len(), 5, "2 ship + 3 charge, each once");
    let gateway_calls = gateway.records().len();
    let versions: Vec<_> = orders.iter().map(|o| h.saga(&app, TENANT, o)["version"].clone()).collect();
    let report = app.shutdown();
    assert!(report.drained, "{report:?}");

    // Replay everything: delete the durable consumers, start again. Every event and result
    // is redelivered with its original sequence; nothing changes, nothing is sent twice.
    h.block_on(async {
        for stream in ["AGGREGATE_EVENTS", "WORKFLOW_EVENTS"] {
            let s = h.js.get_stream(stream).await.unwrap();
            let names: Vec<String> = {
                use futures::StreamExt;
                s.consumer_names().collect::<Vec<_>>().await.into_iter().map(Result::unwrap).collect()
            };
            for n in names {
                s.delete_consumer(&n).await.unwrap();
            }
        }
    });
    let app = h.start(cfg);
    let events = h.read_stream("AGGREGATE_EVENTS").len() + h.read_stream("WORKFLOW_EVENTS").len();
    wait_until(Duration::from_secs(20), "replayed messages consumed", || {
        app.bridge().shared().acked.load(std::sync::atomic::Ordering::SeqCst) as usize >= events
    });
    let after: Vec<_> = orders.iter().map(|o| h.saga(&app, TENANT, o)["version"].clone()).collect();
    assert_eq!(after, versions, "a redelivered event changed state");
    assert_eq!(h.read_stream("WORKFLOW_COMMANDS").len(), 5, "a command was dispatched twice");
    assert_eq!(gateway.records().len(), gateway_calls, "the gateway was called twice");
    app.shutdown();
}
