//! Image references and the Nydus layout of an image manifest: pure parsing, no I/O.
//!
//! `host[:port]/repo[:tag|@digest]` → [`ImageRef`]; an OCI/Docker manifest or index →
//! [`Manifest`]; an image manifest → its [`NydusLayers`] (the bootstrap layer and the data
//! blobs), or [`ImageError::NotNydus`] naming how to convert the image.
//!
//! Invariants: every digest and name that leaves this module was parsed into its newtype; a
//! manifest is picked out of an index only by an exact `os/arch[/variant]` match.

use serde::Deserialize;
use shoal_proto::{Digest, Reference, RepoName, Tag};

/// Media type of a Nydus data blob layer.
pub const NYDUS_BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Annotation marking the bootstrap layer.
pub const BOOTSTRAP_ANNOTATION: &str = "containerd.io/snapshot/nydus-bootstrap";
/// Annotation marking a data blob layer.
pub const BLOB_ANNOTATION: &str = "containerd.io/snapshot/nydus-blob";
/// Path of the bootstrap inside the bootstrap layer's tar.
pub const BOOTSTRAP_PATH: &str = "image/image.boot";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host as written (`127.0.0.1:5000`), or None for the node's default origin.
    pub host: Option<String>,
    pub repo: RepoName,
    pub reference: Reference,
}

/// Why a reference or manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image reference {image:?}: {reason}")]
    BadReference { image: String, reason: String },
    #[error("manifest {what}: {reason}")]
    BadManifest { what: String, reason: String },
    #[error("image index {digest} has no manifest for platform {platform}")]
    NoPlatform { digest: Digest, platform: String },
    #[error(
        "{image} is not a Nydus image (no layer annotated {BOOTSTRAP_ANNOTATION}=\"true\"); \
         convert it first with `shoal convert {image} <target>` (or nydusify convert)"
    )]
    NotNydus { image: String },
}

impl ImageRef {
    /// Parse `host[:port]/repo[:tag|@digest]`; a first component with a dot, a colon or equal
    /// to `localhost` is the host. No tag means `latest`.
    pub fn parse(image: &str) -> Result<Self, ImageError> {
        let bad = |reason: &str| ImageError::BadReference {
            image: image.chars().take(200).collect(),
            reason: reason.into(),
        };
        let (rest, digest) = match image.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (image, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) if h.contains(['.', ':']) || h == "localhost" => (Some(h.to_owned()), p),
            _ => (None, rest),
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t)),
            _ => (path, None),
        };
        let repo: RepoName = path.parse().map_err(|e| bad(&format!("repository: {e}")))?;
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d.parse().map_err(|e| bad(&format!("{e}")))?),
            (None, Some(t)) => Reference::Tag(t.parse().map_err(|e| bad(&format!("tag: {e}")))?),
            (None, None) => Reference::Tag(
                "latest"
                    .parse::<Tag>()
                    .map_err(|e| bad(&format!("tag: {e}")))?,
            ),
        };
        Ok(ImageRef {
            host,
            repo,
            reference,
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// A descriptor (the fields the mount manager needs).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or an index.
#[derive(Clone, Debug)]
pub enum Manifest {
    Index(Vec<Descriptor>),
    Image { layers: Vec<Descriptor> },
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Parse manifest JSON (OCI or Docker schema 2, image or index).
    pub fn parse(what: &str, bytes: &[u8]) -> Result<Self, ImageError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|e| ImageError::BadManifest {
                what: what.into(),
                reason: e.to_string(),
            })?;
        match (raw.manifests, raw.layers) {
            (Some(m), _) => Ok(Manifest::Index(m)),
            (None, Some(layers)) => Ok(Manifest::Image { layers }),
            (None, None) => Err(ImageError::BadManifest {
                what: what.into(),
                reason: "neither `manifests` nor `layers`".into(),
            }),
        }
    }
}

/// The platform to pick from an index: `os/arch[/variant]`, default this host's.
pub fn platform_or_host(platform: Option<&str>) -> String {
    match platform {
        Some(p) => p.to_owned(),
        None => {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "x86" => "386",
                a => a,
            };
            format!("linux/{arch}")
        }
    }
}

/// The manifest of `platform` (`os/arch[/variant]`) in an index.
pub fn pick_platform<'a>(
    index: &'a [Descriptor],
    digest: &Digest,
    platform: &str,
) -> Result<&'a Descriptor, ImageError> {
    let mut parts = platform.split('/');
    let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
    index
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                Some(p.os.as_str()) == os
                    && Some(p.architecture.as_str()) == arch
                    && (variant.is_none() || p.variant.as_deref() == variant)
            })
        })
        .ok_or_else(|| ImageError::NoPlatform {
            digest: digest.clone(),
            platform: platform.into(),
        })
}

/// The Nydus layers of an image manifest.
#[derive(Clone, Debug)]
pub struct NydusLayers {
    pub bootstrap: Descriptor,
    pub blobs: Vec<Descriptor>,
}

/// Find the bootstrap layer (annotated `nydus-bootstrap: "true"`) and the data blobs. An image
/// whose only layer is one Nydus data blob has no bootstrap layer of its own: that blob is taken
/// as it (it must then carry its bootstrap, `nydus-image --blob-inline-meta`).
pub fn nydus_layers(image: &str, layers: &[Descriptor]) -> Result<NydusLayers, ImageError> {
    let marked = |d: &Descriptor, key: &str| d.annotations.get(key).is_some_and(|v| v == "true");
    let blobs: Vec<Descriptor> = layers
        .iter()
        .filter(|d| d.media_type == NYDUS_BLOB_MEDIA_TYPE || marked(d, BLOB_ANNOTATION))
        .cloned()
        .collect();
    let bootstrap = layers
        .iter()
        .rev()
        .find(|d| marked(d, BOOTSTRAP_ANNOTATION))
        .or(match (layers, blobs.as_slice()) {
            ([_], [blob]) => Some(blob),
            _ => None,
        })
        .cloned()
        .ok_or_else(|| ImageError::NotNydus {
            image: image.into(),
        })?;
    Ok(NydusLayers { bootstrap, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = ImageRef::parse("127.0.0.1:5000/test/python:1").expect("ref");
        assert_eq!(r.host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repo.as_str(), "test/python");
        assert_eq!(r.reference.to_string(), "1");
        assert_eq!(r.to_string(), "127.0.0.1:5000/test/python:1");
        let r = ImageRef::parse("library/debian").expect("ref");
        assert_eq!(r.host, None);
        assert_eq!(r.reference.to_string(), "latest");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::parse(&format!("localhost/x@{d}")).expect("ref");
        assert_eq!(r.host.as_deref(), Some("localhost"));
        assert!(matches!(r.reference, Reference::Digest(_)));
        assert!(ImageRef::parse("Bad Name:1").is_err());
        assert!(ImageRef::parse("x@sha256:zz").is_err());
    }

    #[test]
    fn finds_nydus_layers_or_names_convert() {
        let j = br#"{"schemaVersion":2,"layers":[
          {"mediaType":"application/vnd.oci.image.layer.nydus.blob.v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":10,"annotations":{"containerd.io/snapshot/nydus-blob":"true"}},
          {"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":20,"annotations":{"containerd.io/snapshot/nydus-bootstrap":"true"}}]}"#;
        let Manifest::Image { layers } = Manifest::parse("m", j).expect("parse") else {
            panic!("not an image manifest")
        };
        let n = nydus_layers("img", &layers).expect("nydus");
        assert_eq!(n.bootstrap.size, 20);
        assert_eq!(n.blobs.len(), 1);
        // One Nydus data blob alone is its own bootstrap layer (inline meta) ...
        let n = nydus_layers("img:1", &layers[..1]).expect("inline meta");
        assert_eq!(n.bootstrap.digest, layers[0].digest);
        // ... but a plain layer is not Nydus.
        let mut plain = layers[1].clone();
        plain.annotations.clear();
        let e = nydus_layers("img:1", &[plain]).expect_err("not nydus");
        assert!(e.to_string().contains("shoal convert"), "{e}");
    }

    #[test]
    fn picks_the_platform() {
        let j = br#"{"manifests":[
          {"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
          {"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":2,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let Manifest::Index(idx) = Manifest::parse("i", j).expect("parse") else {
            panic!("not an index")
        };
        let d = Digest::sha256(b"x");
        assert_eq!(
            pick_platform(&idx, &d, "linux/amd64").expect("amd64").size,
            2
        );
        assert_eq!(
            pick_platform(&idx, &d, "linux/arm64").expect("arm64").size,
            1
        );
        assert!(pick_platform(&idx, &d, "linux/s390x").is_err());
    }
}
