//! The order workflow with every party in its own process (issue 16, item 4): the fair
//! harness the Runner is compared with other engines by.
//!
//! ```text
//!  load process ──OrderPlaced──> nats-server (JetStream) ──> runner process (`serve`, combined)
//!  runner ──HTTP reserve/charge/ship/refund/release──> upstream process (records every call)
//!  runner ──Reserve/Release──> Gateway process ──InventoryReserved──> nats-server   (flow `gateway`)
//!  upstream, Gateway ──`index step at_us` per call (Unix socket)──> load process
//! ```
//!
//! The harness (this process) starts nats-server and measures the raw JetStream step on it
//! first (the baseline, [`crate::raw`]). Then, per run (a closed loop with C orders in flight,
//! then each open-loop rate), on fresh streams: the upstream (and the Gateway), the runner
//! with a config file of its own (data directory, free port, `nats.url`), and once `/ready`
//! answers 200, the load process. Around the load it reads the CPU time of every process and
//! of each runner thread from `/proc`, and the runner's commit counter from `/metrics`.
//! Afterwards it stops the runner (SIGTERM: drain), then the servers, which write their
//! records, and checks exactly-once against them ([`check`]).

pub mod check;
pub mod load;
pub mod procs;
pub mod servers;

use crate::js::{Js, err};
use crate::report::{Report, fmt_ms, fmt_rate};
use check::{Flow, Verdict};
use hdrhistogram::Histogram;
use procs::{Proc, command, free_port, http_get};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const HTTP_SAGAS: &str = include_str!("../../../examples/order-http/sagas.yaml");
const HTTP_EFFECTS: &str = include_str!("../../../examples/order-http/effects.yaml");
const HTTP_PROGRAM: &str = include_str!("../../../examples/order-http/order.rhai");
const GW_SAGAS: &str = include_str!("../../../examples/order/sagas.yaml");
const GW_EFFECTS: &str = include_str!("../../../examples/order/effects.yaml");
const GW_PROGRAM: &str = include_str!("../../../examples/order/order.rhai");

#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// `http`: examples/order-http, every step an HTTP effect (the issue-16 workflow).
    /// `gateway`: examples/order, Reserve through the Gateway process.
    #[arg(long, value_enum, default_value = "http")]
    pub flow: Flow,
    /// Orders in flight in the closed-loop run (0: no closed-loop run).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Orders of the closed-loop run.
    #[arg(long, default_value_t = 10_000)]
    pub orders: u64,
    /// Open-loop rates in orders/s, one run each (empty: none).
    #[arg(long, value_delimiter = ',', default_values_t = vec![300.0, 1000.0])]
    pub rates: Vec<f64>,
    /// Seconds measured per open-loop run (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Seconds of warm-up per open-loop run (published, checked, left out of the latency).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Percent of orders whose payment the upstream declines (compensated).
    #[arg(long, default_value_t = 5.0)]
    pub decline_pct: f64,
    /// Percent of idempotency keys whose first upstream call is answered 503 (the runner
    /// retries with the same key: the check counts those as duplicates, not failures).
    #[arg(long, default_value_t = 0.0)]
    pub flaky_pct: f64,
    /// Runner shards (default: the runner's, the CPUs available).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Pin each shard to a core (`pin_cores`).
    #[arg(long)]
    pub pin: bool,
    #[arg(long, default_value = "fsync")]
    pub durability: String,
    /// The runner binary, e.g. target/release/runner (default: the copy of the runner built
    /// into this binary, run as `runner-bench runner serve …`: the same code, no second build).
    #[arg(long)]
    pub runner_bin: Option<PathBuf>,
    /// Messages of the raw JetStream baseline (0: none).
    #[arg(long, default_value_t = 100_000)]
    pub raw_events: u64,
    /// Keep each run's directory (configs, logs, records, load results) under this folder.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

/// One load applied to a fresh runner.
#[derive(Debug, Clone)]
struct Load {
    label: String,
    /// Closed loop: orders in flight.
    closed: Option<usize>,
    /// Open loop: orders/s.
    rate: Option<f64>,
    orders: u64,
    warmup_s: f64,
}

struct RunResult {
    load: Load,
    published: u64,
    completed: u64,
    per_s: f64,
    hist: Histogram<u64>,
    commits: Option<f64>,
    /// Flushes over the run and the seconds they took (fsync mode).
    flushes: Option<(f64, f64)>,
    /// The critical path of the orders that were not declined, step by step: publish → first
    /// call, first → second call, second → third (µs).
    segments: Vec<Histogram<u64>>,
    wall_s: f64,
    /// CPU seconds per process during the load.
    cpu: BTreeMap<String, f64>,
    /// CPU seconds per runner thread during the load.
    threads: BTreeMap<String, f64>,
    worst_late_us: u64,
    verdict: Verdict,
    problem: Option<String>,
}

impl RunResult {
    fn commits_per_order(&self) -> Option<f64> {
        self.commits.map(|c| c / self.published.max(1) as f64)
    }

    fn flushes_line(&self) -> Option<String> {
        let (n, secs) = self.flushes?;
        (n > 0.0).then(|| {
            format!(
                "{:.2} flushes per order, {:.2} ms each on average (`runner_flush_seconds`)",
                n / self.published.max(1) as f64,
                secs * 1e3 / n
            )
        })
    }

    fn segments_line(&self) -> Option<String> {
        const NAMES: [&str; 3] = ["publish → 1st call", "1st → 2nd call", "2nd → 3rd call"];
        let parts: Vec<String> = self
            .segments
            .iter()
            .zip(NAMES)
            .filter(|(h, _)| !h.is_empty())
            .map(|(h, name)| {
                format!("{name} {} ({})", fmt_ms(h.value_at_quantile(0.5)), fmt_ms(h.value_at_quantile(0.99)))
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    fn pct_ms(&self, q: f64) -> String {
        if self.hist.is_empty() { "-".into() } else { fmt_ms(self.hist.value_at_quantile(q)) }
    }

    /// `name µs/order (cores)` per entry, largest first.
    fn cpu_line(&self, m: &BTreeMap<String, f64>) -> String {
        let mut v: Vec<_> = m.iter().filter(|(_, s)| **s > 0.0).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        v.iter()
            .map(|(k, s)| {
                format!("{k} {:.0} ({:.2})", *s * 1e6 / self.published.max(1) as f64, *s / self.wall_s.max(1e-9))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn json(&self) -> serde_json::Value {
        let per_order = |m: &BTreeMap<String, f64>| -> serde_json::Value {
            m.iter()
                .map(|(k, s)| {
                    (
                        k.clone(),
                        serde_json::json!({
                            "cpu_s": s,
                            "us_per_order": s * 1e6 / self.published.max(1) as f64,
                            "cores": s / self.wall_s.max(1e-9),
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let q = |q: f64| if self.hist.is_empty() { None } else { Some(self.hist.value_at_quantile(q)) };
        serde_json::json!({
            "label": self.load.label,
            "closed_in_flight": self.load.closed,
            "offered_per_s": self.load.rate,
            "orders": self.published,
            "completed": self.completed,
            "orders_per_s": self.per_s,
            "latency_samples": self.hist.len(),
            "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "max_us": (!self.hist.is_empty()).then(|| self.hist.max()),
            "worst_publisher_late_us": self.worst_late_us,
            "commits": self.commits,
            "commits_per_order": self.commits_per_order(),
            "flushes": self.flushes.map(|f| f.0),
            "flush_seconds": self.flushes.map(|f| f.1),
            "segments_p50_us": self.segments.iter().map(|h| (!h.is_empty()).then(|| h.value_at_quantile(0.5))).collect::<Vec<_>>(),
            "segments_p99_us": self.segments.iter().map(|h| (!h.is_empty()).then(|| h.value_at_quantile(0.99))).collect::<Vec<_>>(),
            "wall_s": self.wall_s,
            "cpu": per_order(&self.cpu),
            "runner_threads": per_order(&self.threads),
            "exactly_once": self.verdict,
            "exactly_once_passed": self.verdict.passed(),
            "problem": self.problem,
        })
    }
}

/// What the harness needs from its environment.
struct Env<'a> {
    js: &'a Js,
    args: &'a Args,
    me: PathBuf,
    /// Program and leading arguments that start a runner.
    runner: (PathBuf, Vec<String>),
    base: PathBuf,
}

pub fn run(args: Args, quick: bool, out: Option<&Path>) -> Result<Report, String> {
    let mut args = args;
    if quick {
        args.orders = 300;
        args.concurrency = 64;
        args.rates = vec![100.0];
        args.secs = 1.5;
        args.warmup = 0.3;
        args.raw_events = 3_000;
    }
    crate::pipeline::parse_durability(&args.durability)?;
    let me = std::env::current_exe().map_err(err("this executable"))?;
    let runner = match &args.runner_bin {
        // Absolute: the runner runs in its run folder.
        Some(b) => (std::fs::canonicalize(b).map_err(|e| format!("--runner-bin {}: {e}", b.display()))?, vec![]),
        None => (me.clone(), vec!["runner".to_owned()]),
    };
    let tmp = tempfile::tempdir_in(crate::store::bench_dir()).map_err(err("temp dir"))?;
    let base = match &args.keep {
        Some(k) => {
            std::fs::create_dir_all(k).map_err(err("--keep folder"))?;
            k.clone()
        }
        None => tmp.path().to_owned(),
    };
    let js = Js::start()?;

    let raw = if args.raw_events > 0 {
        let (rate, _) = crate::raw::throughput(&js, args.raw_events, crate::raw::Window::default())?;
        Some(rate)
    } else {
        None
    };

    let mut loads = Vec::new();
    if args.concurrency > 0 && args.orders > 0 {
        loads.push(Load {
            label: format!("closed loop, {} in flight", args.concurrency),
            closed: Some(args.concurrency),
            rate: None,
            orders: args.orders,
            warmup_s: 0.0,
        });
    }
    for &r in &args.rates {
        if !(r > 0.0 && r.is_finite()) {
            return Err(format!("rate {r} is not a positive number"));
        }
        loads.push(Load {
            label: format!("open loop, {} orders/s", fmt_rate(r)),
            closed: None,
            rate: Some(r),
            orders: ((args.secs + args.warmup) * r).ceil().max(1.0) as u64,
            warmup_s: args.warmup,
        });
    }
    let env = Env { js: &js, args: &args, me, runner, base };
    let mut results = Vec::new();
    for (k, load) in loads.into_iter().enumerate() {
        results.push(run_once(&env, k, load)?);
    }
    let report = report(&args, raw, &results);
    if let Some(dir) = out {
        let series: Vec<crate::plot::Series> = results
            .iter()
            .filter(|r| !r.hist.is_empty())
            .map(|r| crate::plot::Series::new(&r.load.label, crate::plot::percentile_points(&r.hist)))
            .collect();
        if !series.is_empty() {
            crate::plot::percentiles(
                &dir.join("orders-latency.svg"),
                "Order workflow, separate processes: OrderPlaced → final upstream call",
                &series,
            )?;
        }
    }
    let problems: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let mut p = Vec::new();
            if let Some(e) = &r.problem {
                p.push(e.clone());
            }
            if !r.verdict.passed() {
                p.push(format!("exactly-once {}; e.g. {}", r.verdict.summary(), r.verdict.examples.join("; ")));
            }
            (!p.is_empty()).then(|| format!("{}: {}", r.load.label, p.join("; ")))
        })
        .collect();
    if problems.is_empty() { Ok(report) } else { Err(format!("{}\n{}", report.table(), problems.join("\n"))) }
}

fn write_manifests(dir: &Path, flow: Flow) -> Result<(PathBuf, PathBuf), String> {
    let (sagas, effects, program) = match flow {
        Flow::Http => (HTTP_SAGAS, HTTP_EFFECTS, HTTP_PROGRAM),
        Flow::Gateway => (GW_SAGAS, GW_EFFECTS, GW_PROGRAM),
    };
    std::fs::create_dir_all(dir).map_err(err("manifest folder"))?;
    let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(err("manifest"));
    w("sagas.yaml", sagas)?;
    w("effects.yaml", effects)?;
    w("order.rhai", program)?;
    Ok((dir.join("sagas.yaml"), dir.join("effects.yaml")))
}

/// Sum of the runner's commits over its shards (`runner_commit_seconds_count`): every
/// non-empty LMDB write transaction.
fn commits(addr: &str) -> Option<f64> {
    metric_sum(addr, &["runner_commit_seconds_count"]).map(|v| v[0])
}

/// Each named series summed over its labels (shards), in the order asked; `None` when the
/// runner does not answer or has none of the first.
fn metric_sum(addr: &str, names: &[&str]) -> Option<Vec<f64>> {
    let (status, text) = http_get(addr, "/metrics", Duration::from_secs(10)).ok()?;
    if status != 200 {
        return None;
    }
    let mut sums = vec![0.0; names.len()];
    let mut seen = false;
    for line in text.lines() {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        if let Some(i) = names.iter().position(|n| *n == name)
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            sums[i] += v;
            seen |= i == 0;
        }
    }
    seen.then_some(sums)
}

/// Flushes so far and the seconds they took (`runner_flush_seconds`, fsync mode only).
fn flushes(addr: &str) -> Option<(f64, f64)> {
    metric_sum(addr, &["runner_flush_seconds_count", "runner_flush_seconds_sum"]).map(|v| (v[0], v[1]))
}

/// Waits until the commit counter holds still for 300 ms (at most `limit`); its last value.
fn settle(addr: &str, limit: Duration) -> Option<f64> {
    let deadline = Instant::now() + limit;
    let mut last = commits(addr);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = commits(addr);
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

struct Cpu {
    procs: BTreeMap<String, f64>,
    threads: BTreeMap<String, f64>,
}

fn cpu_now(pids: &[(&str, u32)], runner: u32) -> Cpu {
    let procs = pids.iter().filter_map(|(n, p)| Some(((*n).to_owned(), crate::cpu::process(*p)?))).collect();
    Cpu { procs, threads: crate::cpu::threads(runner) }
}

fn since(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(k, v)| (k.clone(), (v - before.get(k).copied().unwrap_or(0.0)).max(0.0))).collect()
}

/// Starts the runner on a free port and waits for `/ready`; retries on another port when the
/// one picked was taken in between.
fn start_runner(
    env: &Env,
    dir: &Path,
    config: &serde_json::Value,
    vars: &[(&str, String)],
) -> Result<(Proc, String), String> {
    let mut last = String::new();
    for attempt in 0..3 {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut cfg = config.clone();
        cfg["http"] = serde_json::json!({ "addr": addr });
        let file = dir.join("runner.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&cfg).map_err(err("runner config"))?)
            .map_err(err("runner config"))?;
        let mut argv = env.runner.1.clone();
        argv.extend(["serve".into(), "--config".into(), file.to_string_lossy().into_owned()]);
        let mut cmd = command(&env.runner.0, &argv);
        cmd.current_dir(dir);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut p = Proc::spawn("runner", cmd, &dir.join(format!("runner-{attempt}.log")))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = p.exited()? {
                last = format!("runner exited with {status} at start{}", p.tail());
                break;
            }
            if matches!(http_get(&addr, "/ready", Duration::from_secs(2)), Ok((200, _))) {
                return Ok((p, addr));
            }
            if Instant::now() >= deadline {
                return Err(format!("runner not ready within 60 s{}", p.tail()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !last.contains("cannot listen") {
            break;
        }
    }
    Err(last)
}

fn run_once(env: &Env, k: usize, load: Load) -> Result<RunResult, String> {
    let a = env.args;
    let dir = env.base.join(format!("run-{k}"));
    // A folder kept from an earlier run (--keep) would hand the runner its old data.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).map_err(err("run folder"))?;
    env.js.reset();
    // Orders finish in the load process: the bar shows the elapsed time only.
    let pb = crate::progress::bar(load.orders, &format!("{}: running", load.label));

    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let up_rec = dir.join("upstream-calls.jsonl");
    let up_sock = dir.join("upstream.sock");
    let mut upstream = Proc::spawn(
        "upstream",
        command(
            &env.me,
            &[
                "upstream".into(),
                "--record".into(),
                arg(&up_rec),
                "--notify".into(),
                arg(&up_sock),
                "--decline-pct".into(),
                a.decline_pct.to_string(),
                "--flaky-pct".into(),
                a.flaky_pct.to_string(),
            ],
        ),
        &dir.join("upstream.log"),
    )?;
    let up_url = upstream.ready("READY ", Duration::from_secs(30))?;
    let mut notify = vec![up_sock.clone()];
    let mut gateway = None;
    let gw_rec = dir.join("gateway-calls.jsonl");
    if a.flow == Flow::Gateway {
        let sock = dir.join("gateway.sock");
        let mut g = Proc::spawn(
            "gateway",
            command(
                &env.me,
                &[
                    "gateway".into(),
                    "--record".into(),
                    arg(&gw_rec),
                    "--notify".into(),
                    arg(&sock),
                    "--nats".into(),
                    env.js.url(),
                ],
            ),
            &dir.join("gateway.log"),
        )?;
        let url = g.ready("READY ", Duration::from_secs(30))?;
        notify.push(sock);
        gateway = Some((g, url));
    }

    let (sagas, effects) = write_manifests(&dir.join("manifests"), a.flow)?;
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).map_err(err("secrets folder"))?;
    std::fs::write(secrets.join("payments_token"), "bench-token").map_err(err("secret"))?;
    let mut config = serde_json::json!({
        "mode": "combined",
        "data_dir": arg(&dir.join("runner-data")),
        "pin_cores": a.pin,
        "nats": { "url": env.js.url() },
        "sagas": { "manifests": [arg(&sagas)] },
        "effects": { "manifests": [arg(&effects)], "secrets_dir": arg(&secrets) },
        "storage": { "durability": a.durability },
        // RUNNER_BENCH_LOG (a tracing filter, e.g. `shards=debug`) for diagnosis; `warn`
        // otherwise, so logging costs nothing measurable.
        "log": { "level": std::env::var("RUNNER_BENCH_LOG").unwrap_or_else(|_| "warn".into()) },
        "shutdown": { "drain_deadline_ms": 10_000 },
    });
    if let Some(s) = a.shards {
        config["shards"] = serde_json::json!(s);
    }
    if let Some((_, url)) = &gateway {
        config["gateway"] = serde_json::json!({ "url": url });
    }
    let vars: Vec<(&str, String)> = match a.flow {
        Flow::Http => vec![("UPSTREAM_URL", up_url.clone())],
        Flow::Gateway => vec![("PAYMENTS_URL", up_url.clone()), ("SHIPPING_URL", up_url.clone())],
    };
    let (mut runner, addr) = start_runner(env, &dir, &config, &vars)?;

    let nats_pid = env.js.server.pid().unwrap_or(0);
    let mut pids = vec![("runner", runner.pid()), ("nats-server", nats_pid), ("upstream", upstream.pid())];
    if let Some((g, _)) = &gateway {
        pids.push(("gateway", g.pid()));
    }
    let commits_before = commits(&addr);
    let flushes_before = flushes(&addr);
    let before = cpu_now(&pids, runner.pid());
    let started = Instant::now();

    let load_out = dir.join("load.json");
    let mut argv = vec![
        "orders-load".to_owned(),
        "--nats".into(),
        env.js.url(),
        "--flow".into(),
        match a.flow {
            Flow::Http => "http".into(),
            Flow::Gateway => "gateway".into(),
        },
        "--decline-pct".into(),
        a.decline_pct.to_string(),
        "--orders".into(),
        load.orders.to_string(),
        "--out".into(),
        arg(&load_out),
    ];
    match (load.closed, load.rate) {
        (Some(c), _) => argv.extend(["--closed".into(), c.to_string()]),
        (None, Some(r)) => argv.extend(["--rate".into(), r.to_string()]),
        (None, None) => return Err("a load is either closed or open".into()),
    }
    for s in &notify {
        argv.extend(["--notify".into(), arg(s)]);
    }
    let mut loader = Proc::spawn("load", command(&env.me, &argv), &dir.join("load.log"))?;
    // The load gives up by itself after 30 s without progress; this bound is for a hung one.
    let expected_s = load.rate.map(|r| load.orders as f64 / r).unwrap_or(load.orders as f64 / 100.0);
    let limit = Duration::from_secs_f64(expected_s * 5.0 + 120.0);
    let load_deadline = Instant::now() + limit;
    let load_status = loop {
        if let Some(s) = loader.exited()? {
            break s;
        }
        if Instant::now() >= load_deadline {
            loader.kill();
            return Err(format!("{}: the load process ran past {limit:?}{}", load.label, loader.tail()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The runner still applies the last results after the final calls: count its commits and
    // CPU until its commit counter stands still.
    let commits_after = settle(&addr, Duration::from_secs(10));
    let flushes_after = flushes(&addr);
    let after = cpu_now(&pids, runner.pid());
    let wall_s = started.elapsed().as_secs_f64();
    pb.finish_and_clear();

    // Stop: the runner drains first (so every call it makes is recorded), then the servers
    // write their records.
    let runner_stop = runner.terminate(Duration::from_secs(30));
    let mut calls = Vec::new();
    if let Some((mut g, _)) = gateway {
        g.terminate(Duration::from_secs(10))?;
        calls.extend(servers::read_records(&gw_rec)?);
    }
    upstream.terminate(Duration::from_secs(10))?;
    calls.extend(servers::read_records(&up_rec)?);

    let mut problem = match runner_stop {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("runner exited with {s} on SIGTERM{}", runner.tail())),
        Err(e) => Some(e),
    };
    let out: load::LoadOutput = match std::fs::read(&load_out) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(err("load results"))?,
        Err(e) => {
            return Err(format!(
                "{}: the load process ({load_status}) left no results: {e}{}",
                load.label,
                loader.tail()
            ));
        }
    };
    if !out.complete || !load_status.success() {
        let why = out.error.clone().unwrap_or_else(|| format!("load process exited with {load_status}"));
        problem = Some(problem.map(|p| format!("{p}; {why}")).unwrap_or(why));
    }
    let published = out.published_us.len() as u64;
    let verdict = check::check(a.flow, published, a.decline_pct, &calls);

    let warm_until = out.start_us + (load.warmup_s * 1e6) as u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(err("histogram"))?;
    let (mut first, mut last, mut completed) = (u64::MAX, 0u64, 0u64);
    for i in 0..published as usize {
        let (sched, done) = (out.scheduled_us[i], out.done_us[i]);
        if done == 0 {
            continue;
        }
        completed += 1;
        first = first.min(out.published_us[i].min(sched));
        last = last.max(done);
        if sched >= warm_until {
            hist.record(done.saturating_sub(sched).max(1)).map_err(err("histogram"))?;
        }
    }
    let per_s = if completed > 0 { completed as f64 / (last.saturating_sub(first).max(1) as f64 / 1e6) } else { 0.0 };
    let segments = segments(&out, &calls, warm_until, a.decline_pct)?;
    let mut cpu = since(&after.procs, &before.procs);
    cpu.insert("load".into(), out.cpu_s);
    Ok(RunResult {
        per_s,
        published,
        completed,
        hist,
        commits: commits_before.zip(commits_after).map(|(b, a)| a - b),
        flushes: flushes_before.zip(flushes_after).map(|(b, a)| (a.0 - b.0, a.1 - b.1)),
        segments,
        wall_s,
        cpu,
        threads: since(&after.threads, &before.threads),
        worst_late_us: out.worst_late_us,
        verdict,
        problem,
        load,
    })
}

/// The critical path of the good (not declined) orders after the warm-up, from the servers'
/// records: scheduled publish → first call, and between consecutive calls (µs).
fn segments(
    out: &load::LoadOutput,
    calls: &[check::Call],
    warm_until: u64,
    decline_pct: f64,
) -> Result<Vec<Histogram<u64>>, String> {
    let mut by_order: HashMap<&str, Vec<u64>> = HashMap::new();
    for c in calls {
        by_order.entry(c.order.as_str()).or_default().push(c.at_us);
    }
    let mut hs = Vec::new();
    for _ in 0..3 {
        hs.push(Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(err("histogram"))?);
    }
    for (i, &sched) in out.scheduled_us.iter().enumerate() {
        let id = check::order_id(i as u64);
        if sched < warm_until || out.done_us.get(i).is_none_or(|d| *d == 0) || check::declined(&id, decline_pct) {
            continue;
        }
        let Some(times) = by_order.get_mut(id.as_str()) else { continue };
        times.sort_unstable();
        let mut prev = sched;
        for (h, &t) in hs.iter_mut().zip(times.iter()) {
            h.record(t.saturating_sub(prev).max(1)).map_err(err("histogram"))?;
            prev = t;
        }
    }
    Ok(hs)
}

fn report(args: &Args, raw: Option<f64>, results: &[RunResult]) -> Report {
    let mut r = Report::new(
        "Order workflow in separate processes",
        &[
            "run",
            "offered orders/s",
            "orders",
            "completed orders/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "commits per order",
            "exactly-once",
        ],
    );
    for x in results {
        r.row(vec![
            x.load.label.clone(),
            x.load.rate.map(fmt_rate).unwrap_or_else(|| "closed".into()),
            format!("{}/{}", x.completed, x.published),
            fmt_rate(x.per_s),
            x.pct_ms(0.5),
            x.pct_ms(0.9),
            x.pct_ms(0.99),
            x.pct_ms(1.0),
            x.commits_per_order().map(|c| format!("{c:.2}")).unwrap_or_else(|| "n/a".into()),
            x.verdict.summary(),
        ]);
    }
    if let Some(raw) = raw {
        r.row(vec![
            "raw JetStream step (baseline, steps/s)".into(),
            "-".into(),
            args.raw_events.to_string(),
            fmt_rate(raw),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    let workflow = match args.flow {
        Flow::Http => {
            "examples/order-http: reserve → charge (+30 s payment timer) → ship, each an HTTP POST to the upstream \
             process; a declined charge is compensated by release and refund (two more POSTs)"
        }
        Flow::Gateway => {
            "examples/order: Reserve to the Gateway process (which appends InventoryReserved to AGGREGATE_EVENTS \
             and answers 200) → charge (+30 s payment timer) → ship as HTTP POSTs to the upstream; a declined \
             charge is compensated by Release through the Gateway"
        }
    };
    let runner = match &args.runner_bin {
        Some(b) => format!("`{} serve`", b.display()),
        None => "`runner-bench runner serve` (the runner built into the harness binary)".into(),
    };
    r.notes.push(format!(
        "Workflow: {workflow}. {}% of the orders are declined (by a hash of the order id). Processes: the runner \
         ({runner}, `combined` mode, {} shard(s){}, {} durability), nats-server, the upstream, {}the load (publishes \
         `OrderPlaced` to JetStream) — each its own process on this machine; the harness runs the raw baseline \
         in its own process first. Latency: from each order's scheduled publish time (open loop; closed loop: its \
         publish) to its final upstream call as the upstream received it (ship, or the last compensation call); \
         open loops leave their first {} s out. Orders/s: completed orders from the first publish to the last \
         final call. Commits per order: the runner's `runner_commit_seconds_count` (every non-empty LMDB write \
         transaction of any shard; in `fsync` mode each is made durable by the shard's flusher thread — an \
         fdatasync of the data file, then of the durability marker — before the batch's acks and dispatches \
         leave; a runner older than the flusher syncs inside the commit) over the run, divided by the orders; \
         nats-server's own flushes are not counted. Exactly-once: every order has one call per expected step with the runner's \
         deterministic work id as `Idempotency-Key`; a repeated call with the right key counts as a duplicate, a \
         missing, extra or wrongly keyed call fails.",
        args.decline_pct,
        args.shards.map(|s| s.to_string()).unwrap_or_else(|| "default".into()),
        if args.pin { ", pinned" } else { "" },
        args.durability,
        if args.flow == Flow::Gateway { "the Gateway, " } else { "" },
        args.warmup,
    ));
    for x in results {
        r.notes.push(format!(
            "{}: CPU µs per order (cores busy over {:.1} s): {}. Runner threads: {}.{}{}{}",
            x.load.label,
            x.wall_s,
            x.cpu_line(&x.cpu),
            x.cpu_line(&x.threads),
            x.segments_line()
                .map(|l| format!(" Critical path of the good orders, p50 (p99) ms: {l}."))
                .unwrap_or_default(),
            x.flushes_line().map(|l| format!(" {l}.")).unwrap_or_default(),
            if x.load.rate.is_some() {
                format!(" Publisher late by {} at worst.", fmt_ms(x.worst_late_us) + " ms")
            } else {
                String::new()
            }
        ));
    }
    r.data = serde_json::json!({
        "flow": args.flow,
        "decline_pct": args.decline_pct,
        "shards": args.shards,
        "pin": args.pin,
        "durability": args.durability,
        "runner": runner,
        "raw_steps_per_s": raw,
        "raw_events": args.raw_events,
        "runs": results.iter().map(RunResult::json).collect::<Vec<_>>(),
    });
    r
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn both_example_sets_load_and_their_programs_compile() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for set in ["order-http", "order"] {
            let files = [root.join(set).join("sagas.yaml"), root.join(set).join("effects.yaml")];
            let m = shards::manifest::ManifestSet::load_with_vars(&files, &shards::program::check_program, &|_| None)
                .unwrap_or_else(|e| panic!("{set}: {e}"));
            assert!(m.sagas.contains_key("order_fulfillment"), "{set}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (sagas, effects) = super::write_manifests(dir.path(), super::Flow::Http).unwrap();
        let m =
            shards::manifest::ManifestSet::load_with_vars(&[sagas, effects], &shards::program::check_program, &|n| {
                (n == "UPSTREAM_URL").then(|| "http://127.0.0.1:1".to_owned())
            })
            .unwrap();
        let names: Vec<_> = m.effects.keys().cloned().collect();
        assert_eq!(names, ["charge_payment", "refund_payment", "release_inventory", "reserve_inventory", "ship_order"]);
        assert!(m.effects.values().all(|e| e.settings["url"].as_str().unwrap().starts_with("http://127.0.0.1:1/")));
    }
}
