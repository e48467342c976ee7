//! The persisted mount table: `<data dir>/mounts.json`, the mounts to restore when the node
//! starts, and the cleanup of mount points a dead node left behind (FUSE, EROFS, blob files).
//!
//! Invariants: the file is replaced atomically (write a temp file, fsync it, rename, fsync the
//! directory), so after a crash it holds either the old table or the new one. It holds requests
//! (what the user asked for), not state: a mount that fails to come back stays in the table until
//! the user unmounts it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// File name of the table in the data dir.
pub const FILE_NAME: &str = "mounts.json";

/// How an image is mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MountMode {
    /// The FUSE filesystem (universal).
    Fuse,
    /// Kernel EROFS over decoded blob files served on demand (Linux 6.12+).
    Erofs,
}

impl std::fmt::Display for MountMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MountMode::Fuse => "fuse",
            MountMode::Erofs => "erofs",
        })
    }
}

/// One requested mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub image: String,
    /// Canonical mount point.
    pub dir: PathBuf,
    pub mode: MountMode,
    /// `os/arch[/variant]` picked from an index.
    pub platform: String,
    /// Prefetch rate, origin bytes per second (`None`: the default; 0: no prefetch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_rate: Option<u64>,
    /// Who asked for it: a person (persisted here, restored at start) or the snapshotter (which
    /// keeps its own records and brings its mounts back itself).
    #[serde(default, skip_serializing_if = "Owner::is_user")]
    pub owner: Owner,
    /// A RAFS bootstrap already on disk (the snapshotter's: `image/image.boot` of the layer
    /// containerd unpacked and verified) to mount instead of resolving `image`; `image` then only
    /// names the registry and repository the data blobs come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_file: Option<PathBuf>,
    /// Held by an image server process of its own (`remote`), which outlives the node: the
    /// snapshotter's mounts, under running containers. Needs `bootstrap_file`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_process: bool,
}

/// Who a mount belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// `shoal mount` (the control socket).
    #[default]
    User,
    /// The containerd snapshotter: the lower directory of containers of the image.
    Snapshotter,
}

impl Owner {
    pub fn is_user(&self) -> bool {
        *self == Owner::User
    }
}

#[derive(Serialize, Deserialize, Default)]
struct TableFile {
    mounts: Vec<MountRecord>,
}

/// Read the table; a missing file is an empty table.
pub fn load(data_dir: &Path) -> io::Result<Vec<MountRecord>> {
    let path = data_dir.join(FILE_NAME);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let t: TableFile =
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(t.mounts)
}

/// Replace the table atomically.
pub fn save(data_dir: &Path, mounts: &[MountRecord]) -> io::Result<()> {
    fs::create_dir_all(data_dir)?;
    let path = data_dir.join(FILE_NAME);
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let body = serde_json::to_vec_pretty(&TableFile {
        mounts: mounts.to_vec(),
    })
    .map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    File::open(data_dir)?.sync_all()
}

/// Whether `dir` is a mount point of a shoal filesystem (per `/proc/self/mountinfo`): a FUSE
/// mount of ours (type `fuse.shoal`: an image or an EROFS mount's blob files), or a kernel EROFS
/// mount whose source is a bootstrap under `erofs_root` (an EROFS mode mount).
pub fn is_shoal_mount(dir: &Path, erofs_root: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            return false;
        };
        if fields.get(4).is_none_or(|p| unescape(p) != want) {
            return false;
        }
        match (fields.get(sep + 1), fields.get(sep + 2)) {
            (Some(&"fuse.shoal"), _) => true,
            (Some(&"erofs"), Some(src)) => Path::new(&unescape(src)).starts_with(erofs_root),
            _ => false,
        }
    })
}

/// Every mount point at or below `dir` (any filesystem), per `/proc/self/mountinfo`.
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Lazily unmount stale shoal mounts at `dir` (left by a node that died); several may be stacked.
pub fn clear_stale(dir: &Path, erofs_root: &Path) {
    let ok = |mut c: Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for _ in 0..4 {
        if !is_shoal_mount(dir, erofs_root) {
            return;
        }
        let mut umount = Command::new("umount");
        umount.arg("-l").arg(dir);
        let mut fusermount = Command::new("fusermount3");
        fusermount.arg("-u").arg("-z").arg(dir);
        if ok(umount) || ok(fusermount) {
            tracing::info!(dir = %dir.display(), "cleared a stale shoal mount");
        } else {
            tracing::warn!(dir = %dir.display(), "cannot clear a stale shoal mount");
            return;
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (b[i], oct) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_missing_is_empty() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(load(d.path()).expect("load").is_empty());
        let recs = vec![MountRecord {
            image: "h:1/r:t".into(),
            dir: "/mnt/a b".into(),
            mode: MountMode::Fuse,
            platform: "linux/amd64".into(),
            prefetch_rate: None,
            owner: Owner::User,
            bootstrap_file: None,
            own_process: false,
        }];
        save(d.path(), &recs).expect("save");
        assert_eq!(load(d.path()).expect("load"), recs);
        save(d.path(), &[]).expect("save");
        assert!(load(d.path()).expect("load").is_empty());
        assert!(!d.path().join("mounts.json.tmp").exists());
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\\"), r"/x\\");
    }
}
