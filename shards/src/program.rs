//! Saga programs: sandboxed, gas-limited, deterministic Rhai scripts.
//!
//! Each shard owns one [`Programs`] (an `Engine` and the compiled ASTs, not `Send`), built
//! from the shared [`ManifestSet`]; a reload builds a new one and swaps it between batches.
//!
//! Sandbox: `Engine::new_raw()` with the standard package built without its time functions
//! (`no_time`), no module resolver, no `eval`. There is no clock and no randomness to call,
//! and [`check_program`] refuses at load any call to a function that neither the program
//! nor the packages define, so a program that tries to read the clock does not load. Maps
//! are ordered (`BTreeMap`), so iteration and JSON output are deterministic. Limits: gas (operations) and a wall-time guard per
//! invocation, checked in the progress callback; sizes of strings, arrays and maps; call
//! and expression depth; and, when the program returns, the nesting and size of every value
//! it returns ([`MAX_OUTPUT_DEPTH`], [`MAX_OUTPUT_BYTES`]), so nothing is stored that could
//! not be read back.
//!
//! Contract (DESIGN "Saga programs"): `fn on_event(state, event)` returns
//! `#{ state, status, work, schedules }`; see [`Transition`].

use crate::manifest::{LoadedSaga, ManifestSet};
use crate::record::InstanceStatus;
use rhai::packages::{Package, StandardPackage};
use rhai::{AST, ASTNode, CallFnOptions, Dynamic, Engine, EvalAltResult, Expr, Position, Scope, Stmt};
use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Largest string a program may build (bytes); also bounds the total string bytes inside
/// one array or map.
pub const MAX_STRING: usize = 256 << 10;
/// Largest array / map a program may build.
pub const MAX_COLLECTION: usize = 10_000;
/// Deepest nesting of arrays and maps in a value a program returns (state, work and timer
/// payloads). Stored records hold these values a level or two down, and serde_json reads at
/// most 128 levels: a deeper value could be written but never read back, and its shard would
/// retry that batch for ever.
pub const MAX_OUTPUT_DEPTH: usize = 64;
/// Largest value a program may return as state (or as one work or timer payload), measured
/// as JSON. The state is rewritten on every transition of its instance.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Functions the evaluator implements itself (not listed among package functions).
const BUILTIN_KEYWORDS: &[&str] =
    &["type_of", "Fn", "call", "curry", "is_def_fn", "is_def_var", "is_shared", "print", "debug"];

/// Names a program might reach for to break determinism, with the reason it cannot.
const FORBIDDEN: &[(&str, &str)] = &[
    ("timestamp", "reads the clock"),
    ("now", "reads the clock"),
    ("elapsed", "reads the clock"),
    ("sleep", "waits on the clock"),
    ("rand", "is random"),
    ("random", "is random"),
    ("rand_float", "is random"),
    ("shuffle", "is random"),
    ("sample", "is random"),
    ("eval", "evaluates code not checked at load"),
];

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProgramError {
    #[error("saga {saga:?}: program {program} failed at line {line}, column {column} on event {event_id}: {message}")]
    Failed { saga: String, program: String, line: usize, column: usize, event_id: String, message: String },
    #[error("saga {saga:?}: program {program} ran out of gas ({gas} operations) on event {event_id}")]
    OutOfGas { saga: String, program: String, gas: u64, event_id: String },
    #[error("saga {saga:?}: program {program} ran past its wall-time guard of {ms} ms on event {event_id}")]
    TooSlow { saga: String, program: String, ms: u64, event_id: String },
    #[error("saga {saga:?}: program {program} returned a bad result on event {event_id}: {message}")]
    BadOutput { saga: String, program: String, event_id: String, message: String },
    #[error("saga {saga:?} is not in the loaded manifests")]
    UnknownSaga { saga: String },
    #[error("saga {saga:?}: program {program} does not compile: {message}")]
    Compile { saga: String, program: String, message: String },
}

/// What a transition asks for, validated.
#[derive(Debug, Clone)]
pub struct Transition {
    pub state: Dynamic,
    pub status: InstanceStatus,
    pub work: Vec<WorkSpec>,
    pub schedules: Vec<ScheduleSpec>,
}

#[derive(Debug, Clone)]
pub enum WorkSpec {
    Effect { effect: String, payload: Dynamic },
    Command { command: String, aggregate: String, aggregate_id: String, payload: Dynamic },
}

#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub name: String,
    pub after_ms: u64,
    pub payload: Dynamic,
}

/// Which entry point to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    OnEvent,
    /// The compensation entry (falls back to `on_event` when the saga names none).
    Compensation,
}

/// Per-invocation limits read by the progress callback.
#[derive(Debug)]
struct Guard {
    gas: Cell<u64>,
    deadline: Cell<Instant>,
    /// Set by the callback to say which limit stopped the program.
    stopped: Cell<Option<Stop>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Gas,
    Wall,
}

fn sandboxed_engine(guard: Option<Rc<Guard>>) -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(StandardPackage::new().as_shared_module());
    engine.disable_symbol("eval");
    engine.set_max_string_size(MAX_STRING);
    engine.set_max_array_size(MAX_COLLECTION);
    engine.set_max_map_size(MAX_COLLECTION);
    engine.set_max_call_levels(48);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_variables(1_000);
    engine.set_max_functions(1_000);
    engine.set_fail_on_invalid_map_property(false);
    engine.set_strict_variables(true);
    if let Some(guard) = guard {
        engine.on_progress(move |ops| {
            if ops > guard.gas.get() {
                guard.stopped.set(Some(Stop::Gas));
                return Some(Dynamic::UNIT);
            }
            // Reading the clock costs ~20 ns; every 256 operations is plenty for a guard.
            if ops % 256 == 0 && Instant::now() > guard.deadline.get() {
                guard.stopped.set(Some(Stop::Wall));
                return Some(Dynamic::UNIT);
            }
            None
        });
    }
    engine
}

fn known_functions(engine: &Engine) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = engine
        .gen_fn_signatures(true)
        .into_iter()
        .filter_map(|sig| {
            let sig = sig.strip_prefix("fn ").unwrap_or(&sig);
            sig.split('(').next().map(|n| n.trim().to_owned())
        })
        .collect();
    names.extend(BUILTIN_KEYWORDS.iter().map(|s| (*s).to_owned()));
    for (f, _) in FORBIDDEN {
        names.remove(*f);
    }
    names
}

fn position(pos: Position) -> (usize, usize) {
    (pos.line().unwrap_or(0), pos.position().unwrap_or(0))
}

/// Compiles a program and checks it against the sandbox: it parses, calls only functions
/// that exist (so never the clock or randomness), and defines its entry points with two
/// parameters `(state, event)`. The error names the line and column.
pub fn check_program(saga: &LoadedSaga) -> Result<(), String> {
    let engine = sandboxed_engine(None);
    let ast = engine.compile(&saga.source).map_err(|e| {
        let (line, col) = position(e.position());
        format!("compile error at line {line}, column {col}: {}", e.err_type())
    })?;
    check_ast(&engine, &ast, saga)
}

fn check_ast(engine: &Engine, ast: &AST, saga: &LoadedSaga) -> Result<(), String> {
    let known = known_functions(engine);
    let own: BTreeSet<String> = ast.iter_functions().map(|f| f.name.to_owned()).collect();
    let mut problems = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let call = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(f, pos))) if f.op_token.is_none() => Some((f, *pos)),
            Some(ASTNode::Expr(Expr::MethodCall(f, pos))) => Some((f, *pos)),
            Some(ASTNode::Stmt(Stmt::FnCall(f, pos))) if f.op_token.is_none() => Some((f, *pos)),
            _ => None,
        };
        if let Some((f, pos)) = call {
            let name = f.name.as_str();
            if !own.contains(name) && !known.contains(name) {
                let (line, col) = position(pos);
                let why = FORBIDDEN
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, why)| {
                        format!("`{name}` {why}; saga programs must be deterministic (time comes from event.timestamp)")
                    })
                    .unwrap_or_else(|| format!("unknown function `{name}`"));
                problems.push(format!("line {line}, column {col}: {why}"));
            }
        }
        true
    });
    let entries = std::iter::once(("on_event", &saga.spec.on_event))
        .chain(saga.spec.compensation.as_ref().map(|c| ("compensation", c)));
    for (field, entry) in entries {
        match ast.iter_functions().find(|f| f.name == entry.as_str()) {
            None => problems.push(format!("entry point `{entry}` (field `{field}`) is not defined")),
            Some(f) if f.params.len() != 2 => problems
                .push(format!("entry point `{entry}` takes {} parameters, expected 2 (state, event)", f.params.len())),
            Some(_) => {}
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

struct Compiled {
    ast: AST,
    on_event: String,
    compensation: Option<String>,
    gas: u64,
    max_wall: Duration,
    program: String,
}

/// One shard's compiled programs. Owned by the shard's thread.
pub struct Programs {
    engine: Engine,
    guard: Rc<Guard>,
    sagas: HashMap<String, Compiled>,
    effects: BTreeSet<String>,
}

impl Programs {
    /// Compiles every saga of the set with this shard's own engine.
    pub fn build(set: &ManifestSet) -> Result<Self, ProgramError> {
        let guard = Rc::new(Guard { gas: Cell::new(0), deadline: Cell::new(Instant::now()), stopped: Cell::new(None) });
        let engine = sandboxed_engine(Some(guard.clone()));
        let mut sagas = HashMap::new();
        for (name, saga) in &set.sagas {
            let ast = engine.compile(&saga.source).map_err(|e| ProgramError::Compile {
                saga: name.clone(),
                program: saga.program_path.display().to_string(),
                message: e.to_string(),
            })?;
            sagas.insert(
                name.clone(),
                Compiled {
                    ast,
                    on_event: saga.spec.on_event.clone(),
                    compensation: saga.spec.compensation.clone(),
                    gas: saga.spec.gas,
                    max_wall: Duration::from_millis(saga.spec.max_wall_ms),
                    program: saga.program_path.display().to_string(),
                },
            );
        }
        Ok(Self { engine, guard, sagas, effects: set.effects.keys().cloned().collect() })
    }

    pub fn has_saga(&self, saga: &str) -> bool {
        self.sagas.contains_key(saga)
    }

    /// Runs one entry point on `(state, event)` under the saga's gas and wall-time guard,
    /// and validates the result. `event_id` is for error messages.
    pub fn run(
        &self,
        saga: &str,
        entry: Entry,
        state: Dynamic,
        event: Dynamic,
        event_id: &str,
    ) -> Result<Transition, ProgramError> {
        let c = self.sagas.get(saga).ok_or_else(|| ProgramError::UnknownSaga { saga: saga.to_owned() })?;
        let name = match entry {
            Entry::OnEvent => &c.on_event,
            Entry::Compensation => c.compensation.as_ref().unwrap_or(&c.on_event),
        };
        self.guard.gas.set(c.gas);
        self.guard.deadline.set(Instant::now() + c.max_wall);
        self.guard.stopped.set(None);
        let mut scope = Scope::new();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(false);
        let result = self.engine.call_fn_with_options::<Dynamic>(options, &mut scope, &c.ast, name, (state, event));
        let out = match result {
            Ok(v) => v,
            Err(e) => {
                return Err(match (self.guard.stopped.take(), *e) {
                    (Some(Stop::Gas), _) => ProgramError::OutOfGas {
                        saga: saga.to_owned(),
                        program: c.program.clone(),
                        gas: c.gas,
                        event_id: event_id.to_owned(),
                    },
                    (Some(Stop::Wall), _) => ProgramError::TooSlow {
                        saga: saga.to_owned(),
                        program: c.program.clone(),
                        ms: c.max_wall.as_millis() as u64,
                        event_id: event_id.to_owned(),
                    },
                    (None, err) => {
                        let (line, column) = position(innermost_position(&err));
                        ProgramError::Failed {
                            saga: saga.to_owned(),
                            program: c.program.clone(),
                            line,
                            column,
                            event_id: event_id.to_owned(),
                            message: describe(&err),
                        }
                    }
                });
            }
        };
        self.validate(out).and_then(|t| check_limits(&t).map(|()| t)).map_err(|message| ProgramError::BadOutput {
            saga: saga.to_owned(),
            program: c.program.clone(),
            event_id: event_id.to_owned(),
            message,
        })
    }

    fn validate(&self, out: Dynamic) -> Result<Transition, String> {
        let mut map = out.try_cast::<rhai::Map>().ok_or("expected a map #{ state, status, work, schedules }")?;
        for k in map.keys() {
            if !matches!(k.as_str(), "state" | "status" | "work" | "schedules") {
                return Err(format!("unknown field `{k}` (allowed: state, status, work, schedules)"));
            }
        }
        let state = map.remove("state").unwrap_or(Dynamic::UNIT);
        let status = match map.remove("status") {
            None => InstanceStatus::Running,
            Some(s) => match s.into_immutable_string().as_ref().map(|s| s.as_str()) {
                Ok("running") => InstanceStatus::Running,
                Ok("completed") => InstanceStatus::Completed,
                Ok("failed") => InstanceStatus::Failed,
                Ok(other) => return Err(format!("status {other:?} is not one of running, completed, failed")),
                Err(t) => return Err(format!("status must be a string, got {t}")),
            },
        };
        let mut work = Vec::new();
        for (i, item) in list(map.remove("work"), "work")?.into_iter().enumerate() {
            let mut m = item.try_cast::<rhai::Map>().ok_or_else(|| format!("work[{i}] is not a map"))?;
            let payload = m.remove("payload").unwrap_or_else(|| Dynamic::from_map(rhai::Map::new()));
            if let Some(effect) = m.remove("effect") {
                let effect = string(effect, ("work", i, "effect"))?;
                // A saga-only runner without effect manifests cannot check names here.
                if !self.effects.is_empty() && !self.effects.contains(&effect) {
                    return Err(format!(
                        "work[{i}].effect {effect:?} is not a known effect (known: {})",
                        join(&self.effects)
                    ));
                }
                if let Some(k) = m.keys().next() {
                    return Err(format!("work[{i}] has unknown field `{k}`"));
                }
                work.push(WorkSpec::Effect { effect, payload });
            } else if let Some(command) = m.remove("command") {
                let command = string(command, ("work", i, "command"))?;
                let aggregate = string(
                    m.remove("aggregate").ok_or_else(|| format!("work[{i}] has no `aggregate`"))?,
                    ("work", i, "aggregate"),
                )?;
                let aggregate_id = string(
                    m.remove("aggregate_id").ok_or_else(|| format!("work[{i}] has no `aggregate_id`"))?,
                    ("work", i, "aggregate_id"),
                )?;
                if let Some(k) = m.keys().next() {
                    return Err(format!("work[{i}] has unknown field `{k}`"));
                }
                if command.is_empty() || aggregate.is_empty() || aggregate_id.is_empty() {
                    return Err(format!("work[{i}]: command, aggregate and aggregate_id must not be empty"));
                }
                work.push(WorkSpec::Command { command, aggregate, aggregate_id, payload });
            } else {
                return Err(format!("work[{i}] needs `effect` or `command`"));
            }
        }
        let mut schedules = Vec::new();
        for (i, item) in list(map.remove("schedules"), "schedules")?.into_iter().enumerate() {
            let mut m = item.try_cast::<rhai::Map>().ok_or_else(|| format!("schedules[{i}] is not a map"))?;
            let name = string(
                m.remove("name").ok_or_else(|| format!("schedules[{i}] has no `name`"))?,
                ("schedules", i, "name"),
            )?;
            if !crate::manifest::valid_name(&name) {
                return Err(format!("schedules[{i}].name {name:?} must be 1-64 letters, digits, `_` or `-`"));
            }
            let after = m.remove("after_ms").ok_or_else(|| format!("schedules[{i}] has no `after_ms`"))?;
            let after_ms =
                after.as_int().map_err(|t| format!("schedules[{i}].after_ms must be an integer, got {t}"))?;
            if after_ms < 0 {
                return Err(format!("schedules[{i}].after_ms must not be negative"));
            }
            let payload = m.remove("payload").unwrap_or_else(|| Dynamic::from_map(rhai::Map::new()));
            if let Some(k) = m.keys().next() {
                return Err(format!("schedules[{i}] has unknown field `{k}`"));
            }
            schedules.push(ScheduleSpec { name, after_ms: after_ms as u64, payload });
        }
        Ok(Transition { state, status, work, schedules })
    }
}

/// Checks every value of a transition against [`MAX_OUTPUT_DEPTH`] and [`MAX_OUTPUT_BYTES`]
/// before anything of it is staged, so a value that could not be stored and read back
/// quarantines its own key instead of stopping the shard.
fn check_limits(t: &Transition) -> Result<(), String> {
    let check = |v: &Dynamic, what: &dyn std::fmt::Display| {
        let mut bytes = 0;
        measure(v, 0, &mut bytes).map_err(|limit| match limit {
            Limit::Depth => format!("{what} nests deeper than {MAX_OUTPUT_DEPTH} levels (the limit)"),
            Limit::Bytes => format!("{what} is larger than {MAX_OUTPUT_BYTES} bytes as JSON (the limit)"),
        })
    };
    check(&t.state, &"`state`")?;
    for (i, w) in t.work.iter().enumerate() {
        let payload = match w {
            WorkSpec::Effect { payload, .. } | WorkSpec::Command { payload, .. } => payload,
        };
        check(payload, &format_args!("`work[{i}].payload`"))?;
    }
    for (i, s) in t.schedules.iter().enumerate() {
        check(&s.payload, &format_args!("`schedules[{i}].payload`"))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Depth,
    Bytes,
}

/// Adds the JSON size of `v` (close to what serde_json writes; escapes aside) to `bytes`
/// and checks the limits, stopping at the first one passed: the walk never goes deeper than
/// [`MAX_OUTPUT_DEPTH`] + 1 levels nor much past [`MAX_OUTPUT_BYTES`].
fn measure(v: &Dynamic, depth: usize, bytes: &mut usize) -> Result<(), Limit> {
    let nested = || if depth + 1 > MAX_OUTPUT_DEPTH { Err(Limit::Depth) } else { Ok(()) };
    if let Some(m) = v.read_lock::<rhai::Map>() {
        nested()?;
        *bytes += 2 + m.len();
        for (k, x) in m.iter() {
            *bytes += k.len() + 3;
            measure(x, depth + 1, bytes)?;
        }
    } else if let Some(a) = v.read_lock::<rhai::Array>() {
        nested()?;
        *bytes += 2 + a.len();
        for x in a.iter() {
            measure(x, depth + 1, bytes)?;
        }
    } else if let Some(b) = v.read_lock::<rhai::Blob>() {
        nested()?;
        *bytes += 2 + 4 * b.len();
    } else if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        *bytes += 2 + s.len();
    } else {
        // Numbers, booleans, `()`, characters: at most a couple of dozen bytes.
        *bytes += 24;
    }
    if *bytes > MAX_OUTPUT_BYTES { Err(Limit::Bytes) } else { Ok(()) }
}

fn list(v: Option<Dynamic>, field: &str) -> Result<rhai::Array, String> {
    match v {
        None => Ok(Vec::new()),
        Some(v) if v.is_unit() => Ok(Vec::new()),
        Some(v) => {
            let t = v.type_name();
            v.try_cast::<rhai::Array>().ok_or_else(|| format!("`{field}` must be an array, got {t}"))
        }
    }
}

/// A string field of item `i` of list `list` (the name is built only for an error).
fn string(v: Dynamic, (list, i, field): (&str, usize, &str)) -> Result<String, String> {
    v.into_immutable_string()
        .map(|s| s.to_string())
        .map_err(|t| format!("`{list}[{i}].{field}` must be a string, got {t}"))
}

fn join(s: &BTreeSet<String>) -> String {
    if s.is_empty() { "none".into() } else { s.iter().cloned().collect::<Vec<_>>().join(", ") }
}

fn innermost_position(err: &EvalAltResult) -> Position {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, pos) => {
            let p = innermost_position(inner);
            if p.is_none() { *pos } else { p }
        }
        other => other.position(),
    }
}

fn describe(err: &EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorRuntime(v, _) => format!("program threw: {v}"),
        EvalAltResult::ErrorInFunctionCall(f, _, inner, _) => format!("in `{f}`: {}", describe(inner)),
        EvalAltResult::ErrorDataTooLarge(what, _) => format!("{what} exceeds the sandbox's size limit"),
        other => {
            let s = other.to_string();
            // Rhai appends "(line L, position C)"; the caller reports the position itself.
            s.split(" (line ").next().unwrap_or(&s).to_owned()
        }
    }
}

#[cfg(test)]
mod tests;
