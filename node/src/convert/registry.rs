//! The registry client `shoal convert` uses on both sides: fetch manifests and blobs from the
//! source, check, mount and upload blobs and put manifests at the target.
//!
//! Auth: with credentials, Basic goes up front (registries that use it accept it; a token
//! registry answers 401 with its challenge anyway); a `Bearer` challenge is answered with the
//! token dance of the distribution spec (credentials sent to the realm as Basic, or anonymous),
//! tokens cached per scope for the life of the client. A 401 that survives that is
//! [`RegistryError::Unauthorized`], naming the host and whether credentials were given.
//!
//! Invariants: a blob fetched to a file is renamed into place only after its digest matched; a
//! manifest fetched by digest must hash to it; nothing here retries a request silently except
//! the one resend after answering a challenge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};
use shoal_proto::{Digest, DigestAlgorithm, Reference, RepoName};
use tokio::io::AsyncWriteExt as _;

use super::auth::Credentials;
use crate::upstream::{basic, BearerChallenge};

/// Largest manifest, index or config accepted.
pub const MAX_MANIFEST: usize = 4 << 20;

/// What a source manifest request accepts.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("registry {host} refused the credentials for {repo} ({detail})")]
    Unauthorized {
        host: String,
        repo: String,
        detail: &'static str,
    },
    #[error("registry {host} denied access to {repo} (HTTP 403): the credentials lack the right")]
    Denied { host: String, repo: String },
    #[error("{what} does not exist (registry {host})")]
    NotFound { host: String, what: String },
    #[error("{what} on {host}: HTTP {status}: {body}")]
    Status {
        host: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what} on {host}: content digest {actual} does not match {expected}")]
    DigestMismatch {
        host: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} on {host} is larger than {limit} bytes")]
    TooLarge {
        host: String,
        what: String,
        limit: usize,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A request body that can be sent again after an auth challenge.
#[derive(Clone, Debug)]
pub enum Body {
    Empty,
    Bytes(bytes::Bytes),
    File { path: PathBuf, len: u64 },
}

/// One registry (scheme + host) with its credentials and token cache.
#[derive(Debug)]
pub struct Registry {
    /// The host as the reference names it (`docker.io`, `127.0.0.1:5000`).
    pub host: String,
    base: Url,
    client: reqwest::Client,
    creds: Option<Credentials>,
    tokens: Mutex<HashMap<String, String>>,
}

/// A manifest as fetched: its digest, media type and exact bytes.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Registry {
    /// A client for `host` (`docker.io` means Docker Hub's API host), over plain HTTP when
    /// `plain_http`.
    pub fn new(
        host: &str,
        plain_http: bool,
        creds: Option<Credentials>,
    ) -> Result<Self, RegistryError> {
        let api_host = match host {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            h => h,
        };
        let scheme = if plain_http { "http" } else { "https" };
        let unreachable = |reason: String| RegistryError::Unreachable {
            host: host.to_owned(),
            reason,
        };
        let base = Url::parse(&format!("{scheme}://{api_host}/"))
            .map_err(|e| unreachable(format!("bad registry host: {e}")))?;
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("shoal-convert/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Self {
            host: host.to_owned(),
            base,
            client,
            creds,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// GET a manifest or index (`what` names it in errors).
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Fetched, RegistryError> {
        let what = format!("manifest {}/{repo}:{reference}", self.host);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let scopes = [pull(repo)];
        let resp = self
            .send(
                Method::GET,
                &path,
                &scopes,
                Body::Empty,
                &[(ACCEPT, MANIFEST_ACCEPT)],
            )
            .await?;
        let resp = self.check(resp, repo, &what).await?;
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
            .unwrap_or_default();
        let bytes = self.body_limited(resp, &what, MAX_MANIFEST).await?;
        let digest = match reference {
            Reference::Digest(d) => {
                self.verify(&what, d, &bytes)?;
                d.clone()
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        Ok(Fetched {
            digest,
            media_type,
            bytes,
        })
    }

    /// GET a small blob (a config) into memory, verified.
    pub async fn small_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<u8>, RegistryError> {
        let what = format!("blob {repo}@{digest}");
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send(Method::GET, &path, &[pull(repo)], Body::Empty, &[])
            .await?;
        let resp = self.check(resp, repo, &what).await?;
        let bytes = self.body_limited(resp, &what, MAX_MANIFEST).await?;
        self.verify(&what, digest, &bytes)?;
        Ok(bytes)
    }

    /// GET a blob into `dest`, resuming a `dest.part` left by an earlier run with a `Range`
    /// request; `progress(bytes so far)` is called as data arrives. `dest` appears only with
    /// the right digest.
    pub async fn fetch_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), RegistryError> {
        let what = format!("blob {repo}@{digest}");
        let part = dest.with_extension("part");
        let io = |op, source| RegistryError::Io {
            op,
            path: part.clone(),
            source,
        };
        let mut hasher = digest.algorithm().hasher();
        let mut have = hash_existing(&part, &mut hasher)
            .await
            .map_err(|e| io("read", e))?;
        let path = format!("/v2/{repo}/blobs/{digest}");
        let range = format!("bytes={have}-");
        let headers: Vec<(reqwest::header::HeaderName, &str)> = if have > 0 {
            vec![(reqwest::header::RANGE, range.as_str())]
        } else {
            Vec::new()
        };
        let resp = self
            .send(Method::GET, &path, &[pull(repo)], Body::Empty, &headers)
            .await?;
        let mut resp = self.check(resp, repo, &what).await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            // The registry sent the whole blob: start over.
            have = 0;
            hasher = digest.algorithm().hasher();
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(have == 0)
            .append(have > 0)
            .open(&part)
            .await
            .map_err(|e| io("open", e))?;
        progress(have);
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.lost(e))? {
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| io("write", e))?;
            have += chunk.len() as u64;
            progress(have);
        }
        file.sync_all().await.map_err(|e| io("sync", e))?;
        drop(file);
        let actual = hasher.finish();
        if actual != *digest {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(RegistryError::DigestMismatch {
                host: self.host.clone(),
                what,
                expected: digest.clone(),
                actual,
            });
        }
        tokio::fs::rename(&part, dest)
            .await
            .map_err(|e| io("rename", e))
    }

    /// Whether `repo` already holds blob `digest` (HEAD).
    pub async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, RegistryError> {
        let what = format!("blob {repo}@{digest}");
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send(Method::HEAD, &path, &[push(repo)], Body::Empty, &[])
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            _ => self.check(resp, repo, &what).await.map(|_| true),
        }
    }

    /// Try a cross-repository mount of `digest` from `from` (same registry). `Ok(false)` when
    /// the registry declined (the caller uploads instead).
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: &RepoName,
    ) -> Result<bool, RegistryError> {
        let path = format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}");
        let resp = self
            .send(
                Method::POST,
                &path,
                &[push(repo), pull(from)],
                Body::Empty,
                &[(CONTENT_LENGTH, "0")],
            )
            .await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Upload `body` (whose digest is `digest`) as a blob of `repo`: POST then one PUT.
    pub async fn upload_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: Body,
    ) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest} to {}/{repo}", self.host);
        let scopes = [push(repo)];
        let start = format!("/v2/{repo}/blobs/uploads/");
        let resp = self
            .send(
                Method::POST,
                &start,
                &scopes,
                Body::Empty,
                &[(CONTENT_LENGTH, "0")],
            )
            .await?;
        let resp = self.check(resp, repo, &what).await?;
        let Some(location) = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| self.base.join(l).ok())
        else {
            return Err(self.status_error(&what, resp).await);
        };
        let mut url = location;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let resp = self
            .send_url(
                Method::PUT,
                url,
                &scopes,
                body,
                &[(CONTENT_TYPE, "application/octet-stream")],
            )
            .await?;
        self.check(resp, repo, &what).await.map(drop)
    }

    /// PUT a manifest or index under `reference`.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<(), RegistryError> {
        let what = format!("manifest {}/{repo}:{reference}", self.host);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(
                Method::PUT,
                &path,
                &[push(repo)],
                Body::Bytes(bytes.into()),
                &[(CONTENT_TYPE, media_type)],
            )
            .await?;
        self.check(resp, repo, &what).await.map(drop)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        scopes: &[String],
        body: Body,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> Result<reqwest::Response, RegistryError> {
        let mut url = self.base.clone();
        match path.split_once('?') {
            Some((p, q)) => {
                url.set_path(p);
                url.set_query(Some(q));
            }
            None => url.set_path(path),
        }
        self.send_url(method, url, scopes, body, headers).await
    }

    async fn send_url(
        &self,
        method: Method,
        url: Url,
        scopes: &[String],
        body: Body,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> Result<reqwest::Response, RegistryError> {
        let key = scopes.join(" ");
        let cached = self.token(&key);
        let auth = match (&cached, &self.creds) {
            (Some(t), _) => Some(bearer(t)),
            (None, Some(c)) => Some(basic(&c.user, &c.pass)),
            (None, None) => None,
        };
        let resp = self
            .once(method.clone(), url.clone(), auth, &body, headers)
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(BearerChallenge::parse);
        let Some(challenge) = challenge else {
            return Ok(resp);
        };
        let Some(token) = self.fetch_token(&challenge, scopes).await? else {
            return Ok(resp);
        };
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, token.clone());
        self.once(method, url, Some(bearer(&token)), &body, headers)
            .await
    }

    async fn once(
        &self,
        method: Method,
        url: Url,
        auth: Option<HeaderValue>,
        body: &Body,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> Result<reqwest::Response, RegistryError> {
        let mut req = self.client.request(method, url);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        for (k, v) in headers {
            req = req.header(k, *v);
        }
        req = match body {
            Body::Empty => req,
            Body::Bytes(b) => req.body(b.clone()),
            Body::File { path, len } => {
                let f = tokio::fs::File::open(path)
                    .await
                    .map_err(|source| RegistryError::Io {
                        op: "open",
                        path: path.clone(),
                        source,
                    })?;
                let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10);
                req.header(CONTENT_LENGTH, *len)
                    .body(reqwest::Body::wrap_stream(stream))
            }
        };
        req.send().await.map_err(|e| self.lost(e))
    }

    fn token(&self, key: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.get(key).cloned()
    }

    /// The token dance: GET realm?service=…&scope=… (Basic with the credentials, if any).
    /// `None` when the token service turns us away (the caller reports the 401).
    async fn fetch_token(
        &self,
        ch: &BearerChallenge,
        scopes: &[String],
    ) -> Result<Option<String>, RegistryError> {
        let Ok(mut url) = Url::parse(&ch.realm) else {
            return Err(RegistryError::Status {
                host: self.host.clone(),
                what: "token challenge".into(),
                status: 401,
                body: format!("bad realm {:?}", ch.realm),
            });
        };
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &ch.service {
                q.append_pair("service", s);
            }
            if scopes.is_empty() {
                if let Some(s) = &ch.scope {
                    q.append_pair("scope", s);
                }
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.client.get(url);
        if let Some(c) = &self.creds {
            req = req.header(AUTHORIZATION, basic(&c.user, &c.pass));
        }
        let resp = req.send().await.map_err(|e| self.lost(e))?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let bytes = resp.bytes().await.map_err(|e| self.lost(e))?;
        let body: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Status {
                host: self.host.clone(),
                what: "token response".into(),
                status: 200,
                body: e.to_string(),
            })?;
        Ok(body.token.or(body.access_token))
    }

    /// Map a non-success response to its error; pass a success through.
    async fn check(
        &self,
        resp: reqwest::Response,
        repo: &RepoName,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        match resp.status() {
            s if s.is_success() => Ok(resp),
            StatusCode::UNAUTHORIZED => Err(RegistryError::Unauthorized {
                host: self.host.clone(),
                repo: repo.to_string(),
                detail: if self.creds.is_some() {
                    "wrong user or password?"
                } else {
                    "it needs credentials: --src-creds/--dest-creds, or an auth file"
                },
            }),
            StatusCode::FORBIDDEN => Err(RegistryError::Denied {
                host: self.host.clone(),
                repo: repo.to_string(),
            }),
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound {
                host: self.host.clone(),
                what: what.to_owned(),
            }),
            _ => Err(self.status_error(what, resp).await),
        }
    }

    async fn status_error(&self, what: &str, resp: reqwest::Response) -> RegistryError {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        RegistryError::Status {
            host: self.host.clone(),
            what: what.to_owned(),
            status,
            body: body.chars().take(300).collect::<String>().trim().to_owned(),
        }
    }

    async fn body_limited(
        &self,
        mut resp: reqwest::Response,
        what: &str,
        limit: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.lost(e))? {
            if body.len() + chunk.len() > limit {
                return Err(RegistryError::TooLarge {
                    host: self.host.clone(),
                    what: what.to_owned(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn verify(&self, what: &str, expected: &Digest, bytes: &[u8]) -> Result<(), RegistryError> {
        let actual = Digest::of(expected.algorithm(), bytes);
        if actual == *expected {
            return Ok(());
        }
        Err(RegistryError::DigestMismatch {
            host: self.host.clone(),
            what: what.to_owned(),
            expected: expected.clone(),
            actual,
        })
    }

    fn lost(&self, e: reqwest::Error) -> RegistryError {
        // The innermost cause (connection refused, DNS, TLS) is what a person can act on.
        let mut reason = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            reason = s.to_string();
            src = s.source();
        }
        RegistryError::Unreachable {
            host: self.host.clone(),
            reason,
        }
    }
}

fn pull(repo: &RepoName) -> String {
    format!("repository:{repo}:pull")
}

fn push(repo: &RepoName) -> String {
    format!("repository:{repo}:pull,push")
}

fn bearer(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Feed an existing partial download to `hasher`; its length (0 when absent).
async fn hash_existing(
    part: &Path,
    hasher: &mut shoal_proto::digest::Hasher,
) -> std::io::Result<u64> {
    use tokio::io::AsyncReadExt as _;
    let mut f = match tokio::fs::File::open(part).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
}

/// The sha256 digest of a file (for blobs the builder wrote).
pub fn sha256_file(path: &Path) -> std::io::Result<Digest> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = DigestAlgorithm::Sha256.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..k]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode as Code};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    /// A registry that wants `Bearer tok` and a token service that wants `Basic alice:pw`,
    /// as Docker Hub, GHCR and Harbor are set up.
    async fn token_registry() -> String {
        async fn manifest(State(realm): State<String>, h: HeaderMap) -> Response {
            if h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer tok") {
                return (Code::OK, [("content-type", "application/json")], "{}").into_response();
            }
            let challenge =
                format!(r#"Bearer realm="{realm}",service="test",scope="repository:a/b:pull""#);
            (Code::UNAUTHORIZED, [("www-authenticate", challenge)], "").into_response()
        }
        async fn token(h: HeaderMap) -> Response {
            let want = basic("alice", "pw");
            if h.get("authorization") != Some(&want) {
                return Code::UNAUTHORIZED.into_response();
            }
            (Code::OK, r#"{"token":"tok","expires_in":300}"#).into_response()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .route("/v2/a/b/manifests/1", get(manifest))
            .route("/token", get(token))
            .with_state(format!("http://{addr}/token"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr.to_string()
    }

    #[tokio::test]
    async fn answers_bearer_challenges_with_the_token_dance() {
        let host = token_registry().await;
        let repo: RepoName = "a/b".parse().expect("repo");
        let tag: Reference = "1".parse().expect("tag");
        let creds = |u: &str, p: &str| {
            Some(Credentials {
                user: u.into(),
                pass: p.into(),
            })
        };
        let ok = Registry::new(&host, true, creds("alice", "pw")).expect("client");
        let m = ok
            .manifest(&repo, &tag)
            .await
            .expect("manifest with a token");
        assert_eq!(m.bytes, b"{}");
        // The token is cached for the scope: the second request needs no new dance.
        ok.manifest(&repo, &tag).await.expect("cached token");

        let wrong = Registry::new(&host, true, creds("alice", "nope")).expect("client");
        let e = wrong
            .manifest(&repo, &tag)
            .await
            .expect_err("wrong password");
        assert!(
            matches!(e, RegistryError::Unauthorized { .. }) && e.to_string().contains("wrong"),
            "{e}"
        );
        let anon = Registry::new(&host, true, None).expect("client");
        let e = anon.manifest(&repo, &tag).await.expect_err("anonymous");
        assert!(e.to_string().contains("needs credentials"), "{e}");
    }
}
