//! The cluster join secret and what is derived from it: the key that signs
//! scheduler requests.
//!
//! A secret file holds 64 or more hex characters (surrounding whitespace
//! ignored), decoded, or else at least 32 raw bytes. Keys for each use are
//! derived, so the secret itself never goes on the wire:
//! `derive_key(secret, label) = HMAC-SHA256(secret, "shoal-derive-v1" ‖ label)`.
//!
//! Scheduler requests carry [`AUTH_HEADER`]: `v1:<unix ms>:<hex HMAC>` with
//! the HMAC, keyed by `derive_key(secret, SCHEDULER_LABEL)`, over
//! `method ‖ "\n" ‖ path ‖ "\n" ‖ unix ms ‖ "\n" ‖ body`. A scheduler with a
//! secret refuses requests whose tag does not verify or whose time is more
//! than [`MAX_SKEW_MS`] away from its clock.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The request header carrying the signature.
pub const AUTH_HEADER: &str = "x-shoal-auth";
/// The label of the scheduler request key.
pub const SCHEDULER_LABEL: &str = "scheduler";
/// Largest accepted clock difference between signer and verifier.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// Shortest secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Why a secret file's contents are not a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a join secret must be 64+ hex characters or 32+ bytes, got {len} bytes")]
pub struct SecretTooShort {
    pub len: usize,
}

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing {AUTH_HEADER} header (this scheduler admits only cluster members)")]
    Missing,
    #[error("malformed {AUTH_HEADER} header")]
    Malformed,
    #[error("request time is {skew_ms} ms away from the scheduler's clock")]
    Skew { skew_ms: u64 },
    #[error("bad signature (not signed with this cluster's join secret)")]
    BadSignature,
}

/// The secret in a secret file's `contents`.
pub fn parse_secret(contents: &[u8]) -> Result<Vec<u8>, SecretTooShort> {
    let trimmed = contents.trim_ascii();
    if trimmed.len() >= 2 * MIN_SECRET_LEN {
        if let Ok(decoded) = hex::decode(trimmed) {
            return Ok(decoded);
        }
    }
    if contents.len() < MIN_SECRET_LEN {
        return Err(SecretTooShort {
            len: contents.len(),
        });
    }
    Ok(contents.to_vec())
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// A 32-byte key for one use (`label`) of `secret`.
pub fn derive_key(secret: &[u8], label: &str) -> [u8; 32] {
    let mut m = mac(secret);
    m.update(b"shoal-derive-v1");
    m.update(label.as_bytes());
    m.finalize().into_bytes().into()
}

fn request_mac(key: &[u8; 32], method: &str, path: &str, ms: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut m = mac(key);
    m.update(method.as_bytes());
    m.update(b"\n");
    m.update(path.as_bytes());
    m.update(b"\n");
    m.update(ms.to_string().as_bytes());
    m.update(b"\n");
    m.update(body);
    m
}

/// The [`AUTH_HEADER`] value for a request.
pub fn sign(key: &[u8; 32], method: &str, path: &str, now_ms: u64, body: &[u8]) -> String {
    let tag = request_mac(key, method, path, now_ms, body)
        .finalize()
        .into_bytes();
    format!("v1:{now_ms}:{}", hex::encode(tag))
}

/// Checks an [`AUTH_HEADER`] value (constant-time comparison).
pub fn verify(
    key: &[u8; 32],
    header: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<(), AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let mut parts = header.trim().splitn(3, ':');
    let (Some("v1"), Some(ms), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed);
    };
    let ms: u64 = ms.parse().map_err(|_| AuthError::Malformed)?;
    let tag = hex::decode(tag).map_err(|_| AuthError::Malformed)?;
    let skew_ms = ms.abs_diff(now_ms);
    if skew_ms > MAX_SKEW_MS {
        return Err(AuthError::Skew { skew_ms });
    }
    request_mac(key, method, path, ms, body)
        .verify_slice(&tag)
        .map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        let hex64 = "ab".repeat(32);
        assert_eq!(
            parse_secret(format!("{hex64}\n").as_bytes()).unwrap(),
            vec![0xab; 32]
        );
        assert_eq!(parse_secret(&[7u8; 40]).unwrap(), vec![7u8; 40]);
        assert!(parse_secret(b"short").is_err());
        assert_ne!(derive_key(&[1; 32], "a"), derive_key(&[1; 32], "b"));
        assert_ne!(derive_key(&[1; 32], "a"), derive_key(&[2; 32], "a"));
    }

    #[test]
    fn sign_and_verify() {
        let key = derive_key(&[9; 32], SCHEDULER_LABEL);
        let h = sign(&key, "POST", "/api/v1/announce", 1_000_000, b"{}");
        assert_eq!(
            verify(&key, Some(&h), "POST", "/api/v1/announce", b"{}", 1_000_500),
            Ok(())
        );
        let other = derive_key(&[8; 32], SCHEDULER_LABEL);
        assert_eq!(
            verify(
                &other,
                Some(&h),
                "POST",
                "/api/v1/announce",
                b"{}",
                1_000_000
            ),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(
                &key,
                Some(&h),
                "POST",
                "/api/v1/announce",
                b"{ }",
                1_000_000
            ),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&key, Some(&h), "POST", "/api/v1/other", b"{}", 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            verify(
                &key,
                Some(&h),
                "POST",
                "/api/v1/announce",
                b"{}",
                1_000_000 + MAX_SKEW_MS + 1
            ),
            Err(AuthError::Skew { .. })
        ));
        assert_eq!(
            verify(&key, None, "POST", "/", b"", 0),
            Err(AuthError::Missing)
        );
        for bad in ["", "v2:1:00", "v1:x:00", "v1:1:zz", "v1:1"] {
            assert_eq!(
                verify(&key, Some(bad), "POST", "/", b"", 1),
                Err(AuthError::Malformed),
                "{bad}"
            );
        }
    }
}
