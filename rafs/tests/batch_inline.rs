//! Hostile inputs for batch blobs (`nydus-image --batch-size`) and bootstraps inlined in data
//! blobs (`--blob-inline-meta`): the fixtures with bytes of their batch tables, CI entries,
//! batches, blob tails, TOCs and inlined bootstraps changed must give clean errors (or, where the
//! change is harmless, still verify), never a panic, an out-of-bounds read or wrong bytes.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::path::Path;

use common::nydus;
use shoal_rafs::tools::{check, check_path, unpack, UnpackOptions};
use shoal_rafs::{Bootstrap, ChunkSource, Error, LocalBlobDir};

const BATCH: &str = "built/a-v6-zstd-blake3-batch";
const INLINE_BLOB: &str = "built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3";
const INLINE_ID: &str = "1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3";

/// The batch fixture with its CI table stored uncompressed (so single fields of the decoded
/// table can be changed): the bootstrap's blob table says so (compressed size = size), and the
/// blob is `data | raw CI | CI header`.
struct RawCi {
    boot: Vec<u8>,
    blob: Vec<u8>,
    blob_id: String,
    /// Offset of the raw CI table in `blob`.
    ci: usize,
    ci_len: usize,
    /// Offset of the batch table in the raw CI.
    contexts: usize,
}

impl RawCi {
    fn new() -> Self {
        let boot = std::fs::read(nydus().join(BATCH).join("bootstrap")).unwrap();
        let b = Bootstrap::from_bytes(boot.clone()).unwrap();
        let info = b.blobs()[0].clone();
        let blob = std::fs::read(nydus().join(BATCH).join("blobs").join(&info.blob_id)).unwrap();
        let (off, len) = b.blob_meta_range(0).unwrap();
        let (off, len) = (off as usize, len as usize);
        let meta = info.meta.as_ref().unwrap();
        let raw = zstd::bulk::decompress(
            &blob[off..off + meta.compressed_size as usize],
            meta.uncompressed_size as usize,
        )
        .unwrap();
        let header = blob[off + len - 4096..off + len].to_vec();
        let contexts = u64::from_le_bytes(header[40..48].try_into().unwrap()) as usize;
        let mut new_blob = blob[..off].to_vec();
        new_blob.extend_from_slice(&raw);
        new_blob.extend_from_slice(&header);
        let mut boot = boot;
        let table = u64::from_le_bytes(boot[1160..1168].try_into().unwrap()) as usize;
        // ci_compressed_size (blob entry offset 120) = ci_uncompressed_size.
        boot[table + 120..table + 128].copy_from_slice(&(raw.len() as u64).to_le_bytes());
        RawCi {
            boot,
            blob: new_blob,
            blob_id: info.blob_id,
            ci: off,
            ci_len: raw.len(),
            contexts,
        }
    }

    /// Write the (changed) image into `dir`; returns the bootstrap and the blob directory.
    fn write(&self, dir: &Path, blob: &[u8]) -> (Bootstrap, LocalBlobDir) {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(&self.blob_id), blob).unwrap();
        (
            Bootstrap::from_bytes(self.boot.clone()).unwrap(),
            LocalBlobDir::new(blobs),
        )
    }
}

#[test]
fn batch_table_and_ci_entries_changed_give_errors_not_panics() {
    let img = RawCi::new();
    let tmp = tempfile::tempdir().unwrap();
    // The re-stored image itself verifies: the harness changes only what each case says.
    let (b, dir) = img.write(tmp.path(), &img.blob);
    let r = check(&b, Some(&dir));
    assert!(r.is_ok(), "{r}");
    assert!(r.chunks_verified > 3000);

    let field = |blob: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        blob[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let ctx = img.ci + img.contexts;
    let entry = |i: usize| img.ci + 24 * i;
    let hdr = img.ci + img.ci_len;
    // (what, offset in the blob, new bytes): each must be reported, never trusted.
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("batch 0 stored size 0", ctx, 0u32.to_le_bytes().to_vec()),
        (
            "batch 0 stored size huge",
            ctx,
            u32::MAX.to_le_bytes().to_vec(),
        ),
        (
            "batch 0 stored size +1",
            ctx,
            4881u32.to_le_bytes().to_vec(),
        ),
        ("batch 0 size 0", ctx + 4, 0u32.to_le_bytes().to_vec()),
        ("batch 0 size +1", ctx + 4, 22907u32.to_le_bytes().to_vec()),
        (
            "batch 0 size 17 MiB",
            ctx + 4,
            (17u32 << 20).to_le_bytes().to_vec(),
        ),
        ("batch 1 size -1", ctx + 44, 5035u32.to_le_bytes().to_vec()),
        (
            "batch 3 stored past the CI",
            ctx + 120,
            1_000_000u32.to_le_bytes().to_vec(),
        ),
        // Entry 0 (in batch 0): data = offset in batch (low u32), batch index (high u32).
        (
            "entry 0 batch index 4",
            entry(0) + 20,
            4u32.to_le_bytes().to_vec(),
        ),
        (
            "entry 0 batch index max",
            entry(0) + 20,
            u32::MAX.to_le_bytes().to_vec(),
        ),
        (
            "entry 0 offset past the batch",
            entry(0) + 16,
            22905u32.to_le_bytes().to_vec(),
        ),
        (
            "entry 0 offset max",
            entry(0) + 16,
            u32::MAX.to_le_bytes().to_vec(),
        ),
        (
            "entry 1 offset shifted",
            entry(1) + 16,
            5u32.to_le_bytes().to_vec(),
        ),
        (
            "entry 3004 in batch 1",
            entry(3004) + 20,
            1u32.to_le_bytes().to_vec(),
        ),
        // Entry 0's batch offset (compressed offset, 40 bits) moved into batch 1's bytes.
        (
            "entry 0 stored offset",
            entry(0) + 8,
            2_102_155u64.to_le_bytes()[..5].to_vec(),
        ),
        ("entry 0 not batched", entry(0) + 7, [0x01].to_vec()),
        ("entry 3005 batched", entry(3005) + 7, [0x05].to_vec()),
        (
            "entry 0 uncompressed offset",
            entry(0),
            1u32.to_le_bytes().to_vec(),
        ),
        ("entry 0 size", entry(0) + 4, [9, 0, 0].to_vec()),
        (
            "header batch count 5",
            hdr + 56,
            5u32.to_le_bytes().to_vec(),
        ),
        (
            "header batch count huge",
            hdr + 56,
            u32::MAX.to_le_bytes().to_vec(),
        ),
        (
            "header batch table at 0",
            hdr + 40,
            0u64.to_le_bytes().to_vec(),
        ),
        (
            "header batch table past the CI",
            hdr + 40,
            (1u64 << 40).to_le_bytes().to_vec(),
        ),
        (
            "header batch table off by 8",
            hdr + 40,
            ((img.contexts + 8) as u64).to_le_bytes().to_vec(),
        ),
        ("header magic", hdr, 0u32.to_le_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        let mut blob = img.blob.clone();
        field(&mut blob, at, &bytes);
        let dir_path = tmp.path().join(what.replace(' ', "_"));
        let (b, dir) = img.write(&dir_path, &blob);
        let r = check(&b, Some(&dir));
        assert!(!r.is_ok(), "{what}: not reported");
        // Reading through the table fails cleanly, or returns only verified bytes.
        let (b, dir) = img.write(&dir_path, &blob);
        match dir.load_blob_metas(&b) {
            Err(_) => {}
            Ok(()) => {
                for c in b.blob_chunks(0).unwrap() {
                    let _ = dir.read_chunk(&b.blobs()[0], &c);
                }
            }
        }
        let dest = dir_path.join("root");
        let _ = unpack(&b, &dir, &dest, &UnpackOptions::for_current_user());
    }
}

#[test]
fn batch_blob_region_too_short_or_missing_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Bootstrap::open(nydus().join(BATCH).join("bootstrap")).unwrap();
    let blob = std::fs::read(
        nydus()
            .join(BATCH)
            .join("blobs")
            .join(&b.blobs()[0].blob_id),
    )
    .unwrap();
    let (off, len) = b.blob_meta_range(0).unwrap();
    // The region cut short, by one byte and by the whole header.
    for cut in [1, 4096, len as usize] {
        let region = &blob[off as usize..(off + len) as usize - cut];
        assert!(b.attach_blob_meta(0, region).is_err(), "cut {cut}");
    }
    // A blob file shorter than its CI table.
    let dir = tmp.path().join("blobs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(&b.blobs()[0].blob_id), &blob[..off as usize + 100]).unwrap();
    let src = LocalBlobDir::new(&dir);
    assert!(src.load_blob_metas(&b).is_err());
    // Without its table, a batched chunk is refused by name, never read from offset 0.
    let ino = b.lookup("/bigdir/entry-00000").unwrap();
    let c = &b.file_chunks(ino, 0, u64::MAX).unwrap()[0];
    assert!(!c.is_located());
    let e = src.read_chunk(&b.blobs()[0], c).unwrap_err();
    assert!(matches!(e, Error::Unlocated { .. }), "{e}");
    assert!(e.to_string().contains("batch"), "{e}");
    let r = check(&b, Some(&src));
    assert!(!r.is_ok());
}

#[test]
fn flipped_batch_bytes_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Bootstrap::open(nydus().join(BATCH).join("bootstrap")).unwrap();
    let id = b.blobs()[0].blob_id.clone();
    let blob = std::fs::read(nydus().join(BATCH).join("blobs").join(&id)).unwrap();
    LocalBlobDir::new(nydus().join(BATCH).join("blobs"))
        .load_blob_metas(&b)
        .unwrap();
    // Every batch, compressed (batch 0) or stored raw (1..3): first, middle and last byte.
    let mut batches: Vec<(u64, u32)> = b
        .blob_chunks(0)
        .unwrap()
        .iter()
        .filter(|c| c.batch.is_some())
        .map(|c| (c.compressed_offset, c.compressed_size))
        .collect();
    batches.sort();
    batches.dedup();
    assert_eq!(batches.len(), 4);
    let dir = tmp.path().join("blobs");
    std::fs::create_dir(&dir).unwrap();
    for (off, size) in batches {
        for at in [off, off + u64::from(size) / 2, off + u64::from(size) - 1] {
            let mut d = blob.clone();
            d[at as usize] ^= 0x21;
            std::fs::write(dir.join(&id), &d).unwrap();
            let fresh = Bootstrap::open(nydus().join(BATCH).join("bootstrap")).unwrap();
            let r = check(&fresh, Some(&LocalBlobDir::new(&dir)));
            assert!(!r.is_ok(), "flipped batch byte {at} not detected");
        }
    }
}

/// Offsets in the inline-meta blob: (TOC entries, image.boot section, its tar header).
fn inline_layout(blob: &[u8]) -> (usize, usize, usize) {
    let tail = shoal_rafs::parse_blob_tail(blob).unwrap();
    let toc = &tail.sections[0];
    let boot = &tail.sections[1];
    assert_eq!(
        (toc.name.as_str(), boot.name.as_str()),
        ("rafs.blob.toc", "image.boot")
    );
    (
        toc.offset as usize,
        boot.offset as usize,
        (boot.offset + boot.size) as usize,
    )
}

/// The bootstrap inlined in `data` (a whole blob held in memory).
fn open_blob_bytes(data: &[u8]) -> Result<Bootstrap, Error> {
    let mut read_at = |off: u64, len: u64| -> Result<Vec<u8>, Error> {
        let end = off.checked_add(len).filter(|&e| e <= data.len() as u64);
        end.map(|e| data[off as usize..e as usize].to_vec())
            .ok_or(Error::OutOfBounds {
                what: "test blob",
                offset: off,
                len,
                limit: data.len() as u64,
            })
    };
    Bootstrap::from_blob_tail(data.len() as u64, &mut read_at, INLINE_ID)?.ok_or(Error::NotRafs {
        reason: "no inlined bootstrap",
    })
}

#[test]
fn inline_meta_blob_opens_with_its_own_id_and_checks_every_chunk() {
    let path = nydus().join(INLINE_BLOB);
    let b = Bootstrap::open(&path).unwrap();
    let i = b.inlined_in().unwrap();
    assert_eq!(i.blob_id, INLINE_ID);
    assert_eq!(i.blob_size, std::fs::metadata(&path).unwrap().len());
    // The builder's placeholder ("xxx…") is replaced in the blob table and the device table.
    assert_eq!(b.blobs()[0].blob_id, INLINE_ID);
    assert_eq!(b.devices()[0].tag, INLINE_ID);
    // The blob given as the bootstrap is also where its chunks are read.
    let r = check_path(&path, None);
    assert!(r.is_ok(), "{r}");
    assert!(r.chunks_verified > 3000, "{r}");
    // A copy not named by a digest gets the file's sha256 (its registry digest) as its id
    // (nydus-image named this one otherwise).
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("layer.blob");
    std::fs::copy(&path, &other).unwrap();
    let b = Bootstrap::open(&other).unwrap();
    let digest = shoal_rafs::build::sha256_digest(&std::fs::read(&other).unwrap());
    assert_eq!(format!("sha256:{}", b.blobs()[0].blob_id), digest);
    assert_ne!(b.blobs()[0].blob_id, INLINE_ID);
    let r = check_path(&other, None);
    assert!(r.is_ok(), "{r}");
}

#[test]
fn inline_meta_tail_changed_gives_errors_not_panics() {
    let original = std::fs::read(nydus().join(INLINE_BLOB)).unwrap();
    let (toc, boot, boot_end) = inline_layout(&original);
    let len = original.len();
    assert!(open_blob_bytes(&original).is_ok());
    // The TOC entry of image.boot is the fifth (128 bytes each).
    let e = toc + 4 * 128;
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("image.boot compressed byte", boot + 1000, vec![0x77]),
        ("image.boot last byte", boot_end - 1, vec![0x77]),
        ("TOC sha256", e + 24, vec![0; 4]),
        ("TOC flags unknown", e, 7u32.to_le_bytes().to_vec()),
        ("TOC flags raw", e, 1u32.to_le_bytes().to_vec()),
        ("TOC offset", e + 56, 7u64.to_le_bytes().to_vec()),
        ("TOC size", e + 64, 9u64.to_le_bytes().to_vec()),
        (
            "TOC uncompressed size huge",
            e + 72,
            u64::MAX.to_le_bytes().to_vec(),
        ),
        (
            "TOC uncompressed size 2 GiB",
            e + 72,
            (2u64 << 30).to_le_bytes().to_vec(),
        ),
        (
            "TOC uncompressed size -1",
            e + 72,
            630_783u64.to_le_bytes().to_vec(),
        ),
        // The image.boot tar header: size field (octal, checksum no longer matches).
        ("tar header size", boot_end + 124, b"77777777777".to_vec()),
        ("tar header name", boot_end, b"image.bool".to_vec()),
        // The TOC's own tar header at the very end.
        (
            "TOC tar header size",
            len - 512 + 124,
            b"00000000000".to_vec(),
        ),
    ];
    for (what, at, bytes) in cases {
        let mut d = original.clone();
        d[at..at + bytes.len()].copy_from_slice(&bytes);
        match open_blob_bytes(&d) {
            Err(_) => {}
            Ok(b) => {
                // Whatever opened must check clean against its own blob, or report.
                let _ = check(&b, None);
                panic!("{what}: a changed inlined bootstrap was accepted");
            }
        }
    }
    // Truncations anywhere in the tail: errors, never panics.
    for cut in [1, 511, 512, 640 + 512, len - boot, len - boot_end + 10] {
        let _ = open_blob_bytes(&original[..len - cut]);
    }
    // Flipped bits in every tar header and TOC byte: no panic.
    for at in (toc..len).step_by(7).chain(boot_end..boot_end + 512) {
        let mut d = original.clone();
        d[at] ^= 0x10;
        let _ = open_blob_bytes(&d).map(|b| check(&b, None));
    }
}

#[test]
fn not_rafs_and_not_inline_names_both() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x");
    std::fs::write(&p, vec![3u8; 20000]).unwrap();
    let e = Bootstrap::open(&p).unwrap_err().to_string();
    assert!(e.contains("inlined bootstrap"), "{e}");
    // A regular data blob (no image.boot in its tail) as the bootstrap is refused the same way.
    let b = Bootstrap::open(nydus().join(BATCH).join("bootstrap")).unwrap();
    let e = Bootstrap::open(
        nydus()
            .join(BATCH)
            .join("blobs")
            .join(&b.blobs()[0].blob_id),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("inlined bootstrap"), "{e}");
}
