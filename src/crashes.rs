//! Messages that crash the process (issue 17 item 16). A message whose processing kills the
//! process (a panic under `panic = "abort"`, a stack overflow, an abort in a dependency, an
//! OOM kill) is never acked, so it comes back after every restart and kills the runner
//! again. This module keeps, across restarts, how often that happened to each message.
//!
//! The suspects are the messages a consumer had delivered and not settled when this
//! process bound it ([`Unsettled`], read from the consumer before it is re-created at its
//! ack floor, which resets JetStream's own delivery count). Each is handed to the shards
//! alone, one at a time over all consumers (the bridge's lane, `bridge::ingest`), after its count
//! here was raised and synced: if the process dies now, this message was the only one
//! running alone. Once the shards took it in (settled, or waiting behind its key) the next
//! one goes; its entry is removed when it settles. At the start whose count reaches
//! `consumers.max_crashes` the message is quarantined instead of run (the shard files a
//! poison dead letter per key); at a later one (the quarantine itself died: decoding or
//! routing crashes) it is filed raw, undecoded.
//!
//! ```text
//!   bind: unsettled (floor, upto] ──> each suspect, alone:  count += 1 (fdatasync)
//!        count < max ──> decode, route, apply ──> taken in? ──> next suspect
//!        count = max ──> decode, route, quarantine per key (poison dead letter), TERM
//!        count > max ──> dead letter of the raw message, TERM
//!   settled ──> entry removed (no sync; a process crash keeps the write)
//! ```
//!
//! The ledger is a file of JSON lines in the data directory ([`LEDGER_FILE`]), one line per change (the last
//! line of a message wins), rewritten compacted at every start. It is small: an entry lives
//! from a start to its message's settlement, and entries at or below a consumer's ack floor
//! or above what it has delivered, or of consumers no longer configured, are dropped. Owned by the bridge thread; its file
//! writes run on tokio's blocking pool.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// The ledger's file name in the data directory.
pub const LEDGER_FILE: &str = "crash-attempts.jsonl";

/// One message of one of our consumers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Suspect {
    /// The durable consumer's name.
    pub consumer: String,
    pub stream: String,
    /// Stream sequence.
    pub seq: u64,
}

/// One line of the ledger: the message's count from then on (0: settled, forgotten).
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    #[serde(flatten)]
    message: Suspect,
    starts: u32,
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
    starts: HashMap<Suspect, u32>,
}

impl CrashLedger {
    /// Opens the ledger at `path` (created when missing), keeps the entries of `consumers`
    /// only, and rewrites it compacted. A line that does not parse (a write cut short by a
    /// crash) is skipped: it costs that message at most one more crash.
    pub fn open(path: &Path, consumers: &[String]) -> Result<Self, LedgerError> {
        let io = |what: &'static str| move |source| LedgerError::Io { path: path.to_owned(), what, source };
        let mut starts: HashMap<Suspect, u32> = HashMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(io("read"))?;
                    match serde_json::from_str::<Line>(&line) {
                        Ok(Line { message, starts: 0 }) => {
                            starts.remove(&message);
                        }
                        Ok(Line { message, starts: n }) => {
                            starts.insert(message, n);
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
        starts.retain(|m, _| consumers.contains(&m.consumer));
        let tmp = path.with_extension("tmp");
        {
            let mut out = File::create(&tmp).map_err(io("write"))?;
            let mut text = Vec::new();
            for (message, n) in &starts {
                text.extend(line(message, *n));
            }
            out.write_all(&text).map_err(io("write"))?;
            out.sync_all().map_err(io("sync"))?;
        }
        std::fs::rename(&tmp, path).map_err(io("replace"))?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync the directory of"))?;
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io("open"))?;
        if !starts.is_empty() {
            tracing::info!(path = %path.display(), entries = starts.len(), "crash ledger: messages the process died with");
        }
        Ok(Self { path: path.to_owned(), inner: Arc::new(Mutex::new(Inner { file, starts })) })
    }

    /// Counts one more start at which `m` runs alone, on disk (synced) before it returns;
    /// the count including this one.
    pub async fn mark(&self, m: &Suspect) -> Result<u32, LedgerError> {
        let m = m.clone();
        self.write(move |inner| {
            let n = inner.starts.get(&m).copied().unwrap_or(0).saturating_add(1);
            inner.file.write_all(&line(&m, n)).map_err(|e| ("write", e))?;
            inner.file.sync_data().map_err(|e| ("sync", e))?;
            inner.starts.insert(m, n);
            Ok(n)
        })
        .await
    }

    /// Forgets `m`: it settled. Not synced: a process crash keeps the write, and a power
    /// loss costs the message one count at most.
    pub async fn clear(&self, m: &Suspect) -> Result<(), LedgerError> {
        let m = m.clone();
        self.write(move |inner| {
            if inner.starts.remove(&m).is_some() {
                inner.file.write_all(&line(&m, 0)).map_err(|e| ("write", e))?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets the entries of `consumer` outside what it has unsettled now: at or below its
    /// ack floor they settled; above what it delivered they belong to an earlier stream of
    /// the same name (a re-created stream starts its sequences again).
    pub async fn keep_unsettled(&self, consumer: &str, range: Unsettled) -> Result<(), LedgerError> {
        let consumer = consumer.to_owned();
        self.write(move |inner| {
            let done: Vec<Suspect> = inner
                .starts
                .keys()
                .filter(|m| m.consumer == consumer && (m.seq <= range.floor || m.seq > range.upto))
                .cloned()
                .collect();
            for m in done {
                inner.starts.remove(&m);
                inner.file.write_all(&line(&m, 0)).map_err(|e| ("write", e))?;
            }
            Ok(())
        })
        .await
    }

    /// Messages counted and not settled.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).starts.len()
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

fn line(message: &Suspect, starts: u32) -> Vec<u8> {
    // A plain struct of strings and integers always serialises.
    let mut bytes = serde_json::to_vec(&Line { message: message.clone(), starts }).unwrap_or_default();
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

/// One consumer's suspects in this process: the messages of its [`Unsettled`] range at its
/// first binding. Each is handed on alone once; a redelivery in the same process (after a
/// reconnect) is not another start and goes the usual way.
#[derive(Debug)]
pub struct Suspects {
    pub consumer: String,
    pub stream: String,
    range: Unsettled,
    handled: HashSet<u64>,
    started: Instant,
    reported: bool,
}

impl Suspects {
    /// `None` when nothing was unsettled.
    pub fn new(consumer: &str, stream: &str, range: Unsettled) -> Option<Self> {
        (range.upto > range.floor).then(|| Self {
            consumer: consumer.to_owned(),
            stream: stream.to_owned(),
            range,
            handled: HashSet::new(),
            started: Instant::now(),
            reported: false,
        })
    }

    /// Whether the message at `seq` is a suspect not yet handed on in this process; if so
    /// it counts as handed on from now.
    pub fn take(&mut self, seq: u64) -> Option<Suspect> {
        if seq <= self.range.floor || seq > self.range.upto || !self.handled.insert(seq) {
            return None;
        }
        Some(Suspect { consumer: self.consumer.clone(), stream: self.stream.clone(), seq })
    }

    /// Logs once, when the consumer got past its range, how many went alone and how long it
    /// took.
    pub fn report_past(&mut self, seq: u64) {
        if self.reported || seq < self.range.upto {
            return;
        }
        self.reported = true;
        tracing::info!(
            stream = %self.stream,
            consumer = %self.consumer,
            suspects = self.handled.len(),
            took_ms = self.started.elapsed().as_millis() as u64,
            "messages in flight when the process last stopped were applied one at a time"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(consumer: &str, seq: u64) -> Suspect {
        Suspect { consumer: consumer.into(), stream: "S".into(), seq }
    }

    #[test]
    fn counts_survive_a_reopen_and_settled_or_foreign_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crash-attempts.jsonl");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
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

    #[test]
    fn a_suspect_is_handed_on_alone_once_per_process() {
        assert!(Suspects::new("a", "S", Unsettled { floor: 7, upto: 7 }).is_none());
        let mut s = Suspects::new("a", "S", Unsettled { floor: 7, upto: 9 }).unwrap();
        assert_eq!(s.take(7), None, "at the floor: settled");
        assert_eq!(s.take(8).map(|m| m.seq), Some(8));
        assert_eq!(s.take(8), None, "redelivered in the same process");
        assert_eq!(s.take(9).map(|m| m.seq), Some(9));
        assert_eq!(s.take(10), None, "delivered first after the start");
    }
}
