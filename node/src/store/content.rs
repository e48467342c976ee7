//! Content files: one file per blob at `blobs/<alg>/<hex>` under the data
//! directory, sparse until complete.
//!
//! Invariant: a content path is only ever built from a validated `BlobId`
//! (whose algorithm name and lowercase hex cannot contain `/` or `..`), so no
//! outside input can address a file elsewhere. Files are created at their
//! full size (`set_len`, sparse), and the directory entry is synced on create
//! so that a committed blob survives a crash with its file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use shoal_proto::{BlobId, Digest, DigestAlgorithm};

use super::error::StoreError;

const ALGORITHMS: [DigestAlgorithm; 2] = [DigestAlgorithm::Sha256, DigestAlgorithm::Sha512];

/// The `blobs/` tree of a data directory.
#[derive(Debug, Clone)]
pub struct ContentDir {
    root: PathBuf,
}

/// A file found under `blobs/` by `list`.
#[derive(Debug)]
pub struct FoundFile {
    pub path: PathBuf,
    /// The blob it belongs to, or None if the name is not a digest.
    pub id: Option<BlobId>,
}

/// What identifies one version of a content file: any write to it (ours or
/// anyone's) changes `mtime_ns`/`ctime_ns`, replacing it changes `ino`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
}

impl ContentDir {
    /// Uses (creating if needed) `<dir>/blobs/<alg>/`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let root = dir.join("blobs");
        for alg in ALGORITHMS {
            let d = root.join(alg.name());
            fs::create_dir_all(&d).map_err(StoreError::io(&d))?;
        }
        Ok(Self { root })
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.root.join(id.algorithm().name()).join(id.hex())
    }

    /// Creates `id`'s file as `size` zero bytes (sparse), replacing whatever
    /// was there, and makes its directory entry durable.
    pub fn create(&self, id: &BlobId, size: u64) -> Result<File, StoreError> {
        let path = self.path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        file.set_len(size).map_err(StoreError::io(&path))?;
        file.sync_all().map_err(StoreError::io(&path))?;
        let dir = self.root.join(id.algorithm().name());
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::io(&dir))?;
        Ok(file)
    }

    /// Opens `id`'s file for reading and writing; None if it does not exist.
    pub fn open_rw(&self, id: &BlobId) -> Result<Option<File>, StoreError> {
        self.open_with(id, OpenOptions::new().read(true).write(true))
    }

    /// Opens `id`'s file for reading; None if it does not exist.
    pub fn open_ro(&self, id: &BlobId) -> Result<Option<File>, StoreError> {
        self.open_with(id, OpenOptions::new().read(true))
    }

    /// Deletes `id`'s file; a missing file is not an error.
    pub fn remove(&self, id: &BlobId) -> Result<(), StoreError> {
        remove_path(&self.path(id))
    }

    /// Every file under `blobs/<alg>/`.
    pub fn list(&self) -> Result<Vec<FoundFile>, StoreError> {
        let mut found = Vec::new();
        for alg in ALGORITHMS {
            let dir = self.root.join(alg.name());
            for entry in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
                let entry = entry.map_err(StoreError::io(&dir))?;
                let name = entry.file_name();
                let id = name
                    .to_str()
                    .and_then(|hex| format!("{}:{hex}", alg.name()).parse::<Digest>().ok());
                found.push(FoundFile {
                    path: entry.path(),
                    id,
                });
            }
        }
        Ok(found)
    }

    fn open_with(&self, id: &BlobId, opts: &OpenOptions) -> Result<Option<File>, StoreError> {
        let path = self.path(id);
        match opts.open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }
}

/// Deletes a file or (for junk under `blobs/`) a directory tree; missing is fine.
pub fn remove_path(path: &Path) -> Result<(), StoreError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

impl FileStamp {
    pub fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            ino: m.ino(),
        })
    }
}

/// `pread` until `buf` is full or EOF; returns the bytes read.
pub fn read_full_at(file: &File, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// SHA-256 of bytes `range` of `file`, read in bounded chunks. A file too
/// short to hold the range is an `UnexpectedEof` error.
pub fn sha256_of_range(file: &File, range: std::ops::Range<u64>) -> io::Result<[u8; 32]> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut chunk = vec![0u8; chunk_len(range.end - range.start)];
    let mut pos = range.start;
    while pos < range.end {
        let n = chunk
            .len()
            .min(usize::try_from(range.end - pos).unwrap_or(usize::MAX));
        if read_full_at(file, pos, &mut chunk[..n])? < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&chunk[..n]);
        pos += n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Size of the scratch buffer for hashing `len` bytes: at most 1 MiB.
pub fn chunk_len(len: u64) -> usize {
    usize::try_from(len.min(1 << 20)).unwrap_or(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_sparse_and_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = ContentDir::open(dir.path()).expect("open");
        let id = Digest::sha256(b"blob");
        let file = content.create(&id, 1 << 30).expect("create");
        assert_eq!(file.metadata().expect("meta").len(), 1 << 30);
        // Sparse: a 1 GiB file of zeros takes (almost) no blocks.
        assert!(file.metadata().expect("meta").blocks() < 1024);
        file.write_all_at(b"abc", 10).expect("write");
        let mut buf = [0u8; 5];
        assert_eq!(read_full_at(&file, 9, &mut buf).expect("read"), 5);
        assert_eq!(&buf, b"\0abc\0");
        assert!(content
            .path(&id)
            .ends_with(format!("blobs/sha256/{}", id.hex())));
        fs::write(content.root.join("sha256/junk"), b"x").expect("junk");
        let mut ids: Vec<_> = content
            .list()
            .expect("list")
            .into_iter()
            .map(|f| f.id)
            .collect();
        ids.sort();
        assert_eq!(ids, vec![None, Some(id.clone())]);
        content.remove(&id).expect("remove");
        content.remove(&id).expect("remove twice");
        assert!(content.open_ro(&id).expect("open").is_none());
    }
}
