//! Outbox dispatch: effect commands to `WORKFLOW_COMMANDS` (pipelined publishes, each with
//! `Nats-Msg-Id = command id`), aggregate commands to the Gateway over HTTP (keep-alive
//! pool, `Idempotency-Key = command id`). Each result goes back to the owning shard, which
//! deletes the item only for a durable confirmation (invariant 2).

use crate::context::Ctx;
use crate::envelope::{
    self, CommandEnvelope, GatewayCommand, HDR_COMMAND_ID, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT,
};
use crate::http_client::{HttpClient, http_client};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use shards::keys::OutboxKey;
use shards::message::{Control, DispatchOutcome, DispatchRequest, DispatchResult};
use shards::record::{OutboxItem, WorkKind};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub async fn run(ctx: Rc<Ctx>, rx: flume::Receiver<DispatchRequest>) {
    let http = http_client();
    let latency = metrics::histogram!("runner_dispatch_seconds");
    while let Ok(req) = rx.recv_async().await {
        let started = Instant::now();
        let shard = req.shard;
        let n = req.items.len() as i64;
        ctx.shared.dispatching.fetch_add(n, Ordering::SeqCst);
        // Start every publish in order (one connection keeps them in order), then wait for
        // the acks together: many in flight, never one-at-a-time.
        let mut waits: Vec<(OutboxKey, Pending)> = Vec::with_capacity(req.items.len());
        for (key, item) in req.items {
            let p = match &item.kind {
                WorkKind::Effect { effect } => publish_command(&ctx, &item, effect).await,
                WorkKind::Command { command, aggregate, aggregate_id } => {
                    Pending::Http(tokio::task::spawn_local(post_gateway(
                        ctx.clone(),
                        http.clone(),
                        item.clone(),
                        command.clone(),
                        aggregate.clone(),
                        aggregate_id.clone(),
                    )))
                }
            };
            waits.push((key, p));
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
                .map(|(key, p)| async move { DispatchResult { key, outcome: p.resolve().await } })
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
    Http(tokio::task::JoinHandle<DispatchOutcome>),
}

impl Pending {
    async fn resolve(self) -> DispatchOutcome {
        match self {
            Pending::Done(o) => o,
            Pending::Ack(fut) => match fut.await {
                Ok(_) => DispatchOutcome::Delivered,
                Err(e) => DispatchOutcome::Retry { error: format!("publish not acknowledged: {e}") },
            },
            Pending::Http(h) => {
                h.await.unwrap_or_else(|e| DispatchOutcome::Retry { error: format!("gateway call aborted: {e}") })
            }
        }
    }
}

/// The body of an effect command: the envelope around the outbox item's payload, whose
/// bytes are copied as they are (no parse and re-encode: key order, number text and string
/// escapes stay the saga's).
fn command_body(item: &OutboxItem, effect: &str) -> Result<Bytes, serde_json::Error> {
    let body = CommandEnvelope {
        command_id: item.work_id.clone(),
        tenant_id: item.tenant.clone(),
        effect: effect.to_owned(),
        saga: item.saga.clone(),
        correlation_id: item.correlation_id.clone(),
        payload: &*item.payload,
        traceparent: item.traceparent.clone(),
        source_event_id: item.source_event_id.clone(),
        created_at: item.created_at,
    };
    serde_json::to_vec(&body).map(Bytes::from)
}

/// The body of a Gateway command submission; the payload is copied as in [`command_body`].
fn gateway_body(
    item: &OutboxItem,
    command: String,
    aggregate: String,
    aggregate_id: String,
) -> Result<Bytes, serde_json::Error> {
    let body = GatewayCommand {
        command_id: item.work_id.clone(),
        tenant_id: item.tenant.clone(),
        aggregate_type: aggregate,
        aggregate_id,
        command,
        payload: &*item.payload,
        correlation_id: item.correlation_id.clone(),
        saga: item.saga.clone(),
    };
    serde_json::to_vec(&body).map(Bytes::from)
}

async fn publish_command(ctx: &Ctx, item: &OutboxItem, effect: &str) -> Pending {
    let payload = match command_body(item, effect) {
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

/// Submits one aggregate command to the Gateway. 2xx and 409 (duplicate) are delivered; 408,
/// 429, 5xx and transport errors are retried; other 4xx are permanent.
async fn post_gateway(
    ctx: Rc<Ctx>,
    http: HttpClient,
    item: OutboxItem,
    command: String,
    aggregate: String,
    aggregate_id: String,
) -> DispatchOutcome {
    let Some(base) = ctx.cfg.gateway_url.clone() else {
        return DispatchOutcome::Retry { error: "gateway.url is not configured".into() };
    };
    let bytes = match gateway_body(&item, command, aggregate, aggregate_id) {
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
    let timeout = Duration::from_millis(ctx.cfg.gateway_timeout_ms);
    match tokio::time::timeout(timeout, http.request(req)).await {
        Err(_) => DispatchOutcome::Retry { error: format!("gateway timed out after {} ms", timeout.as_millis()) },
        Ok(Err(e)) => DispatchOutcome::Retry { error: format!("gateway unreachable: {e}") },
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            // Read the body so the connection goes back to the pool.
            let text = match tokio::time::timeout(timeout, resp.into_body().collect()).await {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).chars().take(200).collect(),
                _ => String::new(),
            };
            match status {
                200..=299 | 409 => DispatchOutcome::Delivered,
                408 | 429 | 500..=599 => DispatchOutcome::Retry { error: format!("gateway answered {status}: {text}") },
                _ => DispatchOutcome::Permanent { error: format!("gateway refused the command with {status}: {text}") },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let body = gateway_body(&item("command"), "Reserve".into(), "inventory".into(), "sku-1".into()).unwrap();
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
