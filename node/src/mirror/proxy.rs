//! Forward-proxy traffic that is not a registry pull API call: absolute-form requests (token
//! endpoints and the like) passed through, and `CONNECT` tunnels.
//!
//! The proxy is for registry traffic only, never an open relay:
//! - a request is carried only to a configured registry, a host a configured registry sent
//!   clients to (token realm, blob-storage redirect, learned as seen) or an operator's
//!   `mirror.proxy_allow` pattern (`Upstreams::proxy_allows`);
//! - never to the node's own listeners ([`OwnListeners`]);
//! - `CONNECT` only when `mirror.proxy_connect` is on, to the same hosts; tunnels are counted
//!   (at most `mirror.max_tunnels`), closed after `mirror.tunnel_idle_timeout` without traffic,
//!   and closed at shutdown ([`Tunnels`]).
//!
//! Hop-by-hop headers are dropped, as RFC 9110 requires of a proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use futures::TryStreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MirrorError, MirrorState};
use crate::upstream::{hop_token, is_local, literal_ip, HOP_HEADER};

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

/// The node's own TCP listeners (mirror, admin, embedded scheduler), which the proxy never
/// reaches, whatever name or address a request uses for them.
#[derive(Clone, Debug)]
pub struct OwnListeners {
    addrs: Arc<Vec<SocketAddr>>,
}

impl OwnListeners {
    pub fn new(cfg: &crate::config::Config) -> Self {
        let mut addrs = vec![cfg.listen, cfg.admin];
        if let Some(p) = &cfg.p2p {
            addrs.push(p.dht_listen);
            addrs.extend(p.embedded_scheduler);
        }
        Self {
            addrs: Arc::new(addrs),
        }
    }

    /// Whether `host`:`port` is one of the node's listeners: the same port on the address it
    /// listens on, or — for a listener on an unspecified address — on any address of this host
    /// (or `localhost`).
    pub fn is_own(&self, host: &str, port: u16) -> bool {
        let ip = literal_ip(host);
        let local_name = host.eq_ignore_ascii_case("localhost");
        self.addrs.iter().any(|a| {
            a.port() == port
                && match ip {
                    Some(ip) => ip == a.ip() || (a.ip().is_unspecified() && is_local(ip)),
                    None => local_name,
                }
        })
    }
}

/// The open `CONNECT` tunnels: a bound on their number, their tasks (closed at shutdown), and
/// their idle timeout.
#[derive(Clone, Debug)]
pub struct Tunnels {
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    idle: Duration,
    stop: CancellationToken,
}

impl Tunnels {
    /// At most `max` tunnels, each closed after `idle` without traffic or when `stop` fires.
    pub fn new(max: usize, idle: Duration, stop: CancellationToken) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max.max(1))),
            tracker: TaskTracker::new(),
            idle,
            stop,
        }
    }

    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }
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
    let Some(authority) = parts.uri.authority() else {
        return Err(MirrorError::NotFound);
    };
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    allowed(st, authority.host(), port)?;
    let url =
        reqwest::Url::parse(&parts.uri.to_string()).map_err(|e| MirrorError::Unsupported {
            what: format!("proxy URL ({e})"),
        })?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.insert(HOP_HEADER, HeaderValue::from_static(hop_token()));
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

/// Refuses targets that are not registry-related or that are this host.
fn allowed(st: &MirrorState, host: &str, port: u16) -> Result<(), MirrorError> {
    let refuse = |why| MirrorError::ProxyRefused {
        target: format!("{host}:{port}"),
        why,
    };
    if st.own.is_own(host, port) {
        return Err(refuse("one of this node's own listeners"));
    }
    if !st.upstreams.proxy_allows(host, port) {
        return Err(refuse(
            "not a configured registry, a host one sent clients to, or in mirror.proxy_allow",
        ));
    }
    Ok(())
}

/// `CONNECT host:port`: a TCP tunnel (HTTPS through the proxy). The bytes are opaque TLS, so
/// they cannot be cached or checked: only registry-related hosts, and only while tunnels are
/// allowed and slots are free.
fn tunnel(st: &MirrorState, req: Request) -> Result<Response, MirrorError> {
    let Some(authority) = req.uri().authority().cloned() else {
        return Err(MirrorError::Unsupported {
            what: "CONNECT without host:port".into(),
        });
    };
    let port = authority.port_u16().unwrap_or(443);
    if !st.cfg.proxy_connect {
        return Err(MirrorError::ProxyRefused {
            target: authority.to_string(),
            why: "CONNECT is off (mirror.proxy_connect)",
        });
    }
    allowed(st, authority.host(), port)?;
    let Ok(permit) = st.tunnels.slots.clone().try_acquire_owned() else {
        return Err(MirrorError::TooManyTunnels);
    };
    let host = authority.host().to_owned();
    let idle = st.tunnels.idle;
    let stop = st.tunnels.stop.clone();
    st.tunnels.tracker.spawn(async move {
        let _permit = permit;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let server = match connect(&host, port).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %host, port, "CONNECT target unreachable");
                return;
            }
        };
        let client = hyper_util::rt::TokioIo::new(upgraded);
        tokio::select! {
            r = splice_idle(client, server, idle) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, %host, "tunnel closed");
                }
            }
            _ = stop.cancelled() => {}
        }
    });
    Ok(Response::new(Body::empty()))
}

/// Connects to `host`:`port` (an allowed, operator-trusted target).
async fn connect(host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    tokio::net::TcpStream::connect((bare, port)).await
}

/// Copies both ways until either side closes, or nothing moves for `idle`.
async fn splice_idle<A, B>(a: A, b: B, idle: Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut abuf = vec![0u8; 32 << 10];
    let mut bbuf = vec![0u8; 32 << 10];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => {
                let n = r?;
                if n == 0 {
                    a_open = false;
                    bw.shutdown().await?;
                } else {
                    bw.write_all(&abuf[..n]).await?;
                }
            }
            r = br.read(&mut bbuf), if b_open => {
                let n = r?;
                if n == 0 {
                    b_open = false;
                    aw.shutdown().await?;
                } else {
                    aw.write_all(&bbuf[..n]).await?;
                }
            }
            _ = tokio::time::sleep(idle) => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel idle"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listeners() {
        let own = OwnListeners {
            addrs: Arc::new(vec![
                "127.0.0.1:5050".parse().expect("addr"),
                "0.0.0.0:5051".parse().expect("addr"),
            ]),
        };
        assert!(own.is_own("127.0.0.1", 5050));
        assert!(own.is_own("localhost", 5050));
        assert!(own.is_own("127.0.0.1", 5051));
        assert!(own.is_own("[::1]", 5051), "unspecified: any local address");
        assert!(!own.is_own("127.0.0.1", 5000));
        assert!(!own.is_own("203.0.113.9", 5051));
        assert!(!own.is_own("registry.example", 5050));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_close() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let r = splice_idle(a, b, Duration::from_secs(120)).await;
        assert!(matches!(r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut));
    }
}
