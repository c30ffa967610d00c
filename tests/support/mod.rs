//! Shared harness of the integration tests: a real `nats-server` per test (free port, own
//! store, killed on drop), the recording HTTP fixture, an in-process runner, and helpers to
//! publish events, read streams and wait on conditions with deadlines (never sleeps).

#![allow(dead_code)]

use async_nats::jetstream;
use bytes::Bytes;
use runner::app::{App, AppOptions};
use runner::config::{Config, Mode};
use runner::nats_server::NatsServer;
use shards::keys::SagaKey;
use shards::message::{Query, Request, reply_channel};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/order")
}

pub const SAGA: &str = "order_fulfillment";

/// Longest a shard may hold its thread without yielding in a test: above a large batch in a
/// debug build, far below a real stall. Time the kernel gave the CPU to a parallel test does
/// not count (the shard measures wall time less run-queue wait).
pub const STALL_THRESHOLD: Duration = Duration::from_millis(100);

/// An in-process runner that fails its test when a shard stalled: checked when it is shut
/// down, aborted or dropped (unless the test is already failing).
pub struct TestApp(Option<App>);

impl TestApp {
    fn check_stalls(&self) {
        if let Some(app) = &self.0
            && !std::thread::panicking()
        {
            assert_eq!(app.stalls(), 0, "a shard held its thread past {STALL_THRESHOLD:?} (see the log)");
        }
    }

    pub fn shutdown(mut self) -> runner::ops::DrainReport {
        self.check_stalls();
        self.0.take().expect("running").shutdown()
    }

    pub fn abort(mut self) {
        self.check_stalls();
        self.0.take().expect("running").abort()
    }
}

impl std::ops::Deref for TestApp {
    type Target = App;
    fn deref(&self) -> &App {
        self.0.as_ref().expect("running")
    }
}

impl std::ops::DerefMut for TestApp {
    fn deref_mut(&mut self) -> &mut App {
        self.0.as_mut().expect("running")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.check_stalls();
    }
}

/// A stored stream message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Stored {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A message to publish: subject, headers, body.
pub type Outgoing = (String, Vec<(String, String)>, Bytes);

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub nats: NatsServer,
    pub rt: tokio::runtime::Runtime,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    pub fn with_args(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start_with(None, &dir.path().join("nats"), args)
            .expect("nats-server (apt-get install -y nats-server)");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client =
            rt.block_on(async_nats::ConnectOptions::new().retry_on_initial_connect().connect(nats.url())).unwrap();
        let js = rt.block_on(async { jetstream::new(client.clone()) });
        Self { dir, nats, rt, client, js }
    }

    /// A config for an in-process runner on this harness's server.
    pub fn config(&self, mode: Mode) -> Config {
        let mut c = Config::defaults();
        c.mode = mode;
        c.nats_url = Some(self.nats.url());
        c.data_dir = self.dir.path().join("runner");
        c.shards = 2;
        c.pin_cores = false;
        c.saga_manifests = vec![examples().join("sagas.yaml")];
        c.effect_manifests = vec![examples().join("effects.yaml")];
        c.ack_wait_ms = 5_000;
        c.http_addr = "127.0.0.1:0".parse().unwrap();
        c
    }

    /// Starts an in-process runner that fails the test if a shard stalls (holds its
    /// thread past [`STALL_THRESHOLD`] without yielding).
    pub fn start(&self, cfg: Config) -> TestApp {
        let opts = AppOptions { stall_threshold: Some(STALL_THRESHOLD), ..AppOptions::default() };
        TestApp(Some(App::start(cfg, opts).expect("runner starts")))
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Publishes with headers and waits for the PubAck.
    pub fn publish(&self, subject: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> u64 {
        self.publish_raw(subject, headers, Bytes::from(serde_json::to_vec(body).unwrap()))
    }

    pub fn publish_raw(&self, subject: &str, headers: &[(&str, &str)], body: Bytes) -> u64 {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        self.block_on(async {
            let ack = self.js.publish_with_headers(subject.to_owned(), h, body).await.unwrap();
            ack.await.unwrap().sequence
        })
    }

    /// Publishes many messages pipelined (all sent, then all acks awaited).
    pub fn publish_many(&self, msgs: Vec<Outgoing>) {
        self.block_on(async {
            let mut acks = Vec::with_capacity(msgs.len());
            for (subject, headers, body) in msgs {
                let mut h = async_nats::HeaderMap::new();
                for (k, v) in &headers {
                    h.insert(k.as_str(), v.as_str());
                }
                acks.push(self.js.publish_with_headers(subject, h, body).await.unwrap());
                if acks.len() >= 2_000 {
                    for a in acks.drain(..) {
                        a.await.unwrap();
                    }
                }
            }
            for a in acks {
                a.await.unwrap();
            }
        })
    }

    /// Publishes one aggregate event in the envelope the runner expects.
    pub fn event(&self, tenant: &str, aggregate: &str, ty: &str, id: &str, data: serde_json::Value) -> u64 {
        let body =
            serde_json::json!({ "id": id, "type": ty, "tenant_id": tenant, "aggregate_type": aggregate, "data": data });
        self.publish(
            &format!("events.{tenant}.{aggregate}.{ty}"),
            &[("Nats-Msg-Id", id), ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
            &body,
        )
    }

    /// Publishes `OrderPlaced` for order `order` of tenant `acme` (message id `msg`).
    pub fn place_order(&self, msg: &str, order: &str) {
        self.event(
            "acme",
            "order",
            "OrderPlaced",
            msg,
            serde_json::json!({"order_id": order, "sku": "s", "qty": 1, "amount": 1, "customer": "c"}),
        );
    }

    /// Every message of a stream, in order.
    pub fn read_stream(&self, name: &str) -> Vec<Stored> {
        self.block_on(async {
            let Ok(mut stream) = self.js.get_stream(name).await else { return Vec::new() };
            let Ok(info) = stream.info().await else { return Vec::new() };
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            let mut out = Vec::new();
            for seq in first.max(1)..=last {
                if let Ok(m) = stream.get_raw_message(seq).await {
                    let headers = m
                        .headers
                        .iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
                        .collect();
                    out.push(Stored { seq, subject: m.subject.to_string(), headers, payload: m.payload });
                }
            }
            out
        })
    }

    /// One HTTP request; returns the status and the body (status 0: connection refused).
    pub fn http(&self, method: &str, url: &str, token: Option<&str>, body: Option<serde_json::Value>) -> (u16, String) {
        use http_body_util::{BodyExt, Full};
        self.block_on(async {
            let client = runner::http_client::http_client();
            let mut req = hyper::Request::builder().method(method).uri(url);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
            // Status 0: nothing listening (yet).
            let Ok(resp) = client.request(req.body(Full::new(Bytes::from(bytes))).unwrap()).await else {
                return (0, String::new());
            };
            let status = resp.status().as_u16();
            let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
            (status, text)
        })
    }

    pub fn saga(&self, app: &App, tenant: &str, cid: &str) -> serde_json::Value {
        saga_state(app, tenant, SAGA, cid)
    }
}

/// One instance as the shard reports it, as the operations API serves it (`null` when
/// absent).
pub fn saga_state(app: &App, tenant: &str, saga: &str, cid: &str) -> serde_json::Value {
    let key = SagaKey::new(tenant, saga, cid);
    let shard = app.runtime().router().shard(tenant, key.route());
    let (tx, rx) = reply_channel();
    app.runtime().handle(shard).send_blocking(Request::Query(Query::Saga { key, reply: tx })).unwrap();
    serde_json::to_value(futures::executor::block_on(rx).unwrap().unwrap()).unwrap()
}

/// Dead letters of a tenant across all shards, as the operations API serves them.
/// Waits until the order `order` of tenant `acme` has no outbox item left.
pub fn wait_outbox_drained(app: &App, order: &str) {
    wait_until(Duration::from_secs(30), "the outbox drains", || {
        saga_state(app, "acme", "order_fulfillment", order)["pending_outbox"].as_array().is_some_and(|a| a.is_empty())
    });
}

pub fn deadletters(app: &App, tenant: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for h in app.runtime().handles() {
        let (tx, rx) = reply_channel();
        h.send_blocking(Request::Query(Query::DeadLetters {
            tenant: tenant.into(),
            after: None,
            limit: 100_000,
            reply: tx,
        }))
        .unwrap();
        let letters = futures::executor::block_on(rx).unwrap().unwrap();
        out.extend(letters.into_iter().map(|l| serde_json::to_value(l).unwrap()));
    }
    out
}

pub mod fault;

/// Waits until `cond` holds, or panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A saga `s` running `program`, triggered by `events.>` (correlation `data.k`), with one
/// `noop` effect `e` and any extra effects YAML; returns the manifest path.
pub fn custom_saga(dir: &Path, program: &str, saga_extra: &str, effects_yaml: &str) -> PathBuf {
    write(dir, "p.rhai", program);
    let effects =
        if effects_yaml.is_empty() { "  - { name: e, provider: noop }\n".to_owned() } else { effects_yaml.to_owned() };
    write(
        dir,
        "m.yaml",
        &format!(
            "sagas:\n  - name: s\n    program: p.rhai\n{saga_extra}    triggers:\n      - {{ subject: \"events.>\", correlation: data.k, may_start: true }}\neffects:\n{effects}"
        ),
    )
}

/// Writes a manifest file (and optional program) into `dir`; returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
