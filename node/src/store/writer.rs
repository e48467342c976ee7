//! `BlobWriter`: the one writer of a blob's content file and record.
//!
//! Protocol: `write_at` any bytes (no sync, nothing recorded), `commit` a
//! range once its bytes are written (fdatasync, then the hashes of the pieces
//! it completes, then one synced record batch), `complete` with the
//! `VerifiedDigest` of the whole blob (fsync, record `complete`), or `discard`.
//!
//! Invariants: at most one writer per blob (`State::writers`), and the writer
//! counts as a pin. A range is recorded present only after its bytes were
//! synced; a piece hash is recorded in the same batch that makes the piece
//! fully present. It is the hash of the bytes this writer wrote: taken as they
//! are written when the piece was written front to back by this writer (one
//! pass over the bytes, the usual case of a fill), else read back from the
//! synced file. A write into a piece outside that front-to-back run forgets
//! the piece's streamed hash, so the file is read back for it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use shoal_proto::BlobId;

use super::content::{self, sha256_of_range};
use super::error::StoreError;
use super::keys;
use super::meta::{Batch, Durability};
use super::pieces::{piece_range, pieces_overlapping};
use super::ranges::RangeSet;
use super::records::{put_access, put_blob, BlobRecord, StoredBlob};
use super::shared::{now_ms, Shared};
use super::verify::VerifiedDigest;
use super::{Removal, MAX_BLOB_SIZE};

/// Writes one blob; see the module docs.
pub struct BlobWriter {
    slot: WriterSlot,
    generation: u64,
    file: File,
    path: PathBuf,
    stored: StoredBlob,
    /// The piece being written front to back, hashed as it goes.
    stream: Option<PieceStream>,
    /// Pieces written front to back in one run, with their hash, not yet recorded.
    streamed: std::collections::HashMap<u64, [u8; 32]>,
}

/// A piece written from its first byte up to `next`, hashed so far.
struct PieceStream {
    piece: u64,
    next: u64,
    hasher: sha2::Sha256,
}

/// A clone of the writer's file handle for streaming bytes written but not
/// yet committed. No checks: the caller knows what it wrote.
#[derive(Debug)]
pub struct RawReader {
    file: File,
}

/// Registration in `State::writers`, released on drop, with the bytes this
/// writer wrote and has not committed (counted against the quota as
/// `Stats::inflight` until committed or dropped).
struct WriterSlot {
    shared: Arc<Shared>,
    id: BlobId,
    uncommitted: u64,
    /// `uncommitted` when the quota was last checked.
    checked_at: u64,
}

/// Uncommitted bytes a writer may add between two checks of a byte quota.
const QUOTA_CHECK_EVERY: u64 = 4 << 20;
/// Room kept, under a filesystem quota, for what a write costs besides its bytes.
const FS_OVERHEAD: u64 = 2 << 20;

impl BlobWriter {
    /// Registers a writer for `id` and creates or resumes its file.
    pub(super) fn open(shared: &Arc<Shared>, id: &BlobId, size: u64) -> Result<Self, StoreError> {
        if size > MAX_BLOB_SIZE {
            return Err(StoreError::TooLarge {
                id: id.clone(),
                size,
                max: MAX_BLOB_SIZE,
            });
        }
        let existing = {
            let mut state = shared.state();
            if state.writers.contains(id) {
                return Err(StoreError::WriterBusy { id: id.clone() });
            }
            let existing = match state.index.get(id) {
                Some(e) if e.complete => {
                    return Err(StoreError::AlreadyComplete { id: id.clone() })
                }
                Some(e) if e.size != size => {
                    return Err(StoreError::SizeMismatch {
                        id: id.clone(),
                        recorded: e.size,
                        requested: size,
                    })
                }
                Some(e) => Some(e.generation),
                None => None,
            };
            state.writers.insert(id.clone());
            existing
        };
        let mut slot = WriterSlot {
            shared: Arc::clone(shared),
            id: id.clone(),
            uncommitted: 0,
            checked_at: 0,
        };
        if let Some(generation) = existing {
            match Self::resume(slot, generation)? {
                Ok(resumed) => return Ok(resumed),
                Err(back) => slot = back,
            }
            // Record or file vanished: start over.
            shared.drop_blob(id, Some(generation), false, Removal::Missing)?;
        }
        Self::create(slot, size)
    }

    pub fn id(&self) -> &BlobId {
        &self.slot.id
    }

    pub fn size(&self) -> u64 {
        self.stored.size
    }

    pub fn piece_size(&self) -> u64 {
        self.stored.piece_size
    }

    /// The committed ranges.
    pub fn present(&self) -> &RangeSet {
        &self.stored.present
    }

    /// Writes `data` at `offset` (no sync, nothing recorded). Rewriting
    /// committed bytes is allowed (resumes may overlap) but must write the
    /// same bytes: a full piece keeps the hash it was committed with, so
    /// different bytes make its reads fail as `Corrupt`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.check_bounds(offset, data.len() as u64)?;
        let n = data.len() as u64;
        let slot = &mut self.slot;
        // Make room *before* writing (committed or not: bytes held back until
        // verified take disk space too), so usage stays under the high
        // watermark. A filesystem quota is checked at every write (one
        // statvfs); a byte quota every QUOTA_CHECK_EVERY bytes (it sums the
        // index), so it may overshoot by that much.
        if slot.shared.cfg.filesystem_quota || slot.uncommitted + n > slot.checked_at {
            slot.checked_at = slot.uncommitted + QUOTA_CHECK_EVERY;
            // On a filesystem, the write also costs metadata (extents, the
            // journal, RocksDB's log): keep that much more room.
            let room = if slot.shared.cfg.filesystem_quota {
                n + FS_OVERHEAD
            } else {
                n
            };
            if slot.shared.over_high_watermark_after(room) {
                if let Err(error) = slot.shared.evict_for(room) {
                    tracing::warn!(blob = %slot.id, %error, "eviction while writing failed");
                }
            }
        }
        if let Err(e) = self.file.write_all_at(data, offset) {
            // Part of it may be on disk: no streamed hash covers these pieces any more.
            self.hash_written(offset, &[], data.len() as u64);
            return Err(StoreError::io(&self.path)(e));
        }
        self.hash_written(offset, data, n);
        crate::faults::crash_at_offset(offset + n);
        let slot = &mut self.slot;
        slot.uncommitted += n;
        slot.shared
            .stats
            .inflight
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Syncs the file, then records `range` present (and the SHA-256 of
    /// every piece it completes), then evicts if over the high watermark.
    pub fn commit(&mut self, range: Range<u64>) -> Result<(), StoreError> {
        self.check_bounds(range.start, range.end.saturating_sub(range.start))?;
        if range.start >= range.end {
            return Ok(());
        }
        crate::faults::crash_point("commit.before_sync");
        self.file.sync_data().map_err(StoreError::io(&self.path))?;
        let id = self.slot.id.clone();
        let mut stored = self.stored.clone();
        stored.present.insert(range.clone());
        let mut batch = Batch::default();
        for piece in pieces_overlapping(&range, stored.piece_size) {
            let pr = piece_range(piece, stored.piece_size, stored.size);
            if self.stored.present.contains_range(&pr) || !stored.present.contains_range(&pr) {
                continue;
            }
            let hash = match self.streamed.remove(&piece) {
                Some(h) => h,
                None => sha256_of_range(&self.file, pr).map_err(StoreError::io(&self.path))?,
            };
            batch.put(keys::piece_hash(&id, piece), hash.to_vec());
        }
        put_blob(&mut batch, &id, &stored);
        crate::faults::crash_point("commit.before_record");
        self.write_record(batch, &stored)?;
        crate::faults::crash_point("commit.after_record");
        self.stored = stored;
        let (present, piece_size, size) = (
            &self.stored.present,
            self.stored.piece_size,
            self.stored.size,
        );
        self.streamed
            .retain(|&p, _| !present.contains_range(&piece_range(p, piece_size, size)));
        self.slot.release_uncommitted();
        let shared = &self.slot.shared;
        if shared.over_high_watermark() {
            // The commit itself succeeded; a failed eviction is retried by
            // the next commit or `Store::evict`.
            if let Err(error) = shared.evict() {
                tracing::warn!(blob = %id, %error, "eviction after commit failed");
            }
        }
        Ok(())
    }

    /// Follows what was written at `offset` (`len` bytes; `data` empty when the bytes on
    /// disk are unknown) into the streamed piece hashes: a piece's hash is taken as it is
    /// written from its first byte to its last in order; any other write into a piece
    /// forgets what was streamed of it.
    fn hash_written(&mut self, offset: u64, data: &[u8], len: u64) {
        use sha2::Digest as _;
        let (piece_size, size) = (self.stored.piece_size, self.stored.size);
        let end = offset.saturating_add(len).min(size);
        let mut pos = offset;
        while pos < end {
            let piece = pos / piece_size;
            let pr = piece_range(piece, piece_size, size);
            let seg_end = pr.end.min(end);
            let bytes = data.get((pos - offset) as usize..(seg_end - offset) as usize);
            self.streamed.remove(&piece);
            let continues = self
                .stream
                .as_ref()
                .is_some_and(|s| s.piece == piece && s.next == pos);
            if !continues {
                self.stream = (pos == pr.start).then(|| PieceStream {
                    piece,
                    next: pos,
                    hasher: sha2::Sha256::new(),
                });
            }
            match (self.stream.as_mut(), bytes) {
                (Some(s), Some(b)) if !b.is_empty() => {
                    s.hasher.update(b);
                    s.next = seg_end;
                    if seg_end == pr.end {
                        if let Some(s) = self.stream.take() {
                            self.streamed.insert(piece, s.hasher.finalize().into());
                        }
                    }
                }
                // Unknown bytes: nothing of this piece can be trusted from the stream.
                _ => {
                    if self.stream.as_ref().is_some_and(|s| s.piece == piece) {
                        self.stream = None;
                    }
                }
            }
            pos = seg_end;
        }
    }

    /// A handle for reading back uncommitted bytes.
    pub fn raw_reader(&self) -> Result<RawReader, StoreError> {
        let file = self.file.try_clone().map_err(StoreError::io(&self.path))?;
        Ok(RawReader { file })
    }

    /// Marks the blob complete: every byte must be committed and `verified`
    /// must be the digest of this blob.
    pub fn complete(mut self, verified: VerifiedDigest) -> Result<BlobRecord, StoreError> {
        let id = self.slot.id.clone();
        if verified.digest() != &id {
            return Err(StoreError::WrongDigest {
                id,
                verified: verified.digest().clone(),
            });
        }
        let missing = self.stored.size - self.stored.present.len();
        if missing > 0 {
            return Err(StoreError::Incomplete { id, missing });
        }
        self.file.sync_all().map_err(StoreError::io(&self.path))?;
        let mut stored = self.stored.clone();
        stored.complete = true;
        let mut batch = Batch::default();
        put_blob(&mut batch, &id, &stored);
        crate::faults::crash_point("complete.before_record");
        self.write_record(batch, &stored)?;
        crate::faults::crash_point("complete.after_record");
        self.stored = stored;
        let shared = &self.slot.shared;
        let last_access = shared
            .state()
            .index
            .get(&id)
            .map_or(0, |e| e.last_access_ms);
        shared
            .tables()
            .record(&id, last_access)?
            .ok_or(StoreError::Dropped { id })
    }

    /// Deletes the blob's file and record (e.g. its digest did not match).
    pub fn discard(self) -> Result<(), StoreError> {
        let shared = &self.slot.shared;
        shared.drop_blob(
            &self.slot.id,
            Some(self.generation),
            false,
            Removal::Discarded,
        )?;
        Ok(())
    }

    /// The writer of an existing partial blob, or the slot back if its file
    /// or record is gone.
    fn resume(slot: WriterSlot, generation: u64) -> Result<Result<Self, WriterSlot>, StoreError> {
        let shared = Arc::clone(&slot.shared);
        let Some(file) = shared.content.open_rw(&slot.id)? else {
            return Ok(Err(slot));
        };
        let Some(stored) = shared.tables().blob(&slot.id)? else {
            return Ok(Err(slot));
        };
        Shared::touch(&mut shared.state(), &slot.id);
        Ok(Ok(Self {
            path: shared.content.path(&slot.id),
            slot,
            generation,
            file,
            stored,
            stream: None,
            streamed: Default::default(),
        }))
    }

    fn create(slot: WriterSlot, size: u64) -> Result<Self, StoreError> {
        let shared = Arc::clone(&slot.shared);
        let id = &slot.id;
        let _gate = shared.gate_shared();
        let file = shared.content.create(id, size)?;
        let stored = StoredBlob::new(size);
        let now = now_ms();
        // Clears anything a crashed earlier life of this id left behind.
        let mut batch = shared.tables().delete_blob(id)?;
        put_blob(&mut batch, id, &stored);
        put_access(&mut batch, id, now);
        shared.db.write(batch, Durability::Sync)?;
        let generation = shared.state().insert(id, size, 0, false, now);
        Ok(Self {
            path: shared.content.path(id),
            slot,
            generation,
            file,
            stored,
            stream: None,
            streamed: Default::default(),
        })
    }

    /// Writes `batch` if the blob was not dropped meanwhile, then updates
    /// the index from `stored`.
    fn write_record(&self, batch: Batch, stored: &StoredBlob) -> Result<(), StoreError> {
        let shared = &self.slot.shared;
        let id = &self.slot.id;
        let _gate = shared.gate_shared();
        if shared.state().entry_mut(id, self.generation).is_none() {
            return Err(StoreError::Dropped { id: id.clone() });
        }
        shared.db.write(batch, Durability::Sync)?;
        let mut state = shared.state();
        if let Some(entry) = state.entry_mut(id, self.generation) {
            entry.present_bytes = stored.present.len();
            entry.complete = stored.complete;
            entry.version += 1;
        }
        Ok(())
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let size = self.stored.size;
        if offset.checked_add(len).is_some_and(|end| end <= size) {
            return Ok(());
        }
        Err(StoreError::OutOfBounds {
            id: self.slot.id.clone(),
            offset,
            len,
            size,
        })
    }
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("id", &self.slot.id)
            .field("size", &self.stored.size)
            .field("present", &self.stored.present)
            .finish()
    }
}

impl RawReader {
    /// `pread`: may return fewer bytes than asked; 0 at end of file.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    /// `pread` until `buf` is full or end of file.
    pub fn read_full_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        content::read_full_at(&self.file, offset, buf)
    }
}

impl WriterSlot {
    /// The uncommitted bytes are committed (or gone): stop counting them.
    fn release_uncommitted(&mut self) {
        self.shared
            .stats
            .inflight
            .fetch_sub(self.uncommitted, std::sync::atomic::Ordering::Relaxed);
        self.uncommitted = 0;
        self.checked_at = 0;
    }
}

impl Drop for WriterSlot {
    fn drop(&mut self) {
        self.release_uncommitted();
        self.shared.state().writers.remove(&self.id);
    }
}
