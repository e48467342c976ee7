//! One mount's own chunk cache: verified chunks the shared store must not keep — those a peer
//! sent (checked only against this image's bootstrap, which whoever pushed the image wrote) and
//! those of blobs the node may not read in the image's repository — kept so that a prefetch, or
//! a second read, does not fetch them again.
//!
//! Invariants: one directory per mount (`<data dir>/mount-chunks/<key>-<n>`), one sparse file per
//! blob index, written only with chunks that verified against this mount's bootstrap and read
//! only by this mount (which verifies them again). Nothing here is ever served to anyone else or
//! moved into the store; the directory is removed with the mount, and the whole parent at node
//! start (what a crash left). Its size is bounded by the image's blobs.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::store::RangeSet;

/// The directory under the data dir holding every mount's private cache.
pub const DIR: &str = "mount-chunks";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Remove what earlier runs left (at node start, before any mount).
pub fn clear(data_dir: &Path) {
    let _ = std::fs::remove_dir_all(data_dir.join(DIR));
}

/// The cache of one mount.
#[derive(Debug)]
pub struct PrivateChunks {
    dir: PathBuf,
    blobs: Mutex<HashMap<u32, (Arc<File>, RangeSet)>>,
}

impl PrivateChunks {
    /// A cache for the mount of image `key` (created on first write).
    pub fn new(data_dir: &Path, key: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let short: String = key
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        Self {
            dir: data_dir
                .join(DIR)
                .join(format!("{short}-{}-{n}", std::process::id())),
            blobs: Mutex::new(HashMap::new()),
        }
    }

    /// Keep `chunks` (compressed offset, stored bytes) of blob `blob`.
    pub fn write(&self, blob: u32, chunks: &[(u64, Arc<Vec<u8>>)]) -> std::io::Result<()> {
        let file = {
            let mut blobs = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
            match blobs.get(&blob) {
                Some((f, _)) => f.clone(),
                None => {
                    std::fs::create_dir_all(&self.dir)?;
                    let f = Arc::new(
                        std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(true)
                            .read(true)
                            .write(true)
                            .open(self.dir.join(blob.to_string()))?,
                    );
                    blobs.insert(blob, (f.clone(), RangeSet::new()));
                    f
                }
            }
        };
        for (off, bytes) in chunks {
            file.write_all_at(bytes, *off)?;
        }
        let mut blobs = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, present)) = blobs.get_mut(&blob) {
            for (off, bytes) in chunks {
                present.insert(*off..*off + bytes.len() as u64);
            }
        }
        Ok(())
    }

    /// Whether `range` of blob `blob` is kept.
    pub fn holds(&self, blob: u32, range: &Range<u64>) -> bool {
        let blobs = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
        blobs
            .get(&blob)
            .is_some_and(|(_, present)| present.contains_range(range))
    }

    /// `range` of blob `blob`, if kept.
    pub fn read(&self, blob: u32, range: &Range<u64>) -> Option<Vec<u8>> {
        let file = {
            let blobs = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
            let (f, present) = blobs.get(&blob)?;
            if !present.contains_range(range) {
                return None;
            }
            f.clone()
        };
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        file.read_exact_at(&mut buf, range.start).ok()?;
        Some(buf)
    }
}

impl Drop for PrivateChunks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kept_chunks_read_back_and_go_with_the_mount() {
        let data = tempfile::tempdir().unwrap();
        let c = PrivateChunks::new(data.path(), "sha256:0123456789abcdef0123");
        assert!(c.read(0, &(0..4)).is_none());
        c.write(
            0,
            &[
                (10, Arc::new(b"abcd".to_vec())),
                (100, Arc::new(b"xy".to_vec())),
            ],
        )
        .unwrap();
        assert_eq!(c.read(0, &(10..14)).unwrap(), b"abcd");
        assert_eq!(c.read(0, &(11..13)).unwrap(), b"bc");
        assert!(c.read(0, &(10..15)).is_none());
        assert!(c.read(1, &(10..14)).is_none());
        assert!(c.holds(0, &(100..102)));
        let dir = c.dir.clone();
        assert!(dir.exists());
        drop(c);
        assert!(!dir.exists());
    }
}
