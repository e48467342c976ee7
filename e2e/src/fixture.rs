//! Reading OCI image layouts: the shared fixture (the expected image) and the layouts `skopeo copy`
//! writes (the actual image), and comparing the two byte for byte.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::http::{sha256_digest, sha256_file};

/// An OCI content descriptor (the fields the harness needs).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ImageManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

/// One image of a layout: its manifest (exact bytes) and what it references.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub manifest: Vec<u8>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Image {
    /// Config and layers.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }

    /// The largest layer.
    pub fn largest_layer(&self) -> Result<&Descriptor> {
        self.layers
            .iter()
            .max_by_key(|d| d.size)
            .context("image has no layers")
    }

    /// Sum of layer sizes.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|d| d.size).sum()
    }
}

impl OciLayout {
    /// Opens a layout (checks that `index.json` exists).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        ensure!(
            dir.join("index.json").is_file(),
            "{} is not an OCI layout",
            dir.display()
        );
        Ok(Self { dir })
    }

    /// The shared Debian + python fixture.
    pub fn debian_python() -> Result<Self> {
        Self::open(crate::paths::debian_python_layout())
            .context("the debian-python fixture (set SHOAL_FIXTURES to its fixtures root)")
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of blob `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let (alg, hex) = digest.split_once(':').context("digest without algorithm")?;
        Ok(self.dir.join("blobs").join(alg).join(hex))
    }

    /// Bytes of blob `digest`.
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The image whose index entry has `org.opencontainers.image.ref.name` = `reference`.
    pub fn image(&self, reference: &str) -> Result<Image> {
        let index = self.index()?;
        let desc = index
            .manifests
            .iter()
            .find(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
                    == Some(reference)
            })
            .with_context(|| format!("no ref {reference:?} in {}", self.dir.display()))?;
        self.image_by_descriptor(desc)
    }

    /// The only image of a layout (what `skopeo copy … oci:DIR` writes).
    pub fn single_image(&self) -> Result<Image> {
        let index = self.index()?;
        let [desc] = index.manifests.as_slice() else {
            bail!(
                "{} holds {} manifests, expected 1",
                self.dir.display(),
                index.manifests.len()
            );
        };
        self.image_by_descriptor(desc)
    }

    fn index(&self) -> Result<Index> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    fn image_by_descriptor(&self, desc: &Descriptor) -> Result<Image> {
        let manifest = self.blob(&desc.digest)?;
        let parsed: ImageManifest = serde_json::from_slice(&manifest)
            .with_context(|| format!("parsing manifest {}", desc.digest))?;
        Ok(Image {
            manifest_digest: desc.digest.clone(),
            manifest_media_type: desc.media_type.clone(),
            manifest,
            config: parsed.config,
            layers: parsed.layers,
        })
    }
}

/// Checks that `actual` holds exactly `expected`'s image: the same manifest bytes, and every blob
/// the manifest references present with the right size and SHA-256 (equal to the fixture's bytes).
pub fn assert_same_image(expected: &Image, actual: &OciLayout) -> Result<()> {
    let got = actual.single_image()?;
    ensure!(
        got.manifest == expected.manifest,
        "manifest differs: expected {} ({} bytes), got {} ({} bytes)",
        expected.manifest_digest,
        expected.manifest.len(),
        sha256_digest(&got.manifest),
        got.manifest.len()
    );
    ensure!(
        got.manifest_digest == expected.manifest_digest,
        "index names another digest"
    );
    for desc in expected.blobs() {
        let path = actual.blob_path(&desc.digest)?;
        let len = std::fs::metadata(&path)
            .with_context(|| format!("blob {} missing in the copy", desc.digest))?
            .len();
        ensure!(
            len == desc.size,
            "blob {} is {len} bytes, expected {}",
            desc.digest,
            desc.size
        );
        let digest = sha256_file(&path)?;
        ensure!(
            digest == desc.digest,
            "blob {} hashes to {digest}",
            desc.digest
        );
    }
    Ok(())
}
