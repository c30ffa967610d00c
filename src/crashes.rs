//! Messages that crash the process (issue 17 item 16). A message whose processing kills the
//! process (a panic under `panic = "abort"`, a stack overflow, an abort in a dependency, an
//! OOM kill) is never acked, so it comes back after every restart and kills the runner
//! again. This module keeps, across restarts, what is needed to find that message and
//! quarantine it, at no cost to a first delivery and little to a restart after an ordinary
//! crash.
//!
//! The suspects are the messages a consumer had delivered and not settled when this
//! process bound it ([`Unsettled`], read from the consumer before it is re-created at its
//! ack floor, which resets JetStream's own delivery count). After a crash they first run
//! again as usual, under one synced mark for the consumer ([`Rerun`]), removed once they all
//! settled. Only if the process dies again before that do they run alone at the next start:
//! one at a time over all consumers (the bridge's lane, `bridge::ingest`), each after its
//! own count here was raised and synced, so that a death is charged to the one message
//! running. A message is quarantined instead of run once the process has died
//! `consumers.max_crashes` times with it in flight: the death that left it unsettled, the
//! one during the rerun, and at least one while it ran alone. If that start dies too
//! (decoding or routing it is what crashes), the next files it raw, undecoded.
//!
//! ```text
//!   bind: unsettled (floor, upto], no rerun mark ─► mark (sync) ─► run them as usual
//!                                                   all settled ─► mark removed
//!   bind: unsettled (floor, upto], rerun mark    ─► each one alone: count += 1 (sync)
//!        deaths < max ─► decode, route, apply ─► taken in? ─► next one
//!        deaths = max ─► decode, route, quarantine per key (poison dead letter), TERM
//!        deaths > max ─► dead letter of the raw message, TERM
//!   settled ─► its count removed (no sync: a process crash keeps the write)
//! ```
//!
//! The ledger is a file of JSON lines in the data directory ([`LEDGER_FILE`]), one line
//! per change (the last line of a message wins), rewritten compacted at every start. It is
//! small: an entry lives from a start to its message's settlement, and entries at or below
//! a consumer's ack floor, above what it has delivered, or of consumers no longer
//! configured are dropped. Owned by the bridge thread; its file writes run on tokio's
//! blocking pool.

use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// The ledger's file name in the data directory.
pub const LEDGER_FILE: &str = "crash-attempts.jsonl";

/// One message of one of our consumers; sequence 0 stands for the consumer's rerun mark.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Suspect {
    /// The durable consumer's name.
    pub consumer: String,
    pub stream: String,
    /// Stream sequence (JetStream's start at 1).
    pub seq: u64,
}

impl Suspect {
    fn rerun_mark(consumer: &str, stream: &str) -> Self {
        Self { consumer: consumer.to_owned(), stream: stream.to_owned(), seq: 0 }
    }
}

/// What the ledger holds for one message: the starts at which it ran alone; for a rerun
/// mark, the end of the range that was run again when the process died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    starts: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    upto: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One line of the ledger: the entry from then on (`starts` 0: settled, forgotten).
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    #[serde(flatten)]
    message: Suspect,
    #[serde(flatten)]
    entry: Entry,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("crash ledger {path}: cannot {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("crash ledger {path}: a write did not finish: {why}")]
    Lost { path: PathBuf, why: String },
}

/// The counts, on disk and in memory.
#[derive(Debug)]
pub struct CrashLedger {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    entries: HashMap<Suspect, Entry>,
}

impl CrashLedger {
    /// Opens the ledger at `path` (created when missing), keeps the entries of `consumers`
    /// only, and rewrites it compacted. A line that does not parse (a write cut short by a
    /// crash) is skipped: it costs that message at most one more crash.
    pub fn open(path: &Path, consumers: &[String]) -> Result<Self, LedgerError> {
        let io = |what: &'static str| move |source| LedgerError::Io { path: path.to_owned(), what, source };
        let mut entries: HashMap<Suspect, Entry> = HashMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(io("read"))?;
                    match serde_json::from_str::<Line>(&line) {
                        Ok(Line { message, entry }) if entry.starts == 0 => {
                            entries.remove(&message);
                        }
                        Ok(Line { message, entry }) => {
                            entries.insert(message, entry);
                        }
                        Err(e) if !line.trim().is_empty() => {
                            tracing::warn!(path = %path.display(), error = %e, "skipping a damaged line of the crash ledger")
                        }
                        Err(_) => {}
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read")(e)),
        }
        entries.retain(|m, _| consumers.contains(&m.consumer));
        let tmp = path.with_extension("tmp");
        {
            let mut out = File::create(&tmp).map_err(io("write"))?;
            let mut text = Vec::new();
            for (message, entry) in &entries {
                text.extend(line(message, *entry));
            }
            out.write_all(&text).map_err(io("write"))?;
            out.sync_all().map_err(io("sync"))?;
        }
        std::fs::rename(&tmp, path).map_err(io("replace"))?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync the directory of"))?;
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io("open"))?;
        if !entries.is_empty() {
            tracing::info!(path = %path.display(), entries = entries.len(), "crash ledger: messages the process died with");
        }
        Ok(Self { path: path.to_owned(), inner: Arc::new(Mutex::new(Inner { file, entries })) })
    }

    /// Counts one more start at which `m` runs alone, on disk (synced) before it returns;
    /// the count including this one.
    pub async fn mark(&self, m: &Suspect) -> Result<u32, LedgerError> {
        let m = m.clone();
        self.write(move |inner| {
            let mut entry = inner.entries.get(&m).copied().unwrap_or_default();
            entry.starts = entry.starts.saturating_add(1);
            inner.file.write_all(&line(&m, entry)).map_err(|e| ("write", e))?;
            inner.file.sync_data().map_err(|e| ("sync", e))?;
            inner.entries.insert(m, entry);
            Ok(entry.starts)
        })
        .await
    }

    /// Marks, synced, that `consumer` runs its unsettled messages up to `upto` again as
    /// usual: if the process dies before they settled, they run alone at the next start.
    async fn mark_rerun(&self, consumer: &str, stream: &str, upto: u64) -> Result<(), LedgerError> {
        let m = Suspect::rerun_mark(consumer, stream);
        self.write(move |inner| {
            let entry = Entry { starts: 1, upto };
            inner.file.write_all(&line(&m, entry)).map_err(|e| ("write", e))?;
            inner.file.sync_data().map_err(|e| ("sync", e))?;
            inner.entries.insert(m, entry);
            Ok(())
        })
        .await
    }

    /// Where the rerun the process died in ended, if it died in one (`consumer`'s mark).
    fn died_in_rerun(&self, consumer: &str, stream: &str) -> Option<u64> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.entries.get(&Suspect::rerun_mark(consumer, stream)).map(|e| e.upto)
    }

    /// Forgets `m`: it settled. Not synced: a process crash keeps the write, and a power
    /// loss costs the message one count at most.
    pub async fn clear(&self, m: &Suspect) -> Result<(), LedgerError> {
        let m = m.clone();
        self.write(move |inner| {
            if inner.entries.remove(&m).is_some() {
                inner.file.write_all(&line(&m, Entry::default())).map_err(|e| ("write", e))?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets the entries of `consumer` outside what it has unsettled now: at or below its
    /// ack floor they settled; above what it delivered they belong to an earlier stream of
    /// the same name (a re-created stream starts its sequences again). Its rerun mark goes
    /// when nothing is unsettled.
    pub async fn keep_unsettled(&self, consumer: &str, range: Unsettled) -> Result<(), LedgerError> {
        let consumer = consumer.to_owned();
        self.write(move |inner| {
            let done: Vec<Suspect> = inner
                .entries
                .keys()
                .filter(|m| m.consumer == consumer)
                .filter(|m| match m.seq {
                    0 => range.is_empty(),
                    seq => seq <= range.floor || seq > range.upto,
                })
                .cloned()
                .collect();
            for m in done {
                inner.entries.remove(&m);
                inner.file.write_all(&line(&m, Entry::default())).map_err(|e| ("write", e))?;
            }
            Ok(())
        })
        .await
    }

    /// Messages counted and not settled (rerun marks included).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the blocking pool (file writes and syncs block).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, (&'static str, std::io::Error)> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let inner = self.inner.clone();
        let done = tokio::task::spawn_blocking(move || f(&mut inner.lock().unwrap_or_else(PoisonError::into_inner)))
            .await
            .map_err(|e| LedgerError::Lost { path: self.path.clone(), why: e.to_string() })?;
        done.map_err(|(what, source)| LedgerError::Io { path: self.path.clone(), what, source })
    }
}

fn line(message: &Suspect, entry: Entry) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&Line { message: message.clone(), entry })
        .expect("a ledger line is strings and integers, which always serialise");
    bytes.push(b'\n');
    bytes
}

/// What a consumer had delivered and not settled when this process bound it: stream
/// sequences above `floor` up to `upto` (empty when `upto <= floor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsettled {
    pub floor: u64,
    pub upto: u64,
}

impl Unsettled {
    pub fn is_empty(&self) -> bool {
        self.upto <= self.floor
    }

    fn holds(&self, seq: u64) -> bool {
        seq > self.floor && seq <= self.upto
    }
}

/// A consumer's unsettled messages run again as usual after a crash: the consumer's rerun
/// mark is removed once it got past them and every one settled. Bridge thread only.
#[derive(Debug)]
pub struct Rerun {
    ledger: Rc<CrashLedger>,
    mark: Suspect,
    outstanding: Cell<usize>,
    passed: Cell<bool>,
}

impl Rerun {
    /// One of them was handed to the shards; [`Self::settled`] follows.
    pub fn handed(&self) {
        self.outstanding.set(self.outstanding.get() + 1);
    }

    /// One handed on settled.
    pub async fn settled(&self) {
        self.outstanding.set(self.outstanding.get().saturating_sub(1));
        self.finish().await;
    }

    async fn finish(&self) {
        if self.passed.get() && self.outstanding.get() == 0 {
            self.passed.set(false);
            if let Err(e) = self.ledger.clear(&self.mark).await {
                tracing::warn!(consumer = %self.mark.consumer, error = %e, "cannot clear a rerun mark of the crash ledger");
            }
        }
    }
}

/// How one message of a consumer's unsettled range goes to the shards.
#[derive(Debug)]
pub enum Take {
    /// As usual: not a suspect, or already handed on in this process.
    Usual,
    /// As usual, counted for the consumer's rerun mark.
    Rerun(Rc<Rerun>),
    /// Alone, counted first; `prior` deaths had it in flight before the starts at which it
    /// ran alone (2 when it was in the range that was run again, 1 when it was first
    /// delivered during that rerun).
    Alone { suspect: Suspect, prior: u32 },
}

/// What a consumer does with its unsettled messages in this process.
#[derive(Debug)]
enum Phase {
    Rerun(Rc<Rerun>),
    /// The process died in the last rerun, which ran up to `rerun_upto`.
    Alone {
        rerun_upto: u64,
    },
}

/// One consumer's suspects in this process: the messages of its [`Unsettled`] range at its
/// first binding. A redelivery in the same process (after a reconnect) is not another
/// start and goes the usual way.
#[derive(Debug)]
pub struct Suspects {
    ledger: Rc<CrashLedger>,
    consumer: String,
    stream: String,
    range: Unsettled,
    phase: Phase,
    handled: HashSet<u64>,
    started: Instant,
    reported: bool,
}

impl Suspects {
    /// Looks at what `consumer` left unsettled: `None` when nothing; otherwise a rerun (the
    /// mark synced first) or, when the process died in the last one, one message at a time.
    pub async fn bind(
        ledger: &Rc<CrashLedger>,
        consumer: &str,
        stream: &str,
        range: Unsettled,
    ) -> Result<Option<Self>, LedgerError> {
        ledger.keep_unsettled(consumer, range).await?;
        if range.is_empty() {
            return Ok(None);
        }
        let phase = match ledger.died_in_rerun(consumer, stream) {
            Some(rerun_upto) => Phase::Alone { rerun_upto },
            None => {
                ledger.mark_rerun(consumer, stream, range.upto).await?;
                let mark = Suspect::rerun_mark(consumer, stream);
                Phase::Rerun(Rc::new(Rerun {
                    ledger: ledger.clone(),
                    mark,
                    outstanding: Cell::new(0),
                    passed: Cell::new(false),
                }))
            }
        };
        tracing::info!(
            stream,
            consumer,
            floor = range.floor,
            upto = range.upto,
            alone = matches!(phase, Phase::Alone { .. }),
            "messages in flight when the process last stopped"
        );
        Ok(Some(Self {
            ledger: ledger.clone(),
            consumer: consumer.to_owned(),
            stream: stream.to_owned(),
            range,
            phase,
            handled: HashSet::new(),
            started: Instant::now(),
            reported: false,
        }))
    }

    /// How the message at `seq` goes to the shards.
    pub fn take(&mut self, seq: u64) -> Take {
        if !self.range.holds(seq) || !self.handled.insert(seq) {
            return Take::Usual;
        }
        match &self.phase {
            Phase::Rerun(r) => Take::Rerun(r.clone()),
            Phase::Alone { rerun_upto } => Take::Alone {
                suspect: Suspect { consumer: self.consumer.clone(), stream: self.stream.clone(), seq },
                prior: if seq <= *rerun_upto { 2 } else { 1 },
            },
        }
    }

    /// The message at `seq` was handed on: once past the range, a rerun's mark goes when
    /// the rest settled, and after a run one at a time the mark goes at once (the counts
    /// of the messages that have not settled stay). Logged once.
    pub async fn handed(&mut self, seq: u64) {
        if self.reported || seq < self.range.upto {
            return;
        }
        self.reported = true;
        let took_ms = self.started.elapsed().as_millis() as u64;
        match &self.phase {
            Phase::Rerun(r) => {
                tracing::info!(stream = %self.stream, consumer = %self.consumer, suspects = self.handled.len(), took_ms, "messages in flight when the process last stopped were run again");
                r.passed.set(true);
                r.finish().await;
            }
            Phase::Alone { .. } => {
                tracing::info!(stream = %self.stream, consumer = %self.consumer, suspects = self.handled.len(), took_ms, "messages in flight when the process last stopped were applied one at a time");
                let mark = Suspect::rerun_mark(&self.consumer, &self.stream);
                if let Err(e) = self.ledger.clear(&mark).await {
                    tracing::warn!(consumer = %self.consumer, error = %e, "cannot clear a rerun mark of the crash ledger");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(consumer: &str, seq: u64) -> Suspect {
        Suspect { consumer: consumer.into(), stream: "S".into(), seq }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    #[test]
    fn counts_survive_a_reopen_and_settled_or_foreign_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let rt = runtime();
        let consumers = ["a".to_owned(), "b".to_owned()];
        rt.block_on(async {
            let l = CrashLedger::open(&path, &consumers).unwrap();
            assert_eq!(l.mark(&m("a", 5)).await.unwrap(), 1);
            assert_eq!(l.mark(&m("a", 5)).await.unwrap(), 2);
            assert_eq!(l.mark(&m("a", 6)).await.unwrap(), 1);
            assert_eq!(l.mark(&m("a", 9)).await.unwrap(), 1);
            assert_eq!(l.mark(&m("b", 1)).await.unwrap(), 1);
            l.clear(&m("a", 6)).await.unwrap();
            l.keep_unsettled("b", Unsettled { floor: 1, upto: 4 }).await.unwrap();
        });
        // A write cut short by a crash.
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"consumer\":\"a\",\"str").unwrap();
        rt.block_on(async {
            let l = CrashLedger::open(&path, &consumers).unwrap();
            assert_eq!(l.len(), 2, "a/5 and a/9 are left");
            assert_eq!(l.mark(&m("a", 5)).await.unwrap(), 3, "the count went on across the reopen");
            assert_eq!(l.mark(&m("a", 6)).await.unwrap(), 1, "a settled message starts again");
            // Delivered up to 6 only: 9 belongs to an earlier stream of the same name.
            l.keep_unsettled("a", Unsettled { floor: 4, upto: 6 }).await.unwrap();
            assert_eq!(l.len(), 2, "a/5 and a/6 are left");
        });
        // Consumer `a` is no longer configured: its entries go.
        let l = CrashLedger::open(&path, &["b".to_owned()]).unwrap();
        assert!(l.is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.is_empty(), "rewritten compacted: {text:?}");
    }

    /// What the consumer `a` of stream `S` does at a start with `range` unsettled.
    async fn start(path: &Path, range: Unsettled) -> (Rc<CrashLedger>, Option<Suspects>) {
        let l = Rc::new(CrashLedger::open(path, &["a".to_owned()]).unwrap());
        let s = Suspects::bind(&l, "a", "S", range).await.unwrap();
        (l, s)
    }

    #[test]
    fn after_a_crash_the_unsettled_run_again_and_after_a_death_in_that_rerun_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        runtime().block_on(async {
            assert!(start(&path, Unsettled { floor: 7, upto: 7 }).await.1.is_none(), "nothing unsettled");
            // A crash left 8..=10 unsettled: they run again as usual.
            let (_, s) = start(&path, Unsettled { floor: 7, upto: 10 }).await;
            let mut s = s.unwrap();
            assert!(matches!(s.take(7), Take::Usual), "at the floor: settled");
            assert!(matches!(s.take(8), Take::Rerun(_)));
            // The process dies in the rerun, with 8..=12 unsettled: they run alone now,
            // those of the rerun with two deaths behind them, 11 and 12 with one.
            let (l, s) = start(&path, Unsettled { floor: 7, upto: 12 }).await;
            let mut s = s.unwrap();
            match s.take(9) {
                Take::Alone { suspect, prior } => assert_eq!((suspect.seq, prior), (9, 2)),
                other => panic!("{other:?}"),
            }
            assert!(matches!(s.take(9), Take::Usual), "redelivered in the same process");
            assert!(matches!(s.take(11), Take::Alone { prior: 1, .. }));
            assert!(matches!(s.take(13), Take::Usual), "delivered first after the start");
            // Past the range: the next crash reruns again.
            s.handed(12).await;
            assert!(l.died_in_rerun("a", "S").is_none());
            let (l, s) = start(&path, Unsettled { floor: 12, upto: 14 }).await;
            let mut s = s.unwrap();
            assert!(matches!(s.take(13), Take::Rerun(_)));
            // A rerun's mark goes once it is past the range and all it handed on settled.
            let Take::Rerun(r) = s.take(14) else { panic!("a rerun") };
            r.handed();
            s.handed(14).await;
            assert!(l.died_in_rerun("a", "S").is_some(), "14 has not settled: the mark stays");
            r.settled().await;
            assert!(l.died_in_rerun("a", "S").is_none());
        });
        let l = CrashLedger::open(&path, &["a".to_owned()]).unwrap();
        assert!(l.is_empty(), "the removal is on disk");
    }
}
