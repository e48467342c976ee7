//! The in-memory image tree the builder and merge produce and the v6 writer serialises: an arena
//! of inodes, directories mapping names to inode indexes (hardlinks share an index), and OCI
//! overlay operations (whiteouts, opaque directories).
//!
//! Invariants: index 0 is the root directory; names are valid single components (non-empty, no
//! `/` or NUL, not `.`/`..`, at most 255 bytes); a directory's children are kept sorted by name.

use std::collections::BTreeMap;

use crate::model::{ChunkRef, FileType, Xattr};

/// Index of an inode in [`Tree::inodes`].
pub(crate) type NodeIdx = usize;

/// Overlay whiteout prefix.
pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Opaque-directory marker.
pub(crate) const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Attributes the writer stores for every inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits incl. setuid/setgid/sticky.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<Xattr>,
}

impl Meta {
    pub(crate) fn dir_default() -> Self {
        Meta {
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }
}

/// What an inode is.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Dir(BTreeMap<Vec<u8>, NodeIdx>),
    /// Size and chunks (blob indexes as in the output blob table).
    File {
        size: u64,
        chunks: Vec<ChunkRef>,
    },
    Symlink(Vec<u8>),
    /// Device node, fifo or socket, with its `new_encode_dev` rdev.
    Special {
        file_type: FileType,
        rdev: u32,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub meta: Meta,
    pub kind: Kind,
}

impl Node {
    pub(crate) fn file_type(&self) -> FileType {
        match &self.kind {
            Kind::Dir(_) => FileType::Dir,
            Kind::File { .. } => FileType::File,
            Kind::Symlink(_) => FileType::Symlink,
            Kind::Special { file_type, .. } => *file_type,
        }
    }
}

/// An image tree.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub inodes: Vec<Node>,
}

impl Tree {
    pub(crate) fn new(root_meta: Meta) -> Self {
        Tree {
            inodes: vec![Node {
                meta: root_meta,
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    pub(crate) fn push(&mut self, node: Node) -> NodeIdx {
        self.inodes.push(node);
        self.inodes.len() - 1
    }

    pub(crate) fn children(&self, dir: NodeIdx) -> Option<&BTreeMap<Vec<u8>, NodeIdx>> {
        match &self.inodes.get(dir)?.kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub(crate) fn children_mut(&mut self, dir: NodeIdx) -> Option<&mut BTreeMap<Vec<u8>, NodeIdx>> {
        match &mut self.inodes.get_mut(dir)?.kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// The directory at `components` below the root, creating missing ones with default
    /// attributes; a non-directory in the way is replaced. Returns `None` only if `components`
    /// is inconsistent with the arena (never for trees built here).
    pub(crate) fn ensure_dir(&mut self, components: &[Vec<u8>]) -> Option<NodeIdx> {
        let mut cur = 0;
        for name in components {
            let existing = self.children(cur)?.get(name).copied();
            cur = match existing {
                Some(i) if matches!(self.inodes.get(i)?.kind, Kind::Dir(_)) => i,
                _ => {
                    let i = self.push(Node {
                        meta: Meta::dir_default(),
                        kind: Kind::Dir(BTreeMap::new()),
                    });
                    self.children_mut(cur)?.insert(name.clone(), i);
                    i
                }
            };
        }
        Some(cur)
    }

    /// The inode at an absolute image path (`/` is the root), following no symlinks.
    pub(crate) fn lookup(&self, path: &str) -> Option<NodeIdx> {
        let mut cur = 0;
        for name in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            cur = *self.children(cur)?.get(name.as_bytes())?;
        }
        Some(cur)
    }

    /// Prefetch paths → inodes (first occurrence of each, in order) and the paths not found.
    pub(crate) fn resolve_prefetch(&self, paths: &[String]) -> (Vec<NodeIdx>, Vec<String>) {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for p in paths {
            match self.lookup(p) {
                Some(i) if !found.contains(&i) => found.push(i),
                Some(_) => {}
                None => missing.push(p.clone()),
            }
        }
        (found, missing)
    }
}
