//! Registry credentials for `shoal convert`, found the way skopeo and podman find them:
//! `--src-creds`/`--dest-creds USER[:PASS]` first, then the auth file — `--authfile`, else
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
//! `$XDG_CONFIG_HOME/containers/auth.json` (`~/.config/…`), `~/.docker/config.json` — whose
//! `auths` entries (`{"auths": {"HOST": {"auth": base64("user:pass")}}}`) are matched by host
//! (keys may carry a scheme or a path, as `docker login` writes them).
//!
//! Credential helpers (`credHelpers`, `credsStore`) are not run: a host that only has one is
//! reported, so the user can pass `--src-creds` instead.

use std::path::{Path, PathBuf};

use base64::Engine as _;

/// A user name and password (or token) for Basic auth and the token service.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub pass: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:***)", self.user)
    }
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("credentials {flag}: expected USER[:PASSWORD]")]
    BadFlag { flag: &'static str },
    #[error("auth file {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error(
        "auth file {path} names a credential helper for {host}, which shoal does not run; \
         pass the credentials with --src-creds/--dest-creds"
    )]
    Helper { path: PathBuf, host: String },
}

impl Credentials {
    /// `USER:PASS` (or `USER` with an empty password), as skopeo's `--creds` takes it.
    pub fn parse_flag(s: &str, flag: &'static str) -> Result<Self, AuthError> {
        let (user, pass) = s.split_once(':').unwrap_or((s, ""));
        if user.is_empty() {
            return Err(AuthError::BadFlag { flag });
        }
        Ok(Self {
            user: user.to_owned(),
            pass: pass.to_owned(),
        })
    }
}

/// The credentials for `host`: `flag` if given, else the first auth file that has the host.
pub fn lookup(
    host: &str,
    flag: Option<&Credentials>,
    authfile: Option<&Path>,
) -> Result<Option<Credentials>, AuthError> {
    if let Some(c) = flag {
        return Ok(Some(c.clone()));
    }
    let files = match authfile {
        Some(p) => vec![p.to_path_buf()],
        None => default_auth_files(),
    };
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && authfile.is_none() => continue,
            Err(e) => {
                return Err(AuthError::BadFile {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        if let Some(c) = from_auth_json(&path, &text, host)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

fn default_auth_files() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env("HOME");
    let mut out = Vec::new();
    if let Some(p) = env("REGISTRY_AUTH_FILE") {
        out.push(p);
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        out.push(d.join("containers/auth.json"));
    }
    match env("XDG_CONFIG_HOME") {
        Some(d) => out.push(d.join("containers/auth.json")),
        None => out.extend(home.iter().map(|h| h.join(".config/containers/auth.json"))),
    }
    out.extend(home.iter().map(|h| h.join(".docker/config.json")));
    out
}

/// The entry for `host` in one auth file's text.
fn from_auth_json(path: &Path, text: &str, host: &str) -> Result<Option<Credentials>, AuthError> {
    let bad = |reason: String| AuthError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let wanted = canonical(host);
    if let Some(auths) = v["auths"].as_object() {
        for (key, entry) in auths {
            if canonical(key) != wanted {
                continue;
            }
            let Some(b64) = entry["auth"].as_str().filter(|s| !s.is_empty()) else {
                continue;
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| bad(format!("auths[{key:?}].auth: {e}")))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| bad(format!("auths[{key:?}].auth is not UTF-8")))?;
            let Some((user, pass)) = raw.split_once(':') else {
                return Err(bad(format!("auths[{key:?}].auth is not user:password")));
            };
            return Ok(Some(Credentials {
                user: user.to_owned(),
                pass: pass.to_owned(),
            }));
        }
    }
    let helper = v["credHelpers"]
        .as_object()
        .is_some_and(|h| h.keys().any(|k| canonical(k) == wanted));
    if helper {
        return Err(AuthError::Helper {
            path: path.to_path_buf(),
            host: host.to_owned(),
        });
    }
    Ok(None)
}

/// `https://index.docker.io/v1/` → `docker.io`; `host/path` → `host`.
fn canonical(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_and_containers_auth_files() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        let text = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}},"127.0.0.1:5000/team":{{"auth":"{b64}"}}}},"credHelpers":{{"gcr.io":"gcloud"}}}}"#
        );
        let p = Path::new("x.json");
        let c = from_auth_json(p, &text, "docker.io")
            .expect("parse")
            .expect("docker.io");
        assert_eq!(c.user, "alice");
        assert_eq!(c.pass, "s3:cret");
        assert!(from_auth_json(p, &text, "127.0.0.1:5000")
            .expect("parse")
            .is_some());
        assert!(from_auth_json(p, &text, "quay.io")
            .expect("parse")
            .is_none());
        assert!(matches!(
            from_auth_json(p, &text, "gcr.io"),
            Err(AuthError::Helper { .. })
        ));
    }

    #[test]
    fn parses_the_creds_flag() {
        let c = Credentials::parse_flag("u:p:q", "--src-creds").expect("flag");
        assert_eq!((c.user.as_str(), c.pass.as_str()), ("u", "p:q"));
        assert_eq!(Credentials::parse_flag("u", "x").expect("flag").pass, "");
        assert!(Credentials::parse_flag(":p", "x").is_err());
        assert!(!format!("{c:?}").contains("p:q"));
    }
}
