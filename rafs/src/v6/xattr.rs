//! EROFS extended attributes: the in-inode xattr body (header, shared-xattr ids, inline entries)
//! and entries in the shared xattr area at `xattr_blkaddr`.
//!
//! Invariants: every entry is read inside the xattr body (or the bootstrap, for shared entries);
//! name prefixes come only from the fixed EROFS index table; long-prefix entries are rejected.

use crate::error::{Error, Result};
use crate::model::Xattr;
use crate::raw::{slice, u16_at, u32_at, u8_at};
use crate::v6::inode::OnDiskInode;
use crate::v6::superblock::BLOCK_SIZE;

const ENTRY_HEADER: u64 = 4;
const BODY_HEADER: u64 = 12;

/// All xattrs of an inode, inline and shared, in on-disk order.
pub(crate) fn read_xattrs(
    buf: &[u8],
    xattr_blkaddr: u32,
    inode: &OnDiskInode,
) -> Result<Vec<Xattr>> {
    let size = inode.xattr_size();
    if size == 0 {
        return Ok(Vec::new());
    }
    let bad = |reason| Error::BadInode {
        ino: inode.nid,
        reason,
    };
    let body = slice(buf, inode.offset + inode.inode_size, size, "xattr body")?;
    let shared = u64::from(u8_at(body, 4));
    let mut pos = BODY_HEADER + shared * 4;
    if pos > size {
        return Err(bad("shared xattr count exceeds the xattr body"));
    }
    let mut out = Vec::new();
    for i in 0..shared {
        let id = u64::from(u32_at(body, (BODY_HEADER + i * 4) as usize));
        let at = u64::from(xattr_blkaddr) * BLOCK_SIZE + id * 4;
        let (x, _) =
            read_entry(buf, at, buf.len() as u64).map_err(|_| bad("bad shared xattr entry"))?;
        out.push(x);
    }
    while pos < size {
        let (x, len) = read_entry(body, pos, size).map_err(|_| bad("bad inline xattr entry"))?;
        out.push(x);
        pos += len;
    }
    Ok(out)
}

/// One entry at `at` of `buf`, which must end by `limit`; returns it and its padded length.
fn read_entry(buf: &[u8], at: u64, limit: u64) -> Result<(Xattr, u64)> {
    let h = slice(buf, at, ENTRY_HEADER, "xattr entry")?;
    let name_len = u64::from(u8_at(h, 0));
    let index = u8_at(h, 1);
    let value_len = u64::from(u16_at(h, 2));
    let total = (ENTRY_HEADER + name_len + value_len).div_ceil(4) * 4;
    if at + ENTRY_HEADER + name_len + value_len > limit {
        return Err(Error::invalid(
            "xattr entry size",
            total,
            "runs past the xattr area",
        ));
    }
    let suffix = slice(buf, at + ENTRY_HEADER, name_len, "xattr name")?;
    let value = slice(buf, at + ENTRY_HEADER + name_len, value_len, "xattr value")?;
    let prefix: &[u8] = match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        5 => b"lustre.",
        6 => b"security.",
        _ => {
            return Err(Error::invalid(
                "xattr name index",
                index.into(),
                "unknown prefix",
            ))
        }
    };
    let mut name = prefix.to_vec();
    name.extend_from_slice(suffix);
    if name.contains(&0) {
        return Err(Error::invalid("xattr name", name_len, "contains NUL"));
    }
    Ok((
        Xattr {
            name,
            value: value.to_vec(),
        },
        total,
    ))
}
