//! The cluster join secret and what is derived from it: the key that signs
//! scheduler requests.
//!
//! A secret file holds 64 or more hex characters (surrounding whitespace
//! ignored), decoded, or else at least 32 raw bytes. Keys for each use are
//! derived, so the secret itself never goes on the wire:
//! `derive_key(secret, label) = HMAC-SHA256(secret, "shoal-derive-v1" ‖ label)`.
//!
//! Scheduler requests carry [`AUTH_HEADER`]: `v2:<unix ms>:<nonce>:<hex HMAC>`, the nonce 16
//! random bytes in hex, the HMAC keyed by `derive_key(secret, SCHEDULER_LABEL)` over
//! `method ‖ "\n" ‖ host ‖ "\n" ‖ path ‖ "\n" ‖ unix ms ‖ "\n" ‖ nonce ‖ "\n" ‖ body`, where
//! `host` is the `Host` the request is sent to (so a request signed for one scheduler is no good
//! at another). A scheduler with a secret refuses requests whose tag does not verify, whose time
//! is more than [`MAX_SKEW_MS`] away from its clock, or whose nonce it has already seen within
//! that window ([`ReplayGuard`]): a captured request cannot be sent again.

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
    #[error(
        "bad signature (not signed with this cluster's join secret, or for another scheduler)"
    )]
    BadSignature,
    #[error("request already seen (a replay)")]
    Replayed,
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

fn request_mac(key: &[u8; 32], req: &Signed<'_>, ms: u64, nonce: &str) -> Hmac<Sha256> {
    let mut m = mac(key);
    for part in [
        req.method.as_bytes(),
        req.host.as_bytes(),
        req.path.as_bytes(),
        ms.to_string().as_bytes(),
        nonce.as_bytes(),
    ] {
        m.update(part);
        m.update(b"\n");
    }
    m.update(req.body);
    m
}

/// What a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub method: &'a str,
    /// The `Host` (authority) the request is sent to.
    pub host: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
}

/// The [`AUTH_HEADER`] value for a request, with a fresh random nonce.
pub fn sign(key: &[u8; 32], req: &Signed<'_>, now_ms: u64) -> String {
    let nonce: [u8; 16] = rand::random();
    sign_with_nonce(key, req, now_ms, &hex::encode(nonce))
}

fn sign_with_nonce(key: &[u8; 32], req: &Signed<'_>, now_ms: u64, nonce: &str) -> String {
    let tag = request_mac(key, req, now_ms, nonce).finalize().into_bytes();
    format!("v2:{now_ms}:{nonce}:{}", hex::encode(tag))
}

/// A verified request's identity, to check against replays: its time and nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub ms: u64,
    pub nonce: [u8; 16],
}

/// Checks an [`AUTH_HEADER`] value (constant-time comparison); on success, the stamp to pass to
/// a [`ReplayGuard`].
pub fn verify(
    key: &[u8; 32],
    header: Option<&str>,
    req: &Signed<'_>,
    now_ms: u64,
) -> Result<Stamp, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let mut parts = header.trim().splitn(4, ':');
    let (Some("v2"), Some(ms), Some(nonce), Some(tag)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let ms: u64 = ms.parse().map_err(|_| AuthError::Malformed)?;
    let mut nonce_bytes = [0u8; 16];
    hex::decode_to_slice(nonce, &mut nonce_bytes).map_err(|_| AuthError::Malformed)?;
    let tag = hex::decode(tag).map_err(|_| AuthError::Malformed)?;
    let skew_ms = ms.abs_diff(now_ms);
    if skew_ms > MAX_SKEW_MS {
        return Err(AuthError::Skew { skew_ms });
    }
    request_mac(key, req, ms, nonce)
        .verify_slice(&tag)
        .map_err(|_| AuthError::BadSignature)?;
    Ok(Stamp {
        ms,
        nonce: nonce_bytes,
    })
}

/// The nonces of requests accepted within the skew window: a request seen once is refused the
/// second time. Bounded: past [`ReplayGuard::CAPACITY`] live entries new requests are refused
/// (a flood of fresh signed requests can only come from a cluster member).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 16], u64>>,
}

impl ReplayGuard {
    /// Live entries kept at most.
    pub const CAPACITY: usize = 1 << 20;

    /// Records `stamp`; `Err(Replayed)` if it was seen before (or the guard is full).
    pub fn admit(&self, stamp: &Stamp, now_ms: u64) -> Result<(), AuthError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::CAPACITY {
            // Entries older than the window can no longer verify: forget them.
            seen.retain(|_, ms| ms.abs_diff(now_ms) <= MAX_SKEW_MS);
            if seen.len() >= Self::CAPACITY {
                return Err(AuthError::Replayed);
            }
        }
        if seen.insert(stamp.nonce, stamp.ms).is_some() {
            return Err(AuthError::Replayed);
        }
        Ok(())
    }
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

    fn req<'a>(path: &'a str, body: &'a [u8]) -> Signed<'a> {
        Signed {
            method: "POST",
            host: "10.0.0.2:5060",
            path,
            body,
        }
    }

    #[test]
    fn sign_and_verify() {
        let key = derive_key(&[9; 32], SCHEDULER_LABEL);
        let r = req("/api/v1/announce", b"{}");
        let h = sign(&key, &r, 1_000_000);
        assert!(verify(&key, Some(&h), &r, 1_000_500).is_ok());
        let other = derive_key(&[8; 32], SCHEDULER_LABEL);
        assert_eq!(
            verify(&other, Some(&h), &r, 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&key, Some(&h), &req("/api/v1/announce", b"{ }"), 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&key, Some(&h), &req("/api/v1/other", b"{}"), 1_000_000),
            Err(AuthError::BadSignature)
        );
        let elsewhere = Signed {
            host: "10.0.0.3:5060",
            ..r
        };
        assert_eq!(
            verify(&key, Some(&h), &elsewhere, 1_000_000),
            Err(AuthError::BadSignature),
            "a request signed for one scheduler is refused by another"
        );
        assert!(matches!(
            verify(&key, Some(&h), &r, 1_000_000 + MAX_SKEW_MS + 1),
            Err(AuthError::Skew { .. })
        ));
        assert_eq!(verify(&key, None, &r, 0), Err(AuthError::Missing));
        for bad in [
            "",
            "v1:1:00",
            "v2:x:00:00",
            "v2:1:zz:00",
            "v2:1",
            "v2:1:00112233445566778899aabbccddeeff:zz",
        ] {
            assert_eq!(
                verify(&key, Some(bad), &r, 1),
                Err(AuthError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn replays_are_refused() {
        let key = derive_key(&[9; 32], SCHEDULER_LABEL);
        let r = req("/api/v1/announce", b"{}");
        let guard = ReplayGuard::default();
        let h = sign(&key, &r, 5_000);
        let stamp = verify(&key, Some(&h), &r, 5_000).unwrap();
        assert_eq!(guard.admit(&stamp, 5_000), Ok(()));
        let again = verify(&key, Some(&h), &r, 6_000).unwrap();
        assert_eq!(guard.admit(&again, 6_000), Err(AuthError::Replayed));
        let fresh = sign(&key, &r, 6_000);
        assert_ne!(fresh, h, "every signature has its own nonce");
        let stamp = verify(&key, Some(&fresh), &r, 6_000).unwrap();
        assert_eq!(guard.admit(&stamp, 6_000), Ok(()));
    }
}
