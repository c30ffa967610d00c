//! The raw JetStream step, no project code: what one saga step does on the wire. A durable
//! pull consumer fetches a message; for each, one message is published with a PubAck and a
//! unique `Nats-Msg-Id` (pipelined: up to `window` steps in flight), and once that PubAck
//! arrives the fetched message is acked. One current-thread tokio runtime on its own thread
//! and its own connection, like the runner's bridge.

use crate::cpu::Snapshot;
use crate::js::{Js, err, step_event};
use async_nats::jetstream::{self, consumer, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::ProgressBar;
use std::time::Duration;

pub const IN_SUBJECT: &str = "raw.in.bench.step";

/// Creates `RAW_IN` and `RAW_OUT` (file storage, 120 s dedupe window like the runner's).
pub fn create_streams(js: &Js) -> Result<(), String> {
    js.create_stream("RAW_IN", &["raw.in.>"])?;
    js.create_stream("RAW_OUT", &["raw.out.>"])
}

/// The in-flight limits the runner runs with by default, used for the raw loop as well.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Steps in flight (the relay's `max_in_flight_per_tenant`, 256).
    pub steps: usize,
    /// Messages per pull request (`consumers.batch`, 256).
    pub batch: usize,
    /// Unacked messages the server delivers (`consumers.max_ack_pending`, 4,096).
    pub max_ack_pending: i64,
}

impl Default for Window {
    fn default() -> Self {
        Self { steps: 256, batch: 256, max_ack_pending: 4096 }
    }
}

/// Runs the raw step loop on its own thread until `total` steps are done; the thread
/// returns the CPU seconds it used.
pub fn spawn(url: String, total: u64, window: Window, pb: ProgressBar) -> std::thread::JoinHandle<Result<f64, String>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(step_loop(url, total, window, pb))?;
        Ok(crate::cpu::this_thread())
    })
}

async fn step_loop(url: String, total: u64, window: Window, pb: ProgressBar) -> Result<(), String> {
    let client = async_nats::connect(url).await.map_err(err("raw: connect"))?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("RAW_IN").await.map_err(err("raw: RAW_IN"))?;
    let consumer = stream
        .get_or_create_consumer(
            "raw",
            consumer::pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: window.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(err("raw: consumer"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(window.batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(err("raw: pull"))?;
    let mut in_flight = FuturesUnordered::new();
    let mut done = 0u64;
    while done < total {
        tokio::select! {
            m = messages.next(), if in_flight.len() < window.steps => {
                let m = m.ok_or("raw: message stream ended")?.map_err(err("raw: pull"))?;
                let seq = m.info().map_err(err("raw: message info"))?.stream_sequence;
                // The output carries the input's body (same size class, and its timestamp).
                let publish = PublishMessage::build().payload(m.payload.clone()).message_id(format!("out-{seq}"));
                let ack = js.send_publish("raw.out.bench.e", publish).await.map_err(err("raw: publish"))?;
                in_flight.push(async move {
                    ack.await.map_err(err("raw: PubAck"))?;
                    m.ack().await.map_err(|e| format!("raw: ack: {e}"))
                });
            }
            r = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(r) = r {
                    r?;
                    done += 1;
                    if done.is_multiple_of(1024) {
                        pb.set_position(done);
                    }
                }
            }
        }
    }
    pb.set_position(done);
    client.flush().await.map_err(err("raw: flush"))?;
    Ok(())
}

/// Raw step throughput: `n` messages preloaded into `RAW_IN`, then the loop drains them.
/// Returns steps/s from the first output to the last (see [`Js::whole_rate`]) and the CPU used.
pub fn throughput(js: &Js, n: u64, window: Window) -> Result<(f64, Snapshot), String> {
    js.reset();
    create_streams(js)?;
    let pb = crate::progress::bar(n, "raw JetStream step: preload");
    js.preload(
        n,
        |i| {
            let (id, body) = step_event(i, 0);
            (IN_SUBJECT.into(), id, body)
        },
        &pb,
    )?;
    pb.finish_and_clear();
    let pb = crate::progress::bar(n, "raw JetStream step: run");
    let before = Snapshot::take(js.server.pid());
    let loop_cpu =
        spawn(js.url(), n, window, pb.clone()).join().map_err(|_| "raw step loop panicked".to_string())??;
    let mut cpu = Snapshot::take(js.server.pid()).since(&before);
    cpu.0.insert("raw-loop".into(), loop_cpu);
    pb.finish_and_clear();
    // Every step done: one output each, every input acked. An ack is a plain publish that the
    // server applies after the loop has seen it go out: wait (bounded) for the ack floor.
    let out = js.count("RAW_OUT");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let acked = loop {
        let acked = js.rt.block_on(async {
            let s = js.js.get_stream("RAW_IN").await.map_err(err("RAW_IN"))?;
            let info = s.consumer_info("raw").await.map_err(err("raw consumer"))?;
            Ok::<_, String>((info.ack_floor.stream_sequence, info.num_ack_pending))
        })?;
        if acked == (n, 0) || std::time::Instant::now() >= deadline {
            break acked;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if out != n || acked != (n, 0) {
        return Err(format!("raw step: {out} outputs, ack floor {} with {} pending, for {n} inputs", acked.0, acked.1));
    }
    Ok((js.whole_rate("RAW_OUT", n)?, cpu))
}
