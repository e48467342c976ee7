//! Real FUSE mounts of the nydus fixtures: the mounted tree lists exactly like the source tree,
//! errno values are the documented ones, concurrent readers get the right bytes and are not held
//! up by one slow chunk, failing or corrupted chunks make read(2) fail with EIO while the rest of
//! the image reads fine, and unmounting leaves nothing behind.
//!
//! Needs root and /dev/fuse (CI provides both); otherwise each test prints `SKIP <test>: <why>`.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use shoal_rafs::fuse::{self, FuseMount, FuseOptions};
use shoal_rafs::{
    walk, BlobInfo, Bootstrap, ChunkRef, ChunkSource, Error, FileType, LocalBlobDir, VerifiedChunk,
};

// errno values (Linux).
const ENOENT: i32 = 2;
const EIO: i32 = 5;
const ENOTDIR: i32 = 20;
const EISDIR: i32 = 21;
const EINVAL: i32 = 22;
const EROFS: i32 = 30;
const ERANGE: i32 = 34;
const ENODATA: i32 = 61;

struct Case {
    name: &'static str,
    bootstrap: &'static str,
    blob_dirs: &'static [&'static str],
    listing: &'static str,
}

const TREE_A: &str = "source/treeA.listing.jsonl";
const CASES: &[Case] = &[
    Case {
        name: "a-v6-zstd-blake3-1m",
        bootstrap: "built/a-v6-zstd-blake3-1m/bootstrap",
        blob_dirs: &["built/a-v6-zstd-blake3-1m/blobs"],
        listing: TREE_A,
    },
    Case {
        name: "a-v6-lz4-sha256-1m",
        bootstrap: "built/a-v6-lz4-sha256-1m/bootstrap",
        blob_dirs: &["built/a-v6-lz4-sha256-1m/blobs"],
        listing: TREE_A,
    },
    Case {
        name: "a-v6-none-blake3-64k",
        bootstrap: "built/a-v6-none-blake3-64k/bootstrap",
        blob_dirs: &["built/a-v6-none-blake3-64k/blobs"],
        listing: TREE_A,
    },
    Case {
        name: "a-v5-lz4-blake3-1m",
        bootstrap: "built/a-v5-lz4-blake3-1m/bootstrap",
        blob_dirs: &["built/a-v5-lz4-blake3-1m/blobs"],
        listing: TREE_A,
    },
    Case {
        name: "ab-v6-merged",
        bootstrap: "built/ab-v6-merged/bootstrap",
        blob_dirs: &[
            "built/b-v6-zstd-blake3-1m/blobs",
            "built/a-v6-zstd-blake3-1m/blobs",
        ],
        listing: "source/treeB.listing.jsonl",
    },
    Case {
        name: "upstream rafs-v6-2.2",
        bootstrap: "upstream/bootstrap/rafs-v6-2.2.boot",
        blob_dirs: &["upstream/blobs"],
        listing: "upstream/bootstrap/rafs-v6-2.2.boot.listing.jsonl",
    },
    Case {
        name: "upstream v5 sha256-none",
        bootstrap: "upstream/repeatable/sha256-nocompress-repeatable",
        blob_dirs: &["upstream/repeatable/blobs"],
        listing: "upstream/repeatable/sha256-nocompress-repeatable.listing.jsonl",
    },
    Case {
        name: "a-v6-zstd-blake3-batch",
        bootstrap: "built/a-v6-zstd-blake3-batch/bootstrap",
        blob_dirs: &["built/a-v6-zstd-blake3-batch/blobs"],
        listing: TREE_A,
    },
    Case {
        name: "a-v6-zstd-inline-meta (the data blob as the bootstrap)",
        bootstrap: "built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3",
        blob_dirs: &["built/a-v6-zstd-inline-meta/blobs"],
        listing: TREE_A,
    },
];

const ZSTD_1M: &Case = &CASES[0];
const NONE_64K: &Case = &CASES[2];
const BATCH: &Case = &CASES[7];

// ---------------------------------------------------------------------------------------------
// Harness

/// Whether FUSE tests can run here; prints the reason when not.
fn fuse_ready(test: &str) -> bool {
    if !is_root() {
        skip(test, "needs root (owners, device nodes, allow_other)");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        skip(test, &format!("cannot open /dev/fuse: {e}"));
        return false;
    }
    true
}

/// Whether `dir` is a mount point in this process's namespace.
fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

fn mount_line(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
        .unwrap_or_default()
        .to_string()
}

/// A mount in a temporary directory that is unmounted (lazily if need be) however the test ends.
struct Mounted {
    mount: Option<FuseMount>,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mounted {
    fn new(
        bootstrap: Arc<Bootstrap>,
        source: Arc<dyn ChunkSource + Send + Sync>,
        opts: &FuseOptions,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let mount = fuse::mount(bootstrap, source, &dir, opts).unwrap();
        let dir = mount.dir().to_path_buf();
        assert!(
            is_mounted(&dir),
            "{} not in /proc/self/mounts",
            dir.display()
        );
        Mounted {
            mount: Some(mount),
            dir,
            _tmp: tmp,
        }
    }

    fn case(case: &Case, opts: &FuseOptions) -> (Self, Arc<Bootstrap>) {
        let b = Arc::new(Bootstrap::open(nydus().join(case.bootstrap)).unwrap());
        let src = source(case);
        src.load_blob_metas(&b).unwrap();
        (Self::new(b.clone(), Arc::new(src), opts), b)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    fn mount(&self) -> &FuseMount {
        self.mount.as_ref().unwrap()
    }

    /// Unmount now and check nothing is left.
    fn unmount(mut self) {
        self.mount.take().unwrap().unmount().unwrap();
        assert!(
            !is_mounted(&self.dir),
            "{} still mounted",
            self.dir.display()
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            if let Err(e) = m.unmount() {
                eprintln!("cleanup of {}: {e}", self.dir.display());
            }
        }
        if is_mounted(&self.dir) {
            let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
            eprintln!(
                "{} had to be detached by the test guard",
                self.dir.display()
            );
        }
    }
}

fn source(case: &Case) -> LocalBlobDir {
    LocalBlobDir::with_dirs(case.blob_dirs.iter().map(|d| nydus().join(d)))
}

/// A file's bytes straight from the image (no FUSE), for comparison.
fn image_bytes(b: &Bootstrap, src: &dyn ChunkSource, path: &str) -> Vec<u8> {
    let ino = b.lookup(path).unwrap();
    let mut out = vec![0u8; b.getattr(ino).unwrap().size as usize];
    for c in b.file_chunks(ino, 0, u64::MAX).unwrap() {
        let d = src.read_chunk(b.blob(c.blob_index).unwrap(), &c).unwrap();
        out[c.file_offset as usize..c.file_offset as usize + d.len()].copy_from_slice(&d);
    }
    out
}

/// Every regular file of the image with its chunk list.
fn files_with_chunks(b: &Bootstrap) -> Vec<(String, Vec<ChunkRef>)> {
    let mut out = Vec::new();
    walk(b, |e| {
        if e.attr.file_type == FileType::File {
            let path = format!("/{}", String::from_utf8_lossy(&e.path));
            out.push((path, b.file_chunks(e.inode, 0, u64::MAX)?));
        }
        Ok(())
    })
    .unwrap();
    out
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Expected sha256 of every file, from the listing.
fn expected_digests(case: &Case) -> std::collections::BTreeMap<String, String> {
    load_listing(&nydus().join(case.listing))
        .into_iter()
        .filter(|e| e["type"] == "file")
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Drop the page cache of a file so the next read goes to the filesystem again.
fn drop_cache(f: &File) {
    rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

// ---------------------------------------------------------------------------------------------
// Sources for failure tests

/// Fails every read of one chunk, as a backend that is down would.
struct FailOn {
    inner: LocalBlobDir,
    chunk: (u32, u32),
}

impl ChunkSource for FailOn {
    fn read_chunk(&self, blob: &BlobInfo, c: &ChunkRef) -> shoal_rafs::Result<VerifiedChunk> {
        if (c.blob_index, c.ci_index) == self.chunk {
            return Err(Error::Io {
                path: PathBuf::from("origin"),
                source: std::io::Error::from(ErrorKind::ConnectionRefused),
            });
        }
        self.inner.read_chunk(blob, c)
    }
}

/// Holds reads of one chunk until released.
struct Gated {
    inner: LocalBlobDir,
    chunk: (u32, u32),
    entered: AtomicBool,
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gated {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl ChunkSource for Gated {
    fn read_chunk(&self, blob: &BlobInfo, c: &ChunkRef) -> shoal_rafs::Result<VerifiedChunk> {
        if (c.blob_index, c.ci_index) == self.chunk {
            self.entered.store(true, Relaxed);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        self.inner.read_chunk(blob, c)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_fixture_mounts_and_lists_like_its_source_tree() {
    if !fuse_ready("every_fixture_mounts_and_lists_like_its_source_tree") {
        return;
    }
    for case in CASES {
        let (m, _) = Mounted::case(case, &FuseOptions::default());
        let actual = listing(&m.dir);
        let expected = load_listing(&nydus().join(case.listing));
        assert_same_listing(case.name, &actual, &expected);
        let line = mount_line(&m.dir);
        assert!(line.starts_with("shoal "), "{line}");
        assert!(line.contains(" fuse.shoal ro,"), "{line}");
        assert!(line.contains(",default_permissions,allow_other"), "{line}");
        m.unmount();
    }
}

#[test]
fn metadata_and_errno_are_exact() {
    if !fuse_ready("metadata_and_errno_are_exact") {
        return;
    }
    let (m, _) = Mounted::case(ZSTD_1M, &FuseOptions::default());
    let p = |r: &str| m.path(r);

    // Hardlinks share an inode; special files and mode bits are as in the image.
    let a = std::fs::symlink_metadata(p("/links/hard_a")).unwrap();
    let b = std::fs::symlink_metadata(p("/links/hard_b")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 3));
    assert_eq!(
        std::fs::metadata(p("/meta/setuid")).unwrap().mode() & 0o4000,
        0o4000
    );
    let null = std::fs::symlink_metadata(p("/dev/null")).unwrap();
    assert_eq!(
        (
            rustix::fs::major(null.rdev()),
            rustix::fs::minor(null.rdev())
        ),
        (1, 3)
    );
    let listed = load_listing(&nydus().join(ZSTD_1M.listing));
    for e in listed.iter().filter(|e| e["type"] == "symlink") {
        let path = e["path"].as_str().unwrap();
        let target = std::fs::read_link(p(path)).unwrap();
        assert_eq!(target.to_str(), e["target"].as_str(), "{path}");
    }
    assert_eq!(std::fs::metadata(&m.dir).unwrap().ino(), 1);

    // Lookups.
    // Twice: the second answer comes from the kernel's negative-entry cache.
    for _ in 0..2 {
        assert_eq!(errno_of(std::fs::metadata(p("/nope"))), Some(ENOENT));
    }
    assert_eq!(errno_of(std::fs::metadata(p("/sizes/f1/x"))), Some(ENOTDIR));
    assert_eq!(errno_of(std::fs::read_dir(p("/sizes/f1"))), Some(ENOTDIR));
    assert_eq!(errno_of(std::fs::read(p("/sizes"))), Some(EISDIR));
    assert_eq!(errno_of(std::fs::read_link(p("/sizes/f1"))), Some(EINVAL));

    // Writes of every kind.
    let erofs = Some(EROFS);
    assert_eq!(errno_of(File::create(p("/new"))), erofs);
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().write(true).open(p("/sizes/f1"))),
        erofs
    );
    assert_eq!(errno_of(std::fs::create_dir(p("/d"))), erofs);
    assert_eq!(errno_of(std::fs::remove_file(p("/sizes/f1"))), erofs);
    assert_eq!(errno_of(std::fs::rename(p("/sizes/f1"), p("/x"))), erofs);
    assert_eq!(
        errno_of(std::fs::set_permissions(
            p("/sizes/f1"),
            std::fs::Permissions::from_mode(0o777)
        )),
        erofs
    );
    assert_eq!(
        errno_of(
            rustix::fs::lsetxattr(
                p("/xattr/user"),
                "user.x",
                b"1",
                rustix::fs::XattrFlags::empty()
            )
            .map_err(std::io::Error::from)
        ),
        erofs
    );

    // Xattrs: size query, exact read, ERANGE for a short buffer, ENODATA if missing.
    let x = p("/xattr/user");
    assert_eq!(
        rustix::fs::lgetxattr_query(&x, "user.shoal.test").unwrap(),
        5
    );
    let mut buf = [0u8; 5];
    assert_eq!(
        rustix::fs::lgetxattr(&x, "user.shoal.test", &mut buf).unwrap(),
        5
    );
    assert_eq!(&buf, b"hello");
    let mut short = [0u8; 2];
    let e = rustix::fs::lgetxattr(&x, "user.shoal.test", &mut short).unwrap_err();
    assert_eq!(e.raw_os_error(), ERANGE);
    let e = rustix::fs::lgetxattr(&x, "user.missing", &mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), ENODATA);
    let names_len = rustix::fs::llistxattr_query(&x).unwrap();
    assert!(names_len > 0);
    let mut short = vec![0u8; names_len - 1];
    let e = rustix::fs::llistxattr(&x, &mut short).unwrap_err();
    assert_eq!(e.raw_os_error(), ERANGE);

    // statfs: a read-only FUSE filesystem with the image's size and inode count.
    let st = rustix::fs::statvfs(&m.dir).unwrap();
    assert!(st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
    assert!(
        st.f_blocks > 0 && st.f_files > 3000,
        "{} {}",
        st.f_blocks,
        st.f_files
    );
    let fs = rustix::fs::statfs(&m.dir).unwrap();
    assert_eq!(fs.f_type as i64, 0x6573_5546); // FUSE_SUPER_MAGIC

    // Readahead raised to 1 MiB through the mount's backing device.
    let dev = std::fs::metadata(&m.dir).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    assert_eq!(std::fs::read_to_string(knob).unwrap().trim(), "1024");

    // Readdir of a 3,000-entry directory, twice (second from the kernel's cache).
    for _ in 0..2 {
        assert_eq!(std::fs::read_dir(p("/bigdir")).unwrap().count(), 3000);
    }
    m.unmount();
}

#[test]
fn concurrent_readers_get_correct_bytes() {
    if !fuse_ready("concurrent_readers_get_correct_bytes") {
        return;
    }
    // A small cache, few workers and a short queue: reads also run inline and evict each other.
    let opts = FuseOptions {
        read_workers: 3,
        read_queue: 2,
        chunk_cache_bytes: 1 << 20,
        ..Default::default()
    };
    for case in [NONE_64K, ZSTD_1M] {
        let (m, b) = Mounted::case(case, &opts);
        let src = source(case);
        let shared = [
            "/sizes/compressible_3.5MiB",
            "/dedup/one",
            "/sizes/f1048577",
        ];
        let refs: Arc<Vec<(PathBuf, Vec<u8>)>> = Arc::new(
            shared
                .iter()
                .chain(["/dedup/sub/three", "/change/modified", "/sizes/f4097"].iter())
                .map(|f| (m.path(f), image_bytes(&b, &src, f)))
                .collect(),
        );
        let digests = expected_digests(case);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let refs = refs.clone();
                let bigdir = m.path("/bigdir");
                let digests = digests.clone();
                std::thread::spawn(move || {
                    let mut seed = 0x9e37_79b9_u64.wrapping_mul(t + 1);
                    for round in 0..4 {
                        // The same files at pseudo-random offsets and sizes ...
                        for (path, want) in refs.iter() {
                            let f = File::open(path).unwrap();
                            drop_cache(&f);
                            for _ in 0..6 {
                                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                                let off = (seed >> 20) % (want.len() as u64 + 1);
                                let len = ((seed >> 8) % (300 << 10)) as usize + 1;
                                let mut buf = vec![0u8; len];
                                let n = read_full_at(&f, &mut buf, off);
                                let end = (off as usize + len).min(want.len());
                                assert_eq!(n, end - off as usize, "{path:?}@{off}");
                                assert!(
                                    buf[..n] == want[off as usize..end],
                                    "{path:?}@{off}+{len}"
                                );
                            }
                        }
                        // ... and different files per thread.
                        for i in 0..40 {
                            let name =
                                format!("entry-{:05}", (t as usize * 40 + i + round * 7) % 3000);
                            let data = std::fs::read(bigdir.join(&name)).unwrap();
                            assert_eq!(sha256_hex(&data), digests[&format!("/bigdir/{name}")]);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Counted after the unmount: the kernel may still have a readahead
        // request in flight when the readers are done.
        let stats = m.mount().stats().clone();
        m.unmount();
        let s = stats.snapshot();
        assert!(
            s.reads > 0 && s.read_bytes > 0 && s.chunks_fetched > 0,
            "{s:?}"
        );
        assert_eq!(s.read_errors, 0);
        assert_eq!(s.read_latency.count, s.reads);
        assert!(s.chunk_cache_hits > 0, "{s:?}");
        eprintln!("{}: {s:?}", case.name);
    }
}

/// With a directory for decoded chunks and no room in memory, a second pass over the files reads
/// every chunk back from the decoded files — nothing from the source — byte for byte the image's,
/// batch chunks included; the directory goes with the mount.
#[test]
fn decoded_files_serve_warm_reads_without_the_source() {
    if !fuse_ready("decoded_files_serve_warm_reads_without_the_source") {
        return;
    }
    for case in [ZSTD_1M, NONE_64K, BATCH] {
        let tmp = tempfile::tempdir().unwrap();
        let decoded = tmp.path().join("decoded");
        let opts = FuseOptions {
            chunk_cache_bytes: 0,
            decoded_dir: Some(decoded.clone()),
            ..Default::default()
        };
        let (m, b) = Mounted::case(case, &opts);
        let src = source(case);
        let files = [
            "/sizes/compressible_3.5MiB",
            "/sizes/f1048577",
            "/sizes/f4097",
            "/dedup/one",
            "/change/modified",
        ];
        let want: Vec<Vec<u8>> = files.iter().map(|f| image_bytes(&b, &src, f)).collect();
        let pass = |m: &Mounted| {
            for (f, want) in files.iter().zip(&want) {
                let file = File::open(m.path(f)).unwrap();
                drop_cache(&file);
                let mut got = Vec::new();
                (&file).read_to_end(&mut got).unwrap();
                assert!(got == *want, "{}: {f} differs", case.name);
            }
        };
        pass(&m);
        let first = m.mount().stats().snapshot();
        assert!(decoded.is_dir(), "{}: no decoded files", case.name);
        pass(&m);
        let second = m.mount().stats().snapshot();
        assert_eq!(
            second.chunks_fetched, first.chunks_fetched,
            "{}: the second pass went to the source",
            case.name
        );
        assert!(
            second.chunk_decoded_hits > first.chunk_decoded_hits,
            "{}: {second:?}",
            case.name
        );
        assert_eq!(second.read_errors, 0);
        m.unmount();
        assert!(
            !decoded.exists(),
            "{}: decoded files outlived the mount",
            case.name
        );
    }
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

#[test]
fn a_slow_chunk_does_not_block_other_readers() {
    if !fuse_ready("a_slow_chunk_does_not_block_other_readers") {
        return;
    }
    let case = ZSTD_1M;
    let b = Arc::new(Bootstrap::open(nydus().join(case.bootstrap)).unwrap());
    let slow_file = "/sizes/compressible_3.5MiB";
    let slow = b
        .file_chunks(b.lookup(slow_file).unwrap(), 0, u64::MAX)
        .unwrap()[0]
        .clone();
    let gated = Arc::new(Gated {
        inner: source(case),
        chunk: (slow.blob_index, slow.ci_index),
        entered: AtomicBool::new(false),
        open: Mutex::new(false),
        cv: Condvar::new(),
    });
    // One FUSE thread: only the worker pool can keep the mount responsive.
    let opts = FuseOptions {
        fuse_threads: 1,
        read_workers: 4,
        ..Default::default()
    };
    let m = Mounted::new(b.clone(), gated.clone(), &opts);
    let stuck = {
        let path = m.path(slow_file);
        std::thread::spawn(move || std::fs::read(path).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gated.entered.load(Relaxed) {
        assert!(
            Instant::now() < deadline,
            "the gated chunk was never requested"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // While that read hangs, other files (not sharing the gated chunk) read and list fine.
    let gated_files: BTreeSet<String> = files_with_chunks(&b)
        .into_iter()
        .filter(|(_, cs)| cs.iter().any(|c| (c.blob_index, c.ci_index) == gated.chunk))
        .map(|(p, _)| p)
        .collect();
    let digests = expected_digests(case);
    let others: Vec<(PathBuf, String)> = ["/dedup/one", "/sizes/f1048577", "/change/modified"]
        .iter()
        .filter(|p| !gated_files.contains(**p))
        .map(|p| (m.path(p), digests[*p].clone()))
        .collect();
    assert!(!others.is_empty());
    let (tx, rx) = std::sync::mpsc::channel();
    let bigdir = m.path("/bigdir");
    std::thread::spawn(move || {
        let ok = others
            .iter()
            .all(|(p, d)| sha256_hex(&std::fs::read(p).unwrap()) == *d)
            && std::fs::read_dir(bigdir).unwrap().count() == 3000;
        let _ = tx.send(ok);
    });
    let outcome = rx.recv_timeout(Duration::from_secs(20));
    gated.release();
    assert_eq!(
        outcome,
        Ok(true),
        "other readers were blocked by one slow chunk"
    );
    let data = stuck.join().unwrap();
    assert_eq!(sha256_hex(&data), digests[slow_file]);
    m.unmount();
}

/// The files whose chunk lists include `bad`, and every other file.
fn split_by_chunk(b: &Bootstrap, bad: &ChunkRef) -> (Vec<String>, Vec<String>) {
    let (hit, clean): (Vec<_>, Vec<_>) = files_with_chunks(b).into_iter().partition(|(_, cs)| {
        cs.iter()
            .any(|c| (c.blob_index, c.ci_index) == (bad.blob_index, bad.ci_index))
    });
    (
        hit.into_iter().map(|x| x.0).collect(),
        clean.into_iter().map(|x| x.0).collect(),
    )
}

/// Reading the files that need the bad chunk fails with EIO every time; the rest read right.
fn assert_only_bad_chunk_fails(m: &Mounted, case: &Case, b: &Bootstrap, bad: &ChunkRef) {
    let (hit, clean) = split_by_chunk(b, bad);
    assert!(!hit.is_empty() && clean.len() > 100);
    for f in &hit {
        for _ in 0..2 {
            let e = std::fs::read(m.path(f)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(EIO), "{f}: {e}");
        }
        // A range that does not touch the bad chunk still reads (the first page, when the bad
        // chunk is not the first one).
        let chunks = b.file_chunks(b.lookup(f).unwrap(), 0, 1).unwrap();
        if chunks.first().map(|c| c.ci_index) != Some(bad.ci_index) {
            let file = File::open(m.path(f)).unwrap();
            let mut page = [0u8; 4096];
            assert!(file.read_at(&mut page, 0).unwrap() > 0, "{f}");
        }
    }
    let digests = expected_digests(case);
    for f in clean.iter().filter(|f| !f.starts_with("/bigdir/")).take(60) {
        let data = std::fs::read(m.path(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(sha256_hex(&data), digests[f.as_str()], "{f}");
    }
    let s = m.mount().stats().snapshot();
    assert!(s.read_errors >= 2 && s.chunk_fetch_errors >= 2, "{s:?}");
}

#[test]
fn a_failing_chunk_source_gives_eio_and_other_files_still_read() {
    if !fuse_ready("a_failing_chunk_source_gives_eio_and_other_files_still_read") {
        return;
    }
    let case = ZSTD_1M;
    let b = Arc::new(Bootstrap::open(nydus().join(case.bootstrap)).unwrap());
    let bad = b
        .file_chunks(b.lookup("/sizes/compressible_3.5MiB").unwrap(), 0, u64::MAX)
        .unwrap()[1]
        .clone();
    let src = Arc::new(FailOn {
        inner: source(case),
        chunk: (bad.blob_index, bad.ci_index),
    });
    let m = Mounted::new(b.clone(), src, &FuseOptions::default());
    assert_only_bad_chunk_fails(&m, case, &b, &bad);
    m.unmount();
}

#[test]
fn a_corrupted_blob_gives_eio_never_wrong_bytes() {
    if !fuse_ready("a_corrupted_blob_gives_eio_never_wrong_bytes") {
        return;
    }
    for case in [ZSTD_1M, NONE_64K] {
        let b = Arc::new(Bootstrap::open(nydus().join(case.bootstrap)).unwrap());
        let bad = b
            .file_chunks(b.lookup("/sizes/compressible_3.5MiB").unwrap(), 0, u64::MAX)
            .unwrap()[1]
            .clone();
        let tmp = tempfile::tempdir().unwrap();
        let blob = &b.blobs()[bad.blob_index as usize];
        let path = tmp.path().join(&blob.blob_id);
        let mut data = std::fs::read(nydus().join(case.blob_dirs[0]).join(&blob.blob_id)).unwrap();
        data[(bad.compressed_offset + u64::from(bad.compressed_size) / 2) as usize] ^= 0x10;
        std::fs::write(&path, &data).unwrap();
        let m = Mounted::new(
            b.clone(),
            Arc::new(LocalBlobDir::new(tmp.path())),
            &FuseOptions::default(),
        );
        assert_only_bad_chunk_fails(&m, case, &b, &bad);
        m.unmount();
    }
}

#[test]
fn a_corrupted_batch_gives_eio_for_its_files_only() {
    if !fuse_ready("a_corrupted_batch_gives_eio_for_its_files_only") {
        return;
    }
    let case = BATCH;
    let b = Arc::new(Bootstrap::open(nydus().join(case.bootstrap)).unwrap());
    let good = source(case);
    good.load_blob_metas(&b).unwrap();
    // Batch 1 is stored raw: a flipped byte in it breaks exactly the chunks cut from it.
    let files = files_with_chunks(&b);
    let in_batch = |c: &ChunkRef| c.batch.is_some_and(|x| x.index == 1);
    let (hit, clean): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|(_, cs)| cs.iter().any(in_batch));
    let bad = hit
        .iter()
        .flat_map(|(_, cs)| cs.iter())
        .find(|c| in_batch(c))
        .unwrap()
        .clone();
    let tmp = tempfile::tempdir().unwrap();
    let blob = &b.blobs()[0];
    let mut data = std::fs::read(nydus().join(case.blob_dirs[0]).join(&blob.blob_id)).unwrap();
    let batch = bad.batch.unwrap();
    let at = bad.compressed_offset + u64::from(batch.offset);
    data[at as usize] ^= 0x10;
    std::fs::write(tmp.path().join(&blob.blob_id), &data).unwrap();
    let src = LocalBlobDir::new(tmp.path());
    src.load_blob_metas(&b).unwrap();
    let m = Mounted::new(b.clone(), Arc::new(src), &FuseOptions::default());
    let digests = expected_digests(case);
    let mut failed = 0;
    for (f, cs) in &hit {
        let broken = cs.iter().any(|c| c.ci_index == bad.ci_index);
        match std::fs::read(m.path(f)) {
            Err(e) => {
                assert!(broken, "{f}: {e}");
                assert_eq!(e.raw_os_error(), Some(EIO), "{f}: {e}");
                failed += 1;
            }
            Ok(d) => {
                assert!(!broken, "{f}: read despite its flipped byte");
                assert_eq!(sha256_hex(&d), digests[f.as_str()], "{f}");
            }
        }
    }
    assert!(failed >= 1);
    // Files in other batches, and stored on their own, read right.
    for (f, _) in clean.iter().step_by(40) {
        let d = std::fs::read(m.path(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(sha256_hex(&d), digests[f.as_str()], "{f}");
    }
    m.unmount();
}

#[test]
fn unmount_leaves_no_mount_even_when_busy_or_panicking() {
    if !fuse_ready("unmount_leaves_no_mount_even_when_busy_or_panicking") {
        return;
    }
    // Drop unmounts.
    let (m, _) = Mounted::case(ZSTD_1M, &FuseOptions::default());
    let dir = m.dir.clone();
    let mut inner = m;
    drop(inner.mount.take());
    assert!(!is_mounted(&dir));
    drop(inner);

    // A busy mount (an open file) is detached; the open file keeps working until closed.
    let (m, _) = Mounted::case(ZSTD_1M, &FuseOptions::default());
    let mut f = File::open(m.path("/sizes/f4097")).unwrap();
    let dir = m.dir.clone();
    m.unmount();
    assert!(!is_mounted(&dir));
    let mut data = Vec::new();
    f.read_to_end(&mut data).unwrap();
    assert_eq!(data.len(), 4097);
    drop(f);

    // A test that panics with a mount live still leaves nothing behind.
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let (m, _) = Mounted::case(ZSTD_1M, &FuseOptions::default());
        tx.send(m.dir.clone()).unwrap();
        panic!("test failure with a live mount");
    })
    .join();
    assert!(r.is_err());
    let dir = rx.recv().unwrap();
    assert!(!is_mounted(&dir), "{} left mounted", dir.display());
}
