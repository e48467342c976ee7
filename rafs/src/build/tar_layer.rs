//! Turn one OCI layer tar (plain, gzip or zstd, detected by magic) into a [`Tree`] whose file
//! contents are chunked into a [`BlobWriter`].
//!
//! Invariants: every entry path is normalised to components below the root; `..` components,
//! over-long names and hardlinks to anything but an earlier regular file of the same layer are
//! rejected, so no tar entry can address anything outside the image root. Whiteout files are
//! kept as ordinary entries (like nydus-image `--whiteout-spec none`); merge applies them.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};

use tar::EntryType;

use crate::build::pipeline::Pipeline;
use crate::build::tree::{Kind, Meta, Node, NodeIdx, Tree};
use crate::build::{BuildError, BuildOptions};
use crate::model::{FileType, Xattr};

/// A file whose chunks are still in the pipeline: sequence numbers `first..first + count`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingFile {
    pub node: NodeIdx,
    pub first: u64,
    pub count: u64,
}

/// Read `input` (a possibly compressed tar) into a tree, submitting file data to `pipe`. Files
/// come back with empty chunk lists and are listed in the returned [`PendingFile`]s.
pub(crate) fn read_layer(
    input: impl Read,
    pipe: &mut Pipeline<'_>,
    opts: &BuildOptions,
) -> Result<(Tree, Vec<PendingFile>), BuildError> {
    let mut r = BufReader::with_capacity(1 << 20, input);
    let magic = r
        .fill_buf()
        .map_err(|e| BuildError::Tar(e.to_string()))?
        .to_vec();
    let reader: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .map_err(|e| BuildError::Tar(e.to_string()))?,
        )
    } else {
        Box::new(r)
    };
    let mut archive = tar::Archive::new(reader);
    let mut tree = Tree::new(Meta::dir_default());
    let mut by_path: HashMap<Vec<Vec<u8>>, NodeIdx> = HashMap::new();
    let mut pending = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| BuildError::Tar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| BuildError::Tar(e.to_string()))?;
        let path = normalise(&entry.path_bytes())?;
        let header = entry.header().clone();
        let meta = Meta {
            perm: header.mode().map_err(tar_err)? & 0o7777,
            uid: u32::try_from(header.uid().map_err(tar_err)?)
                .map_err(|_| BuildError::Tar("uid above 2^32".into()))?,
            gid: u32::try_from(header.gid().map_err(tar_err)?)
                .map_err(|_| BuildError::Tar("gid above 2^32".into()))?,
            mtime: header.mtime().map_err(tar_err)?,
            mtime_nsec: 0,
            xattrs: pax_xattrs(&mut entry)?,
        };
        let mut chunks = None;
        let kind = match header.entry_type() {
            EntryType::Directory => None,
            // GNU sparse files read back with their holes as zeros (the tar crate expands them
            // lazily), which the pipeline turns into one shared zero chunk.
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let (kind, seqs) = read_file(&mut entry, pipe, opts)?;
                chunks = Some(seqs);
                Some(kind)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| BuildError::Tar("symlink without a target".into()))?;
                Some(Kind::Symlink(target.into_owned()))
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| BuildError::Tar("hardlink without a target".into()))?;
                let target = normalise(&target)?;
                let Some(&idx) = by_path.get(&target) else {
                    return Err(BuildError::UnsafePath(format!(
                        "hardlink to {} which is not an earlier file",
                        show(&target)
                    )));
                };
                link(&mut tree, &path, idx)?;
                by_path.insert(path, idx);
                continue;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let major = header.device_major().map_err(tar_err)?.unwrap_or(0);
                let minor = header.device_minor().map_err(tar_err)?.unwrap_or(0);
                let file_type = match header.entry_type() {
                    EntryType::Char => FileType::CharDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                Some(Kind::Special {
                    file_type,
                    rdev: (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
                })
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => continue,
            other => {
                return Err(BuildError::Tar(format!(
                    "unsupported tar entry type {other:?} for {}",
                    show(&path)
                )))
            }
        };
        let idx = place(&mut tree, &path, meta, kind)?;
        if let (Some(node), Some((first, count))) = (idx, chunks) {
            pending.push(PendingFile { node, first, count });
        }
        if let Some(i) = idx {
            by_path.insert(path, i);
        }
    }
    Ok((tree, pending))
}

fn tar_err(e: std::io::Error) -> BuildError {
    BuildError::Tar(e.to_string())
}

fn show(p: &[Vec<u8>]) -> String {
    p.iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Components of a tar path below the root; `.`/empty are dropped, `..` is refused.
pub(crate) fn normalise(raw: &[u8]) -> Result<Vec<Vec<u8>>, BuildError> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(BuildError::UnsafePath(
                    String::from_utf8_lossy(raw).into_owned(),
                ))
            }
            name if name.len() > 255 || name.contains(&0) => {
                return Err(BuildError::UnsafePath(
                    String::from_utf8_lossy(raw).into_owned(),
                ))
            }
            name => out.push(name.to_vec()),
        }
    }
    Ok(out)
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<Xattr>, BuildError> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(tar_err)? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(tar_err)?;
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            out.push(Xattr {
                name: name.to_vec(),
                value: ext.value_bytes().to_vec(),
            });
        }
    }
    Ok(out)
}

/// Cut a file into chunks and submit them; returns the file (chunks still empty) and its
/// chunks' sequence numbers as `(first, count)`.
fn read_file<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    pipe: &mut Pipeline<'_>,
    opts: &BuildOptions,
) -> Result<(Kind, (u64, u64)), BuildError> {
    // `Entry::size` is the real size (PAX `size` records, GNU sparse real size).
    let size = entry.size();
    let cs = opts.chunk_size as usize;
    let mut offset = 0u64;
    let mut first = None;
    let mut count = 0u64;
    loop {
        // Sized to what the header says is left (small files are most of a layer), capped at
        // one chunk; a short read below still ends the file and is caught by the size check.
        let want = usize::try_from(size.saturating_sub(offset).min(cs as u64)).unwrap_or(cs);
        let want = if want == 0 { cs.min(4096) } else { want };
        let mut buf = vec![0u8; want];
        let mut n = 0;
        while n < want {
            let got = entry
                .read(buf.get_mut(n..).unwrap_or_default())
                .map_err(tar_err)?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        buf.truncate(n);
        let seq = pipe.submit(buf)?;
        first.get_or_insert(seq);
        count += 1;
        offset += n as u64;
        if n < want || offset >= size {
            break;
        }
    }
    if offset != size {
        return Err(BuildError::Tar(format!(
            "file data is {offset} bytes, header says {size}"
        )));
    }
    let kind = Kind::File {
        size,
        chunks: Vec::new(),
    };
    Ok((kind, (first.unwrap_or(0), count)))
}

/// Put an entry at `path`: `None` kind means a directory (merged with an existing one).
fn place(
    tree: &mut Tree,
    path: &[Vec<u8>],
    meta: Meta,
    kind: Option<Kind>,
) -> Result<Option<NodeIdx>, BuildError> {
    let Some((name, parents)) = path.split_last() else {
        // The root entry itself ("./"): take its attributes.
        if let Some(root) = tree.inodes.first_mut() {
            root.meta = meta;
        }
        return Ok(Some(0));
    };
    let dir = tree
        .ensure_dir(parents)
        .ok_or(BuildError::Internal("ensure_dir"))?;
    let existing = tree.children(dir).and_then(|c| c.get(name)).copied();
    let idx = match (kind, existing) {
        (None, Some(i)) if matches!(tree.inodes.get(i).map(|n| &n.kind), Some(Kind::Dir(_))) => {
            if let Some(n) = tree.inodes.get_mut(i) {
                n.meta = meta;
            }
            i
        }
        (kind, _) => {
            let kind = kind.unwrap_or_else(|| Kind::Dir(BTreeMap::new()));
            tree.push(Node { meta, kind })
        }
    };
    tree.children_mut(dir)
        .ok_or(BuildError::Internal("parent is a directory"))?
        .insert(name.clone(), idx);
    Ok(Some(idx))
}

fn link(tree: &mut Tree, path: &[Vec<u8>], idx: NodeIdx) -> Result<(), BuildError> {
    let Some((name, parents)) = path.split_last() else {
        return Err(BuildError::UnsafePath(
            "hardlink named like the root".into(),
        ));
    };
    if !matches!(
        tree.inodes.get(idx).map(|n| &n.kind),
        Some(Kind::File { .. })
    ) {
        return Err(BuildError::UnsafePath(format!(
            "hardlink {} to a non-file",
            show(path)
        )));
    }
    let dir = tree
        .ensure_dir(parents)
        .ok_or(BuildError::Internal("ensure_dir"))?;
    tree.children_mut(dir)
        .ok_or(BuildError::Internal("parent is a directory"))?
        .insert(name.clone(), idx);
    Ok(())
}
