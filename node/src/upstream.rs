//! Origin registries: which origin a request goes to, and sending requests
//! to it with the right credentials.
//!
//! Credentials come in three modes (see [`AuthMode`]): the client's own
//! `Authorization` header, forwarded untouched; the node's configured
//! credentials; or none. For the last two the node answers the origin's
//! challenge itself (Basic, or the Bearer token dance of the distribution
//! spec), caching tokens per scope until they expire. With the client's
//! header, a 401 goes back to the client with its `WWW-Authenticate`, so the
//! client's own token dance works through the mirror.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use shoal_proto::RepoName;

use crate::config::{Config, Upstream};
use crate::metrics::Metrics;

mod reach;

pub use reach::{is_local, literal_ip, valid_pattern, ProxyTargets};

/// Header on every request the node sends to an origin or through its proxy: this process's
/// hop token, so that the mirror can refuse a request that is the node reaching itself.
pub const HOP_HEADER: &str = "x-shoal-hop";

/// This process's hop token (random, fixed for its life).
pub fn hop_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| format!("{:016x}", rand::random::<u64>()))
}

/// Unlisted origins remembered at most (least recently used dropped first).
const LEARNED_CAP: usize = 256;

/// Whose credentials a request to an origin carries.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// The client's `Authorization` header, as sent.
    Client(HeaderValue),
    /// The node's own configured credentials (or none): the node answers
    /// challenges itself.
    Node,
}

/// Why an origin could not be chosen or reached.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("registry {host:?} is not configured and mirror.allow_unlisted_upstreams is off")]
    Unlisted { host: String },
    #[error("no registry named by the request (?ns=, X-Shoal-Registry) and no default upstream configured")]
    NoDefault,
    #[error("registry host {host:?} is not a valid host[:port]")]
    BadHost { host: String },
    #[error("registry host {host:?} is an address of this host; unlisted registries may not be local (configure it as an upstream, or set mirror.allow_local_upstreams)")]
    Local { host: String },
    #[error("origin {host} unreachable: {source}")]
    Unreachable {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("origin {host} token service failed: {message}")]
    Token { host: String, message: String },
}

/// One origin registry with its HTTP client and token cache.
#[derive(Debug)]
pub struct Origin {
    /// The host as clients name it (`docker.io`, `127.0.0.1:5000`).
    pub host: String,
    pub base: Url,
    /// Configured by the operator (trusted to answer access checks), as opposed to learned from
    /// a request (see `access`).
    pub configured: bool,
    /// Where a configured origin's token realms are recorded for the forward proxy.
    learn: Option<ProxyTargets>,
    /// An unlisted origin kept off this host (`reach`): its token realms are checked too.
    guarded: bool,
    client: reqwest::Client,
    credentials: Option<(String, String)>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    metrics: Arc<Metrics>,
}

/// The set of origins a node knows, plus those it learns from requests.
#[derive(Debug)]
pub struct Upstreams {
    configured: HashMap<String, Arc<Origin>>,
    default: Option<Arc<Origin>>,
    allow_unlisted: bool,
    allow_local: bool,
    /// Unlisted origins by host, with when each was last used; at most [`LEARNED_CAP`].
    learned: Mutex<HashMap<String, (Arc<Origin>, Instant)>>,
    targets: ProxyTargets,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Upstreams {
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let timeout = cfg.mirror.upstream_timeout.0;
        let targets = ProxyTargets::new(cfg.mirror.proxy_allow.clone());
        let mut configured = HashMap::new();
        let mut default = None;
        for u in &cfg.upstreams {
            let origin = Arc::new(Origin::new(
                u,
                timeout,
                metrics.clone(),
                Some(targets.clone()),
                true,
            )?);
            if u.default {
                default = Some(origin.clone());
            }
            configured.insert(u.host.clone(), origin);
        }
        Ok(Self {
            configured,
            default,
            allow_unlisted: cfg.mirror.allow_unlisted_upstreams,
            allow_local: cfg.mirror.allow_local_upstreams,
            learned: Mutex::new(HashMap::new()),
            targets,
            timeout,
            metrics,
        })
    }

    /// Whether the forward proxy may carry non-registry traffic (or a `CONNECT` tunnel) to
    /// `host`:`port`: a configured registry, a host one of them sent clients to (token realm,
    /// blob-storage redirect), or an operator's `mirror.proxy_allow` pattern.
    pub fn proxy_allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let configured = self.configured.values().any(|o| {
            let base_port = o.base.port_or_known_default();
            o.base
                .host_str()
                .is_some_and(|h| h.eq_ignore_ascii_case(&host))
                && base_port == Some(port)
        });
        configured || self.targets.allows(&host, port)
    }

    /// The configured origin for `host`, if the operator listed it.
    pub fn configured(&self, host: &str) -> Option<Arc<Origin>> {
        self.configured.get(host).cloned()
    }

    /// Whether unlisted hosts may be local (`mirror.allow_local_upstreams`).
    pub fn allow_local(&self) -> bool {
        self.allow_local
    }

    /// The origin for a mirror request: containerd's `?ns=` first, then the
    /// `X-Shoal-Registry` header, then the default.
    pub fn select(
        &self,
        ns: Option<&str>,
        header: Option<&str>,
    ) -> Result<Arc<Origin>, OriginError> {
        match ns.or(header) {
            Some(host) => self.by_host(host, "https"),
            None => self.default.clone().ok_or(OriginError::NoDefault),
        }
    }

    /// The origin for a forward-proxy request to `scheme://authority`.
    pub fn for_proxy(&self, scheme: &str, authority: &str) -> Result<Arc<Origin>, OriginError> {
        self.by_host(authority, scheme)
    }

    fn by_host(&self, host: &str, scheme: &str) -> Result<Arc<Origin>, OriginError> {
        let host = normalize_host(host);
        if let Some(o) = self.configured.get(host) {
            return Ok(o.clone());
        }
        // docker.io is what clients say; the default upstream may be it.
        if let Some(d) = &self.default {
            if d.base.host_str().is_some_and(|h| h == host) {
                return Ok(d.clone());
            }
        }
        if !self.allow_unlisted {
            return Err(OriginError::Unlisted { host: host.into() });
        }
        if !self.allow_local {
            let bare = host.rsplit_once(':').map_or(host, |(h, p)| {
                if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) {
                    h
                } else {
                    host
                }
            });
            if literal_ip(bare).is_some_and(is_local) || bare.eq_ignore_ascii_case("localhost") {
                return Err(OriginError::Local {
                    host: host.chars().take(100).collect(),
                });
            }
        }
        let valid = !host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        let url = Url::parse(&format!("{scheme}://{host}/"))
            .ok()
            .filter(|_| valid);
        let Some(url) = url else {
            return Err(OriginError::BadHost {
                host: host.chars().take(100).collect(),
            });
        };
        // The URL parser reads `127.1`, `0x7f000001` or `2130706433` as the address they mean:
        // check what it made of the host, not the text.
        if !self.allow_local && reach::check_url(&url).is_err() {
            return Err(OriginError::Local {
                host: host.chars().take(100).collect(),
            });
        }
        // Keyed by scheme too: a host named over plain HTTP (a proxy URL) is another origin than
        // the same host over HTTPS (`?ns=`).
        let key = format!("{scheme}://{host}");
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((o, used)) = learned.get_mut(&key) {
            *used = Instant::now();
            return Ok(o.clone());
        }
        let upstream = Upstream {
            host: host.to_owned(),
            url,
            default: false,
            ca_pem: None,
            credentials: None,
        };
        let mut origin = Origin::new(&upstream, self.timeout, self.metrics.clone(), None, false)
            .map_err(|e| OriginError::Token {
                host: host.into(),
                message: e.to_string(),
            })?;
        if !self.allow_local {
            origin.client = guarded_client(self.timeout).map_err(|e| OriginError::Token {
                host: host.into(),
                message: e.to_string(),
            })?;
            origin.guarded = true;
        }
        let origin = Arc::new(origin);
        if learned.len() >= LEARNED_CAP {
            let oldest = learned
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                learned.remove(&k);
            }
        }
        learned.insert(key, (origin.clone(), Instant::now()));
        Ok(origin)
    }
}

/// containerd says `docker.io`; Docker Hub's API lives elsewhere.
fn normalize_host(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    }
}

/// The HTTP client of an unlisted origin: DNS answers and redirects that lead to this host are
/// refused (`reach`).
fn guarded_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    client_builder(timeout)
        .dns_resolver(Arc::new(reach::GuardedResolver))
        .redirect(reach::guarded_redirects())
        .build()
}

fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
}

impl Origin {
    fn new(
        u: &Upstream,
        timeout: Duration,
        metrics: Arc<Metrics>,
        learn: Option<ProxyTargets>,
        configured: bool,
    ) -> anyhow::Result<Self> {
        let mut b = client_builder(timeout);
        if let Some(t) = &learn {
            b = b.redirect(reach::learning_redirects(t.clone()));
        }
        if let Some(pem) = &u.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                b = b.add_root_certificate(cert);
            }
        }
        let host = if u.url.host_str() == Some("registry-1.docker.io") {
            "docker.io".to_owned()
        } else {
            u.host.clone()
        };
        Ok(Self {
            host,
            base: u.url.clone(),
            configured,
            learn,
            guarded: false,
            client: b.build()?,
            credentials: u.credentials.clone(),
            tokens: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Whether the operator gave this node credentials for this origin.
    pub fn has_node_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `GET /v2/` without any credentials and without answering a challenge: the origin's own
    /// answer to an anonymous client.
    pub async fn ping(&self) -> Result<reqwest::Response, OriginError> {
        self.raw(Method::GET, "/v2/", HeaderMap::new(), "base")
            .await
    }

    /// The absolute URL of a `/v2/...` path on this origin.
    pub fn url(&self, path_and_query: &str) -> Url {
        let mut u = self.base.clone();
        match path_and_query.split_once('?') {
            Some((p, q)) => {
                u.set_path(p);
                u.set_query(Some(q));
            }
            None => u.set_path(path_and_query),
        }
        u
    }

    /// Send `method path` with `headers`, authenticating as `auth` says.
    /// `kind` labels the origin-request metric. `repo` scopes tokens.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &HeaderMap,
        auth: &AuthMode,
        repo: Option<&RepoName>,
        kind: &'static str,
    ) -> Result<reqwest::Response, OriginError> {
        let scope = repo.map(|r| format!("repository:{r}:pull"));
        match auth {
            AuthMode::Client(value) => {
                let mut h = headers.clone();
                h.insert(AUTHORIZATION, value.clone());
                self.raw(method, path, h, kind).await
            }
            AuthMode::Node => {
                let cached = scope.as_deref().and_then(|s| self.cached_token(s));
                let mut h = headers.clone();
                if let Some(t) = &cached {
                    h.insert(AUTHORIZATION, bearer(t));
                } else if let Some((u, p)) = &self.credentials {
                    // Registries that use Basic accept it up front; a
                    // token registry answers 401 with its challenge anyway.
                    h.insert(AUTHORIZATION, basic(u, p));
                }
                let resp = self.raw(method.clone(), path, h, kind).await?;
                if resp.status() != StatusCode::UNAUTHORIZED {
                    return Ok(resp);
                }
                let Some(challenge) = resp.headers().get(WWW_AUTHENTICATE).cloned() else {
                    return Ok(resp);
                };
                let Some(token) = self.token_for(&challenge, scope.as_deref()).await? else {
                    return Ok(resp);
                };
                let mut h = headers.clone();
                h.insert(AUTHORIZATION, bearer(&token));
                self.raw(method, path, h, kind).await
            }
        }
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        kind: &'static str,
    ) -> Result<reqwest::Response, OriginError> {
        self.metrics.origin_request(kind);
        let mut headers = headers;
        headers.insert(HOP_HEADER, HeaderValue::from_static(hop_token()));
        let resp = self
            .client
            .request(method, self.url(path))
            .headers(headers)
            .send()
            .await
            .inspect(|resp| self.metrics.origin_status(kind, resp.status().as_u16()))
            .map_err(|source| {
                self.metrics.origin_unreachable(kind, &source);
                OriginError::Unreachable {
                    host: self.host.clone(),
                    source,
                }
            })?;
        if let (Some(learn), StatusCode::UNAUTHORIZED) = (&self.learn, resp.status()) {
            // A configured registry sends its clients to this token realm (through the proxy,
            // for clients that use one).
            let realm = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(BearerChallenge::parse);
            if let Some(ch) = realm {
                learn.learn_url(&ch.realm);
            }
        }
        Ok(resp)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(scope)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(t, _)| t.clone())
    }

    /// Answer a Bearer challenge with the node's credentials (or
    /// anonymously). `None` when the challenge is not a Bearer one.
    async fn token_for(
        &self,
        challenge: &HeaderValue,
        scope: Option<&str>,
    ) -> Result<Option<String>, OriginError> {
        let Some(ch) = challenge.to_str().ok().and_then(BearerChallenge::parse) else {
            return Ok(None);
        };
        // Cached under the scope the node asked for, never one the challenge names (an
        // origin could otherwise grow the cache without bound).
        let cache_as = scope;
        let scope = ch.scope.as_deref().or(scope);
        let Ok(mut url) = Url::parse(&ch.realm) else {
            return Err(OriginError::Token {
                host: self.host.clone(),
                message: format!("bad realm {:?}", ch.realm),
            });
        };
        if self.guarded {
            // The realm is the origin's word, and the origin may be the requester's: it must not
            // send the node to this host's own services.
            if let Err(why) = reach::check_url(&url) {
                return Err(OriginError::Token {
                    host: self.host.clone(),
                    message: format!("token realm refused: {why}"),
                });
            }
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &ch.service {
                q.append_pair("service", s);
            }
            if let Some(s) = scope {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.client.get(url);
        if let Some((u, p)) = &self.credentials {
            req = req.header(AUTHORIZATION, basic(u, p));
        }
        self.metrics.origin_request("token");
        let resp = req
            .send()
            .await
            .map_err(|source| OriginError::Unreachable {
                host: self.host.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let bytes = read_at_most(resp, MAX_TOKEN_ANSWER)
            .await
            .map_err(|message| OriginError::Token {
                host: self.host.clone(),
                message,
            })?;
        let body: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| OriginError::Token {
                host: self.host.clone(),
                message: e.to_string(),
            })?;
        let Some(token) = body.token.or(body.access_token) else {
            return Ok(None);
        };
        // Renew a little early; the spec's default lifetime is 60 s.
        let life = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(10, 3600));
        if let Some(s) = cache_as {
            let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            if tokens.len() >= TOKEN_CACHE_CAP {
                let now = Instant::now();
                tokens.retain(|_, (_, exp)| *exp > now);
                if tokens.len() >= TOKEN_CACHE_CAP {
                    tokens.clear();
                }
            }
            tokens.insert(
                s.to_owned(),
                (
                    token.clone(),
                    Instant::now() + life - Duration::from_secs(5),
                ),
            );
        }
        Ok(Some(token))
    }
}

/// Largest token-service answer read (a token is a few KiB).
const MAX_TOKEN_ANSWER: u64 = 64 << 10;
/// Tokens cached per origin at most (one per repository scope in use).
const TOKEN_CACHE_CAP: usize = 1024;

/// A response body of at most `limit` bytes (a longer one is an error, read no further).
pub async fn read_at_most(mut resp: reqwest::Response, limit: u64) -> Result<bytes::Bytes, String> {
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(format!("answer larger than {limit} bytes"));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(format!("answer larger than {limit} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

fn bearer(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `Basic base64(user:pass)`; also used by `shoal convert`'s registry client.
pub(crate) fn basic(user: &str, pass: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    HeaderValue::from_str(&format!("Basic {enc}")).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `Bearer realm="…",service="…",scope="…"`; also used by `shoal convert`'s registry client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BearerChallenge {
    pub(crate) realm: String,
    pub(crate) service: Option<String>,
    pub(crate) scope: Option<String>,
}

impl BearerChallenge {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let rest = s
            .trim()
            .strip_prefix("Bearer ")
            .or_else(|| s.trim().strip_prefix("bearer "))?;
        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        for (k, v) in parse_params(rest) {
            match k.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                "scope" => scope = Some(v),
                _ => {}
            }
        }
        Some(Self {
            realm: realm?,
            service,
            scope,
        })
    }
}

/// `k="v", k2=v2` pairs; quoted values may contain commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_owned();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = BearerChallenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull,push""#,
        )
        .expect("bearer");
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(
            c.scope.as_deref(),
            Some("repository:library/debian:pull,push")
        );
        assert!(BearerChallenge::parse(r#"Basic realm="Registry Realm""#).is_none());
        assert!(BearerChallenge::parse("Bearer").is_none());
        assert!(BearerChallenge::parse(r#"Bearer service="x""#).is_none());
    }
}

/// Largest manifest or index fetched for the node's own use (mounts,
/// prewarm).
pub const MAX_MANIFEST: usize = 4 << 20;

/// A manifest (or index) fetched with the node's credentials.
#[derive(Debug)]
pub struct FetchedManifest {
    /// Its digest: the one asked for (checked), or the sha256 of the bytes.
    pub digest: shoal_proto::Digest,
    pub bytes: Vec<u8>,
    /// Its `mediaType` field, else the response's `Content-Type`.
    pub media_type: Option<String>,
}

/// Why [`Origin::get_manifest`] has no manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    #[error("origin answered {0}")]
    Status(u16),
    #[error("larger than {MAX_MANIFEST} bytes")]
    TooLarge,
    #[error("content does not match its digest")]
    DigestMismatch,
}

impl Origin {
    /// GET `repo`'s manifest `reference` as the node (its credentials),
    /// bounded by [`MAX_MANIFEST`]; a manifest asked for by digest must hash
    /// to it.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &shoal_proto::Reference,
    ) -> Result<FetchedManifest, ManifestError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static(crate::mirror::MANIFEST_ACCEPT),
        );
        let path = format!("/v2/{repo}/manifests/{reference}");
        let mut resp = self
            .send(
                Method::GET,
                &path,
                &headers,
                &AuthMode::Node,
                Some(repo),
                "manifest",
            )
            .await
            .map_err(|e| ManifestError::Unreachable(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            return Err(ManifestError::Status(resp.status().as_u16()));
        }
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ManifestError::Unreachable(e.to_string()))?
        {
            if bytes.len() + chunk.len() > MAX_MANIFEST {
                return Err(ManifestError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        let digest = match reference {
            shoal_proto::Reference::Digest(d) => {
                if shoal_proto::Digest::of(d.algorithm(), &bytes) != *d {
                    return Err(ManifestError::DigestMismatch);
                }
                d.clone()
            }
            shoal_proto::Reference::Tag(_) => shoal_proto::Digest::sha256(&bytes),
        };
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
            .or(ctype);
        Ok(FetchedManifest {
            digest,
            bytes,
            media_type,
        })
    }
}
