//! The registry mirror and HTTP forward proxy, on one port.
//!
//! Requests are routed by hand rather than with axum path patterns because
//! repository names contain slashes: `/v2/<name>/manifests/<ref>`,
//! `/v2/<name>/blobs/<digest>`, `/v2/<name>/tags/list`, `/v2/`. A request in
//! absolute form (`GET http://host/v2/...`, as an HTTP proxy receives it)
//! goes through the same handlers with the URL's host as the origin (an
//! unlisted host is an untrusted origin: see `access`). Other absolute-form
//! requests and `CONNECT` are carried only to registry-related hosts
//! (`proxy`): the proxy is not an open relay.
//!
//! Every origin request the node makes carries [`HOP_HEADER`] with this
//! process's token; a request arriving with it is the node talking to itself
//! (through some chain of proxies and unlisted origins) and is refused with
//! 508 before it can loop.
//!
//! Every path component is validated (`RepoName`, `Digest`, `Reference`)
//! before anything else happens, so no request can name a file.

mod blobs;
pub mod error;
mod manifests;
mod proxy;
pub mod range;
mod relay;

pub use proxy::{OwnListeners, Tunnels};

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use shoal_proto::{Digest, Reference, RepoName};

use crate::access::Access;
use crate::config::MirrorSection;
use crate::download::Downloads;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::store::Store;
use crate::upstream::{AuthMode, Origin, Upstreams};
pub use error::MirrorError;

/// Every manifest type a client may get; sent when the client names none.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
application/vnd.docker.distribution.manifest.v1+json;q=0.5";

/// Header a client can use to name the registry when it cannot use `?ns=`.
pub const REGISTRY_HEADER: &str = "x-shoal-registry";

pub use crate::upstream::{hop_token, HOP_HEADER};

/// What the mirror handlers share.
#[derive(Clone)]
pub struct MirrorState {
    pub store: Store,
    pub upstreams: Arc<Upstreams>,
    pub access: Arc<Access>,
    pub downloads: Downloads,
    pub metrics: Arc<Metrics>,
    pub cfg: Arc<MirrorSection>,
    pub passthrough: reqwest::Client,
    /// Open `CONNECT` tunnels (bounded, idle-timed-out, closed at shutdown).
    pub tunnels: Tunnels,
    /// The node's own listeners, which proxy requests may never reach.
    pub own: OwnListeners,
}

/// The mirror/proxy router. Tests call this directly.
pub fn router(state: MirrorState) -> Router {
    Router::new()
        .route("/ping", get(health))
        .route("/healthz", get(health))
        .fallback(dispatch)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn health() -> &'static str {
    "ok"
}

/// What a `/v2` path asks for.
#[derive(Debug)]
enum V2 {
    Base,
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    Tags(RepoName),
}

fn parse_v2(rest: &str) -> Result<Option<V2>, MirrorError> {
    if rest.is_empty() || rest == "/" {
        return Ok(Some(V2::Base));
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Ok(None);
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Some(V2::Tags(
            name.parse().map_err(MirrorError::NameInvalid)?,
        )));
    }
    let mut parts = rest.rsplitn(3, '/');
    let (Some(last), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    match kind {
        "manifests" => {
            let repo = name.parse().map_err(MirrorError::NameInvalid)?;
            let reference = last.parse().map_err(|e| match e {
                shoal_proto::NameError::Digest(d) => MirrorError::DigestInvalid(d),
                other => MirrorError::ReferenceInvalid(other),
            })?;
            Ok(Some(V2::Manifest(repo, reference)))
        }
        "blobs" => {
            let repo = name.parse().map_err(MirrorError::NameInvalid)?;
            let digest = last.parse().map_err(MirrorError::DigestInvalid)?;
            Ok(Some(V2::Blob(repo, digest)))
        }
        _ => Ok(None),
    }
}

/// A mirror request, with its origin and the client's credentials.
pub(crate) struct Ctx {
    pub origin: Arc<Origin>,
    pub method: Method,
    pub headers: HeaderMap,
    pub client_auth: Option<HeaderValue>,
}

impl Ctx {
    /// The client's credentials, or the node's when the client sent none.
    pub fn auth_mode(&self) -> AuthMode {
        match &self.client_auth {
            Some(v) => AuthMode::Client(v.clone()),
            None => AuthMode::Node,
        }
    }
}

async fn dispatch(State(st): State<MirrorState>, req: Request) -> Response {
    match route(&st, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(error = %e, "request failed");
            } else {
                tracing::debug!(error = %e, "request refused");
            }
            e.into_response()
        }
    }
}

async fn route(st: &MirrorState, req: Request) -> Result<Response, MirrorError> {
    if req
        .headers()
        .get(HOP_HEADER)
        .is_some_and(|v| v.as_bytes() == hop_token().as_bytes())
    {
        return Err(MirrorError::Loop);
    }
    let uri = req.uri().clone();
    let is_proxy = uri.authority().is_some();
    if is_proxy {
        if let Some(a) = uri.authority() {
            let port = a.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            if st.own.is_own(a.host(), port) {
                return Err(MirrorError::ProxyRefused {
                    target: a.to_string(),
                    why: "one of this node's own listeners",
                });
            }
        }
    }
    let Some(rest) = uri.path().strip_prefix("/v2") else {
        return if is_proxy {
            proxy::pass_through(st, req).await
        } else {
            Err(MirrorError::NotFound)
        };
    };
    let Some(what) = parse_v2(rest)? else {
        return if is_proxy {
            proxy::pass_through(st, req).await
        } else {
            Err(MirrorError::NotFound)
        };
    };
    let origin = if is_proxy {
        let scheme = uri.scheme_str().unwrap_or("http");
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        st.upstreams.for_proxy(scheme, authority)?
    } else {
        let ns = uri.query().and_then(|q| query_param(q, "ns"));
        let header = req
            .headers()
            .get(REGISTRY_HEADER)
            .and_then(|v| v.to_str().ok());
        st.upstreams.select(ns.as_deref(), header)?
    };
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return Err(MirrorError::Unsupported {
            what: format!("{method} (push)"),
        });
    }
    let ctx = Ctx {
        origin,
        method,
        client_auth: req.headers().get(header::AUTHORIZATION).cloned(),
        headers: req.headers().clone(),
    };
    match what {
        V2::Base => base(st, &ctx).await,
        V2::Manifest(repo, reference) => manifests::get(st, &ctx, &repo, &reference).await,
        V2::Blob(repo, digest) => blobs::get(st, &ctx, &repo, &digest).await,
        V2::Tags(repo) => tags(st, &ctx, &repo, uri.query()).await,
    }
}

/// The percent-decoded value of `name` in a query string (containerd sends
/// `?ns=127.0.0.1%3A5000`).
fn query_param(query: &str, name: &str) -> Option<String> {
    let url = reqwest::Url::parse(&format!("http://q/?{query}")).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `GET /v2/`: the origin's answer (so a 401 starts the client's login),
/// or a plain 200 when the origin cannot be reached, so that cached content
/// stays pullable. A client without credentials gets the origin's own
/// answer to an anonymous ping — not the node's (a token registry lets any
/// token ping, and a client told "no login needed" never logs in for the
/// private repositories it could read) — unless the node holds credentials
/// for that origin, which then stand in for the client's.
async fn base(st: &MirrorState, ctx: &Ctx) -> Result<Response, MirrorError> {
    let resp = match (&ctx.client_auth, ctx.origin.has_node_credentials()) {
        (None, false) => ctx.origin.ping().await,
        _ => {
            ctx.origin
                .send(
                    Method::GET,
                    "/v2/",
                    &HeaderMap::new(),
                    &ctx.auth_mode(),
                    None,
                    "base",
                )
                .await
        }
    };
    let _ = st;
    let status = match resp {
        Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
            return Err(MirrorError::Unauthorized {
                challenge: r.headers().get(header::WWW_AUTHENTICATE).cloned(),
            })
        }
        Ok(r) if r.status() == StatusCode::FORBIDDEN => return Err(MirrorError::Denied),
        _ => StatusCode::OK,
    };
    Ok((status, api_headers(), axum::Json(serde_json::json!({}))).into_response())
}

/// `GET /v2/<name>/tags/list`: passed to the origin, never cached.
async fn tags(
    st: &MirrorState,
    ctx: &Ctx,
    repo: &RepoName,
    query: Option<&str>,
) -> Result<Response, MirrorError> {
    let query: String = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| kv.starts_with("n=") || kv.starts_with("last="))
        .collect::<Vec<_>>()
        .join("&");
    let path = if query.is_empty() {
        format!("/v2/{repo}/tags/list")
    } else {
        format!("/v2/{repo}/tags/list?{query}")
    };
    let resp = ctx
        .origin
        .send(
            Method::GET,
            &path,
            &HeaderMap::new(),
            &ctx.auth_mode(),
            Some(repo),
            "tags",
        )
        .await?;
    let _ = st;
    relay_small(resp, 1 << 20).await
}

/// Relay a small origin answer (status, content type, body).
async fn relay_small(resp: reqwest::Response, limit: u64) -> Result<Response, MirrorError> {
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED {
        return Err(MirrorError::Unauthorized {
            challenge: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
        });
    }
    let ctype = resp.headers().get(header::CONTENT_TYPE).cloned();
    let link = resp.headers().get(header::LINK).cloned();
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(MirrorError::OriginStatus {
            status: StatusCode::PAYLOAD_TOO_LARGE,
        });
    }
    // A chunked answer has no length up front: stop reading at the limit.
    let body = crate::upstream::read_at_most(resp, limit)
        .await
        .map_err(|reason| MirrorError::OriginUnavailable { reason })?;
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.extend(api_headers());
    if let Some(c) = ctype {
        h.insert(header::CONTENT_TYPE, c);
    }
    if let Some(l) = link {
        h.insert(header::LINK, l);
    }
    Ok(out)
}

fn api_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    h
}

fn route_label(req: &Request) -> &'static str {
    let p = req.uri().path();
    let proxy = req.uri().authority().is_some();
    match () {
        _ if p == "/ping" || p == "/healthz" => "health",
        _ if !p.starts_with("/v2") => {
            if proxy {
                "proxy"
            } else {
                "other"
            }
        }
        _ if p.contains("/blobs/") => "blob",
        _ if p.contains("/manifests/") => "manifest",
        _ if p.ends_with("/tags/list") => "tags",
        _ => "base",
    }
}

/// One span per request; request count and latency metrics.
async fn observe(State(st): State<MirrorState>, req: Request, next: Next) -> Response {
    let route = route_label(&req);
    let method = req.method().clone();
    let span = tracing::info_span!("request", %method, uri = %req.uri(), route);
    let started = Instant::now();
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let elapsed = started.elapsed();
    st.metrics
        .request_duration
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    st.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method: crate::metrics::method_label(&method),
            status: resp.status().as_u16(),
        })
        .inc();
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            ms = elapsed.as_millis() as u64,
            "answered"
        )
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(
            query_param("ns=127.0.0.1%3A5000", "ns").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(
            query_param("a=1&ns=docker.io", "ns").as_deref(),
            Some("docker.io")
        );
        assert_eq!(query_param("a=1", "ns"), None);
    }

    #[test]
    fn parses_paths() {
        assert!(matches!(parse_v2(""), Ok(Some(V2::Base))));
        assert!(matches!(parse_v2("/"), Ok(Some(V2::Base))));
        assert!(matches!(
            parse_v2("/a/b/manifests/latest"),
            Ok(Some(V2::Manifest(..)))
        ));
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(matches!(
            parse_v2(&format!("/a/b/c/blobs/{d}")),
            Ok(Some(V2::Blob(..)))
        ));
        assert!(matches!(parse_v2("/a/tags/list"), Ok(Some(V2::Tags(_)))));
        assert!(matches!(
            parse_v2("/A/manifests/x"),
            Err(MirrorError::NameInvalid(_))
        ));
        assert!(matches!(
            parse_v2("/a/../b/manifests/x"),
            Err(MirrorError::NameInvalid(_))
        ));
        assert!(matches!(
            parse_v2("/a/blobs/sha256:zz"),
            Err(MirrorError::DigestInvalid(_))
        ));
        assert!(matches!(
            parse_v2("/a/manifests/sha256:zz"),
            Err(MirrorError::DigestInvalid(_))
        ));
        assert!(matches!(
            parse_v2("/a/manifests/-x"),
            Err(MirrorError::ReferenceInvalid(_))
        ));
        assert!(matches!(parse_v2("/../../etc/passwd"), Ok(None)));
        assert!(matches!(parse_v2("/a/uploads/"), Ok(None)));
    }
}
