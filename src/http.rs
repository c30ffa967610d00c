//! The operations HTTP server (hyper, on the bridge thread):
//!
//! | route | what |
//! |---|---|
//! | `GET /health` | liveness: storage writable (200 / 503); NATS reported, not counted |
//! | `GET /ready` | healthy, pulling, not draining (200 / 503) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /info` | build, mode, streams, consumers, sagas, effects, shards, partitions |
//! | `POST /admin/drain` | stop pulling, finish in-flight, flush the relay; report |
//! | `POST /admin/resume` | end a drain: consumers bind again and pull (409 when not draining) |
//! | `POST /admin/reload` | swap manifests, or answer every problem and keep the old set |
//! | `POST /admin/replay` | `{tenant, saga, correlation_id?, from_seq?, confirm}` |
//! | `GET /admin/stats` | per-shard store counts, outbox depth, blocked keys |
//! | `GET /admin/deadletters?tenant=T&limit=N` | list |
//! | `POST /admin/deadletters/requeue` | `{tenant, saga, correlation_id, skip_poison?}` |
//! | `POST /admin/deadletters/discard` | `{tenant, at, id}` |
//! | `POST /admin/deadletters/resend` | `{tenant, at, id}`: a failed dispatch back to the outbox |
//! | `GET /sagas?tenant=&saga=&status=&parked=&correlation_prefix=&updated_after=&cursor=&limit=` | a page of instances (cursor paging) |
//! | `GET /sagas/{tenant}/{saga}/{correlation_id}` | one instance (`_` is the empty tenant) |
//!
//! `/admin/*` and `/sagas/*` need `Authorization: Bearer <http.admin_token>` when a token
//! is configured (scheme case-insensitive, compared in constant time, never logged); without
//! a token they are served on a loopback address only (403 elsewhere). Errors are JSON
//! `{"error": reason}`.

use crate::ops::{Ops, OpsError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use shards::keys::{DeadLetterKey, SagaKey};
use std::sync::Arc;
use std::time::Duration;

type Resp = Response<Full<Bytes>>;

fn json_response(status: u16, v: &Value) -> Resp {
    // `{:#}` is serde_json's pretty printing, which cannot fail for a `Value`.
    let mut r = Response::new(Full::new(Bytes::from(format!("{v:#}"))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: u16, reason: impl Into<String>) -> Resp {
    json_response(status, &json!({ "error": reason.into() }))
}

fn from<T: serde::Serialize>(r: Result<T, OpsError>) -> Resp {
    match r
        .and_then(|v| serde_json::to_value(v).map_err(|e| OpsError::new(500, format!("cannot encode the answer: {e}"))))
    {
        Ok(v) => json_response(200, &v),
        Err(e) => error(e.status, e.reason),
    }
}

/// The operations endpoints on a thread of their own (a current-thread tokio runtime), so
/// they never share the NATS bridge's thread; with a probe thread that checks the data
/// directory once a second for `/health`.
pub struct OpsServer {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    probe_stop: Option<flume::Sender<()>>,
}

impl OpsServer {
    /// Starts the probe and, with a listener, the HTTP server.
    pub fn start(ops: Arc<Ops>, listener: Option<std::net::TcpListener>, cpus: Vec<usize>) -> std::io::Result<Self> {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let (probe_stop, probe_rx) = flume::bounded::<()>(1);
        let mut threads = Vec::new();
        ops.probe_data_dir();
        let probing = ops.clone();
        threads.push(shards::cpus::spawn_on("probe", cpus.clone(), move || {
            while let Err(flume::RecvTimeoutError::Timeout) = probe_rx.recv_timeout(Duration::from_secs(1)) {
                probing.probe_data_dir();
            }
        })?);
        // The operations thread serves HTTP (with a listener) and resumes the replays a
        // crash left unfinished.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        threads.push(shards::cpus::spawn_on("ops-http", cpus, move || {
            let local = tokio::task::LocalSet::new();
            let resuming = ops.clone();
            let mut stop = stop_rx.clone();
            local.spawn_local(async move {
                tokio::select! {
                    _ = resuming.resume_replays() => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
            match listener {
                Some(listener) => local.block_on(&rt, serve(ops, listener, stop_rx)),
                None => local.block_on(&rt, async move {
                    let mut stop = stop_rx;
                    let _ = stop.wait_for(|s| *s).await;
                }),
            }
        })?);
        Ok(Self { threads, stop, probe_stop: Some(probe_stop) })
    }

    /// Stops serving and joins the threads.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.stop.send(true);
        self.probe_stop.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Serves until `stop` turns true.
pub async fn serve(ops: Arc<Ops>, listener: std::net::TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Ok(listener) = listener.set_nonblocking(true).and_then(|_| tokio::net::TcpListener::from_std(listener)) else {
        tracing::error!("cannot serve HTTP on the given listener");
        return;
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, "operations endpoints listening");
        if ops.cfg.admin_token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(addr = %addr, "no http.admin_token on a non-loopback address: /admin/* and /sagas/* answer 403; /health, /ready, /metrics and /info are served");
        }
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let ops = ops.clone();
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |req| {
                let ops = ops.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&ops, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Whether a request may use `/admin/*` and `/sagas/*`.
enum Access {
    Granted,
    /// No or a wrong bearer token.
    Denied,
    /// No token is configured and the server listens beyond loopback: the admin API is off.
    Off,
}

fn access(ops: &Ops, req: &Request<hyper::body::Incoming>) -> Access {
    let Some(token) = &ops.cfg.admin_token else {
        return if ops.cfg.http_addr.ip().is_loopback() { Access::Granted } else { Access::Off };
    };
    // `Bearer` is case-insensitive (RFC 7235); the token is compared in constant time.
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) { Access::Granted } else { Access::Denied }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn body_json(req: Request<hyper::body::Incoming>) -> Result<Value, OpsError> {
    let bytes = Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| OpsError::new(400, format!("cannot read the body: {e}")))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| OpsError::new(400, format!("body is not JSON: {e}")))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(req: &Request<hyper::body::Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(&v.replace('+', " ")))
    })
}

fn str_field(v: &Value, field: &str) -> Result<String, OpsError> {
    v.get(field)
        .and_then(|x| x.as_str())
        .map(str::to_owned)
        .ok_or_else(|| OpsError::new(400, format!("field `{field}` (string) is required")))
}

/// An optional string field: `None` when absent or null, an error when of another type.
fn opt_str_field(v: &Value, field: &str) -> Result<Option<String>, OpsError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(OpsError::new(400, format!("field `{field}` must be a string, not {other}"))),
    }
}

fn tenant_of(segment: &str) -> String {
    if segment == "_" { String::new() } else { segment.to_owned() }
}

async fn route(ops: &Ops, req: Request<hyper::body::Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let protected = path.starts_with("/admin/") || path.starts_with("/sagas/") || path == "/sagas";
    if protected {
        match access(ops, &req) {
            Access::Granted => {}
            Access::Denied => return error(401, "missing or wrong bearer token"),
            Access::Off => {
                return error(
                    403,
                    "the admin API is off: http.addr is not loopback and no http.admin_token is set \
                     (set one, or bind http.addr to 127.0.0.1)",
                );
            }
        }
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => {
            let (ok, v) = ops.health();
            json_response(if ok { 200 } else { 503 }, &v)
        }
        (&Method::GET, "/ready") => {
            let (ok, v) = ops.ready();
            json_response(if ok { 200 } else { 503 }, &v)
        }
        (&Method::GET, "/metrics") => match ops.metrics() {
            Ok(text) => {
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut()
                    .insert("content-type", hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
                r
            }
            Err(e) => error(e.status, e.reason),
        },
        (&Method::GET, "/info") => json_response(200, &ops.info()),
        (&Method::POST, "/admin/drain") => {
            let report = ops.drain(Duration::from_millis(ops.cfg.drain_deadline_ms)).await;
            let v = serde_json::to_value(&report).expect("a DrainReport is a flag and numbers, always JSON");
            json_response(if report.drained { 200 } else { 503 }, &v)
        }
        (&Method::POST, "/admin/resume") => from(ops.resume()),
        (&Method::POST, "/admin/reload") => from(ops.reload().await),
        (&Method::GET, "/admin/stats") => from(ops.stats().await),
        (&Method::POST, "/admin/replay") => {
            let body = match body_json(req).await {
                Ok(b) => b,
                Err(e) => return error(e.status, e.reason),
            };
            let (tenant, saga) = match (body.get("tenant").and_then(|t| t.as_str()), str_field(&body, "saga")) {
                (Some(t), Ok(s)) => (t.to_owned(), s),
                (None, _) => return error(400, "field `tenant` (string, \"\" for single-tenant) is required"),
                (_, Err(e)) => return error(e.status, e.reason),
            };
            // A correlation id of the wrong type must not widen the replay to every instance.
            let cid = match opt_str_field(&body, "correlation_id") {
                Ok(c) => c,
                Err(e) => return error(e.status, e.reason),
            };
            let from_seq = body.get("from_seq").and_then(|s| s.as_u64()).unwrap_or(0);
            let confirm = body.get("confirm").and_then(|c| c.as_bool()).unwrap_or(false);
            from(ops.replay(tenant, saga, cid, from_seq, confirm).await)
        }
        (&Method::GET, "/admin/deadletters") => {
            let tenant = query_param(&req, "tenant").unwrap_or_default();
            let limit = query_param(&req, "limit").and_then(|l| l.parse().ok()).unwrap_or(100);
            from(ops.deadletters(&tenant, limit).await)
        }
        (&Method::POST, "/admin/deadletters/requeue") => {
            let body = match body_json(req).await {
                Ok(b) => b,
                Err(e) => return error(e.status, e.reason),
            };
            // Absent: the empty tenant (single-tenant); of the wrong type: refused.
            let tenant = match opt_str_field(&body, "tenant") {
                Ok(t) => t.unwrap_or_default(),
                Err(e) => return error(e.status, e.reason),
            };
            let (saga, cid) = match (str_field(&body, "saga"), str_field(&body, "correlation_id")) {
                (Ok(s), Ok(c)) => (s, c),
                (Err(e), _) | (_, Err(e)) => return error(e.status, e.reason),
            };
            let skip = body.get("skip_poison").and_then(|s| s.as_bool()).unwrap_or(false);
            from(ops.requeue(SagaKey::new(tenant, saga, cid), skip).await)
        }
        (&Method::POST, path @ ("/admin/deadletters/discard" | "/admin/deadletters/resend")) => {
            let body = match body_json(req).await {
                Ok(b) => b,
                Err(e) => return error(e.status, e.reason),
            };
            let tenant = match opt_str_field(&body, "tenant") {
                Ok(t) => t.unwrap_or_default(),
                Err(e) => return error(e.status, e.reason),
            };
            let (Some(at), Ok(id)) = (body.get("at").and_then(|a| a.as_u64()), str_field(&body, "id")) else {
                return error(400, "fields `at` (number) and `id` (string) are required");
            };
            let key = DeadLetterKey { tenant, at, id };
            if path.ends_with("resend") { from(ops.resend(key).await) } else { from(ops.discard(key).await) }
        }
        (&Method::GET, "/sagas") => {
            let Some(saga) = query_param(&req, "saga") else {
                return error(400, "query parameter `saga` is required (and `tenant`, empty by default)");
            };
            let tenant = query_param(&req, "tenant").unwrap_or_default();
            let status = match query_param(&req, "status").as_deref() {
                None | Some("") => None,
                Some("running") => Some(shards::record::InstanceStatus::Running),
                Some("completed") => Some(shards::record::InstanceStatus::Completed),
                Some("failed") => Some(shards::record::InstanceStatus::Failed),
                Some(other) => {
                    return error(400, format!("status {other:?}: expected running, completed or failed"));
                }
            };
            let parked = match query_param(&req, "parked").as_deref() {
                None | Some("") => None,
                Some("true") => Some(true),
                Some("false") => Some(false),
                Some(other) => return error(400, format!("parked {other:?}: expected true or false")),
            };
            let updated_after = match query_param(&req, "updated_after") {
                None => None,
                Some(t) => match t.parse::<u64>() {
                    Ok(ms) => Some(ms),
                    Err(_) => {
                        return error(400, format!("updated_after {t:?}: expected milliseconds since the epoch"));
                    }
                },
            };
            let limit = match query_param(&req, "limit").map(|l| l.parse::<usize>()) {
                None => 100,
                Some(Ok(n)) if (1..=1_000).contains(&n) => n,
                Some(_) => return error(400, "limit: expected 1 to 1000"),
            };
            let filter = shards::message::ListFilter {
                status,
                parked,
                correlation_prefix: query_param(&req, "correlation_prefix").filter(|p| !p.is_empty()),
                updated_after,
            };
            let cursor = query_param(&req, "cursor").filter(|c| !c.is_empty());
            from(ops.list(&tenant, &saga, filter, cursor, limit).await)
        }
        (&Method::GET, p) if p.starts_with("/sagas/") => {
            let parts: Vec<String> = p["/sagas/".len()..].split('/').map(percent_decode).collect();
            match parts.as_slice() {
                [tenant, saga, cid] => from(ops.saga(SagaKey::new(tenant_of(tenant), saga.clone(), cid.clone())).await),
                _ => error(400, "expected /sagas/{tenant}/{saga}/{correlation_id} (`_` for the empty tenant)"),
            }
        }
        (_, p)
            if [
                "/health",
                "/ready",
                "/metrics",
                "/info",
                "/admin/drain",
                "/admin/resume",
                "/admin/reload",
                "/admin/replay",
                "/admin/deadletters",
            ]
            .contains(&p) =>
        {
            error(405, format!("method {method} is not allowed on {p}"))
        }
        _ => error(404, format!("no route {method} {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes_and_compares_in_constant_time() {
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert!(constant_time_eq(b"token-1234567890", b"token-1234567890"));
        assert!(!constant_time_eq(b"token-1234567890", b"token-1234567891"));
        assert!(!constant_time_eq(b"short", b"longer"));
    }

    #[test]
    fn optional_string_fields_refuse_other_types() {
        let body = json!({"tenant": "acme", "none": null, "n": 5});
        assert_eq!(opt_str_field(&body, "tenant").unwrap().as_deref(), Some("acme"));
        assert_eq!(opt_str_field(&body, "none").unwrap(), None);
        assert_eq!(opt_str_field(&body, "absent").unwrap(), None);
        let e = opt_str_field(&body, "n").unwrap_err();
        assert_eq!((e.status, e.reason.as_str()), (400, "field `n` must be a string, not 5"));
    }

    #[test]
    fn json_responses_are_pretty_printed_json() {
        let v = json!({"b": [1, 2], "a": "x"});
        let r = json_response(201, &v);
        assert_eq!(r.status(), 201);
        let body = futures::executor::block_on(r.into_body().collect()).unwrap().to_bytes();
        assert_eq!(body, serde_json::to_vec_pretty(&v).unwrap());
    }
}
