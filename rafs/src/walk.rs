//! Depth-first traversal of an image tree that terminates on any input.
//!
//! Invariants: each directory inode is entered at most once (a second sighting is reported as an
//! error, which breaks cycles made by corrupt dirents), nesting is capped at [`MAX_DEPTH`], the
//! number of entries visited is capped by what the bootstrap's size can describe (a legitimate
//! image spends at least 4 bytes per entry; hostile ones that alias directory data would
//! otherwise make the walk quadratic), and
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

/// What the tolerant walker reports.
#[derive(Debug)]
pub enum Visit<'a> {
    /// An entry, visited before its children.
    Entry(&'a WalkEntry),
    /// A problem at `path`; the walk goes on with the rest of the tree unless told to stop.
    Error { path: &'a [u8], error: Error },
}

/// Visit every entry; the first error (from the image or from `visit`) stops the walk.
pub fn walk(b: &Bootstrap, mut visit: impl FnMut(&WalkEntry) -> Result<()>) -> Result<()> {
    let mut first_err = None;
    walk_tolerant(b, |v| {
        let res = match v {
            Visit::Entry(e) => visit(e),
            Visit::Error { error, .. } => Err(error),
        };
        match res {
            Ok(()) => true,
            Err(e) => {
                first_err = Some(e);
                false
            }
        }
    });
    first_err.map_or(Ok(()), Err)
}

/// Visit every readable entry and report every problem; `f` returns `false` to stop the walk.
pub fn walk_tolerant(b: &Bootstrap, mut f: impl FnMut(Visit<'_>) -> bool) {
    let root = b.root();
    let attr = match b.getattr(root) {
        Ok(a) => a,
        Err(error) => {
            f(Visit::Error { path: b"", error });
            return;
        }
    };
    let mut entered: HashSet<InodeId> = HashSet::new();
    let budget = b.as_bytes().len() as u64 / 4 + 16;
    let mut visited = 0u64;
    let mut stack = vec![WalkEntry {
        path: Vec::new(),
        inode: root,
        attr,
        depth: 0,
    }];
    while let Some(entry) = stack.pop() {
        visited += 1;
        if visited > budget {
            let error = Error::LimitExceeded {
                what: "entries visited (more than the bootstrap's size can describe)",
                limit: budget,
            };
            f(Visit::Error {
                path: &entry.path,
                error,
            });
            return;
        }
        if !f(Visit::Entry(&entry)) {
            return;
        }
        if entry.attr.file_type != FileType::Dir {
            continue;
        }
        let problem = if !entered.insert(entry.inode) {
            Some(Error::BadInode {
                ino: entry.inode,
                reason: "directory reached twice (cycle or hardlinked directory)",
            })
        } else if entry.depth >= MAX_DEPTH {
            Some(Error::LimitExceeded {
                what: "directory nesting",
                limit: MAX_DEPTH as u64,
            })
        } else {
            None
        };
        if let Some(error) = problem {
            if !f(Visit::Error {
                path: &entry.path,
                error,
            }) {
                return;
            }
            continue;
        }
        let children = match b.readdir(entry.inode) {
            Ok(c) => c,
            Err(error) => {
                if !f(Visit::Error {
                    path: &entry.path,
                    error,
                }) {
                    return;
                }
                continue;
            }
        };
        for child in children.into_iter().rev() {
            let mut path = entry.path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&child.name);
            let error = match b.getattr(child.inode) {
                Ok(attr) if attr.file_type == child.file_type => {
                    stack.push(WalkEntry {
                        path,
                        inode: child.inode,
                        attr,
                        depth: entry.depth + 1,
                    });
                    continue;
                }
                Ok(_) => Error::BadInode {
                    ino: child.inode,
                    reason: "type in the directory entry differs from the inode",
                },
                Err(e) => e,
            };
            if !f(Visit::Error { path: &path, error }) {
                return;
            }
        }
    }
}
