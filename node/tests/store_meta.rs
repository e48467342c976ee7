//! Manifest and tag cache: round trips, merging, and persistence (RocksDB).
//! Each test runs on both backends.

use std::path::Path;

use shoal_node::store::{
    Backend, ManifestRecord, Provenance, RepoKey, Store, StoreConfig, StoreError, TagRecord,
};
use shoal_proto::{Digest, RepoName, Tag};

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $name() { super::$name(shoal_node::store::Backend::Memory) })*
        }
        mod rocksdb {
            $(#[test] fn $name() { super::$name(shoal_node::store::Backend::RocksDb) })*
        }
    };
}

both_backends!(
    manifests_round_trip_merge_and_persist,
    tags_round_trip_and_persist
);

fn open(dir: &Path, backend: Backend) -> Store {
    Store::open(StoreConfig {
        dir: dir.to_owned(),
        backend,
        quota_bytes: 0,
        filesystem_quota: false,
        high_watermark: 0.9,
        low_watermark: 0.8,
    })
    .expect("open store")
}

fn repo(upstream: &str, name: &str) -> RepoKey {
    RepoKey {
        upstream: upstream.to_owned(),
        repo: name.parse().expect("repo"),
    }
}

fn manifests_round_trip_merge_and_persist(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = br#"{"schemaVersion":2}"#.to_vec();
    let digest = Digest::sha256(&bytes);
    let rec = |r: RepoKey, open| ManifestRecord {
        digest: digest.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes: bytes.clone(),
        repos: Provenance::one(r, open),
    };
    {
        let store = open(dir.path(), backend);
        assert!(store.get_manifest(&digest).expect("get").is_none());
        store
            .put_manifest(&rec(repo("docker.io", "library/a"), true))
            .expect("put");
        store
            .put_manifest(&rec(repo("ghcr.io", "b"), false))
            .expect("put");
        let got = store.get_manifest(&digest).expect("get").expect("present");
        assert_eq!(got.bytes, bytes);
        assert!(got.repos.is_open(&repo("docker.io", "library/a")));
        assert!(
            !got.repos.is_open(&repo("ghcr.io", "b")),
            "open per repository"
        );
        assert_eq!(got.repos.len(), 2);

        let mut wrong = rec(repo("ghcr.io", "b"), false);
        wrong.bytes.push(b' ');
        assert!(matches!(
            store.put_manifest(&wrong),
            Err(StoreError::ManifestDigest { .. })
        ));
    }
    if backend == Backend::RocksDb {
        let store = open(dir.path(), backend);
        let got = store
            .get_manifest(&digest)
            .expect("get")
            .expect("persisted");
        assert!(got.repos.contains(&repo("docker.io", "library/a")));
        assert!(got.repos.contains(&repo("ghcr.io", "b")));
        assert!(got.repos.is_open(&repo("docker.io", "library/a")));
        assert!(!got.repos.is_open(&repo("ghcr.io", "b")));
    }
}

fn tags_round_trip_and_persist(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let name: RepoName = "library/debian".parse().expect("repo");
    let latest: Tag = "latest".parse().expect("tag");
    let other: Tag = "12".parse().expect("tag");
    let rec = TagRecord {
        digest: Digest::sha256(b"manifest"),
        media_type: "application/vnd.oci.image.index.v1+json".into(),
        fetched_at_ms: 42,
        public: true,
    };
    {
        let store = open(dir.path(), backend);
        store
            .put_tag("docker.io", &name, &latest, &rec)
            .expect("put");
        let got = store
            .get_tag("docker.io", &name, &latest)
            .expect("get")
            .expect("present");
        assert_eq!(
            (got.digest, got.fetched_at_ms, got.public),
            (rec.digest.clone(), 42, true)
        );
        assert!(store
            .get_tag("docker.io", &name, &other)
            .expect("get")
            .is_none());
        assert!(store
            .get_tag("quay.io", &name, &latest)
            .expect("get")
            .is_none());
        let newer = TagRecord {
            fetched_at_ms: 43,
            ..rec.clone()
        };
        store
            .put_tag("docker.io", &name, &latest, &newer)
            .expect("replace");
    }
    if backend == Backend::RocksDb {
        let store = open(dir.path(), backend);
        let got = store
            .get_tag("docker.io", &name, &latest)
            .expect("get")
            .expect("persisted");
        assert_eq!(got.fetched_at_ms, 43);
    }
}
