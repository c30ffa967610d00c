//! The data directory: `layout.json` (partitions, shard count), one environment per shard
//! under `shard-<i>/`, and the crash-safe move of whole partitions when the shard count
//! changes between runs.
//!
//! ```text
//! <data>/layout.json        {"version":1,"partitions":256,"shards":2}
//! <data>/move.json          only while a move runs: {"from":2,"to":4,"phase":"copying"}
//! <data>/shard-0/data.mdb   LMDB env of shard 0
//! <data>/shard-1/data.mdb
//! ```
//!
//! A move from N to M shards, each step idempotent so a kill at any moment followed by a
//! restart converges (the restart sees `move.json` and resumes its phase):
//!
//! 1. write `move.json` {phase: copying};
//! 2. copy every entry whose partition's new shard differs from its env into that shard's
//!    env (same key, same bytes: copying twice writes the same thing); checkpoints are
//!    merged with `max` into every new env;
//! 3. rewrite `move.json` {phase: deleting};
//! 4. delete from each env every entry it no longer owns;
//! 5. write `layout.json` with M shards, remove the envs above M, remove `move.json`.
//!
//! Before step 3 every entry still lives in its old env (and maybe a copy in its new one);
//! after it every entry lives in its new env. So a key is present exactly once when the
//! move completes, whatever was killed where.

use crate::keys::{EffectKey, OutboxKey, SagaKey, ScheduleKey};
use crate::record::DeadLetter;
use crate::routing::{Router, partition_for};
use crate::store::{Batch, Db, Store, StoreConfig, StoreError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

const LAYOUT_FILE: &str = "layout.json";
const MOVE_FILE: &str = "move.json";
/// Entries copied or deleted per transaction during a move.
const MOVE_CHUNK: usize = 5_000;

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {path}: {file} is not valid: {why}")]
    BadFile { path: PathBuf, file: &'static str, why: String },
    #[error("data directory {path}: a shard count of 0 is not allowed (setting: shards)")]
    ZeroShards { path: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `layout.json` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutFile {
    pub version: u32,
    pub partitions: u32,
    pub shards: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MovePhase {
    Copying,
    Deleting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct MoveFile {
    from: usize,
    to: usize,
    phase: MovePhase,
}

/// Progress of a partition move, reported to a callback (the runner logs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveProgress {
    Started { from: usize, to: usize },
    Copied { env: usize, entries: u64 },
    Deleted { env: usize, entries: u64 },
    Finished { moved: u64 },
}

/// A prepared data directory: its routing and where each shard's env lives.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    router: Router,
}

impl DataDir {
    /// Opens (creating) the data directory for `shards` shards. A new directory gets
    /// `new_partitions` partitions; an existing one keeps its own. If the directory was last
    /// run with another shard count (or a move was interrupted), whole partitions are moved
    /// to their new shard envs before this returns.
    pub fn prepare(
        root: &Path,
        new_partitions: u32,
        shards: usize,
        config: &StoreConfig,
        mut progress: impl FnMut(MoveProgress),
    ) -> Result<Self, LayoutError> {
        if shards == 0 {
            return Err(LayoutError::ZeroShards { path: root.to_owned() });
        }
        let io = |source| LayoutError::Io { path: root.to_owned(), source };
        std::fs::create_dir_all(root).map_err(io)?;
        let layout = match read_json::<LayoutFile>(root, LAYOUT_FILE)? {
            Some(l) => l,
            None => {
                let l = LayoutFile { version: 1, partitions: new_partitions.max(1), shards };
                write_json_atomic(root, LAYOUT_FILE, &l)?;
                l
            }
        };
        if layout.shards == 0 || layout.partitions == 0 {
            return Err(LayoutError::BadFile {
                path: root.to_owned(),
                file: LAYOUT_FILE,
                why: "zero shards or partitions".into(),
            });
        }
        let pending = read_json::<MoveFile>(root, MOVE_FILE)?;
        let plan = match pending {
            // An interrupted move to the same count resumes; to another count, the interrupted
            // move finishes first and a new one follows.
            Some(m) => Some(m),
            None if layout.shards != shards => {
                Some(MoveFile { from: layout.shards, to: shards, phase: MovePhase::Copying })
            }
            None => None,
        };
        if let Some(m) = plan {
            run_move(root, layout.partitions, m, config, &mut progress)?;
            if m.to != shards {
                let m2 = MoveFile { from: m.to, to: shards, phase: MovePhase::Copying };
                run_move(root, layout.partitions, m2, config, &mut progress)?;
            }
        }
        Ok(Self { root: root.to_owned(), router: Router::new(layout.partitions, shards) })
    }

    /// A handle on an existing directory for reading only (no move, no creation).
    pub fn prepare_read_only(root: &Path, layout: LayoutFile) -> Self {
        Self { root: root.to_owned(), router: Router::new(layout.partitions, layout.shards) }
    }

    /// Reads the layout of an existing data directory without changing anything.
    pub fn inspect(root: &Path) -> Result<Option<LayoutFile>, LayoutError> {
        read_json(root, LAYOUT_FILE)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn router(&self) -> Router {
        self.router
    }

    pub fn shard_path(&self, shard: usize) -> PathBuf {
        shard_path(&self.root, shard)
    }

    /// Opens the env of `shard` (call on the shard's own thread).
    pub fn open_store(&self, shard: usize, config: &StoreConfig) -> Result<Store, StoreError> {
        Store::open(&self.shard_path(shard), shard, self.router.partitions(), config)
    }
}

pub fn shard_path(root: &Path, shard: usize) -> PathBuf {
    root.join(format!("shard-{shard}"))
}

fn read_json<T: serde::de::DeserializeOwned>(root: &Path, file: &'static str) -> Result<Option<T>, LayoutError> {
    let path = root.join(file);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| LayoutError::BadFile {
            path: root.to_owned(),
            file,
            why: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LayoutError::Io { path, source }),
    }
}

/// Writes `file` so that a crash leaves either the old or the new content: temp file,
/// fsync, rename, fsync the directory.
fn write_json_atomic<T: Serialize>(root: &Path, file: &str, value: &T) -> Result<(), LayoutError> {
    let io = |source| LayoutError::Io { path: root.join(file), source };
    let tmp = root.join(format!("{file}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(value).unwrap_or_default()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, root.join(file)).map_err(io)?;
    sync_dir(root).map_err(io)
}

fn sync_dir(root: &Path) -> std::io::Result<()> {
    std::fs::File::open(root)?.sync_all()
}

fn remove_file_synced(root: &Path, file: &str) -> Result<(), LayoutError> {
    match std::fs::remove_file(root.join(file)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(LayoutError::Io { path: root.join(file), source }),
    }
    sync_dir(root).map_err(|source| LayoutError::Io { path: root.to_owned(), source })
}

/// The partition an entry belongs to, or `None` for entries every shard keeps its own copy
/// of (checkpoints, meta).
fn entry_partition(db: Db, key: &[u8], value: &[u8], partitions: u32) -> Result<Option<u32>, String> {
    let p = match db {
        Db::Sagas => {
            let k = SagaKey::decode(key).map_err(|e| e.to_string())?;
            partition_for(&k.tenant, k.route(), partitions)
        }
        Db::Outbox => OutboxKey::decode(key).map_err(|e| e.to_string())?.partition,
        Db::Schedules => {
            let k = ScheduleKey::decode(key).map_err(|e| e.to_string())?;
            partition_for(&k.saga.tenant, k.saga.route(), partitions)
        }
        Db::Effects => {
            let k = EffectKey::decode(key).map_err(|e| e.to_string())?;
            partition_for(&k.tenant, k.route(), partitions)
        }
        Db::DeadLetter => serde_json::from_slice::<DeadLetter>(value).map_err(|e| e.to_string())?.partition,
        Db::Results => {
            let k = crate::keys::ResultKey::decode(key).map_err(|e| e.to_string())?;
            partition_for(&k.saga.tenant, k.saga.route(), partitions)
        }
        Db::History => {
            let k = crate::keys::HistoryKey::decode(key).map_err(|e| e.to_string())?;
            partition_for(&k.saga.tenant, k.saga.route(), partitions)
        }
        Db::Replays => {
            let k = SagaKey::decode(key).map_err(|e| e.to_string())?;
            partition_for(&k.tenant, k.route(), partitions)
        }
        Db::Checkpoints | Db::Meta => return Ok(None),
    };
    Ok(Some(p))
}

const MOVED_DBS: [Db; 9] = [
    Db::Sagas,
    Db::Outbox,
    Db::Schedules,
    Db::Effects,
    Db::DeadLetter,
    Db::Checkpoints,
    Db::Results,
    Db::History,
    Db::Replays,
];

fn run_move(
    root: &Path,
    partitions: u32,
    plan: MoveFile,
    config: &StoreConfig,
    progress: &mut impl FnMut(MoveProgress),
) -> Result<(), LayoutError> {
    let MoveFile { from, to, .. } = plan;
    tracing::warn!(data = %root.display(), from, to, "shard count changed: moving partitions");
    progress(MoveProgress::Started { from, to });
    let envs = from.max(to);
    let stores: Vec<Store> =
        (0..envs).map(|i| Store::open(&shard_path(root, i), i, partitions, config)).collect::<Result<_, _>>()?;
    let router = Router::new(partitions, to);
    let mut moved = 0u64;

    if plan.phase == MovePhase::Copying {
        write_json_atomic(root, MOVE_FILE, &plan)?;
        for (i, src) in stores.iter().enumerate() {
            let mut outgoing: Vec<Batch> = (0..to).map(|_| Batch::new()).collect();
            let mut copied = 0u64;
            let view = src.read()?;
            for db in MOVED_DBS {
                view.for_each_raw(db, |k, v| {
                    let part = entry_partition(db, k, v, partitions).map_err(|why| StoreError::Corrupt {
                        shard: i,
                        path: src.path().to_owned(),
                        db: db.name(),
                        why,
                    })?;
                    match part {
                        Some(p) => {
                            let dest = router.shard_of_partition(p);
                            if dest != i {
                                outgoing[dest].put_raw(db, k.to_vec(), v.to_vec());
                                copied += 1;
                            }
                        }
                        None => {
                            // checkpoints: merged with max into every new env
                            if let Some(seq) = <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes) {
                                for (dest, b) in outgoing.iter_mut().enumerate() {
                                    if dest != i {
                                        b.advance_checkpoint_raw(k.to_vec(), seq);
                                    }
                                }
                            }
                        }
                    }
                    // Flush in chunks so a huge shard does not need one huge transaction.
                    for (dest, b) in outgoing.iter_mut().enumerate() {
                        if b.len() >= MOVE_CHUNK {
                            stores[dest].commit(b)?;
                            *b = Batch::new();
                        }
                    }
                    Ok(())
                })?;
            }
            drop(view);
            for (dest, b) in outgoing.iter().enumerate() {
                if !b.is_empty() {
                    stores[dest].commit(b)?;
                }
            }
            moved += copied;
            fail::fail_point!("move.after_copy");
            progress(MoveProgress::Copied { env: i, entries: copied });
        }
        write_json_atomic(root, MOVE_FILE, &MoveFile { phase: MovePhase::Deleting, ..plan })?;
    }

    for (i, store) in stores.iter().enumerate() {
        let mut deletes = Batch::new();
        let mut deleted = 0u64;
        {
            let view = store.read()?;
            for db in MOVED_DBS {
                view.for_each_raw(db, |k, v| {
                    let part = entry_partition(db, k, v, partitions).map_err(|why| StoreError::Corrupt {
                        shard: i,
                        path: store.path().to_owned(),
                        db: db.name(),
                        why,
                    })?;
                    let keep = match part {
                        Some(p) => router.shard_of_partition(p) == i,
                        None => i < to,
                    };
                    if !keep {
                        deletes.delete_raw(db, k.to_vec());
                        deleted += 1;
                    }
                    Ok(())
                })?;
            }
        }
        // Deleting in chunks is safe: an entry deleted here already lives in its new env.
        let mut chunk = Batch::new();
        for op in deletes.into_ops() {
            chunk.push_op(op);
            if chunk.len() >= MOVE_CHUNK {
                store.commit(&chunk)?;
                chunk = Batch::new();
            }
        }
        if !chunk.is_empty() {
            store.commit(&chunk)?;
        }
        progress(MoveProgress::Deleted { env: i, entries: deleted });
    }
    drop(stores);

    write_json_atomic(root, LAYOUT_FILE, &LayoutFile { version: 1, partitions, shards: to })?;
    for i in to..envs {
        let path = shard_path(root, i);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|source| LayoutError::Io { path: path.clone(), source })?;
        }
    }
    remove_file_synced(root, MOVE_FILE)?;
    tracing::warn!(data = %root.display(), from, to, moved, "partition move finished");
    progress(MoveProgress::Finished { moved });
    Ok(())
}

#[cfg(test)]
mod tests;
