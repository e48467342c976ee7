//! A registry token service (the Docker/distribution "token authentication" scheme), so the real
//! distribution registry can enforce *per-repository* access: a user may pull one repository and
//! not another, which htpasswd cannot express. This is how Docker Hub, Harbor and GHCR authorize
//! pulls, so the private-content tests meet the same protocol.
//!
//! The service signs ES256 JWTs with a key whose self-signed certificate is the registry's
//! `rootcertbundle`, and puts that certificate in the token's `x5c` header (distribution verifies
//! the chain, then the signature). `GET /token?service=…&scope=repository:NAME:ACTIONS` with
//! `Authorization: Basic` (or none: anonymous) grants the intersection of the asked actions and
//! the [`Acl`]. Unknown users and bad passwords get 401.
//!
//! Invariant: serves only 127.0.0.1; the accept thread ends when the handle is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::tiny::{respond, Flow, Request, TinyServer};

/// The `service` (token audience) the registry is configured with.
pub const SERVICE: &str = "shoal-e2e-registry";
/// The token issuer the registry trusts.
pub const ISSUER: &str = "shoal-e2e-token-service";

/// Who may do what: user → (repository pattern → actions). A pattern is a repository name or
/// `prefix/*`. The user `""` is anonymous.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// user → (password, grants).
    users: BTreeMap<String, (String, Vec<Grant>)>,
}

/// A repository pattern and the actions granted on it.
type Grant = (String, Vec<String>);

impl Acl {
    /// Adds `user` with `password` and the `(pattern, actions)` it is granted.
    pub fn user(mut self, user: &str, password: &str, grants: &[(&str, &[&str])]) -> Self {
        let grants = grants
            .iter()
            .map(|(p, a)| ((*p).to_owned(), a.iter().map(|s| (*s).to_owned()).collect()))
            .collect();
        self.users
            .insert(user.to_owned(), (password.to_owned(), grants));
        self
    }

    /// What anonymous clients may do.
    pub fn anonymous(self, grants: &[(&str, &[&str])]) -> Self {
        self.user("", "", grants)
    }

    /// The actions of `wanted` that `user` may do on `repo`.
    fn allowed(&self, user: &str, repo: &str, wanted: &[&str]) -> Vec<String> {
        let Some((_, grants)) = self.users.get(user) else {
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for (pattern, actions) in grants {
            let matches = match pattern.strip_suffix("/*") {
                Some(prefix) => repo.starts_with(&format!("{prefix}/")),
                None => pattern == repo,
            };
            if !matches {
                continue;
            }
            for w in wanted {
                if actions.iter().any(|a| a == w) && !out.iter().any(|o| o == w) {
                    out.push((*w).to_owned());
                }
            }
        }
        out
    }

    fn check_password(&self, user: &str, password: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|(p, _)| !user.is_empty() && p == password)
    }
}

/// The running token service.
pub struct TokenServer {
    server: TinyServer,
    cert_pem: String,
    signer: Arc<Signer>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.server.addr())
            .finish()
    }
}

struct Signer {
    key: EcdsaKeyPair,
    cert_der_b64: String,
    acl: Acl,
}

impl TokenServer {
    /// Starts a token service on a free loopback port, granting per `acl`.
    pub fn start(acl: Acl) -> Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec!["shoal-e2e-token".to_owned()])?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        let rng = ring::rand::SystemRandom::new();
        let ring_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &rng)
                .map_err(|e| anyhow::anyhow!("token key: {e}"))?;
        let signer = Arc::new(Signer {
            key: ring_key,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            acl,
        });
        let handler_signer = signer.clone();
        let server = TinyServer::start(Arc::new(move |req, out| {
            answer(req, out, &handler_signer)?;
            Ok(Flow::KeepAlive)
        }))?;
        Ok(Self {
            server,
            cert_pem: cert.pem(),
            signer,
        })
    }

    /// The realm clients are sent to: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr())
    }

    /// Writes the signing certificate (the registry's `rootcertbundle`) into `dir`.
    pub fn write_root_cert(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("token-root.pem");
        std::fs::write(&path, &self.cert_pem)?;
        Ok(path)
    }

    /// A token for `user` (`""`: anonymous) asking `scope` (`repository:NAME:pull`), as the
    /// service would grant it — for tests that play a client holding a token.
    pub fn token(&self, user: &str, scope: &str) -> Result<String> {
        self.signer.issue(user, &[scope.to_owned()])
    }

    /// `Authorization: Bearer <token>` for `user` on `repo` (pull).
    pub fn bearer(&self, user: &str, repo: &str) -> Result<String> {
        Ok(format!(
            "Bearer {}",
            self.token(user, &format!("repository:{repo}:pull"))?
        ))
    }
}

impl Signer {
    /// A signed token for `user`, granting what the ACL allows of each of `scopes`.
    fn issue(&self, user: &str, scopes: &[String]) -> Result<String> {
        let mut access = Vec::new();
        for scope in scopes {
            let mut parts = scope.splitn(3, ':');
            if let (Some("repository"), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            {
                let wanted: Vec<&str> = actions.split(',').collect();
                let granted = self.acl.allowed(user, name, &wanted);
                access.push(serde_json::json!({
                    "type": "repository", "name": name, "actions": granted
                }));
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT", "alg": "ES256", "x5c": [self.cert_der_b64]
        });
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": user, "aud": SERVICE,
            "exp": now + 600, "nbf": now - 10, "iat": now,
            "jti": format!("{:016x}", rand_u64()), "access": access,
        });
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
        let rng = ring::rand::SystemRandom::new();
        let sig = self
            .key
            .sign(&rng, signing_input.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(format!(
            "{signing_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// Answers one token request.
fn answer(req: &Request, out: &mut std::net::TcpStream, signer: &Signer) -> Result<()> {
    let url = req.url()?;
    let scopes: Vec<String> = url
        .query_pairs()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .collect();
    let user = match req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Basic "))
    {
        None => Some(String::new()),
        Some(b) => basic_user(b)
            .filter(|(u, p)| signer.acl.check_password(u, p))
            .map(|(u, _)| u),
    };
    let (status, body) = match user {
        Some(user) if url.path() == "/token" => match signer.issue(&user, &scopes) {
            Ok(t) => (
                "200 OK",
                serde_json::json!({"token": t, "access_token": t, "expires_in": 600}).to_string(),
            ),
            Err(e) => ("500 Internal Server Error", e.to_string()),
        },
        Some(_) => ("404 Not Found", "{}".to_owned()),
        None => (
            "401 Unauthorized",
            r#"{"details":"bad credentials"}"#.to_owned(),
        ),
    };
    let headers = [("Content-Type", "application/json")];
    respond(out, status, &headers, body.as_bytes(), req.is_head())
}

/// `(user, password)` of a Basic credential.
fn basic_user(b64: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_grants_only_listed_actions() {
        let acl = Acl::default()
            .user("alice", "a", &[("private/app", &["pull"])])
            .user("bob", "b", &[("bob/*", &["pull", "push"])])
            .anonymous(&[("public/*", &["pull"])]);
        assert_eq!(
            acl.allowed("alice", "private/app", &["pull", "push"]),
            ["pull"]
        );
        assert!(acl.allowed("alice", "private/other", &["pull"]).is_empty());
        assert!(acl.allowed("bob", "private/app", &["pull"]).is_empty());
        assert_eq!(acl.allowed("bob", "bob/x", &["push"]), ["push"]);
        assert_eq!(acl.allowed("", "public/x", &["pull"]), ["pull"]);
        assert!(acl.allowed("", "private/app", &["pull"]).is_empty());
        assert!(acl.check_password("alice", "a"));
        assert!(!acl.check_password("alice", "b"));
        assert!(
            !acl.check_password("", ""),
            "anonymous has no password to check"
        );
    }
}
