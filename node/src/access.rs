//! Who may read what: the private-content rule of DESIGN.md ("Trust boundaries").
//!
//! The store is keyed by digest alone, so the question is never "is this blob public?" but "has
//! *this request* proven that the origin *it names* lets *this client* read this object?".
//! Stored bytes reach a client only when access is proven in one of these ways:
//!
//! 1. The object's [`Provenance`] says it is *open* in exactly the requested (upstream,
//!    repository): the node fetched or confirmed it there without the client's credentials.
//! 2. The upstream is **configured** (an operator's `[[upstream]]`/`--upstream`): its answer is
//!    trusted. A `HEAD` of the very object with the client's credentials (remembered per
//!    credential, upstream and repository for `mirror.access_ttl`), or — when the client sends
//!    none — with the node's own (remembered per upstream and repository), says yes. Node
//!    credentials thus open content only where that upstream itself serves it to them.
//! 3. The upstream is **not configured** (an unlisted host the request named: `?ns=`,
//!    `X-Shoal-Registry`, a proxy URL): its word proves nothing, since the requester may run it.
//!    Only a proof of possession counts (`possession`), and only for a *complete* blob (a proof
//!    over part of it says nothing of the rest): it returns the right bytes for ranges the node
//!    picks at random (small blobs: the whole blob, digest-checked). Remembered per
//!    (credential, upstream, repository, digest) for `mirror.access_ttl`. Such an origin never
//!    feeds a shared download (`download`): what it sends goes to its requester alone.
//!
//! When nothing can be proven (an unlisted origin and no held bytes to compare), the decision is
//! [`Decision::OriginOnly`]: the client may have what its origin sends, fetched for it alone,
//! never bytes from the cache, a peer, or another client's download.
//!
//! Fails closed: when an origin cannot be asked and nothing fresh is remembered, private content
//! is refused.

mod possession;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::{BlobId, RepoName};

use crate::metrics::Metrics;
use crate::store::{Provenance, RepoKey, Store};
use crate::upstream::{AuthMode, Origin};

pub use possession::{plan as plan_samples, SAMPLE_LEN, WHOLE_BLOB_MAX};

/// Entries each memo keeps at most (oldest dropped first once expired ones are gone).
const MEMO_CAP: usize = 100_000;

/// What is asked for.
#[derive(Clone, Copy, Debug)]
pub enum Object<'a> {
    Blob(&'a BlobId),
    Manifest(&'a shoal_proto::Digest),
}

impl Object<'_> {
    fn path(&self, repo: &RepoName) -> String {
        match self {
            Object::Blob(d) => format!("/v2/{repo}/blobs/{d}"),
            Object::Manifest(d) => format!("/v2/{repo}/manifests/{d}"),
        }
    }
}

/// The outcome of a check.
#[derive(Debug)]
pub enum Decision {
    /// Stored bytes may be served, downloads joined, and the cluster used. `auth`: the
    /// credentials to fetch with; `open`: whether any client may read it through this upstream
    /// and repository (recorded in the object's provenance).
    Cache { auth: AuthMode, open: bool },
    /// Access could not be proven: the client gets only what its origin sends, fetched for it
    /// alone, with `auth`.
    OriginOnly { auth: AuthMode },
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

/// Remembered answers. Credentials are remembered only as a hash.
#[derive(Debug)]
pub struct Access {
    ttl: Duration,
    samples: u64,
    store: Store,
    /// (upstream, object path) → readable with the node's own credentials (configured upstreams).
    open: Memo<(String, String), bool>,
    /// (credential, upstream, object path) → the origin let the credential read the object
    /// (configured upstreams).
    grants: Memo<([u8; 32], String, String), ()>,
    /// (credential or none, upstream, repo, digest) → possession proven (unlisted upstreams).
    proofs: Memo<([u8; 32], String, RepoName, BlobId), ()>,
    metrics: Arc<Metrics>,
}

impl Access {
    /// `ttl`: how long answers are remembered; `samples`: ranges per proof of possession.
    pub fn new(ttl: Duration, samples: u64, store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            ttl,
            samples: samples.max(1),
            store,
            open: Memo::default(),
            grants: Memo::default(),
            proofs: Memo::default(),
            metrics,
        }
    }

    /// May the client holding `client_auth` read `object` of `repo` at `origin`, given where the
    /// node has it from (`provenance`)?
    pub async fn check(
        &self,
        origin: &Origin,
        repo: &RepoName,
        object: Object<'_>,
        client_auth: Option<&HeaderValue>,
        provenance: Option<&Provenance>,
    ) -> Decision {
        let key = RepoKey {
            upstream: origin.host.clone(),
            repo: repo.clone(),
        };
        let auth = match client_auth {
            Some(v) => AuthMode::Client(v.clone()),
            None => AuthMode::Node,
        };
        if provenance.is_some_and(|p| p.is_open(&key)) {
            self.count("open");
            return Decision::Cache { auth, open: true };
        }
        if origin.configured {
            return self.ask_configured(origin, repo, object, client_auth).await;
        }
        match object {
            Object::Blob(digest) => self.prove(origin, repo, digest, client_auth).await,
            // A manifest is small: the client gets it from its origin, digest-checked.
            Object::Manifest(_) => {
                self.count("origin_only");
                Decision::OriginOnly { auth }
            }
        }
    }

    /// Rule 2: a configured upstream's answer.
    async fn ask_configured(
        &self,
        origin: &Origin,
        repo: &RepoName,
        object: Object<'_>,
        client_auth: Option<&HeaderValue>,
    ) -> Decision {
        let path = object.path(repo);
        let open_key = (origin.host.clone(), path.clone());
        let Some(cred) = client_auth else {
            match self.open.get(&open_key, self.ttl) {
                Some(true) => {
                    self.count("cached");
                    return Decision::Cache {
                        auth: AuthMode::Node,
                        open: true,
                    };
                }
                Some(false) => {
                    self.count("unauthorized");
                    let challenge = self.challenge(origin, repo, &path).await;
                    return Decision::Denied(Denial::Unauthorized(challenge));
                }
                None => {}
            }
            return match self.head(origin, repo, &path, &AuthMode::Node).await {
                Ok((s, _)) if s.is_success() => {
                    self.open.put(open_key, true);
                    self.count("public");
                    Decision::Cache {
                        auth: AuthMode::Node,
                        open: true,
                    }
                }
                Ok((s, ch)) if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => {
                    self.open.put(open_key, false);
                    self.count("unauthorized");
                    Decision::Denied(Denial::Unauthorized(ch))
                }
                other => self.refused(other),
            };
        };
        let grant_key = (cred_hash(cred), origin.host.clone(), path.clone());
        let mode = AuthMode::Client(cred.clone());
        if self.grants.get(&grant_key, self.ttl).is_some() {
            self.count("cached");
            return Decision::Cache {
                auth: mode,
                open: false,
            };
        }
        match self.head(origin, repo, &path, &mode).await {
            Ok((s, _)) if s.is_success() => {
                self.grants.put(grant_key, ());
                self.count("granted");
                Decision::Cache {
                    auth: mode,
                    open: false,
                }
            }
            other => self.refused(other),
        }
    }

    /// Rule 3: proof of possession by an origin the request named.
    async fn prove(
        &self,
        origin: &Origin,
        repo: &RepoName,
        digest: &BlobId,
        client_auth: Option<&HeaderValue>,
    ) -> Decision {
        let auth = match client_auth {
            Some(v) => AuthMode::Client(v.clone()),
            None => AuthMode::Node,
        };
        let open = client_auth.is_none();
        let proof_key = (
            client_auth.map_or([0; 32], cred_hash),
            origin.host.clone(),
            repo.clone(),
            digest.clone(),
        );
        if self.proofs.get(&proof_key, self.ttl).is_some() {
            self.count("cached");
            return Decision::Cache { auth, open };
        }
        let store = self.store.clone();
        let id = digest.clone();
        let reader = tokio::task::spawn_blocking(move || store.open_reader(&id)).await;
        // Only a complete blob can be proven: a proof over part of it would open the rest,
        // which the requester never showed it knows.
        let Ok(Ok(Some(reader))) = reader else {
            self.count("origin_only");
            return Decision::OriginOnly { auth };
        };
        if !reader.record().complete {
            self.count("origin_only");
            return Decision::OriginOnly { auth };
        }
        let outcome =
            possession::prove(origin, repo, digest, &auth, Arc::new(reader), self.samples).await;
        match outcome {
            possession::Outcome::Proven => {
                self.proofs.put(proof_key, ());
                self.count("proven");
                Decision::Cache { auth, open }
            }
            possession::Outcome::Refuted { why } => {
                // An origin claiming a blob it does not hold: someone probing for content.
                tracing::warn!(origin = %origin.host, %repo, blob = %digest, why, "proof of possession failed; refusing the cached blob");
                self.count("refuted");
                Decision::Denied(Denial::Forbidden)
            }
            possession::Outcome::Refused { status, challenge } => {
                self.refused(Ok((status, challenge)))
            }
            possession::Outcome::Unavailable(e) => {
                self.count("unavailable");
                Decision::Denied(Denial::Unavailable(e))
            }
            possession::Outcome::NotProvable(why) => {
                tracing::debug!(origin = %origin.host, blob = %digest, why, "no proof possible; serving from the origin only");
                self.count("origin_only");
                Decision::OriginOnly { auth }
            }
        }
    }

    /// Whether anonymous (or node-credential) reads of `object` work at a configured `origin`
    /// (remembered per object). Always false for an unlisted origin, whose answer proves nothing.
    pub async fn is_open(&self, origin: &Origin, repo: &RepoName, object: Object<'_>) -> bool {
        if !origin.configured {
            return false;
        }
        let path = object.path(repo);
        let key = (origin.host.clone(), path.clone());
        if let Some(p) = self.open.get(&key, self.ttl) {
            return p;
        }
        let open = matches!(
            self.head(origin, repo, &path, &AuthMode::Node).await,
            Ok((s, _)) if s.is_success()
        );
        self.open.put(key, open);
        open
    }

    /// Record that `client_auth` fetched `object` from `repo` at a configured `origin`
    /// successfully (the fetch itself was the check).
    pub fn granted(
        &self,
        origin: &Origin,
        repo: &RepoName,
        object: Object<'_>,
        client_auth: &HeaderValue,
    ) {
        if origin.configured {
            self.grants.put(
                (
                    cred_hash(client_auth),
                    origin.host.clone(),
                    object.path(repo),
                ),
                (),
            );
        }
    }

    /// The denial for an origin's answer to a check.
    fn refused(&self, answer: Result<(StatusCode, Option<HeaderValue>), String>) -> Decision {
        let denial = match answer {
            Ok((StatusCode::UNAUTHORIZED, ch)) => {
                self.count("unauthorized");
                Denial::Unauthorized(ch)
            }
            Ok((StatusCode::FORBIDDEN, _)) => {
                self.count("forbidden");
                Denial::Forbidden
            }
            Ok((StatusCode::NOT_FOUND, _)) => {
                self.count("not_found");
                Denial::NotFound
            }
            Ok((s, _)) => {
                self.count("unavailable");
                Denial::Unavailable(format!("origin answered {s}"))
            }
            Err(e) => {
                self.count("unavailable");
                Denial::Unavailable(e)
            }
        };
        Decision::Denied(denial)
    }

    /// A fresh challenge for a client that sent no credentials, so it can start its login.
    async fn challenge(&self, origin: &Origin, repo: &RepoName, path: &str) -> Option<HeaderValue> {
        self.head(origin, repo, path, &AuthMode::Node)
            .await
            .ok()
            .and_then(|(_, ch)| ch)
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

    fn count(&self, kind: &'static str) {
        self.metrics
            .access_checks
            .get_or_create(&crate::metrics::KindLabels { kind })
            .inc();
    }
}

/// A bounded map of answers with the time they were given.
#[derive(Debug)]
struct Memo<K, V>(Mutex<HashMap<K, (Instant, V)>>);

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Memo<K, V> {
    fn get(&self, k: &K, ttl: Duration) -> Option<V> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(k)
            .filter(|(t, _)| t.elapsed() < ttl)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, k: K, v: V) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MEMO_CAP {
            // Drop the older half: cheap, rare, and keeps the map bounded whatever the TTL.
            let mut times: Vec<Instant> = m.values().map(|(t, _)| *t).collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            m.retain(|_, (t, _)| *t > cut);
        }
        m.insert(k, (Instant::now(), v));
    }
}

/// Credentials are remembered only as a hash.
fn cred_hash(v: &HeaderValue) -> [u8; 32] {
    Sha256::digest(v.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_is_bounded_and_expires() {
        let m: Memo<u32, ()> = Memo::default();
        for i in 0..(MEMO_CAP as u32 + 10) {
            m.put(i, ());
        }
        assert!(m.0.lock().expect("lock").len() <= MEMO_CAP);
        assert!(m
            .get(&(MEMO_CAP as u32 + 9), Duration::from_secs(60))
            .is_some());
        assert!(m.get(&(MEMO_CAP as u32 + 9), Duration::ZERO).is_none());
    }
}
