//! Who may read what: the private-content rule of DESIGN.md.
//!
//! Content that an origin serves without credentials is public and needs no
//! check. Content from a repository that needed credentials is served only to
//! a client whose credentials the origin accepts for that repository, checked
//! with a cheap upstream `HEAD` of the very object asked for and remembered
//! per (credential, origin, repository) for `mirror.access_ttl`. Content an
//! origin serves with the node's own credentials is, by the operator's
//! choice, readable by every client of the node.
//!
//! Fails closed: when the origin cannot be asked and nothing fresh is
//! remembered, private content is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::RepoName;

use crate::metrics::Metrics;
use crate::upstream::{AuthMode, Origin};

/// What the store knows about an object before asking anyone.
#[derive(Clone, Copy, Debug, Default)]
pub struct Known {
    /// Some origin served it without credentials.
    pub public: bool,
    /// It was fetched from (or checked in) this very origin and repository.
    pub in_repo: bool,
}

/// The outcome of a check.
#[derive(Debug)]
pub enum Decision {
    /// Anyone may read it; fetch with the node's (or no) credentials.
    Public,
    /// This client may read it; fetch with this mode.
    Granted(AuthMode),
    /// Not this client: why.
    Denied(Denial),
}

#[derive(Debug)]
pub enum Denial {
    /// No or bad credentials; the origin's challenge to relay.
    Unauthorized(Option<HeaderValue>),
    Forbidden,
    /// The origin says the object is not in that repository.
    NotFound,
    /// The origin could not be asked.
    Unavailable(String),
}

/// (hash of the client's credentials, origin host, repository)
type GrantKey = ([u8; 32], String, RepoName);

/// Remembered answers, per origin and repository.
#[derive(Debug)]
pub struct Access {
    ttl: Duration,
    repo_public: Mutex<HashMap<(String, RepoName), (Instant, bool)>>,
    grants: Mutex<HashMap<GrantKey, Instant>>,
    metrics: Arc<Metrics>,
}

impl Access {
    pub fn new(ttl: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            ttl,
            repo_public: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// May the client holding `client_auth` read `object_path` (a
    /// `/v2/<repo>/blobs/<digest>` or `/manifests/<digest>` path) of `repo`
    /// at `origin`?
    pub async fn check(
        &self,
        origin: &Origin,
        repo: &RepoName,
        object_path: &str,
        client_auth: Option<&HeaderValue>,
        known: Known,
    ) -> Decision {
        if known.public || origin.has_node_credentials() {
            return Decision::Public;
        }
        let repo_key = (origin.host.clone(), repo.clone());
        if self.fresh_repo_public(&repo_key) == Some(true) {
            return Decision::Public;
        }
        if let Some(auth) = client_auth {
            if known.in_repo && self.fresh_grant(auth, &repo_key) {
                self.count("cached");
                return Decision::Granted(AuthMode::Client(auth.clone()));
            }
        }
        // Is the repository open to anyone?
        let mut challenge = None;
        if self.fresh_repo_public(&repo_key) != Some(false) {
            match self.head(origin, repo, object_path, &AuthMode::Node).await {
                Ok((s, _)) if s.is_success() => {
                    self.remember_repo(repo_key, true);
                    self.count("public");
                    return Decision::Public;
                }
                Ok((s, ch)) if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => {
                    self.remember_repo(repo_key.clone(), false);
                    challenge = ch;
                }
                Ok((s, _)) if s == StatusCode::NOT_FOUND => {
                    return Decision::Denied(Denial::NotFound)
                }
                Ok((s, _)) => {
                    return Decision::Denied(Denial::Unavailable(format!("origin answered {s}")))
                }
                Err(e) => return Decision::Denied(Denial::Unavailable(e)),
            }
        }
        let Some(auth) = client_auth else {
            self.count("unauthorized");
            if challenge.is_none() {
                // Refresh the challenge so the client can start its dance.
                if let Ok((_, ch)) = self.head(origin, repo, object_path, &AuthMode::Node).await {
                    challenge = ch;
                }
            }
            return Decision::Denied(Denial::Unauthorized(challenge));
        };
        let mode = AuthMode::Client(auth.clone());
        match self.head(origin, repo, object_path, &mode).await {
            Ok((s, _)) if s.is_success() => {
                self.remember_grant(auth, repo_key);
                self.count("granted");
                Decision::Granted(mode)
            }
            Ok((StatusCode::UNAUTHORIZED, ch)) => {
                self.count("unauthorized");
                Decision::Denied(Denial::Unauthorized(ch))
            }
            Ok((StatusCode::FORBIDDEN, _)) => {
                self.count("forbidden");
                Decision::Denied(Denial::Forbidden)
            }
            Ok((StatusCode::NOT_FOUND, _)) => Decision::Denied(Denial::NotFound),
            Ok((s, _)) => Decision::Denied(Denial::Unavailable(format!("origin answered {s}"))),
            Err(e) => Decision::Denied(Denial::Unavailable(e)),
        }
    }

    /// Record that `client_auth` fetched from `repo` successfully (the fetch
    /// itself was the check).
    pub fn granted(&self, origin: &Origin, repo: &RepoName, client_auth: &HeaderValue) {
        self.remember_grant(client_auth, (origin.host.clone(), repo.clone()));
    }

    /// Whether anonymous reads of `object_path` work (cached per repository).
    pub async fn is_public(&self, origin: &Origin, repo: &RepoName, object_path: &str) -> bool {
        let key = (origin.host.clone(), repo.clone());
        if let Some(p) = self.fresh_repo_public(&key) {
            return p;
        }
        let public = matches!(
            self.head(origin, repo, object_path, &AuthMode::Node).await,
            Ok((s, _)) if s.is_success()
        ) || origin.has_node_credentials();
        self.remember_repo(key, public);
        public
    }

    async fn head(
        &self,
        origin: &Origin,
        repo: &RepoName,
        path: &str,
        auth: &AuthMode,
    ) -> Result<(StatusCode, Option<HeaderValue>), String> {
        let mut headers = HeaderMap::new();
        if path.contains("/manifests/") {
            headers.insert(
                reqwest::header::ACCEPT,
                HeaderValue::from_static(crate::mirror::MANIFEST_ACCEPT),
            );
        }
        let resp = origin
            .send(
                Method::HEAD,
                path,
                &headers,
                auth,
                Some(repo),
                "access_check",
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((resp.status(), resp.headers().get(WWW_AUTHENTICATE).cloned()))
    }

    fn fresh_repo_public(&self, key: &(String, RepoName)) -> Option<bool> {
        let m = self.repo_public.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key)
            .filter(|(t, _)| t.elapsed() < self.ttl)
            .map(|(_, p)| *p)
    }

    fn remember_repo(&self, key: (String, RepoName), public: bool) {
        let mut m = self.repo_public.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, (t, _)| t.elapsed() < self.ttl);
        }
        m.insert(key, (Instant::now(), public));
    }

    fn fresh_grant(&self, auth: &HeaderValue, key: &(String, RepoName)) -> bool {
        let k = (cred_hash(auth), key.0.clone(), key.1.clone());
        let m = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&k).is_some_and(|t| t.elapsed() < self.ttl)
    }

    fn remember_grant(&self, auth: &HeaderValue, key: (String, RepoName)) {
        let mut m = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, t| t.elapsed() < self.ttl);
        }
        m.insert((cred_hash(auth), key.0, key.1), Instant::now());
    }

    fn count(&self, kind: &'static str) {
        self.metrics
            .access_checks
            .get_or_create(&crate::metrics::KindLabels { kind })
            .inc();
    }
}

/// Credentials are remembered only as a hash.
fn cred_hash(v: &HeaderValue) -> [u8; 32] {
    Sha256::digest(v.as_bytes()).into()
}
