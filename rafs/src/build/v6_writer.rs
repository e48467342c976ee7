//! Serialise a [`Tree`] as a RAFS v6 bootstrap: EROFS superblock, Nydus extended superblock,
//! device table, blob table, extended inodes with inline xattrs, directory blocks, chunk-based
//! files with 8-byte chunk indexes, and the chunk-info table.
//!
//! Invariants (what the kernel and our reader rely on): the root is the first inode (nid 128);
//! an inode with its xattrs and inline data never crosses a 4 KiB block; directory entries incl.
//! `.` and `..` are sorted by name across blocks; every chunk index names a chunk-table entry.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::build::blob_writer::{compressor_enum, put};
use crate::build::tree::{Kind, Node, NodeIdx, Tree};
use crate::build::{BuildError, BuildOptions};
use crate::model::{BlobInfo, ChunkRef, Digester, FileType, Xattr};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 64;
/// Device slots fit between byte 1408 and the blob table at 4096.
const MAX_BLOBS: usize = (4096 - 1408) / 128;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_CHUNK_BASED: u16 = 4;

/// Per-inode placement decided before any byte is written.
struct Plan {
    idx: NodeIdx,
    nid: u64,
    offset: u64,
    xattr: Vec<u8>,
    /// Directory blocks or symlink target.
    data: Vec<u8>,
    layout: u16,
    /// Start block of FLAT_PLAIN data.
    data_blk: u64,
    nlink: u32,
}

/// Write the bootstrap for `tree` whose chunks live in `blobs` (in device order), with the
/// inodes `prefetch` in the prefetch table (right after the blob table, as nydus-image does).
pub(crate) fn write_bootstrap(
    tree: &Tree,
    blobs: &[BlobInfo],
    chunks: &[ChunkRef],
    opts: &BuildOptions,
    prefetch: &[NodeIdx],
) -> Result<Vec<u8>, BuildError> {
    let (order, parents, links) = traverse(tree)?;
    let mut plans = Vec::with_capacity(order.len());
    for &idx in &order {
        let node = tree
            .inodes
            .get(idx)
            .ok_or(BuildError::Internal("inode index"))?;
        let xattr = xattr_body(&node.meta.xattrs)?;
        let data = match &node.kind {
            Kind::Symlink(t) => t.clone(),
            // Directory data is laid out now (names fixed); nids are filled in later.
            Kind::Dir(c) => dir_blocks(c, &HashMap::new(), tree, idx, idx)?,
            _ => Vec::new(),
        };
        let nlink = match &node.kind {
            Kind::Dir(c) => {
                2 + c
                    .values()
                    .filter(|&&i| matches!(tree.inodes.get(i).map(|n| &n.kind), Some(Kind::Dir(_))))
                    .count() as u32
            }
            _ => links.get(&idx).copied().unwrap_or(1),
        };
        let inline =
            !data.is_empty() && INODE_SIZE + xattr.len() as u64 + data.len() as u64 <= BLOCK;
        let layout = match &node.kind {
            Kind::File { .. } => LAYOUT_CHUNK_BASED,
            Kind::Dir(_) | Kind::Symlink(_) if inline => LAYOUT_FLAT_INLINE,
            _ => LAYOUT_FLAT_PLAIN,
        };
        plans.push(Plan {
            idx,
            nid: 0,
            offset: 0,
            xattr,
            data,
            layout,
            data_blk: 0,
            nlink,
        });
    }
    // Place inodes: root first at nid 128 (nid 0 would look like a deleted dirent).
    if blobs.len() > MAX_BLOBS {
        return Err(BuildError::Unsupported(
            "more than 21 blobs in one bootstrap (device table)",
        ));
    }
    // The metadata area starts at the first block after the blob and prefetch tables.
    let prefetch_off = BLOCK + 256 * blobs.len() as u64;
    let meta_blkaddr = (prefetch_off + 4 * prefetch.len() as u64).div_ceil(BLOCK);
    let base = meta_blkaddr * BLOCK;
    let mut cur = base + BLOCK;
    for p in &mut plans {
        let node = tree
            .inodes
            .get(p.idx)
            .ok_or(BuildError::Internal("inode index"))?;
        let head = INODE_SIZE
            + p.xattr.len() as u64
            + if p.layout == LAYOUT_FLAT_INLINE {
                p.data.len() as u64
            } else {
                0
            };
        cur = cur.div_ceil(32) * 32;
        if cur % BLOCK + head > BLOCK {
            cur = cur.div_ceil(BLOCK) * BLOCK;
        }
        p.offset = cur;
        p.nid = (cur - base) / 32;
        cur += head;
        if let Kind::File { size, .. } = &node.kind {
            cur = cur.div_ceil(8) * 8 + 8 * size.div_ceil(u64::from(opts.chunk_size));
        }
    }
    if plans.first().map(|p| p.nid) != Some(128) {
        return Err(BuildError::Internal("root nid"));
    }
    let nid_of: HashMap<NodeIdx, u64> = plans.iter().map(|p| (p.idx, p.nid)).collect();
    cur = cur.div_ceil(BLOCK) * BLOCK;
    for p in &mut plans {
        if let Kind::Dir(c) = &tree
            .inodes
            .get(p.idx)
            .ok_or(BuildError::Internal("inode index"))?
            .kind
        {
            let parent = parents.get(&p.idx).copied().unwrap_or(0);
            p.data = dir_blocks(c, &nid_of, tree, p.idx, parent)?;
        }
        if p.layout == LAYOUT_FLAT_PLAIN && !p.data.is_empty() {
            p.data_blk = cur / BLOCK;
            cur += (p.data.len() as u64).div_ceil(BLOCK) * BLOCK;
        }
    }
    let chunk_table_off = cur;
    let chunk_table_size = chunks.len() as u64 * 80;
    let total = (chunk_table_off + chunk_table_size).div_ceil(BLOCK) * BLOCK;
    let mut out = vec![0u8; total as usize];
    write_header(
        &mut out,
        tree,
        blobs,
        opts,
        meta_blkaddr,
        plans.len() as u64,
        (chunk_table_off, chunk_table_size),
    )?;
    for (k, idx) in prefetch.iter().enumerate() {
        let nid = nid_of
            .get(idx)
            .copied()
            .ok_or(BuildError::Internal("prefetch inode not in the tree"))?;
        let nid = u32::try_from(nid).map_err(|_| BuildError::Internal("nid above 2^32"))?;
        put(&mut out, prefetch_off as usize + 4 * k, &nid.to_le_bytes());
    }
    if !prefetch.is_empty() {
        put(&mut out, 1152 + 40, &prefetch_off.to_le_bytes());
        put(
            &mut out,
            1152 + 48,
            &(4 * prefetch.len() as u32).to_le_bytes(),
        );
    }
    for (ino, p) in plans.iter().enumerate() {
        let node = tree
            .inodes
            .get(p.idx)
            .ok_or(BuildError::Internal("inode index"))?;
        write_inode(&mut out, node, p, ino as u32 + 1, opts)?;
    }
    for (i, c) in chunks.iter().enumerate() {
        let at = (chunk_table_off + i as u64 * 80) as usize;
        put(&mut out, at, &c.digest);
        put(&mut out, at + 32, &c.blob_index.to_le_bytes());
        put(&mut out, at + 36, &u32::from(c.compressed).to_le_bytes());
        put(&mut out, at + 40, &c.compressed_size.to_le_bytes());
        put(&mut out, at + 44, &c.uncompressed_size.to_le_bytes());
        put(&mut out, at + 48, &c.compressed_offset.to_le_bytes());
        put(&mut out, at + 56, &c.uncompressed_offset.to_le_bytes());
        put(&mut out, at + 64, &c.file_offset.to_le_bytes());
        put(&mut out, at + 72, &c.ci_index.to_le_bytes());
    }
    Ok(out)
}

/// Breadth-first order from the root (each inode once), each directory's parent, and the number
/// of names of every non-directory.
#[allow(clippy::type_complexity)]
fn traverse(
    tree: &Tree,
) -> Result<
    (
        Vec<NodeIdx>,
        HashMap<NodeIdx, NodeIdx>,
        HashMap<NodeIdx, u32>,
    ),
    BuildError,
> {
    let mut order = vec![0];
    let mut seen: HashMap<NodeIdx, ()> = HashMap::from([(0, ())]);
    let mut parents = HashMap::from([(0, 0)]);
    let mut links: HashMap<NodeIdx, u32> = HashMap::new();
    let mut queue = VecDeque::from([0]);
    while let Some(dir) = queue.pop_front() {
        let Some(children) = tree.children(dir) else {
            continue;
        };
        for &child in children.values() {
            let is_dir = matches!(tree.inodes.get(child).map(|n| &n.kind), Some(Kind::Dir(_)));
            if is_dir {
                if seen.contains_key(&child) {
                    return Err(BuildError::Internal("directory linked twice"));
                }
                parents.insert(child, dir);
                queue.push_back(child);
            } else {
                *links.entry(child).or_default() += 1;
            }
            if seen.insert(child, ()).is_none() {
                order.push(child);
            }
        }
    }
    Ok((order, parents, links))
}

fn dirent_type(t: FileType) -> u8 {
    match t {
        FileType::File => 1,
        FileType::Dir => 2,
        FileType::CharDevice => 3,
        FileType::BlockDevice => 4,
        FileType::Fifo => 5,
        FileType::Socket => 6,
        FileType::Symlink => 7,
    }
}

/// Directory data: blocks of dirents then names, all entries (with `.` and `..`) sorted by name.
fn dir_blocks(
    children: &BTreeMap<Vec<u8>, NodeIdx>,
    nid_of: &HashMap<NodeIdx, u64>,
    tree: &Tree,
    me: NodeIdx,
    parent: NodeIdx,
) -> Result<Vec<u8>, BuildError> {
    let mut entries: Vec<(&[u8], NodeIdx)> =
        children.iter().map(|(n, &i)| (n.as_slice(), i)).collect();
    entries.push((b".", me));
    entries.push((b"..", parent));
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let mut n = 0;
        let mut names = 0;
        while let Some((name, _)) = entries.get(i + n) {
            if 12 * (n + 1) + names + name.len() > BLOCK as usize {
                break;
            }
            names += name.len();
            n += 1;
        }
        if n == 0 {
            return Err(BuildError::Internal("directory entry larger than a block"));
        }
        let mut block = vec![0u8; 12 * n + names];
        let mut nameoff = 12 * n;
        for (j, (name, idx)) in entries.iter().skip(i).take(n).enumerate() {
            let nid = nid_of.get(idx).copied().unwrap_or(0);
            let ft = tree
                .inodes
                .get(*idx)
                .map_or(FileType::File, Node::file_type);
            put(&mut block, j * 12, &nid.to_le_bytes());
            put(&mut block, j * 12 + 8, &(nameoff as u16).to_le_bytes());
            put(&mut block, j * 12 + 10, &[dirent_type(ft)]);
            put(&mut block, nameoff, name);
            nameoff += name.len();
        }
        i += n;
        if i < entries.len() {
            block.resize(BLOCK as usize, 0);
        }
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// The inline xattr body (header plus entries), empty when there are none.
fn xattr_body(xattrs: &[Xattr]) -> Result<Vec<u8>, BuildError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut body = vec![0u8; 12];
    for x in xattrs {
        let (index, suffix) = xattr_prefix(&x.name).ok_or_else(|| {
            BuildError::UnsupportedXattr(String::from_utf8_lossy(&x.name).into_owned())
        })?;
        if suffix.len() > 255 || x.value.len() > 65535 {
            return Err(BuildError::UnsupportedXattr(
                String::from_utf8_lossy(&x.name).into_owned(),
            ));
        }
        body.extend_from_slice(&[suffix.len() as u8, index]);
        body.extend_from_slice(&(x.value.len() as u16).to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(&x.value);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }
    if body.len() > 12 + 4 * 65534 {
        return Err(BuildError::UnsupportedXattr(
            "xattrs too large for one inode".into(),
        ));
    }
    Ok(body)
}

/// EROFS name index and the rest of the name (POSIX ACL names must match exactly).
pub(crate) fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, &[])),
        b"system.posix_acl_default" => return Some((3, &[])),
        _ => {}
    }
    [(1u8, &b"user."[..]), (4, b"trusted."), (6, b"security.")]
        .into_iter()
        .find_map(|(index, prefix)| name.strip_prefix(prefix).map(|rest| (index, rest)))
}

#[allow(clippy::too_many_arguments)]
fn write_header(
    out: &mut [u8],
    tree: &Tree,
    blobs: &[BlobInfo],
    opts: &BuildOptions,
    meta_blkaddr: u64,
    inode_count: u64,
    (chunk_table_off, chunk_table_size): (u64, u64),
) -> Result<(), BuildError> {
    let boot_blocks = out.len() as u64 / BLOCK;
    let device_blocks: u64 = blobs.iter().map(|b| b.uncompressed_size / BLOCK).sum();
    let sb = 1024;
    put(out, sb, &0xE0F5_E1E2u32.to_le_bytes());
    put(out, sb + 8, &0x4000_0000u32.to_le_bytes());
    put(out, sb + 12, &[12]);
    put(out, sb + 14, &128u16.to_le_bytes());
    put(out, sb + 16, &inode_count.to_le_bytes());
    put(out, sb + 36, &(device_blocks as u32).to_le_bytes());
    put(out, sb + 40, &(meta_blkaddr as u32).to_le_bytes());
    put(out, sb + 80, &0xCu32.to_le_bytes());
    put(out, sb + 86, &(blobs.len() as u16).to_le_bytes());
    put(out, sb + 88, &11u16.to_le_bytes());
    let has_xattr = tree.inodes.iter().any(|n| !n.meta.xattrs.is_empty());
    let mut flags: u64 = 0x10 | 0x0100_0000; // EXPLICIT_UID_GID | ENCRYPTION_NONE
    flags |= match opts.compressor {
        crate::Compressor::None => 0x1,
        crate::Compressor::Lz4Block => 0x2,
        crate::Compressor::Gzip => 0x40,
        crate::Compressor::Zstd => 0x80,
    };
    flags |= match opts.digester {
        Digester::Blake3 => 0x4,
        Digester::Sha256 => 0x8,
    };
    if has_xattr {
        flags |= 0x20;
    }
    let ext = 1152;
    put(out, ext, &flags.to_le_bytes());
    put(out, ext + 8, &BLOCK.to_le_bytes());
    put(out, ext + 16, &(blobs.len() as u32 * 256).to_le_bytes());
    put(out, ext + 20, &opts.chunk_size.to_le_bytes());
    put(out, ext + 24, &chunk_table_off.to_le_bytes());
    put(out, ext + 32, &chunk_table_size.to_le_bytes());
    let mut mapped = boot_blocks.div_ceil(128) * 128;
    for (i, b) in blobs.iter().enumerate() {
        let slot = 1408 + i * 128;
        put(out, slot, b.blob_id.as_bytes());
        let blocks = b.uncompressed_size / BLOCK;
        put(out, slot + 64, &(blocks as u32).to_le_bytes());
        put(out, slot + 68, &(mapped as u32).to_le_bytes());
        mapped = (mapped + blocks).div_ceil(128) * 128;
        let e = 4096 + i * 256;
        put(out, e, b.blob_id.as_bytes());
        put(out, e + 64, &(i as u32).to_le_bytes());
        put(out, e + 68, &b.chunk_size.to_le_bytes());
        put(out, e + 72, &b.chunk_count.to_le_bytes());
        put(out, e + 76, &compressor_enum(b.compressor).to_le_bytes());
        put(
            out,
            e + 80,
            &u32::from(b.digester == Digester::Sha256).to_le_bytes(),
        );
        put(out, e + 84, &b.features.to_le_bytes());
        put(out, e + 88, &b.compressed_size.to_le_bytes());
        put(out, e + 96, &b.uncompressed_size.to_le_bytes());
        put(out, e + 104, &b.toc_size.to_le_bytes());
        if let Some(m) = &b.meta {
            put(out, e + 108, &compressor_enum(m.compressor).to_le_bytes());
            put(out, e + 112, &m.offset.to_le_bytes());
            put(out, e + 120, &m.compressed_size.to_le_bytes());
            put(out, e + 128, &m.uncompressed_size.to_le_bytes());
        }
        put(out, e + 136, &b.toc_digest);
    }
    if 1408 + blobs.len() * 128 > 4096 || blobs.len() > 254 {
        return Err(BuildError::Unsupported(
            "more than 20 blobs in one bootstrap",
        ));
    }
    Ok(())
}

fn write_inode(
    out: &mut [u8],
    node: &Node,
    p: &Plan,
    ino: u32,
    opts: &BuildOptions,
) -> Result<(), BuildError> {
    let at = p.offset as usize;
    let ft = node.file_type();
    let type_bits: u32 = match ft {
        FileType::File => 0o100000,
        FileType::Dir => 0o040000,
        FileType::Symlink => 0o120000,
        FileType::CharDevice => 0o020000,
        FileType::BlockDevice => 0o060000,
        FileType::Fifo => 0o010000,
        FileType::Socket => 0o140000,
    };
    let (size, i_u) = match &node.kind {
        Kind::File { size, .. } => (*size, 0x20 | (opts.chunk_size.trailing_zeros() - 12)),
        Kind::Dir(_) | Kind::Symlink(_) => (p.data.len() as u64, p.data_blk as u32),
        Kind::Special { rdev, .. } => (0, *rdev),
    };
    let icount: u16 = if p.xattr.is_empty() {
        0
    } else {
        ((p.xattr.len() - 12) / 4 + 1) as u16
    };
    put(out, at, &(1u16 | (p.layout << 1)).to_le_bytes());
    put(out, at + 2, &icount.to_le_bytes());
    put(
        out,
        at + 4,
        &((type_bits | (node.meta.perm & 0o7777)) as u16).to_le_bytes(),
    );
    put(out, at + 8, &size.to_le_bytes());
    put(out, at + 16, &i_u.to_le_bytes());
    put(out, at + 20, &ino.to_le_bytes());
    put(out, at + 24, &node.meta.uid.to_le_bytes());
    put(out, at + 28, &node.meta.gid.to_le_bytes());
    put(out, at + 32, &node.meta.mtime.to_le_bytes());
    put(out, at + 40, &node.meta.mtime_nsec.to_le_bytes());
    put(out, at + 44, &p.nlink.to_le_bytes());
    let tail = at + INODE_SIZE as usize;
    put(out, tail, &p.xattr);
    let after = tail + p.xattr.len();
    match p.layout {
        LAYOUT_FLAT_INLINE => put(out, after, &p.data),
        LAYOUT_FLAT_PLAIN => put(out, (p.data_blk * BLOCK) as usize, &p.data),
        _ => {
            let Kind::File { size, chunks } = &node.kind else {
                return Ok(());
            };
            let expected = size.div_ceil(u64::from(opts.chunk_size));
            if chunks.len() as u64 != expected {
                return Err(BuildError::Internal(
                    "chunk count differs from the file size",
                ));
            }
            let idx = after.div_ceil(8) * 8;
            for (k, c) in chunks.iter().enumerate() {
                let hi =
                    ((c.blob_index + 1) & 0xff) as u16 | (((c.ci_index >> 16) & 0xff) as u16) << 8;
                let e = idx + 8 * k;
                put(out, e, &((c.ci_index & 0xffff) as u16).to_le_bytes());
                put(out, e + 2, &hi.to_le_bytes());
                put(
                    out,
                    e + 4,
                    &((c.uncompressed_offset / BLOCK) as u32).to_le_bytes(),
                );
            }
        }
    }
    Ok(())
}
