//! The state behind every `Store` handle, writer, reader and pin: the
//! metadata database, the content directory and the in-memory index, plus the
//! operations that must stay consistent across them (dropping a blob, pins,
//! eviction).
//!
//! Invariants:
//! - `State::index` holds exactly the blobs whose `Blob` record is in the
//!   database (an entry is inserted after its record is written and removed
//!   before its record is deleted). Each insertion gets a fresh `generation`;
//!   a writer or reader acts on a blob only while the entry still has the
//!   generation it started with, so a handle to a dropped blob can never
//!   rewrite or drop a newer blob of the same id.
//! - `gate`: record writes (commit, complete, create) hold it shared, drops
//!   hold it exclusively, so a record is never rewritten after it was dropped
//!   and a new blob is never created half-way through the drop of an old one.
//! - Lock order: `evict_lock` → `gate` → `repo_lock` → `state`. `state` is
//!   never held across I/O other than the in-memory bookkeeping.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::time::{SystemTime, UNIX_EPOCH};

use shoal_proto::BlobId;

use super::content::{ContentDir, FileStamp};
use super::error::StoreError;
use super::meta::{Durability, MetaStore};
use super::records::{BlobRecord, Tables};
use super::{Removal, StoreConfig, StoreStats, StoreUsage};

/// Usage against the quota, in bytes.
#[derive(Clone, Copy, Debug)]
struct Limits {
    total: u64,
    used: u64,
    high: u64,
    low: u64,
}

/// Called with every blob that leaves the store.
pub type RemovalListener = Box<dyn Fn(&BlobId, Removal) + Send + Sync>;

pub struct Shared {
    pub cfg: StoreConfig,
    pub db: Box<dyn MetaStore>,
    pub content: ContentDir,
    pub gate: RwLock<()>,
    /// Serialises read-modify-write of `BlobRepos` and `Manifest` values.
    pub repo_lock: Mutex<()>,
    pub evict_lock: Mutex<()>,
    pub state: Mutex<State>,
    pub listener: RwLock<Option<RemovalListener>>,
    pub stats: Stats,
    /// Directories of files derived from blobs outside the store (mounts' decoded chunks and
    /// EROFS blob files, private chunk caches), whose allocated bytes count against a byte
    /// quota: the store evicts its own blobs to make room for them.
    pub charged: RwLock<Vec<PathBuf>>,
    /// The last sum of `charged` and when it was taken (walked at most every
    /// [`CHARGED_FRESH`]; quota checks come at every commit).
    pub charged_cache: Mutex<Option<(std::time::Instant, u64)>>,
}

/// How long a sum of the charged directories is reused.
const CHARGED_FRESH: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Default)]
pub struct Stats {
    pub pieces_verified: AtomicU64,
    pub corrupt: AtomicU64,
    pub evicted: AtomicU64,
    /// Bytes written by live writers and not committed yet.
    pub inflight: AtomicU64,
}

#[derive(Default)]
pub struct State {
    pub index: HashMap<BlobId, Entry>,
    pub pins: HashMap<BlobId, usize>,
    pub writers: HashSet<BlobId>,
    /// Pieces this process has hashed and found good, per blob, valid while
    /// the content file still has `stamp`.
    pub verified: HashMap<BlobId, VerifiedPieces>,
    next_generation: u64,
    access_seq: u64,
}

/// What the index knows about a blob without reading the database.
#[derive(Debug)]
pub struct Entry {
    pub generation: u64,
    pub size: u64,
    pub present_bytes: u64,
    pub complete: bool,
    pub last_access_ms: u64,
    /// Tie-break for accesses within the same millisecond.
    pub access_seq: u64,
    /// The access time last written to the database.
    pub persisted_access_ms: u64,
    /// Bumped after every change to the blob's records.
    pub version: u64,
    /// The last assembled record and the `version` it was read at, shared
    /// by readers while any is alive.
    pub snapshot: (u64, Weak<BlobRecord>),
}

#[derive(Debug, Clone)]
pub struct VerifiedPieces {
    pub generation: u64,
    pub stamp: FileStamp,
    pub pieces: HashSet<u64>,
}

/// Result of `Shared::drop_blob`.
#[derive(Debug, PartialEq, Eq)]
pub enum DropOutcome {
    Dropped,
    Absent,
    Pinned,
}

/// Keeps a blob from being evicted or removed while alive.
pub struct PinGuard {
    shared: Arc<Shared>,
    id: BlobId,
}

/// Access times are persisted at most this often per blob (they are hints
/// for LRU order, not worth a write per read).
const ACCESS_PERSIST_INTERVAL_MS: u64 = 60_000;

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section only updates plain maps; a panic in one
        // leaves them usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn gate_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn gate_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn tables(&self) -> Tables<'_> {
        Tables { db: &*self.db }
    }

    /// Pins `id` (whether or not it is in the store).
    pub fn pin(self: &Arc<Self>, id: &BlobId) -> PinGuard {
        let mut state = self.state();
        PinGuard::new_locked(self, &mut state, id)
    }

    /// Removes blob `id` (record, then file) if it still has `generation`
    /// (any generation if None) and, when `only_unpinned`, nobody pins it.
    pub fn drop_blob(
        &self,
        id: &BlobId,
        generation: Option<u64>,
        only_unpinned: bool,
        reason: Removal,
    ) -> Result<DropOutcome, StoreError> {
        {
            let _gate = self.gate_exclusive();
            {
                let mut state = self.state();
                let Some(entry) = state.index.get(id) else {
                    return Ok(DropOutcome::Absent);
                };
                if generation.is_some_and(|g| g != entry.generation) {
                    return Ok(DropOutcome::Absent);
                }
                if only_unpinned && state.is_pinned(id) {
                    return Ok(DropOutcome::Pinned);
                }
                state.index.remove(id);
                state.verified.remove(id);
            }
            // If this fails the record is back after a restart (the index no
            // longer has it, so nothing uses it before then).
            let batch = self.tables().delete_blob(id)?;
            self.db.write(batch, Durability::Sync)?;
            crate::faults::crash_point("drop.after_record");
            self.content.remove(id)?;
            crate::faults::crash_point("drop.after_file");
        }
        match reason {
            Removal::Evicted => self.stats.evicted.fetch_add(1, Ordering::Relaxed),
            Removal::Corrupt => self.stats.corrupt.fetch_add(1, Ordering::Relaxed),
            Removal::Removed | Removal::Discarded | Removal::Missing => 0,
        };
        if let Some(listener) = &*self.listener.read().unwrap_or_else(PoisonError::into_inner) {
            listener(id, reason);
        }
        Ok(DropOutcome::Dropped)
    }

    pub fn usage(&self) -> StoreUsage {
        let (bytes, blobs, complete) = {
            let state = self.state();
            (
                state.index.values().map(|e| e.present_bytes).sum::<u64>(),
                state.index.len(),
                state.index.values().filter(|e| e.complete).count(),
            )
        };
        let inflight_bytes = self.stats.inflight.load(Ordering::Relaxed);
        let limits = self.limits(bytes + inflight_bytes);
        StoreUsage {
            bytes,
            inflight_bytes,
            blobs,
            complete,
            quota_bytes: limits.map_or(0, |l| l.total),
            high_watermark_bytes: limits.map_or(0, |l| l.high),
            measured_bytes: limits.map_or(bytes + inflight_bytes, |l| l.used),
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            pieces_verified: self.stats.pieces_verified.load(Ordering::Relaxed),
            corrupt_dropped: self.stats.corrupt.load(Ordering::Relaxed),
            evicted: self.stats.evicted.load(Ordering::Relaxed),
        }
    }

    /// Usage against the quota, given the store's own `content` bytes
    /// (present + in flight); `None` when unlimited.
    fn limits(&self, content: u64) -> Option<Limits> {
        let at = |total: u64, f: f64| (total as f64 * f) as u64;
        let (total, used) = if self.cfg.quota_bytes != 0 {
            (self.cfg.quota_bytes, content + self.charged_bytes())
        } else if self.cfg.filesystem_quota {
            let fs = rustix::fs::statvfs(&self.cfg.dir).ok()?;
            let total = fs.f_blocks.saturating_mul(fs.f_frsize);
            let avail = fs.f_bavail.saturating_mul(fs.f_frsize);
            (total, total.saturating_sub(avail))
        } else {
            return None;
        };
        Some(Limits {
            total,
            used,
            high: at(total, self.cfg.high_watermark),
            low: at(total, self.cfg.low_watermark),
        })
    }

    /// Allocated bytes of the charged directories (a filesystem quota sees them anyway).
    pub fn charged_bytes(&self) -> u64 {
        let mut cache = self
            .charged_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((at, bytes)) = *cache {
            if at.elapsed() < CHARGED_FRESH {
                return bytes;
            }
        }
        let dirs = self.charged.read().unwrap_or_else(PoisonError::into_inner);
        let bytes = dirs.iter().map(|d| allocated_bytes(d)).sum();
        *cache = Some((std::time::Instant::now(), bytes));
        bytes
    }

    fn content_bytes(&self) -> u64 {
        let present: u64 = self.state().index.values().map(|e| e.present_bytes).sum();
        present + self.stats.inflight.load(Ordering::Relaxed)
    }

    /// Whether usage is above the high watermark (false without a quota).
    pub fn over_high_watermark(&self) -> bool {
        self.over_high_watermark_after(0)
    }

    /// Whether usage would be above the high watermark after `extra` more bytes.
    pub fn over_high_watermark_after(&self, extra: u64) -> bool {
        self.limits(self.content_bytes())
            .is_some_and(|l| l.used.saturating_add(extra) > l.high)
    }

    /// If usage is above the high watermark, drops least recently accessed
    /// unpinned blobs until it is at or below the low watermark (counting, on
    /// a filesystem quota, the present bytes dropped as freed).
    pub fn evict(&self) -> Result<Vec<BlobId>, StoreError> {
        self.evict_for(0)
    }

    /// [`Shared::evict`] as if `extra` more bytes were already used (room for a
    /// write about to happen).
    pub fn evict_for(&self, extra: u64) -> Result<Vec<BlobId>, StoreError> {
        if self.cfg.quota_bytes == 0 && !self.cfg.filesystem_quota {
            return Ok(Vec::new());
        }
        let _one_at_a_time = self
            .evict_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(limits) = self.limits(self.content_bytes()) else {
            return Ok(Vec::new());
        };
        let used = limits.used.saturating_add(extra);
        if used <= limits.high {
            return Ok(Vec::new());
        }
        let mut excess = used - limits.low;
        let candidates = {
            let state = self.state();
            let mut candidates: Vec<_> = state
                .index
                .iter()
                .filter(|(id, _)| !state.is_pinned(id))
                .map(|(id, e)| {
                    (
                        (e.last_access_ms, e.access_seq),
                        id.clone(),
                        e.generation,
                        e.present_bytes,
                    )
                })
                .collect();
            candidates.sort();
            candidates
        };
        let mut evicted = Vec::new();
        for (_, id, generation, present) in candidates {
            if excess == 0 {
                break;
            }
            if self.drop_blob(&id, Some(generation), true, Removal::Evicted)?
                == DropOutcome::Dropped
            {
                excess = excess.saturating_sub(present.max(1));
                evicted.push(id);
            }
        }
        if !evicted.is_empty() {
            tracing::info!(
                evicted = evicted.len(),
                used,
                high = limits.high,
                "over the store's high watermark; evicted least recently used blobs"
            );
        }
        Ok(evicted)
    }

    /// Records an access to `id` in the index; returns the time to persist,
    /// if it is time to.
    pub fn touch(state: &mut State, id: &BlobId) -> Option<u64> {
        let now = now_ms();
        state.access_seq += 1;
        let seq = state.access_seq;
        let entry = state.index.get_mut(id)?;
        entry.last_access_ms = now;
        entry.access_seq = seq;
        if now.saturating_sub(entry.persisted_access_ms) < ACCESS_PERSIST_INTERVAL_MS {
            return None;
        }
        entry.persisted_access_ms = now;
        Some(now)
    }
}

impl State {
    pub fn is_pinned(&self, id: &BlobId) -> bool {
        self.pins.get(id).is_some_and(|&n| n > 0) || self.writers.contains(id)
    }

    /// Adds an index entry for a blob whose record was just written.
    pub fn insert(
        &mut self,
        id: &BlobId,
        size: u64,
        present_bytes: u64,
        complete: bool,
        access_ms: u64,
    ) -> u64 {
        self.next_generation += 1;
        self.access_seq += 1;
        let generation = self.next_generation;
        let access_seq = self.access_seq;
        self.index.insert(
            id.clone(),
            Entry {
                generation,
                size,
                present_bytes,
                complete,
                last_access_ms: access_ms,
                access_seq,
                persisted_access_ms: access_ms,
                version: 0,
                snapshot: (0, Weak::new()),
            },
        );
        generation
    }

    /// The entry of `id` if it still has `generation`.
    pub fn entry_mut(&mut self, id: &BlobId, generation: u64) -> Option<&mut Entry> {
        self.index
            .get_mut(id)
            .filter(|e| e.generation == generation)
    }
}

impl PinGuard {
    /// Pins `id` under an already held state lock.
    pub fn new_locked(shared: &Arc<Shared>, state: &mut State, id: &BlobId) -> Self {
        *state.pins.entry(id.clone()).or_insert(0) += 1;
        Self {
            shared: Arc::clone(shared),
            id: id.clone(),
        }
    }

    pub fn id(&self) -> &BlobId {
        &self.id
    }
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard").field("id", &self.id).finish()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        if let Some(n) = state.pins.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                state.pins.remove(&self.id);
            }
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Allocated bytes (blocks, as `du` counts them) of the files under `dir`; 0 if it is missing.
/// Symlinks are not followed.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += m.blocks() * 512,
                _ => {}
            }
        }
    }
    total
}
