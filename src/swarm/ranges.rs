//! The tenant-range file (`swarm/ranges.yaml`): parsed, then validated into a [`Stack`] with
//! every problem reported at once, each naming the file and the field. The ownership check
//! refuses any two ranges that could consume one subject in the same role.

use super::{DATA_DIR, GRACE_MARGIN_MS, HTTP_PORT};
use crate::config::Mode;
use serde::Deserialize;
use shards::manifest::{check_subject_filter, subject_matches, valid_name};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

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
pub(super) fn memory_bytes(text: &str) -> Option<u64> {
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

pub(super) fn mode_name(mode: Mode) -> &'static str {
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
