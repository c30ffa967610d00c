//! The example order saga in `combined` mode: payment and shipping effects call an HTTP
//! upstream fixture, aggregate commands go to a Gateway fixture, the test answers Reserve
//! with InventoryReserved like the inventory aggregate would. Success, payment failure,
//! shipping failure and payment timeout each end where they should, and every external call
//! happens exactly once per command id.

mod support;

use runner::config::Mode;
use runner::fixture::{HttpFixture, Reply};
use shards::clock::Clock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;

const TENANT: &str = "shop";

fn upstream() -> HttpFixture {
    let up = HttpFixture::start().unwrap();
    up.set_handler(Arc::new(|r| {
        let order = r.json()["order_id"].as_str().unwrap_or_default().to_owned();
        match (r.path.as_str(), order.as_str()) {
            ("/payments/charge", "declined") => Some(Reply::new(402, serde_json::json!({"reason": "card declined"}))),
            ("/payments/charge", "slowpay") => {
                Some(Reply { status: 200, body: serde_json::json!({"payment_id": "late"}), delay_ms: 2_500 })
            }
            ("/payments/charge", o) => Some(Reply::new(200, serde_json::json!({"payment_id": format!("pay-{o}")}))),
            ("/shipping/ship", "noship") => Some(Reply::new(422, serde_json::json!({"reason": "no carrier"}))),
            ("/shipping/ship", _) => Some(Reply::new(200, serde_json::json!({"tracking": "trk"}))),
            _ => None,
        }
    }));
    up
}

#[test]
fn the_order_saga_succeeds_and_compensates_with_every_call_exactly_once() {
    let h = Harness::new();
    let up = upstream();
    let gateway = HttpFixture::start().unwrap();
    let dir = h.dir.path().join("m");
    let secrets = h.dir.path().join("secrets");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("payments_token"), "tok").unwrap();
    let effects = std::fs::read_to_string(examples().join("effects.yaml"))
        .unwrap()
        .replace("${PAYMENTS_URL:-http://127.0.0.1:18081}", &up.url())
        .replace("${SHIPPING_URL:-http://127.0.0.1:18081}", &up.url());
    let mut cfg = h.config(Mode::Combined);
    cfg.effect_manifests = vec![write(&dir, "effects.yaml", &effects)];
    cfg.secrets_dir = secrets;
    cfg.gateway_url = Some(gateway.url());
    let app = h.start(cfg);

    let orders = ["ok-1", "ok-2", "declined", "noship", "slowpay"];
    for o in orders {
        h.event(
            TENANT,
            "order",
            "OrderPlaced",
            &format!("placed-{o}"),
            serde_json::json!({"order_id": o, "sku": "sku-9", "qty": 1, "amount": 30, "customer": "cu"}),
        );
    }
    // Play the inventory aggregate: each Reserve is answered once.
    let mut reserved = BTreeMap::new();
    wait_until(Duration::from_secs(30), "all reservations answered", || {
        for r in gateway.requests_to("/commands") {
            let b = r.json();
            if b["command"] != "Reserve" {
                continue;
            }
            let o = b["correlation_id"].as_str().unwrap().to_owned();
            if reserved.contains_key(&o) {
                continue;
            }
            // slowpay's reservation is "old": its 30 s payment timeout is due in about 1 s.
            let ts = if o == "slowpay" {
                shards::clock::SystemClock.now_ms() - 29_000
            } else {
                shards::clock::SystemClock.now_ms()
            };
            let body = serde_json::json!({"id": format!("reserved-{o}"), "type": "InventoryReserved", "tenant_id": TENANT, "timestamp": ts, "data": {"order_id": o}});
            h.publish(
                &format!("events.{TENANT}.inventory.InventoryReserved"),
                &[("Nats-Msg-Id", &format!("reserved-{o}"))],
                &body,
            );
            reserved.insert(o, ());
        }
        reserved.len() == orders.len()
    });
    wait_until(Duration::from_secs(30), "every saga finished", || {
        orders.iter().all(|o| h.saga(&app, TENANT, o)["status"] != "running")
    });
    let step = |o: &str| h.saga(&app, TENANT, o)["state"]["step"].as_str().unwrap().to_owned();
    let status = |o: &str| h.saga(&app, TENANT, o)["status"].as_str().unwrap().to_owned();
    assert_eq!((status("ok-1"), step("ok-1")), ("completed".into(), "shipped".into()));
    assert_eq!((status("ok-2"), step("ok-2")), ("completed".into(), "shipped".into()));
    assert_eq!((status("declined"), step("declined")), ("failed".into(), "payment_failed".into()));
    assert_eq!((status("noship"), step("noship")), ("failed".into(), "shipping_failed".into()));
    assert_eq!((status("slowpay"), step("slowpay")), ("failed".into(), "payment_timed_out".into()));
    // All the calls the compensations make, and the late payment of slowpay, arrive.
    wait_until(Duration::from_secs(30), "compensation calls", || {
        gateway.records().len() == 8 && up.records().len() == 10
    });
    // The records of the 10 calls run in place (5 charges, 3 ships, 2 refunds), command and
    // result each, come back through this runner's own consumers and are acked on receipt:
    // no shard sees them again. Through the shards went only the 10 aggregate events.
    let shared = app.bridge().shared().clone();
    wait_until(Duration::from_secs(30), "the records of the in-place calls", || {
        shared.recorded_skipped.load(Ordering::Relaxed) == 20
    });
    assert_eq!(shared.acked.load(Ordering::Relaxed), 10, "only the aggregate events reach a shard");
    let report = app.shutdown();
    assert!(report.drained, "{report:?}");

    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in gateway.records().into_iter().chain(up.records()) {
        let key = r.header("idempotency-key").expect("every call carries an idempotency key").to_owned();
        by_key.entry(key).or_default().push(format!("{} {}", r.path, r.json()["order_id"]));
    }
    let repeated: Vec<_> = by_key.iter().filter(|(_, calls)| calls.len() > 1).collect();
    assert!(repeated.is_empty(), "calls repeated for one command id: {repeated:?}");
    let paths = |p: &str| up.requests_to(p).len();
    assert_eq!((paths("/payments/charge"), paths("/shipping/ship"), paths("/payments/refund")), (5, 3, 2));
    let releases: Vec<String> = gateway
        .records()
        .into_iter()
        .filter(|r| r.json()["command"] == "Release")
        .map(|r| r.json()["correlation_id"].as_str().unwrap().to_owned())
        .collect();
    let mut releases = releases;
    releases.sort();
    assert_eq!(releases, ["declined", "noship", "slowpay"]);
    assert!(up.records().iter().all(|r| r.header("authorization") == Some("tok") || r.path == "/shipping/ship"));
}
