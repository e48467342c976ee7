//! The snapshotter's directories and the mounts it hands containerd.
//!
//! Under the root (`snapshotter.root`, default `<data dir>/snapshotter`):
//! - `snapshots/<id>/fs`: a snapshot's own files (an unpacked layer, or a container's writes:
//!   overlayfs's upper directory); `snapshots/<id>/work`: overlayfs's work directory, for
//!   active snapshots only;
//! - `images/<id>`: the lazy mount of the Nydus image whose bootstrap layer is snapshot `<id>`,
//!   the lower directory of every container of that image.
//!
//! Mounts follow containerd's overlayfs snapshotter: no lower → a bind mount of `fs`; lowers →
//! overlay with the nearest lower first; a view of one lower is a read-only bind of it.
//!
//! Invariants: removal never crosses into another filesystem (a mount found inside a snapshot
//! directory stops the removal with an error instead of deleting what it holds); an image mount
//! point is removed with `rmdir` only, after it was unmounted.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::state::{Kind, Usage};

/// One mount as containerd's `Mount` message carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The snapshotter's directory tree.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    /// Whether overlayfs has the `index` parameter (then mounts say `index=off`, as containerd's
    /// own snapshotter does, so a lower shared by many containers is not locked to one upper).
    index_off: bool,
}

impl Layout {
    pub fn new(root: PathBuf) -> Self {
        Layout {
            root,
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// A snapshot's own files (overlayfs's upper directory).
    pub fn fs(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Where the image whose bootstrap is snapshot `id` is mounted.
    pub fn image_dir(&self, id: u64) -> PathBuf {
        self.root.join("images").join(id.to_string())
    }

    /// Creates the root's directories (mode 0700: snapshots hold other users' files).
    pub fn prepare_root(&self) -> io::Result<()> {
        for d in [
            self.root.clone(),
            self.root.join("snapshots"),
            self.root.join("images"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
        }
        Ok(())
    }

    /// Creates snapshot `id`'s directories; a leftover directory of that id (a crash between
    /// creating it and recording the snapshot) is cleared first.
    pub fn create(&self, id: u64, kind: Kind) -> io::Result<()> {
        let dir = self.snapshot_dir(id);
        if dir.exists() {
            remove_tree(&dir)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        fs::DirBuilder::new().mode(0o755).create(self.fs(id))?;
        if kind == Kind::Active {
            fs::DirBuilder::new().mode(0o711).create(self.work(id))?;
        }
        Ok(())
    }

    /// Removes snapshot `id`'s directories (absent is fine).
    pub fn remove(&self, id: u64) -> io::Result<()> {
        remove_tree(&self.snapshot_dir(id))
    }

    /// The image mount point of bootstrap snapshot `id`, created empty if missing.
    pub fn make_image_dir(&self, id: u64) -> io::Result<PathBuf> {
        let dir = self.image_dir(id);
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(e),
        }
    }

    /// Removes an (unmounted, empty) image mount point.
    pub fn remove_image_dir(&self, id: u64) -> io::Result<()> {
        match fs::remove_dir(self.image_dir(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Snapshot directories whose id is not in `live` (left by a crash or a failed removal).
    pub fn orphans(&self, live: &HashSet<u64>) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        let dir = self.root.join("snapshots");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                if !live.contains(&id) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// The mounts of snapshot `id` of `kind` over `lowers` (nearest first).
    pub fn mounts(&self, kind: Kind, id: u64, lowers: &[PathBuf]) -> Vec<MountSpec> {
        let show = |p: &Path| p.display().to_string();
        let bind = |source: &Path, mode: &str| MountSpec {
            kind: "bind".into(),
            source: show(source),
            options: vec![mode.to_owned(), "rbind".to_owned()],
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                lowers.iter().map(|p| show(p)).collect::<Vec<_>>().join(":")
            )
        };
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_owned());
        }
        match (kind, lowers) {
            (Kind::Active, []) => vec![bind(&self.fs(id), "rw")],
            (Kind::Active, _) => {
                options.push(format!("workdir={}", show(&self.work(id))));
                options.push(format!("upperdir={}", show(&self.fs(id))));
                options.push(lowerdir());
                vec![overlay(options)]
            }
            (_, []) => vec![bind(&self.fs(id), "ro")],
            (_, [one]) => vec![bind(one, "ro")],
            (_, _) => {
                options.push(lowerdir());
                vec![overlay(options)]
            }
        }
    }
}

fn overlay(options: Vec<String>) -> MountSpec {
    MountSpec {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}

/// Disk usage of `dir` (blocks of every inode counted once, and the inode count), without
/// following links or crossing into other filesystems.
pub fn usage(dir: &Path) -> io::Result<Usage> {
    let top = fs::symlink_metadata(dir)?;
    let mut seen = HashSet::new();
    let mut u = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.dev() != top.dev() {
                continue;
            }
            if seen.insert(m.ino()) {
                u.inodes += 1;
                u.size += (m.blocks() * 512) as i64;
            }
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(u)
}

/// `rm -rf dir` that refuses to cross into another filesystem.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let top = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !top.is_dir() {
        return fs::remove_file(dir);
    }
    // A bind mount of the same filesystem keeps the device number: ask the mount table too.
    if let Some(m) = crate::mount::table::mount_points_under(dir).first() {
        return Err(io::Error::other(format!(
            "{} is mounted on; not removing {}",
            m.display(),
            dir.display()
        )));
    }
    remove_within(dir, top.dev())
}

fn remove_within(dir: &Path, dev: u64) -> io::Result<()> {
    // Entries may vanish meanwhile (a concurrent Cleanup removing the same orphan): gone is
    // what we want.
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let path = e.path();
        let m = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if m.is_dir() {
            if m.dev() != dev {
                return Err(io::Error::other(format!(
                    "{} is another filesystem (a mount inside a snapshot?); not removing it",
                    path.display()
                )));
            }
            remove_within(&path, dev)?;
        } else {
            gone(fs::remove_file(&path))?;
        }
    }
    gone(fs::remove_dir(dir))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            root: PathBuf::from("/r"),
            index_off: true,
        }
    }

    #[test]
    fn mounts_are_containerd_overlay_mounts() {
        let l = layout();
        assert_eq!(
            l.mounts(Kind::Active, 1, &[]),
            [MountSpec {
                kind: "bind".into(),
                source: "/r/snapshots/1/fs".into(),
                options: vec!["rw".into(), "rbind".into()]
            }]
        );
        let lowers = [l.fs(3), l.image_dir(2)];
        assert_eq!(
            l.mounts(Kind::Active, 4, &lowers),
            [MountSpec {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "index=off".into(),
                    "workdir=/r/snapshots/4/work".into(),
                    "upperdir=/r/snapshots/4/fs".into(),
                    "lowerdir=/r/snapshots/3/fs:/r/images/2".into()
                ]
            }]
        );
        assert_eq!(
            l.mounts(Kind::View, 5, &lowers[1..]),
            [MountSpec {
                kind: "bind".into(),
                source: "/r/images/2".into(),
                options: vec!["ro".into(), "rbind".into()]
            }]
        );
        let view = l.mounts(Kind::View, 5, &lowers);
        assert_eq!(
            view[0].options,
            ["index=off", "lowerdir=/r/snapshots/3/fs:/r/images/2"]
        );
        assert_eq!(l.mounts(Kind::View, 5, &[])[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn directories_are_made_measured_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let l = Layout::new(tmp.path().join("root"));
        l.prepare_root().unwrap();
        l.create(7, Kind::Active).unwrap();
        assert!(l.fs(7).is_dir() && l.work(7).is_dir());
        std::fs::write(l.fs(7).join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::create_dir(l.fs(7).join("d")).unwrap();
        std::fs::hard_link(l.fs(7).join("a"), l.fs(7).join("d/b")).unwrap();
        let u = usage(&l.fs(7)).unwrap();
        assert_eq!(u.inodes, 2, "a hard link is one inode");
        assert!(u.size >= 10_000, "{u:?}");
        l.create(8, Kind::View).unwrap();
        assert!(!l.work(8).exists(), "views have no work dir");
        let live: HashSet<u64> = [8].into_iter().collect();
        assert_eq!(l.orphans(&live).unwrap(), [7]);
        l.remove(7).unwrap();
        assert!(!l.snapshot_dir(7).exists());
        l.remove(7).unwrap();
        // A leftover directory of an id is cleared when the id is created again.
        std::fs::write(l.fs(8).join("stale"), b"x").unwrap();
        l.create(8, Kind::Active).unwrap();
        assert!(!l.fs(8).join("stale").exists());
    }
}
