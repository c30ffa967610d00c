//! The JetStream side of the end-to-end benchmarks: a real `nats-server` (the same child the
//! test harness starts, store on the benchmark disk), a client, stream helpers, message
//! bodies of the 256-byte class, a pipelined preloader and an open-loop publisher.

use async_nats::jetstream::{self, consumer, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::ProgressBar;
use runner::nats_server::NatsServer;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Size class of every event and of the raw baseline's messages.
pub const BODY_BYTES: usize = 256;

/// The streams any workload creates; [`Js::reset`] deletes them between runs.
const STREAMS: &[&str] = &["AGGREGATE_EVENTS", "WORKFLOW_COMMANDS", "WORKFLOW_EVENTS", "RAW_IN", "RAW_OUT"];

/// `map_err` helper: `what: error`.
pub fn err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Wall-clock microseconds since the epoch (the clock JetStream stamps messages with).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub struct Js {
    pub server: NatsServer,
    pub rt: tokio::runtime::Runtime,
    pub js: jetstream::Context,
    _dir: tempfile::TempDir,
}

impl Js {
    /// Starts nats-server with JetStream (file store under the benchmark directory).
    pub fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir_in(crate::store::bench_dir()).map_err(|e| format!("temp dir: {e}"))?;
        let server = NatsServer::start(None, &dir.path().join("nats"))
            .map_err(|e| format!("cannot start nats-server (apt-get install -y nats-server): {e}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let client = rt
            .block_on(async_nats::ConnectOptions::new().retry_on_initial_connect().connect(server.url()))
            .map_err(|e| format!("cannot connect to nats-server: {e}"))?;
        // The context spawns its PubAck task: create it inside the runtime.
        let js = rt.block_on(async { jetstream::new(client) });
        Ok(Self { server, rt, js, _dir: dir })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Deletes every stream a workload may have created (fresh sequences for the next run).
    pub fn reset(&self) {
        self.rt.block_on(async {
            for s in STREAMS {
                let _ = self.js.delete_stream(s).await;
            }
        })
    }

    /// A file-storage stream with the runner's dedupe window (120 s).
    pub fn create_stream(&self, name: &str, subjects: &[&str]) -> Result<(), String> {
        let cfg = stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.rt.block_on(self.js.get_or_create_stream(cfg)).map_err(|e| format!("cannot create stream {name}: {e}"))?;
        Ok(())
    }

    /// Messages in a stream (0 when it does not exist yet).
    pub fn count(&self, name: &str) -> u64 {
        self.rt.block_on(async {
            match self.js.get_stream(name).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            }
        })
    }

    /// Waits until `name` holds `n` messages, showing progress; errors after `timeout`
    /// without progress.
    pub fn wait_count(&self, name: &str, n: u64, stall: Duration, pb: &ProgressBar) -> Result<(), String> {
        let mut last = (0, Instant::now());
        loop {
            let c = self.count(name);
            pb.set_position(c.min(n));
            if c >= n {
                return Ok(());
            }
            if c != last.0 {
                last = (c, Instant::now());
            } else if last.1.elapsed() > stall {
                return Err(format!("{name} stalled at {c} of {n} messages for {stall:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's store time of message `seq` of `name`, in nanoseconds since the epoch.
    pub fn stored_at_ns(&self, name: &str, seq: u64) -> Result<i128, String> {
        self.rt.block_on(async {
            let s = self.js.get_stream(name).await.map_err(|e| format!("stream {name}: {e}"))?;
            let m = s.get_raw_message(seq).await.map_err(|e| format!("{name} message {seq}: {e}"))?;
            Ok(m.time.unix_timestamp_nanos())
        })
    }

    /// Steady-state rate of a stream that received `n` messages: the messages between the
    /// 5th and the 95th percentile of the sequence over the time between them (leaves out
    /// start-up and the last partial batch).
    pub fn steady_rate(&self, name: &str, n: u64) -> Result<f64, String> {
        let (a, b) = ((n / 20).max(1), (n - n / 20).max(2));
        let (ta, tb) = (self.stored_at_ns(name, a)?, self.stored_at_ns(name, b)?);
        Ok((b - a) as f64 / ((tb - ta).max(1) as f64 / 1e9))
    }

    /// Rate from the first to the last of `n` messages of `name` (nothing left out): a check
    /// that the steady rate is not a burst.
    pub fn whole_rate(&self, name: &str, n: u64) -> Result<f64, String> {
        let (ta, tb) = (self.stored_at_ns(name, 1)?, self.stored_at_ns(name, n.max(2))?);
        Ok((n.max(2) - 1) as f64 / ((tb - ta).max(1) as f64 / 1e9))
    }

    /// Every message of `name` (payload and store time in ns), read with an ephemeral
    /// consumer after a run.
    pub fn read_all(&self, name: &str, n: u64, pb: &ProgressBar) -> Result<Vec<(Bytes, i128)>, String> {
        self.rt.block_on(async {
            let s = self.js.get_stream(name).await.map_err(|e| format!("stream {name}: {e}"))?;
            let c = s
                .create_consumer(consumer::pull::Config { ack_policy: consumer::AckPolicy::None, ..Default::default() })
                .await
                .map_err(|e| format!("consumer on {name}: {e}"))?;
            let mut msgs = c.messages().await.map_err(|e| format!("reading {name}: {e}"))?;
            let mut out = Vec::with_capacity(n as usize);
            while (out.len() as u64) < n {
                let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                    .await
                    .map_err(|_| format!("reading {name}: no message for 10 s after {} of {n}", out.len()))?
                    .ok_or_else(|| format!("reading {name}: ended after {}", out.len()))?
                    .map_err(|e| format!("reading {name}: {e}"))?;
                let at = m.info().map_err(|e| format!("message info: {e}"))?.published.unix_timestamp_nanos();
                out.push((m.payload.clone(), at));
                pb.inc(1);
            }
            Ok(out)
        })
    }

    /// Publishes messages pipelined (up to 4,096 unacknowledged), each with `Nats-Msg-Id`.
    pub fn preload(
        &self,
        n: u64,
        make: impl Fn(u64) -> (String, String, Bytes),
        pb: &ProgressBar,
    ) -> Result<(), String> {
        self.rt.block_on(async {
            let mut acks = FuturesUnordered::new();
            for i in 0..n {
                let (subject, id, body) = make(i);
                let f = self
                    .js
                    .send_publish(subject, PublishMessage::build().payload(body).message_id(id))
                    .await
                    .map_err(err("preload publish"))?;
                acks.push(f.into_future());
                while acks.len() >= 4096 {
                    if let Some(r) = acks.next().await {
                        r.map_err(err("preload not acknowledged"))?;
                        pb.inc(1);
                    }
                }
            }
            while let Some(r) = acks.next().await {
                r.map_err(err("preload not acknowledged"))?;
                pb.inc(1);
            }
            Ok(())
        })
    }

    /// Open-loop load: message `i` is due at `start + i / rate` and sent then (or at once,
    /// if the publisher is late: coordinated omission would otherwise hide queueing), with
    /// its scheduled time (µs since the epoch) handed to `make` to embed. PubAcks are
    /// awaited by a separate task. Returns the scheduled start (µs since the epoch) and how
    /// late the publisher was at worst (µs). `rate` may be infinite (as fast as possible).
    pub fn open_loop(
        &self,
        rate: f64,
        count: u64,
        make: impl Fn(u64, u64) -> (String, String, Bytes),
        pb: &ProgressBar,
    ) -> Result<(u64, u64), String> {
        let (ack_tx, ack_rx) = flume::bounded::<PublishAckFuture>(1 << 16);
        let acker = self.rt.spawn(async move {
            let mut failed = 0u64;
            while let Ok(f) = ack_rx.recv_async().await {
                if f.await.is_err() {
                    failed += 1;
                }
            }
            failed
        });
        let start = Instant::now();
        let start_us = now_us();
        let mut worst_late = 0u64;
        let mut i = 0u64;
        while i < count {
            let due_now = if rate.is_finite() { (start.elapsed().as_secs_f64() * rate) as u64 + 1 } else { count };
            let upto = due_now.min(count);
            if i < upto {
                let from = i;
                let js = &self.js;
                let tx = &ack_tx;
                let make = &make;
                self.rt.block_on(async move {
                    for k in from..upto {
                        let t_us = if rate.is_finite() { start_us + (k as f64 * 1e6 / rate) as u64 } else { now_us() };
                        let (subject, id, body) = make(k, t_us);
                        let f = js
                            .send_publish(subject, PublishMessage::build().payload(body).message_id(id))
                            .await
                            .map_err(err("open-loop publish"))?;
                        tx.send_async(f).await.map_err(err("ack task"))?;
                    }
                    Ok::<_, String>(())
                })?;
                if rate.is_finite() {
                    let late = now_us().saturating_sub(start_us + (from as f64 * 1e6 / rate) as u64);
                    worst_late = worst_late.max(late);
                }
                pb.set_position(upto);
                i = upto;
            }
            if i < count && rate.is_finite() {
                let next = start + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        }
        drop(ack_tx);
        let failed = self.rt.block_on(acker).map_err(err("ack task"))?;
        if failed > 0 {
            return Err(format!("{failed} open-loop publishes were not acknowledged"));
        }
        Ok((start_us, worst_late))
    }
}

/// A JSON body padded to [`BODY_BYTES`]: `{"id":..,"type":..,"tenant_id":"bench",
/// "data":{<fields>,"pad":"xx.."}}`.
pub fn padded_event(id: &str, ty: &str, fields: &str) -> Bytes {
    let head = format!(r#"{{"id":"{id}","type":"{ty}","tenant_id":"bench","data":{{{fields},"pad":""#);
    let tail = r#""}}"#;
    let pad = BODY_BYTES.saturating_sub(head.len() + tail.len());
    let mut s = String::with_capacity(BODY_BYTES);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str(tail);
    Bytes::from(s)
}

/// Event `i` of the saga-step workload (unique key `k-i`, scheduled time `t` in µs).
pub fn step_event(i: u64, t_us: u64) -> (String, Bytes) {
    (format!("ev-{i}"), padded_event(&format!("ev-{i}"), "Step", &format!(r#""k":"k-{i}","t":{t_us}"#)))
}

/// `OrderPlaced` of order `i` of the order workflow.
pub fn order_placed(i: u64) -> (String, String, Bytes) {
    let id = format!("placed-order-{i}");
    let fields = format!(
        r#""order_id":"order-{i}","sku":"sku-{}","qty":{},"amount":{},"customer":"cust-{}""#,
        i % 100,
        1 + i % 3,
        10 + i % 90,
        i % 1000
    );
    ("events.bench.order.OrderPlaced".into(), id.clone(), padded_event(&id, "OrderPlaced", &fields))
}

/// Resident memory of a process, from `/proc/<pid>/status` (KiB).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rss {
    pub vm_rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub vm_hwm_kib: u64,
}

pub fn rss(pid: Option<u32>) -> Rss {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Rss {
        vm_rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        rss_file_kib: field("RssFile:"),
        vm_hwm_kib: field("VmHWM:"),
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_256_bytes_and_json() {
        let (_, b) = step_event(123_456, 1_700_000_000_000_000);
        assert_eq!(b.len(), BODY_BYTES);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["data"]["t"], 1_700_000_000_000_000u64);
        let (_, _, b) = order_placed(99_999);
        assert_eq!(b.len(), BODY_BYTES);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["data"]["order_id"], "order-99999");
    }
}
