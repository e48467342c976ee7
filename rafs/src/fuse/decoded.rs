//! The decoded-chunk file cache of a FUSE mount (what nydusd calls its blob cache, uncompressed):
//! once a chunk was fetched and verified, its decoded bytes are written into a sparse file per
//! blob at the chunk's uncompressed offset, so a later read of it — after the in-memory cache let
//! it go — is one `pread`, with no decompression and no digest.
//!
//! Invariants:
//! - Only verified chunks are written, and a chunk is read back only under the exact key it was
//!   written with (blob, uncompressed offset, length, digest). A write removes every entry whose
//!   bytes it overlaps first (a bootstrap may place chunks anywhere, even overlapping), so an
//!   entry always describes the bytes its range holds now.
//! - Bounded: at most `max_bytes` are written; beyond that chunks are simply not kept.
//! - The directory is the mount's own (the caller gives a fresh path); it is emptied when the
//!   cache is created and removed when it is dropped. A failing write or read only costs the
//!   cache: the chunk is decoded from its source again.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

/// What a stored chunk is: its length and digest.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    len: u32,
    digest: [u8; 32],
}

#[derive(Default)]
struct State {
    /// Per blob index: the file and its entries by uncompressed offset.
    blobs: HashMap<u32, (File, BTreeMap<u64, Entry>)>,
    bytes: u64,
}

pub(crate) struct DecodedFiles {
    dir: PathBuf,
    max_bytes: u64,
    state: RwLock<State>,
}

impl DecodedFiles {
    /// A cache in `dir` (emptied now, removed on drop) keeping at most `max_bytes`.
    pub(crate) fn new(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            state: RwLock::new(State::default()),
        })
    }

    /// The chunk's decoded bytes, if kept under exactly this key.
    pub(crate) fn get(
        &self,
        blob: u32,
        offset: u64,
        len: u32,
        digest: &[u8; 32],
    ) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.read_part(blob, offset, len, digest, 0, &mut buf)
            .then_some(buf)
    }

    /// Fills `dst` with the chunk's bytes from `within` on, if it is kept under exactly this key.
    pub(crate) fn read_part(
        &self,
        blob: u32,
        offset: u64,
        len: u32,
        digest: &[u8; 32],
        within: u64,
        dst: &mut [u8],
    ) -> bool {
        if within.saturating_add(dst.len() as u64) > u64::from(len) {
            return false;
        }
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let Some((file, entries)) = state.blobs.get(&blob) else {
            return false;
        };
        if entries.get(&offset)
            != Some(&Entry {
                len,
                digest: *digest,
            })
        {
            return false;
        }
        file.read_exact_at(dst, offset + within).is_ok()
    }

    /// Keeps verified `data` as the chunk at `offset` of blob `blob` (best effort).
    pub(crate) fn put(&self, blob: u32, offset: u64, digest: &[u8; 32], data: &[u8]) {
        let Ok(len) = u32::try_from(data.len()) else {
            return;
        };
        let Some(end) = offset.checked_add(u64::from(len)) else {
            return;
        };
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let State { blobs, bytes } = &mut *state;
        if *bytes + u64::from(len) > self.max_bytes {
            return;
        }
        let (file, entries) = match blobs.entry(blob) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(self.dir.join(blob.to_string()));
                match file {
                    Ok(f) => v.insert((f, BTreeMap::new())),
                    Err(_) => return,
                }
            }
        };
        let entry = Entry {
            len,
            digest: *digest,
        };
        if entries.get(&offset) == Some(&entry) {
            return;
        }
        // Whatever this write overlaps no longer describes its bytes.
        let overlapping: Vec<u64> = entries
            .range(..end)
            .rev()
            .take_while(|(&o, e)| o + u64::from(e.len) > offset || o >= offset)
            .filter(|(&o, e)| o + u64::from(e.len) > offset)
            .map(|(&o, _)| o)
            .collect();
        for o in overlapping {
            if let Some(e) = entries.remove(&o) {
                *bytes -= u64::from(e.len);
            }
        }
        if file.write_all_at(data, offset).is_ok() {
            entries.insert(offset, entry);
            *bytes += u64::from(len);
        }
    }
}

impl Drop for DecodedFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kept_chunks_come_back_only_under_their_key_and_overlaps_evict() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("decoded");
        let d = DecodedFiles::new(&dir, 1 << 20).unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        d.put(0, 4096, &a, &[7u8; 100]);
        assert_eq!(d.get(0, 4096, 100, &a), Some(vec![7u8; 100]));
        let mut part = [0u8; 10];
        assert!(d.read_part(0, 4096, 100, &a, 90, &mut part));
        assert_eq!(part, [7u8; 10]);
        assert!(
            !d.read_part(0, 4096, 100, &a, 91, &mut part),
            "past the chunk"
        );
        assert!(
            !d.read_part(0, 4096, 100, &b, 0, &mut part),
            "another digest"
        );
        // Another digest, length, offset or blob: not this entry.
        assert_eq!(d.get(0, 4096, 100, &b), None);
        assert_eq!(d.get(0, 4096, 99, &a), None);
        assert_eq!(d.get(0, 0, 100, &a), None);
        assert_eq!(d.get(1, 4096, 100, &a), None);
        // A chunk written over part of it removes it: its bytes changed.
        d.put(0, 4000, &b, &[9u8; 200]);
        assert_eq!(d.get(0, 4096, 100, &a), None);
        assert_eq!(d.get(0, 4000, 200, &b), Some(vec![9u8; 200]));
        // One that starts inside an entry, too.
        d.put(0, 4100, &a, &[5u8; 10]);
        assert_eq!(d.get(0, 4000, 200, &b), None);
        assert_eq!(d.get(0, 4100, 10, &a), Some(vec![5u8; 10]));
        // Neighbours that do not overlap stay.
        d.put(0, 4110, &b, &[6u8; 10]);
        assert_eq!(d.get(0, 4100, 10, &a), Some(vec![5u8; 10]));
        drop(d);
        assert!(!dir.exists(), "the directory goes with the cache");
    }

    #[test]
    fn the_byte_bound_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DecodedFiles::new(&tmp.path().join("d"), 150).unwrap();
        d.put(0, 0, &[1; 32], &[1u8; 100]);
        d.put(0, 100, &[2; 32], &[2u8; 100]);
        assert!(d.get(0, 0, 100, &[1; 32]).is_some());
        assert!(
            d.get(0, 100, 100, &[2; 32]).is_none(),
            "beyond the bound: not kept"
        );
    }
}
