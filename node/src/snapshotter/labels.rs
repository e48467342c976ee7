//! What containerd's snapshot labels say about a layer: whether containerd is unpacking an image
//! layer (and which chain id it will be), whether that layer is a Nydus data blob or the Nydus
//! bootstrap, and which image and layer it belongs to.
//!
//! containerd passes a layer's descriptor annotations that start with `containerd.io/snapshot/`
//! as labels on the `Prepare` of its unpack, plus `containerd.io/snapshot.ref` (the chain id it
//! will commit). The image reference comes from the CRI labels (`cri.*`, with
//! `disable_snapshot_annotations = false`) or, for `ctr-remote image rpull`, the stargz-style
//! `remote/stargz.*` labels; whichever is present.
//!
//! Trust: labels can come from the image's own annotations, so nothing here decides *what* is
//! mounted — the bootstrap is the one containerd unpacked and verified against the manifest it
//! pulled; the reference only says where the data blobs are read from, and every chunk read is
//! checked against that bootstrap's digests.

use std::collections::BTreeMap;

/// The chain id containerd will commit an unpacked layer as.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// On a Nydus data blob layer.
pub const NYDUS_BLOB: &str = "containerd.io/snapshot/nydus-blob";
/// On the Nydus bootstrap layer (the image's last).
pub const NYDUS_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
/// The image reference, from the CRI image service.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The image reference, from `ctr-remote image rpull` (stargz's labels).
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Set by shoal on the data layers it provides (so `ctr snapshots info` shows why).
pub const PROVIDED: &str = "containerd.io/snapshot/remote";

/// What a `Prepare`'s labels make of the new snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// A Nydus data blob layer containerd is about to unpack as `target`: shoal provides it
    /// (an empty committed layer; its bytes are read lazily through the bootstrap).
    NydusBlob { target: String },
    /// Any other layer being unpacked (the Nydus bootstrap included: containerd unpacks its
    /// tar, and `image/image.boot` lands in the snapshot).
    Layer,
    /// A container's root filesystem (or any snapshot that is not an image layer).
    Container,
}

/// Classifies a `Prepare` by its labels.
pub fn classify(labels: &BTreeMap<String, String>) -> Prepared {
    let Some(target) = labels.get(TARGET_REF).filter(|t| !t.is_empty()) else {
        return Prepared::Container;
    };
    if labels.contains_key(NYDUS_BLOB) && !labels.contains_key(NYDUS_BOOTSTRAP) {
        return Prepared::NydusBlob {
            target: target.clone(),
        };
    }
    Prepared::Layer
}

/// Whether a committed layer is a Nydus bootstrap (the top of a Nydus image).
pub fn is_bootstrap(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(NYDUS_BOOTSTRAP)
}

/// Why a bootstrap layer's labels do not say where its image is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error(
        "the Nydus bootstrap layer has no image reference label ({CRI_IMAGE_REF} or \
         {STARGZ_REFERENCE}): pull it through the CRI with disable_snapshot_annotations = false, \
         or with ctr-remote image rpull"
    )]
    NoReference,
}

/// The image (`host/repo[:tag|@digest]`, as containerd named it) a bootstrap layer's labels
/// point at: where its data blobs are read from. The CRI's label first, then rpull's.
pub fn image_reference(labels: &BTreeMap<String, String>) -> Result<String, OriginError> {
    labels
        .get(CRI_IMAGE_REF)
        .or_else(|| labels.get(STARGZ_REFERENCE))
        .filter(|r| !r.is_empty())
        .cloned()
        .ok_or(OriginError::NoReference)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn prepares_are_classified_by_their_labels() {
        assert_eq!(classify(&labels(&[])), Prepared::Container);
        assert_eq!(
            classify(&labels(&[(NYDUS_BLOB, "true")])),
            Prepared::Container,
            "no target: not an unpack (e.g. a container with copied labels)"
        );
        assert_eq!(
            classify(&labels(&[(TARGET_REF, "sha256:c"), (NYDUS_BLOB, "true")])),
            Prepared::NydusBlob {
                target: "sha256:c".into()
            }
        );
        assert_eq!(
            classify(&labels(&[
                (TARGET_REF, "sha256:c"),
                (NYDUS_BOOTSTRAP, "true")
            ])),
            Prepared::Layer
        );
        assert_eq!(
            classify(&labels(&[(TARGET_REF, "sha256:c")])),
            Prepared::Layer
        );
    }

    #[test]
    fn the_image_comes_from_cri_or_stargz_labels() {
        let cri = labels(&[
            (CRI_IMAGE_REF, "reg:5000/app:1"),
            (STARGZ_REFERENCE, "ignored/when:cri"),
        ]);
        assert_eq!(image_reference(&cri).unwrap(), "reg:5000/app:1");
        let rpull = labels(&[(STARGZ_REFERENCE, "reg:5000/app:2")]);
        assert_eq!(image_reference(&rpull).unwrap(), "reg:5000/app:2");
        assert_eq!(
            image_reference(&labels(&[(NYDUS_BOOTSTRAP, "true"), (CRI_IMAGE_REF, "")])),
            Err(OriginError::NoReference)
        );
    }
}
