//! From an image reference to a verified, opened bootstrap: tag → manifest (→ index → platform
//! manifest) from the node's manifest/tag cache (what the mirror and prewarm keep; tags within
//! `mirror.tag_ttl`, stale ones when the origin is down), else through the node's origin code with
//! the node's credentials, then the bootstrap
//! layer through the node's single-flight download path (so it lands verified in the store),
//! then `image/image.boot` out of its tar.gz — or, when the bootstrap layer is a Nydus data blob
//! carrying its bootstrap at its end (`nydus-image --blob-inline-meta`), out of that blob's tail.
//!
//! Invariants: a manifest fetched by digest must hash to it; the bootstrap layer is read only
//! from a store record marked complete (whole-blob digest checked by the download), so the
//! bootstrap — and through it every chunk digest — is anchored in the manifest.

use std::io::Read;
use std::sync::Arc;

use shoal_proto::{Digest, Reference, RepoName};
use shoal_rafs::{Bootstrap, MAX_BOOTSTRAP_SIZE};

use super::image::{
    nydus_layers, pick_platform, Descriptor, ImageRef, Manifest, NydusLayers, BOOTSTRAP_PATH,
    NYDUS_BLOB_MEDIA_TYPE,
};
use super::MountError;
use crate::download::{Downloads, Join, Source, State};
use crate::store::Store;
use crate::upstream::{AuthMode, ManifestError, Origin, Upstreams};

/// Largest bootstrap layer (tar.gz) accepted.
const MAX_BOOTSTRAP_LAYER: u64 = 1 << 30;

/// An image resolved to its Nydus layers on one origin.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub origin: Arc<Origin>,
    pub repo: RepoName,
    pub manifest_digest: Digest,
    pub layers: NydusLayers,
}

/// Where manifests come from: the node's manifest and tag cache (what the
/// mirror and prewarm keep), then the origin.
pub struct Cache<'a> {
    pub store: &'a Store,
    /// How long a cached tag answer is used without asking the origin
    /// (`mirror.tag_ttl`); a stale one is used when the origin is down.
    pub tag_ttl: std::time::Duration,
}

/// Resolve `image` for `platform` (`os/arch[/variant]`) on the node's origins.
pub async fn resolve(
    upstreams: &Upstreams,
    cache: &Cache<'_>,
    image: &ImageRef,
    platform: &str,
) -> Result<Resolved, MountError> {
    let origin = upstreams.select(image.host.as_deref(), None)?;
    let repo = image.repo.clone();
    let (mut digest, mut bytes) = manifest(cache, &origin, &repo, &image.reference).await?;
    for _ in 0..2 {
        let Manifest::Index(entries) = Manifest::parse(&digest.to_string(), &bytes)? else {
            break;
        };
        let d = pick_platform(&entries, &digest, platform)?.digest.clone();
        (digest, bytes) = manifest(cache, &origin, &repo, &Reference::Digest(d)).await?;
    }
    let Manifest::Image { layers } = Manifest::parse(&digest.to_string(), &bytes)? else {
        return Err(MountError::Fetch {
            what: format!("manifest {digest}"),
            reason: "an index nested too deep".into(),
        });
    };
    let layers = nydus_layers(&image.to_string(), &layers)?;
    Ok(Resolved {
        origin,
        repo,
        manifest_digest: digest,
        layers,
    })
}

/// A manifest from the node's cache when it holds it for this repository
/// (by digest; by tag within `tag_ttl`), else from the origin; a stale tag
/// answer when the origin cannot be asked.
async fn manifest(
    cache: &Cache<'_>,
    origin: &Origin,
    repo: &RepoName,
    reference: &Reference,
) -> Result<(Digest, Vec<u8>), MountError> {
    let key = crate::store::RepoKey {
        upstream: origin.host.clone(),
        repo: repo.clone(),
    };
    let stored = |d: &Digest| -> Option<Vec<u8>> {
        let rec = cache.store.get_manifest(d).ok().flatten()?;
        // Only where the node itself was let read it: a manifest a client fetched with its own
        // credentials is that client's, not every mount's.
        rec.repos.is_open(&key).then_some(rec.bytes)
    };
    match reference {
        Reference::Digest(d) => {
            if let Some(bytes) = stored(d) {
                return Ok((d.clone(), bytes));
            }
            fetch_manifest(origin, repo, reference).await
        }
        Reference::Tag(tag) => {
            let cached = cache.store.get_tag(&origin.host, repo, tag).ok().flatten();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let ttl = cache.tag_ttl.as_millis() as u64;
            if let Some(t) = cached
                .as_ref()
                .filter(|t| now.saturating_sub(t.fetched_at_ms) < ttl)
            {
                if let Some(bytes) = stored(&t.digest) {
                    return Ok((t.digest.clone(), bytes));
                }
            }
            match fetch_manifest(origin, repo, reference).await {
                Ok(found) => Ok(found),
                // Origin down (or failing): a stale answer beats none. A
                // refusal (401, 404) is the origin's answer and stands.
                Err(e @ (MountError::Origin(_) | MountError::Fetch { .. }))
                | Err(e @ MountError::Status { status: 500.., .. }) => {
                    let Some((t, bytes)) = cached.and_then(|t| stored(&t.digest).map(|b| (t, b)))
                    else {
                        return Err(e);
                    };
                    tracing::warn!(error = %e, %repo, %tag, "origin unavailable; using the cached tag");
                    Ok((t.digest, bytes))
                }
                Err(e) => Err(e),
            }
        }
    }
}

async fn fetch_manifest(
    origin: &Origin,
    repo: &RepoName,
    reference: &Reference,
) -> Result<(Digest, Vec<u8>), MountError> {
    let what = format!("manifest {repo}:{reference}");
    match origin.get_manifest(repo, reference).await {
        Ok(m) => Ok((m.digest, m.bytes)),
        Err(ManifestError::Status(status)) => Err(MountError::Status { what, status }),
        Err(e) => Err(MountError::Fetch {
            what,
            reason: e.to_string(),
        }),
    }
}

/// Whether the node itself may read blob `digest` of `repo` at `origin`, and its size when the
/// origin said. A lazy mount reads with the node's credentials for whoever asked for it (a
/// container's image, a control-socket user), and the image's bootstrap — authored by whoever
/// pushed it — names the blobs: so stored, peer or shared bytes of a blob serve a mount only
/// where the origin is configured (its answer is trusted) and lets the node read that very blob
/// in that very repository (provenance recorded open there, or a `HEAD` now). Otherwise the
/// mount gets only what that origin sends, fetched for it alone.
pub async fn node_access(
    store: &Store,
    origin: &Origin,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Option<u64>, String> {
    if !origin.configured {
        return Err(format!(
            "{} is not a configured upstream: its answers prove nothing",
            origin.host
        ));
    }
    let key = crate::store::RepoKey {
        upstream: origin.host.clone(),
        repo: repo.clone(),
    };
    if let Ok(Some(rec)) = store.blob(digest) {
        if rec.repos.is_open(&key) {
            return Ok(rec.complete.then_some(rec.size));
        }
    }
    let path = format!("/v2/{repo}/blobs/{digest}");
    let resp = origin
        .send(
            reqwest::Method::HEAD,
            &path,
            &reqwest::header::HeaderMap::new(),
            &AuthMode::Node,
            Some(repo),
            "access",
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        // Remembered where the store holds (some of) it, as the mirror remembers what the node's
        // credentials read: the next mount (or a restart with the origin down) needs no HEAD.
        let (store, id) = (store.clone(), digest.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if matches!(store.blob(&id), Ok(Some(_))) {
                let _ = store.add_repo(&id, key, true);
            }
        })
        .await;
    }
    if status.is_success() {
        let size = resp
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        return Ok(size);
    }
    if status.is_redirection() {
        // Registries redirect to their blob storage only for a blob the repository has.
        return Ok(None);
    }
    Err(format!(
        "{} answered {status} to the node's HEAD of {digest} in {repo}",
        origin.host
    ))
}

/// Fetch the bootstrap layer and open its `image/image.boot`: through the download path (the
/// store) when the node may read it there ([`node_access`]); from an unlisted origin, for this
/// mount alone (never from or into the store).
pub async fn bootstrap(
    store: &Store,
    downloads: &Downloads,
    resolved: &Resolved,
) -> Result<Bootstrap, MountError> {
    let desc = &resolved.layers.bootstrap;
    let fail = |reason: String| MountError::Bootstrap {
        digest: desc.digest.clone(),
        reason,
    };
    // A data blob carrying the bootstrap is fetched whole too (its digest anchors the
    // bootstrap), whatever its size.
    if desc.size > MAX_BOOTSTRAP_LAYER && desc.media_type != NYDUS_BLOB_MEDIA_TYPE {
        return Err(fail(format!("layer of {} bytes is too large", desc.size)));
    }
    if !resolved.origin.configured {
        return bootstrap_alone(resolved).await;
    }
    node_access(store, &resolved.origin, &resolved.repo, &desc.digest)
        .await
        .map_err(|reason| fail(format!("the node may not read it: {reason}")))?;
    let source = Source {
        origin: resolved.origin.clone(),
        repo: resolved.repo.clone(),
        auth: AuthMode::Node,
        // The configured origin just let the node read it there.
        open: true,
        isolated: false,
    };
    if let Join::Download(d) = downloads.join_shared(&desc.digest, source).await? {
        let mut rx = d.subscribe();
        loop {
            match &rx.borrow_and_update().state {
                State::Complete => break,
                State::Failed(e) => return Err(fail(format!("download failed: {e}"))),
                State::Running => {}
            }
            if rx.changed().await.is_err() {
                return Err(fail("download ended without a result".into()));
            }
        }
    }
    let (store, desc) = (store.clone(), desc.clone());
    tokio::task::spawn_blocking(move || open_bootstrap(&store, &desc))
        .await
        .map_err(|e| fail(format!("blocking task failed: {e}")))?
}

/// The bootstrap layer straight from an unlisted origin, digest-checked, kept in memory only.
async fn bootstrap_alone(resolved: &Resolved) -> Result<Bootstrap, MountError> {
    let desc = &resolved.layers.bootstrap;
    let fail = |reason: String| MountError::Bootstrap {
        digest: desc.digest.clone(),
        reason,
    };
    if desc.size > MAX_BOOTSTRAP_LAYER {
        return Err(fail(format!(
            "layer of {} bytes is too large to hold in memory",
            desc.size
        )));
    }
    let path = format!("/v2/{}/blobs/{}", resolved.repo, desc.digest);
    let resp = resolved
        .origin
        .send(
            reqwest::Method::GET,
            &path,
            &reqwest::header::HeaderMap::new(),
            &AuthMode::Node,
            Some(&resolved.repo),
            "bootstrap",
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("the origin answered {}", resp.status())));
    }
    let layer = crate::upstream::read_at_most(resp, desc.size.min(MAX_BOOTSTRAP_LAYER))
        .await
        .map_err(fail)?;
    if Digest::of(desc.digest.algorithm(), &layer) != desc.digest {
        return Err(fail("the origin's bytes do not match the digest".into()));
    }
    let d = desc.digest.clone();
    tokio::task::spawn_blocking(move || {
        let fail = |reason: String| MountError::Bootstrap {
            digest: d.clone(),
            reason,
        };
        // A Nydus data blob carrying its bootstrap at its end, else a tar of `image/image.boot`.
        let mut read_at = |off: u64, len: u64| -> shoal_rafs::Result<Vec<u8>> {
            let end = off.checked_add(len).filter(|&e| e <= layer.len() as u64);
            end.and_then(|e| layer.get(off as usize..e as usize))
                .map(<[u8]>::to_vec)
                .ok_or(shoal_rafs::Error::OutOfBounds {
                    what: "bootstrap layer",
                    offset: off,
                    len,
                    limit: layer.len() as u64,
                })
        };
        let inlined = Bootstrap::from_blob_tail(layer.len() as u64, &mut read_at, &d.hex());
        if let Ok(Some(boot)) = inlined {
            return Ok(boot);
        }
        let boot = extract_bootstrap(&layer).map_err(fail)?;
        Bootstrap::from_bytes(boot).map_err(|e| fail(format!("not a usable RAFS bootstrap: {e}")))
    })
    .await
    .map_err(|e| fail(format!("blocking task failed: {e}")))?
}

fn open_bootstrap(store: &Store, desc: &Descriptor) -> Result<Bootstrap, MountError> {
    let fail = |reason: String| MountError::Bootstrap {
        digest: desc.digest.clone(),
        reason,
    };
    let reader = store
        .open_reader(&desc.digest)?
        .filter(|r| r.record().complete)
        .ok_or_else(|| fail("not complete in the store after its download".into()))?;
    // A Nydus data blob carrying its bootstrap at its end (`nydus-image --blob-inline-meta`):
    // read from the verified blob, under the blob's own id.
    let size = reader.size();
    let mut read_at = |off: u64, len: u64| -> shoal_rafs::Result<Vec<u8>> {
        read_exact(&reader, off, len).map_err(|e| shoal_rafs::Error::Io {
            path: std::path::PathBuf::from(format!("store:{}", desc.digest)),
            source: std::io::Error::other(e),
        })
    };
    match Bootstrap::from_blob_tail(size, &mut read_at, &desc.digest.hex()) {
        Ok(Some(boot)) => return Ok(boot),
        Ok(None) => {}
        Err(e) if !looks_like_tar(&reader) => {
            return Err(fail(format!("its inlined bootstrap: {e}")))
        }
        Err(_) => {}
    }
    if size > MAX_BOOTSTRAP_LAYER {
        return Err(fail(format!("layer of {size} bytes is too large")));
    }
    let mut layer = vec![0u8; reader.size() as usize];
    let mut filled = 0;
    while filled < layer.len() {
        let n = reader.read_at(filled as u64, &mut layer[filled..])?;
        if n == 0 {
            return Err(fail("store content shorter than its record".into()));
        }
        filled += n;
    }
    let boot = extract_bootstrap(&layer).map_err(fail)?;
    Bootstrap::from_bytes(boot).map_err(|e| fail(format!("not a usable RAFS bootstrap: {e}")))
}

/// `len` bytes at `off` of a stored blob.
fn read_exact(reader: &crate::store::BlobReader, off: u64, len: u64) -> Result<Vec<u8>, String> {
    if off.checked_add(len).is_none_or(|end| end > reader.size()) || len > MAX_BOOTSTRAP_SIZE {
        return Err(format!(
            "range {off}+{len} outside the {}-byte blob",
            reader.size()
        ));
    }
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read_at(off + filled as u64, &mut buf[filled..]) {
            Ok(0) => return Err("store content shorter than its record".into()),
            Ok(n) => filled += n,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(buf)
}

/// Whether a stored layer starts like a (gzip-compressed) tar rather than a Nydus data blob.
fn looks_like_tar(reader: &crate::store::BlobReader) -> bool {
    let Ok(head) = read_exact(reader, 0, 262.min(reader.size())) else {
        return false;
    };
    head.starts_with(&[0x1f, 0x8b]) || head.get(257..262) == Some(b"ustar")
}

/// `image/image.boot` from a bootstrap layer (tar, gzip-compressed or not).
pub fn extract_bootstrap(layer: &[u8]) -> Result<Vec<u8>, String> {
    let gz = layer.starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn Read + '_> = if gz {
        Box::new(flate2::read::GzDecoder::new(layer))
    } else {
        Box::new(layer)
    };
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| format!("bad tar: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("bad tar: {e}"))?;
        let path = entry.path().map_err(|e| format!("bad tar: {e}"))?;
        let path = path.to_string_lossy();
        if path.trim_start_matches("./").trim_start_matches('/') != BOOTSTRAP_PATH {
            continue;
        }
        let size = entry.size();
        if size > MAX_BOOTSTRAP_SIZE {
            return Err(format!("{BOOTSTRAP_PATH} of {size} bytes is too large"));
        }
        let mut out = Vec::with_capacity(size as usize);
        entry
            .by_ref()
            .take(size)
            .read_to_end(&mut out)
            .map_err(|e| format!("reading {BOOTSTRAP_PATH}: {e}"))?;
        return Ok(out);
    }
    Err(format!("no {BOOTSTRAP_PATH} in the layer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(path: &str, data: &[u8], gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("append");
        let tar = b.into_inner().expect("tar");
        if !gzip {
            return tar;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).expect("gz");
        gz.finish().expect("gz")
    }

    #[test]
    fn extracts_image_boot_from_tar_and_tar_gz() {
        assert_eq!(
            extract_bootstrap(&layer("image/image.boot", b"boot", true)).expect("gz"),
            b"boot"
        );
        assert_eq!(
            extract_bootstrap(&layer("./image/image.boot", b"boot", false)).expect("tar"),
            b"boot"
        );
        assert!(extract_bootstrap(&layer("image/other", b"x", true)).is_err());
        assert!(extract_bootstrap(b"garbage").is_err());
    }
}
