//! Blob store lifecycle through the public API: write/commit/read, partial
//! blobs, completion rules, discard, corruption, restart and recovery. Each
//! test is written once over a `Backend` and run for both.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use shoal_node::store::{
    piece_size, Backend, BlobReader, BlobWriter, RepoKey, Store, StoreConfig, StoreError, Verifier,
};
use shoal_proto::{BlobId, Digest};

const KIB: u64 = 1024;
/// Five pieces of 256 KiB, the last one short.
const SIZE: u64 = 1024 * KIB + 123;
const PIECE: u64 = 256 * KIB;

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
    write_commit_read,
    partial_blob_serves_only_committed_ranges,
    complete_refuses_wrong_digest_and_missing_ranges,
    writer_rules,
    discard_deletes,
    corrupt_file_is_detected_and_dropped,
    verified_pieces_are_not_rehashed_until_the_file_changes,
    restart_keeps_complete_and_partial_blobs,
    corrupt_file_is_detected_after_reopen,
    recovery_removes_orphans_and_broken_records,
    repos_are_merged_and_open_is_sticky_per_repository,
    piece_hashes_follow_the_bytes_whatever_the_write_order,
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

/// Deterministic, incompressible-looking bytes.
fn data(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn verified(id: &BlobId, bytes: &[u8]) -> shoal_node::store::VerifiedDigest {
    let mut v = Verifier::new(id);
    v.update(bytes);
    v.finish().expect("bytes match id")
}

/// Writes `bytes` in unaligned chunks, committing each.
fn fill(w: &mut BlobWriter, bytes: &[u8], range: std::ops::Range<u64>) {
    let mut pos = range.start;
    while pos < range.end {
        let end = (pos + 100_003).min(range.end);
        w.write_at(pos, &bytes[pos as usize..end as usize])
            .expect("write");
        w.commit(pos..end).expect("commit");
        pos = end;
    }
}

fn put_complete(store: &Store, bytes: &[u8]) -> BlobId {
    let id = Digest::sha256(bytes);
    let mut w = store.open_writer(&id, bytes.len() as u64).expect("writer");
    fill(&mut w, bytes, 0..bytes.len() as u64);
    w.complete(verified(&id, bytes)).expect("complete");
    id
}

fn read_all(r: &BlobReader) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 77_777];
    loop {
        let n = r.read_at(out.len() as u64, &mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Every piece hash `rec` records is the SHA-256 of that piece of `bytes`.
fn assert_piece_hashes(rec: &shoal_node::store::BlobRecord, bytes: &[u8]) {
    for (i, hash) in rec.piece_sha256.iter().enumerate() {
        let piece = &bytes[i * PIECE as usize..((i as u64 + 1) * PIECE).min(SIZE) as usize];
        assert_eq!(
            hash.as_ref().map(|h| h.as_slice()),
            Some(Digest::sha256(piece).bytes()),
            "piece {i}"
        );
    }
}

/// Flips one byte of a file behind the store's back (like `dd conv=notrunc`).
fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open content");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).expect("read byte");
    f.write_all_at(&[!b[0]], offset).expect("write byte");
}

fn write_commit_read(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(1, SIZE);
    let id = Digest::sha256(&bytes);
    assert!(store.blob(&id).expect("blob").is_none());
    assert!(store.open_reader(&id).expect("reader").is_none());

    let mut w = store.open_writer(&id, SIZE).expect("writer");
    assert_eq!((w.id(), w.size(), w.present().len()), (&id, SIZE, 0));
    fill(&mut w, &bytes, 0..SIZE);
    let rec = w.complete(verified(&id, &bytes)).expect("complete");

    assert!(rec.complete);
    assert_eq!(rec.size, SIZE);
    assert_eq!(rec.piece_size, piece_size(SIZE));
    assert_eq!(rec.present.iter().collect::<Vec<_>>(), vec![0..SIZE]);
    assert_eq!(rec.piece_sha256.len(), 5);
    assert_piece_hashes(&rec, &bytes);
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.blobs, usage.complete), (SIZE, 1, 1));

    let r = store.open_reader(&id).expect("reader").expect("present");
    assert!(r.record().complete);
    assert_eq!(read_all(&r).expect("read"), bytes);
    let mut buf = [0u8; 10];
    assert_eq!(r.read_at(SIZE, &mut buf).expect("eof"), 0);
    assert_eq!(r.read_at(SIZE - 4, &mut buf).expect("tail"), 4);
    assert_eq!(&buf[..4], &bytes[SIZE as usize - 4..]);
    assert_eq!(store.blobs().expect("blobs").len(), 1);
}

/// Piece hashes are taken from the bytes as they are written when a piece is written front to
/// back, and read back from the file otherwise: out-of-order writes, a run broken by another
/// piece's write, and a piece first written with other bytes and then rewritten back to front
/// (whose streamed hash must be forgotten) all record the hashes of the final bytes.
fn piece_hashes_follow_the_bytes_whatever_the_write_order(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(7, SIZE);
    let id = Digest::sha256(&bytes);
    let mut w = store.open_writer(&id, SIZE).expect("writer");
    let put = |w: &mut BlobWriter, r: std::ops::Range<u64>, b: &[u8]| {
        w.write_at(r.start, &b[r.start as usize..r.end as usize])
            .expect("write");
    };
    // Piece 0 front to back in three writes.
    put(&mut w, 0..1000, &bytes);
    put(&mut w, 1000..100_000, &bytes);
    put(&mut w, 100_000..PIECE, &bytes);
    // Piece 1: half, then all of piece 3, then the rest of 1 (its run broken).
    put(&mut w, PIECE..PIECE + 500, &bytes);
    put(&mut w, 3 * PIECE..4 * PIECE, &bytes);
    put(&mut w, PIECE + 500..2 * PIECE, &bytes);
    // Piece 2: whole with other bytes (streamed), then the right bytes back half first.
    let other = data(8, SIZE);
    put(&mut w, 2 * PIECE..3 * PIECE, &other);
    put(&mut w, 2 * PIECE + PIECE / 2..3 * PIECE, &bytes);
    put(&mut w, 2 * PIECE..2 * PIECE + PIECE / 2, &bytes);
    // Piece 4 (short) with a rewrite of its middle, same bytes.
    put(&mut w, 4 * PIECE..SIZE, &bytes);
    put(&mut w, 4 * PIECE + 10..4 * PIECE + 20, &bytes);
    w.commit(0..SIZE).expect("commit");
    let rec = w.complete(verified(&id, &bytes)).expect("complete");
    assert_piece_hashes(&rec, &bytes);
    let r = store.open_reader(&id).expect("reader").expect("present");
    assert_eq!(read_all(&r).expect("every piece verifies"), bytes);
}

fn partial_blob_serves_only_committed_ranges(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(2, SIZE);
    let id = Digest::sha256(&bytes);
    let mut w = store.open_writer(&id, SIZE).expect("writer");
    w.write_at(0, &bytes).expect("write everything");
    w.commit(0..300 * KIB).expect("commit head");
    w.commit(600 * KIB..700 * KIB).expect("commit middle");

    // Uncommitted bytes are readable only through the raw reader.
    let raw = w.raw_reader().expect("raw");
    let mut buf = vec![0u8; 1000];
    assert_eq!(
        raw.read_full_at(400 * KIB, &mut buf).expect("raw read"),
        1000
    );
    assert_eq!(buf, bytes[400 * KIB as usize..400 * KIB as usize + 1000]);

    let rec = store.blob(&id).expect("blob").expect("record");
    assert!(!rec.complete);
    assert_eq!(
        rec.present.iter().collect::<Vec<_>>(),
        vec![0..300 * KIB, 600 * KIB..700 * KIB]
    );
    // Piece 0 is full (hashed), pieces 1 and 2 only partly present.
    assert!(rec.piece_sha256[0].is_some());
    assert!(rec.piece_sha256[1..].iter().all(Option::is_none));
    assert_eq!(store.usage().bytes, 400 * KIB);

    let r = store.open_reader(&id).expect("reader").expect("present");
    let mut buf = vec![0u8; 400 * KIB as usize];
    // Short read: stops at the end of the committed run.
    assert_eq!(r.read_at(0, &mut buf).expect("head"), 300 * KIB as usize);
    assert_eq!(buf[..300 * KIB as usize], bytes[..300 * KIB as usize]);
    assert!(matches!(
        r.read_at(300 * KIB, &mut buf),
        Err(StoreError::NotPresent { offset, .. }) if offset == 300 * KIB
    ));
    assert_eq!(
        r.read_at(650 * KIB, &mut buf[..1000]).expect("middle"),
        1000
    );
    assert_eq!(
        buf[..1000],
        bytes[650 * KIB as usize..650 * KIB as usize + 1000]
    );
    assert!(r.read_at(700 * KIB, &mut buf).is_err());
}

fn complete_refuses_wrong_digest_and_missing_ranges(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(3, SIZE);
    let id = Digest::sha256(&bytes);

    // The verifier refuses bytes that are not the blob.
    let mut v = Verifier::new(&id);
    v.update(&bytes[1..]);
    assert!(v.finish().is_err());

    let mut w = store.open_writer(&id, SIZE).expect("writer");
    fill(&mut w, &bytes, 0..SIZE - 1);
    let err = w
        .complete(verified(&id, &bytes))
        .expect_err("one byte missing");
    assert!(
        matches!(err, StoreError::Incomplete { missing: 1, .. }),
        "{err:?}"
    );

    // The partial blob survived; resume it.
    let mut w = store.open_writer(&id, SIZE).expect("resume");
    assert_eq!(w.present().len(), SIZE - 1);
    fill(&mut w, &bytes, SIZE - 1..SIZE);
    let other = data(4, 10);
    let err = w
        .complete(verified(&Digest::sha256(&other), &other))
        .expect_err("digest of another blob");
    assert!(matches!(err, StoreError::WrongDigest { .. }), "{err:?}");
    assert!(!store.blob(&id).expect("blob").expect("record").complete);

    let w = store.open_writer(&id, SIZE).expect("resume");
    assert!(
        w.complete(verified(&id, &bytes))
            .expect("complete")
            .complete
    );
}

fn writer_rules(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(5, 1000);
    let id = Digest::sha256(&bytes);
    let mut w = store.open_writer(&id, 1000).expect("writer");
    assert!(matches!(
        store.open_writer(&id, 1000),
        Err(StoreError::WriterBusy { .. })
    ));
    assert!(matches!(
        w.write_at(999, b"xy"),
        Err(StoreError::OutOfBounds { .. })
    ));
    assert!(matches!(
        w.write_at(u64::MAX, b"x"),
        Err(StoreError::OutOfBounds { .. })
    ));
    assert!(matches!(
        w.commit(0..1001),
        Err(StoreError::OutOfBounds { .. })
    ));
    drop(w);
    assert!(matches!(
        store.open_writer(&id, 999),
        Err(StoreError::SizeMismatch {
            recorded: 1000,
            requested: 999,
            ..
        })
    ));
    assert!(matches!(
        store.open_writer(&id, 1 << 50),
        Err(StoreError::TooLarge { .. })
    ));
    put_complete(&store, &bytes);
    assert!(matches!(
        store.open_writer(&id, 1000),
        Err(StoreError::AlreadyComplete { .. })
    ));

    // An empty blob is complete with nothing written.
    let empty = Digest::sha256(b"");
    let w = store.open_writer(&empty, 0).expect("writer");
    assert!(
        w.complete(verified(&empty, b""))
            .expect("complete")
            .complete
    );
    let r = store.open_reader(&empty).expect("reader").expect("present");
    assert_eq!(read_all(&r).expect("read"), b"");
}

fn discard_deletes(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(6, SIZE);
    let id = Digest::sha256(&bytes);
    let mut w = store.open_writer(&id, SIZE).expect("writer");
    fill(&mut w, &bytes, 0..SIZE / 2);
    let path = store.content_path(&id);
    assert!(path.exists());
    w.discard().expect("discard");
    assert!(!path.exists());
    assert!(store.blob(&id).expect("blob").is_none());
    assert_eq!(store.usage().blobs, 0);
    // And it can be fetched again from scratch.
    let w = store.open_writer(&id, SIZE).expect("writer again");
    assert!(w.present().is_empty());
}

fn corrupt_file_is_detected_and_dropped(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(7, SIZE);
    let id = put_complete(&store, &bytes);
    let path = store.content_path(&id);
    let r = store.open_reader(&id).expect("reader").expect("present");
    assert_eq!(read_all(&r).expect("clean read"), bytes);
    drop(r);

    flip_byte(&path, 2 * PIECE + 17);
    let r = store.open_reader(&id).expect("reader").expect("present");
    let mut buf = vec![0u8; 1000];
    // Other pieces still read fine ...
    assert_eq!(r.read_at(0, &mut buf).expect("piece 0"), 1000);
    // ... a one-byte read of the damaged piece is refused.
    let err = r
        .read_at(2 * PIECE + 500, &mut buf[..1])
        .expect_err("corrupt");
    assert!(
        matches!(err, StoreError::Corrupt { piece: 2, .. }),
        "{err:?}"
    );
    drop(r);
    assert!(store.blob(&id).expect("blob").is_none());
    assert!(store.open_reader(&id).expect("reader").is_none());
    assert!(!path.exists());
    assert_eq!(store.stats().corrupt_dropped, 1);
    // Refetch works.
    assert_eq!(put_complete(&store, &bytes), id);
}

fn verified_pieces_are_not_rehashed_until_the_file_changes(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend);
    let bytes = data(8, SIZE);
    let id = put_complete(&store, &bytes);
    let path = store.content_path(&id);
    // Age the file so its timestamps are settled (see `reader`).
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .expect("set mtime");
    drop(file);

    let before = store.stats().pieces_verified;
    let r = store.open_reader(&id).expect("reader").expect("present");
    assert_eq!(read_all(&r).expect("read"), bytes);
    assert_eq!(store.stats().pieces_verified - before, 5);
    // Same reader and a new reader: nothing hashed again.
    assert_eq!(read_all(&r).expect("read"), bytes);
    drop(r);
    let r = store.open_reader(&id).expect("reader").expect("present");
    assert_eq!(read_all(&r).expect("read"), bytes);
    assert_eq!(store.stats().pieces_verified - before, 5);
    drop(r);

    // A write behind the store's back changes the mtime: verified again.
    flip_byte(&path, 4 * PIECE + 1);
    let r = store.open_reader(&id).expect("reader").expect("present");
    let err = read_all(&r).expect_err("corrupt");
    assert!(
        matches!(err, StoreError::Corrupt { piece: 4, .. }),
        "{err:?}"
    );
}

fn restart_keeps_complete_and_partial_blobs(backend: Backend) {
    if backend == Backend::Memory {
        // n/a: the memory backend forgets its metadata on drop by design.
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let full = data(9, SIZE);
    let part = data(10, SIZE);
    let part_id = Digest::sha256(&part);
    let full_id = {
        let store = open(dir.path(), backend);
        let full_id = put_complete(&store, &full);
        let mut w = store.open_writer(&part_id, SIZE).expect("writer");
        fill(&mut w, &part, 0..300 * KIB);
        // Written but never committed: must not be claimed after reopen.
        w.write_at(300 * KIB, &part[300 * KIB as usize..600 * KIB as usize])
            .expect("write");
        store.flush().expect("flush");
        full_id
    };
    let store = open(dir.path(), backend);
    let rec = store
        .blob(&full_id)
        .expect("blob")
        .expect("complete blob kept");
    assert!(rec.complete);
    let r = store
        .open_reader(&full_id)
        .expect("reader")
        .expect("present");
    assert_eq!(read_all(&r).expect("read"), full);

    let rec = store
        .blob(&part_id)
        .expect("blob")
        .expect("partial blob kept");
    assert!(!rec.complete);
    assert_eq!(rec.present.iter().collect::<Vec<_>>(), vec![0..300 * KIB]);
    assert_eq!(store.usage().bytes, SIZE + 300 * KIB);
    let mut w = store.open_writer(&part_id, SIZE).expect("resume");
    assert_eq!(w.present().iter().collect::<Vec<_>>(), vec![0..300 * KIB]);
    fill(&mut w, &part, 300 * KIB..SIZE);
    w.complete(verified(&part_id, &part)).expect("complete");
    let r = store
        .open_reader(&part_id)
        .expect("reader")
        .expect("present");
    assert_eq!(read_all(&r).expect("read"), part);
}

fn corrupt_file_is_detected_after_reopen(backend: Backend) {
    if backend == Backend::Memory {
        // n/a: nothing survives a reopen with the memory backend.
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = data(11, SIZE);
    let (id, path) = {
        let store = open(dir.path(), backend);
        let id = put_complete(&store, &bytes);
        let r = store.open_reader(&id).expect("reader").expect("present");
        assert_eq!(read_all(&r).expect("read"), bytes);
        (id.clone(), store.content_path(&id))
    };
    flip_byte(&path, 3);
    let store = open(dir.path(), backend);
    let r = store
        .open_reader(&id)
        .expect("reader")
        .expect("kept until read");
    let err = read_all(&r).expect_err("corrupt");
    assert!(
        matches!(err, StoreError::Corrupt { piece: 0, .. }),
        "{err:?}"
    );
    drop(r);
    assert!(store.blob(&id).expect("blob").is_none());
    drop(store);
    let store = open(dir.path(), backend);
    assert!(store.blob(&id).expect("blob").is_none());
    assert!(!path.exists());
}

fn recovery_removes_orphans_and_broken_records(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kept = data(12, SIZE);
    let gone = data(13, SIZE);
    let short = data(14, SIZE);
    let orphan_id = Digest::sha256(b"never recorded");
    let (kept_id, gone_id, short_id, orphan_path, junk_path) = {
        let store = open(dir.path(), backend);
        let kept_id = put_complete(&store, &kept);
        let gone_id = put_complete(&store, &gone);
        let short_id = put_complete(&store, &short);
        let orphan_path = store.content_path(&orphan_id);
        std::fs::write(&orphan_path, b"stray bytes").expect("orphan");
        let junk_path = orphan_path.with_file_name("not-a-digest");
        std::fs::write(&junk_path, b"junk").expect("junk");
        std::fs::remove_file(store.content_path(&gone_id)).expect("delete behind its back");
        let f = OpenOptions::new()
            .write(true)
            .open(store.content_path(&short_id))
            .expect("open");
        f.set_len(SIZE / 2).expect("truncate");
        (kept_id, gone_id, short_id, orphan_path, junk_path)
    };
    let store = open(dir.path(), backend);
    assert!(!orphan_path.exists());
    assert!(!junk_path.exists());
    if backend == Backend::Memory {
        // No metadata survived, so every content file was an orphan.
        assert!(!store.content_path(&kept_id).exists());
        assert_eq!(store.usage().blobs, 0);
        return;
    }
    assert!(store.blob(&gone_id).expect("blob").is_none());
    assert!(store.blob(&short_id).expect("blob").is_none());
    assert!(!store.content_path(&short_id).exists());
    let r = store.open_reader(&kept_id).expect("reader").expect("kept");
    assert_eq!(read_all(&r).expect("read"), kept);
    assert_eq!(store.usage().blobs, 1);
}

fn repos_are_merged_and_open_is_sticky_per_repository(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = data(15, 1000);
    let id = Digest::sha256(&bytes);
    let repo = |upstream: &str, name: &str| RepoKey {
        upstream: upstream.to_owned(),
        repo: name.parse().expect("repo"),
    };
    {
        let store = open(dir.path(), backend);
        assert!(matches!(
            store.add_repo(&id, repo("docker.io", "library/x"), true),
            Err(StoreError::NotFound { .. })
        ));
        put_complete(&store, &bytes);
        store
            .add_repo(&id, repo("ghcr.io", "org/private"), false)
            .expect("add");
        let private = repo("ghcr.io", "org/private");
        let rec = store.blob(&id).expect("blob").expect("rec");
        assert!(rec.repos.contains(&private) && !rec.repos.is_open(&private));
        store
            .add_repo(&id, repo("docker.io", "library/x"), true)
            .expect("add");
        store
            .add_repo(&id, repo("docker.io", "library/x"), false)
            .expect("add again");
        let r = store.open_reader(&id).expect("reader").expect("present");
        let rec = r.record();
        assert!(
            rec.repos.is_open(&repo("docker.io", "library/x")),
            "open is sticky per repository"
        );
        assert!(
            !rec.repos.is_open(&private),
            "open in one repository opens no other"
        );
        assert_eq!(rec.repos.len(), 2);
    }
    if backend == Backend::RocksDb {
        let store = open(dir.path(), backend);
        let rec = store.blob(&id).expect("blob").expect("rec");
        assert!(rec.repos.is_open(&repo("docker.io", "library/x")));
        assert!(!rec.repos.is_open(&repo("ghcr.io", "org/private")));
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<BlobReader>();
    check::<BlobWriter>();
    check::<shoal_node::store::PinGuard>();
}

/// A reader following a writer on another thread only ever sees committed,
/// correct bytes, and sees them all in the end.
#[test]
fn readers_follow_a_concurrent_writer() {
    for backend in [Backend::Memory, Backend::RocksDb] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), backend);
        let bytes = std::sync::Arc::new(data(16, SIZE));
        let id = Digest::sha256(&bytes);
        let mut w = store.open_writer(&id, SIZE).expect("writer");
        let writer = {
            let (bytes, id) = (std::sync::Arc::clone(&bytes), id.clone());
            std::thread::spawn(move || {
                let mut pos = 0;
                while pos < SIZE {
                    let end = (pos + 64 * KIB).min(SIZE);
                    w.write_at(pos, &bytes[pos as usize..end as usize])
                        .expect("write");
                    w.commit(pos..end).expect("commit");
                    pos = end;
                }
                w.complete(verified(&id, &bytes)).expect("complete");
            })
        };
        let mut r = loop {
            if let Some(r) = store.open_reader(&id).expect("reader") {
                break r;
            }
        };
        loop {
            r.refresh().expect("refresh");
            let rec = r.record().clone();
            for run in rec.present.iter() {
                let mut buf = vec![0u8; (run.end - run.start) as usize];
                let mut got = 0;
                while got < buf.len() {
                    got += r
                        .read_at(run.start + got as u64, &mut buf[got..])
                        .expect("read");
                }
                assert_eq!(buf, bytes[run.start as usize..run.end as usize]);
            }
            if rec.complete {
                break;
            }
        }
        writer.join().expect("writer thread");
    }
}
