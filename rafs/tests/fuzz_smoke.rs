//! The fuzz smoke run: every cargo-fuzz target body (`shoal_rafs::fuzzing`) over a few thousand
//! seeded inputs — real images, blob tails, chunks and layer tars, mutated (bit flips, byte
//! overwrites with boundary values, truncation, insertion, splicing) plus plain random bytes.
//! No panic, no hang (each target must finish within a deadline). The seeds are also what the
//! libFuzzer runner (`e2e/fuzz/run`) starts from, and `node/tests/fuzz_smoke.rs` replays the
//! committed corpus (`fuzz/corpus/`) through these bodies.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::time::Duration;

use common::nydus;

const INLINE_META_BLOB: &str = "built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3";
use shoal_rafs::fuzzing::{self, smoke};

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(nydus().join(rel)).unwrap()
}

fn blob_files() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in [
        "built/b-v6-zstd-blake3-1m/blobs",
        "upstream/blobs",
        "built/a-v6-zstd-blake3-batch/blobs",
    ] {
        for e in std::fs::read_dir(nydus().join(dir)).unwrap() {
            out.push(std::fs::read(e.unwrap().path()).unwrap());
        }
    }
    out
}

#[test]
fn fuzz_smoke_bootstrap() {
    let seeds = [
        "built/b-v6-zstd-blake3-1m/bootstrap",
        "upstream/bootstrap/rafs-v6-2.2.boot",
        "upstream/repeatable/sha256-nocompress-repeatable",
    ]
    .iter()
    .map(|p| read(p))
    .collect();
    smoke(
        "bootstrap",
        seeds,
        3000,
        Duration::from_secs(120),
        fuzzing::bootstrap,
    );
}

#[test]
fn fuzz_smoke_blob_tail() {
    // The last 64 KiB of real blobs: CI table and header, TOC and tar headers.
    let mut seeds: Vec<Vec<u8>> = blob_files()
        .into_iter()
        .map(|b| b[b.len().saturating_sub(64 << 10)..].to_vec())
        .collect();
    // A blob carrying its bootstrap: the tail from the bootstrap section on.
    let inline = read(INLINE_META_BLOB);
    let boot = shoal_rafs::parse_blob_tail(&inline).unwrap().sections[1].offset as usize;
    seeds.push(inline[boot - 4096..].to_vec());
    smoke(
        "blob_tail",
        seeds,
        3000,
        Duration::from_secs(120),
        fuzzing::blob_tail,
    );
}

#[test]
fn fuzz_smoke_batch_meta() {
    // The batch fixture's bootstrap and its blob's CI region.
    let boot = read("built/a-v6-zstd-blake3-batch/bootstrap");
    let b = shoal_rafs::Bootstrap::from_bytes(boot.clone()).unwrap();
    let (off, len) = b.blob_meta_range(0).unwrap();
    let blob = read(&format!(
        "built/a-v6-zstd-blake3-batch/blobs/{}",
        b.blobs()[0].blob_id
    ));
    let mut seed = (boot.len() as u32).to_le_bytes().to_vec();
    seed.extend_from_slice(&boot);
    seed.extend_from_slice(&blob[off as usize..(off + len) as usize]);
    smoke(
        "batch_meta",
        vec![seed],
        300,
        Duration::from_secs(120),
        fuzzing::batch_meta,
    );
}

#[test]
fn fuzz_smoke_chunk_decode() {
    // Real chunks with a header the target decodes (compressor, size) in front.
    let mut seeds = Vec::new();
    let size = (9000u16 / 64 + 1).to_le_bytes();
    for (flags, size, payload) in [
        (2u8, size, zstd::bulk::compress(&[7u8; 9000], 3).unwrap()),
        (1, size, lz4_flex::block::compress(&[3u8; 9000])),
        (8, size, vec![1u8; 640]),
        // A batched chunk of 128 bytes at 192 in a 768-byte batch.
        (
            16 | 2 | 7 << 5,
            [2, 3],
            zstd::bulk::compress(&[5u8; 768], 3).unwrap(),
        ),
    ] {
        let mut s = vec![flags];
        s.extend_from_slice(&size);
        s.extend(payload);
        seeds.push(s);
    }
    smoke(
        "chunk_decode",
        seeds,
        3000,
        Duration::from_secs(120),
        fuzzing::chunk_decode,
    );
}

#[test]
fn fuzz_smoke_tar_layer() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture layer, decompressed (mutating gzip bytes would mostly test the CRC), and a
    // small tar with every entry type.
    let mut layer_a = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&read("source/layerB.tar.gz")[..]),
        &mut layer_a,
    )
    .unwrap();
    let mut small = tar::Builder::new(Vec::new());
    for (path, kind, data) in [
        ("d", tar::EntryType::Directory, &b""[..]),
        ("d/f", tar::EntryType::Regular, b"hello"),
        ("d/.wh.x", tar::EntryType::Regular, b""),
        ("fifo", tar::EntryType::Fifo, b""),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        small.append_data(&mut h, path, data).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    small.append_link(&mut h, "l", "d/f").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    small.append_link(&mut h, "hard", "d/f").unwrap();
    let small = small.into_inner().unwrap();
    let out = dir.path().join("out");
    // A fn pointer cannot capture the output directory; the target gets it from here.
    static OUT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    OUT.set(out).unwrap();
    smoke(
        "tar_layer",
        vec![small, layer_a],
        600,
        Duration::from_secs(120),
        |d| fuzzing::tar_layer(d, OUT.get().unwrap()),
    );
}
