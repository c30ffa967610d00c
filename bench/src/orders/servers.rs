//! The upstream and the Gateway of the order benchmark, each run as its own process
//! (`runner-bench upstream …`, `runner-bench gateway …`): HTTP/1.1 servers (hyper, one
//! current-thread tokio runtime) that answer at once and record every call — step,
//! `Idempotency-Key`, order, receive time, status answered.
//!
//! - The upstream serves the HTTP effects: the step is the last path segment
//!   (`/payments/charge` → `charge`). It declines the charges of a deterministic ~`pct`% of
//!   the orders (402 with a reason: a permanent failure, so the saga compensates) and answers
//!   2xx to everything else.
//! - The Gateway serves `POST /commands` as the aggregate nodes would: `Reserve` appends
//!   `InventoryReserved` to `AGGREGATE_EVENTS` (waits for its PubAck, `Nats-Msg-Id =
//!   reserved-{order}`) and then answers 200; `Release` answers 200.
//!
//! Each call is also written, as it happens, as a line `index step at_us` to every client of
//! the `--notify` Unix socket (the load process, which needs each order's final call for its
//! closed loop and latency). On SIGTERM or SIGINT the server writes its records (JSON lines)
//! to `--record` and exits. It prints `READY http://127.0.0.1:PORT` once it accepts calls.

use super::check::{Call, Step, order_index};
use crate::js::{err, now_us, padded_event};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Where the calls are written (JSON lines) when the server is stopped.
    #[arg(long)]
    pub record: PathBuf,
    /// A Unix socket to listen on; each client receives `index step at_us` per call.
    #[arg(long)]
    pub notify: Option<PathBuf>,
    /// TCP port on 127.0.0.1 (0: a free one; the address is printed as `READY http://…`).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

#[derive(clap::Args, Debug, Clone)]
pub struct UpstreamArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Percent of orders whose charge is declined (402), chosen by a hash of the order id.
    #[arg(long, default_value_t = 5.0)]
    pub decline_pct: f64,
    /// Percent of idempotency keys whose first call is answered 503 (retryable), chosen by a
    /// hash of the key: the runner calls again with the same key.
    #[arg(long, default_value_t = 0.0)]
    pub flaky_pct: f64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// NATS URL for the events the Gateway appends.
    #[arg(long)]
    pub nats: String,
}

enum Role {
    Upstream { decline_pct: f64, flaky_pct: f64, failed_once: Mutex<HashSet<String>> },
    Gateway { js: Box<jetstream::Context> },
}

struct Shared {
    role: Role,
    calls: Mutex<Vec<Call>>,
    notify: mpsc::UnboundedSender<String>,
}

type Resp = hyper::Response<Full<Bytes>>;

fn reply(status: u16, body: Value) -> Resp {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = hyper::Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

/// The upstream's answer: (step, order, status, body).
fn upstream_answer(path: &str, body: &Value, decline_pct: f64) -> (String, String, u16, Value) {
    let order = body["order_id"].as_str().unwrap_or_default().to_owned();
    let last = path.rsplit('/').next().unwrap_or_default();
    let Some(step) = Step::parse(last) else {
        return (path.to_owned(), order, 404, json!({"error": format!("no step at {path}")}));
    };
    let (status, answer) = match step {
        Step::Charge if super::check::declined(&order, decline_pct) => (402, json!({"reason": "card declined"})),
        Step::Charge => (200, json!({"payment_id": format!("pay-{order}")})),
        Step::Ship => (200, json!({"tracking": format!("trk-{order}")})),
        Step::Reserve => (200, json!({"reservation": format!("res-{order}")})),
        Step::Refund | Step::Release => (200, json!({"ok": true})),
    };
    (step.name().to_owned(), order, status, answer)
}

/// The Gateway's answer to `POST /commands`.
async fn gateway_answer(js: &jetstream::Context, path: &str, body: &Value) -> (String, String, u16, Value) {
    let order = body["payload"]["order_id"].as_str().or(body["correlation_id"].as_str()).unwrap_or_default().to_owned();
    let command = body["command"].as_str().unwrap_or_default();
    if path != "/commands" {
        return (path.to_owned(), order, 404, json!({"error": "commands go to /commands"}));
    }
    match command {
        "Reserve" => {
            let tenant = body["tenant_id"].as_str().unwrap_or(super::check::TENANT);
            let id = format!("reserved-{order}");
            let event = padded_event(&id, "InventoryReserved", &format!(r#""order_id":"{order}""#));
            let publish = PublishMessage::build().payload(event).message_id(id);
            let appended = match js.send_publish(format!("events.{tenant}.inventory.InventoryReserved"), publish).await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match appended {
                Ok(()) => ("reserve".into(), order, 200, json!({"ok": true})),
                // The runner retries a 503; the event's Nats-Msg-Id absorbs a repeat.
                Err(e) => ("reserve".into(), order, 503, json!({"error": format!("cannot append the event: {e}")})),
            }
        }
        "Release" => ("release".into(), order, 200, json!({"ok": true})),
        other => (format!("command {other}"), order, 400, json!({"error": format!("unknown command {other:?}")})),
    }
}

async fn handle(sh: Arc<Shared>, req: hyper::Request<hyper::body::Incoming>) -> Result<Resp, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(reply(400, json!({"error": format!("cannot read the body: {e}")}))),
    };
    let at_us = now_us();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (step, order, status, answer) = match &sh.role {
        Role::Upstream { decline_pct, flaky_pct, failed_once } => {
            let flaky = *flaky_pct > 0.0
                && super::check::declined(&key, *flaky_pct)
                && failed_once.lock().map(|mut s| s.insert(key.clone())).unwrap_or(false);
            let (step, order, status, answer) = upstream_answer(&path, &json, *decline_pct);
            if flaky { (step, order, 503, json!({"error": "flaky on purpose"})) } else { (step, order, status, answer) }
        }
        Role::Gateway { js } => gateway_answer(js, &path, &json).await,
    };
    // A call answered 5xx will be made again: the order's final call is the one after it.
    if let Some(i) = order_index(&order)
        && Step::parse(&step).is_some()
        && status < 500
    {
        // The receiver went away: nothing to tell (the record still has the call).
        let _ = sh.notify.send(format!("{i} {step} {at_us}\n"));
    }
    if let Ok(mut calls) = sh.calls.lock() {
        calls.push(Call { at_us, step, order, key, status });
    }
    Ok(reply(status, answer))
}

/// Sends notification lines to the latest client of the socket (lines that come before any
/// client connects wait for it).
async fn notifier(listener: tokio::net::UnixListener, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut pending = String::new();
    let mut client: Option<tokio::net::UnixStream> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((s, _)) = accepted {
                    client = Some(s);
                }
            }
            line = rx.recv() => match line {
                Some(l) => {
                    pending.push_str(&l);
                    while let Ok(l) = rx.try_recv() {
                        pending.push_str(&l);
                    }
                }
                None => return,
            },
        }
        if let Some(c) = client.as_mut()
            && !pending.is_empty()
        {
            if c.write_all(pending.as_bytes()).await.is_ok() {
                pending.clear();
            } else {
                client = None;
            }
        }
    }
}

fn write_records(path: &Path, calls: &[Call]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp).map_err(err("record file"))?;
    let mut w = std::io::BufWriter::new(file);
    for c in calls {
        serde_json::to_writer(&mut w, c).map_err(err("record"))?;
        w.write_all(b"\n").map_err(err("record file"))?;
    }
    w.flush().map_err(err("record file"))?;
    drop(w);
    // Complete or absent: the harness reads the file only after the rename.
    std::fs::rename(&tmp, path).map_err(err("record file"))
}

/// Reads a record file written by [`serve`].
pub fn read_records(path: &Path) -> Result<Vec<Call>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("records {}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("records {}: {e}: {l}", path.display())))
        .collect()
}

pub fn upstream(a: UpstreamArgs) -> Result<(), String> {
    let rt = runtime()?;
    let role = Role::Upstream { decline_pct: a.decline_pct, flaky_pct: a.flaky_pct, failed_once: Mutex::default() };
    rt.block_on(serve(a.server, async move { Ok(role) }))
}

pub fn gateway(a: GatewayArgs) -> Result<(), String> {
    let rt = runtime()?;
    let url = a.nats.clone();
    rt.block_on(serve(a.server, async move {
        let client = async_nats::connect(url).await.map_err(err("gateway: connect to NATS"))?;
        Ok(Role::Gateway { js: Box::new(jetstream::new(client)) })
    }))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(err("tokio runtime"))
}

async fn serve(a: ServerArgs, role: impl std::future::Future<Output = Result<Role, String>>) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let role = role.await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port)).await.map_err(err("listen"))?;
    let addr = listener.local_addr().map_err(err("listen"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    if let Some(path) = &a.notify {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path).map_err(|e| format!("notify socket {}: {e}", path.display()))?;
        tokio::spawn(notifier(l, rx));
    }
    let shared = Arc::new(Shared { role, calls: Mutex::new(Vec::new()), notify: tx });
    let mut term = signal(SignalKind::terminate()).map_err(err("signal"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(err("signal"))?;
    println!("READY http://{addr}");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let sh = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(sh.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    let calls = shared.calls.lock().map(|c| c.clone()).map_err(|_| "records lock poisoned".to_string())?;
    write_records(&a.record, &calls)
}
