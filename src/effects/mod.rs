//! Effect workers (DESIGN "Effects", invariant 4), for a separate effect fleet (`effect`
//! mode). The bridge consumes `WORKFLOW_COMMANDS`; the call itself runs on the shard that
//! gates the command (its [`caller`]), so HTTP work never runs on the bridge's thread. For
//! each command:
//!
//! ```text
//! ran in place already (x-runner-ran: inline) ──> ack (it was published for the record)
//! gate (shard owning (tenant, command_id)):
//!   completed ──> re-publish the recorded result (same Nats-Msg-Id) ──> ack
//!   busy      ──> the running delivery will settle it (or NAK for a duplicate publish)
//!   run(n)    ──> `started` is durable; the shard runs one attempt at a time (RunEffect):
//!                   Later (retryable)  ──> wait its backoff (progress acks) ──> again
//!                   Later (breaker)    ──> release ──> NAK with the wait
//!                   Ran (final result) ──> publish it (Nats-Msg-Id = result:{command_id})
//!                                      ──> PubAck ──> gate: `completed` (durable) ──> ack
//! ```
//!
//! In `combined` mode a saga's effects run in place on the saga's shard instead
//! ([`caller`]), with the outbox item as their gate.
//!
//! Files: [`caller`] what a shard calls itself; [`provider`] the providers; [`template`]
//! the URL, header and body templates; [`breaker`] circuit breakers; [`http`] the shards'
//! HTTP client.

pub mod breaker;
pub mod caller;
pub mod http;
pub mod provider;
pub mod template;

use crate::config::Config;
use crate::context::Ctx;
use crate::envelope::{self, CommandEnvelope, HDR_COMMAND_ID, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT, Transport};
use crate::quarantine::quarantine;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use shards::keys::EffectKey;
use shards::message::{DispatchOutcome, GateDecision, Request, reply_channel};
use shards::routing::RouteKey;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The effect workers' state on the bridge: a bound on commands in flight.
pub struct EffectsRuntime {
    concurrency: Arc<tokio::sync::Semaphore>,
}

use std::sync::Arc;

impl EffectsRuntime {
    pub fn new(cfg: &Config) -> Self {
        Self { concurrency: Arc::new(tokio::sync::Semaphore::new(cfg.effect_concurrency)) }
    }
}

/// One command message.
pub async fn handle(ctx: &Rc<Ctx>, effects: &Rc<EffectsRuntime>, msg: async_nats::jetstream::Message) {
    if envelope::ran_inline(&msg) {
        // Run in place by the saga's own shard; published for the record only.
        metrics::counter!("runner_effect_recorded_skipped_total").increment(1);
        ctx.shared.recorded_skipped.fetch_add(1, Ordering::Relaxed);
        let _ = msg.ack().await;
        return;
    }
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
    // The subject is the tenant: a command on one tenant's subject cannot act for another.
    if let Some(subject) = envelope::subject_tenant(&t.subject)
        && cmd.tenant_id != subject
    {
        let e = envelope::DecodeError::TenantMismatch {
            subject,
            claimed: cmd.tenant_id.clone(),
            via: "command's tenant_id",
        };
        quarantine(ctx, msg, t, e.to_string()).await;
        return;
    }
    if !ctx.manifests.borrow().effects.contains_key(&cmd.effect) {
        quarantine(ctx, msg, t, format!("unknown effect {:?} (not in the loaded effect manifests)", cmd.effect)).await;
        return;
    }
    // Bound commands in flight; waiting here slows pulling down (backpressure).
    let Ok(permit) = effects.concurrency.clone().acquire_owned().await else { return };
    let key = EffectKey::new(cmd.tenant_id.clone(), cmd.command_id.clone());
    let shard = ctx.router.shard(&key.tenant, RouteKey::Effect { command_id: &key.command_id });
    let (tx, rx) = reply_channel();
    if ctx.shard(shard).send(Request::EffectBegin { key: key.clone(), msg_seq: t.seq, reply: tx }).await.is_err() {
        return;
    }
    ctx.shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        let _permit = permit;
        match rx.await {
            Err(_) => {}
            Ok(GateDecision::Invalid { reason }) => {
                ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                quarantine(&ctx, msg, t, reason).await;
                return;
            }
            Ok(GateDecision::Busy { same_message }) => {
                if !same_message {
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
            Ok(GateDecision::Completed { subject, outcome, result }) => {
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
                run(&ctx, cmd, key, shard, attempt, msg).instrument(span).await
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

/// Waits `ms`, acking progress so the message's ack_wait does not run out meanwhile.
async fn wait_with_progress(msg: &async_nats::jetstream::Message, ms: u64, progress_every: Duration) {
    let mut left = ms;
    while left > 0 {
        let step = left.min(progress_every.as_millis().max(1) as u64);
        tokio::time::sleep(Duration::from_millis(step)).await;
        left -= step;
        let _ = msg.ack_with(AckKind::Progress).await;
    }
}

async fn run(
    ctx: &Rc<Ctx>,
    cmd: CommandEnvelope,
    key: EffectKey,
    shard: usize,
    attempt: u32,
    msg: async_nats::jetstream::Message,
) {
    let progress_every = Duration::from_millis(ctx.cfg.ack_wait_ms / 3);
    let mut tries = 0u32;
    fail::fail_point!("effect.after_started_before_call");
    let ran = loop {
        let item = match caller::item_of(&cmd, tries) {
            Ok(i) => i,
            Err(e) => {
                release(ctx, &key, shard).await;
                let t = Transport::of(&msg);
                quarantine(ctx, msg, t, format!("command payload cannot be stored: {e}")).await;
                return;
            }
        };
        let (tx, rx) = reply_channel();
        if ctx.shard(shard).send(Request::RunEffect { command: Box::new(item), reply: tx }).await.is_err() {
            return;
        }
        // A slow upstream must not let the message's ack_wait run out under it.
        let outcome = {
            let answer = rx;
            tokio::pin!(answer);
            loop {
                tokio::select! {
                    r = &mut answer => break r,
                    _ = tokio::time::sleep(progress_every) => {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            }
        };
        match outcome {
            Ok(DispatchOutcome::Ran(ran)) => break ran,
            Ok(DispatchOutcome::Later { wait_ms, attempt: true, .. }) => {
                tries += 1;
                wait_with_progress(&msg, wait_ms, progress_every).await;
            }
            Ok(DispatchOutcome::Later { wait_ms, .. }) => {
                // The breaker opened: wait for it instead of burning attempts.
                release(ctx, &key, shard).await;
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(wait_ms)))).await;
                return;
            }
            Ok(other) => {
                tracing::error!(outcome = ?other, "the effect could not run; the command is dead-lettered");
                release(ctx, &key, shard).await;
                let why = match other {
                    DispatchOutcome::Permanent { error } | DispatchOutcome::Retry { error } => error,
                    o => format!("unexpected outcome {o:?}"),
                };
                let t = Transport::of(&msg);
                quarantine(ctx, msg, t, why).await;
                return;
            }
            Err(_) => return,
        }
    };
    fail::fail_point!("effect.after_call_before_publish");
    let subject = ran.result_subject.clone();
    let outcome = ran.event.result.as_ref().map(|r| r.outcome.clone()).unwrap_or_default();
    let body = Bytes::from(ran.result);
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
        outcome,
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

async fn publish_result(
    ctx: &Ctx,
    cmd: &CommandEnvelope,
    subject: &str,
    body: Bytes,
) -> Result<(), async_nats::jetstream::context::PublishError> {
    let mut p = PublishMessage::build()
        .payload(body)
        .message_id(format!("result:{}", cmd.command_id))
        .header(HDR_TENANT, cmd.tenant_id.as_str())
        .header(HDR_CORRELATION, cmd.correlation_id.as_str())
        .header(HDR_COMMAND_ID, cmd.command_id.as_str());
    if let Some(tp) = &cmd.traceparent {
        p = p.header(HDR_TRACEPARENT, tp.as_str());
    }
    ctx.js.send_publish(subject.to_owned(), p).await?.await.map(|_| ())
}
