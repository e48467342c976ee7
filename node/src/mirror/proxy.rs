//! Forward-proxy pass-through: absolute-form requests that are not registry
//! pull API calls (token endpoints, anything else nydusd or a runtime sends
//! through its proxy) go to their destination unchanged, streamed both ways.
//! Hop-by-hop headers are dropped, as RFC 9110 requires of a proxy.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName};
use axum::response::Response;
use futures::TryStreamExt as _;

use super::{MirrorError, MirrorState};

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    h.remove("proxy-connection");
    h.remove("keep-alive");
    h.remove(header::HOST);
}

pub(super) async fn pass_through(st: &MirrorState, req: Request) -> Result<Response, MirrorError> {
    let (parts, body) = req.into_parts();
    let scheme = parts.uri.scheme_str().unwrap_or("http");
    if scheme != "http" && scheme != "https" {
        return Err(MirrorError::Unsupported {
            what: format!("proxying {scheme}:// URLs"),
        });
    }
    let url =
        reqwest::Url::parse(&parts.uri.to_string()).map_err(|e| MirrorError::Unsupported {
            what: format!("proxy URL ({e})"),
        })?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    let body = reqwest::Body::wrap_stream(body.into_data_stream());
    let resp = st
        .passthrough
        .request(parts.method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| MirrorError::OriginUnavailable {
            reason: e.to_string(),
        })?;
    let status = resp.status();
    let mut out_headers = resp.headers().clone();
    strip_hop_by_hop(&mut out_headers);
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = out_headers;
    Ok(out)
}
