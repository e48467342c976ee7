//! `inspect`: a serializable description of an image — superblock, device and blob tables,
//! prefetch table (resolved to paths), tree statistics and, given a blob directory, each blob
//! file's tail sections and TOC.
//!
//! Invariant: inspecting never reads chunk data; a blob file that is missing or malformed is
//! reported in its entry, not as a failure of the whole report.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::blob::source::LocalBlobDir;
use crate::blob::tail::{parse_tail_with, BlobTail};
use crate::bootstrap::{Bootstrap, Summary};
use crate::error::{Error, Result};
use crate::model::{BlobInfo, FileType, RafsVersion};
use crate::tools::{display_path, ChunkBudget};
use crate::v6::{DeviceSlot, SuperInfo};
use crate::walk::walk;

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub summary: Summary,
    pub v6_superblock: Option<SuperInfo>,
    pub devices: Vec<DeviceSlot>,
    pub blobs: Vec<BlobInfo>,
    pub prefetch: Vec<PrefetchEntry>,
    pub stats: TreeStats,
    pub blob_files: Vec<BlobFileReport>,
}

/// One prefetch-table entry and the path it names, when found.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchEntry {
    pub inode: u64,
    pub path: Option<String>,
}

/// Counts over the whole tree.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub char_devices: u64,
    pub block_devices: u64,
    pub fifos: u64,
    pub sockets: u64,
    /// Names beyond the first of hardlinked files.
    pub extra_hardlinks: u64,
    pub entries_with_xattrs: u64,
    pub total_file_bytes: u64,
    pub chunk_refs: u64,
    pub unique_chunks: u64,
}

/// What a blob directory holds for one blob.
#[derive(Debug, Clone, Serialize)]
pub struct BlobFileReport {
    pub blob_id: String,
    pub file_size: Option<u64>,
    pub tail: Option<BlobTail>,
    pub error: Option<String>,
}

/// Describe `b`; with `blobs`, also look at each blob file's tail.
pub fn inspect(b: &Bootstrap, blobs: Option<&LocalBlobDir>) -> Result<InspectReport> {
    if let Some(dir) = blobs {
        // Batched chunks count as one stored chunk each only once placed.
        dir.load_blob_metas(b)?;
    }
    let mut stats = TreeStats::default();
    let mut seen_links = HashSet::new();
    let mut chunks = HashSet::new();
    let mut paths: HashMap<u64, String> = HashMap::new();
    let mut budget = ChunkBudget::new(b);
    walk(b, |e| {
        let key = if b.version() == RafsVersion::V6 {
            e.inode
        } else {
            e.attr.ino
        };
        paths.entry(key).or_insert_with(|| display_path(&e.path));
        match e.attr.file_type {
            FileType::Dir => stats.dirs += 1,
            FileType::Symlink => stats.symlinks += 1,
            FileType::CharDevice => stats.char_devices += 1,
            FileType::BlockDevice => stats.block_devices += 1,
            FileType::Fifo => stats.fifos += 1,
            FileType::Socket => stats.sockets += 1,
            FileType::File => {
                if e.attr.nlink > 1 && !seen_links.insert(e.attr.ino) {
                    stats.extra_hardlinks += 1;
                    return Ok(());
                }
                stats.files += 1;
                stats.total_file_bytes = stats.total_file_bytes.saturating_add(e.attr.size);
                let refs = b.file_chunks(e.inode, 0, u64::MAX)?;
                budget.take(refs.len())?;
                for c in refs {
                    stats.chunk_refs += 1;
                    chunks.insert((c.blob_index, c.compressed_offset, c.digest));
                }
            }
        }
        if !b.xattrs(e.inode)?.is_empty() {
            stats.entries_with_xattrs += 1;
        }
        Ok(())
    })?;
    stats.unique_chunks = chunks.len() as u64;
    let prefetch = b
        .prefetch_table()
        .iter()
        .map(|&inode| PrefetchEntry {
            inode,
            path: paths.get(&inode).cloned(),
        })
        .collect();
    let blob_files = match blobs {
        Some(dir) => b
            .blobs()
            .iter()
            .map(|blob| blob_file_report(dir, blob))
            .collect(),
        None => Vec::new(),
    };
    Ok(InspectReport {
        summary: b.summary(),
        v6_superblock: b.v6_super().cloned(),
        devices: b.devices().to_vec(),
        blobs: b.blobs().to_vec(),
        prefetch,
        stats,
        blob_files,
    })
}

fn blob_file_report(dir: &LocalBlobDir, blob: &BlobInfo) -> BlobFileReport {
    let mut r = BlobFileReport {
        blob_id: blob.blob_id.clone(),
        file_size: None,
        tail: None,
        error: None,
    };
    match read_tail(dir, blob) {
        Ok((size, tail)) => {
            r.file_size = Some(size);
            r.tail = Some(tail);
        }
        Err(e) => r.error = Some(e.to_string()),
    }
    r
}

/// Size and tail of a blob file, reading only its headers.
pub(crate) fn read_tail(dir: &LocalBlobDir, blob: &BlobInfo) -> Result<(u64, BlobTail)> {
    use std::os::unix::fs::FileExt;
    let file = dir.open_blob(blob)?;
    let path = dir.blob_path(blob);
    let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    let tail = parse_tail_with(size, &mut |off, len| {
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        file.read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(&path, e))?;
        Ok(buf)
    })?;
    Ok((size, tail))
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        writeln!(
            f,
            "RAFS {:?} bootstrap, {} bytes",
            s.version, s.bootstrap_size
        )?;
        writeln!(f, "  flags            {:#x}", s.flags)?;
        writeln!(f, "  chunk size       {} KiB", s.chunk_size / 1024)?;
        writeln!(f, "  compressor       {}", s.compressor.name())?;
        writeln!(f, "  digester         {}", s.digester.name())?;
        writeln!(f, "  inodes           {}", s.inode_count)?;
        writeln!(f, "  root inode       {}", s.root)?;
        if let Some(v6) = &self.v6_superblock {
            writeln!(f, "  meta_blkaddr     {}", v6.meta_blkaddr)?;
        }
        let t = &self.stats;
        writeln!(
            f,
            "tree: {} files ({} bytes), {} dirs, {} symlinks, {} hardlink names, {} char, {} block, {} fifo, {} socket, {} with xattrs",
            t.files, t.total_file_bytes, t.dirs, t.symlinks, t.extra_hardlinks, t.char_devices, t.block_devices, t.fifos, t.sockets, t.entries_with_xattrs
        )?;
        writeln!(
            f,
            "chunks: {} references, {} unique",
            t.chunk_refs, t.unique_chunks
        )?;
        writeln!(f, "blobs: {}", self.blobs.len())?;
        for b in &self.blobs {
            writeln!(
                f,
                "  [{}] {}  {} chunks of {} KiB, {}/{}, features {:#x}, {} bytes stored, {} decoded",
                b.index,
                b.blob_id,
                b.chunk_count,
                b.chunk_size / 1024,
                b.compressor.name(),
                b.digester.name(),
                b.features,
                b.compressed_size,
                b.uncompressed_size
            )?;
        }
        for d in &self.devices {
            writeln!(
                f,
                "  device {} blocks {} mapped_blkaddr {}",
                d.tag, d.blocks, d.mapped_blkaddr
            )?;
        }
        if !self.prefetch.is_empty() {
            writeln!(f, "prefetch table: {} entries", self.prefetch.len())?;
            for p in &self.prefetch {
                writeln!(f, "  {} {}", p.inode, p.path.as_deref().unwrap_or("?"))?;
            }
        }
        for bf in &self.blob_files {
            match (&bf.tail, &bf.error) {
                (_, Some(e)) => writeln!(f, "blob file {}: {e}", bf.blob_id)?,
                (Some(tail), None) => {
                    writeln!(
                        f,
                        "blob file {}: {} bytes",
                        bf.blob_id,
                        bf.file_size.unwrap_or(0)
                    )?;
                    for s in &tail.sections {
                        writeln!(
                            f,
                            "  section {:<14} at {} ({} bytes)",
                            s.name, s.offset, s.size
                        )?;
                    }
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
}
