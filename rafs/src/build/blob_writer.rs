//! Writes a RAFS v6 data blob: chunks (prepared — digested and compressed — by [`prepare`], on
//! any thread) committed in order and packed back to back, then the
//! compression-info (CI v1) table and its 4 KiB header — the layout nydus-image writes without
//! `--blob-inline-meta`. Chunks with equal digest and size are stored once.
//!
//! Invariants: uncompressed offsets are 4 KiB aligned and increase; a chunk is stored raw when
//! compression does not make it smaller; the blob id is the sha256 of the finished file, which
//! is renamed into place only when complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::build::chunk_dict::ChunkDict;
use crate::build::{BuildError, BuildOptions};
use crate::model::{BlobMetaInfo, ChunkRef, Compressor};

const CI_MAGIC: u32 = 0xB10B_B10B;
/// BlobFeatures written by the builder: ALIGNED | CAP_TAR_TOC (as nydus-image v2.2+).
pub(crate) const BLOB_FEATURES: u32 = 0x4000_0001;

/// A finished data blob.
#[derive(Debug, Clone)]
pub(crate) struct FinishedBlob {
    pub blob_id: String,
    pub path: PathBuf,
    pub file_size: u64,
    pub uncompressed_size: u64,
    pub meta: BlobMetaInfo,
    /// Unique chunks in CI order (`ci_index` = position).
    pub chunks: Vec<ChunkRef>,
}

pub(crate) struct BlobWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    hasher: sha2::Sha256,
    opts: BuildOptions,
    coff: u64,
    uoff: u64,
    dedup: HashMap<([u8; 32], u32), usize>,
    chunks: Vec<ChunkRef>,
    pub(crate) dedup_hits: u64,
    pub(crate) dict: Option<ChunkDict>,
}

impl BlobWriter {
    pub(crate) fn new(tmp: &Path, opts: BuildOptions) -> Result<Self, BuildError> {
        let f = File::create(tmp).map_err(|e| BuildError::io("create", tmp, e))?;
        Ok(BlobWriter {
            out: BufWriter::with_capacity(1 << 20, f),
            tmp: tmp.to_path_buf(),
            hasher: sha2::Sha256::new(),
            opts,
            coff: 0,
            uoff: 0,
            dedup: HashMap::new(),
            chunks: Vec::new(),
            dedup_hits: 0,
            dict: None,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), BuildError> {
        self.hasher.update(data);
        self.out
            .write_all(data)
            .map_err(|e| BuildError::io("write", &self.tmp, e))
    }

    /// Store one prepared chunk (or find it stored) and return its reference, with file offset
    /// 0 (the caller places it in its file). Chunks must be committed in input order for the
    /// blob to be deterministic.
    pub(crate) fn commit(&mut self, p: &Prepared) -> Result<ChunkRef, BuildError> {
        let usize_ = p.len;
        let digest = p.digest;
        if let Some(&i) = self.dedup.get(&(digest, usize_)) {
            self.dedup_hits += 1;
            return self
                .chunks
                .get(i)
                .cloned()
                .ok_or(BuildError::Internal("dedup index"));
        }
        if let Some(c) = self.dict.as_mut().and_then(|d| d.lookup(digest, usize_, 0)) {
            return Ok(c);
        }
        let (stored, is_compressed) = match &p.compressed {
            Some(c) if c.len() < usize_ as usize => (c.as_slice(), true),
            _ => (p.data.as_slice(), false),
        };
        let c = ChunkRef {
            blob_index: 0,
            ci_index: self.chunks.len() as u32,
            digest,
            compressed: is_compressed,
            compressed_offset: self.coff,
            compressed_size: stored.len() as u32,
            uncompressed_offset: self.uoff,
            uncompressed_size: usize_,
            file_offset: 0,
            batch: None,
        };
        self.write(stored)?;
        self.coff += stored.len() as u64;
        self.uoff = (self.uoff + u64::from(usize_)).div_ceil(4096) * 4096;
        self.dedup.insert((digest, usize_), self.chunks.len());
        self.chunks.push(c.clone());
        Ok(c)
    }

    /// Append the CI table and header, and move the blob to `blobs_dir/<sha256>`.
    pub(crate) fn finish(mut self, blobs_dir: &Path) -> Result<FinishedBlob, BuildError> {
        let mut ci = Vec::with_capacity(self.chunks.len() * 16);
        for c in &self.chunks {
            let u1 = u64::from(c.uncompressed_size - 1);
            let c1 = u64::from(c.compressed_size - 1);
            let uncomp = (c.uncompressed_offset & 0xfff_ffff_f000)
                | ((u1 & 0xf_ffff) << 44)
                | (((u1 >> 20) & 0xf) << 8);
            let comp = (c.compressed_offset & 0xff_ffff_ffff)
                | ((c1 & 0xf_ffff) << 44)
                | (((c1 >> 20) & 0xf) << 40);
            ci.extend_from_slice(&uncomp.to_le_bytes());
            ci.extend_from_slice(&comp.to_le_bytes());
        }
        let (ci_comp, ci_stored) = match compress(self.opts.compressor, &ci)? {
            Some(z) if z.len() < ci.len() => (self.opts.compressor, z),
            _ => (Compressor::None, ci.clone()),
        };
        let meta = BlobMetaInfo {
            compressor: ci_comp,
            offset: self.coff,
            compressed_size: ci_stored.len() as u64,
            uncompressed_size: ci.len() as u64,
        };
        let mut h = vec![0u8; 4096];
        put(&mut h, 0, &CI_MAGIC.to_le_bytes());
        put(&mut h, 4, &BLOB_FEATURES.to_le_bytes());
        put(&mut h, 8, &compressor_enum(ci_comp).to_le_bytes());
        put(&mut h, 12, &(self.chunks.len() as u32).to_le_bytes());
        put(&mut h, 16, &meta.offset.to_le_bytes());
        put(&mut h, 24, &meta.compressed_size.to_le_bytes());
        put(&mut h, 32, &meta.uncompressed_size.to_le_bytes());
        put(&mut h, 4092, &CI_MAGIC.to_le_bytes());
        self.write(&ci_stored)?;
        self.write(&h)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| BuildError::io("write", &self.tmp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| BuildError::io("sync", &self.tmp, e))?;
        let blob_id = hex::encode(self.hasher.finalize());
        let path = blobs_dir.join(&blob_id);
        std::fs::rename(&self.tmp, &path).map_err(|e| BuildError::io("rename", &path, e))?;
        Ok(FinishedBlob {
            blob_id,
            path,
            file_size: self.coff + ci_stored.len() as u64 + 4096,
            uncompressed_size: self.uoff,
            meta,
            chunks: self.chunks,
        })
    }
}

/// A chunk digested and compressed, ready for [`BlobWriter::commit`]. Preparing is the costly,
/// order-independent part of a build, so it runs on worker threads.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// The uncompressed bytes (kept: stored raw when compression does not help; may be empty
    /// when `compressed` is smaller, as the raw bytes are then never needed).
    pub data: Vec<u8>,
    pub len: u32,
    pub digest: [u8; 32],
    pub compressed: Option<Vec<u8>>,
}

/// Digest and compress one chunk.
pub(crate) fn prepare(opts: &BuildOptions, data: Vec<u8>) -> Result<Prepared, BuildError> {
    let digest = opts.digester.digest(&data);
    let len = u32::try_from(data.len()).map_err(|_| BuildError::Internal("chunk size"))?;
    let compressed = compress(opts.compressor, &data)?.filter(|c| c.len() < data.len());
    let data = if compressed.is_some() {
        Vec::new()
    } else {
        data
    };
    Ok(Prepared {
        data,
        len,
        digest,
        compressed,
    })
}

pub(crate) fn compressor_enum(c: Compressor) -> u32 {
    match c {
        Compressor::None => 0,
        Compressor::Lz4Block => 1,
        Compressor::Gzip => 2,
        Compressor::Zstd => 3,
    }
}

fn compress(c: Compressor, data: &[u8]) -> Result<Option<Vec<u8>>, BuildError> {
    Ok(match c {
        Compressor::None => None,
        Compressor::Zstd => {
            Some(zstd_compress(data).map_err(|e| BuildError::io("zstd", Path::new(""), e))?)
        }
        Compressor::Lz4Block => Some(lz4_flex::block::compress(data)),
        Compressor::Gzip => return Err(BuildError::Unsupported("gzip chunk compression")),
    })
}

/// zstd level 3 with one compression context per thread: creating a context costs more than
/// compressing a small chunk (it allocates and clears its tables).
fn zstd_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(3)?);
        }
        match c.as_mut() {
            Some(c) => c.compress(data),
            None => zstd::bulk::compress(data, 3),
        }
    })
}

pub(crate) fn put(buf: &mut [u8], at: usize, v: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + v.len()) {
        dst.copy_from_slice(v);
    }
}
