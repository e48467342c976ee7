//! Shared helpers for the fixture tests: fixture paths, a multi-directory chunk source, and a
//! port of the fixtures' `listing.py` (the expected-listing format) to Rust.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::Digest as _;

pub fn nydus() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/nydus"
    ))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether this run is CI's (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Reports that `test` (or part of it) cannot run here because of `why`: prints `SKIP test: why`,
/// or fails when `CI` is set — CI has root, FUSE and EROFS, so there a missing prerequisite is a
/// broken machine, not a reason to pass.
pub fn skip(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: prerequisite missing under CI: {why}");
    }
    eprintln!("SKIP {test}: {why}");
}

/// The listing of `top` in the format of `source/listing.py`, one JSON object per path, sorted.
pub fn listing(top: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut inodes: BTreeMap<u64, u64> = BTreeMap::new();
    walk_like_os_walk(top, top, &mut out, &mut inodes);
    out.sort_by(|a, b| {
        a["path"]
            .as_str()
            .unwrap()
            .as_bytes()
            .cmp(b["path"].as_str().unwrap().as_bytes())
    });
    out
}

/// `os.walk` order: per directory, subdirectories (incl. symlinks to dirs) sorted, then the
/// rest sorted; then recurse into real subdirectories. Hardlink groups number in that order.
fn walk_like_os_walk(
    top: &Path,
    dir: &Path,
    out: &mut Vec<Value>,
    inodes: &mut BTreeMap<u64, u64>,
) {
    let mut dns = Vec::new();
    let mut fns = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let is_dir = std::fs::metadata(e.path())
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            dns.push(e.file_name())
        } else {
            fns.push(e.file_name())
        }
    }
    dns.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    fns.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in dns.iter().chain(fns.iter()) {
        out.push(entry(top, &dir.join(name), inodes));
    }
    for name in &dns {
        let p = dir.join(name);
        if !std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            walk_like_os_walk(top, &p, out, inodes);
        }
    }
}

fn entry(top: &Path, p: &Path, inodes: &mut BTreeMap<u64, u64>) -> Value {
    let rel = format!(
        "/{}",
        String::from_utf8_lossy(p.strip_prefix(top).unwrap().as_os_str().as_bytes())
    );
    let st = std::fs::symlink_metadata(p).unwrap();
    let ft = st.file_type();
    let mut e = Map::new();
    e.insert("path".into(), json!(rel));
    e.insert("mode".into(), json!(format!("0o{:o}", st.mode() & 0o7777)));
    e.insert("uid".into(), json!(st.uid()));
    e.insert("gid".into(), json!(st.gid()));
    e.insert("mtime".into(), json!(st.mtime()));
    let rdev = |d: u64| json!([rustix::fs::major(d), rustix::fs::minor(d)]);
    if ft.is_dir() {
        e.insert("type".into(), json!("dir"));
    } else if ft.is_symlink() {
        e.insert("type".into(), json!("symlink"));
        let t = std::fs::read_link(p).unwrap();
        e.insert(
            "target".into(),
            json!(String::from_utf8_lossy(t.as_os_str().as_bytes())),
        );
    } else if ft.is_file() {
        e.insert("type".into(), json!("file"));
        e.insert("size".into(), json!(st.size()));
        let (key, digest) = content_digest(p, st.size());
        e.insert(key.into(), json!(digest));
        if st.nlink() > 1 {
            let n = inodes.len() as u64;
            e.insert(
                "hardlink_group".into(),
                json!(*inodes.entry(st.ino()).or_insert(n)),
            );
        }
    } else if ft.is_char_device() {
        e.insert("type".into(), json!("char"));
        e.insert("rdev".into(), rdev(st.rdev()));
    } else if ft.is_block_device() {
        e.insert("type".into(), json!("block"));
        e.insert("rdev".into(), rdev(st.rdev()));
    } else if ft.is_fifo() {
        e.insert("type".into(), json!("fifo"));
    }
    if !ft.is_symlink() {
        let xs = xattrs(p);
        if !xs.is_empty() {
            e.insert("xattrs_hex".into(), Value::Object(xs));
        }
    }
    Value::Object(e)
}

/// Files up to this size get a plain `sha256` (as the fixture listings have); larger ones a
/// sparse-aware digest, so multi-GiB sparse files are compared without reading their holes.
pub const PLAIN_DIGEST_MAX: u64 = 64 << 20;
const BLOCK: u64 = 1 << 20;

/// `("sha256", hex)` of the content, or for big files `("sha256_nonzero_blocks", hex)`: the
/// sha256 over `(offset, bytes)` of every 1 MiB block that is not all zeros. Two files of equal
/// size have equal block digests exactly when their contents are equal; holes (found with
/// SEEK_DATA/SEEK_HOLE) are skipped without reading, so a file's holes and written zeros agree.
pub fn content_digest(p: &Path, size: u64) -> (&'static str, String) {
    use std::io::Read as _;
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = sha2::Sha256::new();
    if size <= PLAIN_DIGEST_MAX {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        return ("sha256", hex::encode(h.finalize()));
    }
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut pos = 0u64;
    while pos < size {
        let Ok(data) = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) else {
            break; // ENXIO: only a hole is left
        };
        let start = data / BLOCK * BLOCK;
        let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(data)).unwrap_or(size);
        let end = (hole.div_ceil(BLOCK) * BLOCK).min(size);
        let mut off = start;
        while off < end {
            let len = BLOCK.min(size - off) as usize;
            f.read_exact_at(&mut buf[..len], off).unwrap();
            if buf[..len].iter().any(|&b| b != 0) {
                h.update(off.to_le_bytes());
                h.update(&buf[..len]);
            }
            off += len as u64;
        }
        pos = end.max(pos + 1);
    }
    ("sha256_nonzero_blocks", hex::encode(h.finalize()))
}

fn xattrs(p: &Path) -> Map<String, Value> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut names).unwrap_or(0);
    let mut keys: Vec<&[u8]> = names[..n]
        .split(|&c| c == 0)
        .filter(|k| !k.is_empty())
        .collect();
    keys.sort();
    let mut out = Map::new();
    for k in keys {
        let mut v = vec![0u8; 65536];
        let n = rustix::fs::lgetxattr(p, std::ffi::OsStr::from_bytes(k), &mut v).unwrap();
        out.insert(
            String::from_utf8_lossy(k).into_owned(),
            json!(hex::encode(&v[..n])),
        );
    }
    out
}

/// Parse a `.listing.jsonl` file.
pub fn load_listing(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Drop what a non-root unpack cannot reproduce: owners, device nodes, privileged xattrs.
pub fn strip_privileged(list: &mut Vec<Value>) {
    list.retain(|e| !matches!(e["type"].as_str(), Some("char") | Some("block")));
    for e in list.iter_mut() {
        let o = e.as_object_mut().unwrap();
        o.remove("uid");
        o.remove("gid");
        if let Some(Value::Object(xs)) = o.get_mut("xattrs_hex") {
            xs.retain(|k, _| k.starts_with("user."));
            if xs.is_empty() {
                o.remove("xattrs_hex");
            }
        }
    }
}

/// Differences between two listings, one readable line per path.
pub fn listing_diffs(actual: &[Value], expected: &[Value]) -> Vec<String> {
    let a: BTreeMap<&str, &Value> = actual
        .iter()
        .map(|e| (e["path"].as_str().unwrap(), e))
        .collect();
    let x: BTreeMap<&str, &Value> = expected
        .iter()
        .map(|e| (e["path"].as_str().unwrap(), e))
        .collect();
    let mut diffs = Vec::new();
    for (p, e) in &x {
        match a.get(p) {
            None => diffs.push(format!("missing {p}")),
            Some(v) if v != e => {
                diffs.push(format!("differs {p}:\n   got      {v}\n   expected {e}"))
            }
            _ => {}
        }
    }
    for p in a.keys().filter(|p| !x.contains_key(*p)) {
        diffs.push(format!("unexpected {p}"));
    }
    diffs
}

/// Assert two listings are equal, reporting the first differing paths readably.
pub fn assert_same_listing(what: &str, actual: &[Value], expected: &[Value]) {
    assert!(!expected.is_empty(), "{what}: empty expected listing");
    let diffs = listing_diffs(actual, expected);
    assert!(
        diffs.is_empty(),
        "{what}: {} differences (of {} expected entries):\n{}",
        diffs.len(),
        expected.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A scratch directory for trees of thousands of files: on tmpfs (`/dev/shm`) when it has room,
/// because ext4 slows to milliseconds per create under the create/delete churn of repeated
/// unpacks; `SHOAL_TEST_TMP` overrides.
pub fn scratch() -> tempfile::TempDir {
    if let Ok(dir) = std::env::var("SHOAL_TEST_TMP") {
        return tempfile::tempdir_in(dir).unwrap();
    }
    let shm = Path::new("/dev/shm");
    let roomy =
        rustix::fs::statvfs(shm).is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) > 4 << 30);
    if roomy {
        if let Ok(t) = tempfile::tempdir_in(shm) {
            return t;
        }
    }
    tempfile::tempdir().unwrap()
}

/// Mount `boot` with the kernel (file-backed EROFS) using each blob's decoded form as `device=`.
pub fn kernel_listing(
    boot: &Path,
    blobs: &shoal_rafs::LocalBlobDir,
    _work: &Path,
) -> Option<Vec<serde_json::Value>> {
    if !is_root() {
        skip("kernel EROFS mount", "needs root (CAP_SYS_ADMIN)");
        return None;
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.contains("erofs") {
        skip("kernel EROFS mount", "the kernel has no erofs filesystem");
        return None;
    }
    // File-backed EROFS needs files whose filesystem has read_folio (tmpfs has not): the
    // bootstrap and the decoded blobs go to disk.
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let boot_copy = disk.path().join("bootstrap");
    std::fs::copy(boot, &boot_copy).unwrap();
    let boot = boot_copy.as_path();
    let work = disk.path().join("work");
    let work = work.as_path();
    let b = shoal_rafs::Bootstrap::open(boot).unwrap();
    std::fs::create_dir_all(work).unwrap();
    let mut devices = Vec::new();
    for blob in b.blobs() {
        let p = work.join(format!("{}.blob.data", blob.blob_id));
        shoal_rafs::write_decoded_blob(&b, blob.index, blobs, &p).unwrap();
        devices.push(format!("device={}", p.display()));
    }
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let data = std::ffi::CString::new(devices.join(",")).unwrap();
    rustix::mount::mount(
        boot,
        &mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    )
    .unwrap_or_else(|e| panic!("mount erofs {}: {e}", boot.display()));
    // Unmounted even when the listing panics, so a failed test leaves no mount behind.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
    let guard = Unmount(&mnt);
    let l = listing(&mnt);
    drop(guard);
    Some(l)
}
