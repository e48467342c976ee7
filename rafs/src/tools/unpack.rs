//! `unpack`: write an image's tree into a destination directory — regular files (content read
//! and verified through a [`ChunkSource`]), directories, symlinks, hardlinks and, when allowed,
//! owners, modes (incl. setuid/setgid/sticky), mtimes, xattrs, device nodes and fifos.
//!
//! Invariants: DEST must be empty (or absent), and every path is DEST joined with names the reader
//! validated (no `/`, `.`, `..`, NUL), created with exclusive-create calls that never follow a
//! symlink — so nothing is written outside DEST even for a hostile image with duplicate names.
//! Directory metadata is applied after their contents, deepest first.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags, CWD};
use serde::Serialize;

use crate::blob::decode::VerifiedChunk;
use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;
use crate::error::Error;
use crate::model::{Attr, FileType};
use crate::tools::ChunkBudget;
use crate::walk::{walk_tolerant, Visit, WalkEntry};

/// What to restore besides names, types and content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackOptions {
    /// chown to the image's uid/gid.
    pub owners: bool,
    /// Create char/block device nodes.
    pub devices: bool,
    /// Restore `trusted.*` and `security.*` xattrs (`user.*` ones are always restored).
    pub privileged_xattrs: bool,
}

impl UnpackOptions {
    /// Everything when running as root, else what an unprivileged user can do.
    pub fn for_current_user() -> Self {
        let root = rustix::process::geteuid().is_root();
        UnpackOptions {
            owners: root,
            devices: root,
            privileged_xattrs: root,
        }
    }
}

/// Why unpacking stopped.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Image(#[from] Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("destination {path} exists and is not an empty directory")]
    DestNotEmpty { path: PathBuf },
}

/// Counts of what was written, and what was skipped for lack of privilege.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub special_files: u64,
    pub bytes: u64,
    /// Paths (and why) not restored.
    pub skipped: Vec<String>,
}

/// Unpack `b` into `dest`, reading file content from `source`.
pub fn unpack(
    b: &Bootstrap,
    source: &dyn ChunkSource,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    prepare_dest(dest)?;
    let mut u = Unpacker {
        b,
        source,
        dest,
        opts,
        stats: UnpackStats::default(),
        links: HashMap::new(),
        dirs: Vec::new(),
        budget: ChunkBudget::new(b),
    };
    let mut failure: Option<UnpackError> = None;
    walk_tolerant(b, |v| {
        let res = match v {
            Visit::Entry(e) => u.entry(e),
            Visit::Error { error, .. } => Err(error.into()),
        };
        match res {
            Ok(()) => true,
            Err(err) => {
                failure = Some(err);
                false
            }
        }
    });
    if let Some(err) = failure {
        return Err(err);
    }
    for (path, inode, attr) in std::mem::take(&mut u.dirs).into_iter().rev() {
        u.apply_meta(&path, inode, &attr)?;
    }
    Ok(u.stats)
}

fn prepare_dest(dest: &Path) -> Result<(), UnpackError> {
    match fs::read_dir(dest) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(UnpackError::DestNotEmpty {
                    path: dest.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(|e| io("mkdir", dest, e))
        }
        Err(_) => Err(UnpackError::DestNotEmpty {
            path: dest.to_path_buf(),
        }),
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> UnpackError {
    UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

struct Unpacker<'a> {
    b: &'a Bootstrap,
    source: &'a dyn ChunkSource,
    dest: &'a Path,
    opts: &'a UnpackOptions,
    stats: UnpackStats,
    /// Hardlinked inode number → first path written.
    links: HashMap<u64, PathBuf>,
    /// Directories whose metadata is applied at the end.
    dirs: Vec<(PathBuf, u64, Attr)>,
    budget: ChunkBudget,
}

impl Unpacker<'_> {
    fn entry(&mut self, e: &WalkEntry) -> Result<(), UnpackError> {
        if e.path.is_empty() {
            self.dirs
                .push((self.dest.to_path_buf(), e.inode, e.attr.clone()));
            return Ok(());
        }
        let path = self.dest.join(OsStr::from_bytes(&e.path));
        let a = &e.attr;
        match a.file_type {
            FileType::Dir => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|err| io("mkdir", &path, err))?;
                self.stats.dirs += 1;
                self.dirs.push((path, e.inode, a.clone()));
                return Ok(());
            }
            FileType::File => {
                if a.nlink > 1 {
                    if let Some(first) = self.links.get(&a.ino) {
                        fs::hard_link(first, &path).map_err(|err| io("link", &path, err))?;
                        self.stats.hardlinks += 1;
                        return Ok(());
                    }
                    self.links.insert(a.ino, path.clone());
                }
                self.write_file(&path, e.inode, a.size)?;
                self.stats.files += 1;
            }
            FileType::Symlink => {
                let target = self.b.readlink(e.inode)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|err| io("symlink", &path, err))?;
                self.stats.symlinks += 1;
            }
            FileType::CharDevice | FileType::BlockDevice | FileType::Fifo => {
                if a.file_type != FileType::Fifo && !self.opts.devices {
                    self.stats
                        .skipped
                        .push(format!("{}: device node needs root", path.display()));
                    return Ok(());
                }
                let kind = match a.file_type {
                    FileType::CharDevice => rustix::fs::FileType::CharacterDevice,
                    FileType::BlockDevice => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Fifo,
                };
                let dev = rustix::fs::makedev(a.rdev_major(), a.rdev_minor());
                rustix::fs::mknodat(CWD, &path, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|err| io("mknod", &path, err.into()))?;
                self.stats.special_files += 1;
            }
            FileType::Socket => {
                self.stats
                    .skipped
                    .push(format!("{}: sockets are not unpacked", path.display()));
                return Ok(());
            }
        }
        self.apply_meta(&path, e.inode, a)
    }

    fn write_file(&mut self, path: &Path, inode: u64, size: u64) -> Result<(), UnpackError> {
        let f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(|err| io("create", path, err))?;
        let chunks = self.b.file_chunks(inode, 0, size)?;
        self.budget.take(chunks.len())?;
        // A run of the same chunk (a sparse file's zeros) is decoded and verified once, and
        // all-zero chunks are left as holes (the final set_len gives them their zeros), so a
        // multi-GiB sparse file unpacks in seconds and stays sparse.
        let mut last: Option<((u32, u32), bool, VerifiedChunk)> = None;
        for c in chunks {
            let key = (c.blob_index, c.ci_index);
            if last.as_ref().map(|l| l.0) != Some(key) {
                let blob = self.b.blob(c.blob_index)?;
                let data = self.source.read_chunk(blob, &c)?;
                let zero = data.iter().all(|&b| b == 0);
                last = Some((key, zero, data));
            }
            let Some((_, zero, data)) = &last else {
                continue;
            };
            if !zero {
                f.write_all_at(data, c.file_offset)
                    .map_err(|err| io("write", path, err))?;
            }
            self.stats.bytes += data.len() as u64;
        }
        f.set_len(size).map_err(|err| io("truncate", path, err))
    }

    /// Owner, then mode (chown clears setuid), then xattrs, then times (which the others bump).
    fn apply_meta(&mut self, path: &Path, inode: u64, a: &Attr) -> Result<(), UnpackError> {
        if self.opts.owners {
            let (uid, gid) = (
                rustix::fs::Uid::from_raw(a.uid),
                rustix::fs::Gid::from_raw(a.gid),
            );
            rustix::fs::chownat(CWD, path, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|err| io("chown", path, err.into()))?;
        }
        if a.file_type != FileType::Symlink {
            fs::set_permissions(path, fs::Permissions::from_mode(a.permissions()))
                .map_err(|err| io("chmod", path, err))?;
        }
        for x in self.b.xattrs(inode)? {
            let privileged = !x.name.starts_with(b"user.");
            if privileged && !self.opts.privileged_xattrs {
                self.stats.skipped.push(format!(
                    "{}: xattr {} needs root",
                    path.display(),
                    String::from_utf8_lossy(&x.name)
                ));
                continue;
            }
            rustix::fs::lsetxattr(
                path,
                OsStr::from_bytes(&x.name),
                &x.value,
                XattrFlags::empty(),
            )
            .map_err(|err| io("setxattr", path, err.into()))?;
        }
        let t = Timespec {
            tv_sec: i64::try_from(a.mtime).unwrap_or(i64::MAX),
            tv_nsec: i64::from(a.mtime_nsec % 1_000_000_000) as _,
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| io("utimensat", path, err.into()))
    }
}
