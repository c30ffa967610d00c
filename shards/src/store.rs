//! The per-shard store: one LMDB environment, its named databases, and the one way to
//! write to it — a [`Batch`] committed in one write transaction.
//!
//! Owned by its shard's thread (the env's only writer). Read transactions are opened
//! without thread-local storage so that several tasks of one executor may read; none is
//! ever held across an `.await`.

use crate::keys::{
    CheckpointKey, DeadLetterKey, EffectKey, HistoryKey, OutboxKey, ResultKey, SagaKey, ScheduleKey,
    deadletter_tenant_prefix, schedule_upper_bound,
};
use crate::record::{AppliedRef, DeadLetter, EffectRecord, OutboxItem, ReplayMark, SagaRecord, ScheduleEntry};
use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, WithoutTls};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// How hard a commit tries to reach the disk. Set per data directory in the runner's
/// config (`storage.durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every commit reaches the disk before anything that depends on it leaves the
    /// process, so a JetStream ack survives a process crash, an OS crash and a power loss.
    /// The default, and the only mode for production.
    ///
    /// The commit itself does not wait for the disk (LMDB runs with `MDB_NOSYNC`); a flush
    /// ([`Flusher::flush`], on another thread) then syncs the data file and records the
    /// transaction id in a marker file (`durable`), synced after it. The next commit waits
    /// for that flush, so at most one transaction is ever not on disk; LMDB never reuses
    /// pages of the last durable snapshot while a single newer transaction exists, so that
    /// snapshot is intact. A crash during a flush may leave the newest meta page on disk
    /// without all of its data pages (the disk may order writes as it likes); at open, a
    /// last transaction one past the marker is therefore discarded (`MDB_PREVSNAPSHOT`):
    /// nothing of it was acted on, since actions wait for the flush.
    #[default]
    Fsync,
    /// UNSAFE for production (`MDB_NOMETASYNC`): data pages are synced, the meta page is not.
    /// A process crash loses nothing; an OS crash or power loss may roll back the last
    /// committed transaction(s) while their messages were already acked, so those events
    /// are lost to the saga. Database integrity is kept. For benchmarks.
    NoMetaSync,
    /// UNSAFE for production (`MDB_NOSYNC`): no fsync at all; the OS writes pages when it
    /// likes. A process crash (SIGKILL) loses nothing, because the pages are in the OS page
    /// cache; an OS crash or power loss may lose any number of recent commits whose
    /// messages were acked, and on file systems that reorder writes may corrupt the
    /// environment. For benchmarks.
    NoSync,
}

impl Durability {
    fn flags(self) -> EnvFlags {
        match self {
            // Synced by the flusher, not by the commit.
            Durability::Fsync => EnvFlags::NO_SYNC,
            Durability::NoMetaSync => EnvFlags::NO_META_SYNC,
            Durability::NoSync => EnvFlags::NO_SYNC,
        }
    }
}

/// Settings of one shard environment; already validated by the caller.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub durability: Durability,
    /// Map size an environment starts with (bytes, rounded to pages). Setting:
    /// `storage.initial_map_size`.
    pub initial_map_size: usize,
    /// The map never grows beyond this (bytes). Setting: `storage.max_map_size`.
    pub max_map_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { durability: Durability::Fsync, initial_map_size: 64 << 20, max_map_size: 64 << 30 }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("shard {shard}: lmdb at {path}: {source}")]
    Lmdb {
        shard: usize,
        path: PathBuf,
        #[source]
        source: heed::Error,
    },
    #[error(
        "shard {shard}: lmdb map at {path} is full at {size} bytes, the limit set by storage.max_map_size; raise storage.max_map_size or free space"
    )]
    MapFull { shard: usize, path: PathBuf, size: usize },
    #[error("shard {shard}: cannot create {path}: {source}")]
    CreateDir {
        shard: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard {shard}: corrupt {db} entry at {path}: {why}")]
    Corrupt { shard: usize, path: PathBuf, db: &'static str, why: String },
    #[error(
        "shard {shard}: {path} belongs to shard {found} of a data directory with {found_partitions} partitions, expected shard {shard} with {partitions}"
    )]
    WrongEnv { shard: usize, path: PathBuf, found: usize, found_partitions: u32, partitions: u32 },
    #[error("shard {shard}: injected commit failure at {path} (test)")]
    Injected { shard: usize, path: PathBuf },
    #[error("shard {shard}: cannot flush {path} to disk: {source}")]
    Flush {
        shard: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "shard {shard}: {path} says transaction {marker} is the last on disk, but the environment's last is {last}; the data directory was changed outside the runner (restored from a copy?): restore {path} together with its environment, or remove the marker if the environment is known to be whole"
    )]
    Marker { shard: usize, path: PathBuf, marker: u64, last: u64 },
}

impl StoreError {
    /// Whether retrying the same commit later may succeed (disk full, I/O error) rather than
    /// the data or the settings being wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Lmdb { source, .. } => matches!(source, heed::Error::Io(_)) || is_mdb_transient(source),
            StoreError::MapFull { .. } | StoreError::Injected { .. } => true,
            _ => false,
        }
    }
}

fn is_mdb_transient(e: &heed::Error) -> bool {
    matches!(e, heed::Error::Mdb(heed::MdbError::Other(_)) | heed::Error::Mdb(heed::MdbError::Panic))
}

/// The named databases; see [`crate::keys`] for their key layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Db {
    Sagas,
    Outbox,
    Schedules,
    Effects,
    Checkpoints,
    DeadLetter,
    Meta,
    /// Effect results applied in place (combined mode), per instance: what a replay
    /// applies again, since they were never consumed from a stream.
    Results,
    /// Every event each instance applied, in order (what a replay applies again).
    History,
    /// Replays asked for and not yet finished, per instance (resumed on start).
    Replays,
}

impl Db {
    pub const ALL: [Db; 10] = [
        Db::Sagas,
        Db::Outbox,
        Db::Schedules,
        Db::Effects,
        Db::Checkpoints,
        Db::DeadLetter,
        Db::Meta,
        Db::Results,
        Db::History,
        Db::Replays,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Db::Sagas => "sagas",
            Db::Outbox => "outbox",
            Db::Schedules => "schedules",
            Db::Effects => "effects",
            Db::Checkpoints => "checkpoints",
            Db::DeadLetter => "deadletter",
            Db::Meta => "meta",
            Db::Results => "results",
            Db::History => "history",
            Db::Replays => "replays",
        }
    }
}

type Raw = Database<Bytes, Bytes>;

/// Meta keys.
const META_LAYOUT_VERSION: &[u8] = b"layout_version";
const META_PARTITIONS: &[u8] = b"partitions";
const META_SHARD: &[u8] = b"shard_index";
/// How many times opening discarded an unflushed last transaction (u64 BE).
const META_RECOVERIES: &[u8] = b"recoveries";
/// The last dead-letter stamp given out (u64 BE), so that stamps keep increasing across
/// restarts (written with the letters; absent in data directories written before it).
const META_DEADLETTER_AT: &[u8] = b"deadletter_at";
pub const LAYOUT_VERSION: u32 = 1;

/// One write of a batch.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Put {
        db: Db,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        db: Db,
        key: Vec<u8>,
    },
    /// Deletes every key of `db` that starts with `prefix`.
    DeletePrefix {
        db: Db,
        prefix: Vec<u8>,
    },
    /// `checkpoints[key] = max(checkpoints[key], seq)`.
    Advance {
        key: Vec<u8>,
        seq: u64,
    },
}

/// Everything one shard writes for one batch: saga states, outbox inserts and deletes,
/// schedule inserts and deletes, effect-gate updates, checkpoint advances and dead
/// letters. [`Store::commit`] writes it in one transaction or not at all; there is no other
/// write path, so a partial update cannot be expressed.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    ops: Vec<Op>,
    bytes: usize,
    /// Index in `ops` of the last `Advance` per checkpoint key with no other checkpoint write
    /// after it: further advances of the key raise that op instead of adding one (a batch of
    /// thousands of events of one stream costs one checkpoint write, not thousands).
    advances: ahash::AHashMap<Vec<u8>, usize>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Approximate bytes written (keys and values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn put(&mut self, db: Db, key: Vec<u8>, value: Vec<u8>) {
        if db == Db::Checkpoints {
            self.advances.clear();
        }
        self.bytes += key.len() + value.len();
        self.ops.push(Op::Put { db, key, value });
    }

    fn delete(&mut self, db: Db, key: Vec<u8>) {
        if db == Db::Checkpoints {
            self.advances.clear();
        }
        self.bytes += key.len();
        self.ops.push(Op::Delete { db, key });
    }

    pub fn put_saga(&mut self, key: &SagaKey, record: &SagaRecord) {
        self.put(Db::Sagas, key.encode(), to_json(record));
    }

    /// Stores an already-encoded saga record (the pipeline serialises once).
    pub fn put_saga_encoded(&mut self, key: &SagaKey, record: Vec<u8>) {
        self.put(Db::Sagas, key.encode(), record);
    }

    /// Deletes an instance, the results it recorded and its history.
    pub fn delete_saga(&mut self, key: &SagaKey) {
        self.delete(Db::Sagas, key.encode());
        for db in [Db::Results, Db::History] {
            let prefix = key.encode();
            self.bytes += prefix.len();
            self.ops.push(Op::DeletePrefix { db, prefix });
        }
    }

    /// Records one applied event of an instance's history.
    pub fn put_history(&mut self, key: &HistoryKey, applied: &AppliedRef) {
        self.put(Db::History, key.encode(), to_json(applied));
    }

    pub fn delete_history(&mut self, key: &HistoryKey) {
        self.delete(Db::History, key.encode());
    }

    /// Records an operator's replay of the instance `key` and how far it got.
    pub fn put_replay(&mut self, key: &SagaKey, mark: &ReplayMark) {
        self.put(Db::Replays, key.encode(), to_json(mark));
    }

    pub fn delete_replay(&mut self, key: &SagaKey) {
        self.delete(Db::Replays, key.encode());
    }

    /// Records an effect result applied in place to the instance `key`.
    pub fn put_result(&mut self, key: &ResultKey, event: &crate::message::Event) {
        self.put(Db::Results, key.encode(), to_json(event));
    }

    pub fn put_outbox(&mut self, key: OutboxKey, item: &OutboxItem) {
        self.put(Db::Outbox, key.encode().to_vec(), to_json(item));
    }

    pub fn delete_outbox(&mut self, key: OutboxKey) {
        self.delete(Db::Outbox, key.encode().to_vec());
    }

    pub fn put_schedule(&mut self, key: &ScheduleKey, entry: &ScheduleEntry) {
        self.put(Db::Schedules, key.encode(), to_json(entry));
    }

    pub fn delete_schedule(&mut self, key: &ScheduleKey) {
        self.delete(Db::Schedules, key.encode());
    }

    pub fn put_effect(&mut self, key: &EffectKey, record: &EffectRecord) {
        self.put(Db::Effects, key.encode(), to_json(record));
    }

    pub fn delete_effect(&mut self, key: &EffectKey) {
        self.delete(Db::Effects, key.encode());
    }

    /// Raises the checkpoint to `seq`; never lowers it.
    pub fn advance_checkpoint(&mut self, key: &CheckpointKey, seq: u64) {
        self.advance_checkpoint_raw(key.encode(), seq);
    }

    /// Sets the checkpoint exactly (controlled replay lowers it).
    pub fn set_checkpoint(&mut self, key: &CheckpointKey, seq: u64) {
        self.put(Db::Checkpoints, key.encode(), seq.to_be_bytes().to_vec());
    }

    pub fn put_deadletter(&mut self, key: &DeadLetterKey, letter: &DeadLetter) {
        self.put(Db::DeadLetter, key.encode(), to_json(letter));
    }

    pub fn delete_deadletter(&mut self, key: &DeadLetterKey) {
        self.delete(Db::DeadLetter, key.encode());
    }

    /// Records the last dead-letter stamp given out (see [`ReadView::deadletter_clock`]).
    pub fn set_deadletter_clock(&mut self, at: u64) {
        self.put(Db::Meta, META_DEADLETTER_AT.to_vec(), at.to_be_bytes().to_vec());
    }

    /// Raw write, used by partition moves that copy entries verbatim.
    pub(crate) fn put_raw(&mut self, db: Db, key: Vec<u8>, value: Vec<u8>) {
        self.put(db, key, value);
    }

    pub(crate) fn delete_raw(&mut self, db: Db, key: Vec<u8>) {
        self.delete(db, key);
    }

    pub(crate) fn advance_checkpoint_raw(&mut self, key: Vec<u8>, seq: u64) {
        if let Some(&i) = self.advances.get(&key)
            && let Some(Op::Advance { seq: last, .. }) = self.ops.get_mut(i)
        {
            *last = (*last).max(seq);
            return;
        }
        self.bytes += key.len() + 8;
        self.advances.insert(key.clone(), self.ops.len());
        self.ops.push(Op::Advance { key, seq });
    }

    pub(crate) fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    pub(crate) fn push_op(&mut self, op: Op) {
        self.advances.clear();
        self.ops.push(op);
    }

    /// Appends another batch; its writes apply after this one's.
    pub fn extend(&mut self, other: Batch) {
        self.advances.clear();
        self.bytes += other.bytes;
        self.ops.extend(other.ops);
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain records cannot fail: no maps with non-string keys, no
    // fallible Serialize impls.
    serde_json::to_vec(value).unwrap_or_default()
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitInfo {
    pub ops: usize,
    pub bytes: usize,
    /// The map was grown this many times to fit the batch.
    pub grew: u32,
    /// The transaction to hand to [`Flusher::flush`] before anything that depends on it
    /// leaves the process; `None` when the durability mode needs no flush.
    pub unflushed: Option<u64>,
}

/// The marker file of [`Durability::Fsync`]: the id of the last transaction known to be on
/// disk, in the environment's directory.
const DURABLE_MARKER: &str = "durable";

/// Syncs one shard's environment to disk and records how far (see [`Durability::Fsync`]).
/// `Send`: the shard hands it to its flusher thread.
#[derive(Debug)]
pub struct Flusher {
    shard: usize,
    path: PathBuf,
    data: std::fs::File,
    marker: std::fs::File,
}

impl Flusher {
    fn open(path: &Path, shard: usize) -> Result<Self, StoreError> {
        let io = |source| StoreError::Flush { shard, path: path.to_owned(), source };
        let data = std::fs::OpenOptions::new().read(true).write(true).open(path.join("data.mdb")).map_err(io)?;
        let marker = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path.join(DURABLE_MARKER))
            .map_err(io)?;
        Ok(Self { shard, path: path.to_owned(), data, marker })
    }

    /// Makes transaction `txn` (and everything before it) durable: syncs the data file,
    /// then records `txn` in the marker and syncs that. Blocks on the disk.
    pub fn flush(&mut self, txn: u64) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        fail::fail_point!("store.flush");
        let io = |source| StoreError::Flush { shard: self.shard, path: self.path.clone(), source };
        self.data.sync_data().map_err(io)?;
        self.marker.write_all_at(&txn.to_be_bytes(), 0).map_err(io)?;
        self.marker.sync_data().map_err(io)
    }
}

/// The transaction the marker of the environment at `path` names, if it has one.
fn read_marker(path: &Path, shard: usize) -> Result<Option<u64>, StoreError> {
    match std::fs::read(path.join(DURABLE_MARKER)) {
        Ok(b) if b.len() >= 8 => Ok(Some(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))),
        // Created but never written: the crash came before the first flush finished.
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Flush { shard, path: path.join(DURABLE_MARKER), source }),
    }
}

/// One shard's environment. Owned by the shard's thread.
pub struct Store {
    env: Env<WithoutTls>,
    dbs: [Raw; 10],
    shard: usize,
    partitions: u32,
    path: PathBuf,
    map_size: Cell<usize>,
    max_map_size: usize,
    durability: Durability,
    /// Test hook: fail the next commit after this many ops were written in its transaction.
    fail_after: Cell<Option<usize>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("shard", &self.shard).field("path", &self.path).finish()
    }
}

fn page_round(n: usize) -> usize {
    const PAGE: usize = 4096;
    n.div_ceil(PAGE).max(1) * PAGE
}

impl Store {
    /// Opens (creating if needed) the environment of `shard` at `path`, for a data directory
    /// with `partitions` partitions. Refuses an environment that belongs to another shard.
    pub fn open(path: &Path, shard: usize, partitions: u32, config: &StoreConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
            shard,
            path: path.to_owned(),
            source,
        })?;
        let lmdb = |source| StoreError::Lmdb { shard, path: path.to_owned(), source };
        // An existing environment may already be larger than the initial size.
        let existing = std::fs::metadata(path.join("data.mdb")).map(|m| m.len() as usize).unwrap_or(0);
        let map_size = page_round(config.initial_map_size.max(existing).min(config.max_map_size.max(existing)));
        let marker = if config.durability == Durability::Fsync {
            read_marker(path, shard)?
        } else {
            // The unsafe modes promise nothing about the disk: a marker left by an earlier
            // fsync run would be stale after this one.
            match std::fs::remove_file(path.join(DURABLE_MARKER)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Flush { shard, path: path.join(DURABLE_MARKER), source }),
            }
            None
        };
        let open = |flags: EnvFlags| {
            let mut opts = EnvOpenOptions::new().read_txn_without_tls();
            opts.map_size(map_size).max_dbs(16).max_readers(126);
            // SAFETY: the flags are plain LMDB sync and snapshot flags; their crash semantics
            // are documented on `Durability`. The env is used only through this type, by one
            // writer thread.
            unsafe { opts.flags(flags) };
            // SAFETY: this process opens each shard environment once and never modifies the
            // files outside LMDB; other processes only read (inspection).
            unsafe { opts.open(path) }.map_err(lmdb)
        };
        let mut env = open(config.durability.flags())?;
        let mut rolled_back = false;
        if let Some(marker) = marker {
            let last = env.info().last_txn_id as u64;
            if last == marker + 1 {
                // The last transaction may be torn (the crash came during its flush); nothing
                // of it was acted on. Go back to the snapshot the marker names.
                tracing::warn!(shard, path = %path.display(), transaction = last, "the last commit did not finish reaching the disk; it is discarded");
                env.prepare_for_closing().wait();
                env = open(config.durability.flags() | EnvFlags::PREV_SNAPSHOT)?;
                rolled_back = true;
            } else if last != marker {
                return Err(StoreError::Marker { shard, path: path.join(DURABLE_MARKER), marker, last });
            }
        }
        if rolled_back {
            // LMDB leaves MDB_PREVSNAPSHOT on until a transaction that changes something
            // commits, and that first commit still tells readers about the older snapshot:
            // two real commits here, before anyone reads, put readers on the newest one.
            for _ in 0..2 {
                let mut wtxn = env.write_txn().map_err(lmdb)?;
                let meta: Raw = env.create_database(&mut wtxn, Some(Db::Meta.name())).map_err(lmdb)?;
                let n = meta.get(&wtxn, META_RECOVERIES).map_err(lmdb)?.and_then(decode_u64).unwrap_or(0);
                meta.put(&mut wtxn, META_RECOVERIES, &(n + 1).to_be_bytes()).map_err(lmdb)?;
                wtxn.commit().map_err(lmdb)?;
            }
        }
        let mut wtxn = env.write_txn().map_err(lmdb)?;
        let mut dbs = Vec::with_capacity(Db::ALL.len());
        for db in Db::ALL {
            let handle: Raw = env.create_database(&mut wtxn, Some(db.name())).map_err(lmdb)?;
            dbs.push(handle);
        }
        let dbs: [Raw; 10] = dbs.try_into().map_err(|_| StoreError::Corrupt {
            shard,
            path: path.to_owned(),
            db: "meta",
            why: "database handles".into(),
        })?;
        let meta = dbs[Db::Meta as usize];
        let read_u32 = |wtxn: &heed::RwTxn, key: &[u8]| -> Result<Option<u32>, StoreError> {
            match meta.get(wtxn, key).map_err(lmdb)? {
                None => Ok(None),
                Some(b) if b.len() == 4 => Ok(Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
                Some(_) => Err(StoreError::Corrupt {
                    shard,
                    path: path.to_owned(),
                    db: "meta",
                    why: format!("{} is not a u32", String::from_utf8_lossy(key)),
                }),
            }
        };
        match (read_u32(&wtxn, META_SHARD)?, read_u32(&wtxn, META_PARTITIONS)?) {
            (Some(found), Some(found_partitions)) => {
                if found as usize != shard || found_partitions != partitions {
                    return Err(StoreError::WrongEnv {
                        shard,
                        path: path.to_owned(),
                        found: found as usize,
                        found_partitions,
                        partitions,
                    });
                }
            }
            _ => {
                meta.put(&mut wtxn, META_LAYOUT_VERSION, &LAYOUT_VERSION.to_be_bytes()).map_err(lmdb)?;
                meta.put(&mut wtxn, META_PARTITIONS, &partitions.to_be_bytes()).map_err(lmdb)?;
                meta.put(&mut wtxn, META_SHARD, &(shard as u32).to_be_bytes()).map_err(lmdb)?;
            }
        }
        wtxn.commit().map_err(lmdb)?;
        let store = Self {
            env,
            dbs,
            shard,
            partitions,
            path: path.to_owned(),
            map_size: Cell::new(map_size),
            max_map_size: page_round(config.max_map_size.max(map_size)),
            durability: config.durability,
            fail_after: Cell::new(None),
        };
        // The setup transaction (and any earlier one not yet recorded) is on disk before the
        // shard starts.
        store.flush_now()?;
        Ok(store)
    }

    /// Opens an existing environment read-only (inspection of a stopped or running
    /// runner's data; never writes, never creates).
    pub fn open_read_only(path: &Path, shard: usize) -> Result<Self, StoreError> {
        let lmdb = |source| StoreError::Lmdb { shard, path: path.to_owned(), source };
        if !path.join("data.mdb").exists() {
            return Err(StoreError::Corrupt {
                shard,
                path: path.to_owned(),
                db: "meta",
                why: "no data.mdb here".into(),
            });
        }
        let size = std::fs::metadata(path.join("data.mdb")).map(|m| m.len() as usize).unwrap_or(0);
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        // The writer's map may be larger than the file; LMDB adopts the larger stored size.
        opts.max_dbs(16).max_readers(126);
        // SAFETY: read-only; LMDB's lock file coordinates with a writer in another process.
        unsafe { opts.flags(EnvFlags::READ_ONLY) };
        // SAFETY: as in `open`; this process only reads.
        let env = unsafe { opts.open(path) }.map_err(lmdb)?;
        let rtxn = env.read_txn().map_err(lmdb)?;
        let mut dbs = Vec::with_capacity(Db::ALL.len());
        for db in Db::ALL {
            let handle: Option<Raw> = env.open_database(&rtxn, Some(db.name())).map_err(lmdb)?;
            let handle = match (handle, db) {
                (Some(h), _) => h,
                // Written by a version before it existed (not opened for writing since):
                // nothing recorded; reads see the empty meta database in its place.
                (None, Db::Results | Db::History | Db::Replays) => dbs[Db::Meta as usize],
                (None, _) => {
                    return Err(StoreError::Corrupt {
                        shard,
                        path: path.to_owned(),
                        db: db.name(),
                        why: "database missing".into(),
                    });
                }
            };
            dbs.push(handle);
        }
        let partitions = dbs[Db::Meta as usize]
            .get(&rtxn, META_PARTITIONS)
            .map_err(lmdb)?
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0);
        // Committing the read transaction keeps the opened database handles (LMDB).
        rtxn.commit().map_err(lmdb)?;
        let dbs: [Raw; 10] = dbs.try_into().map_err(|_| StoreError::Corrupt {
            shard,
            path: path.to_owned(),
            db: "meta",
            why: "database handles".into(),
        })?;
        Ok(Self {
            env,
            dbs,
            shard,
            partitions,
            path: path.to_owned(),
            map_size: Cell::new(size),
            max_map_size: size,
            durability: Durability::NoSync,
            fail_after: Cell::new(None),
        })
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn map_size(&self) -> usize {
        self.map_size.get()
    }

    fn db(&self, db: Db) -> Raw {
        self.dbs[db as usize]
    }

    fn lmdb(&self, source: heed::Error) -> StoreError {
        StoreError::Lmdb { shard: self.shard, path: self.path.clone(), source }
    }

    /// Test hook: the next commit fails inside its transaction after `ops` writes, so tests
    /// can prove that nothing of a failed commit is visible.
    pub fn inject_commit_failure_after(&self, ops: usize) {
        self.fail_after.set(Some(ops));
    }

    /// Writes the whole batch in one write transaction and waits until it is on disk (per
    /// the durability mode). Either everything in the batch is durable when this returns
    /// `Ok`, or nothing of it is visible. The shard's commit path uses
    /// [`Self::commit_unflushed`] and flushes on another thread instead.
    pub fn commit(&self, batch: &Batch) -> Result<CommitInfo, StoreError> {
        let info = self.commit_unflushed(batch)?;
        if let Some(txn) = info.unflushed {
            self.flusher()?.flush(txn)?;
        }
        Ok(info)
    }

    /// Writes the whole batch in one write transaction, growing the map and retrying when it
    /// is full, without waiting for the disk: in [`Durability::Fsync`] the returned
    /// transaction must be flushed ([`Flusher::flush`]) before anything that depends on it
    /// leaves the process, and before the next commit. Later reads see it at once.
    pub fn commit_unflushed(&self, batch: &Batch) -> Result<CommitInfo, StoreError> {
        let mut grew = 0;
        loop {
            match self.try_commit(batch) {
                Ok(()) => {
                    let unflushed = (self.durability == Durability::Fsync).then(|| self.env.info().last_txn_id as u64);
                    return Ok(CommitInfo { ops: batch.ops.len(), bytes: batch.bytes, grew, unflushed });
                }
                Err(StoreError::Lmdb { source: heed::Error::Mdb(heed::MdbError::MapFull), .. }) => {
                    self.grow(batch.bytes)?;
                    grew += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn grow(&self, need: usize) -> Result<(), StoreError> {
        let current = self.map_size.get();
        if current >= self.max_map_size {
            return Err(StoreError::MapFull { shard: self.shard, path: self.path.clone(), size: current });
        }
        let target = page_round(current.saturating_mul(2).max(current + need * 2)).min(self.max_map_size);
        // SAFETY: the shard's thread is the env's only user in this process and holds no
        // transaction here: commit's transaction was dropped (aborted) before this call, and
        // read transactions never outlive a synchronous call.
        unsafe { self.env.resize(target) }.map_err(|e| self.lmdb(e))?;
        tracing::info!(shard = self.shard, path = %self.path.display(), from = current, to = target, "grew lmdb map");
        self.map_size.set(target);
        Ok(())
    }

    fn try_commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.lmdb(e))?;
        let fail_after = self.fail_after.take();
        for (i, op) in batch.ops.iter().enumerate() {
            if fail_after == Some(i) {
                return Err(StoreError::Injected { shard: self.shard, path: self.path.clone() });
            }
            match op {
                Op::Put { db, key, value } => self.db(*db).put(&mut wtxn, key, value),
                Op::Delete { db, key } => self.db(*db).delete(&mut wtxn, key).map(|_| ()),
                Op::DeletePrefix { db, prefix } => {
                    let range = (std::ops::Bound::Included(&prefix[..]), std::ops::Bound::Unbounded);
                    let mut iter = self.db(*db).range_mut(&mut wtxn, &range).map_err(|e| self.lmdb(e))?;
                    let mut result = Ok(());
                    while let Some(entry) = iter.next() {
                        match entry {
                            Ok((k, _)) if k.starts_with(prefix) => {
                                // SAFETY: nothing borrowed from the database outlives this call.
                                if let Err(e) = unsafe { iter.del_current() } {
                                    result = Err(e);
                                    break;
                                }
                            }
                            Ok(_) => break,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    result.map(|_| ())
                }
                Op::Advance { key, seq } => {
                    let db = self.db(Db::Checkpoints);
                    let current = db.get(&wtxn, key).map_err(|e| self.lmdb(e))?.and_then(decode_u64).unwrap_or(0);
                    if *seq > current { db.put(&mut wtxn, key, &seq.to_be_bytes()) } else { Ok(()) }
                }
            }
            .map_err(|e| self.lmdb(e))?;
        }
        if fail_after.is_some_and(|n| n >= batch.ops.len()) {
            return Err(StoreError::Injected { shard: self.shard, path: self.path.clone() });
        }
        wtxn.commit().map_err(|e| self.lmdb(e))
    }

    /// A read view for one synchronous step; never hold it across an `.await`.
    pub fn read(&self) -> Result<ReadView<'_>, StoreError> {
        let txn = self.env.read_txn().map_err(|e| self.lmdb(e))?;
        Ok(ReadView { store: self, txn })
    }

    /// Forces a sync (used after commits in an unsafe durability mode at shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.env.force_sync().map_err(|e| self.lmdb(e))
    }

    /// A flusher of this environment (for [`Durability::Fsync`]; see [`Self::commit_unflushed`]).
    pub fn flusher(&self) -> Result<Flusher, StoreError> {
        Flusher::open(&self.path, self.shard)
    }

    /// Makes every committed transaction durable now (blocking).
    fn flush_now(&self) -> Result<(), StoreError> {
        if self.durability == Durability::Fsync {
            let txn = self.env.info().last_txn_id as u64;
            self.flusher()?.flush(txn)?;
        }
        Ok(())
    }
}

fn decode_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes)
}

/// Entry counts of one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub sagas: u64,
    pub outbox: u64,
    pub schedules: u64,
    pub effects: u64,
    pub checkpoints: u64,
    pub deadletters: u64,
    /// Entries of instance histories (one per applied event).
    pub history: u64,
    /// Replays asked for and not yet finished.
    pub replays: u64,
}

/// A consistent snapshot of one shard's store.
pub struct ReadView<'s> {
    store: &'s Store,
    txn: RoTxn<'s, WithoutTls>,
}

impl<'s> ReadView<'s> {
    fn corrupt(&self, db: Db, why: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            shard: self.store.shard,
            path: self.store.path.clone(),
            db: db.name(),
            why: why.to_string(),
        }
    }

    fn get_raw(&self, db: Db, key: &[u8]) -> Result<Option<&[u8]>, StoreError> {
        self.store.db(db).get(&self.txn, key).map_err(|e| self.store.lmdb(e))
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, db: Db, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.corrupt(db, e))
    }

    pub fn saga(&self, key: &SagaKey) -> Result<Option<SagaRecord>, StoreError> {
        self.get_raw(Db::Sagas, &key.encode())?.map(|b| self.decode(Db::Sagas, b)).transpose()
    }

    pub fn effect(&self, key: &EffectKey) -> Result<Option<EffectRecord>, StoreError> {
        self.get_raw(Db::Effects, &key.encode())?.map(|b| self.decode(Db::Effects, b)).transpose()
    }

    pub fn checkpoint(&self, key: &CheckpointKey) -> Result<Option<u64>, StoreError> {
        Ok(self.get_raw(Db::Checkpoints, &key.encode())?.and_then(decode_u64))
    }

    pub fn outbox_item(&self, key: OutboxKey) -> Result<Option<OutboxItem>, StoreError> {
        self.get_raw(Db::Outbox, &key.encode())?.map(|b| self.decode(Db::Outbox, b)).transpose()
    }

    /// Walks up to `walk` outbox keys from `from` in key order and decodes only the items
    /// `want` accepts (the relay skips the ones it already holds without decoding them), at
    /// most `max` of them (the relay's free room: nothing is decoded only to be dropped).
    /// Returns those items, the last key walked, and whether the end was reached.
    #[allow(clippy::type_complexity)]
    pub fn outbox_where(
        &self,
        from: std::ops::Bound<OutboxKey>,
        walk: usize,
        max: usize,
        want: impl Fn(&OutboxKey) -> bool,
    ) -> Result<(Vec<(OutboxKey, OutboxItem)>, Option<OutboxKey>, bool), StoreError> {
        let db = self.store.db(Db::Outbox);
        let lmdb = |e| self.store.lmdb(e);
        use std::ops::Bound;
        let encoded = match from {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.encode()),
            Bound::Unbounded => None,
        };
        let start: Bound<&[u8]> = match (&from, &encoded) {
            (Bound::Included(_), Some(e)) => Bound::Included(&e[..]),
            (Bound::Excluded(_), Some(e)) => Bound::Excluded(&e[..]),
            _ => Bound::Unbounded,
        };
        let mut iter = db.range(&self.txn, &(start, Bound::Unbounded)).map_err(lmdb)?;
        let (mut out, mut last) = (Vec::new(), None);
        for _ in 0..walk {
            if out.len() >= max {
                return Ok((out, last, false));
            }
            let Some(entry) = iter.next() else { return Ok((out, last, true)) };
            let (k, v) = entry.map_err(lmdb)?;
            let key = OutboxKey::decode(k).map_err(|e| self.corrupt(Db::Outbox, e))?;
            last = Some(key);
            if want(&key) {
                out.push((key, self.decode(Db::Outbox, v)?));
            }
        }
        // Walked `walk` keys: the end is reached only if nothing follows.
        let done = iter.next().is_none();
        Ok((out, last, done))
    }

    /// Outbox items in key order (per partition, in creation order), starting after `after`.
    pub fn outbox(&self, after: Option<OutboxKey>, limit: usize) -> Result<Vec<(OutboxKey, OutboxItem)>, StoreError> {
        let from = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        Ok(self.outbox_where(from, limit, limit, |_| true)?.0)
    }

    /// The highest outbox sequence stored (to keep new sequences above it after a restart).
    pub fn max_outbox_seq(&self) -> Result<u64, StoreError> {
        let db = self.store.db(Db::Outbox);
        let mut max = 0;
        for item in db.iter(&self.txn).map_err(|e| self.store.lmdb(e))? {
            let (k, _) = item.map_err(|e| self.store.lmdb(e))?;
            max = max.max(OutboxKey::decode(k).map_err(|e| self.corrupt(Db::Outbox, e))?.seq);
        }
        Ok(max)
    }

    /// Timers due at or before `now`, in due order, at most `limit`.
    pub fn due_schedules(&self, now: u64, limit: usize) -> Result<Vec<(ScheduleKey, ScheduleEntry)>, StoreError> {
        let db = self.store.db(Db::Schedules);
        let lmdb = |e| self.store.lmdb(e);
        let upper = schedule_upper_bound(now);
        let range = (std::ops::Bound::Unbounded, std::ops::Bound::Excluded(&upper[..]));
        let mut out = Vec::new();
        for item in db.range(&self.txn, &range).map_err(lmdb)?.take(limit) {
            let (k, v) = item.map_err(lmdb)?;
            out.push((
                ScheduleKey::decode(k).map_err(|e| self.corrupt(Db::Schedules, e))?,
                self.decode(Db::Schedules, v)?,
            ));
        }
        Ok(out)
    }

    /// Due time of the earliest timer.
    pub fn next_due(&self) -> Result<Option<u64>, StoreError> {
        let db = self.store.db(Db::Schedules);
        match db.first(&self.txn).map_err(|e| self.store.lmdb(e))? {
            None => Ok(None),
            Some((k, _)) => Ok(Some(ScheduleKey::decode(k).map_err(|e| self.corrupt(Db::Schedules, e))?.due_at)),
        }
    }

    /// All timers of one saga instance, by a scan of the whole schedule table (records
    /// written before instances listed their timers; tests).
    pub fn schedules_of(&self, key: &SagaKey) -> Result<Vec<(ScheduleKey, ScheduleEntry)>, StoreError> {
        let db = self.store.db(Db::Schedules);
        let lmdb = |e| self.store.lmdb(e);
        let mut out = Vec::new();
        for item in db.iter(&self.txn).map_err(lmdb)? {
            let (k, v) = item.map_err(lmdb)?;
            let sk = ScheduleKey::decode(k).map_err(|e| self.corrupt(Db::Schedules, e))?;
            if &sk.saga == key {
                out.push((sk, self.decode(Db::Schedules, v)?));
            }
        }
        Ok(out)
    }

    /// Dead letters of one tenant in the order the shard wrote them (by stamp), starting
    /// after `after`, at most `limit`.
    pub fn deadletters(
        &self,
        tenant: &str,
        after: Option<&DeadLetterKey>,
        limit: usize,
    ) -> Result<Vec<(DeadLetterKey, DeadLetter)>, StoreError> {
        let db = self.store.db(Db::DeadLetter);
        let lmdb = |e| self.store.lmdb(e);
        let prefix = deadletter_tenant_prefix(tenant);
        let start = after.filter(|a| a.tenant == tenant).map(|a| a.encode());
        let lower = match &start {
            Some(s) => std::ops::Bound::Excluded(&s[..]),
            None => std::ops::Bound::Included(&prefix[..]),
        };
        let mut out = Vec::new();
        for item in db.range(&self.txn, &(lower, std::ops::Bound::Unbounded)).map_err(lmdb)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(lmdb)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let dk = DeadLetterKey::decode(k).map_err(|e| self.corrupt(Db::DeadLetter, e))?;
            out.push((dk, self.decode(Db::DeadLetter, v)?));
        }
        Ok(out)
    }

    /// A page of effect-gate records after `after`, in key order, at most `limit`, each
    /// decoded as `T` (a partial view is fine). A record that does not decode is returned as
    /// its error, so the caller can pass over it and the page goes on.
    #[allow(clippy::type_complexity)]
    pub fn effects_page<T: serde::de::DeserializeOwned>(
        &self,
        after: Option<&EffectKey>,
        limit: usize,
    ) -> Result<Vec<(EffectKey, Result<T, StoreError>)>, StoreError> {
        let db = self.store.db(Db::Effects);
        let lmdb = |e| self.store.lmdb(e);
        let start = after.map(EffectKey::encode);
        let bounds = match &start {
            Some(s) => (std::ops::Bound::Excluded(&s[..]), std::ops::Bound::Unbounded),
            None => (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
        };
        let mut out = Vec::new();
        for item in db.range(&self.txn, &bounds).map_err(lmdb)?.take(limit) {
            let (k, v) = item.map_err(lmdb)?;
            let key = EffectKey::decode(k).map_err(|e| self.corrupt(Db::Effects, e))?;
            out.push((key, self.decode(Db::Effects, v)));
        }
        Ok(out)
    }

    /// The last dead-letter stamp given out: the recorded one, or for a data directory
    /// written before it was recorded, the highest stamp of the letters stored (a scan of
    /// their keys, once).
    pub fn deadletter_clock(&self) -> Result<u64, StoreError> {
        if let Some(at) = self.get_raw(Db::Meta, META_DEADLETTER_AT)?.and_then(decode_u64) {
            return Ok(at);
        }
        let mut max = 0;
        for item in self.store.db(Db::DeadLetter).iter(&self.txn).map_err(|e| self.store.lmdb(e))? {
            let (k, _) = item.map_err(|e| self.store.lmdb(e))?;
            max = max.max(DeadLetterKey::decode(k).map_err(|e| self.corrupt(Db::DeadLetter, e))?.at);
        }
        Ok(max)
    }

    /// An effect result an instance applied in place.
    pub fn result(&self, key: &ResultKey) -> Result<Option<crate::message::Event>, StoreError> {
        self.get_raw(Db::Results, &key.encode())?.map(|b| self.decode(Db::Results, b)).transpose()
    }

    /// Entries `from..` of an instance's history, at most `limit`, in order (an index with
    /// no entry ends the page: histories have no gaps).
    pub fn history(&self, key: &SagaKey, from: u64, limit: usize) -> Result<Vec<AppliedRef>, StoreError> {
        let db = self.store.db(Db::History);
        let start = HistoryKey { saga: key.clone(), index: from }.encode();
        let prefix = key.encode();
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Unbounded);
        let mut out = Vec::new();
        for item in db.range(&self.txn, &range).map_err(|e| self.store.lmdb(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.store.lmdb(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let index = HistoryKey::decode(k).map_err(|e| self.corrupt(Db::History, e))?.index;
            if index != from + out.len() as u64 {
                break;
            }
            out.push(self.decode(Db::History, v)?);
        }
        Ok(out)
    }

    /// The replay recorded for one instance.
    pub fn replay(&self, key: &SagaKey) -> Result<Option<ReplayMark>, StoreError> {
        self.get_raw(Db::Replays, &key.encode())?.map(|b| self.decode(Db::Replays, b)).transpose()
    }

    /// Replays recorded after `after`, in key order, at most `limit`.
    pub fn replays(&self, after: Option<&SagaKey>, limit: usize) -> Result<Vec<(SagaKey, ReplayMark)>, StoreError> {
        let db = self.store.db(Db::Replays);
        let start = after.map(SagaKey::encode);
        let lower = match &start {
            Some(k) => std::ops::Bound::Excluded(&k[..]),
            None => std::ops::Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in db.range(&self.txn, &(lower, std::ops::Bound::Unbounded)).map_err(|e| self.store.lmdb(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.store.lmdb(e))?;
            out.push((SagaKey::decode(k).map_err(|e| self.corrupt(Db::Replays, e))?, self.decode(Db::Replays, v)?));
        }
        Ok(out)
    }

    /// One dead letter.
    pub fn deadletter(&self, key: &DeadLetterKey) -> Result<Option<DeadLetter>, StoreError> {
        self.get_raw(Db::DeadLetter, &key.encode())?.map(|b| self.decode(Db::DeadLetter, b)).transpose()
    }

    /// One timer.
    pub fn schedule(&self, key: &ScheduleKey) -> Result<Option<ScheduleEntry>, StoreError> {
        self.get_raw(Db::Schedules, &key.encode())?.map(|b| self.decode(Db::Schedules, b)).transpose()
    }

    /// Outbox items of one partition in creation order, at most `limit`; `true` when the
    /// partition holds more.
    pub fn outbox_of_partition(
        &self,
        partition: u32,
        limit: usize,
    ) -> Result<(Vec<(OutboxKey, OutboxItem)>, bool), StoreError> {
        let from = std::ops::Bound::Included(OutboxKey { partition, seq: 0 });
        let (mut page, _, _) =
            self.outbox_where(from, limit.saturating_add(1), limit.saturating_add(1), |k| k.partition == partition)?;
        page.retain(|(k, _)| k.partition == partition);
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    /// Instances of one saga of one tenant in key order, after the correlation id `after`,
    /// at most `limit`, decoded as `T` (a partial view is fine: unknown fields are ignored).
    pub fn sagas_of<T: serde::de::DeserializeOwned>(
        &self,
        tenant: &str,
        saga: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(SagaKey, T)>, StoreError> {
        let db = self.store.db(Db::Sagas);
        let lmdb = |e| self.store.lmdb(e);
        let prefix = crate::keys::saga_prefix(tenant, saga);
        let start = after.map(|cid| SagaKey::new(tenant, saga, cid).encode());
        let lower = match &start {
            Some(s) => std::ops::Bound::Excluded(&s[..]),
            None => std::ops::Bound::Included(&prefix[..]),
        };
        let mut out = Vec::new();
        for item in db.range(&self.txn, &(lower, std::ops::Bound::Unbounded)).map_err(lmdb)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(lmdb)?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push((SagaKey::decode(k).map_err(|e| self.corrupt(Db::Sagas, e))?, self.decode(Db::Sagas, v)?));
        }
        Ok(out)
    }

    /// Every entry of one database, raw (partition moves, inspection tools).
    pub fn for_each_raw(
        &self,
        db: Db,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for item in self.store.db(db).iter(&self.txn).map_err(|e| self.store.lmdb(e))? {
            let (k, v) = item.map_err(|e| self.store.lmdb(e))?;
            f(k, v)?;
        }
        Ok(())
    }

    /// Entries of every saga instance of one tenant, in key order.
    pub fn sagas_of_tenant(&self, tenant: &str, limit: usize) -> Result<Vec<(SagaKey, SagaRecord)>, StoreError> {
        let db = self.store.db(Db::Sagas);
        let lmdb = |e| self.store.lmdb(e);
        let mut out = Vec::new();
        for item in db.prefix_iter(&self.txn, &crate::keys::saga_tenant_prefix(tenant)).map_err(lmdb)?.take(limit) {
            let (k, v) = item.map_err(lmdb)?;
            out.push((SagaKey::decode(k).map_err(|e| self.corrupt(Db::Sagas, e))?, self.decode(Db::Sagas, v)?));
        }
        Ok(out)
    }

    /// A page of saga records after `after` (all tenants, key order), decoded as `T` (a
    /// partial view is fine: unknown fields are ignored).
    pub fn sagas_page<T: serde::de::DeserializeOwned>(
        &self,
        after: Option<&SagaKey>,
        limit: usize,
    ) -> Result<Vec<(SagaKey, T)>, StoreError> {
        let db = self.store.db(Db::Sagas);
        let lmdb = |e| self.store.lmdb(e);
        let start = after.map(|k| k.encode());
        let bounds = match &start {
            Some(s) => (std::ops::Bound::Excluded(&s[..]), std::ops::Bound::Unbounded),
            None => (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
        };
        let mut out = Vec::new();
        for item in db.range(&self.txn, &bounds).map_err(lmdb)?.take(limit) {
            let (k, v) = item.map_err(lmdb)?;
            out.push((SagaKey::decode(k).map_err(|e| self.corrupt(Db::Sagas, e))?, self.decode(Db::Sagas, v)?));
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let n = |db: Db| self.store.db(db).len(&self.txn).map_err(|e| self.store.lmdb(e));
        Ok(StoreStats {
            sagas: n(Db::Sagas)?,
            outbox: n(Db::Outbox)?,
            schedules: n(Db::Schedules)?,
            effects: n(Db::Effects)?,
            checkpoints: n(Db::Checkpoints)?,
            deadletters: n(Db::DeadLetter)?,
            history: n(Db::History)?,
            replays: n(Db::Replays)?,
        })
    }

    /// Raw saga record bytes (the pipeline parses only what it needs).
    pub fn saga_raw(&self, key: &SagaKey) -> Result<Option<&[u8]>, StoreError> {
        self.get_raw(Db::Sagas, &key.encode())
    }
}

#[cfg(test)]
mod tests;
