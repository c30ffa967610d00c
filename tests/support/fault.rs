//! Fault-suite support: the `runner` binary as a real process, a "ledger" workload that
//! exercises every path (saga transitions, Gateway commands, effects through an HTTP
//! upstream, results, durable timers), and a checker that is independent of the runner's
//! own bookkeeping: it compares what was published with what the Gateway and the upstream
//! fixtures recorded, what the streams hold, and the final saga states.

use super::*;
use runner::fixture::HttpFixture;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const LEDGER: &str = r#"
fn on_event(state, event) {
    let s = if state == () { #{ seen: [], results: [], ticks: [] } } else { state };
    //PRELUDE
    if event.type == "pay.succeeded" || event.type == "pay.failed" {
        s.results.push(event.data.n);
        return #{ state: s };
    }
    if event.type == "timer" {
        s.ticks.push(event.data.payload.n);
        return #{ state: s };
    }
    s.seen.push(event.data.n);
    let schedules = if event.data.n % 10 == 0 { [ #{ name: "tick", after_ms: 300, payload: #{ n: event.data.n } } ] } else { [] };
    #{
        state: s,
        work: [
            #{ command: "Note", aggregate: "ledger", aggregate_id: event.data.k, payload: #{ k: event.data.k, n: event.data.n } },
            #{ effect: "pay", payload: #{ k: event.data.k, n: event.data.n } }
        ],
        schedules: schedules
    }
}
"#;

pub const TENANT: &str = "t";
pub const LEDGER_SAGA: &str = "ledger";

/// One published ledger event.
#[derive(Debug, Clone)]
pub struct Sent {
    pub key: String,
    pub n: u64,
    pub id: String,
}

/// The fixtures and files of one fault scenario.
pub struct Scenario {
    pub h: Harness,
    pub gateway: HttpFixture,
    pub upstream: HttpFixture,
    pub manifests: PathBuf,
    pub effects: PathBuf,
    pub sent: Vec<Sent>,
    pub crashes: Vec<Instant>,
    /// Upstream answers: the result payload echoes `n` so the saga can record it.
    pub name: String,
}

impl Scenario {
    pub fn new(name: &str) -> Self {
        Self::build(name, &[], "", "")
    }

    pub fn with_nats_args(name: &str, args: &[&str]) -> Self {
        Self::build(name, args, "", "")
    }

    /// A scenario whose ledger program runs `prelude` first (after `s` is set up) and whose
    /// saga entry gets `saga_extra` (YAML lines indented by four spaces, e.g. a retry policy).
    pub fn build(name: &str, nats_args: &[&str], prelude: &str, saga_extra: &str) -> Self {
        let h = Harness::with_args(nats_args);
        let gateway = HttpFixture::start().unwrap();
        let upstream = HttpFixture::start().unwrap();
        upstream.set_handler(std::sync::Arc::new(|r| {
            Some(runner::fixture::Reply::new(200, serde_json::json!({"n": r.json()["n"]})))
        }));
        let dir = h.dir.path().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "ledger.rhai", &LEDGER.replace("//PRELUDE", prelude));
        let effects = format!(
            "  - name: pay\n    provider: http\n    settings: {{ url: \"{}/pay\", body: {{ k: \"{{{{payload.k}}}}\", n: \"{{{{payload.n}}}}\" }} }}\n    retry: {{ attempts: 10, backoff_ms: 50, max_backoff_ms: 500 }}\n",
            upstream.url()
        );
        let manifests = write(
            &dir,
            "ledger.yaml",
            &format!(
                "sagas:\n  - name: ledger\n    program: ledger.rhai\n{saga_extra}    triggers:\n      - {{ subject: \"events.>\", correlation: data.k, may_start: true }}\n"
            ),
        );
        let effects = write(&dir, "pay.yaml", &format!("effects:\n{effects}"));
        Self { h, gateway, upstream, manifests, effects, sent: Vec::new(), crashes: Vec::new(), name: name.to_owned() }
    }

    /// Rewrites the program with another prelude (a "fix"); `/admin/reload` picks it up.
    pub fn set_prelude(&self, prelude: &str) {
        write(self.manifests.parent().unwrap(), "ledger.rhai", &LEDGER.replace("//PRELUDE", prelude));
    }

    /// A config file for a runner process; its data dir is `data-LABEL` in the scenario's
    /// temp dir. `extra` is TOML appended inside `[consumers]` (keys first, then any tables).
    pub fn config(&self, label: &str, shards: usize, port: u16, extra: &str) -> PathBuf {
        self.config_at(label, shards, port, &self.h.dir.path().join(format!("data-{label}")), extra)
    }

    pub fn config_at(&self, label: &str, shards: usize, port: u16, data: &Path, extra: &str) -> PathBuf {
        self.config_mode(label, "combined", shards, port, data, extra)
    }

    /// A config file for a runner in `mode` (`combined`, `saga` or `effect`).
    pub fn config_mode(&self, label: &str, mode: &str, shards: usize, port: u16, data: &Path, extra: &str) -> PathBuf {
        write(
            self.h.dir.path(),
            &format!("{label}.toml"),
            &format!(
                "mode = \"{mode}\"\ndata_dir = \"{}\"\nshards = {shards}\npin_cores = false\n[nats]\nurl = \"{}\"\n[sagas]\nmanifests = [\"{}\"]\n[effects]\nmanifests = [\"{}\"]\n[gateway]\nurl = \"{}\"\n[http]\naddr = \"127.0.0.1:{port}\"\n[relay]\nbackoff_ms = 50\nmax_backoff_ms = 500\nconfirm_timeout_ms = 3000\n[streams]\nduplicate_window_ms = 1000\n[consumers]\nack_wait_ms = 4000\n{extra}",
                data.display(),
                self.h.nats.url(),
                self.manifests.display(),
                self.effects.display(),
                self.gateway.url(),
            ),
        )
    }

    /// Publishes `per` events for each of `keys` keys (interleaved), pipelined.
    pub fn publish_load(&mut self, tenant: &str, keys: usize, per: u64, first_n: u64) {
        let msgs = self.plan_events(tenant, keys, per, first_n, &|_, _| None);
        self.h.publish_many(msgs);
    }

    /// The same, returned for publishing from another thread (while the runner works).
    pub fn plan_load(&mut self, tenant: &str, keys: usize, per: u64) -> Vec<Outgoing> {
        self.plan_events(tenant, keys, per, 0, &|_, _| None)
    }

    /// Events `first_n..first_n + per` for keys `TENANT-k0..`; `extra(k, n)` may add fields to
    /// an event's `data` (e.g. a poison flag). Every event is remembered for the checker.
    pub fn plan_events(
        &mut self,
        tenant: &str,
        keys: usize,
        per: u64,
        first_n: u64,
        extra: &dyn Fn(usize, u64) -> Option<serde_json::Value>,
    ) -> Vec<Outgoing> {
        let mut msgs = Vec::new();
        for n in first_n..first_n + per {
            for k in 0..keys {
                let key = format!("{tenant}-k{k}");
                let id = format!("{key}-e{n}");
                let mut data = serde_json::json!({"k": key, "n": n});
                if let Some(serde_json::Value::Object(more)) = extra(k, n) {
                    data.as_object_mut().unwrap().extend(more);
                }
                let body = serde_json::json!({"id": id, "type": "Entry", "tenant_id": tenant, "data": data});
                msgs.push((
                    format!("events.{tenant}.ledger.Entry"),
                    vec![("Nats-Msg-Id".to_owned(), id.clone())],
                    bytes::Bytes::from(serde_json::to_vec(&body).unwrap()),
                ));
                self.sent.push(Sent { key, n, id });
            }
        }
        msgs
    }

    /// Dead letters of `tenant` as the runner at `port` lists them (oldest first).
    pub fn deadletters(&self, port: u16, tenant: &str) -> Vec<serde_json::Value> {
        let (s, body) = self.h.http(
            "GET",
            &format!("http://127.0.0.1:{port}/admin/deadletters?tenant={tenant}&limit=100000"),
            None,
            None,
        );
        assert_eq!(s, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["deadletters"].as_array().cloned().unwrap_or_default()
    }

    /// One instance over HTTP (`None` when absent).
    pub fn instance(&self, port: u16, key: &str) -> Option<serde_json::Value> {
        let tenant = key.split('-').next().unwrap();
        let (s, body) =
            self.h.http("GET", &format!("http://127.0.0.1:{port}/sagas/{tenant}/{LEDGER_SAGA}/{key}"), None, None);
        (s == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    /// Waits until every key shows all its events, results and ticks over HTTP at `port`,
    /// and no outbox item is left.
    pub fn wait_complete(&self, ports: &[u16], timeout: Duration) {
        self.wait_complete_where(ports, timeout, &|_| true)
    }

    /// The same for the keys `which` selects.
    pub fn wait_complete_where(&self, ports: &[u16], timeout: Duration, which: &dyn Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while let Some(last) = self.incomplete_where(ports, which) {
            assert!(Instant::now() < deadline, "{}: not complete after {timeout:?}; e.g. {last}", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The first key of those `which` selects that does not yet show all its events, results
    /// and ticks with an empty outbox over HTTP at `ports`, and what it shows; `None` when
    /// every one does. A runner that is not answering shows nothing.
    pub fn incomplete_where(&self, ports: &[u16], which: &dyn Fn(&str) -> bool) -> Option<String> {
        let mut expected: BTreeMap<&str, usize> = BTreeMap::new();
        for s in self.sent.iter().filter(|s| which(&s.key)) {
            *expected.entry(s.key.as_str()).or_default() += 1;
        }
        for (key, n) in &expected {
            let tenant = key.split('-').next().unwrap();
            let state = ports.iter().find_map(|p| {
                let (s, body) =
                    self.h.http("GET", &format!("http://127.0.0.1:{p}/sagas/{tenant}/{LEDGER_SAGA}/{key}"), None, None);
                (s == 200).then(|| serde_json::from_str::<serde_json::Value>(&body).unwrap())
            });
            let ok = state.as_ref().is_some_and(|v| {
                let len = |f: &str| v["state"][f].as_array().map(|a| a.len()).unwrap_or(0);
                len("seen") >= *n
                    && len("results") >= *n
                    && len("ticks") >= n.div_ceil(10)
                    && v["pending_outbox"].as_array().is_some_and(|a| a.is_empty())
            });
            if !ok {
                return Some(format!(
                    "{key}: {}",
                    state.map(|v| v["state"].to_string()).unwrap_or_else(|| "absent".into())
                ));
            }
        }
        None
    }

    /// Runs the checker against final states read from the stopped runners' data dirs.
    pub fn check(&self, data_dirs: &[PathBuf]) -> Report {
        let mut states: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        let keys: BTreeSet<&str> = self.sent.iter().map(|s| s.key.as_str()).collect();
        for key in keys {
            let tenant = key.split('-').next().unwrap();
            for d in data_dirs {
                let out = Command::new(env!("CARGO_BIN_EXE_runner"))
                    .args(["saga", "get", tenant, LEDGER_SAGA, key, "--data"])
                    .arg(d)
                    .output()
                    .unwrap();
                if out.status.success() {
                    states.insert(key.to_owned(), serde_json::from_slice(&out.stdout).unwrap());
                }
            }
        }
        check(
            &self.sent,
            &states,
            &self.gateway.records(),
            &self.upstream.records(),
            &self.h.read_stream("WORKFLOW_COMMANDS"),
            &self.h.read_stream("WORKFLOW_EVENTS"),
            &self.crashes,
        )
    }

    /// Stops the runners cleanly (SIGTERM: drain, then exit 0), runs the checker on their data
    /// dirs, saves the report and asserts that it found nothing lost or repeated.
    pub fn finish(&self, runners: &mut [&mut RunnerProcess], data_dirs: &[PathBuf]) -> Report {
        for p in runners.iter_mut() {
            assert!(p.sigterm(), "{}: unclean stop; log:\n{}", self.name, p.log());
        }
        let report = self.check(data_dirs);
        self.record(&report);
        if !report.ok() {
            // Keep the evidence (logs, data directories) next to the reports.
            let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-failed").join(&self.name);
            let _ = std::fs::remove_dir_all(&keep);
            let _ = copy_tree(self.h.dir.path(), &keep);
            panic!("{}: {report} (logs and data kept in {})", self.name, keep.display());
        }
        report
    }

    /// Saves the report under target/faults/ (tests/FAULTS.md quotes the last results).
    pub fn record(&self, report: &Report) {
        self.record_with(report, "");
    }

    /// The same, with extra measurements appended (e.g. peak RSS).
    pub fn record_with(&self, report: &Report, extra: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/faults");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(format!("{}.txt", self.name)), format!("{}: {report}{extra}\n", self.name));
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    pub events: usize,
    pub crashes: usize,
    pub transitions_lost: Vec<String>,
    pub transitions_duplicated: Vec<String>,
    pub out_of_order: Vec<String>,
    pub commands_lost: Vec<String>,
    pub calls_duplicated: Vec<String>,
    pub calls_retried_across_crash: usize,
    pub stream_duplicates: Vec<String>,
    /// A command or result record published again after a crash (the streams' duplicate
    /// window is 1 s in this suite, so `Nats-Msg-Id` does not hide it): allowed, counted;
    /// the outstanding-command gate keeps it from being applied or called twice.
    pub stream_repeats_across_crash: usize,
    pub results_lost: Vec<String>,
    pub timers_wrong: Vec<String>,
    pub stuck: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.transitions_lost.is_empty()
            && self.transitions_duplicated.is_empty()
            && self.out_of_order.is_empty()
            && self.commands_lost.is_empty()
            && self.calls_duplicated.is_empty()
            && self.stream_duplicates.is_empty()
            && self.results_lost.is_empty()
            && self.timers_wrong.is_empty()
            && self.stuck.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |v: &Vec<String>| {
            format!("{}{}", v.len(), if v.is_empty() { String::new() } else { format!(" {:?}", &v[..v.len().min(5)]) })
        };
        write!(
            f,
            "events {}, crashes {}, lost transitions {}, duplicated transitions {}, out of order {}, lost commands {}, duplicated calls {}, calls retried across a crash {}, stream duplicates {}, stream records repeated across a crash {}, lost results {}, wrong timers {}, stuck {}",
            self.events,
            self.crashes,
            n(&self.transitions_lost),
            n(&self.transitions_duplicated),
            n(&self.out_of_order),
            n(&self.commands_lost),
            n(&self.calls_duplicated),
            self.calls_retried_across_crash,
            n(&self.stream_duplicates),
            self.stream_repeats_across_crash,
            n(&self.results_lost),
            n(&self.timers_wrong),
            n(&self.stuck)
        )
    }
}

/// The checker. Expected per published event `(key, n, id)`: `n` once in the key's `seen`, in
/// publish order; one Gateway `Note` and one upstream `pay` call under the deterministic work
/// ids; one command on WORKFLOW_COMMANDS and one result on WORKFLOW_EVENTS; `n` once in
/// `results`; for `n % 10 == 0` one timer tick. A second call under the same idempotency key
/// counts as a duplicate unless a crash happened between the two calls.
#[allow(clippy::too_many_arguments)]
/// How long after a crash mark a fixture may still record a call the crashed process sent.
const RECORD_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

pub fn check(
    sent: &[Sent],
    states: &BTreeMap<String, serde_json::Value>,
    gateway: &[runner::fixture::Recorded],
    upstream: &[runner::fixture::Recorded],
    commands: &[Stored],
    results: &[Stored],
    crashes: &[Instant],
) -> Report {
    let mut r = Report { events: sent.len(), crashes: crashes.len(), ..Default::default() };
    let mut calls: BTreeMap<String, Vec<(Instant, &str)>> = BTreeMap::new();
    let sourced = gateway.iter().map(|r| (r, "gateway")).chain(upstream.iter().map(|r| (r, "upstream")));
    for (rec, source) in sourced {
        calls.entry(rec.header("idempotency-key").unwrap_or("").to_owned()).or_default().push((rec.at, source));
    }
    let origin = crashes.first().copied();
    for (key, calls) in &calls {
        if calls.len() > 1 {
            let (first, last) = (calls.iter().map(|c| c.0).min().unwrap(), calls.iter().map(|c| c.0).max().unwrap());
            // A request the killed process had sent may be recorded by the fixture's thread a
            // little after the crash mark; a restarted process makes no call that soon.
            if crashes.iter().any(|c| first <= *c + RECORD_GRACE && *c <= last) {
                r.calls_retried_across_crash += calls.len() - 1;
            } else {
                // Which fixture, and when (ms after the first crash mark), for the report.
                let at = |t: Instant| match origin {
                    Some(o) if t >= o => format!("+{}", (t - o).as_millis()),
                    Some(o) => format!("-{}", (o - t).as_millis()),
                    None => "-".into(),
                };
                let when: Vec<String> = calls.iter().map(|(t, src)| format!("{src}@{}ms", at(*t))).collect();
                r.calls_duplicated.push(format!("{key} ({})", when.join(", ")));
            }
        }
    }
    let mut stream_ids: BTreeMap<String, usize> = BTreeMap::new();
    for m in commands {
        *stream_ids.entry(m.json()["command_id"].as_str().unwrap_or("").to_owned()).or_default() += 1;
    }
    let mut result_ids: BTreeMap<String, usize> = BTreeMap::new();
    for m in results {
        *result_ids.entry(m.json()["command_id"].as_str().unwrap_or("").to_owned()).or_default() += 1;
    }
    for (id, n) in stream_ids.iter().chain(result_ids.iter()) {
        if *n > 1 {
            if crashes.is_empty() {
                r.stream_duplicates.push(id.clone());
            } else {
                r.stream_repeats_across_crash += n - 1;
            }
        }
    }
    let mut by_key: BTreeMap<&str, Vec<&Sent>> = BTreeMap::new();
    for s in sent {
        by_key.entry(&s.key).or_default().push(s);
    }
    for (key, events) in by_key {
        let tenant = key.split('-').next().unwrap_or("");
        let Some(state) = states.get(key) else {
            r.transitions_lost.push(format!("{key}: no instance"));
            continue;
        };
        let list = |f: &str| -> Vec<u64> {
            state["state"][f].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect()).unwrap_or_default()
        };
        let seen = list("seen");
        let expected: Vec<u64> = events.iter().map(|e| e.n).collect();
        let seen_set: BTreeSet<u64> = seen.iter().copied().collect();
        if seen_set.len() != seen.len() {
            r.transitions_duplicated.push(format!("{key}: {seen:?}"));
        }
        for e in &events {
            if !seen_set.contains(&e.n) {
                r.transitions_lost.push(format!("{key} n={}", e.n));
            }
        }
        let positions: Vec<u64> = seen.iter().copied().filter(|n| expected.contains(n)).collect();
        let mut dedup = positions.clone();
        dedup.dedup();
        if dedup != expected.iter().copied().filter(|n| seen_set.contains(n)).collect::<Vec<_>>() {
            r.out_of_order.push(format!("{key}: {seen:?}"));
        }
        let res = list("results");
        let res_set: BTreeSet<u64> = res.iter().copied().collect();
        if res_set.len() != res.len() {
            r.transitions_duplicated.push(format!("{key} results: {res:?}"));
        }
        let ticks = list("ticks");
        let want_ticks: Vec<u64> = expected.iter().copied().filter(|n| n % 10 == 0).collect();
        let mut got_ticks = ticks.clone();
        got_ticks.sort_unstable();
        if got_ticks != want_ticks {
            r.timers_wrong.push(format!("{key}: ticks {ticks:?}, expected {want_ticks:?}"));
        }
        for e in &events {
            let note = shards::ids::work_id(tenant, LEDGER_SAGA, key, &e.id, 0);
            let pay = shards::ids::work_id(tenant, LEDGER_SAGA, key, &e.id, 1);
            if !calls.contains_key(&note) {
                r.commands_lost.push(format!("Note {key} n={}", e.n));
            }
            if !calls.contains_key(&pay) {
                r.commands_lost.push(format!("pay call {key} n={}", e.n));
            }
            if !stream_ids.contains_key(&pay) {
                r.commands_lost.push(format!("pay command {key} n={}", e.n));
            }
            if !result_ids.contains_key(&pay) || !res_set.contains(&e.n) {
                r.results_lost.push(format!("{key} n={}", e.n));
            }
        }
        if state["pending_outbox"].as_array().is_some_and(|a| !a.is_empty()) || state["status"] != "running" {
            r.stuck.push(format!("{key}: status {}, pending outbox {}", state["status"], state["pending_outbox"]));
        }
    }
    r
}

/// A `runner serve` process.
pub struct RunnerProcess {
    pub child: Child,
    pub stderr: PathBuf,
    pub port: u16,
}

impl RunnerProcess {
    /// Starts `runner serve --config CONFIG` with extra environment (e.g. RUNNER_FAILPOINTS).
    pub fn start(config: &Path, port: u16, env: &[(&str, &str)], log: &Path) -> Self {
        let stderr = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(["serve", "--config"]).arg(config).stdout(Stdio::null()).stderr(stderr);
        // The checks read info lines of the log: the caller's RUST_LOG must not filter them.
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self { child: cmd.spawn().unwrap(), stderr: log.to_owned(), port }
    }

    pub fn wait_ready(&mut self, h: &Harness, timeout: Duration) {
        let url = format!("http://127.0.0.1:{}/ready", self.port);
        let deadline = Instant::now() + timeout;
        while h.http("GET", &url, None, None).0 != 200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the runner exited ({status}) before it was ready; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the runner was not ready within {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns whether it exited cleanly.
    pub fn sigterm(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// The process's peak resident set so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib / 1024
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the process ends by itself; returns the signal that ended it, if any.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.signal();
            }
            assert!(Instant::now() < deadline, "the runner did not exit within {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A supervisor's restart loop: `running` was started from `config` with `env`; each time
/// it dies it is marked in `sc.crashes` and started again (log `start-N.log` in the
/// scenario's directory), until `settled` holds while it is up. Panics when it died at each
/// of `max_starts` starts, or after `timeout`. Returns the running process and the logs of
/// the runs that died.
pub fn supervise(
    sc: &mut Scenario,
    mut running: RunnerProcess,
    config: &Path,
    env: &[(&str, &str)],
    max_starts: usize,
    timeout: Duration,
    settled: &dyn Fn(&Scenario) -> bool,
) -> (RunnerProcess, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut died = Vec::new();
    loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            sc.crashes.push(Instant::now());
            let log = running.log();
            let starts = died.len() + 1;
            let tail = log.len().saturating_sub(4_000);
            let tail = log.char_indices().map(|(i, _)| i).find(|i| *i >= tail).unwrap_or(0);
            assert!(
                starts < max_starts,
                "{}: the runner died at each of {starts} starts (last: {status}); last log ends:\n{}",
                sc.name,
                &log[tail..]
            );
            died.push(log);
            let next = sc.h.dir.path().join(format!("start-{}.log", starts + 1));
            running = RunnerProcess::start(config, running.port, env, &next);
            continue;
        }
        if settled(sc) && running.child.try_wait().unwrap().is_none() {
            return (running, died);
        }
        assert!(Instant::now() < deadline, "{}: not settled after {timeout:?}", sc.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Fault scenarios are heavy (a nats-server and runner processes each): run one at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies a directory tree (evidence of a failed scenario).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
