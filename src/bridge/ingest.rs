//! Consumers: pull messages, decode, route to the owning shard(s), and settle each message
//! only after every shard that got it has committed (invariant 1). While a shard holds a
//! message (its key is blocked and retrying) the message gets in-progress acks so JetStream
//! does not redeliver it behind the shard's back.
//!
//! Messages a consumer had delivered and not settled when this process bound it (the last
//! process may have died running one of them) run again as usual; if the process died in
//! that rerun too, they go to the shards one at a time, each counted in the crash ledger
//! first, and one that keeps killing the process is quarantined instead of run
//! ([`crate::crashes`]).

use crate::context::Ctx;
use crate::crashes::{CrashLedger, Rerun, Suspect, Suspects, Take, Unsettled};
use crate::effects::EffectsRuntime;
use crate::envelope::{self, DecodeError, Transport};
use crate::quarantine::{file_raw_letter, quarantine};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{Consumer, pull};
use futures::StreamExt;
use shards::clock::StreamWatermark;
use shards::keys::SagaKey;
use shards::message::{ApplyOutcome, Event, ReplyRx, Request, Target, reply_channel};
use shards::routing::RouteKey;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Aggregate events: matched against saga triggers.
    Aggregate,
    /// Effect results: routed to the instance named in the result.
    Results,
    /// Effect commands: the effect workers.
    Effects,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Aggregate => "events",
            Kind::Results => "results",
            Kind::Effects => "effects",
        }
    }
}

/// The marks of the consumers that feed the sagas (aggregate events, effect results), one
/// slot each: the wall-clock time up to which every message the consumer will deliver has
/// been handed to its shard. Their least is the streams' watermark, which the shards' timers
/// wait for (invariant 9). Marks only move forward; all start at 0, so no timer fires
/// before every consumer has caught up once.
pub struct Marks {
    marks: RefCell<Vec<u64>>,
    out: Arc<StreamWatermark>,
    lag: metrics::Gauge,
}

impl Marks {
    pub fn new(consumers: usize, out: Arc<StreamWatermark>) -> Rc<Self> {
        Rc::new(Self {
            marks: RefCell::new(vec![0; consumers]),
            out,
            lag: metrics::gauge!("runner_stream_watermark_lag_seconds"),
        })
    }

    fn advance(&self, slot: usize, ms: u64) {
        let mut marks = self.marks.borrow_mut();
        let Some(mark) = marks.get_mut(slot) else { return };
        if ms <= *mark {
            return;
        }
        *mark = ms;
        let least = marks.iter().copied().min().unwrap_or(0);
        if least > self.out.get() {
            self.out.set(least);
        }
        self.lag.set(wall_ms().saturating_sub(self.out.get()) as f64 / 1e3);
    }
}

fn wall_ms() -> u64 {
    use shards::clock::Clock;
    shards::clock::SystemClock.now_ms()
}

/// How often an idle consumer asks the server whether it has caught up (its mark moves to
/// the time of the question when it has).
const CAUGHT_UP_POLL: Duration = Duration::from_millis(50);

/// Pulls from one durable consumer until told to stop; re-binds after errors (server
/// restarts) without losing its position (the consumer is durable).
/// `effects` is the effect workers' runtime, which [`Kind::Effects`] consumers hand their
/// messages to. `mark` is the consumer's slot among the watermark's marks (consumers that
/// feed sagas). `unsettled` is what the consumer had delivered and not settled when this
/// process bound it: those messages go to the shards alone ([`handle_suspect`]).
#[allow(clippy::too_many_arguments)]
pub async fn consume(
    ctx: Rc<Ctx>,
    kind: Kind,
    stream: String,
    filter: String,
    mut consumer: Consumer<pull::Config>,
    effects: Option<Rc<EffectsRuntime>>,
    mark: Option<(Rc<Marks>, usize)>,
    unsettled: Unsettled,
) {
    let mut stop = ctx.stop_pulling.clone();
    let consumed = metrics::counter!("runner_consumed_total", "consumer" => kind.label());
    let redelivered = metrics::counter!("runner_redeliveries_total", "consumer" => kind.label());
    let lag = metrics::gauge!("runner_consumer_lag", "consumer" => kind.label(), "filter" => filter.clone());
    let durable = crate::config::durable_name(&ctx.cfg.durable_prefix, kind.label(), &filter);
    let mut received = super::screen::Received::default();
    let mut suspects = match (&ctx.crashes, kind) {
        (Some(ledger), Kind::Aggregate | Kind::Results) => {
            match Suspects::bind(ledger, &durable, &stream, unsettled).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(stream = %stream, filter = %filter, error = %e, "cannot read or write the crash ledger; messages the process died with run as usual");
                    None
                }
            }
        }
        _ => None,
    };
    // The highest consumer sequence handed on in this binding (to compare with what the
    // server delivered; a re-created consumer counts from 1 again).
    let mut last_cseq: u64;
    let mut idle_since_poll = true;
    loop {
        if *stop.borrow() {
            return;
        }
        last_cseq = 0;
        let messages = consumer
            .stream()
            .max_messages_per_batch(ctx.cfg.batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let bound_at = ctx.shared.connections.load(Ordering::SeqCst);
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(stream = %stream, filter = %filter, error = %e, "cannot pull; retrying");
                if wait_or_stop(&mut stop, Duration::from_millis(500)).await {
                    return;
                }
                if let Ok(c) = super::streams::pull_consumer(&ctx.js, &ctx.cfg, &stream, kind.label(), &filter).await {
                    consumer = c;
                }
                continue;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut poll = tokio::time::interval(CAUGHT_UP_POLL);
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {
                    if ctx.shared.connections.load(Ordering::SeqCst) != bound_at {
                        tracing::info!(stream = %stream, filter = %filter, "reconnected; re-binding the consumer");
                        break;
                    }
                    continue;
                }
                _ = poll.tick(), if mark.is_some() => {
                    // Idle since the last look: has everything the server holds for this
                    // consumer been handed on (nothing left to deliver, and everything
                    // delivered acked or handed on)? Then its mark is the time of the question.
                    if std::mem::replace(&mut idle_since_poll, true)
                        && let Some((marks, slot)) = &mark
                    {
                        let asked_at = wall_ms();
                        if let Ok(info) = consumer.get_info().await
                            && info.num_pending == 0
                            && (info.num_ack_pending == 0 || info.delivered.consumer_sequence <= last_cseq)
                        {
                            marks.advance(*slot, asked_at);
                        }
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(msg)) => {
                    idle_since_poll = false;
                    consumed.increment(1);
                    // Every message of this consumer published before this one was delivered
                    // before it; none was left when the server sent it if nothing is pending.
                    let mut handed = None;
                    let mut seq = None;
                    if let Ok(info) = msg.info() {
                        seq = Some(info.stream_sequence);
                        received.note(info.stream_sequence);
                        if info.delivered > 1 {
                            redelivered.increment(1);
                        }
                        lag.set(info.pending as f64);
                        let published = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                        handed = Some((
                            info.consumer_sequence,
                            if info.pending == 0 { published } else { published.saturating_sub(1) },
                        ));
                    }
                    ctx.shared.consumed.fetch_add(1, Ordering::Relaxed);
                    match (kind, &effects) {
                        (Kind::Effects, Some(effects)) => crate::effects::handle(&ctx, effects, msg).await,
                        // No runtime, no effect workers: the message stays for redelivery.
                        (Kind::Effects, None) => {}
                        _ => match (suspects.as_mut(), seq) {
                            (Some(s), Some(seq)) => {
                                match s.take(seq) {
                                    Take::Usual => handle(&ctx, kind, msg, None).await,
                                    Take::Rerun(r) => {
                                        handle(&ctx, kind, msg, Some(OnSettled::Rerun(r))).await;
                                        fail::fail_point!("bridge.rerun_handed");
                                    }
                                    Take::Alone { suspect, prior } => {
                                        handle_suspect(&ctx, kind, msg, suspect, prior).await
                                    }
                                }
                                s.handed(seq).await;
                            }
                            _ => handle(&ctx, kind, msg, None).await,
                        },
                    }
                    // Handed to its shard(s) now (or settled without one).
                    if let Some((cseq, at)) = handed {
                        last_cseq = last_cseq.max(cseq);
                        if let Some((marks, slot)) = &mark {
                            marks.advance(*slot, at);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(stream = %stream, filter = %filter, error = %e, "pull error; re-subscribing");
                    break;
                }
                None => break,
            }
        }
        if wait_or_stop(&mut stop, Duration::from_millis(200)).await {
            return;
        }
        // A message the client cannot parse drops the connection each time it is delivered:
        // find it among the delivered-but-never-received ones and quarantine it.
        let moved = super::screen::sweep(&ctx, &stream, &durable, &filter, &received).await;
        if moved > 0 {
            tracing::warn!(stream = %stream, filter = %filter, moved, "moved unparseable messages to the dead letters (left in the stream, acknowledged in this consumer)");
            // The sweep settled what the dead connection left: keep the consumer as it is.
            match ctx.js.get_stream(&stream).await {
                Ok(s) => match s.get_consumer(&durable).await {
                    Ok(c) => {
                        consumer = c;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(stream = %stream, filter = %filter, error = %e, "cannot re-bind; retrying")
                    }
                },
                Err(e) => tracing::warn!(stream = %stream, filter = %filter, error = %e, "cannot re-bind; retrying"),
            }
        }
        // Re-bind, restarting delivery at the ack floor (see `streams::pull_consumer`).
        match super::streams::pull_consumer(&ctx.js, &ctx.cfg, &stream, kind.label(), &filter).await {
            Ok(c) => consumer = c,
            Err(e) => tracing::warn!(stream = %stream, filter = %filter, error = %e, "cannot re-bind; retrying"),
        }
    }
}

async fn wait_or_stop(stop: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// One message from an aggregate or results consumer (`on_settled`: what else its
/// settlement completes).
async fn handle(ctx: &Rc<Ctx>, kind: Kind, msg: async_nats::jetstream::Message, on_settled: Option<OnSettled>) {
    if kind == Kind::Results && envelope::ran_inline(&msg) {
        // The record of a call the saga's own shard ran in place: its result was applied in
        // the commit that removed the call's outbox item, before this copy was published.
        metrics::counter!("runner_result_recorded_skipped_total").increment(1);
        ctx.shared.recorded_skipped.fetch_add(1, Ordering::Relaxed);
        let _ = msg.ack().await;
        return;
    }
    let t = Transport::of(&msg);
    let routed = match kind {
        Kind::Aggregate => route_aggregate(ctx, &msg.payload, &t),
        _ => route_result(ctx, &msg.payload, &t),
    };
    let groups = match routed {
        Ok(g) => g,
        Err(e) => {
            quarantine(ctx, msg, t, e.to_string()).await;
            return;
        }
    };
    if groups.is_empty() {
        // No saga reacts to this event: counted by subject pattern (and kept, if asked).
        unmatched(ctx, &t);
        if ctx.cfg.dead_letter_unmatched {
            let error = format!("event on {:?} matches no saga trigger (consumers.dead_letter_unmatched)", t.subject);
            quarantine(ctx, msg, t, error).await;
        } else {
            let _ = msg.ack().await;
        }
        return;
    }
    let mut replies = Vec::with_capacity(groups.len());
    for (shard, event, targets) in groups {
        let (tx, rx) = reply_channel();
        if ctx.shard(shard).send(Request::Apply { event, targets, reply: tx }).await.is_err() {
            // Shards are stopping: leave the message for redelivery.
            return;
        }
        replies.push(rx);
    }
    settle(ctx, msg, replies, on_settled);
}

/// What a message's settlement completes besides (the crash ledger's bookkeeping).
enum OnSettled {
    /// Forget the message's count.
    Forget(Rc<CrashLedger>, Suspect),
    /// One message of a consumer's rerun after a crash.
    Rerun(Rc<Rerun>),
}

/// One message the process died with at least once more after it was run again (see
/// [`crate::crashes`]; `prior`: deaths before the starts at which it ran alone): counted,
/// then handed to its shard(s) alone — no other one runs alone until the shards took it
/// in, so a death now is charged to it only. Once the process died `consumers.max_crashes`
/// times with it in flight it is quarantined (a poison dead letter per key, filed by the
/// shard) instead of run; if that start died too (decoding or routing it crashes) it is
/// filed raw, undecoded.
async fn handle_suspect(ctx: &Rc<Ctx>, kind: Kind, msg: async_nats::jetstream::Message, suspect: Suspect, prior: u32) {
    let Some(ledger) = ctx.crashes.clone() else { return handle(ctx, kind, msg, None).await };
    let lane = ctx.lane.lock().await;
    metrics::counter!("runner_crash_suspects_total", "consumer" => kind.label()).increment(1);
    let starts = match ledger.mark(&suspect).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(stream = %suspect.stream, seq = suspect.seq, error = %e, "cannot count a message the process may have died with; applying it as usual");
            drop(lane);
            return handle(ctx, kind, msg, None).await;
        }
    };
    ctx.shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let limit = ctx.cfg.max_crashes;
    // Deaths with it in flight so far: those before it ran alone, and one per start at
    // which it did (all but this one).
    let deaths = prior + starts - 1;
    let t = Transport::of(&msg);
    if deaths > limit {
        let error = format!(
            "crashed the process {} times (stream {}, sequence {}, subject {:?}): the last time while it was being quarantined, so it is kept raw, undecoded (consumers.max_crashes)",
            deaths, t.stream, t.seq, t.subject
        );
        tracing::error!(stream = %t.stream, seq = t.seq, subject = %t.subject, crashes = deaths, "message crashed the process again while being quarantined; filed raw");
        file_suspect(ctx, msg, t, error, &ledger, &suspect).await;
        ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let crashed = (deaths == limit).then_some(deaths);
    if crashed.is_some() {
        tracing::error!(stream = %t.stream, seq = t.seq, subject = %t.subject, crashes = deaths, "message crashed the process every time it ran; quarantining it");
    }
    let routed = match kind {
        Kind::Aggregate => route_aggregate(ctx, &msg.payload, &t),
        _ => route_result(ctx, &msg.payload, &t),
    };
    let groups = match routed {
        Ok(g) if !g.is_empty() => g,
        Ok(_) if !ctx.cfg.dead_letter_unmatched => {
            unmatched(ctx, &t);
            let _ = ledger.clear(&suspect).await;
            let _ = msg.ack().await;
            ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        other => {
            let error = match other {
                Err(e) => e.to_string(),
                Ok(_) => {
                    unmatched(ctx, &t);
                    format!("event on {:?} matches no saga trigger (consumers.dead_letter_unmatched)", t.subject)
                }
            };
            file_suspect(ctx, msg, t, error, &ledger, &suspect).await;
            ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    };
    let mut sent = Vec::with_capacity(groups.len());
    for (shard, event, targets) in groups {
        let (tx, rx) = reply_channel();
        let (ran_tx, ran) = reply_channel();
        let req = Request::ApplySuspect { event, targets, reply: tx, ran: ran_tx, crashed };
        if ctx.shard(shard).send(req).await.is_err() {
            // Shards are stopping: leave the message for redelivery.
            ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        sent.push((rx, ran));
    }
    let progress_every = Duration::from_millis(ctx.cfg.ack_wait_ms / 3);
    let mut replies = Vec::with_capacity(sent.len());
    let mut answered = true;
    for (mut rx, ran) in sent {
        match taken(&msg, &mut rx, ran, progress_every).await {
            Some(answer) => {
                answered &= answer.is_ok();
                replies.push(resolved(answer));
            }
            None => {
                answered = false;
                replies.push(rx);
            }
        }
    }
    ctx.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    if answered {
        // Settled by every shard: it ran and the process lived. Forgotten before the next
        // suspect goes, so a death from now on is not charged to it.
        if let Err(e) = ledger.clear(&suspect).await {
            tracing::warn!(stream = %suspect.stream, seq = suspect.seq, error = %e, "cannot clear a crash ledger entry");
        }
        drop(lane);
        settle(ctx, msg, replies, None);
    } else {
        // Waiting behind its key (or a shard went away): the next suspect goes; the entry
        // stays until the message settles.
        drop(lane);
        settle(ctx, msg, replies, Some(OnSettled::Forget(ledger, suspect)));
    }
}

/// Waits until a shard took a suspect in: `Some(answer)` once it settled (or the shard went
/// away), `None` when it waits behind its key. Keeps the message in progress meanwhile.
async fn taken(
    msg: &async_nats::jetstream::Message,
    reply: &mut ReplyRx<ApplyOutcome>,
    mut ran: ReplyRx<()>,
    progress_every: Duration,
) -> Option<Result<ApplyOutcome, futures::channel::oneshot::Canceled>> {
    let mut ran_open = true;
    loop {
        tokio::select! {
            biased;
            answer = &mut *reply => return Some(answer),
            r = &mut ran, if ran_open => match r {
                Ok(()) => return None,
                // Settled in the batch that took it: the answer is on its way.
                Err(_) => ran_open = false,
            },
            _ = tokio::time::sleep(progress_every) => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// An answer already received, as a channel that gives it (for [`settle`]).
fn resolved(answer: Result<ApplyOutcome, futures::channel::oneshot::Canceled>) -> ReplyRx<ApplyOutcome> {
    let (tx, rx) = reply_channel();
    if let Ok(a) = answer {
        let _ = tx.send(a);
    }
    rx
}

/// Files a suspect as a dead letter of its raw message, then forgets it and `TERM`s it.
async fn file_suspect(
    ctx: &Rc<Ctx>,
    msg: async_nats::jetstream::Message,
    t: Transport,
    error: String,
    ledger: &CrashLedger,
    suspect: &Suspect,
) {
    let Some(rx) = file_raw_letter(ctx, t, msg.payload.to_vec(), error).await else { return };
    if rx.await.is_ok() {
        let _ = ledger.clear(suspect).await;
        let _ = msg.ack_with(AckKind::Term).await;
        metrics::counter!("runner_messages_settled_total", "outcome" => "term").increment(1);
    }
}

fn unmatched(ctx: &Ctx, t: &Transport) {
    metrics::counter!("runner_unmatched_events_total", "stream" => t.stream.clone()).increment(1);
    ctx.shared.note_unmatched(&t.subject);
}

type Groups = Vec<(usize, Arc<Event>, Vec<Target>)>;

fn group(ctx: &Ctx, event: Arc<Event>, targets: Vec<Target>) -> Groups {
    let mut by_shard: BTreeMap<usize, Vec<Target>> = BTreeMap::new();
    for t in targets {
        let shard =
            ctx.router.shard(&event.tenant, RouteKey::Saga { saga: &t.saga, correlation_id: &t.correlation_id });
        by_shard.entry(shard).or_default().push(t);
    }
    by_shard.into_iter().map(|(s, ts)| (s, event.clone(), ts)).collect()
}

/// A body holding these bytes passes the crash point `bridge.decode_marked` before it is
/// decoded (the fault suite's input whose decoding crashes the process).
#[cfg(feature = "failpoints")]
const CRASH_DECODE_MARK: &[u8] = b"crash_decode";

fn route_aggregate(ctx: &Ctx, body: &[u8], t: &Transport) -> Result<Groups, DecodeError> {
    #[cfg(feature = "failpoints")]
    if body.windows(CRASH_DECODE_MARK.len()).any(|w| w == CRASH_DECODE_MARK) {
        fail::fail_point!("bridge.decode_marked");
    }
    let decoded = envelope::decode_aggregate(body, t, ctx.cfg.tenancy_required, ctx.cfg.max_event_bytes)?;
    let manifests = ctx.manifests.borrow().clone();
    let mut targets = Vec::new();
    let mut missing = Vec::new();
    for (saga, trigger) in manifests.triggers_for(&t.stream, &t.subject) {
        match shards::manifest::lookup_path(&decoded.envelope, &trigger.correlation) {
            Some(cid) => {
                SagaKey::new(decoded.event.tenant.clone(), saga.spec.name.clone(), cid.clone())
                    .validate()
                    .map_err(|e| DecodeError::BadKey(e.to_string()))?;
                if !targets.iter().any(|x: &Target| x.saga == saga.spec.name) {
                    targets.push(Target {
                        saga: saga.spec.name.clone(),
                        correlation_id: cid,
                        may_start: trigger.may_start,
                    });
                }
            }
            None => {
                missing.push(format!("saga {:?} expects a correlation id at `{}`", saga.spec.name, trigger.correlation))
            }
        }
    }
    if targets.is_empty() && !missing.is_empty() {
        return Err(DecodeError::BadKey(missing.join("; ")));
    }
    Ok(group(ctx, Arc::new(decoded.event), targets))
}

fn route_result(ctx: &Ctx, body: &[u8], t: &Transport) -> Result<Groups, DecodeError> {
    let (r, event) = envelope::decode_result(body, t, ctx.cfg.max_event_bytes)?;
    if !ctx.manifests.borrow().sagas.contains_key(&r.saga) {
        // Nobody would ever apply it: kept as a dead letter, like the shard does with a
        // result for an instance it does not have.
        return Err(DecodeError::UnknownSaga(r.saga));
    }
    let target = Target { saga: r.saga, correlation_id: r.correlation_id, may_start: false };
    Ok(group(ctx, Arc::new(event), vec![target]))
}

/// Waits for every shard's answer (sending in-progress meanwhile), then acks, terms or naks.
/// `on_settled` is done once every shard answered, before the message is settled.
fn settle(
    ctx: &Rc<Ctx>,
    msg: async_nats::jetstream::Message,
    replies: Vec<ReplyRx<ApplyOutcome>>,
    on_settled: Option<OnSettled>,
) {
    if let Some(OnSettled::Rerun(r)) = &on_settled {
        r.handed();
    }
    let shared = ctx.shared.clone();
    let progress_every = Duration::from_millis(ctx.cfg.ack_wait_ms / 3);
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    tokio::task::spawn_local(async move {
        let mut outcome = ApplyOutcome::Ack;
        let mut complete = true;
        for mut rx in replies {
            let answer = loop {
                tokio::select! {
                    r = &mut rx => break r,
                    _ = tokio::time::sleep(progress_every) => {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            };
            match answer {
                Ok(ApplyOutcome::Ack) => {}
                Ok(ApplyOutcome::Term { reason }) => {
                    if !matches!(outcome, ApplyOutcome::Nak { .. }) {
                        outcome = ApplyOutcome::Term { reason };
                    }
                }
                Ok(nak @ ApplyOutcome::Nak { .. }) => outcome = nak,
                // The shard went away without answering (shutdown): redelivery will do it.
                Err(_) => complete = false,
            }
        }
        if complete {
            match on_settled {
                Some(OnSettled::Forget(ledger, suspect)) => {
                    if let Err(e) = ledger.clear(&suspect).await {
                        tracing::warn!(stream = %suspect.stream, seq = suspect.seq, error = %e, "cannot clear a crash ledger entry");
                    }
                }
                Some(OnSettled::Rerun(r)) => r.settled().await,
                None => {}
            }
            let (r, label) = match outcome {
                ApplyOutcome::Ack => (msg.ack().await, "ack"),
                ApplyOutcome::Term { .. } => (msg.ack_with(AckKind::Term).await, "term"),
                ApplyOutcome::Nak { delay_ms } => {
                    (msg.ack_with(AckKind::Nak(Some(Duration::from_millis(delay_ms)))).await, "nak")
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot settle a message; it will be redelivered and skipped by the sequence gate");
            }
            metrics::counter!("runner_messages_settled_total", "outcome" => label).increment(1);
            shared.acked.fetch_add(1, Ordering::Relaxed);
        }
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}
