//! The binary key layout of the metadata database. Every key is built here.
//!
//! A key is a one-byte table prefix followed by the table's fields:
//!
//! | table        | prefix | key after the prefix                       | value |
//! |--------------|--------|--------------------------------------------|-------|
//! | `Blob`       | `0x01` | digest                                     | JSON `StoredBlob` (size, present, complete) |
//! | `PieceHash`  | `0x02` | digest, piece index (u64 BE)               | 32 raw bytes: SHA-256 of the piece |
//! | `Access`     | `0x03` | digest                                     | u64 BE: last access, ms since the epoch |
//! | `BlobRepos`  | `0x04` | digest                                     | JSON `StoredRepos` (provenance: upstream, repo, open) |
//! | `Manifest`   | `0x10` | digest                                     | JSON `ManifestRecord` |
//! | `Tag`        | `0x11` | upstream, repo, tag (each escaped)         | JSON `TagRecord` |
//! | `Snapshot`   | `0x20` | snapshot key or name (escaped)             | JSON snapshot record (`snapshotter::state`) |
//! | `SnapshotSeq`| `0x21` | —                                          | u64 BE: the last snapshot id handed out |
//!
//! A blob is spread over four tables so that each has one kind of writer: the
//! blob's single `BlobWriter` (`Blob`, `PieceHash`), readers (`Access`, small
//! unsynced writes) and `add_repo` (`BlobRepos`); none of them has to
//! read-modify-write what another one owns.
//!
//! Encodings (all order-preserving, so byte order of keys equals the logical
//! order of the fields, which the tests check):
//! - digest: one algorithm byte (`sha256` = 1, `sha512` = 2) then the raw
//!   digest bytes, whose length the algorithm fixes;
//! - string: bytes with `0x00` written as `0x00 0xFF`, terminated by
//!   `0x00 0x01`, so no encoded string is a prefix of another.

use shoal_proto::{BlobId, Digest, DigestAlgorithm, RepoName, Tag};

/// The tables, each a key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    Blob = 0x01,
    PieceHash = 0x02,
    Access = 0x03,
    BlobRepos = 0x04,
    Manifest = 0x10,
    Tag = 0x11,
    Snapshot = 0x20,
    SnapshotSeq = 0x21,
}

impl Table {
    /// The prefix of every key of this table (for whole-table scans).
    pub fn prefix(self) -> [u8; 1] {
        [self as u8]
    }
}

/// `Blob` table key of `id`.
pub fn blob(id: &BlobId) -> Vec<u8> {
    digest_key(Table::Blob, id)
}

/// The blob id of a `Blob` table key (None for a malformed key).
pub fn decode_blob(key: &[u8]) -> Option<BlobId> {
    let (&prefix, rest) = key.split_first()?;
    if prefix != Table::Blob as u8 {
        return None;
    }
    let (digest, rest) = decode_digest(rest)?;
    rest.is_empty().then_some(digest)
}

/// `PieceHash` key of piece `index` of `id`.
pub fn piece_hash(id: &BlobId, index: u64) -> Vec<u8> {
    let mut key = digest_key(Table::PieceHash, id);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Prefix of every `PieceHash` key of `id`.
pub fn piece_hash_prefix(id: &BlobId) -> Vec<u8> {
    digest_key(Table::PieceHash, id)
}

/// The piece index of a `PieceHash` key of `id` (None if it is not one).
pub fn decode_piece_hash(id: &BlobId, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(piece_hash_prefix(id).as_slice())?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// `Access` key of `id`.
pub fn access(id: &BlobId) -> Vec<u8> {
    digest_key(Table::Access, id)
}

/// `BlobRepos` key of `id`.
pub fn blob_repos(id: &BlobId) -> Vec<u8> {
    digest_key(Table::BlobRepos, id)
}

/// `Manifest` key of `digest`.
pub fn manifest(digest: &Digest) -> Vec<u8> {
    digest_key(Table::Manifest, digest)
}

/// `Tag` key of `upstream`/`repo`:`tag`.
pub fn tag(upstream: &str, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    let mut key = vec![Table::Tag as u8];
    push_string(&mut key, upstream.as_bytes());
    push_string(&mut key, repo.as_str().as_bytes());
    push_string(&mut key, tag.as_str().as_bytes());
    key
}

/// `Snapshot` key of the snapshot named `name` (containerd's key of an active snapshot, or the
/// name of a committed one).
pub fn snapshot(name: &str) -> Vec<u8> {
    let mut key = vec![Table::Snapshot as u8];
    push_string(&mut key, name.as_bytes());
    key
}

/// The snapshot name of a `Snapshot` key (None for a malformed key).
pub fn decode_snapshot(key: &[u8]) -> Option<String> {
    let (&prefix, rest) = key.split_first()?;
    if prefix != Table::Snapshot as u8 {
        return None;
    }
    let (bytes, rest) = pop_string(rest)?;
    if !rest.is_empty() {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// The key of the snapshot id counter.
pub fn snapshot_seq() -> Vec<u8> {
    vec![Table::SnapshotSeq as u8]
}

fn digest_key(table: Table, digest: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + digest.bytes().len());
    key.push(table as u8);
    key.push(algorithm_byte(digest.algorithm()));
    key.extend_from_slice(digest.bytes());
    key
}

fn algorithm_byte(algorithm: DigestAlgorithm) -> u8 {
    match algorithm {
        DigestAlgorithm::Sha256 => 1,
        DigestAlgorithm::Sha512 => 2,
    }
}

fn decode_digest(bytes: &[u8]) -> Option<(Digest, &[u8])> {
    let (&alg, rest) = bytes.split_first()?;
    let algorithm = match alg {
        1 => DigestAlgorithm::Sha256,
        2 => DigestAlgorithm::Sha512,
        _ => return None,
    };
    let raw = rest.get(..algorithm.output_len())?;
    Some((
        Digest::from_raw(algorithm, raw)?,
        &rest[algorithm.output_len()..],
    ))
}

fn push_string(key: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        key.push(b);
        if b == 0 {
            key.push(0xFF);
        }
    }
    key.extend_from_slice(&[0x00, 0x01]);
}

/// The inverse of [`push_string`]: the string's bytes and what follows it.
fn pop_string(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let b = *bytes.get(i)?;
        if b != 0 {
            out.push(b);
            i += 1;
            continue;
        }
        match *bytes.get(i + 1)? {
            0xFF => out.push(0),
            0x01 => return Some((out, &bytes[i + 2..])),
            _ => return None,
        }
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest(alg: DigestAlgorithm, seed: &[u8]) -> Digest {
        let mut raw = seed.to_vec();
        raw.resize(alg.output_len(), 0);
        Digest::from_raw(alg, &raw).expect("right length")
    }

    fn any_digest() -> impl Strategy<Value = Digest> {
        (
            prop_oneof![Just(DigestAlgorithm::Sha256), Just(DigestAlgorithm::Sha512)],
            proptest::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(|(alg, seed)| digest(alg, &seed))
    }

    fn repo() -> impl Strategy<Value = RepoName> {
        "[a-c]{1,3}(/[a-c]{1,2})?".prop_map(|s| s.parse().expect("valid repo"))
    }

    fn tag_name() -> impl Strategy<Value = Tag> {
        "[a-c0-1][a-c._-]{0,3}".prop_map(|s| s.parse().expect("valid tag"))
    }

    fn tag_key_of(s: &str) -> Vec<u8> {
        let mut k = snapshot(s);
        k[0] = Table::Tag as u8;
        k
    }

    #[test]
    fn blob_key_round_trips() {
        let id = Digest::sha256(b"x");
        assert_eq!(decode_blob(&blob(&id)), Some(id.clone()));
        assert_eq!(decode_blob(&access(&id)), None);
        assert_eq!(decode_piece_hash(&id, &piece_hash(&id, 7)), Some(7));
        assert_eq!(decode_blob(&blob(&id)[..10]), None);
    }

    proptest! {
        #[test]
        fn digest_key_order_is_digest_order(a in any_digest(), b in any_digest()) {
            for f in [blob, access, blob_repos, manifest] {
                prop_assert_eq!(f(&a).cmp(&f(&b)), a.cmp(&b));
            }
        }

        #[test]
        fn piece_key_order_is_logical(a in any_digest(), b in any_digest(), i in any::<u64>(), j in any::<u64>()) {
            prop_assert_eq!(piece_hash(&a, i).cmp(&piece_hash(&b, j)), (&a, i).cmp(&(&b, j)));
            prop_assert!(piece_hash(&a, i).starts_with(&piece_hash_prefix(&a)));
        }

        #[test]
        fn snapshot_key_order_is_name_order_and_round_trips(a in "[a\\x00/ :]{0,6}", b in "[a\\x00/ :]{0,6}") {
            prop_assert_eq!(snapshot(&a).cmp(&snapshot(&b)), a.cmp(&b));
            prop_assert_eq!(decode_snapshot(&snapshot(&a)), Some(a.clone()));
            prop_assert_eq!(decode_snapshot(&tag_key_of(&a)), None);
        }

        #[test]
        fn tag_key_order_is_logical(
            ua in "[a\\x00b:.]{0,4}", ub in "[a\\x00b:.]{0,4}",
            ra in repo(), rb in repo(), ta in tag_name(), tb in tag_name(),
        ) {
            let ka = tag(&ua, &ra, &ta);
            let kb = tag(&ub, &rb, &tb);
            prop_assert_eq!(ka.cmp(&kb), (&ua, &ra, &ta).cmp(&(&ub, &rb, &tb)));
        }

        #[test]
        fn tables_do_not_overlap(a in any_digest(), i in any::<u64>()) {
            let keys = [blob(&a), piece_hash(&a, i), access(&a), blob_repos(&a), manifest(&a)];
            for (n, k) in keys.iter().enumerate() {
                for (m, other) in keys.iter().enumerate() {
                    prop_assert_eq!(k[0] == other[0], n == m);
                }
            }
        }
    }
}
