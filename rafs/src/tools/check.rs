//! `check`: verify an image's structure and, given a blob directory, every chunk's digest and each
//! blob's tail (TOC digest, CI table against the bootstrap's chunk table).
//!
//! Invariant: `check` never stops at the first problem and never fails as a whole — anything
//! wrong, including a bootstrap that does not open, becomes a [`Problem`] in the report.

use std::collections::HashSet;
use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::blob::meta::{decode_blob_meta, CI_HEADER_SIZE};
use crate::blob::source::{ChunkSource, LocalBlobDir};
use crate::bootstrap::Bootstrap;
use crate::error::{Error, Result};
use crate::model::{BlobInfo, ChunkRef, FileType, RafsVersion};
use crate::tools::inspect::read_tail;
use crate::tools::{display_path, ChunkBudget};
use crate::walk::{walk_tolerant, Visit};

/// Cap on problems recorded; beyond it only the count grows.
const MAX_PROBLEMS: usize = 1000;

/// One thing found wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Image path concerned, when there is one.
    pub path: Option<String>,
    /// Blob concerned, when there is one.
    pub blob_id: Option<String>,
    pub message: String,
}

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub version: Option<RafsVersion>,
    pub entries: u64,
    pub chunks_verified: u64,
    pub blobs_checked: u64,
    /// Number of problems (may exceed `problems.len()`, which is capped).
    pub problem_count: u64,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problem_count == 0
    }

    fn add(&mut self, path: Option<String>, blob_id: Option<String>, err: impl fmt::Display) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem {
                path,
                blob_id,
                message: err.to_string(),
            });
        }
    }
}

/// Open the bootstrap at `path` and check it (an open failure is reported as a problem). When
/// `path` is a data blob carrying the bootstrap, that blob's chunks are verified too.
pub fn check_path(path: &Path, blobs: Option<&LocalBlobDir>) -> CheckReport {
    match Bootstrap::open(path) {
        Ok(b) if b.inlined_in().is_some() => {
            let dirs = blobs.map(|d| d.dirs().to_vec()).unwrap_or_default();
            check(&b, crate::tools::blob_source(&b, path, dirs).as_ref())
        }
        Ok(b) => check(&b, blobs),
        Err(e) => {
            let mut r = CheckReport::default();
            r.add(None, None, e);
            r
        }
    }
}

/// [`check_path`], and when `expected` (`sha256:<hex>`, from an image manifest or from what
/// `build`/`merge` printed) is given, the file must hash to it. A bootstrap has no checksum of
/// its own, so this is the only way to notice a flip in a field where any value is valid (an
/// mtime, padding): with it, a flipped byte anywhere in the bootstrap is reported.
pub fn check_path_with_digest(
    path: &Path,
    expected: Option<&str>,
    blobs: Option<&LocalBlobDir>,
) -> CheckReport {
    let mut r = check_path(path, blobs);
    let Some(expected) = expected else { return r };
    match std::fs::read(path) {
        Ok(bytes) => {
            let got = crate::build::sha256_digest(&bytes);
            if got != expected.trim() {
                r.add(
                    None,
                    None,
                    format!("bootstrap digest is {got}, expected {}", expected.trim()),
                );
            }
        }
        Err(e) => r.add(None, None, format!("reading {}: {e}", path.display())),
    }
    r
}

/// Check `b`; with `blobs`, also verify every chunk and each blob's tail.
pub fn check(b: &Bootstrap, blobs: Option<&LocalBlobDir>) -> CheckReport {
    let mut r = CheckReport {
        version: Some(b.version()),
        ..CheckReport::default()
    };
    if let Some(dir) = blobs {
        // Batch blobs: their chunks are placed by the blob's CI table.
        for blob in b.blobs_needing_meta() {
            if let Err(e) = dir.load_blob_meta(b, blob) {
                r.add(None, Some(blob.blob_id.clone()), e);
            }
        }
    }
    check_tables(b, &mut r);
    let mut entries = 0u64;
    let mut problems = Vec::new();
    let mut budget = ChunkBudget::new(b);
    let mut files_seen = HashSet::new();
    walk_tolerant(b, |v| {
        match v {
            Visit::Entry(e) => {
                entries += 1;
                let first_sight = files_seen.insert(e.inode);
                if let Err(err) = check_entry(b, e.inode, &e.attr, first_sight, &mut budget) {
                    let stop = matches!(err, Error::LimitExceeded { .. });
                    problems.push((display_path(&e.path), err));
                    return !stop;
                }
            }
            Visit::Error { path, error } => problems.push((display_path(path), error)),
        }
        true
    });
    r.entries = entries;
    for (path, err) in problems {
        r.add(Some(path), None, err);
    }
    if let Some(dir) = blobs {
        for blob in b.blobs() {
            check_blob(b, dir, blob, &mut r);
        }
    }
    r
}

fn check_entry(
    b: &Bootstrap,
    inode: u64,
    attr: &crate::Attr,
    first_sight: bool,
    budget: &mut ChunkBudget,
) -> Result<()> {
    b.xattrs(inode)?;
    match attr.file_type {
        FileType::Symlink if b.readlink(inode)?.is_empty() => {
            return Err(Error::BadInode {
                ino: inode,
                reason: "empty symlink target",
            });
        }
        FileType::File if first_sight => {
            let chunks = b.file_chunks(inode, 0, u64::MAX)?;
            budget.take(chunks.len())?;
            check_coverage(inode, attr.size, &chunks)?;
        }
        _ => {}
    }
    Ok(())
}

/// Chunks must tile the file from offset 0 without overlap (v6 never has holes).
fn check_coverage(inode: u64, size: u64, chunks: &[ChunkRef]) -> Result<()> {
    let mut next = 0u64;
    for c in chunks {
        if c.file_offset < next {
            return Err(Error::BadInode {
                ino: inode,
                reason: "overlapping chunks",
            });
        }
        next = c.file_offset.saturating_add(u64::from(c.uncompressed_size));
    }
    if next != size && !chunks.is_empty() {
        return Err(Error::BadInode {
            ino: inode,
            reason: "chunks do not cover the file size",
        });
    }
    Ok(())
}

fn check_tables(b: &Bootstrap, r: &mut CheckReport) {
    if b.version() == RafsVersion::V6 {
        let devices = b.devices();
        if devices.len() != b.blobs().len() {
            r.add(
                None,
                None,
                format!(
                    "device table has {} slots for {} blobs",
                    devices.len(),
                    b.blobs().len()
                ),
            );
        }
        for (d, blob) in devices.iter().zip(b.blobs()) {
            if d.tag != blob.blob_id {
                r.add(
                    None,
                    Some(blob.blob_id.clone()),
                    format!("device slot tag {} differs from the blob id", d.tag),
                );
            }
        }
    }
    for blob in b.blobs() {
        let id = Some(blob.blob_id.clone());
        let chunks = match b.blob_chunks(blob.index) {
            Ok(c) => c,
            Err(e) => {
                r.add(None, id, e);
                continue;
            }
        };
        let data_end = blob
            .meta
            .as_ref()
            .map_or(blob.compressed_size, |m| m.offset);
        let aligned = b.version() == RafsVersion::V6;
        for c in &chunks {
            let problem = if aligned && c.uncompressed_offset % 4096 != 0 {
                Some("uncompressed offset not 4 KiB aligned")
            } else if blob.uncompressed_size != 0
                && c.uncompressed_offset
                    .saturating_add(u64::from(c.uncompressed_size))
                    > blob.uncompressed_size
            {
                Some("chunk lies past the decoded blob size")
            } else if data_end != 0
                && c.compressed_offset
                    .saturating_add(u64::from(c.compressed_size))
                    > data_end
            {
                Some("chunk lies past the blob's data")
            } else if !c.compressed
                && c.is_located()
                && c.compressed_size != c.batch.map_or(c.uncompressed_size, |b| b.uncompressed_size)
            {
                Some("uncompressed chunk with differing sizes")
            } else {
                None
            };
            if let Some(p) = problem {
                r.add(None, id.clone(), format!("chunk {}: {p}", c.ci_index));
            }
        }
    }
}

fn check_blob(b: &Bootstrap, dir: &LocalBlobDir, blob: &BlobInfo, r: &mut CheckReport) {
    let id = Some(blob.blob_id.clone());
    r.blobs_checked += 1;
    if let Err(e) = dir.open_blob(blob) {
        return r.add(None, id, e);
    }
    let chunks = match b.blob_chunks(blob.index) {
        Ok(c) => c,
        Err(e) => return r.add(None, id, e),
    };
    if b.version() == RafsVersion::V6 {
        if let Err(e) = check_blob_tail(dir, blob, &chunks) {
            r.add(None, id.clone(), e);
        }
    }
    for c in &chunks {
        match dir.read_chunk(blob, c) {
            Ok(_) => r.chunks_verified += 1,
            Err(e @ Error::BlobMissing { .. }) => return r.add(None, id, e),
            Err(e) => r.add(None, id.clone(), e),
        }
    }
}

/// TOC digest and the CI table against the bootstrap's chunk table.
fn check_blob_tail(dir: &LocalBlobDir, blob: &BlobInfo, chunks: &[ChunkRef]) -> Result<()> {
    let (size, tail) = read_tail(dir, blob)?;
    let file = dir.open_blob(blob)?;
    let path = dir.blob_path(blob);
    let read = |off: u64, len: u64| -> Result<Vec<u8>> {
        if off.checked_add(len).is_none_or(|end| end > size) || len > 1 << 30 {
            return Err(Error::OutOfBounds {
                what: "blob section",
                offset: off,
                len,
                limit: size,
            });
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(&path, e))?;
        Ok(buf)
    };
    if blob.toc_size != 0 {
        let toc_size = u64::from(blob.toc_size);
        let toc = read(size.saturating_sub(toc_size), toc_size)?;
        let digest: [u8; 32] = {
            use sha2::Digest as _;
            sha2::Sha256::digest(&toc).into()
        };
        if digest != blob.toc_digest {
            return Err(Error::invalid(
                "blob TOC digest",
                toc_size,
                "sha256 of the TOC differs from the blob table",
            ));
        }
    }
    if let Some(d) = tail.sections.iter().find(|s| s.name == "blob.digest") {
        // INLINED_CHUNK_DIGEST: 32 bytes per chunk, in CI order.
        if d.size != 32 * u64::from(blob.chunk_count) {
            return Err(Error::invalid(
                "blob.digest size",
                d.size,
                "not 32 bytes per chunk",
            ));
        }
        let digests = read(d.offset, d.size)?;
        for c in chunks {
            let at = u64::from(c.ci_index) * 32;
            if digests.get(at as usize..at as usize + 32) != Some(&c.digest[..]) {
                return Err(Error::invalid(
                    "blob.digest entry",
                    c.ci_index.into(),
                    "differs from the bootstrap's chunk digest",
                ));
            }
        }
    }
    let Some(meta) = &blob.meta else {
        return Ok(());
    };
    let region = read(
        meta.offset,
        meta.compressed_size.saturating_add(CI_HEADER_SIZE),
    )?;
    let meta = decode_blob_meta(blob, &region)?;
    let (header, entries) = (meta.header, meta.entries);
    if header.ci_entries != blob.chunk_count || entries.len() != blob.chunk_count as usize {
        return Err(Error::invalid(
            "CI entries",
            header.ci_entries.into(),
            "differs from the blob's chunk count",
        ));
    }
    for c in chunks {
        let matches = entries
            .get(c.ci_index as usize)
            .is_some_and(|e| same_location(c, e));
        if !matches {
            return Err(Error::invalid(
                "CI entry",
                c.ci_index.into(),
                "differs from the bootstrap's chunk table",
            ));
        }
    }
    Ok(())
}

/// Whether a chunk-table entry and the CI entry at its index describe the same bytes.
fn same_location(c: &ChunkRef, e: &crate::CiEntry) -> bool {
    c.compressed_offset == e.compressed_offset
        && c.compressed_size == e.compressed_size
        && c.uncompressed_offset == e.uncompressed_offset
        && c.uncompressed_size == e.uncompressed_size
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            let what = match (&p.path, &p.blob_id) {
                (Some(path), _) => path.clone(),
                (None, Some(blob)) => format!("blob {blob}"),
                (None, None) => "bootstrap".to_string(),
            };
            writeln!(f, "PROBLEM {what}: {}", p.message)?;
        }
        if self.problem_count as usize > self.problems.len() {
            writeln!(
                f,
                "... and {} more problems",
                self.problem_count as usize - self.problems.len()
            )?;
        }
        writeln!(
            f,
            "{} entries, {} blobs, {} chunks verified: {}",
            self.entries,
            self.blobs_checked,
            self.chunks_verified,
            if self.is_ok() {
                "OK".to_string()
            } else {
                format!("{} problems", self.problem_count)
            }
        )
    }
}
