//! Docker Swarm: tenant ranges, defined once in `swarm/ranges.yaml`, rendered into the stack
//! file (`swarm/stacks/platform.yml`) by `runner swarm render`.
//!
//! A range is a set of tenants (or explicit subject filters) owned by exactly one runner
//! service, pinned to one labelled node (`node.labels.tenant_range==<label>`) where its data
//! volume lives. The renderer refuses a ranges file in which two ranges could consume the same
//! subject, so no key ever has two owners. The output is deterministic (same file in, same
//! bytes out) so the checked-in stack can be held to a fresh render by a test.
//!
//! ```text
//! swarm/ranges.yaml ──parse──► RawRanges ──validate──► Stack ──render──► platform.yml
//!                                          (every problem, naming file and field)
//! ```

use crate::config::Mode;
use anyhow::Context as _;
use serde::Deserialize;
use shards::manifest::{check_subject_filter, subject_matches, valid_name};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

/// The uid/gid the image runs as (`docker/Dockerfile` creates it); secrets are mounted for it.
pub const RUNTIME_UID: u32 = 10001;
/// The port of `/health`, `/ready` and `/metrics` inside the container.
pub const HTTP_PORT: u16 = 8080;
/// Where the data volume is mounted inside the container.
pub const DATA_DIR: &str = "/data";
/// Added to the drain deadline for `stop_grace_period`, so Swarm never SIGKILLs a drain.
pub const GRACE_MARGIN_MS: u64 = 10_000;

const DEFAULT_IMAGE: &str = "${RUNNER_IMAGE:-runner:0.1.0}";
const DEFAULT_NATS_IMAGE: &str = "nats:2.10-alpine";

/// Variables the renderer sets itself per range; setting them in `env` would silently lose.
const RESERVED_ENV: &[(&str, &str)] = &[
    ("RUNNER_MODE", "ranges[].mode"),
    ("RUNNER_SHARDS", "ranges[].shards"),
    ("RUNNER_PIN_CORES", "ranges[].pin_cores"),
    ("RUNNER_DATA_DIR", "the data volume (fixed at /data)"),
    ("RUNNER_NATS__URL", "nats.servers"),
    ("RUNNER_HTTP__ADDR", "the health check port (fixed at 0.0.0.0:8080)"),
    ("RUNNER_CONSUMERS__DURABLE_PREFIX", "the range name"),
    ("RUNNER_CONSUMERS__AGGREGATE_FILTERS", "ranges[].tenants or ranges[].filters.aggregate"),
    ("RUNNER_CONSUMERS__RESULT_FILTERS", "ranges[].tenants or ranges[].filters.results"),
    ("RUNNER_CONSUMERS__COMMAND_FILTERS", "ranges[].tenants or ranges[].filters.commands"),
    ("RUNNER_SHUTDOWN__DRAIN_DEADLINE_MS", "ranges[].drain_deadline_ms"),
    ("RUNNER_EFFECTS__SECRETS_DIR", "the Swarm secrets mount (fixed at /run/secrets)"),
    ("RUNNER_CONFIG", "the image's config file"),
];

/// Parts of variable names that hold credentials: those go in Swarm secrets, never in the stack.
const SECRET_WORDS: &[&str] = &["TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "PRIVATE", "API_KEY", "APIKEY"];

// ---------------------------------------------------------------------------------------------
// The file as written.

/// `swarm/ranges.yaml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRanges {
    /// Runner image; Docker interpolates `${VAR:-default}` at deploy time. Default
    /// `${RUNNER_IMAGE:-runner:0.1.0}`.
    #[serde(default)]
    pub image: Option<String>,
    /// The NATS cluster of the stack.
    #[serde(default)]
    pub nats: RawNats,
    /// Settings every range inherits unless it sets its own.
    #[serde(default)]
    pub defaults: RawDefaults,
    /// Extra variables of every runner service (manifest variables such as `PAYMENTS_URL`,
    /// `RUNNER_*` settings the renderer does not set). Never credentials. Default none.
    #[serde(default)]
    pub env: BTreeMap<String, Scalar>,
    /// Swarm secrets (made beforehand with `docker secret create NAME -`), mounted at
    /// `/run/secrets/NAME` in every service that runs effects. Default none.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// The ranges, in the order the stack lists them.
    pub ranges: Vec<RawRange>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNats {
    /// Default `nats:2.10-alpine`.
    pub image: Option<String>,
    /// Servers in the cluster: 1, 3 or 5, each pinned to a node labelled `nats==nats-<i>`.
    /// Default 3.
    pub servers: Option<usize>,
    /// Default `runner`.
    pub cluster_name: Option<String>,
    /// CPUs reserved per server. Default 1.
    pub cpus: Option<f64>,
    /// Memory limit per server. Default `2G`.
    pub memory: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Default `combined`.
    pub mode: Option<Mode>,
    /// Shards = CPUs reserved for the range. Default 2.
    pub shards: Option<usize>,
    /// Pin shard i to CPU i. Default true.
    pub pin_cores: Option<bool>,
    /// Memory limit. Default `4G`.
    pub memory: Option<String>,
    /// Memory reserved. Default `1G`.
    pub memory_reservation: Option<String>,
    /// SIGTERM drain deadline. Default 20,000 ms.
    pub drain_deadline_ms: Option<u64>,
    /// Health check failures are not counted for this long after a start. Default 120 s.
    pub start_period_s: Option<u64>,
}

/// One range. Exactly one of `tenants` and `filters`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRange {
    /// Lowercase letters, digits and `-`, at most 25; the service is `runner-<name>`.
    pub name: String,
    /// Value of the node label `tenant_range` that places it. Default: the name.
    pub node: Option<String>,
    /// Tenant ids; the filters are derived (`events.<t>.>`, `workflow.events.<t>.>`,
    /// `workflow.commands.<t>.>`).
    pub tenants: Option<Vec<String>>,
    /// Explicit subject filters instead of tenants.
    pub filters: Option<RawFilters>,
    pub mode: Option<Mode>,
    pub shards: Option<usize>,
    pub pin_cores: Option<bool>,
    pub memory: Option<String>,
    pub memory_reservation: Option<String>,
    pub drain_deadline_ms: Option<u64>,
    pub start_period_s: Option<u64>,
    /// Extra variables of this range only (override the stack's `env`).
    #[serde(default)]
    pub env: BTreeMap<String, Scalar>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilters {
    /// On the aggregate stream (sagas).
    #[serde(default)]
    pub aggregate: Vec<String>,
    /// On the workflow events stream: effect results (sagas).
    #[serde(default)]
    pub results: Vec<String>,
    /// On the workflow commands stream (effect workers).
    #[serde(default)]
    pub commands: Vec<String>,
}

/// A variable's value as written (YAML may give a number or a boolean).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated.

/// A validated ranges file: everything the stack is rendered from.
#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    /// The ranges file's name, for the generated header.
    pub source: String,
    pub image: String,
    pub nats: NatsPlan,
    /// Swarm secrets mounted into services that run effects.
    pub secrets: Vec<String>,
    pub ranges: Vec<RangePlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NatsPlan {
    pub image: String,
    pub servers: usize,
    pub cluster_name: String,
    pub cpus: f64,
    pub memory: String,
}

impl NatsPlan {
    /// Service names, `nats-1` … `nats-N`.
    pub fn names(&self) -> Vec<String> {
        (1..=self.servers).map(|i| format!("nats-{i}")).collect()
    }

    /// The URL list every runner connects with.
    pub fn client_url(&self) -> String {
        self.names().iter().map(|n| format!("nats://{n}:4222")).collect::<Vec<_>>().join(",")
    }
}

/// One range, ready to render.
#[derive(Debug, Clone, PartialEq)]
pub struct RangePlan {
    pub name: String,
    /// The value of `node.labels.tenant_range` that places it.
    pub node_label: String,
    pub mode: Mode,
    /// Tenants (empty when the range was given as filters).
    pub tenants: Vec<String>,
    /// Filters per consumer role; empty where the mode does not run that role.
    pub aggregate_filters: Vec<String>,
    pub result_filters: Vec<String>,
    pub command_filters: Vec<String>,
    pub shards: usize,
    pub pin_cores: bool,
    pub memory: String,
    pub memory_reservation: String,
    pub drain_deadline_ms: u64,
    pub start_period_s: u64,
    /// All variables of the service (stack `env`, range `env`, then the derived ones).
    pub env: BTreeMap<String, String>,
}

impl RangePlan {
    /// The Swarm service name.
    pub fn service(&self) -> String {
        format!("runner-{}", self.name)
    }

    /// The durable consumer prefix: one per range, so ranges never share a consumer.
    pub fn durable_prefix(&self) -> String {
        format!("runner-{}", self.name)
    }

    /// The data volume's name in the stack.
    pub fn volume(&self) -> String {
        format!("runner-{}-data", self.name)
    }

    /// `stop_grace_period` in seconds: the drain deadline plus a margin.
    pub fn grace_period_s(&self) -> u64 {
        (self.drain_deadline_ms + GRACE_MARGIN_MS).div_ceil(1000)
    }
}

/// Every problem of one ranges file, each naming the file and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmErrors(pub Vec<String>);

impl std::fmt::Display for SwarmErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} problem(s) in the tenant-range file:", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SwarmErrors {}

/// Reads and validates a ranges file.
pub fn load(path: &Path) -> Result<Stack, SwarmErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SwarmErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates ranges-file text; `origin` names it in messages.
pub fn parse(text: &str, origin: &str) -> Result<Stack, SwarmErrors> {
    use figment::providers::{Format, Yaml};
    let raw: RawRanges = Yaml::from_str(text).map_err(|e| SwarmErrors(vec![format!("{origin}: {e}")]))?;
    let source = Path::new(origin).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    validate(raw, origin, &source)
}

/// Which consumers a role reads, for the ownership check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Aggregate,
    Results,
    Commands,
}

impl Role {
    fn field(self) -> &'static str {
        match self {
            Role::Aggregate => "aggregate",
            Role::Results => "results",
            Role::Commands => "commands",
        }
    }
}

fn validate(raw: RawRanges, origin: &str, source: &str) -> Result<Stack, SwarmErrors> {
    let mut errs: Vec<String> = Vec::new();
    let mut bad = |field: &str, value: &dyn std::fmt::Debug, rule: &str| {
        errs.push(format!("{origin}: field `{field}` = {value:?}: {rule}"))
    };

    let image = raw.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into());
    if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bad("image", &image, "must be a non-empty image reference without whitespace");
    }
    let nats = NatsPlan {
        image: raw.nats.image.clone().unwrap_or_else(|| DEFAULT_NATS_IMAGE.into()),
        servers: raw.nats.servers.unwrap_or(3),
        cluster_name: raw.nats.cluster_name.clone().unwrap_or_else(|| "runner".into()),
        cpus: raw.nats.cpus.unwrap_or(1.0),
        memory: raw.nats.memory.clone().unwrap_or_else(|| "2G".into()),
    };
    if nats.image.is_empty() || nats.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bad("nats.image", &nats.image, "must be a non-empty image reference without whitespace");
    }
    if ![1, 3, 5].contains(&nats.servers) {
        bad("nats.servers", &nats.servers, "must be 1, 3 or 5 (JetStream needs a majority of an odd cluster)");
    }
    if !valid_name(&nats.cluster_name) {
        bad("nats.cluster_name", &nats.cluster_name, "1-64 ASCII letters, digits, `_` or `-`");
    }
    if !(nats.cpus > 0.0 && nats.cpus <= 256.0) {
        bad("nats.cpus", &nats.cpus, "must be above 0 and at most 256");
    }
    if memory_bytes(&nats.memory).is_none() {
        bad("nats.memory", &nats.memory, "must be a size like 512M or 2G");
    }

    let mut secrets = Vec::new();
    for (i, s) in raw.secrets.iter().enumerate() {
        let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            bad(&format!("secrets[{i}]"), s, "secret names are 1-64 ASCII letters, digits, `_`, `.` or `-`");
        } else if secrets.contains(s) {
            bad(&format!("secrets[{i}]"), s, "is listed twice");
        } else {
            secrets.push(s.clone());
        }
    }

    let check_env = |field: &str, env: &BTreeMap<String, Scalar>, errs: &mut Vec<String>| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v) in env {
            let f = format!("{field}.{k}");
            let name_ok = k.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                errs.push(format!("{origin}: field `{f}`: variable names are ASCII letters, digits and `_`"));
                continue;
            }
            if let Some((_, instead)) = RESERVED_ENV.iter().find(|(r, _)| r == k) {
                errs.push(format!("{origin}: field `{f}`: set by the renderer from {instead}; set that instead"));
                continue;
            }
            let upper = k.to_ascii_uppercase();
            if let Some(w) = SECRET_WORDS.iter().find(|w| upper.contains(*w)) {
                // Never echo the value.
                errs.push(format!(
                    "{origin}: field `{f}` (value not shown): looks like a credential ({w}); put it in a Swarm \
                     secret (top-level `secrets`) and reference it as secret:NAME, the stack must hold no secrets"
                ));
                continue;
            }
            let text = v.text();
            if text.chars().any(|c| c.is_control()) {
                errs.push(format!("{origin}: field `{f}`: control characters (newlines) are not allowed"));
                continue;
            }
            out.insert(k.clone(), text);
        }
        out
    };
    let stack_env = check_env("env", &raw.env, &mut errs);

    let d = &raw.defaults;
    let mut ranges: Vec<RangePlan> = Vec::new();
    let mut names = BTreeSet::new();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if raw.ranges.is_empty() {
        errs.push(format!("{origin}: field `ranges`: needs at least one range"));
    }
    for (i, r) in raw.ranges.iter().enumerate() {
        let at = format!("ranges[{i}]");
        let mut bad = |field: &str, value: &dyn std::fmt::Debug, rule: &str| {
            errs.push(format!("{origin}: field `{at}.{field}` = {value:?}: {rule}"))
        };
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 25
            && r.name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && r.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            bad(
                "name",
                &r.name,
                "1-25 lowercase letters, digits or `-`, starting with a letter or digit (it names the service, \
                 the volume and the durable consumers)",
            );
        } else if !names.insert(r.name.clone()) {
            bad("name", &r.name, "another range has this name");
        }
        let node_label = r.node.clone().unwrap_or_else(|| r.name.clone());
        let label_ok = !node_label.is_empty()
            && node_label.len() <= 63
            && node_label.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !label_ok {
            bad("node", &node_label, "1-63 ASCII letters, digits, `_`, `.` or `-`");
        } else if let Some(other) = labels.insert(node_label.clone(), r.name.clone()) {
            bad(
                "node",
                &node_label,
                &format!(
                    "range {other:?} is placed on the same node label; one range per node (each pins its shards \
                     to CPUs 0..shards-1 and owns the node's data volume)"
                ),
            );
        }
        let mode = r.mode.or(d.mode).unwrap_or_default();
        let shards = r.shards.or(d.shards).unwrap_or(2);
        if !(1..=1024).contains(&shards) {
            bad("shards", &shards, "must be between 1 and 1024");
        }
        let pin_cores = r.pin_cores.or(d.pin_cores).unwrap_or(true);
        let memory = r.memory.clone().or_else(|| d.memory.clone()).unwrap_or_else(|| "4G".into());
        let memory_reservation =
            r.memory_reservation.clone().or_else(|| d.memory_reservation.clone()).unwrap_or_else(|| "1G".into());
        match (memory_bytes(&memory), memory_bytes(&memory_reservation)) {
            (None, _) => bad("memory", &memory, "must be a size like 512M or 4G"),
            (_, None) => bad("memory_reservation", &memory_reservation, "must be a size like 512M or 4G"),
            (Some(limit), Some(reserved)) if reserved > limit => {
                bad("memory_reservation", &memory_reservation, &format!("must not exceed memory ({memory})"))
            }
            _ => {}
        }
        let drain_deadline_ms = r.drain_deadline_ms.or(d.drain_deadline_ms).unwrap_or(20_000);
        if !(1_000..=3_600_000).contains(&drain_deadline_ms) {
            bad("drain_deadline_ms", &drain_deadline_ms, "must be between 1000 and 3600000");
        }
        let start_period_s = r.start_period_s.or(d.start_period_s).unwrap_or(120);
        if !(10..=3_600).contains(&start_period_s) {
            bad("start_period_s", &start_period_s, "must be between 10 and 3600");
        }

        let (mut tenants, mut aggregate, mut results, mut commands) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        match (&r.tenants, &r.filters) {
            (Some(_), Some(_)) | (None, None) => {
                errs.push(format!("{origin}: field `{at}`: give exactly one of `tenants` and `filters`"));
            }
            (Some(list), None) => {
                if list.is_empty() {
                    errs.push(format!("{origin}: field `{at}.tenants` = []: needs at least one tenant"));
                }
                for (j, t) in list.iter().enumerate() {
                    if !valid_name(t) {
                        errs.push(format!(
                            "{origin}: field `{at}.tenants[{j}]` = {t:?}: tenant ids are 1-64 ASCII letters, digits, \
                             `_` or `-` (they are subject tokens)"
                        ));
                    } else if tenants.contains(t) {
                        errs.push(format!("{origin}: field `{at}.tenants[{j}]` = {t:?}: is listed twice"));
                    } else {
                        tenants.push(t.clone());
                    }
                }
                if mode.runs_sagas() {
                    aggregate = tenants.iter().map(|t| format!("events.{t}.>")).collect();
                    results = tenants.iter().map(|t| format!("workflow.events.{t}.>")).collect();
                }
                if mode.runs_effects() {
                    commands = tenants.iter().map(|t| format!("workflow.commands.{t}.>")).collect();
                }
            }
            (None, Some(f)) => {
                let lists =
                    [(Role::Aggregate, &f.aggregate), (Role::Results, &f.results), (Role::Commands, &f.commands)];
                for (role, list) in lists {
                    let used = match role {
                        Role::Aggregate | Role::Results => mode.runs_sagas(),
                        Role::Commands => mode.runs_effects(),
                    };
                    let field = format!("{at}.filters.{}", role.field());
                    if used && list.is_empty() {
                        errs.push(format!(
                            "{origin}: field `{field}`: mode {} needs at least one filter here",
                            mode_name(mode)
                        ));
                    }
                    if !used && !list.is_empty() {
                        errs.push(format!(
                            "{origin}: field `{field}`: mode {} does not read these; remove them",
                            mode_name(mode)
                        ));
                    }
                    for (j, flt) in list.iter().enumerate() {
                        if let Err(e) = check_subject_filter(flt) {
                            errs.push(format!("{origin}: field `{field}[{j}]`: {e}"));
                        } else if flt.contains('\'') || flt.contains('"') || flt.contains(',') {
                            errs.push(format!(
                                "{origin}: field `{field}[{j}]` = {flt:?}: quotes and commas not allowed"
                            ));
                        }
                    }
                    if used {
                        match role {
                            Role::Aggregate => aggregate = list.clone(),
                            Role::Results => results = list.clone(),
                            Role::Commands => commands = list.clone(),
                        }
                    }
                }
            }
        }

        let mut env = stack_env.clone();
        env.extend(check_env(&format!("{at}.env"), &r.env, &mut errs));
        if let Some(v) = env.get("RUNNER_STREAMS__REPLICAS")
            && v.parse::<usize>().map_or(true, |n| n == 0 || n > nats.servers)
        {
            let field = if r.env.contains_key("RUNNER_STREAMS__REPLICAS") { format!("{at}.env") } else { "env".into() };
            errs.push(format!(
                "{origin}: field `{field}.RUNNER_STREAMS__REPLICAS` = {v:?}: must be between 1 and nats.servers ({})",
                nats.servers
            ));
        }
        let plan = RangePlan {
            name: r.name.clone(),
            node_label,
            mode,
            tenants,
            aggregate_filters: aggregate,
            result_filters: results,
            command_filters: commands,
            shards,
            pin_cores,
            memory,
            memory_reservation,
            drain_deadline_ms,
            start_period_s,
            env,
        };
        let derived = derived_env(&plan, &nats);
        let mut plan = plan;
        plan.env.extend(derived);
        ranges.push(plan);
    }

    check_ownership(&ranges, origin, &mut errs);

    if !errs.is_empty() {
        return Err(SwarmErrors(errs));
    }
    Ok(Stack { source: source.to_owned(), image, nats, secrets, ranges })
}

/// No subject may be consumed by two ranges in the same role (two owners of one key), nor by
/// two filters of one range; and every tenant whose sagas run somewhere has its effects run
/// somewhere, or its commands would wait forever.
fn check_ownership(ranges: &[RangePlan], origin: &str, errs: &mut Vec<String>) {
    let mut claims: Vec<(Role, &str, &str)> = Vec::new(); // role, range, filter
    for r in ranges {
        for f in &r.aggregate_filters {
            claims.push((Role::Aggregate, &r.name, f));
        }
        for f in &r.result_filters {
            claims.push((Role::Results, &r.name, f));
        }
        for f in &r.command_filters {
            claims.push((Role::Commands, &r.name, f));
        }
    }
    let mut reported = BTreeSet::new();
    for (i, a) in claims.iter().enumerate() {
        for b in &claims[i + 1..] {
            if a.0 != b.0 || !filters_overlap(a.2, b.2) {
                continue;
            }
            let key = (a.1, b.1, a.0);
            if !reported.insert(key) {
                continue;
            }
            if a.1 == b.1 {
                errs.push(format!(
                    "{origin}: range {:?}: {} filters {:?} and {:?} overlap (one message would reach two of its \
                     consumers)",
                    a.1,
                    a.0.field(),
                    a.2,
                    b.2
                ));
            } else {
                errs.push(format!(
                    "{origin}: ranges {:?} and {:?} both consume {} subjects matching {:?} and {:?}: a range must \
                     never share keys with another",
                    a.1,
                    b.1,
                    a.0.field(),
                    a.2,
                    b.2
                ));
            }
        }
    }
    for r in ranges.iter().filter(|r| r.mode.runs_sagas()) {
        for t in &r.tenants {
            let probe = format!("workflow.commands.{t}.probe");
            let served = ranges.iter().any(|o| o.command_filters.iter().any(|f| subject_matches(f, &probe)));
            if !served {
                errs.push(format!(
                    "{origin}: range {:?}: tenant {t:?} runs sagas but no range runs its effects (add it to a range \
                     with mode effect or combined)",
                    r.name
                ));
            }
        }
    }
}

/// Whether two NATS subject filters can match a common subject.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    fn go(a: &[&str], b: &[&str]) -> bool {
        match (a.split_first(), b.split_first()) {
            // `>` matches one or more tokens, and the other side has at least one left.
            (Some((&">", _)), Some(_)) | (Some(_), Some((&">", _))) => true,
            (Some((x, ra)), Some((y, rb))) => (*x == "*" || *y == "*" || x == y) && go(ra, rb),
            (None, None) => true,
            _ => false,
        }
    }
    let a: Vec<&str> = a.split('.').collect();
    let b: Vec<&str> = b.split('.').collect();
    go(&a, &b)
}

/// Docker's size syntax (`512M`, `4G`, `1.5GiB`, `1024`), in bytes.
fn memory_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let unit = unit.to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let mul: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    let bytes = n * mul as f64;
    (bytes >= 1.0 && bytes.is_finite()).then_some(bytes as u64)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Saga => "saga",
        Mode::Effect => "effect",
        Mode::Combined => "combined",
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(","))
}

/// The variables the renderer sets per range (the `RESERVED_ENV` ones).
fn derived_env(r: &RangePlan, nats: &NatsPlan) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("RUNNER_MODE", mode_name(r.mode).into());
    set("RUNNER_SHARDS", r.shards.to_string());
    set("RUNNER_PIN_CORES", r.pin_cores.to_string());
    set("RUNNER_DATA_DIR", DATA_DIR.into());
    set("RUNNER_NATS__URL", nats.client_url());
    set("RUNNER_HTTP__ADDR", format!("0.0.0.0:{HTTP_PORT}"));
    set("RUNNER_CONSUMERS__DURABLE_PREFIX", r.durable_prefix());
    set("RUNNER_SHUTDOWN__DRAIN_DEADLINE_MS", r.drain_deadline_ms.to_string());
    if !r.aggregate_filters.is_empty() {
        set("RUNNER_CONSUMERS__AGGREGATE_FILTERS", toml_list(&r.aggregate_filters));
    }
    if !r.result_filters.is_empty() {
        set("RUNNER_CONSUMERS__RESULT_FILTERS", toml_list(&r.result_filters));
    }
    if r.mode.runs_effects() {
        set("RUNNER_CONSUMERS__COMMAND_FILTERS", toml_list(&r.command_filters));
        set("RUNNER_EFFECTS__SECRETS_DIR", "/run/secrets".into());
    }
    env
}

// ---------------------------------------------------------------------------------------------
// Rendering.

/// A YAML scalar: plain when unambiguous, single-quoted otherwise (values are validated free of
/// control characters, so single quotes, with `''` for `'`, can hold any of them).
fn q(s: &str) -> String {
    const WORDS: &[&str] = &["true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"];
    let plain = s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'/')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_./=@+-".contains(&b))
        && !WORDS.contains(&s.to_ascii_lowercase().as_str());
    if plain { s.to_owned() } else { format!("'{}'", s.replace('\'', "''")) }
}

fn cpus(n: f64) -> String {
    if n.fract() == 0.0 { format!("'{}'", n as u64) } else { format!("'{n}'") }
}

/// Renders the stack file. Deterministic: the same [`Stack`] gives the same bytes.
pub fn render(stack: &Stack) -> String {
    let mut o = String::new();
    // `writeln!` into a String cannot fail.
    macro_rules! w {
        ($($arg:tt)*) => { let _ = writeln!(o, $($arg)*); };
    }
    w!("# GENERATED by `runner swarm render` from {}: do not edit by hand.", stack.source);
    w!("# Change swarm/ranges.yaml, then `runner swarm render --out swarm/stacks/platform.yml`;");
    w!("# tests/swarm.rs fails while this file differs from a fresh render.");
    w!("#");
    w!("# Deploy: docker stack deploy -c swarm/stacks/platform.yml platform   (swarm/README.md)");
    w!("# Ranges (service -> node label `tenant_range`, mode, what it owns):");
    for r in &stack.ranges {
        let owns = if r.tenants.is_empty() {
            format!(
                "filters {}",
                r.aggregate_filters.iter().chain(&r.command_filters).cloned().collect::<Vec<_>>().join(" ")
            )
        } else {
            format!("tenants {}", r.tenants.join(" "))
        };
        w!("#   {} -> {} ({}): {}", r.service(), r.node_label, mode_name(r.mode), owns);
    }
    w!("");
    w!("services:");
    let nats_names = stack.nats.names();
    for (i, name) in nats_names.iter().enumerate() {
        if i == 0 {
            w!(
                "  # NATS with JetStream: {} server(s), each pinned to the node labelled nats==nats-<i>",
                stack.nats.servers
            );
            w!("  # with its own store volume; the runners connect to all of them.");
        }
        w!("  {name}:");
        w!("    image: {}", q(&stack.nats.image));
        w!("    command:");
        let mut args: Vec<String> = vec![
            "--jetstream".into(),
            "--store_dir".into(),
            "/data".into(),
            "--server_name".into(),
            name.clone(),
            "--http_port".into(),
            "8222".into(),
        ];
        if stack.nats.servers > 1 {
            let routes: Vec<String> = nats_names.iter().map(|n| format!("nats://{n}:6222")).collect();
            args.extend([
                "--cluster_name".into(),
                stack.nats.cluster_name.clone(),
                "--cluster".into(),
                "nats://0.0.0.0:6222".into(),
                "--routes".into(),
                routes.join(","),
            ]);
        }
        for a in &args {
            w!("      - {}", q(a));
        }
        w!("    hostname: {name}");
        w!("    networks:");
        w!("      - runner");
        w!("    volumes:");
        w!("      - type: volume");
        w!("        source: {name}-data");
        w!("        target: /data");
        w!("    healthcheck:");
        w!("      test:");
        for a in ["CMD", "wget", "-q", "--spider", "http://127.0.0.1:8222/healthz?js-server-only=true"] {
            w!("        - {}", q(a));
        }
        w!("      interval: 10s");
        w!("      timeout: 3s");
        w!("      retries: 3");
        w!("      start_period: 60s");
        w!("    stop_grace_period: 30s");
        w!("    deploy:");
        w!("      mode: replicated");
        w!("      replicas: 1");
        w!("      endpoint_mode: dnsrr");
        w!("      placement:");
        w!("        constraints:");
        w!("          - node.labels.nats == {name}");
        w!("      # stop-first: the JetStream store volume must never be open twice.");
        w!("      update_config:");
        w!("        parallelism: 1");
        w!("        order: stop-first");
        w!("        failure_action: rollback");
        w!("      rollback_config:");
        w!("        parallelism: 1");
        w!("        order: stop-first");
        w!("      restart_policy:");
        w!("        condition: any");
        w!("        delay: 5s");
        w!("      resources:");
        w!("        reservations:");
        w!("          cpus: {}", cpus(stack.nats.cpus));
        w!("        limits:");
        w!("          memory: {}", q(&stack.nats.memory));
        w!("");
    }
    for r in &stack.ranges {
        let svc = r.service();
        if r.tenants.is_empty() {
            w!("  # Range {}: subject filters, mode {}.", r.name, mode_name(r.mode));
        } else {
            w!("  # Range {}: tenants {}, mode {}.", r.name, r.tenants.join(", "), mode_name(r.mode));
        }
        w!("  {svc}:");
        w!("    image: {}", q(&stack.image));
        w!("    hostname: {svc}");
        w!("    environment:");
        for (k, v) in &r.env {
            w!("      {k}: {}", q(v));
        }
        w!("    networks:");
        w!("      - runner");
        w!("    volumes:");
        w!("      # The data dir (LMDB shards): local to the labelled node, which the placement pins.");
        w!("      - type: volume");
        w!("        source: {}", r.volume());
        w!("        target: {DATA_DIR}");
        if r.mode.runs_effects() && !stack.secrets.is_empty() {
            w!("    # Provider secrets, read by effects as secret:NAME from /run/secrets/NAME.");
            w!("    secrets:");
            for s in &stack.secrets {
                w!("      - source: {}", q(s));
                w!("        target: {}", q(s));
                w!("        uid: '{RUNTIME_UID}'");
                w!("        gid: '{RUNTIME_UID}'");
                w!("        mode: 0400");
            }
        }
        w!("    # Healthy = /health (storage writable, NATS reachable) and /ready (consuming, not draining).");
        w!("    healthcheck:");
        w!("      test:");
        let health = format!("http://127.0.0.1:{HTTP_PORT}/health");
        let ready = format!("http://127.0.0.1:{HTTP_PORT}/ready");
        for a in [
            "CMD",
            "curl",
            "--fail",
            "--fail-early",
            "--silent",
            "--show-error",
            "--max-time",
            "2",
            "--output",
            "/dev/null",
            "--output",
            "/dev/null",
            &health,
            &ready,
        ] {
            w!("        - {}", q(a));
        }
        w!("      interval: 10s");
        w!("      timeout: 3s");
        w!("      retries: 3");
        w!("      start_period: {}s", r.start_period_s);
        w!(
            "    # Longer than the drain deadline ({} ms): SIGTERM drains, Swarm must not SIGKILL first.",
            r.drain_deadline_ms
        );
        w!("    stop_grace_period: {}s", r.grace_period_s());
        w!("    # glommio registers io_uring buffers: no locked-memory cap.");
        w!("    ulimits:");
        w!("      memlock:");
        w!("        soft: -1");
        w!("        hard: -1");
        w!("    deploy:");
        w!("      mode: replicated");
        w!("      # Exactly one owner per range.");
        w!("      replicas: 1");
        w!("      labels:");
        w!("        runner.range: {}", q(&r.name));
        w!("        runner.mode: {}", mode_name(r.mode));
        w!("      placement:");
        w!("        constraints:");
        w!("          - node.labels.tenant_range == {}", r.node_label);
        w!("        max_replicas_per_node: 1");
        w!("      # stop-first, never start-first: a range must never have two owners at once. With");
        w!("      # start-first the new task would start while the old one still consumes the range's");
        w!("      # durable consumers and holds its LMDB data dir (same node, same volume): two processes");
        w!("      # would apply the same keys from separate in-memory state, dispatch outbox items twice");
        w!("      # and break per-key order. stop-first drains the old task (SIGTERM, up to the drain");
        w!("      # deadline), waits for it to exit, then starts the new one. Rollbacks too.");
        w!("      update_config:");
        w!("        parallelism: 1");
        w!("        delay: 10s");
        w!("        order: stop-first");
        w!("        failure_action: rollback");
        w!("        monitor: 30s");
        w!("      rollback_config:");
        w!("        parallelism: 1");
        w!("        order: stop-first");
        w!("        failure_action: pause");
        w!("        monitor: 30s");
        w!("      restart_policy:");
        w!("        condition: any");
        w!("        delay: 5s");
        w!("        window: 60s");
        w!("      resources:");
        w!("        # Thread-per-core: shards = reserved CPUs (RUNNER_SHARDS={}). Each shard pins itself", r.shards);
        if r.pin_cores {
            w!(
                "        # to one CPU (host CPUs 0..{}; Swarm cannot give a service a cpuset), so keep other",
                r.shards - 1
            );
            w!("        # CPU-heavy work off this node. The limit leaves one CPU more for the I/O bridge thread.");
        } else {
            w!("        # Pinning is off for this range (pin_cores: false): the kernel places the shard threads.");
            w!("        # The limit leaves one CPU more for the I/O bridge thread.");
        }
        w!("        reservations:");
        w!("          cpus: {}", cpus(r.shards as f64));
        w!("          memory: {}", q(&r.memory_reservation));
        w!("        limits:");
        w!("          cpus: {}", cpus(r.shards as f64 + 1.0));
        w!("          memory: {}", q(&r.memory));
        w!("");
    }
    w!("networks:");
    w!("  runner:");
    w!("    driver: overlay");
    w!("    attachable: true");
    w!("");
    w!("volumes:");
    for name in &nats_names {
        w!("  {name}-data: {{}}");
    }
    for r in &stack.ranges {
        w!("  {}: {{}}", r.volume());
    }
    let used_secrets = stack.ranges.iter().any(|r| r.mode.runs_effects()) && !stack.secrets.is_empty();
    if used_secrets {
        w!("");
        w!("# Created beforehand: printf %s \"$VALUE\" | docker secret create NAME -");
        w!("secrets:");
        for s in &stack.secrets {
            w!("  {}:", q(s));
            w!("    external: true");
        }
    }
    o
}

/// `runner swarm render`: validates the ranges file and writes the stack (stdout by default).
pub fn render_command(ranges: &Path, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    let stack = load(ranges).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = render(&stack);
    match out {
        None => print!("{text}"),
        Some(path) => {
            // Write beside the target and rename, so a failed write never leaves half a stack.
            let tmp = path.with_extension("yml.tmp");
            std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
            eprintln!("wrote {} ({} range(s)) from {}", path.display(), stack.ranges.len(), ranges.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
secrets: [payments_token]
ranges:
  - name: r0
    tenants: [acme, globex]
  - name: r1
    tenants: [initech]
    shards: 4
"#;

    fn errors(text: &str) -> Vec<String> {
        match parse(text, "swarm/ranges.yaml") {
            Ok(s) => panic!("expected errors, got {s:?}"),
            Err(e) => e.0,
        }
    }

    fn has(errs: &[String], parts: &[&str]) -> bool {
        errs.iter().any(|e| parts.iter().all(|p| e.contains(p)))
    }

    #[test]
    fn tenants_become_per_role_filters_and_own_durables() {
        let s = parse(BASE, "swarm/ranges.yaml").unwrap();
        assert_eq!(s.source, "ranges.yaml");
        let r0 = &s.ranges[0];
        assert_eq!(r0.node_label, "r0");
        assert_eq!(r0.mode, Mode::Combined);
        assert_eq!(r0.aggregate_filters, ["events.acme.>", "events.globex.>"]);
        assert_eq!(r0.result_filters, ["workflow.events.acme.>", "workflow.events.globex.>"]);
        assert_eq!(r0.command_filters, ["workflow.commands.acme.>", "workflow.commands.globex.>"]);
        assert_eq!(r0.env["RUNNER_CONSUMERS__AGGREGATE_FILTERS"], r#"["events.acme.>","events.globex.>"]"#);
        assert_eq!(r0.env["RUNNER_CONSUMERS__DURABLE_PREFIX"], "runner-r0");
        assert_eq!(r0.env["RUNNER_NATS__URL"], "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222");
        assert_eq!(s.ranges[1].env["RUNNER_SHARDS"], "4");
        assert_eq!(r0.grace_period_s(), 30);
    }

    #[test]
    fn the_env_filter_lists_load_as_the_runner_reads_them() {
        let s = parse(BASE, "x.yaml").unwrap();
        let env: Vec<(String, String)> = s.ranges[0]
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("RUNNER_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let cfg = crate::config::load(None, &env).unwrap();
        assert_eq!(cfg.aggregate_filters, ["events.acme.>", "events.globex.>"]);
        assert_eq!(cfg.command_filters, ["workflow.commands.acme.>", "workflow.commands.globex.>"]);
        assert_eq!(cfg.durable_prefix, "runner-r0");
        assert_eq!(cfg.shards, 2);
        assert_eq!(cfg.http_addr.port(), HTTP_PORT);
        assert_eq!(cfg.drain_deadline_ms, 20_000);
    }

    #[test]
    fn rendering_is_deterministic_and_mounts_secrets_only_where_effects_run() {
        let text = r#"
secrets: [payments_token]
ranges:
  - name: sagas
    mode: saga
    tenants: [acme]
  - name: effects
    mode: effect
    tenants: [acme]
"#;
        let s = parse(text, "ranges.yaml").unwrap();
        let a = render(&s);
        assert_eq!(a, render(&parse(text, "ranges.yaml").unwrap()));
        let sagas = a.split("  runner-sagas:").nth(1).unwrap().split("  runner-effects:").next().unwrap();
        assert!(!sagas.contains("secrets:"), "saga-only service gets no secrets");
        assert!(!sagas.contains("COMMAND_FILTERS"));
        let effects = a.split("  runner-effects:").nth(1).unwrap();
        assert!(effects.contains("- source: payments_token"));
        assert!(!effects.contains("AGGREGATE_FILTERS"));
    }

    #[test]
    fn two_ranges_owning_one_tenant_or_overlapping_filters_are_refused() {
        let errs = errors("ranges:\n  - {name: a, tenants: [acme]}\n  - {name: b, tenants: [acme]}\n");
        assert!(has(&errs, &["ranges \"a\" and \"b\"", "aggregate", "events.acme.>"]), "{errs:?}");
        let errs = errors(
            "ranges:\n  - {name: a, tenants: [acme]}\n  - name: b\n    filters: {aggregate: ['events.*.>'], results: \
             ['workflow.events.zed.>'], commands: ['workflow.commands.zed.>']}\n",
        );
        assert!(has(&errs, &["ranges \"a\" and \"b\"", "events.*.>"]), "{errs:?}");
        // A saga range and an effect range may share tenants: they read different streams.
        assert!(
            parse("ranges:\n  - {name: a, mode: saga, tenants: [t]}\n  - {name: b, mode: effect, tenants: [t]}\n", "x")
                .is_ok()
        );
    }

    #[test]
    fn a_tenant_whose_effects_run_nowhere_is_refused() {
        let errs = errors("ranges:\n  - {name: a, mode: saga, tenants: [acme]}\n");
        assert!(has(&errs, &["range \"a\"", "\"acme\"", "no range runs its effects"]), "{errs:?}");
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let errs = errors("ranges:\n  - {name: a, tenants: [acme], colour: red}\n");
        assert!(has(&errs, &["swarm/ranges.yaml", "colour"]), "{errs:?}");
        let errs = errors("ranges:\n  - {name: A_1, tenants: [a.b], shards: 0, memory: lots}\n");
        assert!(has(&errs, &["swarm/ranges.yaml", "`ranges[0].name` = \"A_1\""]), "{errs:?}");
        assert!(has(&errs, &["`ranges[0].tenants[0]` = \"a.b\""]), "{errs:?}");
        assert!(has(&errs, &["`ranges[0].shards` = 0"]), "{errs:?}");
        assert!(has(&errs, &["`ranges[0].memory` = \"lots\""]), "{errs:?}");
        let errs = errors("ranges:\n  - {name: a}\n  - {name: a, node: a, tenants: [x]}\n");
        assert!(has(&errs, &["`ranges[0]`", "exactly one of `tenants` and `filters`"]), "{errs:?}");
        assert!(has(&errs, &["`ranges[1].name` = \"a\"", "another range"]), "{errs:?}");
        assert!(has(&errs, &["`ranges[1].node` = \"a\"", "same node label"]), "{errs:?}");
        let errs =
            errors("nats: {servers: 1}\nenv: {RUNNER_STREAMS__REPLICAS: 3}\nranges:\n  - {name: a, tenants: [t]}\n");
        assert!(has(&errs, &["`env.RUNNER_STREAMS__REPLICAS` = \"3\"", "nats.servers (1)"]), "{errs:?}");
        let errs = errors("nats: {servers: 2}\nranges: []\n");
        assert!(has(&errs, &["`nats.servers` = 2"]) && has(&errs, &["`ranges`", "at least one"]), "{errs:?}");
        let errs = errors(
            "ranges:\n  - name: a\n    mode: saga\n    filters: {aggregate: ['events.a.>'], commands: ['x.>']}\n",
        );
        assert!(has(&errs, &["`ranges[0].filters.results`", "needs at least one"]), "{errs:?}");
        assert!(has(&errs, &["`ranges[0].filters.commands`", "does not read these"]), "{errs:?}");
    }

    #[test]
    fn credentials_and_renderer_owned_variables_are_refused_in_env() {
        let errs = errors(
            "env: {PAYMENTS_API_KEY: hunter2, RUNNER_HTTP__ADMIN_TOKEN: s3cr3t-s3cr3t-s3cr3t, RUNNER_SHARDS: 8}\n\
             ranges:\n  - {name: a, tenants: [t]}\n",
        );
        assert!(has(&errs, &["`env.PAYMENTS_API_KEY`", "Swarm secret"]), "{errs:?}");
        assert!(has(&errs, &["`env.RUNNER_HTTP__ADMIN_TOKEN`", "Swarm secret"]), "{errs:?}");
        assert!(has(&errs, &["`env.RUNNER_SHARDS`", "ranges[].shards"]), "{errs:?}");
        assert!(errs.iter().all(|e| !e.contains("hunter2") && !e.contains("s3cr3t")), "values never echoed: {errs:?}");
    }

    #[test]
    fn filter_overlap_follows_nats_wildcards() {
        let cases = [
            ("events.a.>", "events.b.>", false),
            ("events.a.>", "events.a.x", true),
            ("events.*.>", "events.b.c", true),
            ("events.*", "events.b.c", false),
            ("events.>", "events", false),
            ("a.*.c", "a.b.*", true),
            ("a.b", "a.b", true),
            (">", "x", true),
            ("a.b.c", "a.b", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(filters_overlap(a, b), want, "{a} vs {b}");
            assert_eq!(filters_overlap(b, a), want, "{b} vs {a}");
        }
    }

    #[test]
    fn sizes_parse_like_docker() {
        assert_eq!(memory_bytes("512M"), Some(512 << 20));
        assert_eq!(memory_bytes("4G"), Some(4 << 30));
        assert_eq!(memory_bytes("1.5GiB"), Some(3 << 29));
        assert_eq!(memory_bytes("1024"), Some(1024));
        assert_eq!(memory_bytes("4X"), None);
        assert_eq!(memory_bytes(""), None);
    }

    #[test]
    fn scalars_quote_when_yaml_would_misread_them() {
        assert_eq!(q("combined"), "combined");
        assert_eq!(q("/data"), "/data");
        assert_eq!(q("true"), "'true'");
        assert_eq!(q("4"), "'4'");
        assert_eq!(q("0.0.0.0:8080"), "'0.0.0.0:8080'");
        assert_eq!(q("it's"), "'it''s'");
        assert_eq!(q(r#"["events.a.>"]"#), r#"'["events.a.>"]'"#);
    }
}
