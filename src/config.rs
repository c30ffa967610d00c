//! Settings: one file (TOML, YAML or JSON) layered with `RUNNER_*` environment variables
//! (`RUNNER_NATS__URL` sets `nats.url`; `__` separates levels), then validated into
//! [`Config`], reporting every problem at once with the field, the value and the rule.
//!
//! Every field has a default, so an empty file (or none) is a valid single-node setup: an
//! embedded `nats-server`, the example manifests, `./data`. The manifests the settings name
//! are loaded here too ([`load_manifests`]).

use serde::{Deserialize, Serialize};
use shards::manifest::{ManifestErrors, ManifestSet, valid_name};
use shards::store::Durability;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What this runner does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Sagas only: consume events, run programs, dispatch commands.
    Saga,
    /// Effect workers only: consume effect commands, call providers, publish results.
    Effect,
    /// Both (default).
    #[default]
    Combined,
}

impl Mode {
    pub fn runs_sagas(self) -> bool {
        matches!(self, Mode::Saga | Mode::Combined)
    }
    pub fn runs_effects(self) -> bool {
        matches!(self, Mode::Effect | Mode::Combined)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable (default).
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The settings as written (all optional, defaults documented per field).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `saga`, `effect` or `combined`. Default `combined`.
    pub mode: Mode,
    /// Where shard stores (and the embedded nats-server's store) live. Default `./data`.
    pub data_dir: Option<PathBuf>,
    /// Shard count. Default: the CPUs in the process's affinity mask (`taskset`,
    /// `docker --cpuset-cpus`); a CPU quota (`docker --cpus`, cgroup `cpu.max`) does not
    /// lower it (the start logs the quota).
    pub shards: Option<usize>,
    /// Partitions of a new data directory (fixed once created). Default 256.
    pub partitions: Option<u32>,
    /// Pin shard i to the i-th CPU of the process's affinity mask; more shards than CPUs in
    /// the mask are then refused at start. False: nothing is pinned (shards may share CPUs).
    /// Default true.
    pub pin_cores: Option<bool>,
    /// The CPU the I/O bridge thread pins to (it must be in the process's mask; the shards
    /// skip it). Default: the mask's CPUs no shard uses, or unpinned when there are none.
    /// Needs `pin_cores`.
    pub bridge_cpu: Option<usize>,
    pub nats: RawNats,
    pub streams: RawStreams,
    pub consumers: RawConsumers,
    pub tenancy: RawTenancy,
    pub sagas: RawManifests,
    pub effects: RawEffects,
    pub relay: RawRelay,
    pub gateway: RawGateway,
    pub storage: RawStorage,
    pub http: RawHttp,
    pub log: RawLog,
    pub limits: RawLimits,
    pub shutdown: RawShutdown,
    pub retention: RawRetention,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNats {
    /// NATS URL. Default: none, which starts an embedded `nats-server -js` on loopback.
    pub url: Option<String>,
    /// Path of the `nats-server` binary for the embedded server. Default: `PATH`, then `/usr/sbin`.
    pub server_binary: Option<PathBuf>,
    /// Create the workflow streams when missing. Default true.
    pub create_streams: Option<bool>,
    /// Give up connecting after this long at start. Default 10 s.
    pub connect_timeout_ms: Option<u64>,
    /// Time to wait for a PubAck. Default 5 s.
    pub publish_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStreams {
    /// Default `AGGREGATE_EVENTS`.
    pub aggregate_events: Option<String>,
    /// Subjects of the aggregate stream when the runner creates it. Default `["events.>"]`.
    pub aggregate_subjects: Option<Vec<String>>,
    /// Default `WORKFLOW_COMMANDS` (subjects `workflow.commands.>`).
    pub workflow_commands: Option<String>,
    /// Default `WORKFLOW_EVENTS` (subjects `workflow.events.>`, `workflow.timers.>`).
    pub workflow_events: Option<String>,
    /// `Nats-Msg-Id` dedupe window of streams the runner creates. Default 120,000 ms.
    pub duplicate_window_ms: Option<u64>,
    /// Replicas of streams the runner creates. Default 1.
    pub replicas: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsumers {
    /// Prefix of durable consumer names. Default `runner`.
    pub durable_prefix: Option<String>,
    /// Subject filters this instance owns on the aggregate stream (one durable consumer each;
    /// tenant ranges are expressed here, e.g. `events.tenant-a.>`). Default `["events.>"]`.
    pub aggregate_filters: Option<Vec<String>>,
    /// Filters on the workflow events stream (effect results). Default `["workflow.events.>"]`.
    pub result_filters: Option<Vec<String>>,
    /// Filters on the workflow commands stream (effect workers). Default `["workflow.commands.>"]`.
    pub command_filters: Option<Vec<String>>,
    /// Messages per pull. Default 256.
    pub batch: Option<usize>,
    /// Un-acked messages per consumer. Default 4,096.
    pub max_ack_pending: Option<i64>,
    /// Default 30,000 ms.
    pub ack_wait_ms: Option<u64>,
    /// Deliveries before JetStream stops redelivering. Default -1 (unlimited: the runner
    /// quarantines itself, so a message is never dropped by the server).
    pub max_deliver: Option<i64>,
    /// An aggregate event that matches no saga trigger is counted (metric
    /// `runner_unmatched_events_total`, `/admin/stats` `unmatched`) and acked; with this set
    /// it is also kept as a dead letter. Default false.
    pub dead_letter_unmatched: Option<bool>,
    /// The messages in flight when the process died run again as usual at the next start;
    /// if the process dies again before they settled, they run alone, one at a time, each
    /// counted first. Once the process has died this many times with a message in flight
    /// (the last time while it ran alone) it is quarantined as a dead letter instead of run
    /// again, and TERMed in our consumer (never removed from the stream). At least 3; 0
    /// turns this off (a message that kills the process then kills it at every start).
    /// Default 3.
    pub max_crashes: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTenancy {
    /// Every event must carry a tenant (header `x-tenant-id`, body `tenant_id`, or the
    /// second subject token); one without becomes a dead letter. Default false (single
    /// tenant: a missing tenant is the empty tenant).
    pub required: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawManifests {
    /// Saga manifest files. Default `["examples/order/sagas.yaml"]`.
    pub manifests: Option<Vec<PathBuf>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEffects {
    /// Effect manifest files. Default `["examples/order/effects.yaml"]`.
    pub manifests: Option<Vec<PathBuf>>,
    /// Where `secret:NAME` is read from. Default `/run/secrets`.
    pub secrets_dir: Option<PathBuf>,
    /// Provider calls in flight at once. Default 256.
    pub max_concurrency: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRelay {
    /// Dispatches in flight per shard. Default 1,024.
    pub max_in_flight: Option<usize>,
    /// Dispatches in flight per tenant per shard. Default 256.
    pub max_in_flight_per_tenant: Option<usize>,
    /// Resend a dispatch not confirmed within this time. Default 30,000 ms.
    pub confirm_timeout_ms: Option<u64>,
    /// Failed dispatches before an item becomes a dead letter. Default: no limit (retried
    /// with capped backoff until delivered).
    pub max_attempts: Option<u32>,
    /// First retry backoff. Default 200 ms.
    pub backoff_ms: Option<u64>,
    /// Backoff cap. Default 30,000 ms.
    pub max_backoff_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    /// Base URL of the Gateway; commands are POSTed to `{url}/commands`. Default: none
    /// (a saga that emits an aggregate command then fails its dispatch, visibly).
    pub url: Option<String>,
    /// Per-request timeout. Default 5,000 ms.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    /// `fsync` (default), `no_meta_sync`, `no_sync` (unsafe; see `shards::store::Durability`).
    pub durability: Option<Durability>,
    /// Initial LMDB map size per shard. Default 64 MiB.
    pub initial_map_size: Option<usize>,
    /// The map grows up to this. Default 64 GiB.
    pub max_map_size: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Address of the operations endpoints. Default `127.0.0.1:8080`.
    pub addr: Option<String>,
    /// Bearer token for `/admin/*`. Default: none (admin endpoints open on the bound address).
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `pretty` (default) or `json`.
    pub format: Option<LogFormat>,
    /// A `tracing` filter. Default `info`.
    pub level: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Largest event body accepted; larger ones become dead letters. Default 1 MiB.
    pub max_event_bytes: Option<usize>,
    /// Requests waiting per shard inbox. Default 8,192.
    pub inbox_capacity: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// How long SIGTERM and `/admin/drain` wait for in-flight work. Default 20,000 ms.
    pub drain_deadline_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetention {
    /// Completed and failed instances are removed after this. Default 7 days; 0 keeps them.
    pub final_instances_ms: Option<u64>,
    /// Completed effect-gate records (effect mode: one per command, about 1 KB) are removed
    /// after this. A command delivered again later runs again, so this must outlast every
    /// redelivery and re-send; it may not be below `streams.duplicate_window_ms`. Default
    /// 7 days; 0 keeps them.
    pub effect_records_ms: Option<u64>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub data_dir: PathBuf,
    pub shards: usize,
    /// `shards` was not set: it is the CPU count of the process's mask.
    pub shards_from_mask: bool,
    pub partitions: u32,
    pub pin_cores: bool,
    pub bridge_cpu: Option<usize>,
    pub nats_url: Option<String>,
    pub nats_server_binary: Option<PathBuf>,
    pub create_streams: bool,
    pub connect_timeout_ms: u64,
    pub publish_timeout_ms: u64,
    pub aggregate_stream: String,
    pub aggregate_subjects: Vec<String>,
    pub commands_stream: String,
    pub events_stream: String,
    pub duplicate_window_ms: u64,
    pub replicas: usize,
    pub durable_prefix: String,
    pub aggregate_filters: Vec<String>,
    pub result_filters: Vec<String>,
    pub command_filters: Vec<String>,
    pub batch: usize,
    pub max_ack_pending: i64,
    pub ack_wait_ms: u64,
    pub max_deliver: i64,
    pub tenancy_required: bool,
    /// Keep aggregate events that match no trigger as dead letters (`consumers.dead_letter_unmatched`).
    pub dead_letter_unmatched: bool,
    /// Deaths with a message in flight after which it is quarantined (`consumers.max_crashes`;
    /// 0: never).
    pub max_crashes: u32,
    pub saga_manifests: Vec<PathBuf>,
    pub effect_manifests: Vec<PathBuf>,
    pub secrets_dir: PathBuf,
    pub effect_concurrency: usize,
    pub relay: shards::relay::RelayConfig,
    pub gateway_url: Option<String>,
    pub gateway_timeout_ms: u64,
    pub durability: Durability,
    pub initial_map_size: usize,
    pub max_map_size: usize,
    pub http_addr: SocketAddr,
    pub admin_token: Option<String>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_event_bytes: usize,
    pub inbox_capacity: usize,
    pub drain_deadline_ms: u64,
    pub retention_ms: Option<u64>,
    /// `retention.effect_records_ms`; `None` keeps the records.
    pub effect_retention_ms: Option<u64>,
}

/// Every problem of one load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} configuration problem(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads `file` (if any; format by extension) and the `RUNNER_*` variables in `env`, and
/// validates. `env` is passed in so tests control it.
pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
    use figment::Figment;
    use figment::providers::{Format, Json, Serialized, Toml, Yaml};
    let mut fig = Figment::from(Serialized::defaults(RawConfig::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigErrors(vec![format!("config file {} does not exist", path.display())]));
        }
        fig = match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
            "toml" => fig.merge(Toml::file_exact(path)),
            "yaml" | "yml" => fig.merge(Yaml::file_exact(path)),
            "json" => fig.merge(Json::file_exact(path)),
            other => {
                return Err(ConfigErrors(vec![format!(
                    "config file {}: unknown extension {other:?} (use .toml, .yaml, .yml or .json)",
                    path.display()
                )]));
            }
        };
    }
    // Environment: RUNNER_A__B=v sets a.b; values are parsed as TOML scalars/arrays.
    // A variable that names no setting (a user's own `RUNNER_BIN`, say) is not ours: it is
    // skipped with a warning on stderr (logging is not set up yet), never an error.
    let mut env_fig = Figment::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("RUNNER_") else { continue };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        let value: figment::value::Value = parse_env_value(v);
        let probe = Figment::from(Serialized::defaults(RawConfig::default())).merge((key.clone(), value.clone()));
        if let Err(e) = probe.extract::<RawConfig>()
            && e.into_iter().any(|e| matches!(e.kind, figment::error::Kind::UnknownField(..)))
        {
            eprintln!(
                "warning: ignoring the environment variable {k}: it names no setting (RUNNER_SECTION__KEY sets section.key)"
            );
            continue;
        }
        env_fig = env_fig.merge((key, value));
    }
    fig = fig.merge(env_fig);
    // Every problem at once: a field that does not deserialize is reported and removed, and
    // extraction runs again, until what is left deserializes; then the rules are checked.
    let describe = |e: &figment::Error| {
        let field = e.path.join(".");
        let origin = fig.find_metadata(&field).or(e.metadata.as_ref()).map(|m| m.name.to_string()).unwrap_or_default();
        // A value from the environment is named by its variable, not by a Rust type name.
        let origin = if origin.starts_with('(') {
            format!("environment variable RUNNER_{}", field.to_ascii_uppercase().replace('.', "__"))
        } else {
            origin
        };
        if field.is_empty() { format!("{e} ({origin})") } else { format!("field `{field}`: {} ({origin})", e.kind) }
    };
    let mut value: figment::value::Value =
        fig.extract().map_err(|e| ConfigErrors(e.into_iter().map(|e| describe(&e)).collect()))?;
    let mut errors = Vec::new();
    let raw: RawConfig = loop {
        match Figment::from(Serialized::defaults(&value)).extract::<RawConfig>() {
            Ok(raw) => break raw,
            Err(e) => {
                let mut progressed = false;
                for e in e {
                    errors.push(describe(&e));
                    progressed |= remove_path(&mut value, &e.path);
                }
                if !progressed || errors.len() > 500 {
                    return Err(ConfigErrors(errors));
                }
            }
        }
    };
    match validate(raw) {
        Ok(cfg) if errors.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(ConfigErrors(more)) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// Variables the command line itself reads (not settings).
const CLI_ONLY: &[&str] = &["RUNNER_CONFIG", "RUNNER_ADMIN_TOKEN", "RUNNER_FAILPOINTS"];

/// [`load`] with this process's `RUNNER_*` environment (the commands' entry point).
pub fn load_from_process(file: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| k.starts_with("RUNNER_") && !CLI_ONLY.contains(&k.as_str())).collect();
    load(file, &env)
}

/// Loads the manifests a mode needs, expanding `${VAR:-default}` from the environment.
pub fn load_manifests(cfg: &Config) -> Result<ManifestSet, ManifestErrors> {
    let mut files = Vec::new();
    if cfg.mode.runs_sagas() {
        files.extend(cfg.saga_manifests.iter().cloned());
    }
    // Saga-only runners still read effect manifests when given, to check effect names.
    files.extend(cfg.effect_manifests.iter().cloned());
    ManifestSet::load_with_vars(&files, &shards::program::check_program, &|name| std::env::var(name).ok())
}

/// The durable name of the consumer for `filter` in `role`: stable across restarts and
/// distinct per filter, so each tenant range keeps its own position.
pub fn durable_name(prefix: &str, role: &str, filter: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(filter.as_bytes());
    format!("{prefix}-{role}-{h:016x}")
}

/// Removes the value at `path` (dictionary keys) from `value`; false when it is not there.
fn remove_path(value: &mut figment::value::Value, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((last, parents)) = path.split_last() else { return false };
    let mut at = value;
    for key in parents {
        match at {
            Value::Dict(_, dict) => match dict.get_mut(key) {
                Some(next) => at = next,
                None => return false,
            },
            _ => return false,
        }
    }
    match at {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        _ => false,
    }
}

fn parse_env_value(v: &str) -> figment::value::Value {
    // Numbers, booleans and arrays as TOML; everything else as a string.
    let probe = format!("x = {v}");
    if let Ok(t) = toml_value(&probe) {
        return t;
    }
    figment::value::Value::from(v.to_owned())
}

fn toml_value(doc: &str) -> Result<figment::value::Value, ()> {
    use figment::providers::{Format, Toml};
    let fig = figment::Figment::from(Toml::string(doc));
    fig.find_value("x").map_err(|_| ())
}

/// Turns raw settings into [`Config`], collecting every problem.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut errs = Vec::new();
    let mut bad = |field: &str, value: &dyn std::fmt::Debug, rule: &str| {
        errs.push(format!("field `{field}` = {value:?}: {rule}"))
    };

    let shards = raw.shards.unwrap_or_else(shards::runtime::default_shards);
    if shards == 0 || shards > 1024 {
        bad("shards", &shards, "must be between 1 and 1024");
    }
    let pin_cores = raw.pin_cores.unwrap_or(true);
    if let (Some(cpu), false) = (raw.bridge_cpu, pin_cores) {
        bad("bridge_cpu", &cpu, "pins the bridge thread, but `pin_cores = false` turns pinning off: unset one");
    }
    let partitions = raw.partitions.unwrap_or(shards::routing::DEFAULT_PARTITIONS);
    if partitions == 0 || partitions > 65_536 {
        bad("partitions", &partitions, "must be between 1 and 65536");
    } else if (partitions as usize) < shards {
        bad("partitions", &partitions, "must be at least the shard count, or some shards would own nothing");
    }
    if let Some(url) = &raw.nats.url {
        let scheme_ok = match url.split_once("://") {
            Some((scheme, rest)) => matches!(scheme, "nats" | "tls" | "ws" | "wss") && !rest.is_empty(),
            None => url.contains(':'),
        };
        if !scheme_ok {
            bad("nats.url", url, "must look like nats://host:port (schemes nats, tls, ws, wss)");
        }
    }
    if raw.data_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        bad("data_dir", &"", "must not be empty");
    }
    for (field, value) in [
        ("nats.connect_timeout_ms", raw.nats.connect_timeout_ms),
        ("nats.publish_timeout_ms", raw.nats.publish_timeout_ms),
        ("shutdown.drain_deadline_ms", raw.shutdown.drain_deadline_ms),
    ] {
        if let Some(v) = value
            && v < 100
        {
            bad(field, &v, "must be at least 100");
        }
    }
    let names = [
        ("streams.aggregate_events", raw.streams.aggregate_events.clone().unwrap_or_else(|| "AGGREGATE_EVENTS".into())),
        (
            "streams.workflow_commands",
            raw.streams.workflow_commands.clone().unwrap_or_else(|| "WORKFLOW_COMMANDS".into()),
        ),
        ("streams.workflow_events", raw.streams.workflow_events.clone().unwrap_or_else(|| "WORKFLOW_EVENTS".into())),
    ];
    for (field, name) in &names {
        if !valid_name(name) {
            bad(field, name, "stream names are 1-64 ASCII letters, digits, `_` or `-`");
        }
    }
    let prefix = raw.consumers.durable_prefix.clone().unwrap_or_else(|| "runner".into());
    if !valid_name(&prefix) || prefix.len() > 32 {
        bad("consumers.durable_prefix", &prefix, "1-32 ASCII letters, digits, `_` or `-`");
    }
    let check_filters = |field: &str, list: &[String], errs: &mut Vec<String>| {
        if list.is_empty() {
            errs.push(format!("field `{field}` = []: needs at least one subject filter"));
        }
        for f in list {
            if let Err(e) = shards::manifest::check_subject_filter(f) {
                errs.push(format!("field `{field}` = {f:?}: {e}"));
            }
        }
    };
    // Two consumers of one stream must not share a subject: the sequence gate is per
    // (instance, stream), so a lower sequence arriving later through the other consumer
    // would be dropped as already applied.
    let check_overlaps = |field: &str, list: &[String], errs: &mut Vec<String>| {
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if shards::manifest::filters_overlap(a, b) {
                    errs.push(format!(
                        "field `{field}`: {a:?} and {b:?} overlap (a subject matches both); one consumer per subject"
                    ));
                }
            }
        }
    };
    let aggregate_subjects = raw.streams.aggregate_subjects.clone().unwrap_or_else(|| vec!["events.>".into()]);
    let aggregate_filters = raw.consumers.aggregate_filters.clone().unwrap_or_else(|| vec!["events.>".into()]);
    let result_filters = raw.consumers.result_filters.clone().unwrap_or_else(|| vec!["workflow.events.>".into()]);
    let command_filters = raw.consumers.command_filters.clone().unwrap_or_else(|| vec!["workflow.commands.>".into()]);
    check_filters("streams.aggregate_subjects", &aggregate_subjects, &mut errs);
    check_filters("consumers.aggregate_filters", &aggregate_filters, &mut errs);
    check_filters("consumers.result_filters", &result_filters, &mut errs);
    check_filters("consumers.command_filters", &command_filters, &mut errs);
    check_overlaps("consumers.aggregate_filters", &aggregate_filters, &mut errs);
    check_overlaps("consumers.result_filters", &result_filters, &mut errs);
    check_overlaps("consumers.command_filters", &command_filters, &mut errs);
    let mut bad = |field: &str, value: &dyn std::fmt::Debug, rule: &str| {
        errs.push(format!("field `{field}` = {value:?}: {rule}"))
    };
    let batch = raw.consumers.batch.unwrap_or(256);
    if batch == 0 || batch > 10_000 {
        bad("consumers.batch", &batch, "must be between 1 and 10000");
    }
    let max_ack_pending = raw.consumers.max_ack_pending.unwrap_or(4_096);
    if max_ack_pending < 1 {
        bad("consumers.max_ack_pending", &max_ack_pending, "must be at least 1");
    }
    let ack_wait_ms = raw.consumers.ack_wait_ms.unwrap_or(30_000);
    if ack_wait_ms < 1_000 {
        bad(
            "consumers.ack_wait_ms",
            &ack_wait_ms,
            "must be at least 1000 (in-progress acks are sent every third of it)",
        );
    }
    let max_deliver = raw.consumers.max_deliver.unwrap_or(-1);
    if max_deliver == 0 || max_deliver < -1 {
        bad("consumers.max_deliver", &max_deliver, "must be -1 (unlimited) or at least 1");
    }
    let max_crashes = raw.consumers.max_crashes.unwrap_or(3);
    if max_crashes == 1 || max_crashes == 2 {
        bad(
            "consumers.max_crashes",
            &max_crashes,
            "must be 0 (off) or at least 3: a message runs alone only after two deaths in a row, and one death while it ran alone is the least evidence",
        );
    }
    let duplicate_window_ms = raw.streams.duplicate_window_ms.unwrap_or(120_000);
    if duplicate_window_ms < 100 {
        bad("streams.duplicate_window_ms", &duplicate_window_ms, "must be at least 100");
    }
    let effect_retention_ms = match raw.retention.effect_records_ms {
        Some(0) => None,
        Some(ms) => Some(ms),
        None => Some(7 * 24 * 3_600_000),
    };
    if let Some(ms) = effect_retention_ms
        && ms < duplicate_window_ms
    {
        bad(
            "retention.effect_records_ms",
            &ms,
            &format!(
                "must be at least streams.duplicate_window_ms ({duplicate_window_ms} ms), or a command the streams would still deduplicate could run again; 0 keeps the records"
            ),
        );
    }
    let replicas = raw.streams.replicas.unwrap_or(1);
    if !(1..=5).contains(&replicas) {
        bad("streams.replicas", &replicas, "must be between 1 and 5");
    }
    let relay_defaults = shards::relay::RelayConfig::default();
    let relay = shards::relay::RelayConfig {
        max_in_flight: raw.relay.max_in_flight.unwrap_or(relay_defaults.max_in_flight),
        max_in_flight_per_tenant: raw.relay.max_in_flight_per_tenant.unwrap_or(relay_defaults.max_in_flight_per_tenant),
        confirm_timeout_ms: raw.relay.confirm_timeout_ms.unwrap_or(relay_defaults.confirm_timeout_ms),
        max_attempts: raw.relay.max_attempts,
        retry: shards::manifest::RetrySpec {
            attempts: raw.relay.max_attempts.unwrap_or(u32::MAX),
            backoff_ms: raw.relay.backoff_ms.unwrap_or(relay_defaults.retry.backoff_ms),
            max_backoff_ms: raw.relay.max_backoff_ms.unwrap_or(relay_defaults.retry.max_backoff_ms),
            jitter: relay_defaults.retry.jitter,
        },
        ..relay_defaults
    };
    if relay.max_in_flight == 0 {
        bad("relay.max_in_flight", &relay.max_in_flight, "must be at least 1");
    }
    if relay.max_in_flight_per_tenant == 0 {
        bad("relay.max_in_flight_per_tenant", &relay.max_in_flight_per_tenant, "must be at least 1");
    }
    if relay.max_attempts == Some(0) {
        bad("relay.max_attempts", &0, "must be at least 1 (leave it out to retry without limit)");
    }
    if relay.retry.max_backoff_ms < relay.retry.backoff_ms {
        bad("relay.max_backoff_ms", &relay.retry.max_backoff_ms, "must not be below relay.backoff_ms");
    }
    if relay.confirm_timeout_ms < 100 {
        bad("relay.confirm_timeout_ms", &relay.confirm_timeout_ms, "must be at least 100");
    }
    if let Some(url) = &raw.gateway.url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        bad("gateway.url", url, "must be an http(s) URL");
    }
    if raw.gateway.url.as_deref().is_some_and(|u| u.starts_with("https://")) {
        bad(
            "gateway.url",
            &raw.gateway.url,
            "https is not supported by the built-in client; put a TLS-terminating proxy on loopback",
        );
    }
    let initial_map_size = raw.storage.initial_map_size.unwrap_or(64 << 20);
    let max_map_size = raw.storage.max_map_size.unwrap_or(64 << 30);
    if initial_map_size < (1 << 20) {
        bad("storage.initial_map_size", &initial_map_size, "must be at least 1 MiB (1048576)");
    }
    if max_map_size < initial_map_size {
        bad("storage.max_map_size", &max_map_size, "must not be below storage.initial_map_size");
    }
    let addr_text = raw.http.addr.clone().unwrap_or_else(|| "127.0.0.1:8080".into());
    let http_addr = match addr_text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            bad("http.addr", &addr_text, "must be IP:PORT, e.g. 127.0.0.1:8080");
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    if let Some(t) = &raw.http.admin_token
        && t.len() < 16
    {
        // Never echo the token itself.
        errs.push("field `http.admin_token`: must be at least 16 characters (value not shown)".into());
    }
    let mut bad = |field: &str, value: &dyn std::fmt::Debug, rule: &str| {
        errs.push(format!("field `{field}` = {value:?}: {rule}"))
    };
    let log_level = raw.log.level.clone().unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        bad("log.level", &log_level, "is not a tracing filter (e.g. info, runner=debug)");
    }
    let max_event_bytes = raw.limits.max_event_bytes.unwrap_or(1 << 20);
    if max_event_bytes < 1024 {
        bad("limits.max_event_bytes", &max_event_bytes, "must be at least 1024");
    }
    let inbox_capacity = raw.limits.inbox_capacity.unwrap_or(8_192);
    if inbox_capacity == 0 {
        bad("limits.inbox_capacity", &inbox_capacity, "must be at least 1");
    }
    let effect_concurrency = raw.effects.max_concurrency.unwrap_or(256);
    if effect_concurrency == 0 {
        bad("effects.max_concurrency", &effect_concurrency, "must be at least 1");
    }
    let publish_timeout_ms = raw.nats.publish_timeout_ms.unwrap_or(5_000);
    if publish_timeout_ms < 100 {
        bad("nats.publish_timeout_ms", &publish_timeout_ms, "must be at least 100");
    }
    let saga_manifests = raw.sagas.manifests.clone().unwrap_or_else(|| vec!["examples/order/sagas.yaml".into()]);
    let effect_manifests = raw.effects.manifests.clone().unwrap_or_else(|| vec!["examples/order/effects.yaml".into()]);
    if raw.mode.runs_sagas() && saga_manifests.is_empty() {
        bad("sagas.manifests", &saga_manifests, "mode runs sagas but no saga manifest is given");
    }
    if raw.mode.runs_effects() && effect_manifests.is_empty() {
        bad("effects.manifests", &effect_manifests, "mode runs effects but no effect manifest is given");
    }
    let gateway_timeout_ms = raw.gateway.timeout_ms.unwrap_or(5_000);
    if gateway_timeout_ms == 0 {
        bad("gateway.timeout_ms", &gateway_timeout_ms, "must be above 0");
    }
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    let [(_, aggregate_stream), (_, commands_stream), (_, events_stream)] = names;
    Ok(Config {
        mode: raw.mode,
        data_dir: raw.data_dir.unwrap_or_else(|| "./data".into()),
        shards,
        shards_from_mask: raw.shards.is_none(),
        partitions,
        pin_cores,
        bridge_cpu: raw.bridge_cpu,
        nats_url: raw.nats.url,
        nats_server_binary: raw.nats.server_binary,
        create_streams: raw.nats.create_streams.unwrap_or(true),
        connect_timeout_ms: raw.nats.connect_timeout_ms.unwrap_or(10_000),
        publish_timeout_ms,
        aggregate_stream,
        aggregate_subjects,
        commands_stream,
        events_stream,
        duplicate_window_ms,
        replicas,
        durable_prefix: prefix,
        aggregate_filters,
        result_filters,
        command_filters,
        batch,
        max_ack_pending,
        ack_wait_ms,
        max_deliver,
        tenancy_required: raw.tenancy.required.unwrap_or(false),
        dead_letter_unmatched: raw.consumers.dead_letter_unmatched.unwrap_or(false),
        max_crashes,
        saga_manifests,
        effect_manifests,
        secrets_dir: raw.effects.secrets_dir.unwrap_or_else(|| "/run/secrets".into()),
        effect_concurrency,
        relay,
        gateway_url: raw.gateway.url.map(|u| u.trim_end_matches('/').to_owned()),
        gateway_timeout_ms,
        durability: raw.storage.durability.unwrap_or_default(),
        initial_map_size,
        max_map_size,
        http_addr,
        admin_token: raw.http.admin_token,
        log_format: raw.log.format.unwrap_or_default(),
        log_level,
        max_event_bytes,
        inbox_capacity,
        drain_deadline_ms: raw.shutdown.drain_deadline_ms.unwrap_or(20_000),
        retention_ms: match raw.retention.final_instances_ms {
            Some(0) => None,
            Some(ms) => Some(ms),
            None => Some(7 * 24 * 3_600_000),
        },
        effect_retention_ms,
    })
}

impl Config {
    /// Defaults for everything (tests and the demo start from here).
    pub fn defaults() -> Self {
        // The defaults validate by construction.
        match validate(RawConfig::default()) {
            Ok(c) => c,
            Err(e) => unreachable!("default config invalid: {e}"),
        }
    }

    pub fn store_config(&self) -> shards::store::StoreConfig {
        shards::store::StoreConfig {
            durability: self.durability,
            initial_map_size: self.initial_map_size,
            max_map_size: self.max_map_size,
        }
    }
}

#[cfg(test)]
mod tests;
