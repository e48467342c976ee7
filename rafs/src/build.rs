//! The RAFS v6 builder: one OCI layer tar → a data blob and its bootstrap, and merging layer
//! bootstraps into an image bootstrap — both written so that our reader, the stock nydus tools
//! and kernel EROFS accept them.

mod blob_writer;
mod chunk_dict;
mod merge;
mod pipeline;
mod tar_layer;
mod tree;
mod v6_writer;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bootstrap::Bootstrap;
use crate::model::{BlobInfo, Compressor, Digester};

/// How chunks are cut, compressed and digested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    pub compressor: Compressor,
    pub digester: Digester,
    /// Power of two in 4 KiB..=16 MiB.
    pub chunk_size: u32,
}

impl Default for BuildOptions {
    /// nydus-image's defaults: zstd, blake3, 1 MiB chunks.
    fn default() -> Self {
        BuildOptions {
            compressor: Compressor::Zstd,
            digester: Digester::Blake3,
            chunk_size: 1 << 20,
        }
    }
}

/// Everything about a layer build besides the format: a chunk dictionary, the prefetch list,
/// parallelism and progress reporting. `BuildExtras::default()` is a plain build on all cores.
#[derive(Default)]
pub struct BuildExtras<'a> {
    /// A v6 bootstrap whose chunks are referenced instead of stored again.
    pub chunk_dict: Option<&'a Bootstrap>,
    /// Image paths (`/usr/bin/python3`; a directory means everything below it, `/` the whole
    /// image) whose inodes make up the prefetch table, in this order. Paths the layer does not
    /// contain are reported in [`BuildOutput::prefetch_missing`], not an error: one prefetch
    /// list usually serves every layer of an image.
    pub prefetch: Vec<String>,
    /// Threads digesting and compressing chunks; 0 means one per core. The output is the same
    /// bytes for every value.
    pub threads: usize,
    /// Called now and then with the number of input bytes (as given, e.g. gzip) read so far.
    pub progress: Option<&'a dyn Fn(u64)>,
}

/// Why a build or merge failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad layer tar: {0}")]
    Tar(String),
    #[error("tar entry would escape the image root or link outside the layer: {0}")]
    UnsafePath(String),
    #[error("extended attribute {0} cannot be stored in RAFS v6 (only user., trusted., security. and POSIX ACLs)")]
    UnsupportedXattr(String),
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("layer {layer} ({path}) has {what} {found}, the first layer has {expected}; one image needs one value")]
    LayerMismatch {
        layer: usize,
        path: String,
        what: &'static str,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Image(#[from] crate::Error),
    #[error("internal builder invariant violated: {0}")]
    Internal(&'static str),
}

impl BuildError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        BuildError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a layer build wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BuildOutput {
    pub bootstrap: PathBuf,
    /// `sha256:<hex>` of the bootstrap file: what `check --digest` compares against (a RAFS
    /// bootstrap carries no checksum of its own; in a registry its digest is in the manifest).
    pub bootstrap_digest: String,
    pub blob_id: String,
    pub blob: PathBuf,
    pub blob_size: u64,
    pub chunks: u64,
    /// Chunks found again within this layer.
    pub dedup_hits: u64,
    /// Chunks taken from the chunk dictionary.
    pub dict_hits: u64,
    /// Dictionary blobs the layer references (after its own blob in the blob table).
    pub dict_blobs: Vec<String>,
    /// Entries written to the prefetch table.
    pub prefetch: usize,
    /// Prefetch paths the layer does not contain.
    pub prefetch_missing: Vec<String>,
}

/// Build one layer: read the tar (plain, gzip or zstd) from `input`, write `out_dir/bootstrap`
/// and `out_dir/blobs/<blob id>`.
pub fn build_layer(
    input: impl Read,
    opts: &BuildOptions,
    out_dir: &Path,
) -> Result<BuildOutput, BuildError> {
    build_layer_with_dict(input, opts, out_dir, None)
}

/// [`build_layer`], referencing chunks already stored in the blobs of `chunk_dict` (a v6
/// bootstrap, e.g. an earlier image's) instead of storing them again. The output bootstrap then
/// lists those blobs after the layer's own.
pub fn build_layer_with_dict(
    input: impl Read,
    opts: &BuildOptions,
    out_dir: &Path,
    chunk_dict: Option<&Bootstrap>,
) -> Result<BuildOutput, BuildError> {
    let extras = BuildExtras {
        chunk_dict,
        ..BuildExtras::default()
    };
    build_layer_with(input, opts, out_dir, &extras)
}

/// [`build_layer`] with a chunk dictionary, a prefetch list, a thread count and progress.
pub fn build_layer_with(
    input: impl Read,
    opts: &BuildOptions,
    out_dir: &Path,
    extras: &BuildExtras<'_>,
) -> Result<BuildOutput, BuildError> {
    crate::v6::superblock::check_chunk_size("chunk size", opts.chunk_size)?;
    if opts.compressor == Compressor::Gzip {
        return Err(BuildError::Unsupported("gzip chunk compression"));
    }
    let blobs_dir = out_dir.join("blobs");
    std::fs::create_dir_all(&blobs_dir).map_err(|e| BuildError::io("mkdir", &blobs_dir, e))?;
    let tmp = blobs_dir.join(".building");
    let mut writer = blob_writer::BlobWriter::new(&tmp, *opts)?;
    writer.dict = extras
        .chunk_dict
        .map(|d| chunk_dict::ChunkDict::load(d, opts.digester))
        .transpose()?;
    let threads = match extras.threads {
        0 => pipeline::default_threads(),
        n => n,
    };
    let input = Progress {
        inner: input,
        read: 0,
        reported: 0,
        report: extras.progress,
    };
    let (mut tree, pending, refs) = std::thread::scope(|s| {
        let mut pipe = pipeline::Pipeline::start(s, &mut writer, *opts, threads);
        let (tree, pending) = tar_layer::read_layer(input, &mut pipe, opts)?;
        let refs = pipe.finish()?;
        Ok::<_, BuildError>((tree, pending, refs))
    })?;
    place_chunks(&mut tree, &pending, &refs, opts.chunk_size)?;
    drop(refs);
    let (prefetch, prefetch_missing) = tree.resolve_prefetch(&extras.prefetch);
    let dedup_hits = writer.dedup_hits;
    let (dict_blobs, dict_chunks, dict_hits) = match &writer.dict {
        Some(d) => {
            let (b, c) = d.used_blobs();
            (b, c, d.hits)
        }
        None => (Vec::new(), Vec::new(), 0),
    };
    let blob = writer.finish(&blobs_dir)?;
    let info = BlobInfo {
        index: 0,
        blob_id: blob.blob_id.clone(),
        chunk_size: opts.chunk_size,
        chunk_count: blob.chunks.len() as u32,
        compressor: opts.compressor,
        digester: opts.digester,
        features: blob_writer::BLOB_FEATURES,
        compressed_size: blob.file_size,
        uncompressed_size: blob.uncompressed_size,
        meta: Some(blob.meta.clone()),
        toc_size: 0,
        toc_digest: [0; 32],
    };
    let dict_ids = dict_blobs.iter().map(|b| b.blob_id.clone()).collect();
    let blobs: Vec<BlobInfo> = std::iter::once(info).chain(dict_blobs).collect();
    let chunks: Vec<_> = blob.chunks.iter().cloned().chain(dict_chunks).collect();
    let boot = v6_writer::write_bootstrap(&tree, &blobs, &chunks, opts, &prefetch)?;
    let bootstrap = out_dir.join("bootstrap");
    std::fs::write(&bootstrap, &boot).map_err(|e| BuildError::io("write", &bootstrap, e))?;
    Ok(BuildOutput {
        bootstrap,
        bootstrap_digest: sha256_digest(&boot),
        blob_id: blob.blob_id,
        blob: blob.path,
        blob_size: blob.file_size,
        chunks: blob.chunks.len() as u64,
        dedup_hits,
        dict_hits,
        dict_blobs: dict_ids,
        prefetch: prefetch.len(),
        prefetch_missing,
    })
}

/// Give every file its chunk references (sequence numbers → refs, placed at their offsets).
fn place_chunks(
    tree: &mut tree::Tree,
    pending: &[tar_layer::PendingFile],
    refs: &[crate::model::ChunkRef],
    chunk_size: u32,
) -> Result<(), BuildError> {
    for p in pending {
        let Some(tree::Node {
            kind: tree::Kind::File { chunks, .. },
            ..
        }) = tree.inodes.get_mut(p.node)
        else {
            return Err(BuildError::Internal("pending file is not a file"));
        };
        let (first, count) = (p.first as usize, p.count as usize);
        let Some(these) = refs.get(first..first + count) else {
            return Err(BuildError::Internal("chunk sequence out of range"));
        };
        *chunks = these
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let mut c = c.clone();
                c.file_offset = k as u64 * u64::from(chunk_size);
                c
            })
            .collect();
    }
    Ok(())
}

/// Counts input bytes for [`BuildExtras::progress`], reporting every 4 MiB.
struct Progress<'a, R> {
    inner: R,
    read: u64,
    reported: u64,
    report: Option<&'a dyn Fn(u64)>,
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if let Some(f) = self.report {
            if n == 0 || self.read - self.reported >= 4 << 20 {
                self.reported = self.read;
                f(self.read);
            }
        }
        Ok(n)
    }
}

/// What a merge wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MergeOutput {
    pub bootstrap: PathBuf,
    /// `sha256:<hex>` of the merged bootstrap file.
    pub bootstrap_digest: String,
    /// Blob ids in device (`device=`) order.
    pub blobs: Vec<String>,
}

/// Merge layer bootstraps (lowest first) into `output`.
pub fn merge(layers: &[PathBuf], output: &Path) -> Result<MergeOutput, BuildError> {
    let opened = layers
        .iter()
        .map(Bootstrap::open)
        .collect::<Result<Vec<_>, _>>()?;
    let m = merge::merge_layers(&opened).map_err(|e| match e {
        BuildError::LayerMismatch {
            layer,
            what,
            found,
            expected,
            ..
        } => BuildError::LayerMismatch {
            path: layers
                .get(layer)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            layer,
            what,
            found,
            expected,
        },
        e => e,
    })?;
    let boot = v6_writer::write_bootstrap(&m.tree, &m.blobs, &m.chunks, &m.opts, &m.prefetch)?;
    std::fs::write(output, &boot).map_err(|e| BuildError::io("write", output, e))?;
    Ok(MergeOutput {
        bootstrap: output.to_path_buf(),
        bootstrap_digest: sha256_digest(&boot),
        blobs: m.blobs.iter().map(|b| b.blob_id.clone()).collect(),
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}
