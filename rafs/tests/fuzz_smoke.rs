//! The fuzz smoke run: every cargo-fuzz target body (`shoal_rafs::fuzzing`) over a few thousand
//! seeded inputs — real images, blob tails, chunks and layer tars, mutated (bit flips, byte
//! overwrites with boundary values, truncation, insertion, splicing) plus plain random bytes.
//! No panic, no hang (each target must finish within a deadline). Real fuzzing needs nightly:
//! see rafs/DESIGN.md.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::nydus;

const INLINE_META_BLOB: &str = "built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3";
use shoal_rafs::fuzzing;

/// splitmix64: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of one seed (or, now and then, random bytes).
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(20) == 0 {
        let n = rng.below(4096);
        return (0..n).map(|_| rng.next() as u8).collect();
    }
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if d.is_empty() {
            break;
        }
        let at = rng.below(d.len());
        match rng.below(6) {
            0 => d[at] ^= 1 << rng.below(8),
            1 => d[at] = rng.next() as u8,
            2 => {
                // A boundary value over a 4- or 8-byte field.
                let v: u64 = [0, 1, u64::MAX, u64::from(u32::MAX), 1 << 31, 4096][rng.below(6)];
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                let end = (at + w).min(d.len());
                d[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => d.truncate(at),
            4 => {
                let n = rng.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, bytes);
            }
            _ => {
                // Copy a range of the input over another place (duplicated structures).
                let len = rng.below(256).min(d.len() - at);
                let src = rng.below(d.len() - len + 1);
                let chunk = d[src..src + len].to_vec();
                let end = (at + len).min(d.len());
                d[at..end].copy_from_slice(&chunk[..end - at]);
            }
        }
    }
    d
}

/// Run `target` over the seeds and `n` mutations, failing if it takes longer than `limit`.
fn smoke(name: &str, seeds: Vec<Vec<u8>>, n: usize, limit: Duration, target: fn(&[u8])) {
    let (tx, rx) = mpsc::channel();
    let name2 = name.to_string();
    std::thread::spawn(move || {
        let mut rng = Rng(0x5EED ^ name2.len() as u64);
        for s in &seeds {
            target(s);
        }
        for _ in 0..n {
            target(&mutate(&mut rng, &seeds));
        }
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: {n} inputs took over {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: the target panicked"),
    }
}

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
