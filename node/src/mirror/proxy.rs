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
    if req.method() == axum::http::Method::CONNECT {
        return tunnel(st, req);
    }
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

/// `CONNECT host:port`: a TCP tunnel (HTTPS through the proxy). The bytes are
/// opaque TLS, so they cannot be cached; clients that want caching use the
/// mirror endpoints or plain-HTTP proxy URLs (nydusd `use_http`). Only hosts
/// the node may reach as registries are allowed, so the port is not an open
/// proxy.
fn tunnel(st: &MirrorState, req: Request) -> Result<Response, MirrorError> {
    let Some(authority) = req.uri().authority().cloned() else {
        return Err(MirrorError::Unsupported {
            what: "CONNECT without host:port".into(),
        });
    };
    // Refuses hosts that are neither configured nor allowed.
    st.upstreams.for_proxy("https", authority.as_str())?;
    let target = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(443)
    );
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        match tokio::net::TcpStream::connect(&target).await {
            Ok(mut server) => {
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                    tracing::debug!(error = %e, %target, "tunnel closed");
                }
            }
            Err(e) => tracing::warn!(error = %e, %target, "CONNECT target unreachable"),
        }
    });
    Ok(Response::new(Body::empty()))
}
