//! The fuzz smoke run for what a node parses from the network (`shoal_node::fuzzing`,
//! `shoal_proto::fuzzing`): each fuzz target's body over its seeds and a few thousand seeded
//! mutations, on stable. Then every target, the RAFS ones included, over the committed corpus
//! (`fuzz/corpus/<target>/`, minimized by the libFuzzer runner `e2e/fuzz/run`) and the minimized
//! crashes it found (`fuzz/regressions/<target>/`), so a bug fuzzing found once stays fixed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;
use shoal_proto::sched::{AnnounceResponse, PieceBits};
use shoal_proto::wire::{
    self, ErrorCode, Frame, GetRange, Hello, PieceMap, RangeHeader, RangeStatus,
};
use shoal_rafs::fuzzing::{replay, smoke};

const LIMIT: Duration = Duration::from_secs(120);
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const NODE: &str = "9f3c2a1b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn oci_blobs() -> PathBuf {
    repo().join("../shared/fixtures/oci/debian-python/blobs/sha256")
}

fn texts(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn json_seeds(values: &[serde_json::Value]) -> Vec<Vec<u8>> {
    values
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect()
}

#[test]
fn fuzz_smoke_wire_frames() {
    let blob: shoal_proto::BlobId = DIGEST.parse().unwrap();
    let frames = [
        Frame::Hello(Hello {
            version: wire::PROTOCOL_VERSION,
            node: NODE.parse().unwrap(),
            proof: [7; wire::JOIN_PROOF_LEN],
        }),
        Frame::Error(ErrorCode::OutOfRange { size: 1 << 20 }),
        Frame::GetRange(GetRange {
            blob: blob.clone(),
            offset: 4096,
            len: 1 << 20,
        }),
        Frame::RangeHeader(RangeHeader {
            status: RangeStatus::NotPresent {
                size: 10 << 20,
                available: vec![(0, 4096), (8192, 1 << 20)],
            },
            len: 0,
        }),
        Frame::RangeHeader(RangeHeader {
            status: RangeStatus::Ok,
            len: 77,
        }),
        Frame::Have { blob },
        Frame::HaveReply(Some(PieceMap {
            size: 9 << 20,
            piece_size: 4 << 20,
            complete: false,
            bitmap: vec![0b1010_0000],
        })),
        Frame::HaveReply(None),
    ];
    let mut seeds: Vec<Vec<u8>> = frames.iter().map(|f| wire::to_bytes(f).unwrap()).collect();
    // A conversation: several frames back to back.
    seeds.push(seeds.concat());
    smoke(
        "wire_frames",
        seeds,
        20_000,
        LIMIT,
        shoal_proto::fuzzing::wire_frames,
    );
}

#[test]
fn fuzz_smoke_auth_header() {
    let key = shoal_proto::auth::derive_key(b"some-other-secret-of-32-bytes-or-more", "peer");
    let req = shoal_proto::auth::Signed {
        method: "GET",
        host: "node:5000",
        path: "/v2/",
        body: b"",
    };
    let signed = shoal_proto::auth::sign(&key, &req, 1_700_000_000_000);
    let seeds = texts(&[
        &signed,
        "v2:1700000000000:00112233445566778899aabbccddeeff:abcd",
        "v1:x",
    ]);
    smoke(
        "auth_header",
        seeds,
        20_000,
        LIMIT,
        shoal_proto::fuzzing::auth_header,
    );
}

#[test]
fn fuzz_smoke_names() {
    let seeds = texts(&[
        DIGEST,
        "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
        "library/debian",
        "registry.example:5000/team/app",
        "v1.2.3-rc_1",
        "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        NODE,
        "12:0f01",
        "3:all",
        "-",
    ]);
    smoke("names", seeds, 100_000, LIMIT, shoal_proto::fuzzing::names);
}

#[test]
fn fuzz_smoke_http_headers() {
    let seeds = texts(&[
        "bytes=0-99",
        "bytes=100-",
        "bytes=-500",
        "bytes=0-0,5-9",
        "bytes 0-99/1000",
        "bytes */1000",
        r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/app:pull""#,
        r#"bearer realm="x", scope="a,b""#,
    ]);
    smoke(
        "http_headers",
        seeds,
        20_000,
        LIMIT,
        shoal_node::fuzzing::http_headers,
    );
}

#[test]
fn fuzz_smoke_manifest() {
    // The debian-python image's index, manifests and configs, as a registry sends them.
    let mut seeds = vec![std::fs::read(oci_blobs().join("../../index.json")).unwrap()];
    for e in std::fs::read_dir(oci_blobs()).unwrap() {
        let p = e.unwrap().path();
        if std::fs::metadata(&p).unwrap().len() < 16 << 10 {
            seeds.push(std::fs::read(&p).unwrap());
        }
    }
    seeds.extend(json_seeds(&[json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "size": 500,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "size": 500,
             "platform": {"os": "unknown", "architecture": "unknown"}}
        ]
    })]));
    assert!(
        seeds.len() >= 4,
        "the fixture image's manifests were not found"
    );
    smoke(
        "manifest",
        seeds,
        20_000,
        LIMIT,
        shoal_node::fuzzing::manifest,
    );
}

#[test]
fn fuzz_smoke_notification() {
    let seeds = json_seeds(&[
        json!({"events": [
            {"id": "1", "timestamp": "2026-12-07T12:00:01.5+01:00", "action": "push",
             "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
                        "repository": "team/app", "tag": "1", "url": "http://r/v2/team/app/manifests/x"},
             "request": {"host": "r"}},
            {"action": "pull", "target": {"mediaType": "application/octet-stream", "digest": DIGEST, "repository": "a"}}
        ]}),
        json!({
            "type": "PUSH_ARTIFACT", "occur_at": 1_796_644_801u64, "operator": "ci",
            "event_data": {
                "resources": [{"digest": DIGEST, "tag": "v2", "resource_url": "r/library/app:v2"}],
                "repository": {"name": "app", "namespace": "library", "repo_full_name": "library/app"}
            }
        }),
    ]);
    smoke(
        "notification",
        seeds,
        20_000,
        LIMIT,
        shoal_node::fuzzing::notification,
    );
}

#[test]
fn fuzz_smoke_sched_message() {
    let have: PieceBits = "12:0f01".parse().unwrap();
    let mut seeds = json_seeds(&[
        json!({
            "node": {"id": NODE, "p2p_addr": "10.0.0.2:7000", "zone": "a", "upload_slots_free": 8, "version": "0.1.0"},
            "full": true,
            "blobs": [{"blob": DIGEST, "size": 5u64 << 22, "piece_size": 4u64 << 20, "have": have.to_string(),
                       "complete": false, "origin_fetch": true, "origin_bytes": 4096, "present_bytes": 4096}],
            "removed": [DIGEST],
            "traffic": {"from_origin": 1, "from_peers": 2, "to_peers": 3, "served_local": 4}
        }),
        json!({"asker": NODE, "size": 1000, "want_lease": true}),
        json!({
            "holders": [{"node": NODE, "p2p_addr": "[::1]:7000", "zone": null, "have": have.to_string(),
                         "complete": false, "lease_holder": true, "score": 0.5}],
            "size": 1000, "piece_size": 4194304,
            "lease": {"holder": NODE, "granted_to_you": false, "expires_ms": 5000},
            "retry_after_ms": 100
        }),
        json!({"reporter": NODE, "peer": NODE, "reason": "bad_piece"}),
        json!({"image": "registry:5000/team/app:1", "nodes": "all", "full": true}),
    ]);
    seeds.push(serde_json::to_vec(&AnnounceResponse::default()).unwrap());
    smoke(
        "sched_message",
        seeds,
        20_000,
        LIMIT,
        shoal_node::fuzzing::sched_message,
    );
}

/// The tar target writes images under a directory of its own.
fn tar_layer(data: &[u8]) {
    static OUT: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = OUT.get_or_init(|| tempfile::tempdir().unwrap());
    shoal_rafs::fuzzing::tar_layer(data, &dir.path().join("out"));
}

/// Every fuzz target by its name in `fuzz/Cargo.toml`.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 12] = [
    ("bootstrap", shoal_rafs::fuzzing::bootstrap),
    ("blob_tail", shoal_rafs::fuzzing::blob_tail),
    ("chunk_decode", shoal_rafs::fuzzing::chunk_decode),
    ("tar_layer", tar_layer),
    ("batch_meta", shoal_rafs::fuzzing::batch_meta),
    ("wire_frames", shoal_proto::fuzzing::wire_frames),
    ("auth_header", shoal_proto::fuzzing::auth_header),
    ("names", shoal_proto::fuzzing::names),
    ("http_headers", shoal_node::fuzzing::http_headers),
    ("manifest", shoal_node::fuzzing::manifest),
    ("notification", shoal_node::fuzzing::notification),
    ("sched_message", shoal_node::fuzzing::sched_message),
];

#[test]
fn every_fuzz_target_is_listed_and_replays_its_committed_corpus() {
    let fuzz = repo().join("fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    let listed: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "shoal-fuzz")
        .collect();
    let mut ours: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    ours.sort_unstable();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort_unstable();
    assert_eq!(ours, listed_sorted, "fuzz/Cargo.toml and TARGETS disagree");
    for (name, target) in TARGETS {
        assert!(fuzz.join(format!("fuzz_targets/{name}.rs")).is_file());
        let corpus = replay(&fuzz.join("corpus").join(name), target);
        let crashes = replay(&fuzz.join("regressions").join(name), target);
        println!("{name}: {corpus} corpus inputs, {crashes} regressions replayed");
    }
}
