//! Nydus images for the lazy-mount tests: build one from an OCI layout with our RAFS builder
//! (one build per layer, then a merge) and push it to a test registry in the registry form
//! nydusify produces — data layers `application/vnd.oci.image.layer.nydus.blob.v1` annotated
//! `containerd.io/snapshot/nydus-blob: "true"`, then a tar.gz holding `image/image.boot`
//! annotated `nydus-bootstrap: "true"` and `nydus-fs-version: "6"` — under a tag that names an
//! image index with one platform manifest. The config is the source image's. Also: images
//! converted by `shoal convert` itself ([`shoal_convert`], [`Converted`]).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use shoal_rafs::build::{build_layer, merge, BuildOptions};
use shoal_rafs::{Bootstrap, ChunkRef, ChunkSource, LocalBlobDir};

use crate::registry::Registry;
use crate::{paths, TestCtx};

/// Media type of a Nydus data blob layer.
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// A pushed Nydus image.
#[derive(Debug, Clone)]
pub struct NydusImage {
    /// The image manifest (the index under the tag points at it).
    pub manifest_digest: String,
    /// Data blobs `(digest, size)`, in bootstrap order.
    pub blobs: Vec<(String, u64)>,
    /// The bootstrap layer `(digest, size)`.
    pub bootstrap_layer: (String, u64),
    /// The merged bootstrap and the directories holding the blobs (for local checks).
    pub bootstrap: PathBuf,
    pub blob_dirs: Vec<PathBuf>,
}

impl NydusImage {
    /// Sum of the data blob sizes.
    pub fn data_bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, s)| *s).sum()
    }

    /// The local file of data blob `digest`.
    pub fn blob_file(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        self.blob_dirs
            .iter()
            .map(|d| d.join(hex))
            .find(|p| p.is_file())
    }
}

impl NydusImage {
    /// The bytes of image file `path`, read from the local build (the expected content).
    pub fn file_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let b = Bootstrap::open(&self.bootstrap)?;
        let src = LocalBlobDir::with_dirs(self.blob_dirs.clone());
        let ino = b.lookup(path)?;
        let size = b.getattr(ino)?.size;
        let mut out = vec![0u8; usize::try_from(size)?];
        for c in b.file_chunks(ino, 0, size)? {
            let data = src.read_chunk(b.blob(c.blob_index)?, &c)?;
            let at = usize::try_from(c.file_offset)?;
            let n = data.len().min(out.len().saturating_sub(at));
            out[at..at + n].copy_from_slice(&data[..n]);
        }
        Ok(out)
    }

    /// The first chunk of image file `path` and the digest of the blob holding it.
    pub fn first_chunk(&self, path: &str) -> Result<(String, ChunkRef)> {
        let b = Bootstrap::open(&self.bootstrap)?;
        let ino = b.lookup(path)?;
        let c = b
            .file_chunks(ino, 0, 1)?
            .into_iter()
            .next()
            .with_context(|| format!("{path} has no chunks"))?;
        let blob = b.blob(c.blob_index)?;
        Ok((format!("sha256:{}", blob.blob_id), c))
    }
}

/// Build the Nydus form of `layout:reference` in `work` and push it to `registry` as
/// `repo:tag` (an index for this host's platform → the image manifest).
pub fn build_and_push(
    registry: &Registry,
    layout: &Path,
    reference: &str,
    repo: &str,
    tag: &str,
    work: &Path,
) -> Result<NydusImage> {
    let manifest = source_manifest(layout, reference)?;
    let blob_path = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mut boots = Vec::new();
    let mut blob_dirs = Vec::new();
    let mut blobs = Vec::new();
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    for (i, l) in layers.iter().enumerate() {
        let digest = l["digest"].as_str().context("layer digest")?;
        let out = work.join(format!("layer{i}"));
        let tar = std::fs::File::open(blob_path(digest))
            .with_context(|| format!("opening layer {digest}"))?;
        let built = build_layer(tar, &BuildOptions::default(), &out)
            .with_context(|| format!("building layer {digest}"))?;
        let blob_digest = format!("sha256:{}", built.blob_id);
        registry.push_blob_file(repo, &blob_digest, &built.blob)?;
        boots.push(built.bootstrap);
        blob_dirs.push(out.join("blobs"));
        blobs.push((blob_digest, built.blob_size));
    }
    let merged = work.join("image.boot");
    let m = merge(&boots, &merged).context("merging the layer bootstraps")?;
    let order: Vec<String> = m.blobs.iter().map(|b| format!("sha256:{b}")).collect();
    ensure!(
        order == blobs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        "merged blob order {order:?} differs from the layer order"
    );
    let boot_layer = gzip(&tar_one("image/image.boot", &std::fs::read(&merged)?))?;
    let boot_digest = registry.push_blob(repo, boot_layer.clone())?;
    let config = manifest["config"].clone();
    let config_digest = config["digest"].as_str().context("config digest")?;
    registry.push_blob_file(repo, config_digest, &blob_path(config_digest))?;
    let mut nydus_layers: Vec<serde_json::Value> = blobs
        .iter()
        .map(|(d, s)| {
            json!({"mediaType": BLOB_MEDIA_TYPE, "digest": d, "size": s,
                   "annotations": {"containerd.io/snapshot/nydus-blob": "true"}})
        })
        .collect();
    nydus_layers.push(json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": boot_digest,
        "size": boot_layer.len(),
        "annotations": {
            "containerd.io/snapshot/nydus-bootstrap": "true",
            "containerd.io/snapshot/nydus-fs-version": "6"
        }
    }));
    let image_manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config,
        "layers": nydus_layers,
    }))?;
    let manifest_digest = crate::http::sha256_digest(&image_manifest);
    let put = registry.put_manifest(
        repo,
        &manifest_digest,
        MANIFEST_MEDIA_TYPE,
        image_manifest.clone(),
    )?;
    ensure!(put.status.as_u16() == 201, "manifest PUT: {}", put.short());
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": image_manifest.len(),
            "platform": {"os": "linux", "architecture": host_arch()}
        }]
    }))?;
    let put = registry.put_manifest(repo, tag, INDEX_MEDIA_TYPE, index)?;
    ensure!(put.status.as_u16() == 201, "index PUT: {}", put.short());
    Ok(NydusImage {
        manifest_digest,
        blobs,
        bootstrap_layer: (boot_digest, boot_layer.len() as u64),
        bootstrap: merged,
        blob_dirs,
    })
}

/// `shoal convert --plain-http SRC DST` (registry to registry) with a work dir of the test's own.
pub fn shoal_convert(t: &TestCtx, src: &str, dst: &str) -> Result<()> {
    let work = t.subdir("convert-work")?;
    let out = std::process::Command::new(paths::shoal_bin()?)
        .args(["convert", "--plain-http", "--json", "--work-dir"])
        .arg(&work)
        .args([src, dst])
        .env("HOME", t.dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .output()
        .context("running shoal convert")?;
    ensure!(
        out.status.success(),
        "shoal convert {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The layers of a Nydus image manifest (as `shoal convert` pushes it).
#[derive(Debug, Clone)]
pub struct Converted {
    /// Data blobs `(digest, size)`.
    pub blobs: Vec<(String, u64)>,
    /// The bootstrap layer `(digest, size)`.
    pub bootstrap_layer: (String, u64),
}

impl Converted {
    /// Reads the layers of `manifest` (an image manifest, not an index).
    pub fn of(manifest: &serde_json::Value) -> Result<Self> {
        let layers = manifest["layers"].as_array().context("manifest layers")?;
        let entry = |l: &serde_json::Value| -> Result<(String, u64)> {
            Ok((
                l["digest"].as_str().context("layer digest")?.to_owned(),
                l["size"].as_u64().context("layer size")?,
            ))
        };
        let mut blobs = Vec::new();
        let mut bootstrap = None;
        for l in layers {
            if l["mediaType"] == BLOB_MEDIA_TYPE {
                blobs.push(entry(l)?);
            } else if l["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true" {
                bootstrap = Some(entry(l)?);
            }
        }
        Ok(Self {
            blobs,
            bootstrap_layer: bootstrap.context("no bootstrap layer in the manifest")?,
        })
    }

    /// Sum of the data blob sizes.
    pub fn data_bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, s)| *s).sum()
    }
}

/// The RAFS bootstrap (`image/image.boot`) inside a Nydus bootstrap layer (a tar.gz).
pub fn bootstrap_of_layer(layer: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(layer)
        .read_to_end(&mut tar)
        .context("gunzipping the bootstrap layer")?;
    let mut at = 0usize;
    while at + 512 <= tar.len() {
        let h = &tar[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &h[r];
            String::from_utf8_lossy(&f[..f.iter().position(|&b| b == 0).unwrap_or(f.len())])
                .into_owned()
        };
        let (name, prefix) = (field(0..100), field(345..500));
        let name = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let size = u64::from_str_radix(field(124..136).trim(), 8).context("tar entry size")?;
        let size = usize::try_from(size)?;
        let data = at + 512;
        ensure!(
            data + size <= tar.len(),
            "tar entry {name} runs past the end"
        );
        if name.trim_start_matches("./") == "image/image.boot" {
            return Ok(tar[data..data + size].to_vec());
        }
        at = data + size.div_ceil(512) * 512;
    }
    anyhow::bail!("no image/image.boot in the bootstrap layer")
}

/// The OCI architecture name of this host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

fn source_manifest(layout: &Path, reference: &str) -> Result<serde_json::Value> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .context("index manifests")?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
        .with_context(|| format!("no {reference} in {}", layout.display()))?;
    let digest = entry["digest"].as_str().context("manifest digest")?;
    let path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// A ustar archive holding one regular file.
pub fn tar_one(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", data.len()).as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}
