//! A recording HTTP server on loopback, on its own thread: the Gateway and upstream fixture
//! of the tests, and the base of the demo's built-in upstream and development Gateway.
//!
//! It stores every request (method, path, headers, body) and answers by a script that
//! tests change while it runs: fail the next N with 500, answer 409, delay, or compute the
//! answer with a handler.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// How the fixture answers (checked in this order).
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Answer this many requests with 500 first.
    pub fail_next: u32,
    /// Answer this many requests with 409 `{"error":"duplicate"}` next: the Gateway
    /// contract's "done before under this idempotency key".
    pub conflict_next: u32,
    /// Answer every request with this status.
    pub status: Option<u16>,
    /// Wait this long before answering.
    pub delay_ms: u64,
}

/// A computed answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
    /// Wait this long before answering.
    pub delay_ms: u64,
}

impl Reply {
    pub fn new(status: u16, body: serde_json::Value) -> Self {
        Self { status, body, delay_ms: 0 }
    }
}

/// Computes an answer; `None` falls back to the script's default (200).
pub type Handler = Arc<dyn Fn(&Recorded) -> Option<Reply> + Send + Sync>;

#[derive(Default)]
struct State {
    records: Mutex<Vec<Recorded>>,
    script: Mutex<Script>,
    handler: Mutex<Option<Handler>>,
}

pub struct HttpFixture {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpFixture {
    /// Starts on a free loopback port.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().map_err(std::io::Error::other)?)
    }

    pub fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(State::default());
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new().name("http-fixture".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else { return };
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let st = st.clone();
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| answer(st.clone(), req));
                                let _ = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), svc).await;
                            });
                        }
                    }
                }
            });
        })?;
        Ok(Self { addr, state, stop: Some(stop_tx), thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn records(&self) -> Vec<Recorded> {
        // Records are only pushed whole, so a poisoned lock still holds every one of them.
        self.state.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<Recorded> {
        self.records().into_iter().filter(|r| r.path.starts_with(prefix)).collect()
    }

    pub fn count(&self) -> usize {
        self.state.records.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        if let Ok(mut s) = self.state.script.lock() {
            f(&mut s);
        }
    }

    pub fn set_handler(&self, h: Handler) {
        if let Ok(mut slot) = self.state.handler.lock() {
            *slot = Some(h);
        }
    }

    /// Waits until `pred(records)` holds or `timeout` passes; returns whether it held.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Recorded]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.records()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for HttpFixture {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn answer(
    st: Arc<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        // Not recorded: a test must not see an empty body the client never sent.
        Err(e) => return Ok(respond(400, &serde_json::json!({ "error": format!("cannot read the body: {e}") }))),
    };
    let rec = Recorded { method, path, headers, body, at: Instant::now() };
    st.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(rec.clone());
    let handler = st.handler.lock().ok().and_then(|h| h.clone());
    let (status, body, delay) = {
        let mut s = match st.script.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let delay = s.delay_ms;
        if s.fail_next > 0 {
            s.fail_next -= 1;
            (500, serde_json::json!({"error": "scripted failure"}), delay)
        } else if s.conflict_next > 0 {
            s.conflict_next -= 1;
            (409, serde_json::json!({"error": "duplicate"}), delay)
        } else if let Some(code) = s.status {
            (code, serde_json::json!({"status": code}), delay)
        } else {
            drop(s);
            match handler.as_ref().and_then(|h| h(&rec)) {
                Some(r) => (r.status, r.body, delay.max(r.delay_ms)),
                None => (200, serde_json::json!({"ok": true}), delay),
            }
        }
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    Ok(respond(status, &body))
}

fn respond(status: u16, body: &serde_json::Value) -> hyper::Response<Full<Bytes>> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    resp
}
