//! Content digests (`algorithm:hex`) as used by OCI descriptors.
//!
//! Invariant: a [`Digest`] always has a known algorithm and exactly the number
//! of lowercase hex characters that algorithm produces, so it is safe to use in
//! file names and database keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// The digest algorithms shoal accepts in OCI descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    /// The name used before the colon.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Length of the raw digest in bytes.
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// A streaming hasher for this algorithm.
    pub fn hasher(self) -> Hasher {
        match self {
            Self::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Self::Sha512 => Hasher::Sha512(Box::new(sha2::Sha512::new())),
        }
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {input:?} has no `algorithm:` prefix")]
    MissingAlgorithm { input: String },
    #[error("digest algorithm {algorithm:?} is not supported (sha256, sha512 are)")]
    UnsupportedAlgorithm { algorithm: String },
    #[error("digest {input:?} must have {expected} lowercase hex characters")]
    BadHex { input: String, expected: usize },
}

/// An OCI content digest, e.g. `sha256:9f86d0…`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: DigestAlgorithm,
    bytes: Box<[u8]>,
}

impl Digest {
    /// Digest of `data` with `algorithm`.
    pub fn of(algorithm: DigestAlgorithm, data: &[u8]) -> Self {
        let mut h = algorithm.hasher();
        h.update(data);
        h.finish()
    }

    /// SHA-256 digest of `data`.
    pub fn sha256(data: &[u8]) -> Self {
        Self::of(DigestAlgorithm::Sha256, data)
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The raw digest bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The hex part, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(&self.bytes)
    }

    /// Rebuild from an algorithm and raw bytes (e.g. from a database key).
    pub fn from_raw(algorithm: DigestAlgorithm, bytes: &[u8]) -> Option<Self> {
        (bytes.len() == algorithm.output_len()).then(|| Self {
            algorithm,
            bytes: bytes.into(),
        })
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex_part)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm { input: clip(s) });
        };
        let algorithm = match alg {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            other => {
                return Err(DigestError::UnsupportedAlgorithm {
                    algorithm: clip(other),
                })
            }
        };
        let expected = algorithm.output_len() * 2;
        let lower_hex = hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex_part.len() != expected || !lower_hex {
            return Err(DigestError::BadHex {
                input: clip(s),
                expected,
            });
        }
        let bytes = hex::decode(hex_part).map_err(|_| DigestError::BadHex {
            input: clip(s),
            expected,
        })?;
        Ok(Self {
            algorithm,
            bytes: bytes.into(),
        })
    }
}

/// Keep error messages bounded when the input is hostile.
fn clip(s: &str) -> String {
    s.chars().take(100).collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A streaming digest computation.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(Box<sha2::Sha512>),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Self::Sha256(h) => Digest {
                algorithm: DigestAlgorithm::Sha256,
                bytes: h.finalize().to_vec().into(),
            },
            Self::Sha512(h) => Digest {
                algorithm: DigestAlgorithm::Sha512,
                bytes: h.finalize().to_vec().into(),
            },
        }
    }
}

/// A blob is named by its OCI descriptor digest, never by a URL: the same
/// layer behind two registries or repositories is one blob.
pub type BlobId = Digest;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints() {
        let s = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = s.parse().expect("valid digest");
        assert_eq!(d.to_string(), s);
        assert_eq!(d, Digest::sha256(b""));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "sha256",
            "md5:abcd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 32)) {
            let d = Digest::from_raw(DigestAlgorithm::Sha256, &bytes).expect("32 bytes");
            prop_assert_eq!(d.to_string().parse::<Digest>().expect("own output parses"), d);
        }
    }
}
