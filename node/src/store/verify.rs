//! Whole-blob verification. `VerifiedDigest` can only be made by
//! `Verifier::finish` after the hashed bytes matched the blob id, and
//! `BlobWriter::complete` accepts nothing else: "verified data has its own
//! type".

use shoal_proto::digest::Hasher;
use shoal_proto::{BlobId, Digest};

/// Hashes a blob's bytes, in order, with the algorithm of its id.
#[derive(Debug)]
pub struct Verifier {
    expected: BlobId,
    hasher: Hasher,
}

/// Proof that some bytes hashed to `digest`. Not `Clone`, not constructible
/// outside this module.
#[derive(Debug)]
pub struct VerifiedDigest(Digest);

/// The hashed bytes are not the blob they were meant to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content hashes to {actual}, expected {expected}")]
pub struct DigestMismatch {
    pub expected: Digest,
    pub actual: Digest,
}

impl Verifier {
    pub fn new(id: &BlobId) -> Self {
        Self {
            expected: id.clone(),
            hasher: id.algorithm().hasher(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    pub fn finish(self) -> Result<VerifiedDigest, DigestMismatch> {
        let actual = self.hasher.finish();
        if actual == self.expected {
            Ok(VerifiedDigest(actual))
        } else {
            Err(DigestMismatch {
                expected: self.expected,
                actual,
            })
        }
    }
}

impl VerifiedDigest {
    /// The digest the verified bytes hash to.
    pub fn digest(&self) -> &Digest {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::DigestAlgorithm;

    #[test]
    fn accepts_only_matching_bytes() {
        let id = Digest::sha256(b"hello world");
        let mut v = Verifier::new(&id);
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.finish().expect("matches").digest(), &id);

        let mut v = Verifier::new(&id);
        v.update(b"hello");
        let err = v.finish().expect_err("mismatch");
        assert_eq!(err.expected, id);

        let id512 = Digest::of(DigestAlgorithm::Sha512, b"x");
        let mut v = Verifier::new(&id512);
        v.update(b"x");
        assert!(v.finish().is_ok());
    }
}
