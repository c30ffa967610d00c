//! Wire formats: the aggregate event envelope consumed from `AGGREGATE_EVENTS`, the effect
//! command on `WORKFLOW_COMMANDS`, the effect result on `WORKFLOW_EVENTS`, the Gateway
//! command submission; and the decoding of a JetStream message into a shard [`Event`].
//! Decoding ignores unknown fields (forward compatibility) and reports what is wrong with a
//! message in words that end up in its dead letter.

use serde::{Deserialize, Serialize};
use shards::message::{Event, ResultInfo};
use std::collections::BTreeMap;

pub const HDR_MSG_ID: &str = "Nats-Msg-Id";
pub const HDR_TENANT: &str = "x-tenant-id";
pub const HDR_CORRELATION: &str = "x-correlation-id";
pub const HDR_TRACEPARENT: &str = "traceparent";
pub const HDR_COMMAND_ID: &str = "x-command-id";
/// On a command in `WORKFLOW_COMMANDS` and its result in `WORKFLOW_EVENTS`: the saga's own
/// shard already ran it (`inline`) and applied the result; published for the record, so
/// effect workers acknowledge the command without running it and result consumers
/// acknowledge the result without applying it.
pub const HDR_RAN: &str = "x-runner-ran";

/// Whether a message is the record of a call run in place (`x-runner-ran: inline`); reads
/// the one header, nothing else of the message.
pub fn ran_inline(msg: &async_nats::jetstream::Message) -> bool {
    msg.headers.as_ref().and_then(|h| h.get(HDR_RAN)).is_some_and(|v| v.as_str() == "inline")
}

/// An event as aggregate nodes publish it. Every field is optional on the wire; decoding
/// fills gaps from headers, the subject and the message metadata.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AggregateEnvelope {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub aggregate_type: Option<String>,
    #[serde(default)]
    pub aggregate_id: Option<String>,
    /// RFC 3339 text or milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: Option<serde_json::Value>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub data: Option<serde_json::Value>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// An effect command (published by the outbox relay, consumed by effect workers).
///
/// `P` is the payload: the outbox item's raw JSON (`&RawValue`) when the relay publishes, so
/// its bytes go on the wire exactly as the saga wrote them; a [`serde_json::Value`] when an
/// effect worker reads the command.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CommandEnvelope<P = serde_json::Value> {
    pub command_id: String,
    #[serde(default)]
    pub tenant_id: String,
    pub effect: String,
    pub saga: String,
    pub correlation_id: String,
    #[serde(default)]
    pub payload: P,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub source_event_id: String,
    #[serde(default)]
    pub created_at: u64,
}

/// An effect result (published by effect workers, consumed by sagas).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ResultEnvelope {
    pub command_id: String,
    #[serde(default)]
    pub tenant_id: String,
    pub effect: String,
    pub saga: String,
    pub correlation_id: String,
    /// `succeeded` or `failed`.
    pub outcome: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub timestamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// What the relay POSTs to `{gateway}/commands`. `P` is the payload, as for
/// [`CommandEnvelope`]: the outbox item's raw JSON when sent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct GatewayCommand<P = serde_json::Value> {
    pub command_id: String,
    pub tenant_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub command: String,
    pub payload: P,
    pub correlation_id: String,
    pub saga: String,
}

/// The subject token for a tenant (`_` for the empty tenant).
pub fn tenant_token(tenant: &str) -> &str {
    shards::core::subject_token(tenant)
}

pub fn command_subject(tenant: &str, effect: &str) -> String {
    format!("workflow.commands.{}.{effect}", tenant_token(tenant))
}

pub fn result_subject(tenant: &str, effect: &str, outcome: &str) -> String {
    format!("workflow.events.{}.{effect}.{outcome}", tenant_token(tenant))
}

/// The body of an effect command: the envelope around the outbox item's payload, whose
/// bytes are copied as they are (no parse and re-encode: key order, number text and string
/// escapes stay the saga's).
pub fn command_body(item: &shards::record::OutboxItem, effect: &str) -> Result<bytes::Bytes, serde_json::Error> {
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
    serde_json::to_vec(&body).map(bytes::Bytes::from)
}

/// The body of a Gateway command submission; the payload is copied as in [`command_body`].
pub fn gateway_body(
    item: &shards::record::OutboxItem,
    command: String,
    aggregate: String,
    aggregate_id: String,
) -> Result<bytes::Bytes, serde_json::Error> {
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
    serde_json::to_vec(&body).map(bytes::Bytes::from)
}

/// Transport facts of one message, independent of the NATS client types.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    /// Publish time, milliseconds since the epoch.
    pub published_ms: u64,
}

impl Transport {
    /// The transport facts of a JetStream message.
    pub fn of(msg: &async_nats::jetstream::Message) -> Self {
        let (stream, seq, published_ms) = match msg.info() {
            Ok(i) => {
                (i.stream.to_owned(), i.stream_sequence, (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
            }
            Err(_) => (String::new(), 0, 0),
        };
        let mut headers = BTreeMap::new();
        if let Some(h) = &msg.headers {
            for (k, values) in h.iter() {
                if let Some(v) = values.first() {
                    headers.insert(k.to_string(), v.as_str().to_owned());
                }
            }
        }
        Transport { stream, seq, subject: msg.subject.to_string(), headers, published_ms }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The tenant a message belongs to, for filing its dead letter where that tenant's
    /// operators look (may be empty): the subject's tenant token (the subject is the tenant:
    /// a header or body naming another cannot file it elsewhere), else the header, else a
    /// string `tenant_id` in a JSON body.
    pub fn claimed_tenant(&self, body: &[u8]) -> String {
        if let Some(t) = subject_tenant(&self.subject) {
            return t;
        }
        if let Some(t) = self.header(HDR_TENANT) {
            return t.to_owned();
        }
        if body.len() <= 1 << 20
            && let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(body)
            && let Some(t) = m.get("tenant_id").and_then(|v| v.as_str())
        {
            return t.to_owned();
        }
        String::new()
    }
}

/// The tenant a subject names by its tenant token — `events.{tenant}.{aggregate}.{type}…`
/// (four tokens or more), `workflow.{kind}.{tenant}.…` (likewise); `_` is the empty tenant —
/// or `None` when the subject has no tenant token.
pub fn subject_tenant(subject: &str) -> Option<String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let token = match tokens.first() {
        _ if tokens.len() < 4 => return None,
        Some(&"workflow") => tokens[2],
        _ => tokens[1],
    };
    Some(if token == "_" { String::new() } else { token.to_owned() })
}

/// The tenant of a message (invariant 8): the subject's, when it names one, and then a header
/// or body naming another tenant is refused; without a tenant token, the header or the body
/// (which must agree).
fn message_tenant(t: &Transport, body_tenant: Option<&str>) -> Result<Option<String>, DecodeError> {
    let header = t.header(HDR_TENANT);
    let body_tenant = body_tenant.filter(|b| !b.is_empty());
    match subject_tenant(&t.subject) {
        Some(subject) => {
            for (source, claim) in [("x-tenant-id header", header), ("body's tenant_id", body_tenant)] {
                if let Some(claim) = claim
                    && claim != subject
                    && !(claim == "_" && subject.is_empty())
                {
                    return Err(DecodeError::TenantMismatch { subject, claimed: claim.to_owned(), via: source });
                }
            }
            Ok(Some(subject))
        }
        None => match (header, body_tenant) {
            (Some(h), Some(b)) if h != b => {
                Err(DecodeError::TenantConflict { header: h.to_owned(), body: b.to_owned() })
            }
            (h, b) => Ok(h.or(b).map(str::to_owned)),
        },
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {size} bytes exceeds the limit of {limit} bytes (limits.max_event_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object")]
    NotObject,
    #[error("field `{field}` has the wrong type: {why}")]
    WrongType { field: &'static str, why: String },
    #[error("no tenant (header x-tenant-id, field tenant_id or subject token) and tenancy.required is set")]
    NoTenant,
    #[error("{0}")]
    BadKey(String),
    #[error("timestamp {value:?} is neither an RFC 3339 date nor milliseconds since the epoch: {why}")]
    BadTimestamp { value: String, why: String },
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("effect result for saga {0:?}, which is not loaded")]
    UnknownSaga(String),
    #[error(
        "the subject names tenant {subject:?} but the {via} names {claimed:?}: a message cannot act for another tenant"
    )]
    TenantMismatch { subject: String, claimed: String, via: &'static str },
    #[error("the x-tenant-id header names tenant {header:?} but the body's tenant_id names {body:?}")]
    TenantConflict { header: String, body: String },
}

fn parse_timestamp(v: &serde_json::Value) -> Result<u64, DecodeError> {
    let bad = |value: String, why: &str| DecodeError::BadTimestamp { value, why: why.to_owned() };
    match v {
        serde_json::Value::Number(n) => {
            n.as_u64().ok_or_else(|| bad(n.to_string(), "a number must be whole milliseconds since the epoch"))
        }
        serde_json::Value::String(s) => parse_rfc3339_ms(s),
        other => Err(bad(other.to_string(), "neither a string nor a number")),
    }
}

/// Parses an RFC 3339 date and time (`2026-11-28T10:00:00.250Z`, `…+01:00`) into
/// milliseconds since the epoch (fractions below a millisecond are cut off). Dates that do
/// not exist (`2023-02-31`), a missing offset and times before 1970 are errors.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, DecodeError> {
    let bad = |why: String| DecodeError::BadTimestamp { value: s.to_owned(), why };
    let at = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| bad(e.to_string()))?;
    u64::try_from(at.timestamp_millis()).map_err(|_| bad("before 1970-01-01T00:00:00Z".into()))
}

/// A decoded aggregate event: the shard event and the JSON the trigger paths look into.
#[derive(Debug, Clone)]
pub struct DecodedEvent {
    pub event: Event,
    /// The whole envelope, for correlation-id paths like `data.order_id`.
    pub envelope: serde_json::Value,
}

/// Decodes a message from an aggregate stream.
pub fn decode_aggregate(
    body: &[u8],
    t: &Transport,
    tenancy_required: bool,
    max_bytes: usize,
) -> Result<DecodedEvent, DecodeError> {
    if body.len() > max_bytes {
        return Err(DecodeError::TooLarge { size: body.len(), limit: max_bytes });
    }
    let envelope: serde_json::Value = serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    if !envelope.is_object() {
        return Err(DecodeError::NotObject);
    }
    let env: AggregateEnvelope = serde_json::from_value(envelope.clone()).map_err(|e| {
        let why = e.to_string();
        let field = ["id", "type", "tenant_id", "aggregate_type", "aggregate_id", "correlation_id"]
            .into_iter()
            .find(|f| {
                why.contains(&format!("`{f}`")) || envelope.get(*f).is_some_and(|v| !v.is_string() && !v.is_null())
            })
            .unwrap_or("body");
        DecodeError::WrongType { field, why }
    })?;
    let tokens: Vec<&str> = t.subject.split('.').collect();
    let tenant = message_tenant(t, env.tenant_id.as_deref())?
        .map(|t| if t == "_" { String::new() } else { t })
        .unwrap_or_default();
    if tenant.is_empty() && tenancy_required {
        return Err(DecodeError::NoTenant);
    }
    shards::keys::check_len("tenant", &tenant, shards::keys::MAX_TENANT)
        .map_err(|e| DecodeError::BadKey(e.to_string()))?;
    let id =
        t.header(HDR_MSG_ID).map(str::to_owned).or(env.id.clone()).unwrap_or_else(|| format!("{}:{}", t.stream, t.seq));
    let event_type = env
        .event_type
        .clone()
        .or_else(|| tokens.last().map(|s| (*s).to_owned()))
        .ok_or(DecodeError::Missing("type"))?;
    let timestamp = match &env.timestamp {
        Some(v) if !v.is_null() => parse_timestamp(v)?,
        _ => t.published_ms,
    };
    let traceparent = t.header(HDR_TRACEPARENT).map(str::to_owned).or_else(|| {
        env.metadata.as_ref().and_then(|m| m.get("traceparent")).and_then(|v| v.as_str()).map(str::to_owned)
    });
    let data = env.data.clone().unwrap_or_else(|| envelope.clone());
    Ok(DecodedEvent {
        event: Event {
            id,
            event_type,
            stream: t.stream.clone(),
            seq: t.seq,
            subject: t.subject.clone(),
            tenant,
            timestamp,
            data,
            traceparent,
            result: None,
            headers: t.headers.clone(),
        },
        envelope,
    })
}

/// Decodes an effect result from `WORKFLOW_EVENTS` into the event its saga instance sees.
pub fn decode_result(body: &[u8], t: &Transport, max_bytes: usize) -> Result<(ResultEnvelope, Event), DecodeError> {
    if body.len() > max_bytes {
        return Err(DecodeError::TooLarge { size: body.len(), limit: max_bytes });
    }
    let r: ResultEnvelope = serde_json::from_slice(body).map_err(|e| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            DecodeError::NotJson(e.to_string())
        } else {
            DecodeError::WrongType { field: "result", why: e.to_string() }
        }
    })?;
    if r.outcome != "succeeded" && r.outcome != "failed" {
        return Err(DecodeError::WrongType {
            field: "outcome",
            why: format!("{:?} is not succeeded or failed", r.outcome),
        });
    }
    let mut r = r;
    if let Some(tenant) = message_tenant(t, Some(&r.tenant_id))? {
        r.tenant_id = if tenant == "_" { String::new() } else { tenant };
    }
    let key = shards::keys::SagaKey::new(r.tenant_id.clone(), r.saga.clone(), r.correlation_id.clone());
    key.validate().map_err(|e| DecodeError::BadKey(e.to_string()))?;
    let mut event = result_event(&r, t.stream.clone(), t.seq, t.subject.clone());
    if r.timestamp == 0 {
        event.timestamp = t.published_ms;
    }
    if let Some(tp) = t.header(HDR_TRACEPARENT) {
        event.traceparent = Some(tp.to_owned());
    }
    event.headers = t.headers.clone();
    Ok((r, event))
}

/// The event a saga sees for an effect result: the same whether the result was consumed
/// from `stream` (at `seq`) or applied in place (no stream sequence).
pub fn result_event(r: &ResultEnvelope, stream: String, seq: u64, subject: String) -> Event {
    let mut data = r.payload.clone();
    if let (Some(err), serde_json::Value::Object(m)) = (&r.error, &mut data) {
        m.entry("reason").or_insert_with(|| serde_json::Value::String(err.clone()));
    } else if let Some(err) = &r.error {
        data = serde_json::json!({ "reason": err, "payload": data });
    }
    Event {
        id: format!("result:{}", r.command_id),
        event_type: format!("{}.{}", r.effect, r.outcome),
        stream,
        seq,
        subject,
        tenant: r.tenant_id.clone(),
        timestamp: r.timestamp,
        data,
        traceparent: r.traceparent.clone(),
        result: Some(ResultInfo {
            command_id: r.command_id.clone(),
            effect: r.effect.clone(),
            outcome: r.outcome.clone(),
        }),
        headers: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(subject: &str) -> Transport {
        Transport {
            stream: "AGGREGATE_EVENTS".into(),
            seq: 9,
            subject: subject.into(),
            headers: BTreeMap::new(),
            published_ms: 1_000,
        }
    }

    #[test]
    fn decodes_with_fallbacks_and_ignores_unknown_fields() {
        let body = br#"{"type":"OrderPlaced","data":{"order_id":"o-1"},"unknown":{"x":1},"timestamp":"2026-11-28T10:00:00.250Z"}"#;
        let d = decode_aggregate(body, &t("events.acme.order.OrderPlaced"), true, 1 << 20).unwrap();
        assert_eq!(d.event.tenant, "acme");
        assert_eq!(d.event.id, "AGGREGATE_EVENTS:9");
        assert_eq!(d.event.timestamp, 1_795_860_000_250);
        assert_eq!(d.event.data["order_id"], "o-1");
        let mut tr = t("events.order.OrderPlaced");
        tr.headers.insert("x-tenant-id".into(), "h".into());
        tr.headers.insert("Nats-Msg-Id".into(), "evt-1".into());
        tr.headers.insert("traceparent".into(), "00-abc-def-01".into());
        let d = decode_aggregate(br#"{"tenant_id":"h","type":"X"}"#, &tr, false, 1 << 20).unwrap();
        assert_eq!((d.event.tenant.as_str(), d.event.id.as_str()), ("h", "evt-1"));
        assert_eq!(d.event.traceparent.as_deref(), Some("00-abc-def-01"));
        assert_eq!(d.event.timestamp, 1_000, "publish time when the body has none");
    }

    #[test]
    fn the_subject_is_the_tenant() {
        let with = |subject: &str, header: Option<&str>| {
            let mut tr = t(subject);
            if let Some(h) = header {
                tr.headers.insert("x-tenant-id".into(), h.into());
            }
            tr
        };
        let decode = |tr: &Transport, body: &[u8]| decode_aggregate(body, tr, false, 1 << 20);
        let tenant = |r: Result<DecodedEvent, DecodeError>| r.map(|d| d.event.tenant);
        // The subject's token decides; claims that agree are fine.
        assert_eq!(tenant(decode(&with("events.a.o.X", None), br#"{"type":"X"}"#)), Ok("a".into()));
        assert_eq!(tenant(decode(&with("events.a.o.X", Some("a")), br#"{"tenant_id":"a"}"#)), Ok("a".into()));
        assert_eq!(tenant(decode(&with("events._.o.X", None), br#"{"tenant_id":""}"#)), Ok(String::new()));
        // A header or body naming another tenant is refused, naming both.
        for (header, body, via) in [
            (Some("b"), &br#"{"type":"X"}"#[..], "x-tenant-id header"),
            (None, &br#"{"tenant_id":"b"}"#[..], "body's tenant_id"),
            (Some("a"), &br#"{"tenant_id":"b"}"#[..], "body's tenant_id"),
            (None, &br#"{"tenant_id":"a"}"#[..], ""),
        ] {
            let subject = if via.is_empty() { "events._.o.X" } else { "events.a.o.X" };
            let e = decode(&with(subject, header), body).unwrap_err();
            let claimed = if via.is_empty() { "a" } else { "b" };
            assert!(matches!(&e, DecodeError::TenantMismatch { claimed: c, .. } if c == claimed), "{e}");
        }
        // Without a tenant token: the header or body, which must agree.
        assert_eq!(tenant(decode(&with("events.o.X", Some("h")), br#"{"type":"X"}"#)), Ok("h".into()));
        let e = decode(&with("events.o.X", Some("h")), br#"{"tenant_id":"b"}"#).unwrap_err();
        assert_eq!(e, DecodeError::TenantConflict { header: "h".into(), body: "b".into() });
        assert_eq!(subject_tenant("workflow.events.acme.pay.succeeded").as_deref(), Some("acme"));
        assert_eq!(subject_tenant("events.x.Y"), None);
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let tr = t("events.x.Y");
        assert!(matches!(decode_aggregate(b"not json", &tr, false, 1 << 20), Err(DecodeError::NotJson(_))));
        assert_eq!(decode_aggregate(b"[1]", &tr, false, 1 << 20).unwrap_err(), DecodeError::NotObject);
        assert_eq!(decode_aggregate(b"{}", &tr, true, 1 << 20).unwrap_err(), DecodeError::NoTenant);
        let e = decode_aggregate(br#"{"type": 5}"#, &tr, false, 1 << 20).unwrap_err();
        assert!(matches!(e, DecodeError::WrongType { field: "type", .. }), "{e}");
        let e = decode_aggregate(&vec![b' '; 2048], &tr, false, 1024).unwrap_err();
        assert_eq!(e.to_string(), "event of 2048 bytes exceeds the limit of 1024 bytes (limits.max_event_bytes)");
        let e = decode_aggregate(br#"{"timestamp":"yesterday"}"#, &tr, false, 1 << 20).unwrap_err();
        assert!(matches!(e, DecodeError::BadTimestamp { .. }));
    }

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        let ok = |s: &str| parse_rfc3339_ms(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("1970-01-01T00:00:00Z"), 0);
        assert_eq!(ok("1970-01-01T01:00:00+01:00"), 0);
        assert_eq!(ok("1969-12-31T19:00:00-05:00"), 0);
        assert_eq!(ok("2000-02-29T12:34:56.789Z"), 951_827_696_789);
        assert_eq!(ok("2000-02-29T14:04:56.789+01:30"), 951_827_696_789);
        assert_eq!(ok("2000-02-29t12:34:56.789z"), 951_827_696_789, "lowercase t and z");
        assert_eq!(ok("2026-11-28T10:00:00.2509999Z"), 1_795_860_000_250, "sub-millisecond digits cut off");
        assert_eq!(ok("2026-11-28T10:00:00.25Z"), 1_795_860_000_250);
        assert_eq!(ok("2024-02-29T00:00:00Z"), 1_709_164_800_000, "leap day");
        assert_eq!(ok("2024-02-29 00:00:00Z"), 1_709_164_800_000, "space as separator");
        assert_eq!(ok("2023-03-01T00:00:00Z"), 1_677_628_800_000);
    }

    #[test]
    fn invalid_rfc3339_dates_are_rejected_naming_the_value() {
        for bad in [
            "2023-02-31T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2023-04-31T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-00-10T00:00:00Z",
            "2023-01-01T24:00:00Z",
            "2023-01-01T00:60:00Z",
            "2023-01-01T00:00:00",
            "2023-01-01T00:00:00+25:00",
            "2023-01-01",
            "1969-12-31T23:59:59Z",
            "garbage",
            "",
        ] {
            let e = parse_rfc3339_ms(bad).expect_err(bad);
            assert!(matches!(&e, DecodeError::BadTimestamp { value, .. } if value == bad), "{bad}: {e:?}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn an_event_with_an_impossible_date_does_not_decode() {
        let tr = t("events.acme.order.OrderPlaced");
        let e =
            decode_aggregate(br#"{"type":"X","timestamp":"2023-02-31T00:00:00Z"}"#, &tr, false, 1 << 20).unwrap_err();
        assert!(matches!(&e, DecodeError::BadTimestamp { value, .. } if value == "2023-02-31T00:00:00Z"), "{e:?}");
        let e = decode_aggregate(br#"{"type":"X","timestamp":-5}"#, &tr, false, 1 << 20).unwrap_err();
        assert!(matches!(&e, DecodeError::BadTimestamp { value, .. } if value == "-5"), "{e:?}");
        let e = decode_aggregate(br#"{"type":"X","timestamp":true}"#, &tr, false, 1 << 20).unwrap_err();
        assert!(matches!(e, DecodeError::BadTimestamp { .. }), "{e:?}");
        let d = decode_aggregate(br#"{"type":"X","timestamp":1700000000123}"#, &tr, false, 1 << 20).unwrap();
        assert_eq!(d.event.timestamp, 1_700_000_000_123);
    }

    #[test]
    fn results_decode_into_the_instance_event() {
        let body = serde_json::to_vec(&ResultEnvelope {
            command_id: "c1".into(),
            tenant_id: "acme".into(),
            effect: "charge_payment".into(),
            saga: "order".into(),
            correlation_id: "o-1".into(),
            outcome: "failed".into(),
            payload: serde_json::json!({}),
            error: Some("declined".into()),
            attempts: 1,
            timestamp: 5,
            traceparent: None,
        })
        .unwrap();
        let (_, e) = decode_result(&body, &t("workflow.events.acme.charge_payment.failed"), 1 << 20).unwrap();
        assert_eq!(e.event_type, "charge_payment.failed");
        assert_eq!(e.id, "result:c1");
        assert_eq!(e.data["reason"], "declined");
        assert_eq!(e.result.unwrap().command_id, "c1");
    }
}
