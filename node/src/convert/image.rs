//! The two image forms `shoal convert` reads and writes, as pure functions: classify a source
//! manifest (index, image, or something that is not a container image), and write the Nydus
//! form — config with the new diff ids, image manifest, bootstrap layer, index.
//!
//! Output is deterministic (same inputs, same bytes), so a rerun produces the same digests and
//! the target's HEAD finds everything already there.
//!
//! Registry form (nydusify's): data layers `application/vnd.oci.image.layer.nydus.blob.v1`
//! annotated `containerd.io/snapshot/nydus-blob: "true"` in bootstrap blob order, then the
//! bootstrap layer, a tar.gz holding `image/image.boot`, annotated
//! `containerd.io/snapshot/nydus-bootstrap: "true"` and `…/nydus-fs-version: "6"`. A Nydus data
//! blob is stored as is, so its diff id is its digest; the bootstrap layer's is the sha256 of
//! its tar.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use shoal_proto::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
pub const BOOTSTRAP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const BLOB_ANNOTATION: &str = "containerd.io/snapshot/nydus-blob";
pub const BOOTSTRAP_ANNOTATION: &str = "containerd.io/snapshot/nydus-bootstrap";
pub const FS_VERSION_ANNOTATION: &str = "containerd.io/snapshot/nydus-fs-version";

/// Layer media types the builder reads (plain, gzip or zstd tar).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Why a source manifest cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} is not a container image: {reason}")]
    NotAnImage { what: String, reason: String },
    #[error("{what} is already a Nydus image (it has a layer of type {NYDUS_BLOB} or annotated {BOOTSTRAP_ANNOTATION})")]
    AlreadyNydus { what: String },
    #[error("{what} is a Docker schema 1 manifest, which shoal does not convert; re-push it with a current client")]
    Schema1 { what: String },
    #[error("image index {what} has no manifest for platform {platform} (it has: {have})")]
    NoPlatform {
        what: String,
        platform: String,
        have: String,
    },
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
}

/// A content descriptor as it appears in manifests and indexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Desc {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Value>,
}

/// A source image manifest.
#[derive(Debug, Clone)]
pub struct SourceImage {
    pub config: Desc,
    pub layers: Vec<Desc>,
    pub annotations: BTreeMap<String, String>,
}

/// What a source reference names.
#[derive(Debug, Clone)]
pub enum Source {
    /// Platform manifests, already filtered (attestations dropped, `--platform` applied).
    Index(Vec<Desc>),
    Image(SourceImage),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Desc>>,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Option<Vec<Desc>>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Classify manifest `bytes` (`what` names it in errors; `content_type` is the response's).
/// An index keeps the entries for `platform` (`os/arch[/variant]`), or all real platforms.
pub fn classify(
    what: &str,
    content_type: &str,
    bytes: &[u8],
    platform: Option<&str>,
) -> Result<Source, ImageError> {
    let malformed = |reason: String| ImageError::Malformed {
        what: what.to_owned(),
        reason,
    };
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|e| malformed(format!("not a manifest: {e}")))?;
    let media_type = raw.media_type.as_deref().unwrap_or(content_type);
    if raw.schema_version == Some(1)
        || media_type.starts_with("application/vnd.docker.distribution.manifest.v1")
    {
        return Err(ImageError::Schema1 {
            what: what.to_owned(),
        });
    }
    if let Some(entries) = raw.manifests {
        if raw.layers.is_some() {
            return Err(malformed("both `manifests` and `layers`".into()));
        }
        return pick(what, entries, platform).map(Source::Index);
    }
    let (Some(config), Some(layers)) = (raw.config, raw.layers) else {
        return Err(ImageError::NotAnImage {
            what: what.to_owned(),
            reason: format!(
                "a {} document without config and layers",
                if media_type.is_empty() {
                    "JSON"
                } else {
                    media_type
                }
            ),
        });
    };
    if config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
        return Err(ImageError::NotAnImage {
            what: what.to_owned(),
            reason: format!(
                "its config has media type {:?} (an OCI artifact, not an image)",
                config.media_type
            ),
        });
    }
    for l in &layers {
        let marked = |k: &str| l.annotations.get(k).is_some_and(|v| v == "true");
        if l.media_type == NYDUS_BLOB || marked(BOOTSTRAP_ANNOTATION) || marked(BLOB_ANNOTATION) {
            return Err(ImageError::AlreadyNydus {
                what: what.to_owned(),
            });
        }
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ImageError::NotAnImage {
                what: what.to_owned(),
                reason: format!("layer {} has media type {:?}", l.digest, l.media_type),
            });
        }
    }
    Ok(Source::Image(SourceImage {
        config,
        layers,
        annotations: raw.annotations,
    }))
}

/// `os/arch[/variant]` of an index entry.
pub fn platform_name(d: &Desc) -> Option<String> {
    let p = d.platform.as_ref()?;
    let os = p["os"].as_str()?;
    let arch = p["architecture"].as_str()?;
    Some(match p["variant"].as_str() {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    })
}

fn pick(what: &str, entries: Vec<Desc>, platform: Option<&str>) -> Result<Vec<Desc>, ImageError> {
    let real: Vec<Desc> = entries
        .into_iter()
        .filter(|d| {
            // Build attestations are index entries with an `unknown/unknown` platform.
            !d.annotations.contains_key("vnd.docker.reference.type")
                && platform_name(d).is_some_and(|p| !p.starts_with("unknown/"))
        })
        .collect();
    let Some(want) = platform else {
        if real.is_empty() {
            return Err(ImageError::NotAnImage {
                what: what.to_owned(),
                reason: "an index without any platform image".into(),
            });
        }
        return Ok(real);
    };
    let matches = |p: &str| {
        p == want || (want.matches('/').count() == 1 && p.starts_with(&format!("{want}/")))
    };
    let chosen: Vec<Desc> = real
        .iter()
        .filter(|d| platform_name(d).is_some_and(|p| matches(&p)))
        .take(1)
        .cloned()
        .collect();
    if chosen.is_empty() {
        let have: Vec<String> = real.iter().filter_map(platform_name).collect();
        return Err(ImageError::NoPlatform {
            what: what.to_owned(),
            platform: want.to_owned(),
            have: have.join(", "),
        });
    }
    Ok(chosen)
}

/// `os/arch[/variant]` from an image config (for `--platform` on a single-manifest source).
pub fn config_platform(config: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(config).ok()?;
    let os = v["os"].as_str()?;
    let arch = v["architecture"].as_str()?;
    Some(match v["variant"].as_str() {
        Some(var) => format!("{os}/{arch}/{var}"),
        None => format!("{os}/{arch}"),
    })
}

/// The Nydus config: the source config with `rootfs.diff_ids` = the new layers' diff ids and a
/// history entry for the bootstrap layer (as nydusify writes it).
pub fn nydus_config(
    what: &str,
    source: &[u8],
    blobs: &[(Digest, u64)],
    bootstrap_diff_id: &Digest,
) -> Result<Vec<u8>, ImageError> {
    let mut v: Value = serde_json::from_slice(source).map_err(|e| ImageError::Malformed {
        what: what.to_owned(),
        reason: format!("config is not JSON: {e}"),
    })?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ImageError::Malformed {
            what: what.to_owned(),
            reason: "config is not a JSON object".into(),
        });
    };
    let diff_ids: Vec<String> = blobs
        .iter()
        .map(|(d, _)| d.to_string())
        .chain(std::iter::once(bootstrap_diff_id.to_string()))
        .collect();
    obj.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let history = obj.entry("history").or_insert_with(|| json!([]));
    if let Some(h) = history.as_array_mut() {
        h.push(json!({"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}));
    }
    Ok(serde_json::to_vec(&v).unwrap_or_default())
}

/// The Nydus image manifest.
pub fn nydus_manifest(
    config: (&Digest, u64),
    blobs: &[(Digest, u64)],
    bootstrap: (&Digest, u64),
    annotations: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut layers: Vec<Value> = blobs
        .iter()
        .map(|(d, s)| {
            json!({"mediaType": NYDUS_BLOB, "digest": d, "size": s,
                   "annotations": {BLOB_ANNOTATION: "true"}})
        })
        .collect();
    layers.push(json!({
        "mediaType": BOOTSTRAP_LAYER,
        "digest": bootstrap.0,
        "size": bootstrap.1,
        "annotations": {BOOTSTRAP_ANNOTATION: "true", FS_VERSION_ANNOTATION: "6"},
    }));
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.0, "size": config.1},
        "layers": layers,
    });
    if !annotations.is_empty() {
        m["annotations"] = json!(annotations);
    }
    serde_json::to_vec(&m).unwrap_or_default()
}

/// An OCI index of `(manifest digest, size, platform)`.
pub fn nydus_index(entries: &[(Digest, u64, Option<Value>)]) -> Vec<u8> {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(d, s, p)| {
            let mut e = json!({"mediaType": OCI_MANIFEST, "digest": d, "size": s});
            if let Some(p) = p {
                e["platform"] = p.clone();
            }
            e
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .unwrap_or_default()
}

/// The bootstrap layer: `(tar.gz bytes, diff id = sha256 of the tar)`.
pub fn bootstrap_layer(bootstrap: &[u8]) -> std::io::Result<(Vec<u8>, Digest)> {
    use std::io::Write as _;
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("image/image.boot")?;
    h.set_mode(0o644);
    h.set_size(bootstrap.len() as u64);
    h.set_mtime(0);
    h.set_cksum();
    tar.append(&h, bootstrap)?;
    let tar = tar.into_inner()?;
    let diff_id = Digest::sha256(&tar);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    Ok((gz.finish()?, diff_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(config_type: &str, layer_type: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": D1, "size": 10},
            "layers": [{"mediaType": layer_type, "digest": D2, "size": 20}],
        }))
        .expect("json")
    }

    #[test]
    fn classifies_images_artifacts_and_nydus() {
        let ok = manifest(OCI_CONFIG, "application/vnd.oci.image.layer.v1.tar+gzip");
        assert!(matches!(
            classify("m", OCI_MANIFEST, &ok, None),
            Ok(Source::Image(_))
        ));
        let art = manifest(
            "application/vnd.cncf.helm.config.v1+json",
            "application/tar",
        );
        let e = classify("m", OCI_MANIFEST, &art, None).expect_err("artifact");
        assert!(e.to_string().contains("not a container image"), "{e}");
        let ny = manifest(OCI_CONFIG, NYDUS_BLOB);
        assert!(matches!(
            classify("m", OCI_MANIFEST, &ny, None),
            Err(ImageError::AlreadyNydus { .. })
        ));
        let s1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            classify("m", "", s1, None),
            Err(ImageError::Schema1 { .. })
        ));
        assert!(classify("m", "", b"<html>", None).is_err());
    }

    #[test]
    fn picks_platforms_and_drops_attestations() {
        let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": D1, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": D2, "size": 2, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": OCI_MANIFEST, "digest": D2, "size": 3, "platform": {"os": "unknown", "architecture": "unknown"},
             "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        ]}))
        .expect("json");
        let Ok(Source::Index(all)) = classify("i", OCI_INDEX, &idx, None) else {
            panic!("index")
        };
        assert_eq!(all.len(), 2);
        let Ok(Source::Index(arm)) = classify("i", OCI_INDEX, &idx, Some("linux/arm64")) else {
            panic!("arm64")
        };
        assert_eq!(arm[0].size, 2);
        let e = classify("i", OCI_INDEX, &idx, Some("linux/s390x")).expect_err("none");
        assert!(e.to_string().contains("linux/amd64"), "{e}");
    }

    #[test]
    fn writes_the_nydus_form_deterministically() {
        let d1: Digest = D1.parse().expect("d");
        let d2: Digest = D2.parse().expect("d");
        let cfg = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["x"]},"history":[{"created_by":"a"}]}"#;
        let (layer, diff) = bootstrap_layer(b"boot").expect("tar");
        assert_eq!(bootstrap_layer(b"boot").expect("tar").0, layer);
        let c = nydus_config("c", cfg, &[(d1.clone(), 5)], &diff).expect("config");
        let v: Value = serde_json::from_slice(&c).expect("json");
        assert_eq!(v["rootfs"]["diff_ids"], json!([D1, diff.to_string()]));
        assert_eq!(v["history"].as_array().map(Vec::len), Some(2));
        let m = nydus_manifest((&d2, 9), &[(d1, 5)], (&diff, 7), &BTreeMap::new());
        let v: Value = serde_json::from_slice(&m).expect("json");
        assert_eq!(v["layers"][0]["mediaType"], NYDUS_BLOB);
        assert_eq!(v["layers"][1]["annotations"][FS_VERSION_ANNOTATION], "6");
        // The node's mount code reads it as a Nydus image.
        let crate::mount::image::Manifest::Image { layers } =
            crate::mount::image::Manifest::parse("m", &m).expect("parse")
        else {
            panic!("image")
        };
        let n = crate::mount::image::nydus_layers("m", &layers).expect("nydus");
        assert_eq!(n.blobs.len(), 1);
    }
}
