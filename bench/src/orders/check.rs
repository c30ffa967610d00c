//! What each order must cause, and the exactly-once check against the recording servers.
//!
//! An order's steps, each one call with one idempotency key (the runner's deterministic work
//! id, `shards::ids::work_id`, of the item that caused it):
//!
//! | flow | good order | declined payment |
//! |---|---|---|
//! | `http` (examples/order-http) | reserve, charge, ship | reserve, charge, release, refund |
//! | `gateway` (examples/order) | reserve (Gateway), charge, ship | reserve (Gateway), charge, release (Gateway) |
//!
//! The key of a step is derived from the event that emitted it: `placed-order-N` (the
//! `Nats-Msg-Id` of `OrderPlaced`), `reserved-order-N` (the Gateway's `InventoryReserved`) or
//! `result:{command id}` (the result event of the previous effect).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const TENANT: &str = "bench";
pub const SAGA: &str = "order_fulfillment";

/// Which workflow runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// examples/order-http: every step an HTTP effect to the upstream process.
    Http,
    /// examples/order: Reserve (and Release) through the Gateway process, which publishes
    /// `InventoryReserved` like the inventory aggregate; charge and ship HTTP effects.
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Reserve,
    Charge,
    Ship,
    Refund,
    Release,
}

impl Step {
    pub const ALL: [Step; 5] = [Step::Reserve, Step::Charge, Step::Ship, Step::Refund, Step::Release];

    pub fn name(self) -> &'static str {
        match self {
            Step::Reserve => "reserve",
            Step::Charge => "charge",
            Step::Ship => "ship",
            Step::Refund => "refund",
            Step::Release => "release",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|st| st.name().eq_ignore_ascii_case(s))
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Correlation id of order `i`.
pub fn order_id(i: u64) -> String {
    format!("order-{i}")
}

/// The index of `order-N`.
pub fn order_index(order: &str) -> Option<u64> {
    order.strip_prefix("order-")?.parse().ok()
}

/// Whether the upstream declines the payment of `order` (deterministic: FNV-1a of the id, so
/// the upstream, the load and the checker agree without talking). Also picks the flaky keys.
pub fn declined(order: &str, pct: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in order.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h % 10_000) as f64) < pct * 100.0
}

/// The steps whose calls end an order: the latency runs up to the last of them.
pub fn finals(flow: Flow, declined: bool) -> &'static [Step] {
    match (flow, declined) {
        (_, false) => &[Step::Ship],
        (Flow::Http, true) => &[Step::Release, Step::Refund],
        (Flow::Gateway, true) => &[Step::Release],
    }
}

/// The mask of [`finals`].
pub fn finals_mask(flow: Flow, declined: bool) -> u8 {
    finals(flow, declined).iter().fold(0, |m, s| m | s.bit())
}

/// Every step of order `i` with the idempotency key its call must carry.
pub fn expected(flow: Flow, i: u64, declined: bool) -> Vec<(Step, String)> {
    let cid = order_id(i);
    let key = |event: &str, index: usize| shards::ids::work_id(TENANT, SAGA, &cid, event, index);
    let reserve = key(&format!("placed-{cid}"), 0);
    let charge = match flow {
        Flow::Http => key(&format!("result:{reserve}"), 0),
        Flow::Gateway => key(&format!("reserved-{cid}"), 0),
    };
    let after_charge = format!("result:{charge}");
    let mut v = vec![(Step::Reserve, reserve), (Step::Charge, charge)];
    match (flow, declined) {
        (_, false) => v.push((Step::Ship, key(&after_charge, 0))),
        // The program's compensation emits [release, refund].
        (Flow::Http, true) => {
            v.push((Step::Release, key(&after_charge, 0)));
            v.push((Step::Refund, key(&after_charge, 1)));
        }
        (Flow::Gateway, true) => v.push((Step::Release, key(&after_charge, 0))),
    }
    v
}

/// One call as a recording server saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    /// When the request was received in full (µs since the epoch).
    pub at_us: u64,
    /// `reserve`, `charge`, … or what the path or command was when it is none of them.
    pub step: String,
    pub order: String,
    pub key: String,
    /// The status answered.
    pub status: u16,
}

/// The exactly-once verdict of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub orders: u64,
    pub calls: u64,
    pub declined: u64,
    /// Expected (order, step) pairs with no call.
    pub missing: u64,
    /// Calls for a step the order must not have, an unknown step or an unknown order.
    pub extra: u64,
    /// Calls for an expected step with another idempotency key.
    pub wrong_key: u64,
    /// Repeated calls with the expected key (at-least-once retries the receiver absorbs;
    /// reported, not a failure).
    pub duplicates: u64,
    /// Up to 10 examples of each problem.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.wrong_key == 0
    }

    pub fn summary(&self) -> String {
        if self.passed() {
            if self.duplicates == 0 { "pass".into() } else { format!("pass ({} duplicate calls)", self.duplicates) }
        } else {
            format!(
                "FAIL: {} missing, {} extra, {} wrong key, {} duplicates",
                self.missing, self.extra, self.wrong_key, self.duplicates
            )
        }
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

/// Checks orders `0..orders` against every recorded call.
pub fn check(flow: Flow, orders: u64, decline_pct: f64, calls: &[Call]) -> Verdict {
    let mut v = Verdict { orders, calls: calls.len() as u64, ..Default::default() };
    // (order, step) → keys seen, in arrival order.
    let mut seen: BTreeMap<(u64, Step), Vec<&str>> = BTreeMap::new();
    for c in calls {
        match (order_index(&c.order).filter(|i| *i < orders), Step::parse(&c.step)) {
            (Some(i), Some(step)) => seen.entry((i, step)).or_default().push(&c.key),
            _ => {
                v.extra += 1;
                v.example(format!("call for an unknown order or step: {c:?}"));
            }
        }
    }
    for i in 0..orders {
        let d = declined(&order_id(i), decline_pct);
        v.declined += u64::from(d);
        let want = expected(flow, i, d);
        for (step, key) in &want {
            match seen.remove(&(i, *step)) {
                None => {
                    v.missing += 1;
                    v.example(format!("order-{i}: no {} call", step.name()));
                }
                Some(keys) => {
                    let (right, wrong): (Vec<&str>, Vec<&str>) = keys.iter().partition(|k| **k == key.as_str());
                    if !wrong.is_empty() {
                        v.wrong_key += wrong.len() as u64;
                        v.example(format!("order-{i}: {} with key {} (expected {key})", step.name(), wrong[0]));
                    }
                    if right.is_empty() {
                        v.missing += 1;
                        v.example(format!("order-{i}: no {} call with key {key}", step.name()));
                    }
                    v.duplicates += right.len().saturating_sub(1) as u64;
                }
            }
        }
    }
    // Whatever is left was not expected of its order.
    for ((i, step), keys) in seen {
        v.extra += keys.len() as u64;
        v.example(format!("order-{i}: unexpected {} call ({} of them)", step.name(), keys.len()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(flow: Flow, orders: u64, pct: f64) -> Vec<Call> {
        let mut out = Vec::new();
        for i in 0..orders {
            for (step, key) in expected(flow, i, declined(&order_id(i), pct)) {
                out.push(Call { at_us: 1, step: step.name().into(), order: order_id(i), key, status: 200 });
            }
        }
        out
    }

    #[test]
    fn about_five_percent_are_declined_and_the_choice_is_stable() {
        let n = (0..10_000).filter(|i| declined(&order_id(*i), 5.0)).count();
        assert!((400..600).contains(&n), "{n} of 10,000 declined at 5%");
        assert!((0..1000).all(|i| !declined(&order_id(i), 0.0)));
        assert!((0..1000).all(|i| declined(&order_id(i), 100.0)));
        assert_eq!(declined("order-7", 5.0), declined("order-7", 5.0));
    }

    #[test]
    fn keys_are_the_runners_work_ids_and_distinct() {
        let e = expected(Flow::Http, 3, true);
        assert_eq!(
            e.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [Step::Reserve, Step::Charge, Step::Release, Step::Refund]
        );
        let reserve = shards::ids::work_id(TENANT, SAGA, "order-3", "placed-order-3", 0);
        assert_eq!(e[0].1, reserve);
        assert_eq!(e[1].1, shards::ids::work_id(TENANT, SAGA, "order-3", &format!("result:{reserve}"), 0));
        let g = expected(Flow::Gateway, 3, false);
        assert_eq!(g[1].1, shards::ids::work_id(TENANT, SAGA, "order-3", "reserved-order-3", 0));
        let keys: std::collections::BTreeSet<_> = e.iter().chain(&g).map(|(_, k)| k.clone()).collect();
        assert_eq!(keys.len(), 6, "reserve is shared, everything else distinct");
    }

    #[test]
    fn a_complete_record_passes_and_each_kind_of_problem_is_caught() {
        for flow in [Flow::Http, Flow::Gateway] {
            let good = calls(flow, 200, 5.0);
            let v = check(flow, 200, 5.0, &good);
            assert!(v.passed() && v.duplicates == 0, "{v:?}");
            assert!(v.declined > 0);

            let mut dup = good.clone();
            dup.push(good[4].clone());
            let v = check(flow, 200, 5.0, &dup);
            assert!(v.passed() && v.duplicates == 1, "{v:?}");

            let mut missing = good.clone();
            missing.remove(0);
            let v = check(flow, 200, 5.0, &missing);
            assert!(!v.passed() && v.missing == 1, "{v:?}");

            let mut wrong = good.clone();
            wrong[1].key = "other".into();
            let v = check(flow, 200, 5.0, &wrong);
            assert!(!v.passed() && v.wrong_key == 1 && v.missing == 1, "{v:?}");

            let mut extra = good.clone();
            let good_order = (0..200).find(|i| !declined(&order_id(*i), 5.0)).unwrap();
            extra.push(Call {
                at_us: 1,
                step: "refund".into(),
                order: order_id(good_order),
                key: "k".into(),
                status: 200,
            });
            extra.push(Call { at_us: 1, step: "ship".into(), order: order_id(500), key: "k".into(), status: 200 });
            extra.push(Call { at_us: 1, step: "/nowhere".into(), order: order_id(1), key: "k".into(), status: 404 });
            let v = check(flow, 200, 5.0, &extra);
            assert!(!v.passed() && v.extra == 3, "{v:?}");
        }
    }
}
