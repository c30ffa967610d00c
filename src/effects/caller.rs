//! What a shard calls itself, on its own thread: HTTP effects (and `nats_request` ones,
//! through the bridge), and Gateway commands. One [`ShardCaller`] per shard, made on the
//! shard's thread by [`factory`]; it owns that shard's providers, circuit breakers and HTTP
//! pool, so nothing here is shared between threads.
//!
//! ```text
//! relay (combined mode: the saga's own shard) ─ effect item ─> run_effect:
//!   breaker open ─────────────────────────────> Later { wait, not an attempt }
//!   provider call (timeout) ─ unknown or in progress (409), the retry policy's budget
//!                             not spent ─> Later { backoff, an attempt; same key }
//!                           ─ succeeded / failed / gave up ─> Ran { result event, record }
//! relay ─ Gateway command ─> post_gateway ─> Delivered / Retry / Permanent
//!   (2xx or 409 {"error":"duplicate"}: Delivered; any other 409: Retry, a conflict)
//! effect worker (effect mode, bridge) ─ RunEffect ─> run_effect (the same path)
//! ```

use super::breaker::{Breaker, Permit};
use super::http::Client as HttpClient;
use super::provider::{self, NatsCalls, Outcome, Provider, ProviderError, Secrets};
use crate::config::{Config, Mode};
use crate::context::BridgeShared;
use crate::envelope::{self, CommandEnvelope, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT, ResultEnvelope};
use http_body_util::Full;
use shards::caller::{Call, Caller, CallerFactory};
use shards::clock::{Clock, SystemClock};
use shards::manifest::{EffectSpec, ManifestSet};
use shards::message::{DispatchOutcome, RanEffect};
use shards::record::{OutboxItem, WorkKind};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// What every shard's caller is set up with.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    /// Effects run in place (combined mode); otherwise only Gateway commands.
    pub run_effects: bool,
    pub gateway_url: Option<String>,
    pub gateway_timeout: Duration,
    /// The stream results are published to (what an in-place result names as its stream).
    pub events_stream: String,
    pub secrets_dir: std::path::PathBuf,
    /// Idle connections kept per upstream and shard: the calls a shard may have in flight.
    pub pool: usize,
}

impl CallerSettings {
    pub fn of(cfg: &Config) -> Self {
        Self {
            run_effects: cfg.mode == Mode::Combined,
            gateway_url: cfg.gateway_url.clone(),
            gateway_timeout: Duration::from_millis(cfg.gateway_timeout_ms),
            events_stream: cfg.events_stream.clone(),
            secrets_dir: cfg.secrets_dir.clone(),
            pool: cfg.relay.max_in_flight.max(cfg.effect_concurrency),
        }
    }
}

/// Makes each shard's caller on that shard's thread.
pub fn factory(settings: CallerSettings, nats: NatsCalls, shared: Arc<BridgeShared>) -> CallerFactory {
    CallerFactory(Arc::new(move |shard, set: &Arc<ManifestSet>| {
        let caller = ShardCaller::new(shard, settings.clone(), nats.clone(), shared.clone());
        if let Err(e) = caller.rebuild(set) {
            // Manifests are validated before they get here; a set that is not gets no
            // providers, and its effects wait (Later) instead of calling a wrong upstream.
            tracing::error!(shard, error = %e, "effect providers not built");
        }
        Rc::new(caller) as Rc<dyn Caller>
    }))
}

/// An effect's manifest entry and its provider.
type Effect = Rc<(EffectSpec, Box<dyn Provider>)>;

/// One shard's providers, breakers and HTTP pool. Shard thread only; cheap to clone.
#[derive(Clone)]
pub struct ShardCaller {
    inner: Rc<Inner>,
}

struct Inner {
    shard: usize,
    settings: CallerSettings,
    http: HttpClient,
    nats: NatsCalls,
    shared: Arc<BridgeShared>,
    effects: RefCell<BTreeMap<String, Effect>>,
    breakers: RefCell<BTreeMap<String, Breaker>>,
}

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

impl ShardCaller {
    pub fn new(shard: usize, settings: CallerSettings, nats: NatsCalls, shared: Arc<BridgeShared>) -> Self {
        let http = HttpClient::new(settings.pool, Duration::from_secs(5));
        Self {
            inner: Rc::new(Inner {
                shard,
                settings,
                http,
                nats,
                shared,
                effects: RefCell::new(BTreeMap::new()),
                breakers: RefCell::new(BTreeMap::new()),
            }),
        }
    }

    /// Connections the shard's HTTP pool opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.http.connections_opened()
    }

    /// Builds every provider of `set` (secrets are read again); breakers stay. If one cannot
    /// be built, none is replaced.
    fn rebuild(&self, set: &ManifestSet) -> Result<(), ProviderError> {
        let i = &self.inner;
        let secrets = Secrets::new(&i.settings.secrets_dir);
        let effects = set
            .effects
            .values()
            .map(|spec| {
                let p = provider::build(spec, i.http.clone(), i.nats.clone(), secrets.clone())?;
                Ok((spec.name.clone(), Rc::new((spec.clone(), p))))
            })
            .collect::<Result<_, ProviderError>>()?;
        *i.effects.borrow_mut() = effects;
        Ok(())
    }

    /// Runs `f` on the upstream's breaker and publishes a state change (metrics, health).
    fn with_breaker<R>(&self, upstream: &str, spec: &EffectSpec, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let i = &self.inner;
        let mut all = i.breakers.borrow_mut();
        let first = !all.contains_key(upstream);
        let br = all.entry(upstream.to_owned()).or_insert_with(|| Breaker::new(spec.circuit_breaker));
        let before = br.gauge();
        let r = f(br);
        let after = br.gauge();
        if before != after || first {
            let shard = i.shard.to_string();
            metrics::gauge!("runner_breaker_state", "upstream" => upstream.to_owned(), "shard" => shard).set(after);
            if let Ok(mut m) = i.shared.breaker_states.lock() {
                m.insert((upstream.to_owned(), i.shard), after as u8);
            }
        }
        if before != after {
            tracing::warn!(
                shard = i.shard,
                upstream,
                from = before,
                to = after,
                "circuit breaker changed state (0 closed, 1 half-open, 2 open)"
            );
        }
        r
    }

    /// One attempt at an effect command, under its breaker and timeout. `item.attempts` is
    /// the number of attempts before this one.
    pub async fn run_effect(&self, item: OutboxItem, effect: String) -> DispatchOutcome {
        let Some(entry) = self.inner.effects.borrow().get(&effect).cloned() else {
            return DispatchOutcome::Permanent {
                error: format!("unknown effect {effect:?} (not in the loaded effect manifests)"),
            };
        };
        let (spec, provider) = (&entry.0, &entry.1);
        let upstream = provider.upstream();
        if let Permit::Wait { ms } = self.with_breaker(&upstream, spec, |b| b.permit(now_ms())) {
            metrics::counter!("runner_effect_deferred_total", "effect" => effect.clone()).increment(1);
            return DispatchOutcome::Later {
                wait_ms: ms,
                error: format!("circuit breaker of {upstream} is open"),
                attempt: false,
            };
        }
        let cmd = command_of(&item, &effect);
        let attempt = item.attempts + 1;
        let started = std::time::Instant::now();
        let outcome = {
            let call = provider.call(&cmd);
            let limit = async {
                glommio::timer::sleep(Duration::from_millis(spec.timeout_ms)).await;
                Outcome::Retryable(format!("timed out after {} ms", spec.timeout_ms))
            };
            futures_lite::future::or(call, limit).await
        };
        metrics::histogram!("runner_effect_seconds", "effect" => effect.clone())
            .record(started.elapsed().as_secs_f64());
        // An upstream that answered 409 is up: only unknown outcomes count against it.
        let ok = !matches!(outcome, Outcome::Retryable(_));
        let in_progress = matches!(outcome, Outcome::InProgress(_));
        self.with_breaker(&upstream, spec, |b| if ok { b.success() } else { b.failure(now_ms()) });
        let (outcome, payload, error) = match outcome {
            // Unknown or not final yet: ask again with the same idempotency key while the
            // policy's budget lasts; a failed result now could compensate a call that the
            // upstream then completes.
            Outcome::Retryable(reason) | Outcome::InProgress(reason) => {
                match spec.retry.next_wait(attempt, rand::random::<f64>()) {
                    Some(wait_ms) => {
                        if in_progress {
                            tracing::info!(effect = %effect, command_id = %cmd.command_id, attempt, wait_ms, reason = %reason, "effect in progress at the upstream; asking again with the same key");
                        } else {
                            tracing::warn!(effect = %effect, command_id = %cmd.command_id, attempt, wait_ms, reason = %reason, "effect call failed; retrying");
                        }
                        metrics::counter!("runner_effect_retries_total", "effect" => effect.clone()).increment(1);
                        return DispatchOutcome::Later { wait_ms, error: reason, attempt: true };
                    }
                    None => {
                        let waited = spec.retry.waited_ms(attempt.saturating_sub(1));
                        let error = format!("gave up after {attempt} attempts ({waited} ms of backoff): {reason}");
                        ("failed", serde_json::json!({}), Some(error))
                    }
                }
            }
            Outcome::Succeeded(p) => ("succeeded", p, None),
            Outcome::Failed(reason) => ("failed", serde_json::json!({}), Some(reason)),
        };
        if let Some(reason) = &error {
            tracing::warn!(effect = %effect, command_id = %cmd.command_id, attempt, reason = %reason, "effect failed");
        }
        // Crash point of the fault suite: the call was made, its result not yet anywhere.
        fail::fail_point!("effect.after_call_before_commit");
        metrics::counter!("runner_effect_outcomes_total", "effect" => effect.clone(), "outcome" => outcome)
            .increment(1);
        self.ran(&item, cmd, outcome, payload, error, attempt)
    }

    /// The final result of an effect: the event its saga sees and what is published for it.
    fn ran(
        &self,
        item: &OutboxItem,
        cmd: CommandEnvelope,
        outcome: &str,
        payload: serde_json::Value,
        error: Option<String>,
        attempts: u32,
    ) -> DispatchOutcome {
        let result = ResultEnvelope {
            command_id: cmd.command_id.clone(),
            tenant_id: cmd.tenant_id.clone(),
            effect: cmd.effect.clone(),
            saga: cmd.saga.clone(),
            correlation_id: cmd.correlation_id.clone(),
            outcome: outcome.into(),
            payload,
            error,
            attempts,
            timestamp: now_ms(),
            traceparent: cmd.traceparent.clone(),
        };
        let result_subject = envelope::result_subject(&cmd.tenant_id, &cmd.effect, outcome);
        let command_subject = envelope::command_subject(&cmd.tenant_id, &cmd.effect);
        let (command, body) = match (envelope::command_body(item, &cmd.effect), serde_json::to_vec(&result)) {
            (Ok(c), Ok(r)) => (c.to_vec(), r),
            (Err(e), _) | (_, Err(e)) => {
                return DispatchOutcome::Permanent { error: format!("cannot encode the effect's record: {e}") };
            }
        };
        let event =
            envelope::result_event(&result, self.inner.settings.events_stream.clone(), 0, result_subject.clone());
        DispatchOutcome::Ran(Box::new(RanEffect { event, command_subject, command, result_subject, result: body }))
    }

    /// Submits one aggregate command to the Gateway. The Gateway contract: 2xx is done; 409
    /// with the body `{"error":"duplicate"}` is done before under this idempotency key
    /// (delivered); any other 409 is a conflict: not delivered, a failed attempt retried by
    /// the relay's dispatch policy, like 408, 429, 5xx and transport errors; other 4xx are
    /// permanent (a dead letter).
    pub async fn post_gateway(&self, item: OutboxItem) -> DispatchOutcome {
        let WorkKind::Command { command, aggregate, aggregate_id } = item.kind.clone() else {
            return DispatchOutcome::Permanent { error: format!("{} is not a Gateway command", item.work_id) };
        };
        let Some(base) = self.inner.settings.gateway_url.as_deref() else {
            return DispatchOutcome::Retry { error: "gateway.url is not configured".into() };
        };
        let name = command.clone();
        let bytes = match envelope::gateway_body(&item, command, aggregate, aggregate_id) {
            Ok(b) => b,
            Err(e) => return DispatchOutcome::Permanent { error: format!("cannot encode the gateway command: {e}") },
        };
        let mut req = hyper::Request::post(format!("{base}/commands"))
            .header("content-type", "application/json")
            .header("idempotency-key", item.work_id.as_str())
            .header(HDR_TENANT, item.tenant.as_str())
            .header(HDR_CORRELATION, item.correlation_id.as_str());
        if let Some(tp) = &item.traceparent {
            req = req.header(HDR_TRACEPARENT, tp.as_str());
        }
        let req = match req.body(Full::new(bytes)) {
            Ok(r) => r,
            Err(e) => return DispatchOutcome::Permanent { error: format!("bad gateway request: {e}") },
        };
        match self.inner.http.request(req, self.inner.settings.gateway_timeout).await {
            Err(e) if e.is_retryable() => DispatchOutcome::Retry { error: format!("gateway: {e}") },
            Err(e) => DispatchOutcome::Permanent { error: format!("gateway: {e}") },
            Ok(resp) => {
                let status = resp.status;
                let text: String = String::from_utf8_lossy(&resp.body).chars().take(200).collect();
                match status {
                    200..=299 => DispatchOutcome::Delivered,
                    409 if is_duplicate(&resp.body) => DispatchOutcome::Delivered,
                    409 => {
                        tracing::warn!(tenant = %item.tenant, saga = %item.saga, correlation_id = %item.correlation_id, command_id = %item.work_id, command = %name, body = %text, "gateway answered 409 without the duplicate body: a conflict, not delivered; retrying");
                        DispatchOutcome::Retry {
                            error: format!("gateway answered 409 (a conflict, not a duplicate) to {name}: {text}"),
                        }
                    }
                    408 | 429 | 500..=599 => {
                        DispatchOutcome::Retry { error: format!("gateway answered {status}: {text}") }
                    }
                    _ => DispatchOutcome::Permanent {
                        error: format!("gateway refused the command with {status}: {text}"),
                    },
                }
            }
        }
    }
}

/// Whether a Gateway answer's body is the duplicate contract: a JSON object whose `error`
/// is `"duplicate"` (other fields are ignored).
fn is_duplicate(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        error: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Answer<'_>>(body).is_ok_and(|a| a.error.as_deref() == Some("duplicate"))
}

/// The command an outbox item stands for, as an effect worker would have received it.
fn command_of(item: &OutboxItem, effect: &str) -> CommandEnvelope {
    let payload = match serde_json::from_str(item.payload.get()) {
        Ok(v) => v,
        Err(e) => {
            // Written by the shard from a program's value, so it parses; if not, the
            // provider sees null and the log says why.
            tracing::error!(work_id = %item.work_id, error = %e, "stored effect payload is not JSON");
            serde_json::Value::Null
        }
    };
    CommandEnvelope {
        command_id: item.work_id.clone(),
        tenant_id: item.tenant.clone(),
        effect: effect.to_owned(),
        saga: item.saga.clone(),
        correlation_id: item.correlation_id.clone(),
        payload,
        traceparent: item.traceparent.clone(),
        source_event_id: item.source_event_id.clone(),
        created_at: item.created_at,
    }
}

/// The outbox item an effect command stands for (effect mode: a command consumed from the
/// stream is run by the shard that gates it). `attempts`: attempts made before this one.
pub fn item_of(cmd: &CommandEnvelope, attempts: u32) -> Result<OutboxItem, serde_json::Error> {
    Ok(OutboxItem {
        work_id: cmd.command_id.clone(),
        kind: WorkKind::Effect { effect: cmd.effect.clone() },
        tenant: cmd.tenant_id.clone(),
        saga: cmd.saga.clone(),
        correlation_id: cmd.correlation_id.clone(),
        traceparent: cmd.traceparent.clone(),
        source_event_id: cmd.source_event_id.clone(),
        payload: serde_json::value::to_raw_value(&cmd.payload)?,
        created_at: cmd.created_at,
        attempts,
        next_attempt_at: 0,
        last_error: None,
        suppressed: false,
    })
}

impl Caller for ShardCaller {
    fn runs(&self, item: &OutboxItem) -> bool {
        match item.kind {
            WorkKind::Effect { .. } => self.inner.settings.run_effects,
            WorkKind::Command { .. } => true,
            WorkKind::Audit { .. } => false,
        }
    }

    fn call(&self, item: OutboxItem) -> Call {
        let this = self.clone();
        Box::pin(async move {
            match item.kind.clone() {
                WorkKind::Effect { effect } => {
                    // Instrumented, not entered: other calls on this thread must not carry
                    // this command's fields.
                    let trace_id = item.traceparent.as_deref().and_then(|t| t.split('-').nth(1)).unwrap_or("");
                    let span = tracing::info_span!("effect", effect = %effect, tenant = %item.tenant, correlation_id = %item.correlation_id, command_id = %item.work_id, trace_id = %trace_id, attempt = item.attempts + 1);
                    tracing::Instrument::instrument(this.run_effect(item, effect), span).await
                }
                WorkKind::Command { .. } => this.post_gateway(item).await,
                WorkKind::Audit { .. } => {
                    DispatchOutcome::Retry { error: format!("{} is published by the bridge", item.work_id) }
                }
            }
        })
    }

    fn reload(&self, set: &Arc<ManifestSet>) {
        if let Err(e) = self.rebuild(set) {
            tracing::error!(shard = self.inner.shard, error = %e, "effect providers not rebuilt; the previous ones stay");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_duplicate;

    #[test]
    fn only_the_duplicate_body_makes_a_gateway_409_delivered() {
        assert!(is_duplicate(br#"{"error":"duplicate"}"#));
        assert!(is_duplicate(br#"{ "error": "duplicate", "command_id": "w-1" }"#));
        for body in [
            &br#"{"error":"conflict"}"#[..],
            br#"{"error":"Duplicate"}"#,
            br#""duplicate""#,
            b"",
            b"duplicate",
            br#"{"error":5}"#,
        ] {
            assert!(!is_duplicate(body), "{}", String::from_utf8_lossy(body));
        }
    }
}
