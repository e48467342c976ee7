//! Depth-first traversal of an image tree that terminates on any input.
//!
//! Invariants: each directory inode is entered at most once (a second sighting is reported as an
//! error, which breaks cycles made by corrupt dirents), nesting is capped at [`MAX_DEPTH`], and
//! entries are visited parent before child, in directory order. Paths are `/`-joined bytes
//! relative to the root (the root itself is visited first with an empty path).

use std::collections::HashSet;

use crate::bootstrap::Bootstrap;
use crate::error::{Error, Result};
use crate::model::{Attr, FileType, InodeId};

/// Deepest directory nesting the walker follows.
pub const MAX_DEPTH: usize = 4096;

/// One visited entry.
#[derive(Debug, Clone)]
pub struct WalkEntry {
    /// Path from the root, `/`-separated, without a leading slash (`b""` for the root).
    pub path: Vec<u8>,
    pub inode: InodeId,
    pub attr: Attr,
    pub depth: usize,
}

/// Visit every entry; the first error (from the image or from `visit`) stops the walk.
pub fn walk(b: &Bootstrap, mut visit: impl FnMut(&WalkEntry) -> Result<()>) -> Result<()> {
    let stop = std::cell::Cell::new(false);
    let mut visit_err = None;
    let mut walk_err = None;
    walk_tolerant(
        b,
        |e| {
            if stop.get() {
                return false;
            }
            if let Err(err) = visit(e) {
                visit_err = Some(err);
                return false;
            }
            true
        },
        |_, err| {
            if walk_err.is_none() {
                walk_err = Some(err);
            }
            stop.set(true);
        },
    );
    match walk_err.or(visit_err) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Visit every readable entry; problems go to `on_error` with the path they concern and the walk
/// goes on with the rest of the tree. `visit` returns `false` to stop the walk.
pub fn walk_tolerant(
    b: &Bootstrap,
    mut visit: impl FnMut(&WalkEntry) -> bool,
    mut on_error: impl FnMut(&[u8], Error),
) {
    let root = b.root();
    let attr = match b.getattr(root) {
        Ok(a) => a,
        Err(e) => return on_error(b"", e),
    };
    let mut entered: HashSet<InodeId> = HashSet::new();
    let mut stack = vec![WalkEntry {
        path: Vec::new(),
        inode: root,
        attr,
        depth: 0,
    }];
    while let Some(entry) = stack.pop() {
        if !visit(&entry) {
            return;
        }
        if entry.attr.file_type != FileType::Dir {
            continue;
        }
        if !entered.insert(entry.inode) {
            on_error(
                &entry.path,
                Error::BadInode {
                    ino: entry.inode,
                    reason: "directory reached twice (cycle or hardlinked directory)",
                },
            );
            continue;
        }
        if entry.depth >= MAX_DEPTH {
            on_error(
                &entry.path,
                Error::LimitExceeded {
                    what: "directory nesting",
                    limit: MAX_DEPTH as u64,
                },
            );
            continue;
        }
        let children = match b.readdir(entry.inode) {
            Ok(c) => c,
            Err(e) => {
                on_error(&entry.path, e);
                continue;
            }
        };
        for child in children.into_iter().rev() {
            let mut path = entry.path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&child.name);
            match b.getattr(child.inode) {
                Ok(attr) if attr.file_type == child.file_type => stack.push(WalkEntry {
                    path,
                    inode: child.inode,
                    attr,
                    depth: entry.depth + 1,
                }),
                Ok(_) => on_error(
                    &path,
                    Error::BadInode {
                        ino: child.inode,
                        reason: "type in the directory entry differs from the inode",
                    },
                ),
                Err(e) => on_error(&path, e),
            }
        }
    }
}
