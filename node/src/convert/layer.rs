//! One source layer → one RAFS data blob + layer bootstrap, cached in the work directory so a
//! rerun after a failure redoes only what is missing.
//!
//! Work directory layout: `downloads/<hex>` (a verified source layer; `<hex>.part` while it
//! arrives, resumed with a `Range` request), `layers/<key>/` (a finished build: `bootstrap`,
//! `blobs/<blob id>`, `done.json`), where `<key>` hashes the source layer digest with every
//! option that changes the output (compressor, digester, chunk size, chunk dictionary,
//! prefetch list, shoal version).
//!
//! Invariants: `layers/<key>/` exists only complete — it is built in `<key>.tmp<pid>/` and
//! renamed into place, `done.json` included — and a cached entry is used only when its blob file
//! has the recorded size. A source layer is verified against its digest before the builder reads
//! it. Two runs sharing a work dir never corrupt a finished build, but may both download the
//! same layer into one `.part` file (which then fails its digest check): give concurrent runs
//! their own `--work-dir`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_proto::{Digest, RepoName};
use shoal_rafs::build::{self, BuildExtras, BuildOptions};
use shoal_rafs::Bootstrap;

use futures::future::BoxFuture;

use super::progress::{Progress, Stage};
use super::registry::Registry;
use super::ConvertError;

/// What every layer of one conversion is built with.
#[derive(Debug)]
pub struct LayerOptions {
    pub build: BuildOptions,
    pub prefetch: Vec<String>,
    /// The chunk dictionary and its bootstrap layer's digest (part of the cache key).
    pub dict: Option<(Arc<Bootstrap>, Digest)>,
    /// Builder threads per layer.
    pub threads: usize,
    pub work_dir: PathBuf,
    /// Where source layers are read from (`None`: downloaded into the work directory).
    pub source: Option<Arc<dyn LayerSource>>,
}

/// A layer's bytes, and where they came from.
pub type LayerInput = (Box<dyn std::io::Read + Send>, ReadFrom);

/// A source of verified layer bytes other than a download into the work directory: the node's
/// store, which holds what the cluster pulled already and fetches the rest through its
/// download path (peers, then the origin), verifying every piece.
pub trait LayerSource: Send + Sync + std::fmt::Debug {
    /// The bytes of layer `digest` (`size` bytes) of `repo`, and whether they were held
    /// already.
    fn open<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, Result<LayerInput, ConvertError>>;
}

/// Where a layer's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The layer source held them before the conversion asked.
    Store,
    /// Fetched for the conversion.
    Fetched,
}

/// A converted layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Converted {
    /// The data blob's digest (`sha256:` + blob id).
    pub blob: Digest,
    pub blob_size: u64,
    pub chunks: u64,
    pub dedup_hits: u64,
    pub dict_hits: u64,
    /// Dictionary blob ids this layer's bootstrap references.
    pub dict_blobs: Vec<String>,
    /// The source layer's size, and where its bytes came from (`None`: a cached build).
    #[serde(skip)]
    pub source_size: u64,
    #[serde(skip)]
    pub read_from: Option<ReadFrom>,
    #[serde(skip)]
    pub dir: PathBuf,
    #[serde(skip)]
    pub cached: bool,
}

impl Converted {
    pub fn bootstrap(&self) -> PathBuf {
        self.dir.join("bootstrap")
    }

    pub fn blob_path(&self) -> PathBuf {
        self.dir.join("blobs").join(self.blob.hex())
    }
}

/// The cache key of `layer` built with `opts`.
pub fn cache_key(layer: &Digest, opts: &LayerOptions) -> String {
    let b = &opts.build;
    let dict = opts.dict.as_ref().map(|(_, d)| d.to_string());
    let text = format!(
        "shoal-convert {}\n{layer}\n{}\n{}\n{}\n{}\n{}",
        env!("CARGO_PKG_VERSION"),
        b.compressor.name(),
        b.digester.name(),
        b.chunk_size,
        dict.as_deref().unwrap_or("-"),
        opts.prefetch.join("\n"),
    );
    Digest::sha256(text.as_bytes()).hex()
}

/// Convert source layer `layer` (`index` in the progress display) of `repo` on `src`.
pub async fn convert(
    src: &Registry,
    repo: &RepoName,
    layer: &Digest,
    size: u64,
    index: usize,
    opts: &Arc<LayerOptions>,
    progress: &Progress,
) -> Result<Converted, ConvertError> {
    let key = cache_key(layer, opts);
    let dir = opts.work_dir.join("layers").join(&key);
    if let Some(c) = cached(&dir) {
        return Ok(c);
    }
    if let Some(source) = &opts.source {
        progress.bytes(index, Stage::Fetching, 0, size);
        let (input, from) = source.open(repo, layer, size).await?;
        progress.bytes(index, Stage::Building, 0, size);
        let (o, p, d, l) = (opts.clone(), progress.clone(), dir.clone(), layer.clone());
        let mut converted =
            tokio::task::spawn_blocking(move || build_into(input, &l, &d, &o, &p, index, size))
                .await
                .map_err(|e| ConvertError::Internal(format!("layer build task: {e}")))??;
        converted.source_size = size;
        converted.read_from = Some(from);
        return Ok(converted);
    }
    let downloads = opts.work_dir.join("downloads");
    mkdir(&downloads)?;
    let tar = downloads.join(layer.hex());
    if !tar.is_file() {
        progress.bytes(index, Stage::Fetching, 0, size);
        let p = progress.clone();
        src.fetch_blob(repo, layer, &tar, &move |n| {
            p.bytes(index, Stage::Fetching, n, size)
        })
        .await?;
    }
    progress.bytes(index, Stage::Building, 0, size);
    let o = opts.clone();
    let p = progress.clone();
    let (d, t, l) = (dir.clone(), tar.clone(), layer.clone());
    let converted = tokio::task::spawn_blocking(move || {
        let input = std::fs::File::open(&t).map_err(|source| ConvertError::Io {
            op: "open",
            path: t.clone(),
            source,
        })?;
        build_into(Box::new(input), &l, &d, &o, &p, index, size)
    })
    .await
    .map_err(|e| ConvertError::Internal(format!("layer build task: {e}")))??;
    let _ = std::fs::remove_file(&tar);
    Ok(converted)
}

fn cached(dir: &Path) -> Option<Converted> {
    let text = std::fs::read(dir.join("done.json")).ok()?;
    let mut c: Converted = serde_json::from_slice(&text).ok()?;
    c.dir = dir.to_path_buf();
    c.cached = true;
    let len = std::fs::metadata(c.blob_path()).ok()?.len();
    (len == c.blob_size && c.bootstrap().is_file()).then_some(c)
}

fn build_into(
    input: Box<dyn std::io::Read + Send>,
    layer: &Digest,
    dir: &Path,
    opts: &LayerOptions,
    progress: &Progress,
    index: usize,
    size: u64,
) -> Result<Converted, ConvertError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { op, path, source }
    };
    // Per process, so two runs sharing a work dir never build into the same directory.
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
    }
    let report = |n: u64| progress.bytes(index, Stage::Building, n, size);
    let extras = BuildExtras {
        chunk_dict: opts.dict.as_ref().map(|(b, _)| b.as_ref()),
        prefetch: opts.prefetch.clone(),
        threads: opts.threads,
        progress: Some(&report),
    };
    let out = build::build_layer_with(
        std::io::BufReader::with_capacity(1 << 20, input),
        &opts.build,
        &tmp,
        &extras,
    )
    .map_err(|source| ConvertError::Build {
        layer: layer.to_string(),
        source,
    })?;
    let blob: Digest = format!("sha256:{}", out.blob_id)
        .parse()
        .map_err(|e| ConvertError::Internal(format!("builder blob id: {e}")))?;
    let c = Converted {
        blob,
        blob_size: out.blob_size,
        chunks: out.chunks,
        dedup_hits: out.dedup_hits,
        dict_hits: out.dict_hits,
        dict_blobs: out.dict_blobs,
        source_size: 0,
        read_from: None,
        dir: dir.to_path_buf(),
        cached: false,
    };
    let record = serde_json::to_vec_pretty(&c).unwrap_or_default();
    let done = tmp.join("done.json");
    std::fs::write(&done, record).map_err(io("write", &done))?;
    if let Err(e) = std::fs::rename(&tmp, dir) {
        // Another run finished the same build first: the builds are byte-identical.
        let _ = std::fs::remove_dir_all(&tmp);
        return cached(dir).ok_or_else(|| io("rename", &tmp)(e));
    }
    Ok(c)
}

pub(super) fn mkdir(dir: &Path) -> Result<(), ConvertError> {
    std::fs::create_dir_all(dir).map_err(|source| ConvertError::Io {
        op: "mkdir",
        path: dir.to_path_buf(),
        source,
    })
}
