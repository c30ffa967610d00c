//! Outbox dispatch: effect commands to `WORKFLOW_COMMANDS` (pipelined publishes, each with
//! `Nats-Msg-Id = command id`), aggregate commands to the Gateway over HTTP (keep-alive
//! pool, `Idempotency-Key = command id`). Each result goes back to the owning shard, which
//! deletes the item only for a durable confirmation (invariant 2).

use super::Ctx;
use crate::envelope::{
    self, CommandEnvelope, GatewayCommand, HDR_COMMAND_ID, HDR_CORRELATION, HDR_TENANT, HDR_TRACEPARENT,
};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shards::keys::OutboxKey;
use shards::message::{Control, DispatchOutcome, DispatchRequest, DispatchResult};
use shards::record::{OutboxItem, WorkKind};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1 client.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(connector)
}

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

async fn publish_command(ctx: &Ctx, item: &OutboxItem, effect: &str) -> Pending {
    let body = CommandEnvelope {
        command_id: item.work_id.clone(),
        tenant_id: item.tenant.clone(),
        effect: effect.to_owned(),
        saga: item.saga.clone(),
        correlation_id: item.correlation_id.clone(),
        payload: serde_json::from_str(item.payload.get()).unwrap_or(serde_json::Value::Null),
        traceparent: item.traceparent.clone(),
        source_event_id: item.source_event_id.clone(),
        created_at: item.created_at,
    };
    let payload = match serde_json::to_vec(&body) {
        Ok(p) => Bytes::from(p),
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
    let body = GatewayCommand {
        command_id: item.work_id.clone(),
        tenant_id: item.tenant.clone(),
        aggregate_type: aggregate,
        aggregate_id,
        command,
        payload: serde_json::from_str(item.payload.get()).unwrap_or(serde_json::Value::Null),
        correlation_id: item.correlation_id.clone(),
        saga: item.saga.clone(),
    };
    let Ok(bytes) = serde_json::to_vec(&body) else {
        return DispatchOutcome::Permanent { error: "cannot encode the gateway command".into() };
    };
    let mut req = hyper::Request::post(format!("{base}/commands"))
        .header("content-type", "application/json")
        .header("idempotency-key", item.work_id.as_str())
        .header(HDR_TENANT, item.tenant.as_str())
        .header(HDR_CORRELATION, item.correlation_id.as_str());
    if let Some(tp) = &item.traceparent {
        req = req.header(HDR_TRACEPARENT, tp.as_str());
    }
    let req = match req.body(Full::new(Bytes::from(bytes))) {
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
