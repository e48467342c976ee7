//! Every nydus fixture image is read, unpacked and compared with the listing of the tree it was
//! built from; `check` passes on each and catches flipped bytes.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::path::{Path, PathBuf};

use common::*;
use shoal_rafs::tools::{check, check_path, check_path_with_digest, unpack, UnpackOptions};
use shoal_rafs::{Bootstrap, ChunkSource, FileType, LocalBlobDir, RafsVersion};

struct Case {
    name: &'static str,
    bootstrap: &'static str,
    blob_dirs: &'static [&'static str],
    listing: &'static str,
    version: RafsVersion,
}

const TREE_A: &str = "source/treeA.listing.jsonl";
const INLINE_META_BLOB: &str = "built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3";
const CASES: &[Case] = &[
    Case {
        name: "a-v6-zstd-blake3-1m",
        bootstrap: "built/a-v6-zstd-blake3-1m/bootstrap",
        blob_dirs: &["built/a-v6-zstd-blake3-1m/blobs"],
        listing: TREE_A,
        version: RafsVersion::V6,
    },
    Case {
        name: "a-v6-lz4-sha256-1m",
        bootstrap: "built/a-v6-lz4-sha256-1m/bootstrap",
        blob_dirs: &["built/a-v6-lz4-sha256-1m/blobs"],
        listing: TREE_A,
        version: RafsVersion::V6,
    },
    Case {
        name: "a-v6-none-blake3-64k",
        bootstrap: "built/a-v6-none-blake3-64k/bootstrap",
        blob_dirs: &["built/a-v6-none-blake3-64k/blobs"],
        listing: TREE_A,
        version: RafsVersion::V6,
    },
    Case {
        name: "a-v6-zstd-blake3-batch",
        bootstrap: "built/a-v6-zstd-blake3-batch/bootstrap",
        blob_dirs: &["built/a-v6-zstd-blake3-batch/blobs"],
        listing: TREE_A,
        version: RafsVersion::V6,
    },
    Case {
        name: "a-v6-zstd-inline-meta (the data blob as the bootstrap)",
        bootstrap: INLINE_META_BLOB,
        blob_dirs: &["built/a-v6-zstd-inline-meta/blobs"],
        listing: TREE_A,
        version: RafsVersion::V6,
    },
    Case {
        name: "a-v5-lz4-blake3-1m",
        bootstrap: "built/a-v5-lz4-blake3-1m/bootstrap",
        blob_dirs: &["built/a-v5-lz4-blake3-1m/blobs"],
        listing: TREE_A,
        version: RafsVersion::V5,
    },
    Case {
        name: "ab-v6-merged",
        bootstrap: "built/ab-v6-merged/bootstrap",
        blob_dirs: &[
            "built/b-v6-zstd-blake3-1m/blobs",
            "built/a-v6-zstd-blake3-1m/blobs",
        ],
        listing: "source/treeB.listing.jsonl",
        version: RafsVersion::V6,
    },
    Case {
        name: "upstream rafs-v6-2.2",
        bootstrap: "upstream/bootstrap/rafs-v6-2.2.boot",
        blob_dirs: &["upstream/blobs"],
        listing: "upstream/bootstrap/rafs-v6-2.2.boot.listing.jsonl",
        version: RafsVersion::V6,
    },
    Case {
        name: "upstream v5 sha256-none",
        bootstrap: "upstream/repeatable/sha256-nocompress-repeatable",
        blob_dirs: &["upstream/repeatable/blobs"],
        listing: "upstream/repeatable/sha256-nocompress-repeatable.listing.jsonl",
        version: RafsVersion::V5,
    },
    Case {
        name: "upstream v5 blake3",
        bootstrap: "upstream/repeatable/blake3-lz4_block-non_repeatable",
        blob_dirs: &["upstream/repeatable/blobs"],
        listing: "upstream/repeatable/blake3-lz4_block-non_repeatable.listing.jsonl",
        version: RafsVersion::V5,
    },
];

fn source(case: &Case) -> LocalBlobDir {
    LocalBlobDir::with_dirs(case.blob_dirs.iter().map(|d| nydus().join(d)))
}

#[test]
fn unpack_reproduces_every_listing() {
    let root = is_root();
    if !root {
        skip(
            "unpack_reproduces_every_listing (owners, device nodes, trusted/security xattrs)",
            "not running as root",
        );
    }
    for case in CASES {
        let b = Bootstrap::open(nydus().join(case.bootstrap)).unwrap();
        assert_eq!(b.version(), case.version, "{}", case.name);
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("root");
        let src = source(case);
        src.load_blob_metas(&b).unwrap();
        let stats = unpack(&b, &src, &dest, &UnpackOptions::for_current_user())
            .unwrap_or_else(|e| panic!("{}: unpack failed: {e}", case.name));
        let mut actual = listing(&dest);
        let mut expected = load_listing(&nydus().join(case.listing));
        if !root {
            strip_privileged(&mut actual);
            strip_privileged(&mut expected);
        }
        assert_same_listing(case.name, &actual, &expected);
        assert!(stats.files > 0, "{}", case.name);
    }
}

#[test]
fn listing_port_matches_and_detects_differences() {
    // The Rust listing of an unpacked tree is compared field by field: a changed mode, owner,
    // xattr or mtime in the expectation must show up as a difference.
    let case = &CASES[0];
    let b = Bootstrap::open(nydus().join(case.bootstrap)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    unpack(&b, &source(case), &dest, &UnpackOptions::for_current_user()).unwrap();
    let actual = listing(&dest);
    let expected = load_listing(&nydus().join(case.listing));
    assert_eq!(actual.len(), expected.len());
    for (key, value) in [("mode", "0o7777"), ("mtime", "5"), ("sha256", "00")] {
        let mut changed = expected.clone();
        let i = changed
            .iter()
            .position(|e| e["path"] == "/xattr/user")
            .unwrap();
        changed[i][key] = serde_json::json!(value);
        assert_eq!(listing_diffs(&actual, &changed).len(), 1, "{key}");
    }
    let x = actual.iter().find(|e| e["path"] == "/xattr/user").unwrap();
    assert_eq!(x["xattrs_hex"]["user.shoal.test"], "68656c6c6f");
    let d = actual.iter().find(|e| e["path"] == "/dev/null").unwrap();
    if is_root() {
        assert_eq!(d["rdev"], serde_json::json!([1, 3]));
        let u = actual
            .iter()
            .find(|e| e["path"] == "/meta/uid_big")
            .unwrap();
        assert_eq!(
            (u["uid"].as_u64(), u["gid"].as_u64()),
            (Some(100000), Some(200000))
        );
    }
}

#[test]
fn check_is_clean_on_every_fixture() {
    for case in CASES {
        let b = Bootstrap::open(nydus().join(case.bootstrap)).unwrap();
        let r = check(&b, Some(&source(case)));
        assert!(r.is_ok(), "{}: {r}", case.name);
        assert_eq!(r.blobs_checked, b.blobs().len() as u64);
        assert!(r.chunks_verified > 0);
        let r = check(&b, None);
        assert!(r.is_ok(), "{}: {r}", case.name);
        assert!(r.entries > 1);
    }
}

#[test]
fn layer_b_keeps_whiteouts_as_entries() {
    let b = Bootstrap::open(nydus().join("built/b-v6-zstd-blake3-1m/bootstrap")).unwrap();
    // nydus-image with `--whiteout-spec none` keeps the OCI markers as empty regular files.
    for p in [
        "/change/.wh.deleted_file",
        "/change/.wh.deleted_dir",
        "/change/opaque/.wh..wh..opq",
    ] {
        let a = b.getattr(b.lookup(p).unwrap()).unwrap();
        assert_eq!(a.file_type, FileType::File, "{p}");
        assert_eq!(a.size, 0, "{p}");
    }
    assert_eq!(
        b.getattr(b.lookup("/change/to_symlink").unwrap())
            .unwrap()
            .file_type,
        FileType::Symlink
    );
    assert_eq!(
        b.readlink(b.lookup("/change/to_symlink").unwrap()).unwrap(),
        b"modified"
    );
    assert!(b.lookup("/change/deleted_file").is_err());

    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    let src = LocalBlobDir::new(nydus().join("built/b-v6-zstd-blake3-1m/blobs"));
    unpack(&b, &src, &dest, &UnpackOptions::for_current_user()).unwrap();
    let list = listing(&dest);
    let paths: Vec<&str> = list.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/added",
            "/added/dup_of_A",
            "/added/new_file",
            "/change",
            "/change/.wh.deleted_dir",
            "/change/.wh.deleted_file",
            "/change/chmod",
            "/change/modified",
            "/change/opaque",
            "/change/opaque/.wh..wh..opq",
            "/change/opaque/new1",
            "/change/to_symlink"
        ]
    );
    // Content of the layer's files equals treeB's.
    let tree_b = load_listing(&nydus().join("source/treeB.listing.jsonl"));
    for e in &list {
        if let Some(x) = tree_b.iter().find(|x| x["path"] == e["path"]) {
            assert_eq!(e["sha256"], x["sha256"], "{}", e["path"]);
        }
    }
}

#[test]
fn public_api_reads_the_upstream_fixture_exactly() {
    let b = Bootstrap::open(nydus().join("upstream/bootstrap/rafs-v6-2.2.boot")).unwrap();
    let blob = &b.blobs()[0];
    assert_eq!(
        blob.blob_id,
        "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
    );
    assert_eq!(blob.features, 0x7000_0021);
    assert_eq!(blob.toc_size, 1024);
    assert_eq!(b.devices()[0].mapped_blkaddr, 512);
    let ino = b.lookup("/sync_io.rs").unwrap();
    let a = b.getattr(ino).unwrap();
    assert_eq!(a.size, 13400);
    let chunks = b.file_chunks(ino, 0, u64::MAX).unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        (
            chunks[0].ci_index,
            chunks[0].uncompressed_offset,
            chunks[0].compressed_offset
        ),
        (1, 0x5000, 0x12dc)
    );
    assert_eq!(chunks[0].compressed_size, 2974);
    // Partial ranges select only the overlapping chunks.
    assert!(b.file_chunks(ino, 13400, 10).unwrap().is_empty());
    let dir = LocalBlobDir::new(nydus().join("upstream/blobs"));
    let data = dir.read_chunk(blob, &chunks[0]).unwrap();
    assert_eq!(data.len(), 13400);
    // Blob tail: the four tar sections and the TOC.
    let bytes = std::fs::read(dir.blob_path(blob)).unwrap();
    let tail = shoal_rafs::parse_blob_tail(&bytes).unwrap();
    let names: Vec<_> = tail.sections.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["rafs.blob.toc", "blob.digest", "blob.meta", "image.blob"]
    );
    let toc: Vec<_> = tail.toc.unwrap().iter().map(|t| t.name.clone()).collect();
    assert_eq!(
        toc,
        ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    );
}

#[test]
fn toc_blob_with_inlined_bootstrap_parses() {
    let p = nydus()
        .join("upstream/toc/2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca");
    let tail = shoal_rafs::parse_blob_tail(&std::fs::read(p).unwrap()).unwrap();
    let toc: Vec<_> = tail.toc.unwrap().iter().map(|t| t.name.clone()).collect();
    assert_eq!(
        toc,
        ["image.blob", "blob.meta", "blob.meta.header", "image.boot"]
    );
    let p = nydus()
        .join("upstream/toc/2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca");
    let boot = shoal_rafs::extract_inlined_bootstrap(&std::fs::read(p).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(boot.len(), 20480);
    let b = Bootstrap::from_bytes(boot).unwrap();
    assert_eq!(b.version(), RafsVersion::V6);
    assert!(!b.readdir(b.root()).unwrap().is_empty());
    // The blob.digest section of the upstream blob is cross-checked by `check`.
    let b = Bootstrap::open(nydus().join("upstream/bootstrap/rafs-v6-2.2.boot")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let blob = &b.blobs()[0];
    let mut data = std::fs::read(nydus().join("upstream/blobs").join(&blob.blob_id)).unwrap();
    let tail = shoal_rafs::parse_blob_tail(&data).unwrap();
    let d = tail
        .sections
        .iter()
        .find(|s| s.name == "blob.digest")
        .unwrap();
    data[d.offset as usize + 5] ^= 1;
    std::fs::write(tmp.path().join(&blob.blob_id), &data).unwrap();
    let r = check(&b, Some(&LocalBlobDir::new(tmp.path())));
    assert!(
        r.problems.iter().any(|p| p.message.contains("blob.digest")),
        "{r}"
    );
}

#[test]
fn decoded_blob_matches_file_contents() {
    let b = Bootstrap::open(nydus().join("built/b-v6-zstd-blake3-1m/bootstrap")).unwrap();
    let src = LocalBlobDir::new(nydus().join("built/b-v6-zstd-blake3-1m/blobs"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("blob.data");
    shoal_rafs::write_decoded_blob(&b, 0, &src, &out).unwrap();
    let decoded = std::fs::read(&out).unwrap();
    assert_eq!(decoded.len() as u64, b.blobs()[0].uncompressed_size);
    let ino = b.lookup("/added/new_file").unwrap();
    for c in b.file_chunks(ino, 0, u64::MAX).unwrap() {
        let want = src.read_chunk(&b.blobs()[0], &c).unwrap();
        let at = c.uncompressed_offset as usize;
        assert_eq!(&decoded[at..at + want.len()], want.as_bytes());
    }
}

fn copy_case(dir: &Path, case_boot: &str, blob_dir: &str) -> (PathBuf, PathBuf) {
    let boot = dir.join("bootstrap");
    std::fs::copy(nydus().join(case_boot), &boot).unwrap();
    let blobs = dir.join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    for e in std::fs::read_dir(nydus().join(blob_dir)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
    }
    (boot, blobs)
}

fn flip(path: &Path, at: u64) {
    let mut d = std::fs::read(path).unwrap();
    d[at as usize] ^= 0x5a;
    std::fs::write(path, d).unwrap();
}

#[test]
fn check_catches_every_flipped_chunk_byte() {
    for (boot, blobs) in [
        (
            "built/b-v6-zstd-blake3-1m/bootstrap",
            "built/b-v6-zstd-blake3-1m/blobs",
        ),
        (
            "built/a-v6-lz4-sha256-1m/bootstrap",
            "built/a-v6-lz4-sha256-1m/blobs",
        ),
        ("upstream/bootstrap/rafs-v6-2.2.boot", "upstream/blobs"),
        (
            "upstream/repeatable/sha256-nocompress-repeatable",
            "upstream/repeatable/blobs",
        ),
    ] {
        let b = Bootstrap::open(nydus().join(boot)).unwrap();
        let blob = b.blobs()[0].clone();
        let chunks = b.blob_chunks(0).unwrap();
        let data_end = chunks
            .iter()
            .map(|c| c.compressed_offset + u64::from(c.compressed_size))
            .max()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (_, blob_dir) = copy_case(tmp.path(), boot, blobs);
        let blob_path = blob_dir.join(&blob.blob_id);
        let original = std::fs::read(&blob_path).unwrap();
        let positions: Vec<u64> = (0..24)
            .map(|i| i * data_end / 24)
            .chain([data_end - 1])
            .collect();
        for at in positions {
            flip(&blob_path, at);
            let r = check(&b, Some(&LocalBlobDir::new(&blob_dir)));
            assert!(!r.is_ok(), "{boot}: flipped blob byte {at} not detected");
            std::fs::write(&blob_path, &original).unwrap();
        }
    }
}

#[test]
fn check_survives_flipped_bootstrap_bytes_and_catches_chunk_table_damage() {
    for (boot, blobs) in [
        (
            "built/b-v6-zstd-blake3-1m/bootstrap",
            "built/b-v6-zstd-blake3-1m/blobs",
        ),
        ("upstream/bootstrap/rafs-v6-2.2.boot", "upstream/blobs"),
        (
            "upstream/repeatable/sha256-nocompress-repeatable",
            "upstream/repeatable/blobs",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (boot_path, blob_dir) = copy_case(tmp.path(), boot, blobs);
        let original = std::fs::read(&boot_path).unwrap();
        let len = original.len() as u64;
        // A spread over the whole file (superblock, tables, inodes, dirents, chunk table) ...
        let step = (len / 400).max(1);
        for at in (0..len).step_by(step as usize).chain(1024..1200) {
            flip(&boot_path, at);
            let _ = check_path(&boot_path, Some(&LocalBlobDir::new(&blob_dir)));
            std::fs::write(&boot_path, &original).unwrap();
        }
        // ... and every digest byte of the v6 chunk table must be caught.
        let b = Bootstrap::from_bytes(original.clone()).unwrap();
        if b.version() == RafsVersion::V6 {
            let ext = &original[1152..1152 + 40];
            let table = u64::from_le_bytes(ext[24..32].try_into().unwrap());
            let size = u64::from_le_bytes(ext[32..40].try_into().unwrap());
            for entry in (table..table + size).step_by(80) {
                for field in [0u64, 17, 31, 40, 44, 48, 56] {
                    flip(&boot_path, entry + field);
                    let r = check_path(&boot_path, Some(&LocalBlobDir::new(&blob_dir)));
                    assert!(
                        !r.is_ok(),
                        "{boot}: chunk table byte {} not detected",
                        entry + field
                    );
                    std::fs::write(&boot_path, &original).unwrap();
                }
            }
        }
    }
}

/// With the bootstrap's digest (as a manifest or `build` gives it), a flipped byte ANYWHERE in
/// the bootstrap is reported, including fields where any value is structurally valid.
#[test]
fn check_with_digest_catches_a_flipped_byte_anywhere_in_the_bootstrap() {
    for boot in [
        "built/a-v6-zstd-blake3-1m/bootstrap",
        "built/ab-v6-merged/bootstrap",
        "built/a-v5-lz4-blake3-1m/bootstrap",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bootstrap");
        let original = std::fs::read(nydus().join(boot)).unwrap();
        std::fs::write(&path, &original).unwrap();
        let digest = shoal_rafs::build::sha256_digest(&original);
        let clean = check_path_with_digest(&path, Some(&digest), None);
        assert!(clean.is_ok(), "{boot}: {clean}");
        let len = original.len() as u64;
        let step = (len / 400).max(1);
        for at in (0..len).step_by(step as usize).chain([len - 1]) {
            flip(&path, at);
            let r = check_path_with_digest(&path, Some(&digest), None);
            assert!(!r.is_ok(), "{boot}: flipped byte {at} not detected");
            std::fs::write(&path, &original).unwrap();
        }
    }
}

#[test]
fn rejects_v3_and_garbage() {
    let mut v3 = vec![0u8; 16384];
    v3[16384 - 4096..16384 - 4088].copy_from_slice(b"LPFOOTER");
    assert!(matches!(
        Bootstrap::from_bytes(v3),
        Err(shoal_rafs::Error::NydusV3 { .. })
    ));
    assert!(matches!(
        Bootstrap::from_bytes(vec![0u8; 8192]),
        Err(shoal_rafs::Error::NotRafs { .. })
    ));
    assert!(Bootstrap::from_bytes(Vec::new()).is_err());
    // A plain EROFS superblock without the RAFS compat bit is refused by name.
    let mut b = std::fs::read(nydus().join("upstream/bootstrap/rafs-v6-2.2.boot")).unwrap();
    b[1024 + 11] &= !0x40;
    let e = Bootstrap::from_bytes(b).unwrap_err().to_string();
    assert!(e.contains("compat bit"), "{e}");
}
