//! The node's persistent blob store: RocksDB (or, in tests, memory) for
//! metadata, one content file per blob for bytes.
//!
//! Layout of the data directory:
//! - `db/`                   RocksDB (metadata; see `keys` for the key layout)
//! - `blobs/<alg>/<hex>`     content, sparse until complete
//!
//! Invariants:
//! - Bytes are written and `fdatasync`ed before the metadata that says they are
//!   present (`BlobWriter::commit`): a crash loses at most uncommitted bytes,
//!   never claims bytes that are not on disk.
//! - A blob is `complete` only after `BlobWriter::complete` was given a
//!   `VerifiedDigest` matching the blob id: nothing else can mark it so.
//! - Every fully present piece has a SHA-256 in its record; reads of such a
//!   piece are checked against it, so a corrupted content file is detected
//!   (`StoreError::Corrupt`) and the blob dropped, never served.
//! - A pinned blob (an open `BlobReader`/`BlobWriter`, or an explicit `pin`) is
//!   never evicted or `remove`d. (A blob found corrupt, or `discard`ed, is
//!   dropped even while pinned: its bytes must not be served again.)
//! - On open, content files without a record, and records whose file is gone,
//!   are removed; partial blobs keep their committed ranges.
//!
//! The API is synchronous and blocking (fsync, RocksDB): async callers use
//! `spawn_blocking`. A `Store` is a cheap, cloneable handle (`Send + Sync`).
//! Module map: `shared` (state and locking rules), `writer`, `reader`,
//! `recovery`, `records` (record types and their tables), `keys`, `meta`
//! (the two metadata backends), `content` (files), `ranges`, `pieces`,
//! `verify`, `error`.

pub mod content;
mod error;
pub mod keys;
pub mod meta;
pub mod pieces;
pub mod ranges;
mod reader;
mod records;
mod recovery;
mod shared;
mod verify;
mod writer;

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use shoal_proto::{BlobId, Digest, RepoName, Tag};

pub use error::StoreError;
pub use meta::{DbError, MetaMemory};
pub use pieces::piece_size;
pub use ranges::RangeSet;
pub use reader::BlobReader;
pub use records::{BlobRecord, ManifestRecord, Provenance, RepoKey, TagRecord};
pub use recovery::RecoveryReport;
pub use shared::allocated_bytes;
pub use shared::PinGuard;
pub use verify::{DigestMismatch, VerifiedDigest, Verifier};
pub use writer::{BlobWriter, RawReader};

use content::ContentDir;
use meta::{memory::MemoryMeta, rocks::RocksMeta, Durability, MetaStore};
use records::{to_json, StoredRepos};
use shared::{DropOutcome, Shared, State};

/// Largest blob the store accepts (1 TiB): bounds the piece table of a
/// blob whose size came from outside (65 536 pieces of 16 MiB).
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

/// Where the metadata lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// In a `BTreeMap`, lost on drop (tests). Content files are still on disk.
    Memory,
    /// In RocksDB under `<dir>/db`.
    RocksDb,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    pub backend: Backend,
    /// Disk quota for content bytes (committed, plus written and not yet
    /// committed); 0 = no byte quota (see `filesystem_quota`).
    pub quota_bytes: u64,
    /// Without a byte quota: keep the data directory's *filesystem* below
    /// the watermarks (its used fraction, whoever uses it), so a node never
    /// fills the disk it shares with the host. Both off: unlimited.
    pub filesystem_quota: bool,
    /// Evict when usage exceeds this fraction of the quota (e.g. 0.90).
    pub high_watermark: f64,
    /// ... down to this fraction (e.g. 0.80).
    pub low_watermark: f64,
}

/// Content bytes held, against the quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreUsage {
    /// Sum of committed (present) bytes over all blobs.
    pub bytes: u64,
    /// Bytes written to content files and not committed yet (downloads in
    /// flight, bytes held back until their blob is verified).
    pub inflight_bytes: u64,
    pub blobs: usize,
    pub complete: usize,
    /// The byte quota; with a filesystem quota, the filesystem's size; 0:
    /// unlimited.
    pub quota_bytes: u64,
    /// Usage above which eviction starts (0: never).
    pub high_watermark_bytes: u64,
    /// What eviction measures against the watermark: content bytes (byte
    /// quota) or the filesystem's used bytes (filesystem quota).
    pub measured_bytes: u64,
}

/// Counters since open (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Pieces read back and hashed by readers.
    pub pieces_verified: u64,
    /// Blobs dropped because a piece did not match its hash.
    pub corrupt_dropped: u64,
    pub evicted: u64,
}

/// Why a blob left the store (passed to the removal listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Least recently used, over the quota.
    Evicted,
    /// `Store::remove`.
    Removed,
    /// A piece did not match its hash.
    Corrupt,
    /// `BlobWriter::discard`.
    Discarded,
    /// Its content file had disappeared.
    Missing,
}

/// Handle to the store; clones share it.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// A stored snapshot record: its name and the snapshotter's encoding of it.
pub type SnapshotEntry = (String, Vec<u8>);

/// One change to the snapshot table ([`Store::write_snapshots`]).
#[derive(Clone, Debug)]
pub enum SnapshotWrite {
    Put {
        name: String,
        value: Vec<u8>,
    },
    Delete {
        name: String,
    },
    /// The last snapshot id handed out.
    Seq(u64),
}

impl Store {
    /// Opens (creating if needed) the store in `cfg.dir`, recovers it (see
    /// `recovery`), and evicts if it is over its quota.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        validate(&cfg)?;
        fs::create_dir_all(&cfg.dir).map_err(StoreError::io(&cfg.dir))?;
        let db: Box<dyn MetaStore> = match cfg.backend {
            Backend::Memory => Box::new(MemoryMeta::default()),
            Backend::RocksDb => Box::new(RocksMeta::open(&cfg.dir.join("db"))?),
        };
        let content = ContentDir::open(&cfg.dir)?;
        let shared = Shared {
            cfg,
            db,
            content,
            gate: RwLock::new(()),
            repo_lock: Mutex::new(()),
            evict_lock: Mutex::new(()),
            state: Mutex::new(State::default()),
            listener: RwLock::new(None),
            stats: shared::Stats::default(),
            charged: RwLock::new(Vec::new()),
            charged_cache: Mutex::new(None),
        };
        let mut state = State::default();
        let report = recovery::recover(&shared, &mut state)?;
        *shared.state() = state;
        if report.dropped_records > 0 || report.deleted_files > 0 {
            tracing::info!(
                kept = report.kept,
                dropped_records = report.dropped_records,
                deleted_files = report.deleted_files,
                "store recovered"
            );
        }
        let store = Store {
            shared: Arc::new(shared),
        };
        store.evict()?;
        Ok(store)
    }

    /// The record of `id`, if the store holds (some of) it.
    pub fn blob(&self, id: &BlobId) -> Result<Option<BlobRecord>, StoreError> {
        let Some(last_access) = self.shared.state().index.get(id).map(|e| e.last_access_ms) else {
            return Ok(None);
        };
        self.shared.tables().record(id, last_access)
    }

    /// Every blob record (complete and partial).
    pub fn blobs(&self) -> Result<Vec<BlobRecord>, StoreError> {
        let mut ids: Vec<_> = {
            let state = self.shared.state();
            state
                .index
                .iter()
                .map(|(id, e)| (id.clone(), e.last_access_ms))
                .collect()
        };
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for (id, last_access) in ids {
            if let Some(rec) = self.shared.tables().record(&id, last_access)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The single writer of `id`: creates a sparse file of `size` bytes, or
    /// resumes a partial blob (keeping its committed ranges).
    /// `Err(AlreadyComplete)`, `Err(SizeMismatch)` against an existing record
    /// of another size, `Err(WriterBusy)` while another writer is alive.
    pub fn open_writer(&self, id: &BlobId, size: u64) -> Result<BlobWriter, StoreError> {
        BlobWriter::open(&self.shared, id, size)
    }

    /// A verified reader of `id`'s committed bytes; None if not held.
    /// Pins the blob while alive and counts as an access for LRU.
    pub fn open_reader(&self, id: &BlobId) -> Result<Option<BlobReader>, StoreError> {
        BlobReader::open(&self.shared, id)
    }

    /// Records that `id` was fetched or confirmed in `repo`, and whether it
    /// was open there (see [`Provenance`]). Open is sticky per repository.
    pub fn add_repo(&self, id: &BlobId, repo: RepoKey, open: bool) -> Result<(), StoreError> {
        let shared = &self.shared;
        let _gate = shared.gate_shared();
        let _repos = shared
            .repo_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(generation) = shared.state().index.get(id).map(|e| e.generation) else {
            return Err(StoreError::NotFound { id: id.clone() });
        };
        let mut stored: StoredRepos = shared.tables().repos(id)?;
        if !stored.repos.record(repo, open) {
            return Ok(());
        }
        shared
            .db
            .put(keys::blob_repos(id), to_json(&stored), Durability::Sync)?;
        if let Some(entry) = shared.state().entry_mut(id, generation) {
            entry.version += 1;
        }
        Ok(())
    }

    /// Deletes `id` (record and file). `Err(Pinned)` while pinned; removing
    /// a blob the store does not hold is not an error.
    pub fn remove(&self, id: &BlobId) -> Result<(), StoreError> {
        match self.shared.drop_blob(id, None, true, Removal::Removed)? {
            DropOutcome::Pinned => Err(StoreError::Pinned { id: id.clone() }),
            DropOutcome::Dropped | DropOutcome::Absent => Ok(()),
        }
    }

    /// Keeps `id` from eviction and `remove` until the guard is dropped
    /// (also for a blob not yet in the store, e.g. before its download).
    pub fn pin(&self, id: &BlobId) -> PinGuard {
        self.shared.pin(id)
    }

    pub fn usage(&self) -> StoreUsage {
        self.shared.usage()
    }

    /// Counts the files under `dirs` (derived from blobs, kept outside the store: mounts' decoded
    /// chunks and EROFS blob files) against a byte quota, so that the node's whole cache stays
    /// within it: the store evicts its own blobs to make room for them. No effect without a byte
    /// quota (a filesystem quota sees every file anyway).
    pub fn charge_dirs(&self, dirs: Vec<PathBuf>) {
        *self
            .shared
            .charged
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = dirs;
        *self
            .shared
            .charged_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The byte quota (0: none, or a filesystem quota).
    pub fn byte_quota(&self) -> u64 {
        self.shared.cfg.quota_bytes
    }

    pub fn stats(&self) -> StoreStats {
        self.shared.stats()
    }

    /// What the metadata database holds in memory.
    pub fn meta_memory(&self) -> MetaMemory {
        self.shared.db.memory()
    }

    /// If usage is above the high watermark, removes least recently
    /// accessed unpinned blobs until it is at or below the low watermark.
    /// Returns the evicted ids (also reported to the removal listener).
    pub fn evict(&self) -> Result<Vec<BlobId>, StoreError> {
        self.shared.evict()
    }

    /// Calls `listener` for every blob that leaves the store, e.g. to
    /// announce evictions to the scheduler. It runs on the thread doing the
    /// removal (possibly inside a `commit`), so it must be quick and must not
    /// call back into the store (hand the id to a channel with `try_send`).
    /// Replaces any earlier listener.
    pub fn set_removal_listener(
        &self,
        listener: impl Fn(&BlobId, Removal) + Send + Sync + 'static,
    ) {
        *self
            .shared
            .listener
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(listener));
    }

    /// Where `id`'s content file is (for diagnostics; write only through a
    /// `BlobWriter`).
    pub fn content_path(&self, id: &BlobId) -> PathBuf {
        self.shared.content.path(id)
    }

    pub fn get_manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        self.shared.tables().manifest(digest)
    }

    /// Stores a manifest, merging its provenance with an existing record's. `Err(ManifestDigest)` if the bytes do not
    /// hash to `rec.digest`.
    pub fn put_manifest(&self, rec: &ManifestRecord) -> Result<(), StoreError> {
        if Digest::of(rec.digest.algorithm(), &rec.bytes) != rec.digest {
            return Err(StoreError::ManifestDigest {
                digest: rec.digest.clone(),
            });
        }
        let shared = &self.shared;
        let _repos = shared
            .repo_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut merged = rec.clone();
        if let Some(old) = shared.tables().manifest(&rec.digest)? {
            merged.repos.merge(&old.repos);
        }
        shared.db.put(
            keys::manifest(&rec.digest),
            to_json(&merged),
            Durability::Sync,
        )?;
        Ok(())
    }

    pub fn get_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.shared.tables().tag(upstream, repo, tag)
    }

    /// Stores (replaces) the resolution of `upstream`/`repo`:`tag`.
    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        self.shared.db.put(
            keys::tag(upstream, repo, tag),
            to_json(rec),
            Durability::Sync,
        )?;
        Ok(())
    }

    /// Every snapshot record (name → the snapshotter's encoding) and the last snapshot id handed
    /// out. The store keeps these bytes for `snapshotter::state`, which owns their meaning.
    pub fn snapshots(&self) -> Result<(Vec<SnapshotEntry>, u64), StoreError> {
        let db = &self.shared.db;
        let mut out = Vec::new();
        for (key, value) in db.scan(&keys::Table::Snapshot.prefix())? {
            if let Some(name) = keys::decode_snapshot(&key) {
                out.push((name, value));
            }
        }
        let seq = db
            .get(&keys::snapshot_seq())?
            .and_then(|v| Some(u64::from_be_bytes(v.as_slice().try_into().ok()?)))
            .unwrap_or(0);
        Ok((out, seq))
    }

    /// Applies snapshot record changes atomically and durably.
    pub fn write_snapshots(&self, writes: Vec<SnapshotWrite>) -> Result<(), StoreError> {
        let mut batch = meta::Batch::default();
        for w in writes {
            match w {
                SnapshotWrite::Put { name, value } => batch.put(keys::snapshot(&name), value),
                SnapshotWrite::Delete { name } => batch.delete(keys::snapshot(&name)),
                SnapshotWrite::Seq(seq) => {
                    batch.put(keys::snapshot_seq(), seq.to_be_bytes().to_vec())
                }
            }
        }
        self.shared.db.write(batch, Durability::Sync)?;
        Ok(())
    }

    /// Makes every metadata write durable (last step of shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.shared.db.flush()?;
        Ok(())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.shared.cfg.dir)
            .field("backend", &self.shared.cfg.backend)
            .finish()
    }
}

fn validate(cfg: &StoreConfig) -> Result<(), StoreError> {
    let fraction = |v: f64| v.is_finite() && v > 0.0 && v <= 1.0;
    if cfg.quota_bytes == 0 && !cfg.filesystem_quota {
        return Ok(());
    }
    if !fraction(cfg.high_watermark) {
        return Err(StoreError::Config {
            field: "high_watermark",
            problem: "must be in (0, 1]",
        });
    }
    if !fraction(cfg.low_watermark) || cfg.low_watermark > cfg.high_watermark {
        return Err(StoreError::Config {
            field: "low_watermark",
            problem: "must be in (0, high_watermark]",
        });
    }
    Ok(())
}
