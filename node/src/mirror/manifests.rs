//! `GET`/`HEAD /v2/<name>/manifests/<reference>`.
//!
//! By digest: served from the store forever once fetched (content-addressed,
//! checked against the digest before it is kept). By tag: the tag → digest
//! answer is reused for `mirror.tag_ttl`, then asked again; when the origin
//! cannot be reached a stale answer is served. Every answer from the store
//! passes the access check first.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use reqwest::Method;
use shoal_proto::{Digest, Reference, RepoName, Tag};

use super::{api_headers, Ctx, MirrorError, MirrorState, MANIFEST_ACCEPT};
use crate::access::{Decision, Object};
use crate::store::{ManifestRecord, Provenance, RepoKey, TagRecord};
use crate::upstream::AuthMode;

pub(super) async fn get(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    reference: &Reference,
) -> Result<Response, MirrorError> {
    match reference {
        Reference::Digest(d) => by_digest(st, ctx, repo, d).await,
        Reference::Tag(t) => by_tag(st, ctx, repo, t).await,
    }
}

async fn by_digest(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response, MirrorError> {
    if let Some(rec) = st.store.get_manifest(digest).map_err(internal)? {
        if accepts(&ctx.headers, &rec.media_type) {
            return serve_cached(st, ctx, repo, rec).await;
        }
    }
    let fetched = fetch(st, ctx, repo, &digest.to_string()).await?;
    if fetched.digest != *digest {
        return Err(MirrorError::DigestMismatch {
            digest: digest.to_string(),
        });
    }
    Ok(respond(st, ctx, &fetched))
}

async fn by_tag(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    tag: &Tag,
) -> Result<Response, MirrorError> {
    let host = ctx.origin.host.clone();
    let cached = st.store.get_tag(&host, repo, tag).map_err(internal)?;
    let ttl_ms = st.cfg.tag_ttl.0.as_millis() as u64;
    if let Some(t) = &cached {
        if now_ms().saturating_sub(t.fetched_at_ms) < ttl_ms && accepts(&ctx.headers, &t.media_type)
        {
            if let Some(rec) = st.store.get_manifest(&t.digest).map_err(internal)? {
                return serve_cached(st, ctx, repo, rec).await;
            }
        }
    }
    match fetch(st, ctx, repo, tag.as_str()).await {
        Ok(rec) => {
            let key = RepoKey {
                upstream: host.clone(),
                repo: repo.clone(),
            };
            let tr = TagRecord {
                digest: rec.digest.clone(),
                media_type: rec.media_type.clone(),
                fetched_at_ms: now_ms(),
                public: rec.repos.is_open(&key),
            };
            st.store.put_tag(&host, repo, tag, &tr).map_err(internal)?;
            Ok(respond(st, ctx, &rec))
        }
        // Origin down: a stale answer is better than none.
        Err(
            e @ (MirrorError::OriginUnavailable { .. }
            | MirrorError::OriginStatus { .. }
            | MirrorError::Origin(_)),
        ) => {
            let Some(t) = cached else { return Err(e) };
            let Some(rec) = st.store.get_manifest(&t.digest).map_err(internal)? else {
                return Err(e);
            };
            tracing::warn!(error = %e, %repo, %tag, "origin unavailable; serving stale tag");
            serve_cached(st, ctx, repo, rec).await
        }
        Err(e) => Err(e),
    }
}

/// A stored manifest, after the access check: from the store when access is proven, else (an
/// origin whose word proves nothing) fetched again from that origin for this client.
async fn serve_cached(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    rec: ManifestRecord,
) -> Result<Response, MirrorError> {
    match st
        .access
        .check(
            &ctx.origin,
            repo,
            Object::Manifest(&rec.digest),
            ctx.client_auth.as_ref(),
            Some(&rec.repos),
        )
        .await
    {
        Decision::Cache { .. } => Ok(respond(st, ctx, &rec)),
        Decision::OriginOnly { .. } => {
            let fetched = fetch(st, ctx, repo, &rec.digest.to_string()).await?;
            if fetched.digest != rec.digest {
                return Err(MirrorError::DigestMismatch {
                    digest: rec.digest.to_string(),
                });
            }
            Ok(respond(st, ctx, &fetched))
        }
        Decision::Denied(d) => Err(MirrorError::from_denial(d, MirrorError::ManifestUnknown)),
    }
}

/// Fetch a manifest from the origin with the client's (or the node's)
/// credentials, check it, store it.
async fn fetch(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    reference: &str,
) -> Result<ManifestRecord, MirrorError> {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let mut headers = HeaderMap::new();
    let accept = ctx
        .headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    let accept = if accept.is_empty() {
        MANIFEST_ACCEPT.to_owned()
    } else {
        accept
    };
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert(header::ACCEPT, v);
    }
    let auth = ctx.auth_mode();
    let resp = ctx
        .origin
        .send(Method::GET, &path, &headers, &auth, Some(repo), "manifest")
        .await
        .map_err(|e| MirrorError::OriginUnavailable {
            reason: e.to_string(),
        })?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            return Err(MirrorError::Unauthorized {
                challenge: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
            })
        }
        StatusCode::FORBIDDEN => return Err(MirrorError::Denied),
        StatusCode::NOT_FOUND => return Err(MirrorError::ManifestUnknown),
        status => return Err(MirrorError::OriginStatus { status }),
    }
    let limit = st.cfg.max_manifest_size.0;
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(MirrorError::ManifestTooLarge { limit });
    }
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
    let origin_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let bytes = read_limited(resp, limit).await?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| MirrorError::ManifestInvalid {
            reason: format!("not JSON: {e}"),
        })?;
    let media_type = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .or(ctype)
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned());
    let algorithm = origin_digest
        .as_ref()
        .map_or(shoal_proto::DigestAlgorithm::Sha256, |d| d.algorithm());
    let digest = Digest::of(algorithm, &bytes);
    if origin_digest.as_ref().is_some_and(|d| *d != digest) {
        return Err(MirrorError::ManifestInvalid {
            reason: "body does not match the origin's Docker-Content-Digest".into(),
        });
    }
    // Fetched without the client's credentials: open there. With them: open only if the
    // (configured) origin serves it without them too.
    let open = match &auth {
        AuthMode::Node => true,
        AuthMode::Client(v) => {
            st.access
                .granted(&ctx.origin, repo, Object::Manifest(&digest), v);
            st.access
                .is_open(&ctx.origin, repo, Object::Manifest(&digest))
                .await
        }
    };
    let key = RepoKey {
        upstream: ctx.origin.host.clone(),
        repo: repo.clone(),
    };
    let rec = ManifestRecord {
        digest,
        media_type,
        bytes: bytes.to_vec(),
        repos: Provenance::one(key, open),
    };
    st.store.put_manifest(&rec).map_err(internal)?;
    Ok(rec)
}

async fn read_limited(
    mut resp: reqwest::Response,
    limit: u64,
) -> Result<bytes::Bytes, MirrorError> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| MirrorError::OriginUnavailable {
            reason: e.to_string(),
        })?
    {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(MirrorError::ManifestTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

fn respond(st: &MirrorState, ctx: &Ctx, rec: &ManifestRecord) -> Response {
    let body = if ctx.method == Method::HEAD {
        Body::empty()
    } else {
        st.metrics.served("manifest", rec.bytes.len() as u64);
        Body::from(rec.bytes.clone())
    };
    let mut out = Response::new(body);
    let h = out.headers_mut();
    h.extend(api_headers());
    if let Ok(v) = HeaderValue::from_str(&rec.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&rec.digest.to_string()) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", rec.digest)) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(rec.bytes.len() as u64),
    );
    out
}

/// Whether the client's `Accept` admits `media_type` (no header: anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for item in v.split(',') {
            any = true;
            let t = item.split(';').next().unwrap_or("").trim();
            if t == media_type || t == "*/*" {
                return true;
            }
        }
    }
    !any
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn internal(e: impl std::fmt::Display) -> MirrorError {
    MirrorError::Internal(e.to_string())
}
