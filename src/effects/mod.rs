//! Effect workers (DESIGN "Effects", invariant 4). For each command from `WORKFLOW_COMMANDS`:
//!
//! ```text
//! breaker open? ── yes ──> NAK with the remaining open time (no attempt burnt)
//!   │ no
//! gate (shard owning (tenant, command_id)):
//!   completed ──> re-publish the recorded result (same Nats-Msg-Id) ──> ack
//!   busy      ──> the running delivery will settle it (or NAK for a duplicate publish)
//!   run(n)    ──> `started` is durable; call the provider with retries, backoff, timeout
//!             ──> publish the result (Nats-Msg-Id = result:{command_id}) ──> PubAck
//!             ──> gate: `completed` (durable) ──> ack
//! ```
//!
//! Files: [`provider`] the providers; [`breaker`] circuit breakers.

pub mod breaker;
pub mod http;
pub mod provider;

use crate::config::Config;
use crate::context::{BridgeShared, Ctx};
use crate::envelope::{
    self, CommandEnvelope, HDR_COMMAND_ID, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT, ResultEnvelope, Transport,
};
use crate::quarantine::quarantine;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::PublishMessage;
use breaker::{Breaker, Permit};
use bytes::Bytes;
use provider::{Outcome, Provider, ProviderError, Secrets};
use shards::keys::EffectKey;
use shards::manifest::{EffectSpec, ManifestSet};
use shards::message::{GateDecision, Request, reply_channel};
use shards::routing::RouteKey;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// An effect's manifest entry and its provider.
pub type Effect = Rc<(EffectSpec, Box<dyn Provider>)>;

/// Effect specs, providers and breakers (bridge thread only).
pub struct EffectsRuntime {
    effects: RefCell<BTreeMap<String, Effect>>,
    breakers: RefCell<BTreeMap<String, Breaker>>,
    /// Upstreams whose breaker state was published at least once.
    announced: RefCell<std::collections::BTreeSet<String>>,
    secrets: Secrets,
    http: crate::http_client::HttpClient,
    nats: async_nats::Client,
    concurrency: std::sync::Arc<tokio::sync::Semaphore>,
}

fn now_ms() -> u64 {
    shards::clock::SystemClock.now_ms()
}

use shards::clock::Clock;

impl EffectsRuntime {
    pub fn new(cfg: &Config, set: &ManifestSet, nats: async_nats::Client) -> Result<Self, ProviderError> {
        let rt = Self {
            effects: RefCell::new(BTreeMap::new()),
            breakers: RefCell::new(BTreeMap::new()),
            announced: RefCell::new(Default::default()),
            secrets: Secrets::new(&cfg.secrets_dir),
            http: crate::http_client::http_client(),
            nats,
            concurrency: std::sync::Arc::new(tokio::sync::Semaphore::new(cfg.effect_concurrency)),
        };
        rt.reload(set)?;
        Ok(rt)
    }

    /// Takes a new manifest set (reload): providers are rebuilt; breakers stay. If one
    /// provider cannot be built, none is replaced.
    pub fn reload(&self, set: &ManifestSet) -> Result<(), ProviderError> {
        let effects = set
            .effects
            .values()
            .map(|spec| {
                let p = provider::build(spec, self.http.clone(), self.nats.clone(), self.secrets.clone())?;
                Ok((spec.name.clone(), Rc::new((spec.clone(), p))))
            })
            .collect::<Result<_, ProviderError>>()?;
        *self.effects.borrow_mut() = effects;
        Ok(())
    }

    fn effect(&self, name: &str) -> Option<Effect> {
        self.effects.borrow().get(name).cloned()
    }

    /// Runs `f` on the upstream's breaker and publishes a state change (metrics, shared).
    fn with_breaker<R>(
        &self,
        shared: &BridgeShared,
        upstream: &str,
        spec: Option<&EffectSpec>,
        f: impl FnOnce(&mut Breaker) -> R,
    ) -> Option<R> {
        let mut all = self.breakers.borrow_mut();
        let br = match (all.get_mut(upstream), spec) {
            (Some(_), _) => all.get_mut(upstream)?,
            (None, Some(spec)) => all.entry(upstream.to_owned()).or_insert_with(|| Breaker::new(spec.circuit_breaker)),
            (None, None) => return None,
        };
        let before = br.gauge();
        let r = f(br);
        let after = br.gauge();
        let first = self.announced.borrow_mut().insert(upstream.to_owned());
        if before != after || first {
            metrics::gauge!("runner_breaker_state", "upstream" => upstream.to_owned()).set(after);
            if let Ok(mut m) = shared.breakers.lock() {
                m.insert(upstream.to_owned(), after as u8);
            }
            if before != after {
                tracing::warn!(
                    upstream,
                    from = before,
                    to = after,
                    "circuit breaker changed state (0 closed, 1 half-open, 2 open)"
                );
            }
        }
        Some(r)
    }

    fn permit(&self, shared: &BridgeShared, upstream: &str, spec: &EffectSpec, now: u64) -> Permit {
        self.with_breaker(shared, upstream, Some(spec), |b| b.permit(now)).unwrap_or(Permit::Go)
    }

    fn record(&self, shared: &BridgeShared, upstream: &str, ok: bool, now: u64) {
        self.with_breaker(shared, upstream, None, |b| if ok { b.success() } else { b.failure(now) });
    }

    fn cancel(&self, shared: &BridgeShared, upstream: &str) {
        self.with_breaker(shared, upstream, None, |b| b.cancel());
    }

    /// The breaker states, for `/metrics` and tests: upstream → 0 closed, 1 half-open, 2 open.
    pub fn breaker_states(&self) -> BTreeMap<String, f64> {
        self.breakers.borrow().iter().map(|(k, b)| (k.clone(), b.gauge())).collect()
    }
}

/// One command message.
pub async fn handle(ctx: &Rc<Ctx>, effects: &Rc<EffectsRuntime>, msg: async_nats::jetstream::Message) {
    let t = Transport::of(&msg);
    if msg.payload.len() > ctx.cfg.max_event_bytes {
        let e = envelope::DecodeError::TooLarge { size: msg.payload.len(), limit: ctx.cfg.max_event_bytes };
        quarantine(ctx, msg, t, e.to_string()).await;
        return;
    }
    let cmd: CommandEnvelope = match serde_json::from_slice(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            quarantine(ctx, msg, t, format!("not an effect command: {e}")).await;
            return;
        }
    };
    let Some(entry) = effects.effect(&cmd.effect) else {
        quarantine(ctx, msg, t, format!("unknown effect {:?} (not in the loaded effect manifests)", cmd.effect)).await;
        return;
    };
    let upstream = entry.1.upstream();
    if let Permit::Wait { ms } = effects.permit(&ctx.shared, &upstream, &entry.0, now_ms()) {
        tracing::debug!(effect = %cmd.effect, upstream = %upstream, wait_ms = ms, "breaker open; command waits");
        metrics::counter!("runner_effect_deferred_total", "effect" => cmd.effect.clone()).increment(1);
        let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(ms)))).await;
        return;
    }
    // Bound provider calls in flight; waiting here slows pulling down (backpressure).
    let Ok(permit) = effects.concurrency.clone().acquire_owned().await else { return };
    let key = EffectKey::new(cmd.tenant_id.clone(), cmd.command_id.clone());
    let shard = ctx.router.shard(&key.tenant, RouteKey::Effect { command_id: &key.command_id });
    let (tx, rx) = reply_channel();
    if ctx.shard(shard).send(Request::EffectBegin { key: key.clone(), msg_seq: t.seq, reply: tx }).await.is_err() {
        effects.cancel(&ctx.shared, &upstream);
        return;
    }
    ctx.shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let ctx = ctx.clone();
    let effects = effects.clone();
    tokio::task::spawn_local(async move {
        let _permit = permit;
        let decision = rx.await;
        match decision {
            Err(_) => effects.cancel(&ctx.shared, &upstream),
            Ok(GateDecision::Invalid { reason }) => {
                effects.cancel(&ctx.shared, &upstream);
                ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                quarantine(&ctx, msg, t, reason).await;
                return;
            }
            Ok(GateDecision::Busy { same_message }) => {
                effects.cancel(&ctx.shared, &upstream);
                if !same_message {
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
            Ok(GateDecision::Completed { subject, outcome, result }) => {
                effects.cancel(&ctx.shared, &upstream);
                metrics::counter!("runner_effect_replayed_total", "effect" => cmd.effect.clone()).increment(1);
                match publish_result(&ctx, &cmd, &subject, Bytes::from(result)).await {
                    Ok(()) => {
                        let _ = msg.ack().await;
                    }
                    Err(e) => {
                        tracing::warn!(command_id = %cmd.command_id, error = %e, "cannot re-publish a recorded result; will retry");
                        let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    }
                }
                let _ = outcome;
            }
            Ok(GateDecision::Run { attempt }) => {
                // Instrumented, not entered: the span must not tag other tasks' lines while
                // this one waits.
                let span = run_span(&cmd, attempt);
                run(&ctx, &effects, &entry, &upstream, cmd, key, shard, attempt, msg).instrument(span).await
            }
        }
        ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}

/// The span of one gated run of a command: its log lines name the command.
fn run_span(cmd: &CommandEnvelope, attempt: u32) -> tracing::Span {
    let trace_id = cmd.traceparent.as_deref().and_then(|t| t.split('-').nth(1)).unwrap_or("");
    tracing::info_span!("effect", effect = %cmd.effect, tenant = %cmd.tenant_id, correlation_id = %cmd.correlation_id, command_id = %cmd.command_id, trace_id = %trace_id, gate_attempt = attempt)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &Rc<Ctx>,
    effects: &EffectsRuntime,
    entry: &Effect,
    upstream: &str,
    cmd: CommandEnvelope,
    key: EffectKey,
    shard: usize,
    attempt: u32,
    msg: async_nats::jetstream::Message,
) {
    let (spec, provider) = (&entry.0, &entry.1);
    let duration = metrics::histogram!("runner_effect_seconds", "effect" => cmd.effect.clone());
    let progress_every = Duration::from_millis(ctx.cfg.ack_wait_ms / 3);
    let mut last_progress = Instant::now();
    let mut tries = 0u32;
    fail::fail_point!("effect.after_started_before_call");
    let final_outcome = loop {
        tries += 1;
        if tries > 1
            && let Permit::Wait { ms } = effects.permit(&ctx.shared, upstream, spec, now_ms())
        {
            // Opened while we were retrying: wait for it instead of burning attempts.
            release(ctx, &key, shard).await;
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(ms)))).await;
            return;
        }
        let started = Instant::now();
        let call = tokio::time::timeout(Duration::from_millis(spec.timeout_ms), provider.call(&cmd));
        tokio::pin!(call);
        // A slow upstream must not let the message's ack_wait run out under it.
        let outcome = loop {
            tokio::select! {
                r = &mut call => break match r {
                    Ok(o) => o,
                    Err(_) => Outcome::Retryable(format!("timed out after {} ms", spec.timeout_ms)),
                },
                _ = tokio::time::sleep(progress_every) => {
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
            }
        };
        duration.record(started.elapsed().as_secs_f64());
        let now = now_ms();
        match &outcome {
            Outcome::Succeeded(_) | Outcome::Failed(_) => effects.record(&ctx.shared, upstream, true, now),
            Outcome::Retryable(_) => effects.record(&ctx.shared, upstream, false, now),
        }
        match outcome {
            Outcome::Retryable(reason) if tries < spec.retry.attempts => {
                let backoff = spec.retry.backoff_jittered(tries, rand::random::<f64>());
                tracing::warn!(tries, backoff_ms = backoff, reason = %reason, "effect call failed; retrying");
                metrics::counter!("runner_effect_retries_total", "effect" => cmd.effect.clone()).increment(1);
                if last_progress.elapsed() >= progress_every || backoff >= progress_every.as_millis() as u64 {
                    let _ = msg.ack_with(AckKind::Progress).await;
                    last_progress = Instant::now();
                }
                let mut left = backoff;
                while left > 0 {
                    let step = left.min(progress_every.as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(step)).await;
                    left -= step;
                    if left > 0 {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            }
            Outcome::Retryable(reason) => break Outcome::Failed(format!("gave up after {tries} attempts: {reason}")),
            other => break other,
        }
    };
    fail::fail_point!("effect.after_call_before_publish");
    let (outcome, payload, error) = match final_outcome {
        Outcome::Succeeded(p) => ("succeeded", p, None),
        Outcome::Failed(reason) => ("failed", serde_json::json!({}), Some(reason)),
        Outcome::Retryable(reason) => ("failed", serde_json::json!({}), Some(reason)),
    };
    metrics::counter!("runner_effect_outcomes_total", "effect" => cmd.effect.clone(), "outcome" => outcome)
        .increment(1);
    let result = ResultEnvelope {
        command_id: cmd.command_id.clone(),
        tenant_id: cmd.tenant_id.clone(),
        effect: cmd.effect.clone(),
        saga: cmd.saga.clone(),
        correlation_id: cmd.correlation_id.clone(),
        outcome: outcome.into(),
        payload,
        error,
        attempts: attempt,
        timestamp: now_ms(),
        traceparent: cmd.traceparent.clone(),
    };
    let subject = envelope::result_subject(&cmd.tenant_id, &cmd.effect, outcome);
    let body = Bytes::from(
        serde_json::to_vec(&result).expect("a ResultEnvelope always encodes: strings, integers and a JSON value"),
    );
    // Keep trying the publish (the server may be restarting) before giving the message back:
    // calling the provider again is the costlier way out.
    let deadline = Instant::now() + Duration::from_millis(ctx.cfg.ack_wait_ms.max(10_000) * 2);
    let mut wait = 100;
    loop {
        match publish_result(ctx, &cmd, &subject, body.clone()).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, retry_in_ms = wait, "result publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(wait)).await;
                wait = (wait * 2).min(2_000);
                let _ = msg.ack_with(AckKind::Progress).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "result publish failed; the command is not completed and will be redelivered");
                release(ctx, &key, shard).await;
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
        }
    }
    fail::fail_point!("effect.after_puback_before_completed");
    // Completed only after the PubAck; ack last.
    let (tx, rx) = reply_channel();
    let finish = Request::EffectFinish {
        key: key.clone(),
        attempts: attempt,
        subject,
        outcome: outcome.into(),
        result: body.to_vec(),
        reply: tx,
    };
    if ctx.shard(shard).send(finish).await.is_err() {
        return;
    }
    match rx.await {
        Ok(Ok(())) => {
            let _ = msg.ack().await;
        }
        Ok(Err(e)) => tracing::error!(error = %e, "cannot record completion; the command will be redelivered"),
        Err(_) => {}
    }
}

async fn release(ctx: &Ctx, key: &EffectKey, shard: usize) {
    let _ = ctx.shard(shard).send(Request::EffectRelease { key: key.clone() }).await;
}

async fn publish_result(ctx: &Ctx, cmd: &CommandEnvelope, subject: &str, body: Bytes) -> Result<(), String> {
    let mut p = PublishMessage::build()
        .payload(body)
        .message_id(format!("result:{}", cmd.command_id))
        .header(HDR_TENANT, cmd.tenant_id.as_str())
        .header(HDR_CORRELATION, cmd.correlation_id.as_str())
        .header(HDR_COMMAND_ID, cmd.command_id.as_str());
    if let Some(tp) = &cmd.traceparent {
        p = p.header(HDR_TRACEPARENT, tp.as_str());
    }
    let ack = ctx.js.send_publish(subject.to_owned(), p).await.map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}
