//! The records the store keeps (`BlobRecord`, `ManifestRecord`, `TagRecord`)
//! and their typed mapping onto the `MetaStore` tables of `keys`.
//!
//! A `BlobRecord` is assembled from four tables (see `keys`): the stored blob
//! (size, piece size, present ranges, complete), one hash per fully present
//! piece, the access time and the repositories. Values are JSON except piece
//! hashes (32 raw bytes) and access times (u64 BE). A value that does not
//! decode is an error (`StoreError::Decode`), never a default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{BlobId, Digest, RepoName, Tag};

use super::error::StoreError;
use super::keys::{self, Table};
use super::meta::{Batch, MetaStore};
use super::pieces;
use super::ranges::RangeSet;

/// Where a blob or manifest was fetched from: the upstream registry host (as
/// containerd names it) and the repository.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RepoKey {
    pub upstream: String,
    pub repo: RepoName,
}

/// Where an object is known to be readable: each (upstream, repository) in
/// which the node fetched it (digest-verified) or had it confirmed (a trusted
/// origin's answer, or a proof of possession), and whether it was *open*
/// there — obtained without the client's credentials (anonymously or with the
/// node's own), so that any client naming that very upstream and repository
/// may read it.
///
/// Every entry is a fact about one (upstream, repository); nothing here is a
/// global "public" flag, so content open in one repository never becomes
/// readable through another. An entry, once open, stays open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance(BTreeMap<RepoKey, bool>);

impl Provenance {
    /// One entry.
    pub fn one(key: RepoKey, open: bool) -> Self {
        Self(BTreeMap::from([(key, open)]))
    }

    /// Records `key` (open or not); `true` when that changed anything.
    pub fn record(&mut self, key: RepoKey, open: bool) -> bool {
        match self.0.get_mut(&key) {
            Some(o) if *o || !open => false,
            Some(o) => {
                *o = true;
                true
            }
            None => {
                self.0.insert(key, open);
                true
            }
        }
    }

    /// Merges `other` into `self` (open entries stay open).
    pub fn merge(&mut self, other: &Provenance) {
        for (k, open) in &other.0 {
            self.record(k.clone(), *open);
        }
    }

    /// Whether the object was fetched or confirmed in `key`.
    pub fn contains(&self, key: &RepoKey) -> bool {
        self.0.contains_key(key)
    }

    /// Whether any client may read the object through `key`.
    pub fn is_open(&self, key: &RepoKey) -> bool {
        self.0.get(key).copied().unwrap_or(false)
    }

    /// `(where, open)`, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&RepoKey, bool)> {
        self.0.iter().map(|(k, o)| (k, *o))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The JSON form: a list of `{upstream, repo, anyone}`.
///
/// `anyone` is what [`Provenance::is_open`] says. Records written before 2026-12 carry `open`
/// instead, which a repository-wide check could set for objects it never asked about (one
/// public object opened every stored digest under that repository name): it is ignored, so
/// those entries decode as not open and the next request proves access to the object itself.
#[derive(Serialize, Deserialize)]
struct ProvenanceEntry {
    upstream: String,
    repo: RepoName,
    #[serde(default)]
    anyone: bool,
}

impl Serialize for Provenance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, open)| ProvenanceEntry {
            upstream: k.upstream.clone(),
            repo: k.repo.clone(),
            anyone: *open,
        }))
    }
}

impl<'de> Deserialize<'de> for Provenance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Records written before provenance carried `open` list bare
        // `{upstream, repo}` pairs next to a global `public` flag; they decode
        // as not open (the old flag said nothing about *where*).
        let entries = Vec::<ProvenanceEntry>::deserialize(d)?;
        let mut p = Provenance::default();
        for e in entries {
            p.record(
                RepoKey {
                    upstream: e.upstream,
                    repo: e.repo,
                },
                e.anyone,
            );
        }
        Ok(p)
    }
}

/// Everything the store knows about one blob.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobRecord {
    pub id: BlobId,
    pub size: u64,
    /// Set only by `BlobWriter::complete` with a matching `VerifiedDigest`.
    pub complete: bool,
    /// Byte ranges written and synced to the content file.
    pub present: RangeSet,
    pub piece_size: u64,
    /// SHA-256 of each piece, `Some` exactly for the fully present pieces.
    #[serde(with = "hex_hashes")]
    pub piece_sha256: Vec<Option<[u8; 32]>>,
    pub last_access_ms: u64,
    /// Where it was fetched or confirmed, and where it is open.
    pub repos: Provenance,
}

/// A cached manifest, keyed by its digest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// Where it was fetched or confirmed, and where it is open.
    pub repos: Provenance,
}

/// A cached tag resolution.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub fetched_at_ms: u64,
    pub public: bool,
}

/// The `Blob` table value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredBlob {
    pub size: u64,
    pub piece_size: u64,
    pub present: RangeSet,
    pub complete: bool,
}

/// The `BlobRepos` table value. (Older records also carry a global `public`
/// flag, which is ignored: see [`Provenance`].)
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoredRepos {
    pub repos: Provenance,
}

impl StoredBlob {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            piece_size: pieces::piece_size(size),
            present: RangeSet::new(),
            complete: false,
        }
    }

    pub fn piece_count(&self) -> u64 {
        pieces::piece_count(self.size, self.piece_size)
    }

    /// Whether piece `index` is entirely present.
    pub fn piece_present(&self, index: u64) -> bool {
        let range = pieces::piece_range(index, self.piece_size, self.size);
        !range.is_empty() && self.present.contains_range(&range)
    }

    /// Whether the fields are consistent (a damaged value is dropped).
    pub fn is_sane(&self) -> bool {
        self.piece_size.is_power_of_two()
            && (pieces::MIN_PIECE_SIZE..=pieces::MAX_PIECE_SIZE).contains(&self.piece_size)
            && self.size <= super::MAX_BLOB_SIZE
            && self.present.end() <= self.size
            && (!self.complete || self.present.len() == self.size)
    }
}

/// Typed access to the tables.
pub struct Tables<'a> {
    pub db: &'a dyn MetaStore,
}

impl Tables<'_> {
    pub fn blob(&self, id: &BlobId) -> Result<Option<StoredBlob>, StoreError> {
        self.json(&keys::blob(id), "blob")
    }

    /// Every `Blob` table entry; undecodable ones as `Err` so recovery can
    /// drop them.
    pub fn all_blobs(&self) -> Result<Vec<(BlobId, Option<StoredBlob>)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.db.scan(&Table::Blob.prefix())? {
            let Some(id) = keys::decode_blob(&k) else {
                continue;
            };
            out.push((id, serde_json::from_slice(&v).ok()));
        }
        Ok(out)
    }

    /// The assembled record, with `last_access_ms` as given.
    pub fn record(
        &self,
        id: &BlobId,
        last_access_ms: u64,
    ) -> Result<Option<BlobRecord>, StoreError> {
        let Some(stored) = self.blob(id)? else {
            return Ok(None);
        };
        let piece_sha256 = self.piece_hashes(id, stored.piece_count())?;
        let repos = self.repos(id)?;
        Ok(Some(BlobRecord {
            id: id.clone(),
            size: stored.size,
            complete: stored.complete,
            present: stored.present,
            piece_size: stored.piece_size,
            piece_sha256,
            last_access_ms,
            repos: repos.repos,
        }))
    }

    pub fn piece_hashes(
        &self,
        id: &BlobId,
        count: u64,
    ) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
        let mut hashes = vec![None; usize::try_from(count).unwrap_or(usize::MAX).min(1 << 24)];
        for (k, v) in self.db.scan(&keys::piece_hash_prefix(id))? {
            let Some(index) = keys::decode_piece_hash(id, &k) else {
                continue;
            };
            let (Ok(i), Ok(hash)) = (usize::try_from(index), <[u8; 32]>::try_from(v.as_slice()))
            else {
                continue;
            };
            if let Some(slot) = hashes.get_mut(i) {
                *slot = Some(hash);
            }
        }
        Ok(hashes)
    }

    pub fn access(&self, id: &BlobId) -> Result<Option<u64>, StoreError> {
        let Some(v) = self.db.get(&keys::access(id))? else {
            return Ok(None);
        };
        Ok(<[u8; 8]>::try_from(v.as_slice())
            .ok()
            .map(u64::from_be_bytes))
    }

    pub fn repos(&self, id: &BlobId) -> Result<StoredRepos, StoreError> {
        Ok(self
            .json(&keys::blob_repos(id), "blob_repos")?
            .unwrap_or_default())
    }

    pub fn manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        self.json(&keys::manifest(digest), "manifest")
    }

    pub fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.json(&keys::tag(upstream, repo, tag), "tag")
    }

    /// A batch deleting every entry of blob `id` in every table.
    pub fn delete_blob(&self, id: &BlobId) -> Result<Batch, StoreError> {
        let mut batch = Batch::default();
        batch.delete(keys::blob(id));
        for (k, _) in self.db.scan(&keys::piece_hash_prefix(id))? {
            batch.delete(k);
        }
        batch.delete(keys::access(id));
        batch.delete(keys::blob_repos(id));
        Ok(batch)
    }

    fn json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &[u8],
        table: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let Some(v) = self.db.get(key)? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|source| StoreError::Decode { table, source })
    }
}

/// Adds `stored` to `batch`.
pub fn put_blob(batch: &mut Batch, id: &BlobId, stored: &StoredBlob) {
    batch.put(keys::blob(id), to_json(stored));
}

pub fn put_access(batch: &mut Batch, id: &BlobId, ms: u64) {
    batch.put(keys::access(id), ms.to_be_bytes().to_vec());
}

pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our record types are plain data (no maps with non-string keys), so
    // serialisation cannot fail; an empty value would fail to decode loudly.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Piece hashes as JSON hex strings (or null), not arrays of numbers.
mod hex_hashes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hashes: &[Option<[u8; 32]>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(hashes.iter().map(|h| h.map(hex::encode)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<[u8; 32]>>, D::Error> {
        let strings = Vec::<Option<String>>::deserialize(d)?;
        strings
            .into_iter()
            .map(|s| {
                s.map(|s| {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(&s, &mut out).map_err(D::Error::custom)?;
                    Ok(out)
                })
                .transpose()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_record_json_round_trips() {
        let rec = BlobRecord {
            id: Digest::sha256(b"x"),
            size: 10,
            complete: false,
            present: RangeSet::from_range(0..4),
            piece_size: pieces::MIN_PIECE_SIZE,
            piece_sha256: vec![None, Some([7; 32])],
            last_access_ms: 5,
            repos: Provenance::one(
                RepoKey {
                    upstream: "docker.io".into(),
                    repo: "library/debian".parse().expect("repo"),
                },
                true,
            ),
        };
        let json = serde_json::to_string(&rec).expect("json");
        assert!(json.contains(&"07".repeat(32)));
        let back: BlobRecord = serde_json::from_str(&json).expect("json");
        assert_eq!(back.piece_sha256, rec.piece_sha256);
        assert_eq!(back.repos, rec.repos);
    }

    #[test]
    fn provenance_is_per_repository_and_old_records_decode_as_not_open() {
        let key = |u: &str, r: &str| RepoKey {
            upstream: u.into(),
            repo: r.parse().expect("repo"),
        };
        let mut p = Provenance::default();
        assert!(p.record(key("a.io", "x"), false));
        assert!(!p.record(key("a.io", "x"), false));
        assert!(
            p.record(key("a.io", "x"), true),
            "closed → open is a change"
        );
        assert!(!p.record(key("a.io", "x"), false), "open stays open");
        assert!(p.is_open(&key("a.io", "x")));
        assert!(!p.is_open(&key("a.io", "y")));
        assert!(!p.is_open(&key("b.io", "x")));
        let old = r#"{"repos":[{"upstream":"a.io","repo":"x"}],"public":true}"#;
        let stored: StoredRepos = serde_json::from_str(old).expect("old record");
        assert!(stored.repos.contains(&key("a.io", "x")));
        assert!(!stored.repos.is_open(&key("a.io", "x")));
        // `open` was written by a check that could cover objects it never asked about.
        let unproven = r#"{"repos":[{"upstream":"a.io","repo":"x","open":true}]}"#;
        let stored: StoredRepos = serde_json::from_str(unproven).expect("2026-11 record");
        assert!(stored.repos.contains(&key("a.io", "x")));
        assert!(!stored.repos.is_open(&key("a.io", "x")));
        let json = serde_json::to_string(&StoredRepos { repos: p }).expect("json");
        let back: StoredRepos = serde_json::from_str(&json).expect("round trip");
        assert!(back.repos.is_open(&key("a.io", "x")));
    }
}
