//! Test inputs beyond the fixtures: a synthetic tree with every file type and the awkward cases
//! (sparse and multi-GiB files, long names, deep directories, whiteout files, odd modes,
//! owners, xattrs, devices), layer tars made from trees by GNU tar, a debootstrap Debian rootfs
//! (cached), OCI image layouts, and `umoci unpack` as the reference overlay unpacker.
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

use super::common::is_root;

/// Size of the huge sparse file: above 4 GiB so 32-bit size/offset truncation would show.
pub const HUGE: u64 = (5 << 30) + 123;

/// Deterministic bytes (splitmix64), incompressible.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    if is_root() {
        rustix::fs::chownat(
            rustix::fs::CWD,
            p,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
}

fn mknod(p: &Path, kind: rustix::fs::FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        kind,
        rustix::fs::Mode::from_bits_truncate(0o640),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

/// A file of `size` bytes that is a hole except for `extents` (offset, bytes).
pub fn sparse_file(p: &Path, size: u64, extents: &[(u64, Vec<u8>)]) {
    use std::os::unix::fs::FileExt as _;
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in extents {
        f.write_all_at(data, *off).unwrap();
    }
}

/// Populate `root` (created) with the synthetic tree. Without root, owners, device nodes and
/// trusted xattrs are left out. `huge` adds the multi-GiB sparse file.
pub fn synthetic_tree(root: &Path, huge: bool) {
    std::fs::create_dir_all(root).unwrap();
    let mib = 1usize << 20;
    // Sizes around the 4 KiB block and the 64 KiB / 1 MiB chunk boundaries.
    for (i, len) in [
        0,
        1,
        4095,
        4096,
        4097,
        65535,
        65536,
        65537,
        mib - 1,
        mib,
        mib + 1,
        3 * mib + 7,
    ]
    .into_iter()
    .enumerate()
    {
        write(
            &root.join(format!("sizes/f{len}")),
            &noise(i as u64 + 1, len),
        );
    }
    let text: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {i} of a compressible file\n").into_bytes())
        .collect();
    write(&root.join("text/log.txt"), &text);
    // The same content twice (dedup) and a hardlink group across directories.
    write(&root.join("dup/one"), &noise(99, 2 * mib + 5));
    write(&root.join("dup/two"), &noise(99, 2 * mib + 5));
    write(&root.join("links/target"), b"hardlinked content\n");
    std::fs::create_dir_all(root.join("links/sub")).unwrap();
    std::fs::hard_link(root.join("links/target"), root.join("links/second")).unwrap();
    std::fs::hard_link(root.join("links/target"), root.join("links/sub/third")).unwrap();
    // Symlinks: relative, absolute, dangling, to a directory, with a long target.
    let sl = root.join("symlinks");
    std::fs::create_dir_all(&sl).unwrap();
    std::os::unix::fs::symlink("../text/log.txt", sl.join("rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", sl.join("abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", sl.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../links", sl.join("dir")).unwrap();
    std::os::unix::fs::symlink("x/".repeat(900), sl.join("long")).unwrap();
    // Long and unusual names.
    let names = root.join("names");
    write(&names.join("n".repeat(255)), b"255-byte name\n");
    std::fs::create_dir_all(names.join("d".repeat(255))).unwrap();
    write(
        &names.join("d".repeat(255)).join("f"),
        b"in a long-named dir\n",
    );
    write(&names.join("with space"), b"space\n");
    write(&names.join("ünïcødé ✓"), b"utf-8\n");
    write(&names.join(OsStr::from_bytes(b"new\nline")), b"newline\n");
    write(&names.join("-dash"), b"dash\n");
    // A deep directory chain (over 100 levels) and a directory of many entries (several blocks).
    let mut deep = root.join("deep");
    for i in 0..120 {
        deep = deep.join(format!("level{i:03}"));
    }
    write(&deep.join("bottom"), b"deep file\n");
    for i in 0..1500 {
        write(&root.join(format!("wide/entry-{i:05}")), &[]);
    }
    // Modes.
    let modes = root.join("modes");
    for (name, mode) in [
        ("setuid", 0o4755),
        ("setgid", 0o2711),
        ("none", 0o000),
        ("private", 0o600),
    ] {
        write(&modes.join(name), name.as_bytes());
        chmod(&modes.join(name), mode);
    }
    std::fs::create_dir_all(modes.join("sticky")).unwrap();
    chmod(&modes.join("sticky"), 0o1777);
    std::fs::create_dir_all(modes.join("setgid-dir")).unwrap();
    chmod(&modes.join("setgid-dir"), 0o2775);
    // Whiteout files: in a single layer they are ordinary files (merge applies them).
    write(&root.join("whiteouts/.wh.gone"), &[]);
    write(&root.join("whiteouts/opaque/.wh..wh..opq"), &[]);
    write(&root.join("whiteouts/opaque/kept"), b"kept\n");
    // xattrs (user.* always; trusted.* as root) on a file and a directory.
    let x = root.join("xattrs");
    write(&x.join("file"), b"with xattrs\n");
    setxattr(&x.join("file"), "user.mime", b"text/plain");
    setxattr(&x.join("file"), "user.empty", b"");
    setxattr(&x, "user.dir", &noise(5, 300));
    // A fifo always; devices and owners as root.
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    mknod(&dev.join("fifo"), rustix::fs::FileType::Fifo, 0, 0);
    if is_root() {
        setxattr(&x.join("file"), "trusted.overlay.test", b"y");
        mknod(
            &dev.join("null"),
            rustix::fs::FileType::CharacterDevice,
            1,
            3,
        );
        mknod(&dev.join("loop0"), rustix::fs::FileType::BlockDevice, 7, 0);
        // A minor above 255 and a major above 255 exercise the full new_encode_dev.
        mknod(
            &dev.join("big"),
            rustix::fs::FileType::CharacterDevice,
            259,
            300_000,
        );
        chown(&dev.join("null"), 0, 5);
        chown(&root.join("dup/one"), 1234, 5678);
        chown(&root.join("names"), 65534, 65534);
        chown(&sl.join("rel"), 42, 43);
    }
    // Sparse files: a small one always, the multi-GiB one on request.
    sparse_file(
        &root.join("sparse/small"),
        10 << 20,
        &[(4 << 20, noise(7, 5000))],
    );
    if huge {
        sparse_file(
            &root.join("sparse/huge"),
            HUGE,
            &[
                (1 << 30, noise(8, 70_000)),
                ((4 << 30) - 10, noise(9, 20)),
                (HUGE - 100, noise(10, 100)),
            ],
        );
    }
}

/// Tar `root` as a layer the way image builders do (PAX, xattrs, numeric owners); everything
/// under `sparse/` goes in GNU sparse entries appended to the same archive (PAX sparse is not a
/// thing OCI tooling writes).
pub fn tar_tree(root: &Path, out: &Path) {
    let main = out.with_extension("main.tar");
    run(Command::new("tar")
        .args([
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--exclude=./sparse",
            "-C",
        ])
        .arg(root)
        .arg("-cf")
        .arg(&main)
        .arg("."));
    if root.join("sparse").exists() {
        let sparse = out.with_extension("sparse.tar");
        run(Command::new("tar")
            .args(["--format=gnu", "--sparse", "--numeric-owner", "-C"])
            .arg(root)
            .arg("-cf")
            .arg(&sparse)
            .arg("./sparse"));
        run(Command::new("tar")
            .arg("-A")
            .arg("-f")
            .arg(&main)
            .arg(&sparse));
        std::fs::remove_file(&sparse).unwrap();
    }
    std::fs::rename(&main, out).unwrap();
}

/// Extract a layer tar as GNU tar does (owners, modes, xattrs, devices as root).
pub fn untar(tar: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    run(Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-p",
            "-C",
        ])
        .arg(dest)
        .arg("-xf")
        .arg(tar));
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The cached debootstrap tarball.
pub const DEBIAN_CACHE: &str = "/var/tmp/shoal-cache/debian-minbase.tar";

/// A Debian 12 minbase rootfs made by `debootstrap` from the apt mirror this machine uses, as a
/// layer tar; cached in [`DEBIAN_CACHE`] (debootstrap takes a while). `Err` says why there is
/// none (not root, no debootstrap, no mirror).
pub fn debian_minbase_tar() -> Result<PathBuf, String> {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = PathBuf::from(DEBIAN_CACHE);
    if cache.exists() {
        return Ok(cache);
    }
    if !is_root() {
        return Err("debootstrap needs root".into());
    }
    if !have("debootstrap") {
        return Err("debootstrap is not installed (scripts/install-deps.sh installs it)".into());
    }
    let mirror = apt_mirror().ok_or("no Debian mirror in /etc/apt/sources.list*")?;
    std::fs::create_dir_all(cache.parent().unwrap()).unwrap();
    let work = tempfile::tempdir_in(cache.parent().unwrap()).unwrap();
    let rootfs = work.path().join("rootfs");
    eprintln!("debootstrap --variant=minbase bookworm from {mirror} (cached in {DEBIAN_CACHE})");
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&rootfs)
        .arg(&mirror)
        .output()
        .map_err(|e| format!("debootstrap: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "debootstrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    let tmp = work.path().join("rootfs.tar");
    tar_tree(&rootfs, &tmp);
    std::fs::rename(&tmp, &cache).unwrap();
    Ok(cache)
}

/// The first `deb` URI for the Debian archive in the apt sources (deb822 or one-line form).
fn apt_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(u) = uri {
                if u.trim_end_matches('/').ends_with("/debian") {
                    return Some(u.to_string());
                }
            }
        }
    }
    None
}

/// The debian-python OCI fixture (two gzip layers: the Debian base, python on top).
pub fn debian_python() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/oci/debian-python"
    ))
}

/// The layer blobs of manifest `reference` in OCI layout `layout`, lowest first.
pub fn oci_layers(layout: &Path, reference: &str) -> Vec<PathBuf> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(m["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect()
}

/// Write an OCI image layout at `dir` whose manifest `reference` has the uncompressed layer
/// tars `layers` (lowest first).
pub fn oci_layout(dir: &Path, reference: &str, layers: &[PathBuf]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let d = hex::encode(sha2::Sha256::digest(data));
        std::fs::write(blobs.join(&d), data).unwrap();
        (format!("sha256:{d}"), data.len())
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (d, size) = put(&std::fs::read(l).unwrap());
        diff_ids.push(d.clone());
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d, "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// `umoci unpack` of `layout:reference` into `bundle`; returns the rootfs. `Err` says why it
/// cannot run here.
pub fn umoci_unpack(layout: &Path, reference: &str, bundle: &Path) -> Result<PathBuf, String> {
    if !is_root() {
        return Err("umoci unpack keeps owners and devices only as root".into());
    }
    if !have("umoci") {
        return Err("umoci is not installed (scripts/install-deps.sh installs it)".into());
    }
    let mut image = layout.as_os_str().to_owned();
    image.push(":");
    image.push(reference);
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(image)
        .arg(bundle));
    Ok(bundle.join("rootfs"))
}
