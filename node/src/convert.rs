//! `shoal convert SRC DST`: an OCI or Docker image in a registry → its Nydus form in a
//! registry (what nydusify does), with the RAFS builder in this workspace.
//!
//! Order of work: resolve the source (index → platform manifests, each with its config) and
//! the chunk dictionary; convert every distinct layer, a bounded number at a time (fetch →
//! build → push its data blob), each cached in the work directory ([`layer`]); per platform,
//! merge the layer bootstraps, push the dictionary blobs it references, the bootstrap layer and
//! the adjusted config, then the manifest by digest; last, the tag (the index, or the only
//! manifest).
//!
//! Invariants: the tag is written only after every blob and platform manifest it reaches is in
//! the target repository, so a failed or interrupted run never leaves the tag pointing at a
//! half-written image (blobs it uploaded stay, unreferenced, and a rerun finds them with a
//! HEAD). Every blob is HEADed before it is uploaded.

pub mod auth;
pub mod dict;
pub mod image;
pub mod layer;
pub mod progress;
pub mod registry;
pub mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use shoal_proto::{Digest, Reference, RepoName};
use shoal_rafs::build::BuildOptions;
use tokio::task::JoinSet;

use self::auth::Credentials;
use self::image::{Desc, Source, SourceImage};
use self::progress::{Event, Progress, Stage};
use self::registry::{Body, Registry, RegistryError};
use crate::mount::image::ImageRef;

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub src: String,
    pub dst: String,
    pub plain_http: bool,
    /// Only this platform of a multi-platform source (`os/arch[/variant]`).
    pub platform: Option<String>,
    /// An already-converted Nydus image whose chunks are reused.
    pub chunk_dict: Option<String>,
    pub build: BuildOptions,
    pub prefetch: Vec<String>,
    pub src_creds: Option<Credentials>,
    pub dst_creds: Option<Credentials>,
    pub authfile: Option<PathBuf>,
    pub work_dir: PathBuf,
    /// Layers converted at once.
    pub jobs: usize,
    /// Whether credentials missing from the flags are looked up in the auth files (the
    /// command line); the node's conversion service passes its own and reads none.
    pub auth_files: bool,
    /// Where source layers come from: `None` downloads them into the work directory (the
    /// command line); the node's service reads them through its store ([`layer::LayerSource`]).
    pub layers: Option<Arc<dyn layer::LayerSource>>,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Reference(#[from] crate::mount::image::ImageError),
    #[error("target {image}: give a tag, not a digest (the tag is what convert writes last)")]
    TargetDigest { image: String },
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("chunk dictionary {image}: {reason}")]
    Dict { image: String, reason: String },
    #[error("converting layer {layer}: {source}")]
    Build {
        layer: String,
        #[source]
        source: shoal_rafs::build::BuildError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ConvertError {
    /// The process exit code (`cli::exit`): 2 for a malformed reference, 3 when a registry
    /// could not be reached, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        use crate::cli::exit;
        match self {
            ConvertError::Reference(_) | ConvertError::TargetDigest { .. } => exit::USAGE,
            ConvertError::Registry(RegistryError::Unreachable { .. }) => exit::UNREACHABLE,
            _ => exit::FAILED,
        }
    }
}

/// What happened to one blob at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOutcome {
    Pushed,
    Skipped,
    Mounted,
}

/// What a conversion did (printed as the summary; `--json` prints this).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub source: String,
    pub target: String,
    /// Digest the target tag now names (the index, or the only manifest).
    pub digest: String,
    pub platforms: Vec<String>,
    pub layers: usize,
    /// Layers found already converted in the work directory.
    pub layers_cached: usize,
    /// Compressed size of the distinct source layers.
    pub source_bytes: u64,
    /// Of those, bytes the layer source already held (the node's store) and bytes it had to
    /// fetch (from peers or the origin); layers found converted in the work dir count in
    /// neither.
    pub source_bytes_stored: u64,
    pub source_bytes_fetched: u64,
    /// Data blobs written for this image plus the bootstrap layers.
    pub nydus_bytes: u64,
    /// Bytes of the dictionary's blobs the image references.
    pub dict_bytes: u64,
    /// Chunks stored in the new data blobs.
    pub chunks: u64,
    /// Chunk references served by a chunk already stored in the same layer.
    pub chunks_dedup_in_image: u64,
    /// Chunk references served by the chunk dictionary.
    pub chunks_from_dict: u64,
    pub blobs_pushed: usize,
    pub blobs_skipped: usize,
    pub blobs_mounted: usize,
    pub seconds: f64,
}

impl Summary {
    fn count(&mut self, o: BlobOutcome) {
        match o {
            BlobOutcome::Pushed => self.blobs_pushed += 1,
            BlobOutcome::Skipped => self.blobs_skipped += 1,
            BlobOutcome::Mounted => self.blobs_mounted += 1,
        }
    }
}

/// A parsed `host/repo[:tag|@digest]` with Docker Hub's defaults applied.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub repo: RepoName,
    pub reference: Reference,
}

impl Target {
    pub fn parse(image: &str) -> Result<Self, ConvertError> {
        let r = ImageRef::parse(image)?;
        let host = r.host.unwrap_or_else(|| "docker.io".into());
        let mut repo = r.repo;
        if host == "docker.io" && !repo.as_str().contains('/') {
            repo = format!("library/{repo}")
                .parse()
                .map_err(|_| ConvertError::Internal("library/ prefix".into()))?;
        }
        Ok(Self {
            host,
            repo,
            reference: r.reference,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.host, self.repo),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.host, self.repo),
        }
    }
}

/// One platform image of the source.
struct PlatformImage {
    platform: Option<serde_json::Value>,
    name: String,
    image: SourceImage,
    config: Vec<u8>,
}

/// Convert `opts.src` into `opts.dst`.
pub async fn convert(opts: ConvertOptions, progress: Progress) -> Result<Summary, ConvertError> {
    let started = Instant::now();
    let src_t = Target::parse(&opts.src)?;
    let dst_t = Target::parse(&opts.dst)?;
    let Reference::Tag(dst_tag) = &dst_t.reference else {
        return Err(ConvertError::TargetDigest {
            image: dst_t.to_string(),
        });
    };
    let src = Arc::new(Registry::new(
        &src_t.host,
        opts.plain_http,
        creds(&opts, &src_t.host, opts.src_creds.as_ref())?,
    )?);
    let dst = Arc::new(Registry::new(
        &dst_t.host,
        opts.plain_http,
        creds(&opts, &dst_t.host, opts.dst_creds.as_ref())?,
    )?);
    let (images, had_index) = resolve_source(&src, &src_t, opts.platform.as_deref()).await?;
    // Fail on target credentials before any work, not after the builds.
    dst.has_blob(&dst_t.repo, &images[0].image.config.digest)
        .await?;
    let dict = match &opts.chunk_dict {
        None => None,
        Some(image) => Some(Arc::new(load_dict(&opts, image, &src_t, &dst_t).await?)),
    };
    let mut summary = Summary {
        source: src_t.to_string(),
        target: dst_t.to_string(),
        platforms: images.iter().map(|i| i.name.clone()).collect(),
        ..Summary::default()
    };
    let converted = convert_layers(
        &opts,
        &src,
        &src_t,
        &dst,
        &dst_t,
        &images,
        dict.as_deref(),
        &progress,
        &mut summary,
    )
    .await?;

    let mut entries = Vec::new();
    let mut last_manifest = None;
    for img in &images {
        let layers: Vec<&layer::Converted> = img
            .image
            .layers
            .iter()
            .filter_map(|l| converted.get(&l.digest))
            .collect();
        let (bytes, digest) = publish_platform(
            &opts,
            &dst,
            &dst_t,
            img,
            &layers,
            dict.as_deref(),
            &mut summary,
        )
        .await?;
        if had_index {
            dst.put_manifest(
                &dst_t.repo,
                &digest.to_string(),
                image::OCI_MANIFEST,
                bytes.clone(),
            )
            .await?;
        }
        entries.push((digest, bytes.len() as u64, img.platform.clone()));
        last_manifest = Some(bytes);
    }
    let (media_type, top) = if had_index {
        (image::OCI_INDEX, image::nydus_index(&entries))
    } else {
        (
            image::OCI_MANIFEST,
            last_manifest.ok_or_else(|| ConvertError::Internal("no platform image".into()))?,
        )
    };
    summary.digest = Digest::sha256(&top).to_string();
    dst.put_manifest(&dst_t.repo, dst_tag.as_str(), media_type, top)
        .await?;
    progress
        .step(Event::Line(format!(
            "pushed {} → {}",
            summary.target, summary.digest
        )))
        .await;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The credentials for `host`: `flag`, else (on the command line) the auth files'.
fn creds(
    opts: &ConvertOptions,
    host: &str,
    flag: Option<&Credentials>,
) -> Result<Option<Credentials>, ConvertError> {
    if !opts.auth_files {
        return Ok(flag.cloned());
    }
    Ok(auth::lookup(host, flag, opts.authfile.as_deref())?)
}

/// The source's platform images (with configs) and whether it was an index.
async fn resolve_source(
    src: &Registry,
    t: &Target,
    platform: Option<&str>,
) -> Result<(Vec<PlatformImage>, bool), ConvertError> {
    let what = t.to_string();
    let top = src.manifest(&t.repo, &t.reference).await?;
    match image::classify(&what, &top.media_type, &top.bytes, platform)? {
        Source::Image(img) => {
            let config = src.small_blob(&t.repo, &img.config.digest).await?;
            let name = image::config_platform(&config).unwrap_or_else(|| "?".into());
            if let Some(want) = platform {
                if !name.starts_with(want) {
                    return Err(image::ImageError::NoPlatform {
                        what,
                        platform: want.into(),
                        have: name,
                    }
                    .into());
                }
            }
            Ok((
                vec![PlatformImage {
                    platform: None,
                    name,
                    image: img,
                    config,
                }],
                false,
            ))
        }
        Source::Index(entries) => {
            let mut out = Vec::new();
            for e in entries {
                out.push(resolve_entry(src, t, &e).await?);
            }
            Ok((out, true))
        }
    }
}

async fn resolve_entry(
    src: &Registry,
    t: &Target,
    e: &Desc,
) -> Result<PlatformImage, ConvertError> {
    let name = image::platform_name(e).unwrap_or_else(|| "?".into());
    let what = format!("{}/{}@{} ({name})", t.host, t.repo, e.digest);
    let m = src
        .manifest(&t.repo, &Reference::Digest(e.digest.clone()))
        .await?;
    let Source::Image(img) = image::classify(&what, &m.media_type, &m.bytes, None)? else {
        return Err(image::ImageError::Malformed {
            what,
            reason: "an index nested in an index".into(),
        }
        .into());
    };
    let config = src.small_blob(&t.repo, &img.config.digest).await?;
    Ok(PlatformImage {
        platform: e.platform.clone(),
        name,
        image: img,
        config,
    })
}

async fn load_dict(
    opts: &ConvertOptions,
    image: &str,
    src_t: &Target,
    dst_t: &Target,
) -> Result<dict::Dict, ConvertError> {
    let t = Target::parse(image)?;
    let flag = if t.host == dst_t.host {
        opts.dst_creds.as_ref()
    } else if t.host == src_t.host {
        opts.src_creds.as_ref()
    } else {
        None
    };
    let reg = Registry::new(&t.host, opts.plain_http, creds(opts, &t.host, flag)?)?;
    let platform = crate::mount::image::platform_or_host(opts.platform.as_deref());
    dict::Dict::load(reg, &t, &platform, &opts.work_dir).await
}

/// Convert every distinct layer (bounded parallelism) and push its data blob.
#[allow(clippy::too_many_arguments)]
async fn convert_layers(
    opts: &ConvertOptions,
    src: &Arc<Registry>,
    src_t: &Target,
    dst: &Arc<Registry>,
    dst_t: &Target,
    images: &[PlatformImage],
    dict: Option<&dict::Dict>,
    progress: &Progress,
    summary: &mut Summary,
) -> Result<HashMap<Digest, layer::Converted>, ConvertError> {
    let mut distinct: Vec<Desc> = Vec::new();
    for img in images {
        for l in &img.image.layers {
            if !distinct.iter().any(|d| d.digest == l.digest) {
                distinct.push(l.clone());
            }
        }
    }
    let n = distinct.len();
    summary.layers = n;
    summary.source_bytes = distinct.iter().map(|d| d.size).sum();
    progress
        .step(Event::Line(format!(
            "converting {}: {n} layers, {:.1} MiB → {}",
            src_t,
            mib(summary.source_bytes),
            dst_t
        )))
        .await;
    progress
        .step(Event::Layers(
            distinct.iter().map(|d| short(&d.digest)).collect(),
        ))
        .await;
    let jobs = opts.jobs.max(1);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let lopts = Arc::new(layer::LayerOptions {
        build: opts.build,
        prefetch: opts.prefetch.clone(),
        dict: dict.map(|d| (d.bootstrap.clone(), d.digest.clone())),
        threads: (cores / jobs.min(n.max(1))).max(1),
        work_dir: opts.work_dir.clone(),
        source: opts.layers.clone(),
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(jobs));
    let mut set = JoinSet::new();
    for (i, d) in distinct.into_iter().enumerate() {
        let (src, dst, sem, lopts, progress) = (
            src.clone(),
            dst.clone(),
            sem.clone(),
            lopts.clone(),
            progress.clone(),
        );
        let (src_repo, dst_repo) = (src_t.repo.clone(), dst_t.repo.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let c = layer::convert(&src, &src_repo, &d.digest, d.size, i, &lopts, &progress).await?;
            progress.bytes(i, Stage::Pushing, 0, c.blob_size);
            let outcome = ensure_blob(&dst, &dst_repo, &c.blob, Body::File { path: c.blob_path(), len: c.blob_size }).await?;
            progress.bytes(i, Stage::Done, 0, 0);
            progress
                .step(Event::Line(format!(
                    "layer {}/{n} {}: {} {:.1} MiB → blob {} {:.1} MiB, {} chunks ({} dedup, {} from dict), {}",
                    i + 1,
                    short(&d.digest),
                    if c.cached { "cached" } else { "converted" },
                    mib(d.size),
                    short(&c.blob),
                    mib(c.blob_size),
                    c.chunks,
                    c.dedup_hits,
                    c.dict_hits,
                    match outcome {
                        BlobOutcome::Pushed => "pushed",
                        BlobOutcome::Skipped => "already at target",
                        BlobOutcome::Mounted => "mounted",
                    }
                )))
                .await;
            Ok::<_, ConvertError>((d.digest, c, outcome))
        });
    }
    let mut out = HashMap::new();
    while let Some(joined) = set.join_next().await {
        let (digest, c, outcome) =
            joined.map_err(|e| ConvertError::Internal(format!("layer task: {e}")))??;
        summary.count(outcome);
        summary.layers_cached += usize::from(c.cached);
        match c.read_from {
            Some(layer::ReadFrom::Store) => summary.source_bytes_stored += c.source_size,
            Some(layer::ReadFrom::Fetched) => summary.source_bytes_fetched += c.source_size,
            None => {}
        }
        summary.nydus_bytes += c.blob_size;
        summary.chunks += c.chunks;
        summary.chunks_dedup_in_image += c.dedup_hits;
        summary.chunks_from_dict += c.dict_hits;
        out.insert(digest, c);
    }
    Ok(out)
}

/// Merge one platform's layers and push everything its manifest names except the manifest;
/// returns the manifest bytes and digest.
async fn publish_platform(
    opts: &ConvertOptions,
    dst: &Registry,
    dst_t: &Target,
    img: &PlatformImage,
    layers: &[&layer::Converted],
    dict: Option<&dict::Dict>,
    summary: &mut Summary,
) -> Result<(Vec<u8>, Digest), ConvertError> {
    let boots: Vec<PathBuf> = layers.iter().map(|c| c.bootstrap()).collect();
    let key = Digest::sha256(
        layers
            .iter()
            .map(|c| c.dir.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    );
    let merged_dir = opts.work_dir.join("merged");
    layer::mkdir(&merged_dir)?;
    let merged_path = merged_dir.join(key.hex());
    let mp = merged_path.clone();
    let merged = tokio::task::spawn_blocking(move || shoal_rafs::build::merge(&boots, &mp))
        .await
        .map_err(|e| ConvertError::Internal(format!("merge task: {e}")))?
        .map_err(|source| ConvertError::Build {
            layer: format!("merge of {}", img.name),
            source,
        })?;
    let boot = std::fs::read(&merged_path).map_err(|source| ConvertError::Io {
        op: "read",
        path: merged_path.clone(),
        source,
    })?;
    // Data blobs in device order: the image's own, then dictionary blobs it references.
    let mut blobs = Vec::new();
    for id in &merged.blobs {
        if let Some(c) = layers.iter().find(|c| c.blob.hex() == *id) {
            blobs.push((c.blob.clone(), c.blob_size));
            continue;
        }
        let Some((digest, size)) = dict.and_then(|d| d.blob(id)).cloned() else {
            return Err(ConvertError::Internal(format!(
                "merged bootstrap names blob {id}, neither a layer's nor the dictionary's"
            )));
        };
        let d = dict.ok_or_else(|| ConvertError::Internal("dict".into()))?;
        let o = d
            .ensure_at(dst, &dst_t.repo, &digest, size, &opts.work_dir)
            .await?;
        summary.count(o);
        summary.dict_bytes += size;
        blobs.push((digest, size));
    }
    let (layer_bytes, diff_id) =
        image::bootstrap_layer(&boot).map_err(|source| ConvertError::Io {
            op: "tar",
            path: merged_path.clone(),
            source,
        })?;
    let boot_digest = Digest::sha256(&layer_bytes);
    let boot_size = layer_bytes.len() as u64;
    summary.nydus_bytes += boot_size;
    let o = ensure_blob(
        dst,
        &dst_t.repo,
        &boot_digest,
        Body::Bytes(layer_bytes.into()),
    )
    .await?;
    summary.count(o);
    let what = format!("config {}", img.image.config.digest);
    let config = image::nydus_config(&what, &img.config, &blobs, &diff_id)?;
    let config_digest = Digest::sha256(&config);
    let config_size = config.len() as u64;
    let o = ensure_blob(dst, &dst_t.repo, &config_digest, Body::Bytes(config.into())).await?;
    summary.count(o);
    let manifest = image::nydus_manifest(
        (&config_digest, config_size),
        &blobs,
        (&boot_digest, boot_size),
        &img.image.annotations,
    );
    let digest = Digest::sha256(&manifest);
    Ok((manifest, digest))
}

/// HEAD, then upload when missing.
async fn ensure_blob(
    dst: &Registry,
    repo: &RepoName,
    digest: &Digest,
    body: Body,
) -> Result<BlobOutcome, ConvertError> {
    if dst.has_blob(repo, digest).await? {
        return Ok(BlobOutcome::Skipped);
    }
    dst.upload_blob(repo, digest, body).await?;
    Ok(BlobOutcome::Pushed)
}

/// `d9fa21193e2e` — a digest's first 12 hex characters.
pub fn short(d: &Digest) -> String {
    d.hex().chars().take(12).collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}
