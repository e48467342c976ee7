//! `BlobReader`: verified reads of a blob's committed bytes.
//!
//! Invariant: every byte `read_at` returns from a fully present piece comes
//! from a buffer that was hashed and matched the piece's recorded SHA-256 in
//! this call, unless this process already verified that piece while the
//! content file had the same `FileStamp` (length, mtime, ctime, inode) it has
//! now. A piece that is only partly present has no hash yet; its committed
//! bytes are served as written (they were synced before being recorded).
//!
//! Verification results are remembered only for files whose mtime is at
//! least `SETTLED_NS` old: file timestamps come from a coarse clock, so a
//! write right after ours could leave the mtime unchanged ("racy" timestamps,
//! as git calls them); a write to a file with an old mtime always changes it.
//!
//! On a mismatch (or a file too short for its committed ranges) the blob's
//! record and file are dropped at once, so it is refetched, never served.
//! Open handles keep reading the old inode, still verifying.

use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::Digest as _;
use shoal_proto::BlobId;

use super::content::{chunk_len, read_full_at, FileStamp};
use super::error::StoreError;
use super::keys;
use super::meta::Durability;
use super::pieces::{piece_range, pieces_overlapping};
use super::records::BlobRecord;
use super::shared::{PinGuard, Shared, VerifiedPieces};
use super::Removal;

/// A file whose timestamps are this old cannot get the same ones again.
const SETTLED_NS: i128 = 1_000_000_000;

/// Reads one blob; pins it while alive.
pub struct BlobReader {
    shared: Arc<Shared>,
    record: Arc<BlobRecord>,
    generation: u64,
    file: File,
    path: PathBuf,
    verified: Mutex<Verified>,
    _pin: PinGuard,
}

/// Pieces verified against the file as of `stamp`.
#[derive(Debug)]
struct Verified {
    stamp: FileStamp,
    pieces: HashSet<u64>,
}

impl BlobReader {
    /// A reader of `id`, or None if the store does not hold it.
    pub(super) fn open(shared: &Arc<Shared>, id: &BlobId) -> Result<Option<Self>, StoreError> {
        let (pin, generation, version, snapshot, last_access, persist) = {
            let mut state = shared.state();
            let Some(entry) = state.index.get(id) else {
                return Ok(None);
            };
            let (generation, version) = (entry.generation, entry.version);
            let snapshot = (entry.snapshot.0 == version)
                .then(|| entry.snapshot.1.upgrade())
                .flatten();
            let persist = Shared::touch(&mut state, id);
            let last_access = state.index.get(id).map_or(0, |e| e.last_access_ms);
            let pin = PinGuard::new_locked(shared, &mut state, id);
            (pin, generation, version, snapshot, last_access, persist)
        };
        let record = match snapshot {
            Some(record) => record,
            None => {
                let Some(record) = shared.tables().record(id, last_access)? else {
                    return Ok(None);
                };
                let record = Arc::new(record);
                if let Some(entry) = shared.state().entry_mut(id, generation) {
                    if entry.version == version {
                        entry.snapshot = (version, Arc::downgrade(&record));
                    }
                }
                record
            }
        };
        let Some(file) = shared.content.open_ro(id)? else {
            shared.drop_blob(id, Some(generation), false, Removal::Missing)?;
            return Ok(None);
        };
        let path = shared.content.path(id);
        let stamp = FileStamp::of(&file).map_err(StoreError::io(&path))?;
        let pieces = shared
            .state()
            .verified
            .get(id)
            .filter(|v| v.generation == generation && v.stamp == stamp)
            .map(|v| v.pieces.clone())
            .unwrap_or_default();
        if let Some(ms) = persist {
            persist_access(shared, id, generation, ms)?;
        }
        Ok(Some(Self {
            shared: Arc::clone(shared),
            record,
            generation,
            file,
            path,
            verified: Mutex::new(Verified { stamp, pieces }),
            _pin: pin,
        }))
    }

    /// The blob's record as of when it was loaded.
    pub fn record(&self) -> &BlobRecord {
        &self.record
    }

    /// Reloads the record, to see ranges committed since the reader was
    /// opened (e.g. when following a download). `Err(Dropped)` if the blob
    /// was dropped meanwhile.
    pub fn refresh(&mut self) -> Result<(), StoreError> {
        let id = &self.record.id;
        let last_access = match self.shared.state().entry_mut(id, self.generation) {
            Some(entry) => entry.last_access_ms,
            None => return Err(StoreError::Dropped { id: id.clone() }),
        };
        let Some(record) = self.shared.tables().record(id, last_access)? else {
            return Err(StoreError::Dropped { id: id.clone() });
        };
        self.record = Arc::new(record);
        Ok(())
    }

    pub fn id(&self) -> &BlobId {
        &self.record.id
    }

    pub fn size(&self) -> u64 {
        self.record.size
    }

    /// Reads committed bytes at `offset` into `buf`. Returns 0 at or past
    /// the end of the blob, and may return fewer bytes than `buf` holds:
    /// it stops at the end of the blob and at the end of the committed run
    /// holding `offset`. `Err(NotPresent)` if `offset` is not committed.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let rec = &*self.record;
        if buf.is_empty() || offset >= rec.size {
            return Ok(0);
        }
        let Some(run) = rec.present.run_containing(offset) else {
            return Err(StoreError::NotPresent {
                id: rec.id.clone(),
                offset,
            });
        };
        let end = run.end.min(offset.saturating_add(buf.len() as u64));
        let (stamp, known) = self.known_pieces(offset..end)?;
        let mut newly = Vec::new();
        let mut pos = offset;
        for piece in pieces_overlapping(&(offset..end), rec.piece_size) {
            let pr = piece_range(piece, rec.piece_size, rec.size);
            let seg = pos..pr.end.min(end);
            let out = &mut buf[(seg.start - offset) as usize..(seg.end - offset) as usize];
            if !rec.present.contains_range(&pr) || known.contains(&piece) {
                self.read_exact(piece, seg.start, out)?;
            } else {
                self.read_verified(piece, pr, seg.start, out)?;
                newly.push(piece);
            }
            pos = seg.end;
        }
        self.remember(stamp, newly);
        Ok((end - offset) as usize)
    }

    /// Refreshes the file stamp (forgetting verifications if it changed) and
    /// returns the pieces of `range` already verified.
    fn known_pieces(&self, range: Range<u64>) -> Result<(FileStamp, HashSet<u64>), StoreError> {
        let stamp = FileStamp::of(&self.file).map_err(StoreError::io(&self.path))?;
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.stamp != stamp {
            verified.stamp = stamp;
            verified.pieces.clear();
        }
        let known = pieces_overlapping(&range, self.record.piece_size)
            .filter(|p| verified.pieces.contains(p))
            .collect();
        Ok((stamp, known))
    }

    /// Reads `out.len()` bytes at `offset` without hashing.
    fn read_exact(&self, piece: u64, offset: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let n = read_full_at(&self.file, offset, out).map_err(StoreError::io(&self.path))?;
        if n < out.len() {
            return Err(self.corrupt(piece));
        }
        Ok(())
    }

    /// Reads and hashes the whole of piece `piece` (bytes `pr`), copying the
    /// bytes at `offset..offset+out.len()` from the hashed buffer.
    fn read_verified(
        &self,
        piece: u64,
        pr: Range<u64>,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let Some(expected) = usize::try_from(piece)
            .ok()
            .and_then(|i| self.record.piece_sha256.get(i).copied().flatten())
        else {
            return Err(self.corrupt(piece));
        };
        let want = offset..offset + out.len() as u64;
        let mut hasher = sha2::Sha256::new();
        let mut chunk = vec![0u8; chunk_len(pr.end - pr.start)];
        let mut pos = pr.start;
        while pos < pr.end {
            let n = chunk.len().min((pr.end - pos) as usize);
            let got = read_full_at(&self.file, pos, &mut chunk[..n])
                .map_err(StoreError::io(&self.path))?;
            if got < n {
                return Err(self.corrupt(piece));
            }
            hasher.update(&chunk[..n]);
            let (s, e) = (want.start.max(pos), want.end.min(pos + n as u64));
            if s < e {
                out[(s - want.start) as usize..(e - want.start) as usize]
                    .copy_from_slice(&chunk[(s - pos) as usize..(e - pos) as usize]);
            }
            pos += n as u64;
        }
        self.shared
            .stats
            .pieces_verified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if <[u8; 32]>::from(hasher.finalize()) != expected {
            return Err(self.corrupt(piece));
        }
        Ok(())
    }

    /// Remembers `pieces` as verified under `stamp`, here and for later
    /// readers, if the file's timestamps have settled.
    fn remember(&self, stamp: FileStamp, pieces: Vec<u64>) {
        if pieces.is_empty() || !settled(&stamp) {
            return;
        }
        {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if verified.stamp == stamp {
                verified.pieces.extend(pieces.iter().copied());
            }
        }
        let mut state = self.shared.state();
        if state.entry_mut(&self.record.id, self.generation).is_none() {
            return;
        }
        let shared = state
            .verified
            .entry(self.record.id.clone())
            .or_insert_with(|| VerifiedPieces {
                generation: self.generation,
                stamp,
                pieces: HashSet::new(),
            });
        if shared.generation != self.generation || shared.stamp != stamp {
            *shared = VerifiedPieces {
                generation: self.generation,
                stamp,
                pieces: HashSet::new(),
            };
        }
        shared.pieces.extend(pieces);
    }

    /// Drops the blob (if it is still the one this reader opened) and
    /// returns the error to report. A failure to drop is reported instead.
    fn corrupt(&self, piece: u64) -> StoreError {
        let id = &self.record.id;
        if let Err(e) = self
            .shared
            .drop_blob(id, Some(self.generation), false, Removal::Corrupt)
        {
            return e;
        }
        StoreError::Corrupt {
            id: id.clone(),
            piece,
        }
    }
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("id", &self.record.id)
            .field("size", &self.record.size)
            .finish()
    }
}

fn persist_access(
    shared: &Shared,
    id: &BlobId,
    generation: u64,
    ms: u64,
) -> Result<(), StoreError> {
    let _gate = shared.gate_shared();
    if shared.state().entry_mut(id, generation).is_none() {
        return Ok(());
    }
    shared.db.put(
        keys::access(id),
        ms.to_be_bytes().to_vec(),
        Durability::Buffered,
    )?;
    Ok(())
}

fn settled(stamp: &FileStamp) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
    stamp.mtime_ns <= now - SETTLED_NS
}
