//! `GET`/`HEAD /v2/<name>/blobs/<digest>`, with `Range`.
//!
//! Complete blobs are served from the store after the access check; others
//! join the node's single download of that blob and stream as it arrives.
//! A range far ahead of a running download is fetched from the origin
//! directly, so a random reader never waits behind a whole-blob download.
//! A requester whose access is not proven (`access::Decision::OriginOnly`)
//! gets only its origin's bytes: an isolated download of its own, or a relay.

use std::ops::Range;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use reqwest::Method;
use shoal_proto::{BlobId, RepoName};

use super::range::{self, RangeError};
use super::{api_headers, relay, Ctx, MirrorError, MirrorState};
use crate::access::{Decision, Object};
use crate::download::{DownloadError, Join, Source};
use crate::store::{RepoKey, StoreError};
use crate::upstream::AuthMode;

/// How far ahead of a running download a range must start to be fetched
/// from the origin directly.
const DIRECT_RANGE_AHEAD: u64 = 32 << 20;
const READ_CHUNK: usize = 1 << 20;

pub(super) async fn get(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    digest: &BlobId,
) -> Result<Response, MirrorError> {
    let range_req = match ctx.headers.get(header::RANGE) {
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            Some(range::parse(s).map_err(|_| MirrorError::RangeInvalid {
                header: s.chars().take(100).collect(),
            })?)
        }
        None => None,
    };
    let record = {
        let (store, id) = (st.store.clone(), digest.clone());
        tokio::task::spawn_blocking(move || store.blob(&id))
            .await
            .map_err(internal)?
            .map_err(internal)?
    };
    let key = RepoKey {
        upstream: ctx.origin.host.clone(),
        repo: repo.clone(),
    };
    let decision = st
        .access
        .check(
            &ctx.origin,
            repo,
            Object::Blob(digest),
            ctx.client_auth.as_ref(),
            record.as_ref().map(|r| &r.repos),
        )
        .await;
    let (auth, open) = match decision {
        Decision::Cache { auth, open } => (auth, open),
        Decision::OriginOnly { auth } => {
            return origin_only(st, ctx, repo, digest, auth, range_req).await
        }
        Decision::Denied(d) => return Err(MirrorError::from_denial(d, MirrorError::BlobUnknown)),
    };
    let complete = record.as_ref().is_some_and(|r| r.complete);
    let known = record
        .as_ref()
        .is_some_and(|r| r.repos.contains(&key) && (r.repos.is_open(&key) || !open));
    if complete && !known {
        // Access was just proven here: remember where (and whether openly).
        let _ = st.store.add_repo(digest, key, open);
    }
    if complete {
        match serve_stored(st, ctx, digest, range_req).await {
            Ok(resp) => {
                st.metrics.hit();
                return Ok(resp);
            }
            Err(Served::Gone) => {}
            Err(Served::Error(e)) => return Err(e),
        }
    }
    st.metrics.miss();
    if ctx.method == Method::HEAD {
        return head_origin(ctx, repo, &format!("/v2/{repo}/blobs/{digest}"), &auth).await;
    }
    let source = Source {
        origin: ctx.origin.clone(),
        repo: repo.clone(),
        auth: auth.clone(),
        open,
        // An origin the request named (not the operator) feeds only its own requester, even
        // after a proof of possession: what it sends next is unproven.
        isolated: !ctx.origin.configured,
    };
    follow(st, ctx, repo, digest, source, range_req).await
}

/// Serve what a running (or new) download of `digest` brings, joining it or starting it.
async fn follow(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    digest: &BlobId,
    source: Source,
    range_req: Option<range::ByteRange>,
) -> Result<Response, MirrorError> {
    let auth = source.auth.clone();
    // Peers' bytes only for a source whose bytes the cluster may share (never an isolated one).
    let shared = !source.isolated;
    let download = match st.downloads.join(digest, source).map_err(internal)? {
        Join::Complete => {
            return serve_stored(st, ctx, digest, range_req)
                .await
                .map_err(|e| match e {
                    Served::Gone => MirrorError::BlobUnknown,
                    Served::Error(e) => e,
                })
        }
        Join::Elsewhere => {
            // A download this request may not share holds the blob's writer.
            return relay_any(st, ctx, repo, digest, &auth, range_req).await;
        }
        Join::Download(d) => d,
    };
    let size = download.size().await.map_err(download_error)?;
    let range = resolve(range_req, size)?;
    if let Some(r) = &range {
        let written = download.subscribe().borrow().written;
        if r.start > written + DIRECT_RANGE_AHEAD {
            // Far ahead of the fill: the node fetching the blob under the origin lease fetches
            // it ahead of its own fill (the seed), so the origin is read once; else the origin.
            if shared && st.downloads.peers_allowed(digest) {
                if let Some(p) = st.downloads.peering() {
                    if let Some(bytes) = p.read_from_seed(digest, r.clone()).await {
                        st.metrics.seeded_range();
                        return Ok(blob_response(digest, size, Some(r), Body::from(bytes)));
                    }
                }
            }
            return relay::blob(st, ctx, repo, digest, &auth, Some(r.clone())).await;
        }
    }
    let served = range.clone().unwrap_or(0..size);
    let body = Body::from_stream(download.stream(served.clone(), st.metrics.clone()));
    Ok(blob_response(digest, size, range.as_ref(), body))
}

/// A requester whose access to stored bytes is not proven: its own, isolated download when the
/// store holds nothing of the blob, else the origin's bytes relayed for it alone.
async fn origin_only(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    digest: &BlobId,
    auth: AuthMode,
    range_req: Option<range::ByteRange>,
) -> Result<Response, MirrorError> {
    if ctx.method == Method::HEAD {
        return head_origin(ctx, repo, &format!("/v2/{repo}/blobs/{digest}"), &auth).await;
    }
    let source = Source {
        origin: ctx.origin.clone(),
        repo: repo.clone(),
        auth,
        open: ctx.client_auth.is_none(),
        isolated: true,
    };
    follow(st, ctx, repo, digest, source, range_req).await
}

/// Relay from the origin, for a range or the whole blob (its size unknown here).
async fn relay_any(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    digest: &BlobId,
    auth: &AuthMode,
    range_req: Option<range::ByteRange>,
) -> Result<Response, MirrorError> {
    let range = match range_req {
        None => None,
        // A range is resolved against the size, which the origin tells.
        Some(r) => resolve(Some(r), origin_size(ctx, repo, digest, auth).await?)?,
    };
    relay::blob(st, ctx, repo, digest, auth, range).await
}

/// The blob's size, from a `HEAD` at the origin.
async fn origin_size(
    ctx: &Ctx,
    repo: &RepoName,
    digest: &BlobId,
    auth: &AuthMode,
) -> Result<u64, MirrorError> {
    let resp = head_origin(ctx, repo, &format!("/v2/{repo}/blobs/{digest}"), auth).await?;
    resp.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| MirrorError::OriginUnavailable {
            reason: "the origin gave no size for the blob".into(),
        })
}

enum Served {
    /// Not (or no longer) in the store: fetch it.
    Gone,
    Error(MirrorError),
}

/// Serve a complete blob from the store. Pieces are verified as they are
/// read; a corrupt piece drops the blob from the store and aborts the
/// response, and a corrupt first piece is caught before the headers go out.
async fn serve_stored(
    st: &MirrorState,
    ctx: &Ctx,
    digest: &BlobId,
    range_req: Option<range::ByteRange>,
) -> Result<Response, Served> {
    let store = st.store.clone();
    let id = digest.clone();
    let reader = tokio::task::spawn_blocking(move || store.open_reader(&id))
        .await
        .map_err(|e| Served::Error(internal(e)))?
        .map_err(|e| Served::Error(internal(e)))?;
    let Some(reader) = reader else {
        return Err(Served::Gone);
    };
    if !reader.record().complete {
        return Err(Served::Gone);
    }
    let size = reader.record().size;
    let range = resolve(range_req, size).map_err(Served::Error)?;
    let served = range.clone().unwrap_or(0..size);
    if ctx.method == Method::HEAD || served.is_empty() {
        return Ok(blob_response(digest, size, range.as_ref(), Body::empty()));
    }
    // Each chunk is read while the previous one goes out: one read ahead, never more, so a slow
    // client holds at most two chunks and no thread of the blocking pool while it is slow.
    let mut ahead = ReadAhead::new(Arc::new(reader), served);
    // The first chunk is read up front so a corrupt store file is refetched instead of
    // answered with an aborted 200.
    let first = match ahead.next_chunk().await {
        Some(Ok(b)) => b,
        Some(Err(StoreError::Corrupt { .. })) => {
            tracing::error!(blob = %digest, "store file corrupt; dropping and refetching");
            return Err(Served::Gone);
        }
        Some(Err(e)) => return Err(Served::Error(internal(e))),
        None => return Err(Served::Error(internal("empty range read"))),
    };
    let metrics = st.metrics.clone();
    metrics.served("blob", first.len() as u64);
    let rest = futures::stream::unfold(ahead, move |mut ahead| {
        let metrics = metrics.clone();
        async move {
            match ahead.next_chunk().await? {
                Ok(b) => {
                    metrics.served("blob", b.len() as u64);
                    Some((Ok(b), ahead))
                }
                Err(e) => {
                    tracing::error!(error = %e, "aborting blob response");
                    Some((Err(std::io::Error::other(e.to_string())), ahead))
                }
            }
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::once(async move { Ok(first) }), rest);
    Ok(blob_response(
        digest,
        size,
        range.as_ref(),
        Body::from_stream(stream),
    ))
}

type ChunkRead = tokio::task::JoinHandle<Result<bytes::Bytes, StoreError>>;

/// A stored blob's range read in chunks of [`READ_CHUNK`] on the blocking pool, the read of
/// the next chunk started as soon as the previous one is handed out.
struct ReadAhead {
    reader: Arc<crate::store::BlobReader>,
    /// The read of the chunk at `next`, if `next < end` and no error ended the reads.
    pending: Option<ChunkRead>,
    next: u64,
    end: u64,
}

impl ReadAhead {
    fn new(reader: Arc<crate::store::BlobReader>, range: Range<u64>) -> Self {
        let mut ahead = Self {
            reader,
            pending: None,
            next: range.start,
            end: range.end,
        };
        ahead.start_next();
        ahead
    }

    /// The next chunk, and the read of the one after it started; `None` at the end of the
    /// range or after an error.
    async fn next_chunk(&mut self) -> Option<Result<bytes::Bytes, StoreError>> {
        let read = self.pending.take()?;
        let chunk = match read.await {
            Ok(Ok(b)) if !b.is_empty() => b,
            Ok(Ok(_)) => return Some(Err(self.ended_early())),
            Ok(Err(e)) => return Some(Err(e)),
            Err(e) => return Some(Err(io_error(std::io::Error::other(e)))),
        };
        self.next += chunk.len() as u64;
        self.start_next();
        Some(Ok(chunk))
    }

    fn start_next(&mut self) {
        if self.next >= self.end {
            return;
        }
        let (reader, pos) = (self.reader.clone(), self.next);
        let len = (self.end - pos).min(READ_CHUNK as u64);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            read_chunk(&reader, pos, len)
        }));
    }

    fn ended_early(&self) -> StoreError {
        io_error(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("store file ended early, at byte {}", self.next),
        ))
    }
}

/// Reads up to `len` bytes at `pos` (fewer only at the end of the blob).
fn read_chunk(
    reader: &crate::store::BlobReader,
    pos: u64,
    len: u64,
) -> Result<bytes::Bytes, StoreError> {
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read_at(pos + filled as u64, &mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(bytes::Bytes::from(buf))
}

fn io_error(source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: Default::default(),
        source,
    }
}

/// `HEAD` for a blob the node does not hold: ask the origin.
async fn head_origin(
    ctx: &Ctx,
    repo: &RepoName,
    path: &str,
    auth: &AuthMode,
) -> Result<Response, MirrorError> {
    let resp = ctx
        .origin
        .send(
            Method::HEAD,
            path,
            &HeaderMap::new(),
            auth,
            Some(repo),
            "blob_head",
        )
        .await?;
    match resp.status() {
        s if s.is_success() => {
            let mut out = Response::new(Body::empty());
            let h = out.headers_mut();
            h.extend(api_headers());
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            for name in [header::CONTENT_LENGTH, header::ETAG] {
                if let Some(v) = resp.headers().get(&name) {
                    h.insert(name, v.clone());
                }
            }
            if let Some(v) = resp.headers().get("docker-content-digest") {
                h.insert("docker-content-digest", v.clone());
            }
            Ok(out)
        }
        StatusCode::UNAUTHORIZED => Err(MirrorError::Unauthorized {
            challenge: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
        }),
        StatusCode::FORBIDDEN => Err(MirrorError::Denied),
        StatusCode::NOT_FOUND => Err(MirrorError::BlobUnknown),
        status => Err(MirrorError::OriginStatus { status }),
    }
}

fn resolve(req: Option<range::ByteRange>, size: u64) -> Result<Option<Range<u64>>, MirrorError> {
    match req {
        None => Ok(None),
        Some(r) => match r.resolve(size) {
            Ok(r) => Ok(Some(r)),
            Err(RangeError::Unsatisfiable | RangeError::Malformed) => {
                Err(MirrorError::RangeNotSatisfiable { size })
            }
        },
    }
}

fn blob_response(digest: &BlobId, size: u64, range: Option<&Range<u64>>, body: Body) -> Response {
    let mut out = Response::new(body);
    let h = out.headers_mut();
    h.extend(api_headers());
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
    let len = match range {
        Some(r) => {
            *out.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&range::content_range(r, size)) {
                out.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r.end - r.start
        }
        None => size,
    };
    out.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    out
}

fn download_error(e: DownloadError) -> MirrorError {
    match e {
        DownloadError::Status { status, challenge } => match status {
            StatusCode::UNAUTHORIZED => MirrorError::Unauthorized { challenge },
            StatusCode::FORBIDDEN => MirrorError::Denied,
            StatusCode::NOT_FOUND => MirrorError::BlobUnknown,
            status => MirrorError::OriginStatus { status },
        },
        DownloadError::DigestMismatch(d) => MirrorError::DigestMismatch {
            digest: d.to_string(),
        },
        DownloadError::Origin(reason) => MirrorError::OriginUnavailable { reason },
        other => MirrorError::Internal(other.to_string()),
    }
}

fn internal(e: impl std::fmt::Display) -> MirrorError {
    MirrorError::Internal(e.to_string())
}
