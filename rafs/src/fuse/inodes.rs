//! FUSE inode numbers for bootstrap inodes, and `stat` attributes in FUSE form.
//!
//! FUSE requires the root to be inode 1 and uses one number as both the kernel's node id and
//! `st_ino`, so numbers are derived from the bootstrap's [`InodeId`]s by a fixed bijection: the
//! root is 1, every other inode is its id + 2. The same image always gets the same numbers.
//!
//! Invariants: hardlinks share one number. In v6 they already share one inode (nid); in v5 each
//! name has its own record, so the first record seen for an image inode number (`i_ino`) of a
//! multiply-linked file becomes the canonical one for all its names. A directory has one parent,
//! recorded when it is looked up (the only way the kernel learns a directory), so `..` in readdir
//! names the right inode. Both maps are bounded by the number of inodes in the image.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, INodeNo};

use crate::bootstrap::Bootstrap;
use crate::model::{Attr, FileType, InodeId, RafsVersion};

pub(crate) struct Inodes {
    root: InodeId,
    /// v5 only: image `i_ino` → canonical record of a multiply-linked file.
    v5_links: Option<Mutex<HashMap<u64, InodeId>>>,
    /// Directory → its parent directory.
    parents: Mutex<HashMap<InodeId, InodeId>>,
}

impl Inodes {
    pub(crate) fn new(bootstrap: &Bootstrap) -> Self {
        Inodes {
            root: bootstrap.root(),
            v5_links: (bootstrap.version() == RafsVersion::V5).then(Default::default),
            parents: Mutex::new(HashMap::new()),
        }
    }

    /// The FUSE number of `id` (None only for ids beyond `u64::MAX - 2`, which no parser makes).
    pub(crate) fn fuse_ino(&self, id: InodeId) -> Option<INodeNo> {
        if id == self.root {
            return Some(INodeNo::ROOT);
        }
        id.checked_add(2).map(INodeNo)
    }

    /// The bootstrap inode behind a FUSE number (None for 0, which is never handed out).
    pub(crate) fn image_id(&self, ino: INodeNo) -> Option<InodeId> {
        match ino.0 {
            0 => None,
            1 => Some(self.root),
            n => Some(n - 2),
        }
    }

    /// The inode all names of `id`'s file resolve to (`attr` is `id`'s attributes).
    pub(crate) fn canonical(&self, id: InodeId, attr: &Attr) -> InodeId {
        let Some(links) = &self.v5_links else {
            return id;
        };
        if attr.file_type == FileType::Dir || attr.nlink < 2 {
            return id;
        }
        *links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(attr.ino)
            .or_insert(id)
    }

    /// Remember that directory `dir` lives in `parent`.
    pub(crate) fn note_parent(&self, dir: InodeId, parent: InodeId) {
        self.parents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir, parent);
    }

    /// The parent of directory `dir` (the root is its own parent; an unknown one reads as itself).
    pub(crate) fn parent(&self, dir: InodeId) -> InodeId {
        if dir == self.root {
            return dir;
        }
        self.parents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&dir)
            .copied()
            .unwrap_or(dir)
    }
}

/// `attr` in FUSE form under number `ino`: every time is the image's mtime (RAFS keeps only that).
pub(crate) fn file_attr(ino: INodeNo, attr: &Attr) -> FileAttr {
    let mtime = Duration::new(attr.mtime, attr.mtime_nsec.min(999_999_999));
    let time = UNIX_EPOCH.checked_add(mtime).unwrap_or(UNIX_EPOCH);
    FileAttr {
        ino,
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: kind(attr.file_type),
        perm: (attr.mode & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes of a negative lookup reply (node id 0: "no such name", cacheable).
pub(crate) fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The FUSE file type of a RAFS file type.
pub(crate) fn kind(t: FileType) -> fuser::FileType {
    match t {
        FileType::File => fuser::FileType::RegularFile,
        FileType::Dir => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::CharDevice => fuser::FileType::CharDevice,
        FileType::BlockDevice => fuser::FileType::BlockDevice,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::Socket => fuser::FileType::Socket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64, nlink: u32, file_type: FileType) -> Attr {
        Attr {
            ino,
            file_type,
            mode: 0o104755,
            uid: 1,
            gid: 2,
            size: 1000,
            mtime: 4_102_444_800,
            mtime_nsec: 5,
            nlink,
            rdev: 0,
        }
    }

    #[test]
    fn numbering_is_a_bijection_with_root_at_one() {
        let i = Inodes {
            root: 36,
            v5_links: None,
            parents: Mutex::new(HashMap::new()),
        };
        for id in [0u64, 1, 2, 35, 36, 37, 1 << 40] {
            let n = i.fuse_ino(id).unwrap();
            assert_eq!(i.image_id(n), Some(id));
            assert_eq!(n == INodeNo::ROOT, id == 36);
        }
        assert_eq!(i.image_id(INodeNo(0)), None);
        assert_eq!(i.fuse_ino(u64::MAX), None);
    }

    #[test]
    fn v5_hardlinks_share_the_first_record() {
        let i = Inodes {
            root: 1,
            v5_links: Some(Mutex::new(HashMap::new())),
            parents: Mutex::new(HashMap::new()),
        };
        assert_eq!(i.canonical(7, &attr(100, 3, FileType::File)), 7);
        assert_eq!(i.canonical(9, &attr(100, 3, FileType::File)), 7);
        assert_eq!(i.canonical(11, &attr(101, 1, FileType::File)), 11);
        assert_eq!(i.canonical(12, &attr(101, 1, FileType::File)), 12);
    }

    #[test]
    fn attributes_keep_mode_bits_owner_and_time() {
        let a = file_attr(INodeNo(5), &attr(5, 1, FileType::File));
        assert_eq!(a.perm, 0o4755);
        assert_eq!((a.uid, a.gid, a.size, a.blocks), (1, 2, 1000, 2));
        assert_eq!(
            a.mtime.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(4_102_444_800, 5)
        );
    }
}
