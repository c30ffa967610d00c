//! Effect providers behind one trait, built from an effect's manifest entry. They run on a
//! shard's thread (glommio): HTTP through the shard's own client, NATS requests through the
//! bridge, which owns the NATS connection.
//!
//! - `http`: templated method, URL, headers and body; `Idempotency-Key: command_id` always;
//!   `secret:NAME` values read from the secrets directory once per manifest load (never
//!   logged).
//! - `nats_request`: request-reply on a subject with a timeout, sent by the bridge.
//! - `log` / `noop`: for development.
//!
//! Templates (`{{payload.a.b}}`, `{{command_id}}`, ...) are filled by [`super::template`]:
//! values in a URL are percent-encoded for their position, in headers and bodies kept as
//! they are.
//!
//! What an HTTP answer means: 2xx succeeded; 409 in progress (the upstream still works
//! under the same idempotency key: asked again later, same key); 408, 429, 5xx, timeouts
//! and transport errors unknown (retried, same key); any other status a definite failure.

use crate::effects::http::Client as HttpClient;
use crate::effects::template::{render_json, render_str, render_url};
use crate::envelope::{CommandEnvelope, HDR_COMMAND_ID, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT};
use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use shards::manifest::{EffectSpec, ProviderKind};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

/// What a provider call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    /// Permanent: retrying will not help (4xx other than 408/409/429, a declared failure).
    Failed(String),
    /// Unknown: may have happened, may succeed if tried again (5xx, 408, 429, timeouts,
    /// transport errors).
    Retryable(String),
    /// The upstream answered 409: its work under this idempotency key is still in progress.
    /// Asked again later with the same key; the upstream is up (no breaker failure).
    InProgress(String),
}

pub type Call<'a> = Pin<Box<dyn Future<Output = Outcome> + 'a>>;

pub trait Provider {
    /// Calls the upstream once for `cmd`.
    fn call<'a>(&'a self, cmd: &'a CommandEnvelope) -> Call<'a>;
    /// The upstream this provider talks to (one circuit breaker each).
    fn upstream(&self) -> String;
}

/// Reads `secret:NAME` values from a directory (Swarm mounts secrets at `/run/secrets`).
/// Each secret is read once and kept (a reload makes a new `Secrets`, so a rotated secret
/// is picked up by `/admin/reload`). Shard thread only.
#[derive(Debug, Clone)]
pub struct Secrets {
    dir: PathBuf,
    cache: std::rc::Rc<std::cell::RefCell<BTreeMap<String, String>>>,
}

impl Secrets {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), cache: Default::default() }
    }

    /// Resolves a value: `secret:NAME` becomes the file's content (trailing newline trimmed).
    pub fn resolve(&self, value: &str) -> Result<String, String> {
        match value.strip_prefix("secret:") {
            None => Ok(value.to_owned()),
            Some(name) => {
                if name.is_empty() || name.contains('/') || name.contains("..") {
                    return Err(format!("secret name {name:?} is not a plain file name"));
                }
                if let Some(v) = self.cache.borrow().get(name) {
                    return Ok(v.clone());
                }
                let path = self.dir.join(name);
                let v = std::fs::read_to_string(&path)
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                    .map_err(|e| format!("secret {name:?} cannot be read from {}: {e}", path.display()))?;
                self.cache.borrow_mut().insert(name.to_owned(), v.clone());
                Ok(v)
            }
        }
    }
}

/// A NATS request the bridge sends for a shard (the `nats_request` provider).
#[derive(Debug)]
pub struct NatsCall {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    pub timeout: Duration,
    pub reply: futures::channel::oneshot::Sender<Result<Bytes, NatsCallError>>,
}

/// Why a NATS request got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsCallError {
    #[error("no reply on {subject} within {ms} ms")]
    NoReply { subject: String, ms: u128 },
    #[error("request on {subject} failed: {why}")]
    Failed { subject: String, why: String },
    #[error("the NATS bridge is gone")]
    BridgeGone,
}

/// Where shards send their NATS requests (the bridge serves them).
pub type NatsCalls = flume::Sender<NatsCall>;

fn context_of(cmd: &CommandEnvelope) -> Value {
    serde_json::json!({
        "payload": cmd.payload,
        "command_id": cmd.command_id,
        "tenant": cmd.tenant_id,
        "correlation_id": cmd.correlation_id,
        "saga": cmd.saga,
        "effect": cmd.effect,
    })
}

/// Why an effect's provider cannot be built (manifest validation rules these out; a set
/// that skipped it must not get a provider calling an empty URL or subject).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("effect {effect:?}: settings.{setting} (a string) is required for the {provider:?} provider")]
    MissingSetting { effect: String, provider: ProviderKind, setting: &'static str },
}

/// A required string setting of an effect.
fn required_str(spec: &EffectSpec, setting: &'static str) -> Result<String, ProviderError> {
    spec.settings
        .get(setting)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| ProviderError::MissingSetting { effect: spec.name.clone(), provider: spec.provider, setting })
}

/// Builds the provider of an effect.
pub fn build(
    spec: &EffectSpec,
    http: HttpClient,
    nats: NatsCalls,
    secrets: Secrets,
) -> Result<Box<dyn Provider>, ProviderError> {
    let s = &spec.settings;
    let str_setting = |k: &str| s.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Ok(match spec.provider {
        ProviderKind::Http => Box::new(HttpProvider {
            effect: spec.name.clone(),
            method: str_setting("method").unwrap_or_else(|| "POST".into()).to_ascii_uppercase(),
            url: required_str(spec, "url")?,
            headers: s
                .get("headers")
                .and_then(|h| h.as_object())
                .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect())
                .unwrap_or_default(),
            body: s.get("body").cloned(),
            timeout: Duration::from_millis(spec.timeout_ms),
            http,
            secrets,
        }),
        ProviderKind::NatsRequest => Box::new(NatsRequestProvider {
            subject: required_str(spec, "subject")?,
            body: s.get("body").cloned(),
            timeout: Duration::from_millis(spec.timeout_ms),
            nats,
        }),
        ProviderKind::Log => {
            Box::new(LocalProvider { effect: spec.name.clone(), log: true, result: s.get("result").cloned() })
        }
        ProviderKind::Noop => {
            Box::new(LocalProvider { effect: spec.name.clone(), log: false, result: s.get("result").cloned() })
        }
    })
}

struct HttpProvider {
    effect: String,
    method: String,
    url: String,
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    timeout: Duration,
    http: HttpClient,
    secrets: Secrets,
}

impl Provider for HttpProvider {
    fn upstream(&self) -> String {
        // One breaker per host:port (scheme and path do not change who is down).
        let rest = self.url.split("://").nth(1).unwrap_or(&self.url);
        rest.split('/').next().unwrap_or(rest).to_owned()
    }

    fn call<'a>(&'a self, cmd: &'a CommandEnvelope) -> Call<'a> {
        Box::pin(async move {
            let ctx = context_of(cmd);
            let url = match self.secrets.resolve(&self.url) {
                Ok(u) => match render_url(&u, &ctx) {
                    Ok(url) => url,
                    // The command's data cannot make a good URL: retrying will not help.
                    Err(e) => return Outcome::Failed(format!("effect {}: {e}", self.effect)),
                },
                Err(e) => return Outcome::Retryable(e),
            };
            let method = match hyper::Method::from_bytes(self.method.as_bytes()) {
                Ok(m) => m,
                Err(_) => return Outcome::Failed(format!("effect {}: bad method {}", self.effect, self.method)),
            };
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(&url)
                .header("content-type", "application/json")
                .header("idempotency-key", cmd.command_id.as_str())
                .header(HDR_COMMAND_ID, cmd.command_id.as_str())
                .header(HDR_TENANT, cmd.tenant_id.as_str())
                .header(HDR_CORRELATION, cmd.correlation_id.as_str());
            if let Some(tp) = &cmd.traceparent {
                req = req.header(HDR_TRACEPARENT, tp.as_str());
            }
            for (k, v) in &self.headers {
                // Secret values go straight into the header, never into a log line.
                match self.secrets.resolve(v) {
                    Ok(v) => req = req.header(k.as_str(), render_str(&v, &ctx)),
                    Err(e) => return Outcome::Retryable(e),
                }
            }
            // A `Value` prints as compact JSON and cannot fail to.
            let body = match &self.body {
                Some(t) => render_json(t, &ctx).to_string(),
                None => cmd.payload.to_string(),
            };
            let req = match req.body(Full::new(Bytes::from(body))) {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(format!("effect {}: cannot build the request: {e}", self.effect)),
            };
            let resp = match self.http.request(req, self.timeout).await {
                Ok(r) => r,
                Err(e) if e.is_retryable() => return Outcome::Retryable(format!("upstream {}: {e}", self.upstream())),
                Err(e) => return Outcome::Failed(format!("effect {}: {e}", self.effect)),
            };
            let (status, bytes) = (resp.status, resp.body);
            let body: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).chars().take(500).collect()));
            match status {
                200..=299 => Outcome::Succeeded(if body.is_object() {
                    body
                } else {
                    serde_json::json!({ "status": status, "body": body })
                }),
                408 | 429 | 500..=599 => Outcome::Retryable(format!("upstream answered {status}")),
                409 => Outcome::InProgress(format!(
                    "upstream answered 409 (in progress under idempotency key {}): {}",
                    cmd.command_id,
                    reason_of(&body).unwrap_or_default()
                )),
                _ => Outcome::Failed(reason_of(&body).unwrap_or_else(|| format!("upstream answered {status}"))),
            }
        })
    }
}

/// The reason an upstream gave in its answer (`reason` or `error`), if any.
fn reason_of(body: &Value) -> Option<String> {
    body.get("reason").or_else(|| body.get("error")).and_then(|v| v.as_str()).map(str::to_owned)
}

struct NatsRequestProvider {
    subject: String,
    body: Option<Value>,
    timeout: Duration,
    nats: NatsCalls,
}

impl Provider for NatsRequestProvider {
    fn upstream(&self) -> String {
        format!("nats:{}", self.subject)
    }

    fn call<'a>(&'a self, cmd: &'a CommandEnvelope) -> Call<'a> {
        Box::pin(async move {
            let ctx = context_of(cmd);
            let body = match &self.body {
                Some(t) => render_json(t, &ctx),
                None => cmd.payload.clone(),
            };
            let mut headers = vec![
                ("idempotency-key".to_owned(), cmd.command_id.clone()),
                (HDR_TENANT.to_owned(), cmd.tenant_id.clone()),
                (HDR_CORRELATION.to_owned(), cmd.correlation_id.clone()),
            ];
            if let Some(tp) = &cmd.traceparent {
                headers.push((HDR_TRACEPARENT.to_owned(), tp.clone()));
            }
            let (tx, rx) = futures::channel::oneshot::channel();
            let call = NatsCall {
                subject: self.subject.clone(),
                headers,
                payload: Bytes::from(body.to_string()),
                timeout: self.timeout,
                reply: tx,
            };
            if self.nats.send_async(call).await.is_err() {
                return Outcome::Retryable(NatsCallError::BridgeGone.to_string());
            }
            match rx.await {
                Err(_) => Outcome::Retryable(NatsCallError::BridgeGone.to_string()),
                Ok(Err(e)) => Outcome::Retryable(e.to_string()),
                Ok(Ok(payload)) => {
                    // A reply that is not JSON is kept as text (as the http provider does),
                    // not turned into null.
                    let v: Value = serde_json::from_slice(&payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&payload).chars().take(500).collect())
                    });
                    match v.get("error").and_then(|e| e.as_str()) {
                        Some(err) => Outcome::Failed(err.to_owned()),
                        None => Outcome::Succeeded(if v.is_object() { v } else { serde_json::json!({ "reply": v }) }),
                    }
                }
            }
        })
    }
}

/// Serves shards' NATS requests on the bridge's thread, each with its own timeout.
pub async fn serve_nats_calls(client: async_nats::Client, calls: flume::Receiver<NatsCall>) {
    while let Ok(call) = calls.recv_async().await {
        let client = client.clone();
        tokio::task::spawn_local(async move {
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in &call.headers {
                headers.insert(k.as_str(), v.as_str());
            }
            let req = client.request_with_headers(call.subject.clone(), headers, call.payload);
            let r = match tokio::time::timeout(call.timeout, req).await {
                Err(_) => Err(NatsCallError::NoReply { subject: call.subject, ms: call.timeout.as_millis() }),
                Ok(Err(e)) => Err(NatsCallError::Failed { subject: call.subject, why: e.to_string() }),
                Ok(Ok(msg)) => Ok(msg.payload),
            };
            let _ = call.reply.send(r);
        });
    }
}

struct LocalProvider {
    effect: String,
    log: bool,
    result: Option<Value>,
}

impl Provider for LocalProvider {
    fn upstream(&self) -> String {
        format!("local:{}", self.effect)
    }

    fn call<'a>(&'a self, cmd: &'a CommandEnvelope) -> Call<'a> {
        Box::pin(async move {
            if self.log {
                tracing::info!(effect = %self.effect, tenant = %cmd.tenant_id, correlation_id = %cmd.correlation_id, command_id = %cmd.command_id, "effect (log provider)");
            }
            Outcome::Succeeded(self.result.clone().unwrap_or_else(|| serde_json::json!({})))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_required_setting_that_is_missing_or_not_a_string_is_an_error() {
        let mut spec: EffectSpec =
            serde_json::from_value(serde_json::json!({"name": "charge", "provider": "http", "settings": {"url": 5}}))
                .unwrap();
        let e = required_str(&spec, "url").unwrap_err();
        assert_eq!(e.to_string(), "effect \"charge\": settings.url (a string) is required for the Http provider");
        spec.settings.remove("url");
        assert!(matches!(required_str(&spec, "url"), Err(ProviderError::MissingSetting { setting: "url", .. })));
        spec.settings.insert("url".into(), "http://up/pay".into());
        assert_eq!(required_str(&spec, "url").unwrap(), "http://up/pay");
    }

    #[test]
    fn secrets_come_from_files_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cr3t\n").unwrap();
        let s = Secrets::new(dir.path());
        assert_eq!(s.resolve("secret:token").unwrap(), "s3cr3t");
        assert_eq!(s.resolve("plain").unwrap(), "plain");
        assert!(s.resolve("secret:../etc/passwd").is_err());
        let e = s.resolve("secret:missing").unwrap_err();
        assert!(e.contains("missing") && !e.contains("s3cr3t"));
    }
}
