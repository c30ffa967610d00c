//! The NATS bridge: one thread running a single-threaded tokio runtime that owns the NATS
//! connection and does NATS only — pull consumers, publishes, acks, the effect fleet's
//! consumer, NATS requests for the shards. HTTP effect and Gateway calls run on the owning
//! shard's executor, the operations server on its own thread (ARCHITECTURE.md, "Threads").
//! Shards get requests from here and hand back outbox items to publish.
//!
//! Files: [`streams`] stream and consumer setup; [`ingest`] consumers → shards → acks;
//! [`screen`] messages the client cannot parse; [`dispatch`] outbox items → JetStream /
//! Gateway → confirmations. Messages the process died with are counted in
//! [`crate::crashes`]. What the bridge's tasks share is in [`crate::context`].

pub mod dispatch;
pub mod ingest;
pub mod screen;
pub mod streams;

use crate::context::{BridgeShared, Ctx};
use crate::effects::EffectsRuntime;
use crate::ops::Ops;
use shards::manifest::ManifestSet;
use shards::message::DispatchRequest;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// The running bridge, as seen from the main thread.
pub struct Bridge {
    thread: Option<std::thread::JoinHandle<()>>,
    ops: Arc<Ops>,
    shutdown: watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot connect to NATS at {url} within {ms} ms: {why}")]
    Connect { url: String, ms: u64, why: String },
    #[error("cannot set up JetStream streams or consumers: {0}")]
    Setup(String),
    #[error("the bridge thread ended during start")]
    Lost,
}

/// The receiving ends the bridge needs (made with the [`Ops`] that holds the senders).
pub struct BridgeInputs {
    pub dispatch: flume::Receiver<DispatchRequest>,
    pub stop_pulling: watch::Receiver<bool>,
    pub manifests: flume::Receiver<Arc<ManifestSet>>,
    /// NATS requests the shards' effect providers ask the bridge to send.
    pub nats_calls: flume::Receiver<crate::effects::provider::NatsCall>,
}

impl Bridge {
    /// Starts the bridge thread, connects, creates streams and consumers, serves the
    /// operations endpoints. Returns once everything is bound (or why not).
    pub fn start(
        ops: Arc<Ops>,
        url: String,
        manifests: Arc<ManifestSet>,
        inputs: BridgeInputs,
        cpus: Vec<usize>,
    ) -> Result<Self, BridgeError> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), BridgeError>>();
        let ops2 = ops.clone();
        let thread = shards::cpus::spawn_on("bridge", cpus, move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(BridgeError::Setup(format!("tokio runtime: {e}"))));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let BridgeInputs { dispatch, stop_pulling, manifests: manifests_rx, nats_calls } = inputs;
                let (ctx, effects) = match setup(ops2.clone(), url, manifests, stop_pulling).await {
                    Ok((ctx, effects)) => (Rc::new(ctx), effects.map(Rc::new)),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ops2.js.set(ctx.js.clone());
                run(ctx, effects, dispatch, nats_calls, manifests_rx, shutdown_rx, ready_tx).await;
            });
        })
        .map_err(|e| BridgeError::Setup(format!("cannot start the bridge thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { thread: Some(thread), ops, shutdown: shutdown_tx }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(BridgeError::Lost)
            }
        }
    }

    pub fn shared(&self) -> &Arc<BridgeShared> {
        &self.ops.bridge
    }

    /// Ends the bridge: flushes the connection, joins the thread. Call after the shards
    /// stopped (their relays hold the dispatch channel open until then).
    pub fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects and creates the streams; the effect workers' runtime when this mode runs them.
async fn setup(
    ops: Arc<Ops>,
    url: String,
    manifests: Arc<ManifestSet>,
    stop_pulling: watch::Receiver<bool>,
) -> Result<(Ctx, Option<EffectsRuntime>), BridgeError> {
    let cfg = ops.cfg.clone();
    let shards = ops.shards.clone();
    let router = ops.router;
    let shared = ops.bridge.clone();
    let connect_ms = cfg.connect_timeout_ms;
    let shared_events = shared.clone();
    let options = async_nats::ConnectOptions::new()
        .name("runner")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let shared = shared_events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        shared.connected.store(true, Ordering::SeqCst);
                        shared.connections.fetch_add(1, Ordering::SeqCst);
                        tracing::info!("nats connected");
                    }
                    async_nats::Event::Disconnected => {
                        shared.connected.store(false, Ordering::SeqCst);
                        tracing::warn!("nats disconnected; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }
        });
    let client = tokio::time::timeout(Duration::from_millis(connect_ms), async {
        let client = options.connect(url.as_str()).await?;
        // retry_on_initial_connect returns at once; wait until it is really up.
        while client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, async_nats::ConnectError>(client)
    })
    .await
    .map_err(|_| BridgeError::Connect { url: url.clone(), ms: connect_ms, why: "timed out".into() })?
    .map_err(|e| BridgeError::Connect { url: url.clone(), ms: connect_ms, why: e.to_string() })?;
    shared.connected.store(true, Ordering::SeqCst);
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_millis(cfg.publish_timeout_ms))
        .max_ack_inflight(cfg.relay.max_in_flight * shards.len() + cfg.effect_concurrency * 2 + 1_024)
        .backpressure_on_inflight(true)
        .build(client.clone());
    if cfg.create_streams {
        streams::ensure_streams(&js, &cfg).await.map_err(|e| BridgeError::Setup(e.to_string()))?;
    }
    let effects = cfg.mode.runs_effects().then(|| EffectsRuntime::new(&cfg));
    let crashes = if cfg.mode.runs_sagas() && cfg.max_crashes > 0 {
        let consumers: Vec<String> = cfg
            .aggregate_filters
            .iter()
            .map(|f| crate::config::durable_name(&cfg.durable_prefix, ingest::Kind::Aggregate.label(), f))
            .chain(
                cfg.result_filters
                    .iter()
                    .map(|f| crate::config::durable_name(&cfg.durable_prefix, ingest::Kind::Results.label(), f)),
            )
            .collect();
        let path = cfg.data_dir.join(crate::crashes::LEDGER_FILE);
        Some(Rc::new(
            crate::crashes::CrashLedger::open(&path, &consumers).map_err(|e| BridgeError::Setup(e.to_string()))?,
        ))
    } else {
        None
    };
    tracing::info!(url = %url, "bridge connected");
    let ctx = Ctx {
        cfg,
        client,
        js,
        shards,
        router,
        manifests: RefCell::new(manifests),
        shared,
        stop_pulling,
        crashes,
        lane: tokio::sync::Mutex::new(()),
    };
    Ok((ctx, effects))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: Rc<Ctx>,
    effects: Option<Rc<EffectsRuntime>>,
    dispatch_rx: flume::Receiver<DispatchRequest>,
    nats_calls_rx: flume::Receiver<crate::effects::provider::NatsCall>,
    manifests_rx: flume::Receiver<Arc<ManifestSet>>,
    mut shutdown: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), BridgeError>>,
) {
    // Bind consumers before reporting ready, so a bad setup fails the start.
    let mut bound = Vec::new();
    let cfg = &ctx.cfg;
    let mut roles: Vec<(String, ingest::Kind, String)> = Vec::new();
    if cfg.mode.runs_sagas() {
        for f in &cfg.aggregate_filters {
            roles.push((cfg.aggregate_stream.clone(), ingest::Kind::Aggregate, f.clone()));
        }
        for f in &cfg.result_filters {
            roles.push((cfg.events_stream.clone(), ingest::Kind::Results, f.clone()));
        }
    }
    if cfg.mode.runs_effects() {
        for f in &cfg.command_filters {
            roles.push((cfg.commands_stream.clone(), ingest::Kind::Effects, f.clone()));
        }
    }
    for (stream, kind, filter) in roles {
        match streams::bind(&ctx.js, cfg, &stream, kind.label(), &filter).await {
            Ok((c, unsettled)) => bound.push((stream, kind, filter, c, unsettled)),
            Err(e) => {
                let _ = ready.send(Err(BridgeError::Setup(format!("consumer for {filter} on {stream}: {e}"))));
                return;
            }
        }
    }
    ctx.shared.pulling.store(true, Ordering::SeqCst);
    let dispatcher = tokio::task::spawn_local(dispatch::run(ctx.clone(), dispatch_rx));
    let mut consumers = Vec::new();
    // Every consumer that feeds the sagas has a mark before any starts (see `ingest::Marks`).
    let feeding = bound.iter().filter(|(_, kind, ..)| *kind != ingest::Kind::Effects).count();
    let marks = ingest::Marks::new(feeding, ctx.shared.stream_watermark.clone());
    let mut slot = 0;
    // What a resume after a drain binds again: each consumer with its mark slot.
    let mut rebind = Vec::new();
    for (stream, kind, filter, consumer, unsettled) in bound {
        let mark = (kind != ingest::Kind::Effects).then(|| {
            slot += 1;
            (marks.clone(), slot - 1)
        });
        rebind.push((kind, stream.clone(), filter.clone(), mark.clone()));
        let effects = effects.clone();
        consumers.push(tokio::task::spawn_local(ingest::consume(
            ctx.clone(),
            kind,
            stream,
            filter,
            consumer,
            effects,
            mark,
            unsettled,
        )));
    }
    let reload_ctx = ctx.clone();
    let reloader = tokio::task::spawn_local(async move {
        // Providers live on the shards, which reload their own.
        while let Ok(set) = manifests_rx.recv_async().await {
            *reload_ctx.manifests.borrow_mut() = set;
        }
    });
    let nats_calls =
        tokio::task::spawn_local(crate::effects::provider::serve_nats_calls(ctx.client.clone(), nats_calls_rx));
    let _ = ready.send(Ok(()));
    // Until shutdown: a drain stops the consumers (they see `stop_pulling`); a resume
    // (`stop_pulling` back to false) binds them again, at their ack floors.
    let mut pulls = ctx.stop_pulling.clone();
    loop {
        let resumed = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            changed = pulls.changed() => changed.is_ok() && !*pulls.borrow_and_update(),
        };
        if pulls.has_changed().is_err() {
            // Nobody can resume any more: wait for the shutdown.
            let _ = shutdown.wait_for(|s| *s).await;
            break;
        }
        if resumed {
            for c in consumers.drain(..) {
                // Each ended when the drain began; wait for the last of its work.
                let _ = c.await;
            }
            for (kind, stream, filter, mark) in &rebind {
                let consumer = loop {
                    match streams::bind(&ctx.js, cfg, stream, kind.label(), filter).await {
                        Ok((c, _)) => break Some(c),
                        Err(e) => {
                            tracing::warn!(stream = %stream, filter = %filter, error = %e, "cannot bind the consumer again after a resume; retrying");
                            if *shutdown.borrow() || *pulls.borrow() {
                                break None;
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                };
                let Some(consumer) = consumer else { continue };
                consumers.push(tokio::task::spawn_local(ingest::consume(
                    ctx.clone(),
                    *kind,
                    stream.clone(),
                    filter.clone(),
                    consumer,
                    effects.clone(),
                    mark.clone(),
                    Default::default(),
                )));
            }
            ctx.shared.pulling.store(true, Ordering::SeqCst);
            tracing::info!(consumers = consumers.len(), "resumed: consumers bound again, pulling");
        }
    }
    for c in consumers {
        c.abort();
    }
    reloader.abort();
    nats_calls.abort();
    // The dispatcher ends when every shard relay dropped its sender (the shards stopped);
    // give it a moment to forward the last confirmations, then close.
    let _ = tokio::time::timeout(Duration::from_secs(5), dispatcher).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ctx.client.flush()).await;
    tracing::info!("bridge stopped");
}
