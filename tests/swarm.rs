//! Deployment files: the checked-in Swarm stack is a fresh render of `swarm/ranges.yaml`;
//! `docker stack config` (the Docker CLI alone, no engine) accepts the stack and the compose
//! files; the rendered services keep the rules a range needs (one single-replica service per
//! range, placed by node label, stop-first updates, health checks, secrets only by reference);
//! and the monitoring files watch metrics the runner really exports.

use figment::providers::{Format, Yaml};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn yaml(text: &str, what: &str) -> Value {
    Yaml::from_str(text).unwrap_or_else(|e| panic!("{what} is not YAML: {e}"))
}

/// `docker stack config -c FILE...`: the merged, interpolated file as JSON, and the client's
/// stderr (its warnings). Variables the files interpolate are removed from the environment so
/// the defaults written in the files are what gets checked.
fn stack_config(files: &[&str]) -> (Value, String) {
    let mut cmd = Command::new("docker");
    cmd.args(["stack", "config"]);
    for f in files {
        cmd.arg("-c").arg(root().join(f));
    }
    for var in ["RUNNER_IMAGE", "PAYMENTS_URL", "SHIPPING_URL"] {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run `docker` ({e}): these tests need the Docker CLI (the client only, no engine), e.g. \
             `apt-get install docker.io` or docker-ce-cli"
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "docker stack config -c {files:?} failed:\n{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    (yaml(&stdout, "docker stack config output"), stderr)
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.to_ascii_lowercase().contains("warn")).collect()
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or_else(|| panic!("{path} is not a string: {}", at(v, path)))
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('/') {
        cur = match cur {
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            Value::Object(m) => m.get(part),
            _ => None,
        }
        .unwrap_or_else(|| panic!("no {path} (stopped at {part:?})"));
    }
    cur
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// A Go duration as Docker prints it (`30s`, `1m30s`, `2m0s`), in milliseconds.
fn go_duration_ms(text: &str) -> u64 {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            1.0
        } else {
            match c {
                'h' => 3_600_000.0,
                'm' => 60_000.0,
                's' => 1_000.0,
                _ => panic!("unexpected duration {text:?}"),
            }
        };
        total += num.parse::<f64>().unwrap_or_else(|_| panic!("bad duration {text:?}")) * unit;
        num.clear();
    }
    assert!(num.is_empty(), "duration without unit: {text:?}");
    total as u64
}

#[test]
fn the_checked_in_stack_is_a_fresh_render_of_the_ranges_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("platform.yml");
    let run = Command::new(env!("CARGO_BIN_EXE_runner"))
        .current_dir(root())
        .args(["swarm", "render", "--ranges", "swarm/ranges.yaml", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "render failed: {}", String::from_utf8_lossy(&run.stderr));
    let fresh = std::fs::read_to_string(&out).unwrap();
    let checked_in = read("swarm/stacks/platform.yml");
    assert!(
        fresh == checked_in,
        "swarm/stacks/platform.yml is stale: run `cargo run -- swarm render --out swarm/stacks/platform.yml` and \
         commit it"
    );
    // stdout carries the same bytes, and rendering twice changes nothing.
    let stdout =
        Command::new(env!("CARGO_BIN_EXE_runner")).current_dir(root()).args(["swarm", "render"]).output().unwrap();
    assert!(stdout.status.success());
    assert_eq!(String::from_utf8(stdout.stdout).unwrap(), checked_in);

    // A broken ranges file fails, naming the file and the field, and writes nothing.
    let bad = dir.path().join("ranges.yaml");
    std::fs::write(&bad, "ranges:\n  - {name: a, tenants: [acme]}\n  - {name: b, tenants: [acme], shards: 0}\n")
        .unwrap();
    let out2 = dir.path().join("never.yml");
    let run = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["swarm", "render", "--ranges"])
        .arg(&bad)
        .arg("--out")
        .arg(&out2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains(&*bad.to_string_lossy()) && err.contains("`ranges[1].shards` = 0"), "{err}");
    assert!(err.contains("ranges \"a\" and \"b\""), "{err}");
    assert!(!out2.exists());
}

#[test]
fn docker_accepts_the_stack_and_each_range_is_one_pinned_stop_first_service() {
    let plan = runner::swarm::load(&root().join("swarm/ranges.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let (stack, stderr) = stack_config(&["swarm/stacks/platform.yml"]);
    assert!(warnings(&stderr).is_empty(), "docker stack config warned:\n{stderr}");

    let services = at(&stack, "services").as_object().unwrap();
    let mut expected: BTreeSet<String> = plan.nats.names().into_iter().collect();
    expected.extend(plan.ranges.iter().map(|r| r.service()));
    assert_eq!(services.keys().cloned().collect::<BTreeSet<_>>(), expected, "one service per range, plus NATS");

    let declared_volumes = at(&stack, "volumes").as_object().unwrap();
    let mut prefixes = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut filters: Vec<(String, String, String)> = Vec::new(); // (role, range, filter)
    for r in &plan.ranges {
        let svc = &services[&r.service()];
        let env = |k: &str| s(svc, &format!("environment/{k}")).to_owned();

        // One owner: a single replica, placed by the range's node label, at most one per node.
        assert_eq!(s(svc, "deploy/mode"), "replicated");
        assert_eq!(at(svc, "deploy/replicas"), 1, "{}", r.name);
        assert_eq!(
            strings(at(svc, "deploy/placement/constraints")),
            [format!("node.labels.tenant_range == {}", r.node_label)]
        );
        assert_eq!(at(svc, "deploy/placement/max_replicas_per_node"), 1);
        assert!(labels.insert(r.node_label.clone()), "two ranges on node label {}", r.node_label);

        // Updates and rollbacks stop the old task before starting the new one.
        for cfg in ["update_config", "rollback_config"] {
            assert_eq!(s(svc, &format!("deploy/{cfg}/order")), "stop-first", "{} {cfg}", r.name);
            assert_eq!(at(svc, &format!("deploy/{cfg}/parallelism")), 1);
        }
        assert_eq!(s(svc, "deploy/update_config/failure_action"), "rollback");

        // Health: /health only (liveness), on the port the runner listens on. Not /ready: a
        // drain or a NATS outage makes a runner not ready, and Swarm would replace the task.
        let test = strings(at(svc, "healthcheck/test"));
        let port = env("RUNNER_HTTP__ADDR").rsplit(':').next().unwrap().to_owned();
        assert_eq!(test[0], "CMD", "exec form, no shell");
        assert!(test.contains(&format!("http://127.0.0.1:{port}/health")), "{test:?}");
        assert!(!test.iter().any(|a| a.ends_with("/ready")), "the health check must not use /ready: {test:?}");
        assert!(test.contains(&"--fail".to_owned()), "{test:?}");
        assert!(at(svc, "healthcheck/start_period").is_string());

        // SIGTERM drains; Swarm waits longer than the drain deadline before SIGKILL.
        let drain: u64 = env("RUNNER_SHUTDOWN__DRAIN_DEADLINE_MS").parse().unwrap();
        assert_eq!(drain, r.drain_deadline_ms);
        let grace = go_duration_ms(s(svc, "stop_grace_period"));
        assert!(grace > drain, "{}: stop_grace_period {grace} ms <= drain deadline {drain} ms", r.name);

        // Thread-per-core: shards = reserved CPUs; the limit leaves one CPU for the bridge.
        let shards: u64 = env("RUNNER_SHARDS").parse().unwrap();
        assert_eq!(shards as usize, r.shards);
        let reserved: f64 = s(svc, "deploy/resources/reservations/cpus").parse().unwrap();
        let limit: f64 = s(svc, "deploy/resources/limits/cpus").parse().unwrap();
        assert_eq!(reserved, shards as f64, "{}", r.name);
        assert_eq!(limit, shards as f64 + 1.0, "{}", r.name);
        assert!(at(svc, "deploy/resources/limits/memory").is_string());
        assert!(at(svc, "deploy/resources/reservations/memory").is_string());
        assert_eq!(at(svc, "ulimits/memlock/soft"), -1);

        // The data dir is a named volume of its own, declared by the stack.
        assert_eq!(env("RUNNER_DATA_DIR"), "/data");
        let vols = at(svc, "volumes").as_array().unwrap();
        let data = vols.iter().find(|v| v["target"] == "/data").expect("a volume at /data");
        assert_eq!(data["type"], "volume");
        let vol = data["source"].as_str().unwrap();
        assert!(declared_volumes.contains_key(vol), "volume {vol} not declared");
        assert_eq!(vol, r.volume());

        // Its own durable consumers, its own filters.
        let prefix = env("RUNNER_CONSUMERS__DURABLE_PREFIX");
        assert!(prefixes.insert(prefix.clone()), "durable prefix {prefix} shared");
        assert_eq!(
            env("RUNNER_MODE"),
            match r.mode {
                runner::config::Mode::Saga => "saga",
                runner::config::Mode::Effect => "effect",
                runner::config::Mode::Combined => "combined",
            }
        );
        assert_eq!(env("RUNNER_NATS__URL"), plan.nats.client_url());
        for (role, var) in [
            ("aggregate", "RUNNER_CONSUMERS__AGGREGATE_FILTERS"),
            ("results", "RUNNER_CONSUMERS__RESULT_FILTERS"),
            ("commands", "RUNNER_CONSUMERS__COMMAND_FILTERS"),
        ] {
            if let Some(Value::String(list)) = svc["environment"].get(var) {
                let parsed: Vec<String> = serde_json::from_str(list).expect("a TOML/JSON string array");
                for f in parsed {
                    filters.push((role.into(), r.name.clone(), f));
                }
            }
        }

        // Secrets: every stack secret in services that run effects, none elsewhere.
        let mounted: Vec<String> = svc
            .get("secrets")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|x| x["source"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        if r.mode.runs_effects() {
            assert_eq!(mounted, plan.secrets, "{}", r.name);
            assert_eq!(env("RUNNER_EFFECTS__SECRETS_DIR"), "/run/secrets");
            for m in svc["secrets"].as_array().unwrap() {
                assert_eq!(m["target"], m["source"], "mounted at /run/secrets/<name>");
                assert_eq!(m["uid"], runner::swarm::RUNTIME_UID.to_string());
            }
        } else {
            assert!(mounted.is_empty(), "{} runs no effects but mounts {mounted:?}", r.name);
        }
    }
    // No subject has two owners in the same role.
    for (i, a) in filters.iter().enumerate() {
        for b in &filters[i + 1..] {
            assert!(
                a.0 != b.0 || a.1 == b.1 || !runner::swarm::filters_overlap(&a.2, &b.2),
                "ranges {} and {} both own {} {} / {}",
                a.1,
                b.1,
                a.0,
                a.2,
                b.2
            );
        }
    }

    // NATS: JetStream on its own volume, clustered, pinned, stop-first.
    for name in plan.nats.names() {
        let svc = &services[&name];
        let cmd = strings(&svc["command"]);
        assert!(cmd.contains(&"--jetstream".to_owned()) && cmd.contains(&"/data".to_owned()), "{cmd:?}");
        if plan.nats.servers > 1 {
            assert!(cmd.contains(&"--routes".to_owned()), "{cmd:?}");
        }
        assert_eq!(strings(at(svc, "deploy/placement/constraints")), [format!("node.labels.nats == {name}")]);
        assert_eq!(s(svc, "deploy/update_config/order"), "stop-first");
        assert!(declared_volumes.contains_key(&format!("{name}-data")));
    }
}

#[test]
fn the_stack_holds_no_secret_values() {
    let text = read("swarm/stacks/platform.yml");
    let (stack, _) = stack_config(&["swarm/stacks/platform.yml"]);
    let plan = runner::swarm::load(&root().join("swarm/ranges.yaml")).unwrap_or_else(|e| panic!("{e}"));

    // Secrets are references to Swarm secrets created out of band, never contents or files.
    let secrets = at(&stack, "secrets").as_object().unwrap();
    assert_eq!(secrets.keys().cloned().collect::<Vec<_>>(), plan.secrets);
    for (name, def) in secrets {
        assert_eq!(def["external"], true, "secret {name} must be external");
        for key in ["file", "environment", "content"] {
            assert!(def.get(key).is_none(), "secret {name} carries a {key}");
        }
    }
    // No credential-looking variable anywhere.
    for (svc, def) in at(&stack, "services").as_object().unwrap() {
        if let Some(env) = def.get("environment").and_then(Value::as_object) {
            for k in env.keys() {
                let upper = k.to_ascii_uppercase();
                let credential = ["TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE", "API_KEY"]
                    .iter()
                    .any(|w| upper.contains(w))
                    || (upper.contains("SECRET") && upper != "RUNNER_EFFECTS__SECRETS_DIR");
                assert!(!credential, "{svc} sets {k} in the stack file");
            }
        }
    }
    // Not even the development placeholder of the compose file.
    let dev = read("docker/dev-secrets/payments_token");
    assert!(!text.contains(dev.trim()), "the stack contains the development secret value");

    // Every secret the effect manifests use is mounted, so `secret:NAME` resolves in Swarm.
    let manifests = shards::manifest::ManifestSet::load(&[root().join("examples/order/effects.yaml")], &|_| Ok(()))
        .unwrap_or_else(|e| panic!("{e}"));
    let used: BTreeSet<String> = manifests.effects.values().flat_map(|e| e.secret_refs()).collect();
    assert!(!used.is_empty(), "the example effects use a secret");
    for name in used {
        assert!(plan.secrets.contains(&name), "effects use secret:{name} but the stack does not mount it");
    }
}

#[test]
fn the_compose_files_pass_docker_stack_config() {
    let (base, stderr) = stack_config(&["docker/compose.yml"]);
    // The only warnings: Swarm ignores the loopback address of published ports (compose honours it).
    for w in warnings(&stderr) {
        assert!(w.contains("ignoring IP-address (127.0.0.1:"), "unexpected warning: {w}");
    }
    let nats = at(&base, "services/nats");
    let cmd = strings(&nats["command"]);
    assert!(cmd.contains(&"--jetstream".to_owned()) && cmd.contains(&"--store_dir".to_owned()), "{cmd:?}");
    assert_eq!(at(nats, "volumes/0/target"), "/data");
    assert_eq!(at(nats, "volumes/0/type"), "volume", "JetStream keeps its store on a volume");

    let runner = at(&base, "services/runner");
    assert_eq!(s(runner, "build/dockerfile"), "docker/Dockerfile");
    assert_eq!(s(runner, "environment/RUNNER_MODE"), "combined");
    assert_eq!(s(runner, "environment/RUNNER_NATS__URL"), "nats://nats:4222");
    let vols = runner["volumes"].as_array().unwrap();
    assert!(vols.iter().any(|v| v["target"] == "/data" && v["type"] == "volume"));
    assert!(vols.iter().any(|v| v["target"] == "/app/examples" && v["read_only"] == true));
    assert!(strings(&runner["security_opt"]).iter().any(|o| o.starts_with("seccomp=")), "io_uring needs seccomp");
    assert!(go_duration_ms(s(runner, "stop_grace_period")) > 20_000);
    assert!(Path::new(s(&base, "secrets/payments_token/file")).is_file());

    let (full, _) = stack_config(&["docker/compose.yml", "docker/compose.monitoring.yml"]);
    let names: BTreeSet<&str> = at(&full, "services").as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["grafana", "nats", "prometheus", "runner"]));
    let prom = at(&full, "services/prometheus");
    let mounts = prom["volumes"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|v| v["target"] == "/etc/prometheus/prometheus.yml"
                && Path::new(v["source"].as_str().unwrap()).is_file())
    );
    let grafana = at(&full, "services/grafana");
    for target in ["/etc/grafana/provisioning", "/var/lib/grafana/dashboards"] {
        let m = grafana["volumes"].as_array().unwrap().iter().find(|v| v["target"] == target).expect(target);
        assert!(Path::new(m["source"].as_str().unwrap()).is_dir(), "{target} source missing");
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn prometheus_and_grafana_watch_metrics_the_runner_exports() {
    // Prometheus scrapes the runner on the port its container config listens on.
    let prom = yaml(&read("docker/prometheus.yml"), "docker/prometheus.yml");
    let targets = strings(at(&prom, "scrape_configs/0/static_configs/0/targets"));
    let cfg = runner::config::load(Some(&root().join("docker/runner.toml")), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(targets, [format!("runner:{}", cfg.http_addr.port())]);
    assert_eq!(s(&prom, "scrape_configs/0/metrics_path"), "/metrics");

    // The dashboard uses the provisioned data source.
    let ds = yaml(&read("docker/grafana/provisioning/datasources/prometheus.yml"), "datasource provisioning");
    let uid = s(&ds, "datasources/0/uid").to_owned();
    assert_eq!(s(&ds, "datasources/0/url"), "http://prometheus:9090");
    let provider = yaml(&read("docker/grafana/provisioning/dashboards/runner.yml"), "dashboard provisioning");
    assert_eq!(s(&provider, "providers/0/options/path"), "/var/lib/grafana/dashboards");
    let dash: Value = serde_json::from_str(&read("docker/grafana/dashboards/runner.json")).expect("dashboard JSON");
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], uid.as_str(), "panel {}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], uid.as_str());
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10, "the dashboard shows the runner's metrics");

    // Every metric it queries is one the code registers (histograms as _bucket series).
    let mut source = String::new();
    rust_sources(&root().join("src"), &mut source);
    rust_sources(&root().join("shards/src"), &mut source);
    let mut metrics = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("runner_") {
            let name: String =
                rest[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            let base = name.strip_suffix("_bucket").unwrap_or(&name).to_owned();
            metrics.insert(base);
        }
    }
    for m in &metrics {
        assert!(source.contains(&format!("\"{m}\"")), "the dashboard queries {m}, which no code registers");
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // `runner swarm render | head -0`: the reader is gone before anything is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_runner"))
        .current_dir(root())
        .args(["swarm", "render"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    assert!(out.status.success() || out.status.signal() == Some(13), "exit {:?}: {stderr}", out.status);
}
