//! Merge layer bootstraps (lowest first) into one image bootstrap with OCI overlay semantics:
//! `.wh.<name>` deletes `<name>` from the layers below, `.wh..wh..opq` hides everything the
//! layers below put in its directory, a non-directory replaces whatever had its name, and a
//! directory over a directory merges into it (taking the upper attributes unless the upper
//! directory was only implied by its children). Whiteout markers do not appear in the result.
//!
//! Invariants: the merged blob table lists each distinct blob once (lowest layer first) and
//! every chunk reference is remapped to it; all layers share one chunk size and digester.

use std::collections::{BTreeMap, HashMap};

use crate::bootstrap::Bootstrap;
use crate::build::tree::{Kind, Meta, Node, NodeIdx, Tree, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::build::{BuildError, BuildOptions};
use crate::model::{BlobInfo, ChunkRef, FileType, RafsVersion};
use crate::walk::walk;

/// The result of merging: a tree with its blob and chunk tables.
pub(crate) struct Merged {
    pub tree: Tree,
    pub blobs: Vec<BlobInfo>,
    pub chunks: Vec<ChunkRef>,
    pub opts: BuildOptions,
    /// The layers' prefetch entries (by path, lowest layer first) still present in the image.
    pub prefetch: Vec<NodeIdx>,
}

/// Merge `layers` (lowest first).
pub(crate) fn merge_layers(layers: &[Bootstrap]) -> Result<Merged, BuildError> {
    let first = layers
        .first()
        .ok_or(BuildError::Unsupported("merging zero bootstraps"))?;
    let s = first.summary();
    let opts = BuildOptions {
        compressor: layers
            .last()
            .map_or(s.compressor, |l| l.summary().compressor),
        digester: s.digester,
        chunk_size: s.chunk_size,
    };
    let mut blobs: Vec<BlobInfo> = Vec::new();
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut merged: Option<Tree> = None;
    let mut prefetch_paths = Vec::new();
    for (n, layer) in layers.iter().enumerate() {
        let ls = layer.summary();
        if ls.version != RafsVersion::V6 {
            return Err(BuildError::Unsupported("merging RAFS v5 bootstraps"));
        }
        let mismatch = |what, found: String, expected: String| BuildError::LayerMismatch {
            layer: n,
            path: String::new(),
            what,
            found,
            expected,
        };
        if ls.chunk_size != opts.chunk_size {
            return Err(mismatch(
                "chunk size",
                ls.chunk_size.to_string(),
                opts.chunk_size.to_string(),
            ));
        }
        if ls.digester != opts.digester {
            return Err(mismatch(
                "digester",
                ls.digester.name().into(),
                opts.digester.name().into(),
            ));
        }
        let mut remap = Vec::with_capacity(layer.blobs().len());
        for b in layer.blobs() {
            let idx = match blobs.iter().position(|x| x.blob_id == b.blob_id) {
                Some(i) => i,
                None => {
                    let i = blobs.len();
                    let mut nb = b.clone();
                    nb.index = i as u32;
                    blobs.push(nb);
                    for mut c in layer.blob_chunks(b.index)? {
                        c.blob_index = i as u32;
                        chunks.push(c);
                    }
                    i
                }
            };
            remap.push(idx as u32);
        }
        prefetch_paths.extend(prefetch_paths_of(layer)?);
        let upper = load_tree(layer, &remap)?;
        merged = Some(match merged {
            None => strip_markers(&upper),
            Some(mut lower) => {
                overlay(&mut lower, 0, &upper, 0, &mut HashMap::new())?;
                if let (Some(root), Some(up)) = (lower.inodes.first_mut(), upper.inodes.first()) {
                    if !is_implicit(&up.meta) {
                        root.meta = up.meta.clone();
                    }
                }
                lower
            }
        });
    }
    let tree = merged.ok_or(BuildError::Internal("no layers"))?;
    let (prefetch, _gone) = tree.resolve_prefetch(&prefetch_paths);
    Ok(Merged {
        tree,
        blobs,
        chunks,
        opts,
        prefetch,
    })
}

/// The paths a bootstrap's prefetch table names, in table order.
fn prefetch_paths_of(b: &Bootstrap) -> Result<Vec<String>, BuildError> {
    let table = b.prefetch_table();
    if table.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: std::collections::HashSet<u64> = table.iter().copied().collect();
    let mut by_inode: HashMap<u64, String> = HashMap::new();
    walk(b, |e| {
        if wanted.contains(&e.inode) {
            by_inode
                .entry(e.inode)
                .or_insert_with(|| format!("/{}", String::from_utf8_lossy(&e.path)));
        }
        Ok(())
    })?;
    Ok(table
        .iter()
        .filter_map(|i| by_inode.get(i).cloned())
        .collect())
}

/// A bootstrap's tree, with blob indexes mapped through `remap`.
pub(crate) fn load_tree(b: &Bootstrap, remap: &[u32]) -> Result<Tree, BuildError> {
    let mut tree = Tree::new(Meta::dir_default());
    let mut dirs: HashMap<Vec<u8>, NodeIdx> = HashMap::from([(Vec::new(), 0)]);
    let mut links: HashMap<u64, NodeIdx> = HashMap::new();
    walk(b, |e| {
        let xattrs = b.xattrs(e.inode)?;
        let a = &e.attr;
        let meta = Meta {
            perm: a.permissions(),
            uid: a.uid,
            gid: a.gid,
            mtime: a.mtime,
            mtime_nsec: a.mtime_nsec,
            xattrs,
        };
        if e.path.is_empty() {
            if let Some(root) = tree.inodes.first_mut() {
                root.meta = meta;
            }
            return Ok(());
        }
        let (parent, name) = match e.path.iter().rposition(|&c| c == b'/') {
            Some(i) => (
                e.path.get(..i).unwrap_or_default(),
                e.path.get(i + 1..).unwrap_or_default(),
            ),
            None => (&[][..], e.path.as_slice()),
        };
        let Some(&pidx) = dirs.get(parent) else {
            return Ok(());
        };
        let idx = match (a.file_type, links.get(&a.ino)) {
            (FileType::File, Some(&i)) if a.nlink > 1 => i,
            _ => {
                let kind = match a.file_type {
                    FileType::Dir => Kind::Dir(BTreeMap::new()),
                    FileType::File => {
                        let mut chunks = b.file_chunks(e.inode, 0, u64::MAX)?;
                        for c in &mut chunks {
                            c.blob_index = remap
                                .get(c.blob_index as usize)
                                .copied()
                                .unwrap_or(u32::MAX);
                        }
                        Kind::File {
                            size: a.size,
                            chunks,
                        }
                    }
                    FileType::Symlink => Kind::Symlink(b.readlink(e.inode)?),
                    ft => Kind::Special {
                        file_type: ft,
                        rdev: a.rdev,
                    },
                };
                let i = tree.push(Node { meta, kind });
                if a.file_type == FileType::File && a.nlink > 1 {
                    links.insert(a.ino, i);
                }
                i
            }
        };
        if a.file_type == FileType::Dir {
            dirs.insert(e.path.clone(), idx);
        }
        if let Some(c) = tree.children_mut(pidx) {
            c.insert(name.to_vec(), idx);
        }
        Ok(())
    })?;
    Ok(tree)
}

/// A directory the layer tar did not list but needed as a parent (the builder gives those
/// [`Meta::dir_default`]): like OCI unpackers, merge keeps the lower layer's attributes for it
/// instead of resetting them. (An explicit entry with exactly those attributes — mode 0755,
/// root, mtime 0, no xattrs — is treated the same; its attributes then come from below.)
fn is_implicit(meta: &Meta) -> bool {
    *meta == Meta::dir_default()
}

fn is_marker(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX)
}

/// A copy of `t` without whiteout markers (the lowest layer has nothing to white out).
fn strip_markers(t: &Tree) -> Tree {
    let mut out = t.clone();
    for n in &mut out.inodes {
        if let Kind::Dir(c) = &mut n.kind {
            c.retain(|name, _| !is_marker(name));
        }
    }
    out
}

/// Apply upper directory `ud` of `upper` onto lower directory `ld` of `lower`.
fn overlay(
    lower: &mut Tree,
    ld: NodeIdx,
    upper: &Tree,
    ud: NodeIdx,
    copied: &mut HashMap<NodeIdx, NodeIdx>,
) -> Result<(), BuildError> {
    let up_children = upper
        .children(ud)
        .ok_or(BuildError::Internal("upper dir"))?
        .clone();
    let lower_children = lower
        .children_mut(ld)
        .ok_or(BuildError::Internal("lower dir"))?;
    if up_children.contains_key(OPAQUE_MARKER) {
        lower_children.clear();
    }
    for name in up_children.keys() {
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if name.as_slice() != OPAQUE_MARKER {
                lower_children.remove(hidden);
            }
        }
    }
    for (name, &uidx) in &up_children {
        if is_marker(name) {
            continue;
        }
        let unode = upper
            .inodes
            .get(uidx)
            .ok_or(BuildError::Internal("upper inode"))?;
        let existing = lower.children(ld).and_then(|c| c.get(name)).copied();
        let lower_is_dir = existing
            .is_some_and(|i| matches!(lower.inodes.get(i).map(|n| &n.kind), Some(Kind::Dir(_))));
        if let (Kind::Dir(_), Some(li), true) = (&unode.kind, existing, lower_is_dir) {
            if let Some(n) = lower
                .inodes
                .get_mut(li)
                .filter(|_| !is_implicit(&unode.meta))
            {
                n.meta = unode.meta.clone();
            }
            overlay(lower, li, upper, uidx, copied)?;
            continue;
        }
        let new = copy_subtree(lower, upper, uidx, copied)?;
        lower
            .children_mut(ld)
            .ok_or(BuildError::Internal("lower dir"))?
            .insert(name.clone(), new);
    }
    Ok(())
}

/// Copy `idx` of `upper` (and, for a directory, everything below it minus markers) into `lower`.
fn copy_subtree(
    lower: &mut Tree,
    upper: &Tree,
    idx: NodeIdx,
    copied: &mut HashMap<NodeIdx, NodeIdx>,
) -> Result<NodeIdx, BuildError> {
    if let Some(&i) = copied.get(&idx) {
        return Ok(i);
    }
    let node = upper
        .inodes
        .get(idx)
        .ok_or(BuildError::Internal("upper inode"))?;
    let new = match &node.kind {
        Kind::Dir(children) => {
            let d = lower.push(Node {
                meta: node.meta.clone(),
                kind: Kind::Dir(BTreeMap::new()),
            });
            for (name, &c) in children {
                if is_marker(name) {
                    continue;
                }
                let ci = copy_subtree(lower, upper, c, copied)?;
                lower
                    .children_mut(d)
                    .ok_or(BuildError::Internal("new dir"))?
                    .insert(name.clone(), ci);
            }
            d
        }
        _ => lower.push(node.clone()),
    };
    copied.insert(idx, new);
    Ok(new)
}
