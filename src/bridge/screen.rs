//! Messages the NATS client cannot parse. A header block that is not valid UTF-8 (or not
//! `Name: value` lines) makes async-nats drop the whole connection when it is delivered; on
//! reconnect the same message is delivered again, so one bad publish would stop every
//! consumer of the runner for good. After each reconnect a consumer asks the server which
//! sequences it delivered that the runner never received, fetches each of them through the
//! stream API (whose answer carries the headers base64-encoded, parsed here, not by the
//! client), and moves every unparseable one matching its filter into the dead letters (raw
//! headers and body kept, invariant: never silently dropped), then acknowledges it in this
//! consumer only — the stream is the platform's and has other readers, so nothing is deleted
//! from it. The other delivered-but-never-received messages are NAKed, so they come again at
//! once, and the consumer is kept as it is (re-creating it at its ack floor would deliver the
//! acknowledged message again).
//!
//! The acknowledgements are published to the consumer's ack subject built from the stream
//! sequence (`$JS.ACK.<stream>.<consumer>.1.<seq>.<dseq>.0.0`): the server settles an
//! explicit ack by the stream sequence of its pending record, and takes a NAK whose delivery
//! sequence lies within the consumer's range (the last delivered one is used).

use crate::context::Ctx;
use crate::envelope::Transport;
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::str::FromStr;

/// Sequences probed per reconnect at most (a fetch batch is far smaller).
const MAX_PROBES: u64 = 2_048;

/// The stream sequences one consumer received recently (bounded).
#[derive(Debug, Default)]
pub struct Received {
    order: VecDeque<u64>,
    set: BTreeSet<u64>,
}

impl Received {
    const CAP: usize = 65_536;

    pub fn note(&mut self, seq: u64) {
        if self.set.insert(seq) {
            self.order.push_back(seq);
            if self.order.len() > Self::CAP
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, seq: u64) -> bool {
        self.set.contains(&seq)
    }
}

/// Why a header block would break the client, or `None` when it parses.
pub fn header_problem(block: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(block) else {
        return Some("message headers are not valid UTF-8".into());
    };
    let mut lines = text.split("\r\n");
    match lines.next() {
        Some(first) if first.starts_with("NATS/1.0") => {}
        other => return Some(format!("message headers do not start with NATS/1.0 (found {other:?})")),
    }
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Some(format!("message header line {line:?} has no `:`"));
        };
        if async_nats::HeaderName::from_str(name.trim()).is_err() {
            return Some(format!("message header name {name:?} is not a valid header name"));
        }
        if async_nats::HeaderValue::from_str(value.trim()).is_err() {
            return Some(format!("message header {name:?} has a value the client cannot parse"));
        }
    }
    None
}

/// Finds and quarantines delivered-but-never-received messages of one consumer that the
/// client cannot parse (acknowledged in this consumer, left in the stream), and NAKs the
/// other never-received ones. Returns how many were moved; when any was, the caller keeps the
/// consumer as it is.
pub async fn sweep(ctx: &Rc<Ctx>, stream: &str, consumer: &str, filter: &str, received: &Received) -> usize {
    let Ok(s) = ctx.js.get_stream(stream).await else { return 0 };
    let Ok(info) = s.consumer_info(consumer).await else { return 0 };
    let (floor, delivered) = (info.ack_floor.stream_sequence, info.delivered.stream_sequence);
    let last_dseq = info.delivered.consumer_sequence;
    let mut moved = 0;
    let mut others = Vec::new();
    let mut probes = 0;
    for seq in floor + 1..=delivered {
        if received.contains(seq) {
            continue;
        }
        probes += 1;
        if probes > MAX_PROBES {
            break;
        }
        let Some(raw) = fetch(ctx, stream, seq).await else { continue };
        if !shards::manifest::subject_matches(filter, &raw.subject) {
            continue;
        }
        let Some(problem) = raw.headers.as_deref().and_then(header_problem) else {
            others.push(seq);
            continue;
        };
        if quarantine(ctx, stream, seq, &raw, &problem).await {
            match settle(ctx, stream, consumer, seq, last_dseq, "").await {
                Ok(()) => moved += 1,
                Err(e) => tracing::error!(
                    stream, consumer, seq, error = %e,
                    "an unparseable message is in the dead letters but could not be acknowledged; it comes again"
                ),
            }
        }
    }
    if moved > 0 {
        // Delivered to the dead connection: again at once, in order, on the kept consumer.
        for seq in others {
            if let Err(e) = settle(ctx, stream, consumer, seq, last_dseq, "-NAK").await {
                tracing::warn!(stream, consumer, seq, error = %e, "cannot NAK a message lost with the connection; it comes again after ack_wait");
            }
        }
    }
    moved
}

/// Acknowledges (`what` empty) or NAKs message `seq` in `consumer` through its ack subject.
async fn settle(
    ctx: &Rc<Ctx>,
    stream: &str,
    consumer: &str,
    seq: u64,
    dseq: u64,
    what: &'static str,
) -> Result<(), async_nats::Error> {
    let subject = format!("$JS.ACK.{stream}.{consumer}.1.{seq}.{dseq}.0.0");
    ctx.client.publish(subject, bytes::Bytes::from_static(what.as_bytes())).await?;
    ctx.client.flush().await?;
    Ok(())
}

struct RawMessage {
    subject: String,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// One stored message through `$JS.API.STREAM.MSG.GET` (headers not parsed by the client).
async fn fetch(ctx: &Rc<Ctx>, stream: &str, seq: u64) -> Option<RawMessage> {
    let subject = format!("$JS.API.STREAM.MSG.GET.{stream}");
    let body = serde_json::to_vec(&serde_json::json!({ "seq": seq })).ok()?;
    let reply = ctx.client.request(subject, body.into()).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    let m = v.get("message")?;
    // The server leaves empty fields out; one that is there but not base64 is a fault: skip
    // the message rather than file (and delete) it without its bytes.
    let b64 = |f: &str| match m.get(f) {
        None | Some(serde_json::Value::Null) => Some(None),
        Some(x) => x.as_str().and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok()).map(Some),
    };
    Some(RawMessage {
        subject: m.get("subject")?.as_str()?.to_owned(),
        headers: b64("hdrs")?,
        // No `data`: an empty body.
        payload: b64("data")?.unwrap_or_default(),
    })
}

async fn quarantine(ctx: &Rc<Ctx>, stream: &str, seq: u64, raw: &RawMessage, problem: &str) -> bool {
    // Keep whatever header lines are readable; the whole block, lossily, under one key.
    let block = raw.headers.as_deref().unwrap_or_default();
    let mut headers = BTreeMap::new();
    for line in block.split(|b| *b == b'\n').skip(1) {
        if let Ok(line) = std::str::from_utf8(line)
            && let Some((k, v)) = line.trim_end_matches('\r').split_once(':')
        {
            headers.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    headers.insert("x-runner-raw-headers".into(), String::from_utf8_lossy(block).into_owned());
    let t = Transport { stream: stream.to_owned(), seq, subject: raw.subject.clone(), headers, published_ms: 0 };
    tracing::warn!(stream, seq, subject = %raw.subject, error = problem, "unparseable message quarantined and removed from the stream");
    match crate::quarantine::file_raw_letter(ctx, t, raw.payload.clone(), problem.to_owned()).await {
        Some(rx) => rx.await.is_ok(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_the_client_would_choke_on_are_named() {
        assert_eq!(header_problem(b"NATS/1.0\r\nNats-Msg-Id: a\r\nx-tenant-id: acme\r\n\r\n"), None);
        assert!(header_problem(b"NATS/1.0\r\nx-tenant-id: \xff\xfe\r\n\r\n").unwrap().contains("UTF-8"));
        assert!(header_problem(b"NATS/1.0\r\nno colon here\r\n\r\n").unwrap().contains("no `:`"));
        assert!(header_problem(b"HTTP/1.1\r\n\r\n").unwrap().contains("NATS/1.0"));
    }

    #[test]
    fn the_received_set_is_bounded() {
        let mut r = Received::default();
        for s in 0..(Received::CAP as u64 + 10) {
            r.note(s);
        }
        assert!(!r.contains(0) && r.contains(Received::CAP as u64 + 9));
        assert_eq!(r.set.len(), Received::CAP);
    }
}
