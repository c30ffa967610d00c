//! The saga step end to end, against the raw JetStream step in the same run.
//!
//! A saga `step` whose program turns each aggregate event into one effect command runs in
//! `saga` mode (nobody consumes `WORKFLOW_COMMANDS`): event consumed → transition committed
//! (fsync group commit) → command published and confirmed (PubAck) → event acked.
//!
//! - Throughput: `n` events preloaded into `AGGREGATE_EVENTS`, then the runner starts and
//!   drains them; steps/s from the first command to the last, by the server's store times
//!   (nothing left out: a 5th–95th percentile window overstated it when dispatch lagged the
//!   applies and caught up in a burst). The raw loop drains the same number the same way.
//! - Latency: open loop at a fixed rate (a share of the measured peak); each event carries
//!   its scheduled publish time, the program copies it into the command, and the latency is
//!   the command's store time on the server (when its PubAck is sent) minus that time.

use crate::cpu::Snapshot;
use crate::js::{Js, err, now_us, step_event};
use crate::plot::{self, Series};
use crate::raw::{self, Window};
use crate::report::{Report, fmt_ms, fmt_rate, pct};
use hdrhistogram::Histogram;
use runner::app::{App, AppOptions};
use runner::config::{Config, Mode};
use shards::store::Durability;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const PROGRAM: &str = r#"// One effect command per event, carrying the event's scheduled publish time.
fn on_event(state, event) {
    #{ state: #{ n: 1 }, work: [ #{ effect: "e", payload: #{ t: event.data.t, k: event.data.k } } ] }
}
"#;

const MANIFEST: &str = r#"sagas:
  - name: step
    program: step.rhai
    triggers:
      - { stream: AGGREGATE_EVENTS, subject: "events.*.step.>", correlation: data.k, may_start: true }
effects:
  - { name: e, provider: noop }
"#;

pub const SUBJECT: &str = "events.bench.step.Step";

#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// Events per throughput run (preloaded, then drained).
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Throughput rounds, alternating raw and runner; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Shards of the runner (default: the CPUs available).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Pin each shard to a core (the runner's production setting).
    #[arg(long)]
    pub pin: bool,
    /// Seconds per open-loop latency run (0: throughput only).
    #[arg(long, default_value_t = 10.0)]
    pub latency_secs: f64,
    /// Offered load of the latency runs, in percent of the runner's measured peak.
    #[arg(long, value_delimiter = ',', default_values_t = vec![25.0, 50.0])]
    pub loads: Vec<f64>,
    /// Fixed offered loads (events/s) for the latency runs instead of `--loads`.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Durability mode of the shard stores.
    #[arg(long, default_value = "fsync")]
    pub durability: String,
}

/// Writes the step saga's manifest and program into `dir`.
pub fn manifest(dir: &Path) -> Result<PathBuf, String> {
    std::fs::write(dir.join("step.rhai"), PROGRAM).map_err(err("writing step.rhai"))?;
    let m = dir.join("step.yaml");
    std::fs::write(&m, MANIFEST).map_err(err("writing step.yaml"))?;
    Ok(m)
}

/// A runner config on the benchmark's server, with its data under `data`.
pub fn config(js: &Js, data: &Path, mode: Mode, shards: usize, pin: bool, durability: Durability) -> Config {
    let mut c = Config::defaults();
    c.mode = mode;
    c.nats_url = Some(js.url());
    c.data_dir = data.to_owned();
    c.shards = shards;
    c.pin_cores = pin;
    c.durability = durability;
    c.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    c.saga_manifests = vec![];
    c.effect_manifests = vec![];
    // Diagnostic knobs (not set by any documented run): the relay's in-memory window and its
    // in-flight limit per tenant.
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    if let Some(w) = env("RUNNER_BENCH_RELAY_WINDOW") {
        c.relay.window = w;
    }
    if let Some(n) = env("RUNNER_BENCH_RELAY_IN_FLIGHT") {
        c.relay.max_in_flight_per_tenant = n;
        c.relay.max_in_flight = c.relay.max_in_flight.max(n);
    }
    c
}

/// The step saga's runner: config for `shards`, fresh data directory.
pub struct StepRunner {
    pub dir: tempfile::TempDir,
    pub manifest: PathBuf,
}

impl StepRunner {
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::tempdir_in(crate::store::bench_dir()).map_err(err("temp dir"))?;
        let manifest = manifest(dir.path())?;
        Ok(Self { dir, manifest })
    }

    pub fn start(&self, js: &Js, run: &str, shards: usize, pin: bool, durability: Durability) -> Result<App, String> {
        let mut cfg = config(js, &self.dir.path().join(run), Mode::Saga, shards, pin, durability);
        cfg.saga_manifests = vec![self.manifest.clone()];
        App::start(cfg, AppOptions::default()).map_err(|e| format!("runner does not start: {e:#}"))
    }
}

/// Requests per commit averaged over the shards (the group-commit batch).
pub fn avg_batch(app: &App) -> f64 {
    let (mut requests, mut commits) = (0u64, 0u64);
    for h in app.runtime().handles() {
        requests += h.health.requests.load(Ordering::Relaxed);
        commits += h.health.commits.load(Ordering::Relaxed);
    }
    requests as f64 / commits.max(1) as f64
}

/// Waits until the runner acked `n` messages (after its commands are all stored).
pub fn wait_acked(app: &App, n: u64, stall: Duration) -> Result<(), String> {
    let mut last = (0, Instant::now());
    loop {
        let a = app.bridge().shared().acked.load(Ordering::Relaxed);
        if a >= n {
            return Ok(());
        }
        if a != last.0 {
            last = (a, Instant::now());
        } else if last.1.elapsed() > stall {
            return Err(format!("the runner stalled at {a} of {n} acks"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With `RUNNER_BENCH_METRICS=DIR`, writes the runner's Prometheus text (cumulative over
/// the process) after a run into `DIR/<label>.prom`: a diagnostic aid.
pub fn dump_metrics(app: &App, label: &str) {
    if let Some(dir) = std::env::var_os("RUNNER_BENCH_METRICS") {
        let dir = PathBuf::from(dir);
        let name: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let text = match app.ops().metrics() {
            Ok(text) => text,
            Err(e) => {
                eprintln!("cannot render metrics: {}", e.reason);
                return;
            }
        };
        let _ = std::fs::create_dir_all(&dir);
        if let Err(e) = std::fs::write(dir.join(format!("{name}.prom")), text) {
            eprintln!("cannot write metrics: {e}");
        }
    }
}

pub fn wait_ready(app: &App) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.ops().ready().0 {
        if Instant::now() > deadline {
            return Err(format!("runner not ready after 20 s: {}", app.ops().ready().1));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub struct StepRun {
    /// First to last command, nothing left out.
    pub rate: f64,
    /// Between the 5th and the 95th percentile of the commands (bursty when dispatch lags).
    pub steady: f64,
    pub avg_batch: f64,
    /// CPU used during the drain, by thread group and nats-server.
    pub cpu: Snapshot,
}

/// Saga-step throughput: `n` events preloaded, then the runner drains them.
pub fn throughput(js: &Js, r: &StepRunner, n: u64, shards: usize, pin: bool, d: Durability) -> Result<StepRun, String> {
    js.reset();
    js.create_stream("AGGREGATE_EVENTS", &["events.>"])?;
    let pb = crate::progress::bar(n, &format!("saga step ({shards} shards): preload"));
    js.preload(
        n,
        |i| {
            let (id, body) = step_event(i, 0);
            (SUBJECT.into(), id, body)
        },
        &pb,
    )?;
    pb.finish_and_clear();
    let pb = crate::progress::bar(n, &format!("saga step ({shards} shards, {d:?}): run"));
    let before = Snapshot::take(js.server.pid());
    let app = r.start(js, &format!("tp-{}", now_us()), shards, pin, d)?;
    let res = js
        .wait_count("WORKFLOW_COMMANDS", n, Duration::from_secs(30), &pb)
        .and_then(|_| wait_acked(&app, n, Duration::from_secs(30)));
    let cpu = Snapshot::take(js.server.pid()).since(&before);
    let batch = avg_batch(&app);
    app.shutdown();
    pb.finish_and_clear();
    res?;
    Ok(StepRun {
        rate: js.whole_rate("WORKFLOW_COMMANDS", n)?,
        steady: js.steady_rate("WORKFLOW_COMMANDS", n)?,
        avg_batch: batch,
        cpu,
    })
}

/// Latencies in µs, with what the plots need.
pub struct Latency {
    pub label: String,
    pub offered: f64,
    pub achieved: f64,
    pub hist: Histogram<u64>,
    pub publisher_late_us: u64,
    /// CPU µs per message while the run was under load, by thread group and nats-server.
    pub cpu: Option<serde_json::Value>,
    /// The same as text (`group µs, ...`).
    pub cpu_text: String,
}

impl Latency {
    pub fn new(label: String, offered: f64) -> Result<Self, String> {
        Ok(Self {
            label,
            offered,
            achieved: 0.0,
            hist: Histogram::new(3).map_err(err("histogram"))?,
            publisher_late_us: 0,
            cpu: None,
            cpu_text: String::new(),
        })
    }

    pub fn q(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    pub fn cells(&self) -> Vec<String> {
        vec![fmt_ms(self.q(0.5)), fmt_ms(self.q(0.99)), fmt_ms(self.q(0.999)), fmt_ms(self.hist.max())]
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label, "offered_per_s": self.offered, "achieved_per_s": self.achieved,
            "count": self.hist.len(), "p50_us": self.q(0.5), "p90_us": self.q(0.9), "p99_us": self.q(0.99),
            "p999_us": self.q(0.999), "max_us": self.hist.max(), "publisher_late_max_us": self.publisher_late_us, "cpu_us_per_message": self.cpu,
            "percentiles": plot::percentile_points(&self.hist),
        })
    }

    /// Records `(scheduled µs, stored ns)` pairs, leaving out those scheduled in the warm-up.
    fn record(&mut self, pairs: impl Iterator<Item = (u64, i128)>, warm_until_us: u64) -> Result<(), String> {
        let (mut first, mut last, mut n) = (i128::MAX, 0i128, 0u64);
        for (t_us, stored_ns) in pairs {
            if t_us < warm_until_us {
                continue;
            }
            let lat = (stored_ns / 1000 - t_us as i128).max(0) as u64;
            self.hist.record(lat.max(1)).map_err(err("histogram"))?;
            first = first.min(stored_ns);
            last = last.max(stored_ns);
            n += 1;
        }
        if n < 2 {
            return Err(format!("{}: no messages after the warm-up", self.label));
        }
        self.achieved = n as f64 / ((last - first).max(1) as f64 / 1e9);
        Ok(())
    }
}

fn json_u64(body: &[u8], pointer: &str) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(err("message is not JSON"))?;
    v.pointer(pointer).and_then(|t| t.as_u64()).ok_or_else(|| format!("message without {pointer}"))
}

/// Open-loop saga-step latency at `rate` events/s for `secs` (the first `warm` s left out).
#[allow(clippy::too_many_arguments)]
pub fn latency(
    js: &Js,
    r: &StepRunner,
    label: String,
    rate: f64,
    secs: f64,
    warm: f64,
    shards: usize,
    pin: bool,
    d: Durability,
) -> Result<Latency, String> {
    js.reset();
    js.create_stream("AGGREGATE_EVENTS", &["events.>"])?;
    let app = r.start(js, &format!("lat-{}", now_us()), shards, pin, d)?;
    wait_ready(&app)?;
    let count = ((rate * (secs + warm)) as u64).max(10);
    let before = Snapshot::take(js.server.pid());
    let pb = crate::progress::bar(count, &format!("{label}: publish"));
    let res = js.open_loop(
        rate,
        count,
        |i, t| {
            let (id, body) = step_event(i, t);
            (SUBJECT.into(), id, body)
        },
        &pb,
    );
    pb.finish_and_clear();
    let pb = crate::progress::bar(count, &format!("{label}: finish"));
    let res = res.and_then(|s| {
        js.wait_count("WORKFLOW_COMMANDS", count, Duration::from_secs(30), &pb)?;
        Ok(s)
    });
    let cpu = Snapshot::take(js.server.pid()).since(&before);
    pb.finish_and_clear();
    dump_metrics(&app, &label);
    app.shutdown();
    let (start_us, late) = res?;
    let pb = crate::progress::bar(count, &format!("{label}: read back"));
    let msgs = js.read_all("WORKFLOW_COMMANDS", count, &pb)?;
    pb.finish_and_clear();
    let mut lat = Latency::new(label, rate)?;
    lat.publisher_late_us = late;
    lat.cpu = Some(cpu.json(count));
    lat.cpu_text = format!("{} (total {:.1})", cpu.per_step(count), cpu.total() * 1e6 / count as f64);
    let pairs =
        msgs.iter().map(|(b, at)| json_u64(b, "/payload/t").map(|t| (t, *at))).collect::<Result<Vec<_>, _>>()?;
    lat.record(pairs.into_iter(), start_us + (warm * 1e6) as u64)?;
    Ok(lat)
}

/// The same open-loop run against the raw step loop.
pub fn raw_latency(js: &Js, label: String, rate: f64, secs: f64, warm: f64, w: Window) -> Result<Latency, String> {
    js.reset();
    raw::create_streams(js)?;
    let count = ((rate * (secs + warm)) as u64).max(10);
    let before = Snapshot::take(js.server.pid());
    let stepper = raw::spawn(js.url(), count, w, indicatif::ProgressBar::hidden());
    let pb = crate::progress::bar(count, &format!("{label}: publish"));
    let res = js.open_loop(
        rate,
        count,
        |i, t| {
            let (id, body) = step_event(i, t);
            (raw::IN_SUBJECT.into(), id, body)
        },
        &pb,
    );
    pb.finish_and_clear();
    let joined = stepper.join().map_err(|_| "raw step loop panicked".to_string())?;
    let mut cpu = Snapshot::take(js.server.pid()).since(&before);
    let (start_us, late) = res?;
    cpu.0.insert("raw-loop".into(), joined?);
    let pb = crate::progress::bar(count, &format!("{label}: read back"));
    let msgs = js.read_all("RAW_OUT", count, &pb)?;
    pb.finish_and_clear();
    let mut lat = Latency::new(label, rate)?;
    lat.publisher_late_us = late;
    lat.cpu = Some(cpu.json(count));
    lat.cpu_text = format!("{} (total {:.1})", cpu.per_step(count), cpu.total() * 1e6 / count as f64);
    let pairs = msgs.iter().map(|(b, at)| json_u64(b, "/data/t").map(|t| (t, *at))).collect::<Result<Vec<_>, _>>()?;
    lat.record(pairs.into_iter(), start_us + (warm * 1e6) as u64)?;
    Ok(lat)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(args: Args, quick: bool, out: Option<&Path>) -> Result<Report, String> {
    let durability = crate::pipeline::parse_durability(&args.durability)?;
    let shards = args.shards.unwrap_or_else(shards::runtime::default_shards);
    let (n, rounds, secs, warm) =
        if quick { (3_000, 1, 0.5, 0.2) } else { (args.events, args.rounds.max(1), args.latency_secs, 1.0) };
    let js = Js::start()?;
    let r = StepRunner::new()?;
    let w = Window::default();
    let mut report = Report::new(
        "Saga step",
        &["case", "shards", "offered /s", "steps/s", "vs raw", "avg batch", "p50 ms", "p99 ms", "p99.9 ms", "max ms"],
    );
    let (mut raws, mut steps, mut batches, mut steadies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raw_cpu, mut step_cpu) = (Snapshot::default(), Snapshot::default());
    for round in 0..rounds {
        // Alternate which goes first, so neither always gets the warmer disk cache.
        let mut do_raw = || -> Result<(), String> {
            let (rate, cpu) = raw::throughput(&js, n, w)?;
            raws.push(rate);
            raw_cpu = cpu;
            Ok(())
        };
        if round % 2 == 0 {
            do_raw()?;
        }
        let s = throughput(&js, &r, n, shards, args.pin, durability)?;
        steps.push(s.rate);
        steadies.push(s.steady);
        batches.push(s.avg_batch);
        step_cpu = s.cpu;
        if round % 2 == 1 {
            do_raw()?;
        }
    }
    let (raw_rate, step_rate) = (median(raws.clone()), median(steps.clone()));
    let ratio = step_rate / raw_rate;
    let dash = || "-".to_string();
    report.row(vec![
        "raw JetStream step (throughput)".into(),
        dash(),
        dash(),
        fmt_rate(raw_rate),
        "100%".into(),
        dash(),
        dash(),
        dash(),
        dash(),
        dash(),
    ]);
    report.row(vec![
        format!("saga step (throughput, {})", args.durability),
        shards.to_string(),
        dash(),
        fmt_rate(step_rate),
        pct(ratio),
        format!("{:.0}", median(batches)),
        dash(),
        dash(),
        dash(),
        dash(),
    ]);
    report.notes.push(format!(
        "Saga step between the 5th and the 95th percentile of its commands (median): {}/s — higher than from first \
         to last when the relay's dispatch lags the applies and then catches up in a burst.",
        fmt_rate(median(steadies.clone()))
    ));
    report.notes.push(format!(
        "CPU µs per step during the drain (last round; by thread, and nats-server): raw loop: {} (total {:.1}); \
         runner: {} (total {:.1}).",
        raw_cpu.per_step(n),
        raw_cpu.total() * 1e6 / n as f64,
        step_cpu.per_step(n),
        step_cpu.total() * 1e6 / n as f64
    ));
    let mut lats = Vec::new();
    let levels: Vec<(f64, String)> = if args.latency_secs <= 0.0 && !quick {
        Vec::new()
    } else if args.rates.is_empty() {
        args.loads.iter().map(|l| ((step_rate * l / 100.0).max(50.0), format!("{l:.0}% of peak"))).collect()
    } else {
        args.rates.iter().map(|r| (*r, format!("{}/s", fmt_rate(*r)))).collect()
    };
    for (rate, level) in levels {
        let l = raw_latency(&js, format!("raw step at {level}"), rate, secs, warm, w)?;
        let mut row = vec![l.label.clone(), dash(), fmt_rate(rate), fmt_rate(l.achieved), dash(), dash()];
        row.extend(l.cells());
        report.row(row);
        lats.push(l);
        let l = latency(&js, &r, format!("saga step at {level}"), rate, secs, warm, shards, args.pin, durability)?;
        let mut row = vec![l.label.clone(), shards.to_string(), fmt_rate(rate), fmt_rate(l.achieved), dash(), dash()];
        row.extend(l.cells());
        report.row(row);
        lats.push(l);
    }
    report.notes.push(format!(
        "CPU µs per message under the open-loop load (by thread, and nats-server; runner-bench is the publisher, \
         tokio-rt-worker its PubAck task): {}.",
        lats.iter().map(|l| format!("{}: {}", l.label, l.cpu_text)).collect::<Vec<_>>().join("; ")
    ));
    report.notes.push(format!(
        "Throughput: {n} events of {} bytes preloaded, then drained; rate from the first output to the last by the \
         server's store times; median of {rounds} round(s) alternating raw and runner. Both sides: \
         {} steps in flight, pull batches of {}, max_ack_pending {}, file storage, `Nats-Msg-Id` on every publish. \
         Saga step / raw = {:.0}% (target ≥ 80%). Latency: open loop at a fixed rate for {secs} s after {warm} s of \
         warm-up, from the event's scheduled publish time to the server's store time of the effect command (its \
         PubAck). The publisher, the runner and nats-server share the {} cores.",
        crate::js::BODY_BYTES,
        w.steps,
        w.batch,
        w.max_ack_pending,
        ratio * 100.0,
        report.machine.cores
    ));
    report.data = serde_json::json!({
        "events": n, "rounds": rounds, "shards": shards, "durability": args.durability, "pin": args.pin,
        "raw_steps_per_s": raws, "saga_steps_per_s": steps, "raw_median": raw_rate, "saga_median": step_rate,
        "ratio": ratio, "saga_steady_rate": median(steadies), "raw_cpu_us_per_step": raw_cpu.json(n), "saga_cpu_us_per_step": step_cpu.json(n),
        "latency": lats.iter().map(Latency::json).collect::<Vec<_>>(),
    });
    if let Some(dir) = out {
        let series: Vec<Series> =
            lats.iter().map(|l| Series::new(&l.label, plot::percentile_points(&l.hist))).collect();
        plot::percentiles(&dir.join("saga-step-latency.svg"), "Saga step: event → command PubAck", &series)?;
    }
    Ok(report)
}
