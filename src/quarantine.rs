//! Dead letters of messages that cannot be decoded (ingest, the screen of unparseable
//! messages, effect workers): filed with the shard of the tenant the message claims, then the
//! message is `TERM`ed. Never silently dropped: if the dead letter cannot be written, the
//! message is left for redelivery.

use crate::context::Ctx;
use crate::envelope::Transport;
use async_nats::jetstream::AckKind;
use shards::message::{RawLetter, Request, reply_channel};
use shards::routing::RouteKey;
use std::rc::Rc;
use std::sync::atomic::Ordering;

/// Dead-letters a message that cannot be decoded, then `TERM`s it. Never silently dropped:
/// if the dead letter cannot be written, the message is left for redelivery.
pub async fn quarantine(ctx: &Rc<Ctx>, msg: async_nats::jetstream::Message, t: Transport, error: String) {
    tracing::warn!(stream = %t.stream, seq = t.seq, subject = %t.subject, error = %error, "undecodable message quarantined");
    let Some(rx) = file_raw_letter(ctx, t, msg.payload.to_vec(), error).await else { return };
    ctx.shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let shared = ctx.shared.clone();
    tokio::task::spawn_local(async move {
        if let Ok(()) = rx.await {
            let _ = msg.ack_with(AckKind::Term).await;
            metrics::counter!("runner_messages_settled_total", "outcome" => "term").increment(1);
        }
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Hands the dead letter of a message that cannot be decoded to the shard of the tenant it
/// claims; the answer comes when it is committed. `None` when the shards are stopping.
pub async fn file_raw_letter(
    ctx: &Rc<Ctx>,
    t: Transport,
    raw: Vec<u8>,
    error: String,
) -> Option<shards::message::ReplyRx<()>> {
    let tenant = t.claimed_tenant(&raw);
    let shard = ctx.router.shard(&tenant, RouteKey::Raw { stream: &t.stream, seq: t.seq });
    let (tx, rx) = reply_channel();
    let letter = RawLetter { tenant, stream: t.stream, seq: t.seq, subject: t.subject, headers: t.headers, raw, error };
    ctx.shard(shard).send(Request::Quarantine { letter, reply: tx }).await.ok()?;
    Some(rx)
}
