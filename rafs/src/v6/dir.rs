//! EROFS directory blocks: 12-byte dirents followed by their names, one 4 KiB block at a time.
//!
//! Invariants: returned names are non-empty, at most 255 bytes, contain no `/` or NUL; `.` and
//! `..` are dropped; a malformed block (name offsets out of order or out of the block) is an error.

use crate::error::{Error, Result};
use crate::model::{DirEntry, FileType};
use crate::raw::{u16_at, u64_at, u8_at, until_nul};
use crate::v6::superblock::BLOCK_SIZE;

const DIRENT_SIZE: usize = 12;

/// Parse all entries of directory inode `ino` from its flat data.
pub(crate) fn parse_dir(ino: u64, data: &[u8]) -> Result<Vec<DirEntry>> {
    let mut out = Vec::new();
    for (block, chunk) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        parse_block(ino, block as u64, chunk, &mut out)?;
    }
    Ok(out)
}

fn parse_block(ino: u64, block: u64, b: &[u8], out: &mut Vec<DirEntry>) -> Result<()> {
    let bad = |reason| Error::BadDirent { ino, block, reason };
    if b.len() < DIRENT_SIZE {
        return Err(bad("block shorter than one dirent"));
    }
    let first = usize::from(u16_at(b, 8));
    if first % DIRENT_SIZE != 0 || first == 0 || first > b.len() {
        return Err(bad("first name offset is not a valid dirent count"));
    }
    let count = first / DIRENT_SIZE;
    for j in 0..count {
        let d = j * DIRENT_SIZE;
        let nid = u64_at(b, d);
        let nameoff = usize::from(u16_at(b, d + 8));
        let ftype = u8_at(b, d + 10);
        let end = if j + 1 < count {
            usize::from(u16_at(b, d + DIRENT_SIZE + 8))
        } else {
            b.len()
        };
        if nameoff < first || end < nameoff || end > b.len() {
            return Err(bad("name offsets out of order or outside the block"));
        }
        let raw = b
            .get(nameoff..end)
            .ok_or_else(|| bad("name outside the block"))?;
        // The last name of a block runs to the block end and may be NUL-padded.
        let name = if j + 1 == count { until_nul(raw) } else { raw };
        if name.is_empty() || name.len() > 255 {
            return Err(bad("empty or over-long name"));
        }
        if name.contains(&b'/') || name.contains(&0) {
            return Err(bad("name contains '/' or NUL"));
        }
        if name == b"." || name == b".." {
            continue;
        }
        let file_type = match ftype {
            1 => FileType::File,
            2 => FileType::Dir,
            3 => FileType::CharDevice,
            4 => FileType::BlockDevice,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => return Err(bad("unknown file type in dirent")),
        };
        out.push(DirEntry {
            name: name.to_vec(),
            inode: nid,
            file_type,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
        let mut b = vec![0u8; 12 * entries.len()];
        let mut names = Vec::new();
        for (i, (name, nid, ft)) in entries.iter().enumerate() {
            let off = (b.len() + names.len()) as u16;
            b[i * 12..i * 12 + 8].copy_from_slice(&nid.to_le_bytes());
            b[i * 12 + 8..i * 12 + 10].copy_from_slice(&off.to_le_bytes());
            b[i * 12 + 10] = *ft;
            names.extend_from_slice(name);
        }
        b.extend(names);
        b
    }

    #[test]
    fn parses_and_skips_dots() {
        let b = block(&[(b".", 1, 2), (b"..", 1, 2), (b"a", 5, 1), (b"bc", 6, 7)]);
        let e = parse_dir(1, &b).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, b"bc");
        assert_eq!(e[1].file_type, FileType::Symlink);
    }

    #[test]
    fn rejects_slash_and_bad_offsets() {
        assert!(parse_dir(1, &block(&[(b"a/b", 5, 1)])).is_err());
        let mut b = block(&[(b"a", 5, 1), (b"b", 6, 1)]);
        b[8] = 200;
        assert!(parse_dir(1, &b).is_err());
    }
}
