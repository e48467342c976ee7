//! The chunk dictionary of `--chunk-dict IMAGE`: an already-converted Nydus image whose merged
//! bootstrap the builder consults, so chunks it already stores are referenced, not written
//! again. The new image then needs the dictionary's blobs too: [`Dict::ensure_at`] mounts them
//! into the target repository (same registry) or copies them.
//!
//! Invariants: the bootstrap comes out of the bootstrap layer named by the dictionary's
//! manifest, after that layer's digest was checked; its size is bounded.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use shoal_proto::{Digest, RepoName};
use shoal_rafs::{Bootstrap, MAX_BOOTSTRAP_SIZE};

use super::registry::{Body, Registry};
use super::{layer, BlobOutcome, ConvertError, Target};
use crate::mount::image::{nydus_layers, pick_platform, Manifest, BOOTSTRAP_PATH};

/// A loaded chunk dictionary.
#[derive(Debug)]
pub struct Dict {
    pub image: String,
    registry: Registry,
    repo: RepoName,
    pub bootstrap: Arc<Bootstrap>,
    /// The bootstrap layer's digest: identifies the dictionary in cache keys.
    pub digest: Digest,
    /// Blob id (hex) → (digest, size) of the dictionary's data blobs.
    blobs: HashMap<String, (Digest, u64)>,
}

impl Dict {
    /// Resolve `target` (for `platform`, when it is an index) and load its bootstrap.
    pub async fn load(
        registry: Registry,
        target: &Target,
        platform: &str,
        work_dir: &Path,
    ) -> Result<Self, ConvertError> {
        let image = target.to_string();
        let mut fetched = registry.manifest(&target.repo, &target.reference).await?;
        let bad = |e: crate::mount::image::ImageError| ConvertError::Dict {
            image: image.clone(),
            reason: e.to_string(),
        };
        let mut parsed = Manifest::parse(&image, &fetched.bytes).map_err(bad)?;
        if let Manifest::Index(entries) = &parsed {
            let d = pick_platform(entries, &fetched.digest, platform)
                .map_err(bad)?
                .digest
                .clone();
            fetched = registry
                .manifest(&target.repo, &shoal_proto::Reference::Digest(d))
                .await?;
            parsed = Manifest::parse(&image, &fetched.bytes).map_err(bad)?;
        }
        let Manifest::Image { layers } = parsed else {
            return Err(ConvertError::Dict {
                image,
                reason: "an index nested in an index".into(),
            });
        };
        let nydus = nydus_layers(&image, &layers).map_err(bad)?;
        let dir = work_dir.join("dict");
        layer::mkdir(&dir)?;
        let boot_path = dir.join(format!("{}.boot", nydus.bootstrap.digest.hex()));
        if !boot_path.is_file() {
            let tgz = dir.join(nydus.bootstrap.digest.hex());
            registry
                .fetch_blob(&target.repo, &nydus.bootstrap.digest, &tgz, &|_| {})
                .await?;
            let (t, b) = (tgz.clone(), boot_path.clone());
            tokio::task::spawn_blocking(move || extract_bootstrap(&t, &b))
                .await
                .map_err(|e| ConvertError::Internal(format!("dict extract task: {e}")))?
                .map_err(|reason| ConvertError::Dict {
                    image: image.clone(),
                    reason,
                })?;
            let _ = std::fs::remove_file(&tgz);
        }
        let bootstrap = Bootstrap::open(&boot_path).map_err(|e| ConvertError::Dict {
            image: image.clone(),
            reason: format!("its bootstrap: {e}"),
        })?;
        let blobs = nydus
            .blobs
            .iter()
            .map(|d| (d.digest.hex(), (d.digest.clone(), d.size)))
            .collect();
        Ok(Self {
            image,
            registry,
            repo: target.repo.clone(),
            bootstrap: Arc::new(bootstrap),
            digest: nydus.bootstrap.digest,
            blobs,
        })
    }

    /// The digest and size of dictionary blob `blob_id`, if it is one.
    pub fn blob(&self, blob_id: &str) -> Option<&(Digest, u64)> {
        self.blobs.get(blob_id)
    }

    /// Make dictionary blob `digest` exist in `repo` at `dst`: already there, mounted from the
    /// dictionary's repository (same registry), or copied through the work directory.
    pub async fn ensure_at(
        &self,
        dst: &Registry,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        work_dir: &Path,
    ) -> Result<BlobOutcome, ConvertError> {
        if dst.has_blob(repo, digest).await? {
            return Ok(BlobOutcome::Skipped);
        }
        if dst.host == self.registry.host && dst.mount_blob(repo, digest, &self.repo).await? {
            return Ok(BlobOutcome::Mounted);
        }
        let dir = work_dir.join("downloads");
        layer::mkdir(&dir)?;
        let path = dir.join(digest.hex());
        self.registry
            .fetch_blob(&self.repo, digest, &path, &|_| {})
            .await?;
        dst.upload_blob(
            repo,
            digest,
            Body::File {
                path: path.clone(),
                len: size,
            },
        )
        .await?;
        let _ = std::fs::remove_file(&path);
        Ok(BlobOutcome::Pushed)
    }
}

/// `image/image.boot` out of a bootstrap layer (tar.gz) into `dest`.
fn extract_bootstrap(tgz: &Path, dest: &Path) -> Result<(), String> {
    let f = std::fs::File::open(tgz).map_err(|e| e.to_string())?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path != Path::new(BOOTSTRAP_PATH) {
            continue;
        }
        if entry.size() > MAX_BOOTSTRAP_SIZE {
            return Err(format!("bootstrap of {} bytes is too large", entry.size()));
        }
        let mut bytes = Vec::new();
        entry
            .by_ref()
            .take(MAX_BOOTSTRAP_SIZE)
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        let tmp = dest.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
        return std::fs::rename(&tmp, dest).map_err(|e| e.to_string());
    }
    Err(format!("no {BOOTSTRAP_PATH} in the bootstrap layer"))
}
