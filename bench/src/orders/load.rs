//! The load process of the order benchmark (`runner-bench orders-load …`): publishes
//! `OrderPlaced` to JetStream (pipelined, `Nats-Msg-Id` each) and hears of every upstream
//! and Gateway call on their notify sockets, so it knows when each order made its final call.
//!
//! - Closed loop (`--closed C`): C orders in flight; each order that finishes lets the next
//!   one go. An order's latency runs from its publish.
//! - Open loop (`--rate R`): order `i` is due at `start + i / R` and published then (at once
//!   when the publisher is late, so queueing is not hidden: no coordinated omission). An
//!   order's latency runs from its scheduled time.
//!
//! It writes every order's scheduled, published and final-call times (µs since the epoch, the
//! clock the servers stamp their calls with) and its own CPU time to `--out` as JSON. When
//! no order finishes for `--stall-secs` it writes what it has with `complete: false` and
//! exits with status 3.

use super::check::{Flow, Step, declined, finals_mask, order_id};
use crate::js::{err, now_us, order_placed};
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    #[arg(long)]
    pub nats: String,
    /// Notify sockets of the upstream and the Gateway.
    #[arg(long)]
    pub notify: Vec<PathBuf>,
    #[arg(long, value_enum)]
    pub flow: Flow,
    /// Percent of orders the upstream declines (the same hash as the upstream's).
    #[arg(long)]
    pub decline_pct: f64,
    /// Closed loop with this many orders in flight.
    #[arg(long, conflicts_with = "rate")]
    pub closed: Option<usize>,
    /// Open loop at this many orders per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Orders in all.
    #[arg(long)]
    pub orders: u64,
    /// Results (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Give up when no order finishes for this long.
    #[arg(long, default_value_t = 30.0)]
    pub stall_secs: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LoadOutput {
    /// Every published order made its final call.
    pub complete: bool,
    pub error: Option<String>,
    /// µs since the epoch: the first publish, and when the last order finished (or the load
    /// gave up).
    pub start_us: u64,
    pub end_us: u64,
    /// CPU seconds of this process between the two.
    pub cpu_s: f64,
    /// How late the open-loop publisher was at worst (µs).
    pub worst_late_us: u64,
    /// Per published order: when it was due (closed loop: its publish), when it was
    /// published, when its final call arrived (0: not yet).
    pub scheduled_us: Vec<u64>,
    pub published_us: Vec<u64>,
    pub done_us: Vec<u64>,
}

pub fn run(a: LoadArgs) -> Result<bool, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(err("tokio runtime"))?;
    let out = rt.block_on(drive(&a))?;
    let complete = out.complete;
    let bytes = serde_json::to_vec(&out).map_err(err("load results"))?;
    std::fs::write(&a.out, bytes).map_err(|e| format!("{}: {e}", a.out.display()))?;
    if let Some(e) = &out.error {
        eprintln!("orders-load: {e}");
    }
    Ok(complete)
}

/// `index step at_us` lines from one notify socket.
async fn listen(path: PathBuf, tx: mpsc::UnboundedSender<(u64, Step, u64)>) -> Result<(), String> {
    let s = tokio::net::UnixStream::connect(&path).await.map_err(|e| format!("notify {}: {e}", path.display()))?;
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(s).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut it = line.split(' ');
            let (Some(i), Some(step), Some(at)) = (it.next(), it.next(), it.next()) else { continue };
            if let (Ok(i), Some(step), Ok(at)) = (i.parse(), Step::parse(step), at.parse())
                && tx.send((i, step, at)).is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

async fn drive(a: &LoadArgs) -> Result<LoadOutput, String> {
    let rate = match (a.closed, a.rate) {
        (Some(c), None) if c > 0 => None,
        (None, Some(r)) if r > 0.0 && r.is_finite() => Some(r),
        _ => return Err("give exactly one of --closed C (C > 0) or --rate R (R > 0)".into()),
    };
    let client = async_nats::connect(a.nats.as_str()).await.map_err(err("connect to NATS"))?;
    let js = jetstream::new(client.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    for p in &a.notify {
        listen(p.clone(), tx.clone()).await?;
    }
    drop(tx);
    let n = a.orders as usize;
    let want: Vec<u8> = (0..a.orders).map(|i| finals_mask(a.flow, declined(&order_id(i), a.decline_pct))).collect();
    let mut seen = vec![0u8; n];
    let mut out = LoadOutput {
        scheduled_us: Vec::with_capacity(n),
        published_us: Vec::with_capacity(n),
        done_us: vec![0; n],
        ..LoadOutput::default()
    };
    let stall = Duration::from_secs_f64(a.stall_secs);
    let mut acks = FuturesUnordered::new();
    let (mut done, mut last_progress) = (0usize, Instant::now());
    let cpu0 = crate::cpu::process(std::process::id()).unwrap_or(0.0);
    let start = Instant::now();
    out.start_us = now_us();
    loop {
        let due = match (rate, a.closed) {
            (Some(r), _) => ((start.elapsed().as_secs_f64() * r) as usize + 1).min(n),
            (None, Some(c)) => (done + c).min(n),
            (None, None) => 0,
        };
        while out.published_us.len() < due {
            let i = out.published_us.len();
            let now = now_us();
            let scheduled = match rate {
                Some(r) => out.start_us + (i as f64 * 1e6 / r) as u64,
                None => now,
            };
            out.worst_late_us = out.worst_late_us.max(now.saturating_sub(scheduled));
            let (subject, id, body) = order_placed(i as u64);
            let ack = js
                .send_publish(subject, PublishMessage::build().payload(body).message_id(id))
                .await
                .map_err(err("publish OrderPlaced"))?;
            acks.push(ack.into_future());
            out.scheduled_us.push(scheduled);
            out.published_us.push(now);
        }
        if done == n {
            out.complete = true;
            break;
        }
        if last_progress.elapsed() > stall {
            out.error = Some(format!(
                "no order finished for {stall:?}: {done} of {} published orders finished ({n} planned); first \
                 unfinished: {:?}",
                out.published_us.len(),
                out.done_us.iter().position(|d| *d == 0).map(|i| order_id(i as u64))
            ));
            break;
        }
        let wake = match rate {
            Some(r) if out.published_us.len() < n => start + Duration::from_secs_f64(out.published_us.len() as f64 / r),
            _ => Instant::now() + Duration::from_millis(200),
        }
        .min(last_progress + stall + Duration::from_millis(1));
        tokio::select! {
            call = rx.recv() => {
                let Some((i, step, at)) = call else {
                    out.error = Some("the upstream and Gateway closed their notify sockets".into());
                    break;
                };
                let i = i as usize;
                if i >= out.published_us.len() || want[i] & step.bit() == 0 || seen[i] & step.bit() != 0 {
                    continue;
                }
                seen[i] |= step.bit();
                out.done_us[i] = out.done_us[i].max(at);
                if seen[i] == want[i] {
                    done += 1;
                    last_progress = Instant::now();
                }
            }
            Some(r) = acks.next(), if !acks.is_empty() => {
                r.map_err(err("OrderPlaced not acknowledged"))?;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    out.end_us = now_us();
    out.cpu_s = crate::cpu::process(std::process::id()).unwrap_or(0.0) - cpu0;
    for (i, d) in out.done_us.iter_mut().enumerate() {
        // A final step seen while another one is still missing is not a finish.
        if i < n && seen[i] != want[i] {
            *d = 0;
        }
    }
    while let Some(r) = acks.next().await {
        r.map_err(err("OrderPlaced not acknowledged"))?;
    }
    client.flush().await.map_err(err("flush"))?;
    Ok(out)
}
