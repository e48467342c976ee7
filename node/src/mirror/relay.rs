//! A blob served straight from the origin for one request, with nothing read from or written to
//! the store: for a requester whose access to stored bytes is not proven (`access`'s
//! `OriginOnly`), when a download it may not share is running, and for ranges far ahead of a
//! running download.
//!
//! A whole-blob answer is digest-checked on the way: each chunk is passed on only once the next
//! one arrived, and the last only after the digest matched, so a wrong blob ends short of its
//! `Content-Length` (the client sees a broken transfer, never a finished wrong one). A range
//! cannot be checked here (the client checks nothing either, as with any registry range read).

use std::ops::Range;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use reqwest::Method;
use shoal_proto::{BlobId, RepoName};

use super::{Ctx, MirrorError, MirrorState};
use crate::store::Verifier;
use crate::upstream::AuthMode;

/// Streams `range` (or the whole blob) of `digest` in `repo` from the request's origin.
pub(super) async fn blob(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    digest: &BlobId,
    auth: &AuthMode,
    range: Option<Range<u64>>,
) -> Result<Response, MirrorError> {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let mut h = HeaderMap::new();
    if let Some(r) = &range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes={}-{}", r.start, r.end - 1)) {
            h.insert(header::RANGE, v);
        }
    }
    let resp = ctx
        .origin
        .send(Method::GET, &path, &h, auth, Some(repo), "blob_relay")
        .await?;
    let status = resp.status();
    match (status, &range) {
        (StatusCode::PARTIAL_CONTENT, Some(_)) | (StatusCode::OK, None) => {}
        (StatusCode::UNAUTHORIZED, _) => {
            return Err(MirrorError::Unauthorized {
                challenge: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
            })
        }
        (StatusCode::FORBIDDEN, _) => return Err(MirrorError::Denied),
        (StatusCode::NOT_FOUND, _) => return Err(MirrorError::BlobUnknown),
        (status, _) => return Err(MirrorError::OriginStatus { status }),
    }
    let mut out_headers = HeaderMap::new();
    for name in [header::CONTENT_LENGTH, header::CONTENT_RANGE] {
        if let Some(v) = resp.headers().get(&name) {
            out_headers.insert(name, v.clone());
        }
    }
    let metrics = st.metrics.clone();
    let body = match range {
        Some(r) => {
            let expected = r.end - r.start;
            Body::from_stream(passed(resp, expected, metrics))
        }
        None => {
            let Some(len) = resp.content_length() else {
                return Err(MirrorError::OriginUnavailable {
                    reason: "the origin sent no Content-Length for the blob".into(),
                });
            };
            Body::from_stream(checked(resp, len, Verifier::new(digest), metrics))
        }
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    let hd = out.headers_mut();
    hd.extend(super::api_headers());
    hd.extend(out_headers);
    hd.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    hd.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        hd.insert("docker-content-digest", v);
    }
    Ok(out)
}

/// The origin's bytes as they come, failing if fewer than `expected` arrive.
fn passed(
    resp: reqwest::Response,
    expected: u64,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold((resp, 0u64), move |(mut resp, got)| {
        let metrics = metrics.clone();
        async move {
            if got == u64::MAX {
                return None;
            }
            match resp.chunk().await {
                Ok(Some(c)) => {
                    metrics.from_origin("blob", c.len() as u64);
                    metrics.served("blob", c.len() as u64);
                    let got = got + c.len() as u64;
                    Some((Ok(c), (resp, got)))
                }
                Ok(None) if got == expected => None,
                Ok(None) => Some((
                    Err(std::io::Error::other("origin range short")),
                    (resp, u64::MAX),
                )),
                Err(e) => Some((Err(std::io::Error::other(e)), (resp, u64::MAX))),
            }
        }
    })
}

/// The origin's whole blob, each chunk released once the next arrived, the last one only after
/// the digest matched.
fn checked(
    resp: reqwest::Response,
    len: u64,
    verifier: Verifier,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    struct St {
        resp: reqwest::Response,
        verifier: Option<Verifier>,
        held: Option<Bytes>,
        got: u64,
        done: bool,
    }
    let start = St {
        resp,
        verifier: Some(verifier),
        held: None,
        got: 0,
        done: false,
    };
    futures::stream::unfold(start, move |mut s| {
        let metrics = metrics.clone();
        async move {
            if s.done {
                return None;
            }
            loop {
                match s.resp.chunk().await {
                    Ok(Some(c)) => {
                        metrics.from_origin("blob", c.len() as u64);
                        s.got += c.len() as u64;
                        if s.got > len {
                            s.done = true;
                            return Some((Err(std::io::Error::other("origin sent too much")), s));
                        }
                        if let Some(v) = s.verifier.as_mut() {
                            v.update(&c);
                        }
                        if let Some(prev) = s.held.replace(c) {
                            metrics.served("blob", prev.len() as u64);
                            return Some((Ok(prev), s));
                        }
                    }
                    Ok(None) => {
                        s.done = true;
                        let ok =
                            s.got == len && s.verifier.take().is_some_and(|v| v.finish().is_ok());
                        if !ok {
                            tracing::warn!(
                                "blob from the origin does not match its digest; response aborted"
                            );
                            return Some((Err(std::io::Error::other("digest mismatch")), s));
                        }
                        let last = s.held.take()?;
                        metrics.served("blob", last.len() as u64);
                        return Some((Ok(last), s));
                    }
                    Err(e) => {
                        s.done = true;
                        return Some((Err(std::io::Error::other(e)), s));
                    }
                }
            }
        }
    })
}
