//! Outbox dispatch on the bridge: NATS publishes only. Effect commands go to
//! `WORKFLOW_COMMANDS` (pipelined publishes, each with `Nats-Msg-Id = command id`) when a
//! separate effect fleet runs them; an effect a shard ran in place is published for the
//! record (its command, marked as run, and its result). Gateway commands and in-place
//! effects are called by the shards themselves ([`crate::effects::caller`]). Each result
//! goes back to the owning shard, which deletes the item only for a durable confirmation
//! (invariant 2).

use crate::context::Ctx;
use crate::envelope::{self, HDR_COMMAND_ID, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use shards::keys::OutboxKey;
use shards::message::{Control, Dispatch, DispatchOutcome, DispatchRequest, DispatchResult};
use shards::record::{OutboxItem, WorkKind};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub async fn run(ctx: Rc<Ctx>, rx: flume::Receiver<DispatchRequest>) {
    let latency = metrics::histogram!("runner_dispatch_seconds");
    while let Ok(req) = rx.recv_async().await {
        let started = Instant::now();
        let shard = req.shard;
        let n = req.items.len() as i64;
        ctx.shared.dispatching.fetch_add(n, Ordering::SeqCst);
        // Start every publish in order (one connection keeps them in order), then wait for
        // the acks together: many in flight, never one-at-a-time.
        let mut waits: Vec<(OutboxKey, u64, Pending)> = Vec::with_capacity(req.items.len());
        for Dispatch { key, send, item } in req.items {
            let p = match &item.kind {
                WorkKind::Effect { effect } => publish_command(&ctx, &item, effect).await,
                WorkKind::Audit { .. } => publish_audit(&ctx, &item).await,
                WorkKind::Command { .. } => Pending::Done(DispatchOutcome::Retry {
                    error: format!("Gateway command {} reached the bridge; shards call the Gateway", item.work_id),
                }),
            };
            waits.push((key, send, p));
        }
        let ctx2 = ctx.clone();
        let latency = latency.clone();
        tokio::task::spawn_local(async move {
            // Results go to the shard as they complete, in chunks of whatever is done: a
            // publish stuck on a NATS outage does not hold back the confirmation of a Gateway
            // call made in the same request (held past the relay's confirmation timeout, the
            // call would be made again).
            let mut waiting: FuturesUnordered<_> = waits
                .into_iter()
                .map(|(key, send, p)| async move { DispatchResult { key, send, outcome: p.resolve().await } })
                .collect();
            while let Some(first) = waiting.next().await {
                let mut results = vec![first];
                while let Some(Some(r)) = waiting.next().now_or_never() {
                    results.push(r);
                }
                if results.iter().any(|r| r.outcome == DispatchOutcome::Delivered) {
                    fail::fail_point!("dispatch.after_confirm_before_delete");
                }
                ctx2.shared.dispatching.fetch_sub(results.len() as i64, Ordering::SeqCst);
                if let Err(e) = ctx2.shard(shard).control(Control::Dispatched(results)) {
                    // The relay re-dispatches after its confirmation timeout; dedupe absorbs it.
                    tracing::warn!(shard, error = %e, "cannot hand dispatch results to the shard");
                }
            }
            latency.record(started.elapsed().as_secs_f64());
        });
    }
}

enum Pending {
    Done(DispatchOutcome),
    Ack(async_nats::jetstream::context::PublishAckFuture),
    /// The command and its result, both acknowledged.
    Acks(async_nats::jetstream::context::PublishAckFuture, async_nats::jetstream::context::PublishAckFuture),
}

impl Pending {
    async fn resolve(self) -> DispatchOutcome {
        match self {
            Pending::Done(o) => o,
            Pending::Ack(fut) => match fut.await {
                Ok(_) => DispatchOutcome::Delivered,
                Err(e) => DispatchOutcome::Retry { error: format!("publish not acknowledged: {e}") },
            },
            Pending::Acks(a, b) => match (a.await, b.await) {
                (Ok(_), Ok(_)) => DispatchOutcome::Delivered,
                (Err(e), _) | (_, Err(e)) => DispatchOutcome::Retry { error: format!("publish not acknowledged: {e}") },
            },
        }
    }
}

async fn publish_command(ctx: &Ctx, item: &OutboxItem, effect: &str) -> Pending {
    let payload = match envelope::command_body(item, effect) {
        Ok(p) => p,
        Err(e) => return Pending::Done(DispatchOutcome::Permanent { error: format!("cannot encode command: {e}") }),
    };
    let mut publish = PublishMessage::build()
        .payload(payload)
        .message_id(&item.work_id)
        .header(HDR_TENANT, item.tenant.as_str())
        .header(HDR_CORRELATION, item.correlation_id.as_str())
        .header(HDR_COMMAND_ID, item.work_id.as_str());
    if let Some(tp) = &item.traceparent {
        publish = publish.header(HDR_TRACEPARENT, tp.as_str());
    }
    match ctx.js.send_publish(envelope::command_subject(&item.tenant, effect), publish).await {
        Ok(fut) => Pending::Ack(fut),
        Err(e) => Pending::Done(DispatchOutcome::Retry { error: format!("publish failed: {e}") }),
    }
}

/// The record of an effect a shard ran in place: its command (marked, so that effect
/// workers do not run it again) and its result, each under its own `Nats-Msg-Id`.
async fn publish_audit(ctx: &Ctx, item: &OutboxItem) -> Pending {
    #[derive(serde::Deserialize)]
    struct Audit<'a> {
        command_subject: String,
        #[serde(borrow)]
        command: &'a serde_json::value::RawValue,
        result_subject: String,
        #[serde(borrow)]
        result: &'a serde_json::value::RawValue,
    }
    let audit: Audit = match serde_json::from_str(item.payload.get()) {
        Ok(a) => a,
        Err(e) => return Pending::Done(DispatchOutcome::Permanent { error: format!("unreadable record: {e}") }),
    };
    let command_id = item.work_id.strip_prefix("audit:").unwrap_or(&item.work_id);
    let message = |body: &serde_json::value::RawValue, id: String| {
        let mut m = PublishMessage::build()
            .payload(Bytes::copy_from_slice(body.get().as_bytes()))
            .message_id(id)
            .header(HDR_TENANT, item.tenant.as_str())
            .header(HDR_CORRELATION, item.correlation_id.as_str())
            .header(HDR_COMMAND_ID, command_id);
        if let Some(tp) = &item.traceparent {
            m = m.header(HDR_TRACEPARENT, tp.as_str());
        }
        m
    };
    let command = message(audit.command, command_id.to_owned()).header(envelope::HDR_RAN, "inline");
    let result = message(audit.result, format!("result:{command_id}")).header(envelope::HDR_RAN, "inline");
    let sent = async {
        let a = ctx.js.send_publish(audit.command_subject, command).await?;
        let b = ctx.js.send_publish(audit.result_subject, result).await?;
        Ok::<_, async_nats::jetstream::context::PublishError>((a, b))
    };
    match sent.await {
        Ok((a, b)) => Pending::Acks(a, b),
        Err(e) => Pending::Done(DispatchOutcome::Retry { error: format!("publish failed: {e}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{CommandEnvelope, command_body};

    /// Integers past u64 and f64, a trailing zero, escapes, non-ASCII text and keys out of
    /// order: everything a parse and re-encode would change.
    const PAYLOAD: &str = r#"{"zeta":18446744073709551616123,"alpha":1.10,"text":"\u00e9t\u00e9 żółw 🐢 \"q\"","nested":{"b":[1,2e3],"a":null}}"#;

    fn item(kind: &str) -> OutboxItem {
        let text = format!(
            r#"{{"work_id":"w-1","kind":"{kind}","effect":"charge","command":"Reserve","aggregate":"inventory","aggregate_id":"sku-1","tenant":"acme","saga":"order","correlation_id":"o-1","traceparent":"00-aa-bb-01","source_event_id":"ev-1","payload":{PAYLOAD},"created_at":7}}"#
        );
        serde_json::from_str(&text).expect("a valid outbox item")
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).expect("UTF-8 body")
    }

    #[test]
    fn a_command_body_carries_the_payload_byte_for_byte() {
        let body = command_body(&item("effect"), "charge").unwrap();
        assert_eq!(
            text(&body),
            format!(
                r#"{{"command_id":"w-1","tenant_id":"acme","effect":"charge","saga":"order","correlation_id":"o-1","payload":{PAYLOAD},"traceparent":"00-aa-bb-01","source_event_id":"ev-1","created_at":7}}"#
            )
        );
        // Effect workers still read it.
        let cmd: CommandEnvelope = serde_json::from_slice(&body).unwrap();
        assert_eq!((cmd.command_id.as_str(), cmd.payload["nested"]["b"][0].as_u64()), ("w-1", Some(1)));
    }

    #[test]
    fn a_gateway_body_carries_the_payload_byte_for_byte() {
        let body =
            envelope::gateway_body(&item("command"), "Reserve".into(), "inventory".into(), "sku-1".into()).unwrap();
        assert_eq!(
            text(&body),
            format!(
                r#"{{"command_id":"w-1","tenant_id":"acme","aggregate_type":"inventory","aggregate_id":"sku-1","command":"Reserve","payload":{PAYLOAD},"correlation_id":"o-1","saga":"order"}}"#
            )
        );
    }

    #[test]
    fn the_raw_payload_encodes_like_the_parsed_one_when_parsing_changes_nothing() {
        // Same field names and order as the decoded form: the wire format did not change.
        let mut it = item("effect");
        it.payload = serde_json::value::to_raw_value(&serde_json::json!({"a": 1, "b": "x"})).unwrap();
        let raw = command_body(&it, "charge").unwrap();
        let parsed: CommandEnvelope = serde_json::from_slice(&raw).unwrap();
        assert_eq!(text(&raw), serde_json::to_string(&parsed).unwrap());
    }
}
