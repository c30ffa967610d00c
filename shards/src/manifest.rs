//! Saga and effect manifests (YAML or JSON): what runs, on which events, under which limits.
//!
//! Loading validates everything and reports every problem at once, each naming the file,
//! the saga or effect, and the field. A set that fails to load replaces nothing: callers
//! swap in a new [`ManifestSet`] only after `load` returned `Ok`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

/// One problem found while loading manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `saga "order"`, `effect "charge"`, or empty for file-level problems.
    pub item: String,
    /// Dotted field path (`triggers[0].subject`), or empty.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if !self.item.is_empty() {
            write!(f, ": {}", self.item)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem of one load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl std::fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} manifest problem(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

/// What a manifest file holds. Either list may be absent.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    #[serde(default)]
    pub sagas: Vec<SagaSpec>,
    #[serde(default)]
    pub effects: Vec<EffectSpec>,
}

/// What happens to a key after one of its events was quarantined (DESIGN invariant 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// Strict order: later events of the key wait in the dead-letter queue.
    #[default]
    Park,
    /// The key moves on past the poison event.
    Skip,
}

/// Retry policy with exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySpec {
    /// Attempts in all (1 = no retry). Default 3.
    pub attempts: u32,
    /// First backoff. Default 100 ms.
    pub backoff_ms: u64,
    /// Backoff cap. Default 10 s.
    pub max_backoff_ms: u64,
    /// Random spread of each backoff, 0..=1. Default 0.2.
    pub jitter: f64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self { attempts: 3, backoff_ms: 100, max_backoff_ms: 10_000, jitter: 0.2 }
    }
}

impl RetrySpec {
    /// Backoff before attempt `attempt + 1` (attempt counts from 1), without jitter.
    pub fn backoff(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(30);
        self.backoff_ms.saturating_mul(1u64 << shift).min(self.max_backoff_ms)
    }

    /// Backoff with jitter; `unit` is a value in [0, 1) from the caller (the shard uses a
    /// hash of the key, the bridge a random number).
    pub fn backoff_jittered(&self, attempt: u32, unit: f64) -> u64 {
        let base = self.backoff(attempt) as f64;
        let spread = base * self.jitter.clamp(0.0, 1.0);
        (base - spread / 2.0 + spread * unit.clamp(0.0, 1.0)).max(0.0) as u64
    }
}

/// Retry policy of an effect call whose outcome is unknown or not final yet: a timeout, a
/// transport error (a connection reset after the request was sent included), 408, 429,
/// 5xx, or an upstream's 409 (its work under the same idempotency key is still in
/// progress). Every retry carries the same idempotency key, so the upstream can make it
/// harmless; giving up early would turn a call that may still succeed into a failed result
/// and a compensation, so by default an effect keeps trying for about ten minutes. A
/// definite refusal (another 4xx) is final at once, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EffectRetrySpec {
    /// Attempts in all, at most (1 = no retry). Default: no limit but `give_up_after_ms`.
    pub attempts: Option<u32>,
    /// First backoff; each next one doubles. Default 200 ms.
    pub backoff_ms: u64,
    /// Backoff cap. Default 30 s.
    pub max_backoff_ms: u64,
    /// Random spread of each backoff, 0..=1. Default 0.2.
    pub jitter: f64,
    /// Gives up (a failed result) once the backoffs waited so far, counted without jitter,
    /// plus the next one would pass this. Each attempt also takes up to the effect's
    /// `timeout_ms`. 0: no retry. Default 600,000 (10 minutes: 27 attempts with the
    /// default backoffs).
    pub give_up_after_ms: u64,
}

impl Default for EffectRetrySpec {
    fn default() -> Self {
        Self { attempts: None, backoff_ms: 200, max_backoff_ms: 30_000, jitter: 0.2, give_up_after_ms: 600_000 }
    }
}

impl EffectRetrySpec {
    /// The backoff schedule (the same exponential curve as [`RetrySpec`]).
    fn schedule(&self) -> RetrySpec {
        RetrySpec {
            attempts: u32::MAX,
            backoff_ms: self.backoff_ms,
            max_backoff_ms: self.max_backoff_ms,
            jitter: self.jitter,
        }
    }

    /// The backoffs waited after `attempts` failed attempts, without jitter.
    pub fn waited_ms(&self, attempts: u32) -> u64 {
        let s = self.schedule();
        // From attempt 32 on the backoff no longer grows (`RetrySpec::backoff` caps the shift).
        let growing = (1..=attempts.min(32)).fold(0u64, |sum, a| sum.saturating_add(s.backoff(a)));
        growing.saturating_add(u64::from(attempts.saturating_sub(32)).saturating_mul(s.backoff(33)))
    }

    /// The wait before the next attempt after attempt number `attempt` (from 1) ended with
    /// an unknown outcome, or `None` when the policy gives up. `unit` in [0, 1) spreads it.
    pub fn next_wait(&self, attempt: u32, unit: f64) -> Option<u64> {
        if self.attempts.is_some_and(|limit| attempt >= limit) {
            return None;
        }
        let next = self.schedule().backoff(attempt);
        if self.waited_ms(attempt.saturating_sub(1)).saturating_add(next) > self.give_up_after_ms {
            return None;
        }
        Some(self.schedule().backoff_jittered(attempt, unit))
    }
}

/// When a saga reacts to an event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    /// Source stream (default `AGGREGATE_EVENTS`).
    #[serde(default = "default_trigger_stream")]
    pub stream: String,
    /// NATS subject filter (`*` one token, `>` the rest).
    pub subject: String,
    /// Where the correlation id is in the event: a dotted path into the envelope
    /// (`data.order_id`, `aggregate_id`).
    pub correlation: String,
    /// Whether this event may start a new instance. Default false.
    #[serde(default)]
    pub may_start: bool,
}

fn default_trigger_stream() -> String {
    "AGGREGATE_EVENTS".into()
}

/// One saga.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SagaSpec {
    pub name: String,
    /// Program file, relative to the manifest's directory and inside it.
    pub program: PathBuf,
    /// Entry point for events. Default `on_event`.
    #[serde(default = "default_on_event")]
    pub on_event: String,
    /// Entry point for failed effect results (compensation). Default: none, `on_event` gets them.
    #[serde(default)]
    pub compensation: Option<String>,
    /// Operations allowed per invocation. Default 100,000.
    #[serde(default = "default_gas")]
    pub gas: u64,
    /// Wall-time guard per invocation. Default 50 ms.
    #[serde(default = "default_wall_ms")]
    pub max_wall_ms: u64,
    #[serde(default)]
    pub on_poison: PoisonPolicy,
    #[serde(default)]
    pub retry: RetrySpec,
    pub triggers: Vec<TriggerSpec>,
}

fn default_on_event() -> String {
    "on_event".into()
}
fn default_gas() -> u64 {
    100_000
}
fn default_wall_ms() -> u64 {
    50
}

/// Circuit breaker of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSpec {
    /// Failures within `window_ms` that open the breaker. Default 5.
    pub failures: u32,
    /// Default 30 s.
    pub window_ms: u64,
    /// How long it stays open before one probe is let through. Default 10 s.
    pub open_ms: u64,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        Self { failures: 5, window_ms: 30_000, open_ms: 10_000 }
    }
}

/// Providers an effect can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Http,
    NatsRequest,
    Log,
    Noop,
}

/// One effect.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EffectSpec {
    pub name: String,
    pub provider: ProviderKind,
    /// Provider settings; string values may be `secret:NAME`.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Retries of calls whose outcome is unknown or in progress (see [`EffectRetrySpec`]).
    #[serde(default)]
    pub retry: EffectRetrySpec,
    /// Per-attempt timeout. Default 5 s.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub circuit_breaker: BreakerSpec,
}

fn default_timeout_ms() -> u64 {
    5_000
}

impl EffectSpec {
    /// The secrets this effect's settings reference (`secret:NAME`).
    pub fn secret_refs(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
            match v {
                serde_json::Value::String(s) => {
                    if let Some(name) = s.strip_prefix("secret:") {
                        out.insert(name.to_owned());
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                serde_json::Value::Object(m) => m.values().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        self.settings.values().for_each(|v| walk(v, &mut out));
        out
    }
}

/// A saga whose program text was read and checked.
#[derive(Debug, Clone)]
pub struct LoadedSaga {
    pub spec: SagaSpec,
    /// Resolved program path.
    pub program_path: PathBuf,
    pub source: String,
    /// The manifest file it came from.
    pub manifest: PathBuf,
}

/// A validated set of sagas and effects. Cheap to clone (shared with every shard).
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    pub sagas: BTreeMap<String, LoadedSaga>,
    pub effects: BTreeMap<String, EffectSpec>,
    /// Files it was loaded from.
    pub files: Vec<PathBuf>,
}

/// Names: ASCII letters, digits, `_` and `-`, 1 to 64 bytes (they become NATS subject
/// tokens and key components).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks a NATS subject filter: non-empty tokens, `>` only as the last token, no spaces.
pub fn check_subject_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("is empty".into());
    }
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(format!("{filter:?} has an empty token"));
        }
        if t.chars().any(|c| c.is_whitespace()) {
            return Err(format!("{filter:?} contains whitespace"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(format!("{filter:?}: `>` must be the last token"));
        }
        if t.len() > 1 && (t.contains('*') || t.contains('>')) {
            return Err(format!("{filter:?}: wildcards must be whole tokens"));
        }
    }
    Ok(())
}

/// Whether `subject` matches the NATS filter `filter`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some subject matches both NATS filters `a` and `b` (valid filters: `*` one
/// token, `>` one or more at the end).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Resolves `program` against the manifest directory, refusing anything that could leave
/// it (absolute paths, `..`).
fn resolve_program(manifest: &Path, program: &Path) -> Result<PathBuf, String> {
    if program.as_os_str().is_empty() {
        return Err("is empty".into());
    }
    for c in program.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("{} leaves the manifest's directory (`..` is not allowed)", program.display()));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "{} is absolute; give a path relative to the manifest's directory",
                    program.display()
                ));
            }
        }
    }
    let dir = manifest.parent().unwrap_or(Path::new("."));
    Ok(dir.join(program))
}

/// Replaces `${NAME}` and `${NAME:-default}` with values from `vars`; a name with neither a
/// value nor a default is an error naming it.
pub fn expand_vars(text: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unclosed `${` in manifest".into());
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("`${{{inner}}}` is not a variable reference"));
        }
        match (vars(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!("variable {name} is not set and has no default (`${{{name}:-default}}`)"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_file(path: &Path, text: &str) -> Result<ManifestFile, String> {
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

/// A function that checks a program's source at load time (compile errors, forbidden
/// calls, missing entry points). The program engine provides it; kept as a parameter so
/// manifests stay independent of the engine.
pub type ProgramCheck<'a> = &'a dyn Fn(&LoadedSaga) -> Result<(), String>;

impl ManifestSet {
    /// Loads and validates manifest files (YAML, or JSON by extension). Reports every
    /// problem found, each naming the file, the item and the field.
    pub fn load(paths: &[PathBuf], check: ProgramCheck<'_>) -> Result<Self, ManifestErrors> {
        Self::load_with_vars(paths, check, &|_| None)
    }

    /// [`Self::load`], expanding `${NAME:-default}` in the manifest text from `vars` (the
    /// runner passes the environment).
    pub fn load_with_vars(
        paths: &[PathBuf],
        check: ProgramCheck<'_>,
        vars: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ManifestErrors> {
        let mut errors = Vec::new();
        let mut set = ManifestSet { files: paths.to_vec(), ..Default::default() };
        let mut saga_origin: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut effect_origin: BTreeMap<String, PathBuf> = BTreeMap::new();
        for path in paths {
            let err = |item: String, field: &str, message: String| ManifestError {
                file: path.clone(),
                item,
                field: field.to_owned(),
                message,
            };
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(err(String::new(), "", format!("cannot read: {e}")));
                    continue;
                }
            };
            let text = match expand_vars(&text, vars) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(err(String::new(), "", e));
                    continue;
                }
            };
            let file = match parse_file(path, &text) {
                Ok(f) => f,
                Err(e) => {
                    errors.push(err(String::new(), "", e));
                    continue;
                }
            };
            for (i, effect) in file.effects.into_iter().enumerate() {
                let item = format!("effect {:?} (effects[{i}])", effect.name);
                let before = errors.len();
                if !valid_name(&effect.name) {
                    errors.push(err(item.clone(), "name", "must be 1-64 ASCII letters, digits, `_` or `-`".into()));
                }
                if let Some(first) = effect_origin.get(&effect.name) {
                    errors.push(err(
                        item.clone(),
                        "name",
                        format!("duplicate effect name, first defined in {}", first.display()),
                    ));
                }
                check_retry(&effect.retry.schedule(), "retry", &item, &err, &mut errors);
                if effect.retry.attempts == Some(0) {
                    errors.push(err(item.clone(), "retry.attempts", "must be at least 1".into()));
                }
                if effect.timeout_ms == 0 {
                    errors.push(err(item.clone(), "timeout_ms", "must be above 0".into()));
                }
                if effect.circuit_breaker.failures == 0 {
                    errors.push(err(item.clone(), "circuit_breaker.failures", "must be above 0".into()));
                }
                for (field, problem) in check_provider_settings(&effect) {
                    errors.push(err(item.clone(), &field, problem));
                }
                for name in effect.secret_refs() {
                    if !valid_name(&name) && !name.contains('.') {
                        errors.push(err(
                            item.clone(),
                            "settings",
                            format!("secret name {name:?} is not a plain file name"),
                        ));
                    }
                }
                if errors.len() == before {
                    effect_origin.insert(effect.name.clone(), path.clone());
                    set.effects.insert(effect.name.clone(), effect);
                }
            }
            for (i, saga) in file.sagas.into_iter().enumerate() {
                let item = format!("saga {:?} (sagas[{i}])", saga.name);
                let before = errors.len();
                if !valid_name(&saga.name) {
                    errors.push(err(item.clone(), "name", "must be 1-64 ASCII letters, digits, `_` or `-`".into()));
                }
                if let Some(first) = saga_origin.get(&saga.name) {
                    errors.push(err(
                        item.clone(),
                        "name",
                        format!("duplicate saga name, first defined in {}", first.display()),
                    ));
                }
                if saga.gas == 0 {
                    errors.push(err(item.clone(), "gas", "must be above 0".into()));
                }
                if saga.max_wall_ms == 0 {
                    errors.push(err(item.clone(), "max_wall_ms", "must be above 0".into()));
                }
                check_retry(&saga.retry, "retry", &item, &err, &mut errors);
                if saga.triggers.is_empty() {
                    errors.push(err(item.clone(), "triggers", "a saga needs at least one trigger".into()));
                }
                if !saga.triggers.iter().any(|t| t.may_start) {
                    errors.push(err(
                        item.clone(),
                        "triggers",
                        "no trigger has `may_start: true`, so no instance can ever start".into(),
                    ));
                }
                for (t, trigger) in saga.triggers.iter().enumerate() {
                    if let Err(e) = check_subject_filter(&trigger.subject) {
                        errors.push(err(item.clone(), &format!("triggers[{t}].subject"), e));
                    }
                    if trigger.correlation.is_empty() || trigger.correlation.split('.').any(str::is_empty) {
                        errors.push(err(
                            item.clone(),
                            &format!("triggers[{t}].correlation"),
                            "must be a dotted path such as `data.order_id`".into(),
                        ));
                    }
                    if !valid_name(&trigger.stream) {
                        errors.push(err(
                            item.clone(),
                            &format!("triggers[{t}].stream"),
                            "is not a valid stream name".into(),
                        ));
                    }
                }
                let program_path = match resolve_program(path, &saga.program) {
                    Ok(p) => p,
                    Err(e) => {
                        errors.push(err(item.clone(), "program", e));
                        continue;
                    }
                };
                let source = match std::fs::read_to_string(&program_path) {
                    Ok(s) => s,
                    Err(e) => {
                        errors.push(err(
                            item.clone(),
                            "program",
                            format!("cannot read {}: {e}", program_path.display()),
                        ));
                        continue;
                    }
                };
                if errors.len() != before {
                    continue;
                }
                let loaded = LoadedSaga { spec: saga, program_path, source, manifest: path.clone() };
                if let Err(e) = check(&loaded) {
                    errors.push(err(item.clone(), "program", format!("{}: {e}", loaded.program_path.display())));
                    continue;
                }
                saga_origin.insert(loaded.spec.name.clone(), path.clone());
                set.sagas.insert(loaded.spec.name.clone(), loaded);
            }
        }
        if errors.is_empty() { Ok(set) } else { Err(ManifestErrors(errors)) }
    }

    /// Triggers of every saga matching a message from `stream` on `subject`.
    pub fn triggers_for<'a>(
        &'a self,
        stream: &'a str,
        subject: &'a str,
    ) -> impl Iterator<Item = (&'a LoadedSaga, &'a TriggerSpec)> + 'a {
        self.sagas.values().flat_map(move |s| {
            s.spec
                .triggers
                .iter()
                .filter(move |t| t.stream == stream && subject_matches(&t.subject, subject))
                .map(move |t| (s, t))
        })
    }

    /// Streams any saga listens to.
    pub fn trigger_streams(&self) -> BTreeSet<String> {
        self.sagas.values().flat_map(|s| s.spec.triggers.iter().map(|t| t.stream.clone())).collect()
    }
}

fn check_retry(
    r: &RetrySpec,
    field: &str,
    item: &str,
    err: &dyn Fn(String, &str, String) -> ManifestError,
    errors: &mut Vec<ManifestError>,
) {
    if r.attempts == 0 {
        errors.push(err(item.to_owned(), &format!("{field}.attempts"), "must be at least 1".into()));
    }
    if r.max_backoff_ms < r.backoff_ms {
        errors.push(err(item.to_owned(), &format!("{field}.max_backoff_ms"), "is below backoff_ms".into()));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        errors.push(err(item.to_owned(), &format!("{field}.jitter"), "must be between 0 and 1".into()));
    }
}

/// Provider-specific settings checks: `(field, problem)` pairs.
fn check_provider_settings(effect: &EffectSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let s = &effect.settings;
    let get_str = |k: &str| s.get(k).and_then(|v| v.as_str());
    let allowed: &[&str] = match effect.provider {
        ProviderKind::Http => &["method", "url", "headers", "body"],
        ProviderKind::NatsRequest => &["subject", "headers", "body"],
        ProviderKind::Log | ProviderKind::Noop => &["message", "fail_when", "result"],
    };
    for k in s.keys() {
        if !allowed.contains(&k.as_str()) {
            out.push((
                format!("settings.{k}"),
                format!("unknown setting for provider {:?}; allowed: {}", effect.provider, allowed.join(", ")),
            ));
        }
    }
    match effect.provider {
        ProviderKind::Http => {
            match get_str("url") {
                None => out.push(("settings.url".into(), "is required for the http provider".into())),
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("secret:")) => {
                    out.push(("settings.url".into(), format!("{u:?} is not an http(s) URL")))
                }
                Some(u) if placeholder_before_path(u) => out.push((
                    "settings.url".into(),
                    format!("{u:?} has a placeholder in its host; values may only fill the path or the query"),
                )),
                _ => {}
            }
            if let Some(m) = s.get("method") {
                let ok = m.as_str().is_some_and(|m| {
                    ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.to_ascii_uppercase().as_str())
                });
                if !ok {
                    out.push(("settings.method".into(), "must be one of GET, POST, PUT, PATCH, DELETE".into()));
                }
            }
            if let Some(h) = s.get("headers")
                && !h.as_object().is_some_and(|m| m.values().all(|v| v.is_string()))
            {
                out.push(("settings.headers".into(), "must be a map of strings".into()));
            }
        }
        ProviderKind::NatsRequest => match get_str("subject") {
            None => out.push(("settings.subject".into(), "is required for the nats_request provider".into())),
            Some(sub) => {
                if sub.contains('*') || sub.contains('>') {
                    out.push(("settings.subject".into(), "must not contain wildcards".into()));
                } else if let Err(e) = check_subject_filter(sub) {
                    out.push(("settings.subject".into(), e));
                }
            }
        },
        ProviderKind::Log | ProviderKind::Noop => {}
    }
    out
}

/// Whether a URL template has a `{{placeholder}}` before its path: in the scheme or host,
/// where a command's data would choose who is called.
fn placeholder_before_path(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    scheme.contains("{{") || authority.contains("{{")
}

/// Reads a value by dotted path (`data.order_id`) from JSON; numbers and booleans are
/// rendered as text so they can be correlation ids.
pub fn lookup_path(value: &serde_json::Value, path: &str) -> Option<String> {
    let mut cur = value;
    for part in path.split('.') {
        cur = match cur {
            serde_json::Value::Object(m) => m.get(part)?,
            serde_json::Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match cur {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
