//! The tail of a v6 data blob: sections each followed by a 512-byte tar header (`image.blob`,
//! `blob.meta`, `blob.digest`, `image.boot`, `rafs.blob.toc`), parsed backwards from EOF, and the
//! 128-byte TOC entries. Also recognises the incompatible nydus v3 footer.
//!
//! Invariants: at most [`MAX_SECTIONS`] headers are followed, each section must lie before its
//! header, a TOC is at most 1 MiB, an inlined bootstrap at most [`MAX_BOOTSTRAP_SIZE`] either
//! way; parsing reads only headers, the TOC and the bootstrap section, never chunk data.

use serde::Serialize;

use crate::blob::decode::decompress_exact;
use crate::bootstrap::MAX_BOOTSTRAP_SIZE;
use crate::error::{Error, Result};
use crate::model::Compressor;
use crate::raw::{bytes32_at, slice, u32_at, u64_at, until_nul};

const TAR_HEADER: u64 = 512;
const TOC_ENTRY: u64 = 128;
const MAX_TOC: u64 = 1 << 20;
/// Most tar sections a blob tail may have.
pub const MAX_SECTIONS: usize = 16;
const V3_FOOTER_MAGIC: &[u8] = b"LPFOOTER";

/// A section found at the blob tail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TailSection {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// One TOC entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TocEntry {
    pub flags: u32,
    pub name: String,
    #[serde(serialize_with = "crate::model::ser_hex")]
    pub sha256: [u8; 32],
    pub compressed_offset: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

/// What the tail of a blob holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BlobTail {
    /// Sections from the end of the blob backwards.
    pub sections: Vec<TailSection>,
    /// The TOC, when the last section is `rafs.blob.toc`.
    pub toc: Option<Vec<TocEntry>>,
}

/// Refuse a nydus v3 blob (4 KiB footer starting with `LPFOOTER`).
pub(crate) fn reject_v3(bytes: &[u8]) -> Result<()> {
    if bytes.len() >= 4096 {
        let footer = bytes.get(bytes.len() - 4096..).unwrap_or(&[]);
        if footer.starts_with(V3_FOOTER_MAGIC) {
            return Err(Error::NydusV3 {
                marker: "LPFOOTER blob footer",
            });
        }
    }
    Ok(())
}

/// Parse the tail of a whole blob held in memory.
pub fn parse_blob_tail(blob: &[u8]) -> Result<BlobTail> {
    reject_v3(blob)?;
    parse_tail_with(blob.len() as u64, &mut |off, len| {
        Ok(slice(blob, off, len, "blob tail")?.to_vec())
    })
}

/// Parse the tail of a blob of `size` bytes, reading ranges with `read_at(offset, len)`.
pub fn parse_tail_with(
    size: u64,
    read_at: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>>,
) -> Result<BlobTail> {
    if size >= 4096 && read_at(size - 4096, 8)?.as_slice() == V3_FOOTER_MAGIC {
        return Err(Error::NydusV3 {
            marker: "LPFOOTER blob footer",
        });
    }
    let mut tail = BlobTail::default();
    let mut pos = size;
    while pos >= TAR_HEADER && tail.sections.len() < MAX_SECTIONS {
        let hdr = read_at(pos - TAR_HEADER, TAR_HEADER)?;
        let Some((name, len)) = parse_tar_header(&hdr) else {
            break;
        };
        let offset = (pos - TAR_HEADER).checked_sub(len).ok_or(Error::invalid(
            "tar section size",
            len,
            "larger than what precedes its header",
        ))?;
        if name == "rafs.blob.toc" && tail.sections.is_empty() {
            if len > MAX_TOC || !len.is_multiple_of(TOC_ENTRY) {
                return Err(Error::invalid(
                    "blob TOC size",
                    len,
                    "not a multiple of 128 up to 1 MiB",
                ));
            }
            tail.toc = Some(parse_toc(&read_at(offset, len)?)?);
        }
        let done = name == "image.blob";
        tail.sections.push(TailSection {
            name,
            offset,
            size: len,
        });
        pos = offset;
        if done {
            break;
        }
    }
    Ok(tail)
}

/// The bootstrap inlined in a whole blob (`image.boot`), decompressed and, when the blob has a
/// TOC, checked against the TOC's sha256. `Ok(None)` when the blob carries no bootstrap.
pub fn extract_inlined_bootstrap(blob: &[u8]) -> Result<Option<Vec<u8>>> {
    reject_v3(blob)?;
    read_inlined_bootstrap(blob.len() as u64, &mut |off, len| {
        Ok(slice(blob, off, len, "blob tail")?.to_vec())
    })
}

/// [`extract_inlined_bootstrap`] for a blob of `size` bytes read with `read_at(offset, len)`:
/// reads the tail headers, the TOC and the bootstrap section, nothing else.
pub fn read_inlined_bootstrap(
    size: u64,
    read_at: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>>,
) -> Result<Option<Vec<u8>>> {
    let tail = parse_tail_with(size, read_at)?;
    let Some(section) = tail.sections.iter().find(|s| s.name == "image.boot") else {
        return Ok(None);
    };
    if section.size > MAX_BOOTSTRAP_SIZE {
        return Err(Error::LimitExceeded {
            what: "inlined bootstrap size",
            limit: MAX_BOOTSTRAP_SIZE,
        });
    }
    let Some(entry) = tail.toc.iter().flatten().find(|e| e.name == "image.boot") else {
        // Without a TOC the bootstrap is stored as is.
        return read_at(section.offset, section.size).map(Some);
    };
    if entry.compressed_offset != section.offset || entry.compressed_size != section.size {
        return Err(Error::invalid(
            "TOC entry image.boot",
            entry.compressed_offset,
            "differs from the bootstrap's tar section",
        ));
    }
    if entry.uncompressed_size > MAX_BOOTSTRAP_SIZE {
        return Err(Error::LimitExceeded {
            what: "inlined bootstrap size",
            limit: MAX_BOOTSTRAP_SIZE,
        });
    }
    let compressor = match entry.flags & 0x7 {
        0x1 => Compressor::None,
        0x2 => Compressor::Zstd,
        0x4 => Compressor::Lz4Block,
        f => {
            return Err(Error::invalid(
                "TOC entry flags",
                f.into(),
                "unknown compression",
            ))
        }
    };
    let stored = read_at(section.offset, section.size)?;
    let data = decompress_exact(
        compressor,
        &stored,
        entry.uncompressed_size as usize,
        "inlined bootstrap",
    )?;
    let digest: [u8; 32] = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&data).into()
    };
    if digest != entry.sha256 {
        return Err(Error::invalid(
            "inlined bootstrap",
            entry.uncompressed_size,
            "sha256 differs from the TOC",
        ));
    }
    Ok(Some(data))
}

/// Parse TOC entries (a multiple of 128 bytes).
pub fn parse_toc(data: &[u8]) -> Result<Vec<TocEntry>> {
    if !(data.len() as u64).is_multiple_of(TOC_ENTRY) {
        return Err(Error::invalid(
            "blob TOC size",
            data.len() as u64,
            "not a multiple of 128",
        ));
    }
    Ok(data
        .chunks_exact(TOC_ENTRY as usize)
        .map(|e| TocEntry {
            flags: u32_at(e, 0),
            name: String::from_utf8_lossy(until_nul(e.get(8..24).unwrap_or(&[]))).into_owned(),
            sha256: bytes32_at(e, 24),
            compressed_offset: u64_at(e, 56),
            compressed_size: u64_at(e, 64),
            uncompressed_size: u64_at(e, 72),
        })
        .collect())
}

/// Name and size of a valid ustar/GNU header (checksum verified), or `None`.
pub(crate) fn parse_tar_header(h: &[u8]) -> Option<(String, u64)> {
    if h.len() != TAR_HEADER as usize {
        return None;
    }
    let stored = parse_octal(h.get(148..156)?)?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if stored != sum {
        return None;
    }
    let name = until_nul(h.get(..100)?);
    if name.is_empty() {
        return None;
    }
    let size = parse_octal(h.get(124..136)?)?;
    Some((String::from_utf8_lossy(name).into_owned(), size))
}

fn parse_octal(f: &[u8]) -> Option<u64> {
    let s = until_nul(f);
    let s = std::str::from_utf8(s).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_tail_is_empty_not_error() {
        let t = parse_blob_tail(&[7u8; 3000]).unwrap();
        assert!(t.sections.is_empty());
    }

    #[test]
    fn v3_footer_rejected() {
        let mut b = vec![0u8; 8192];
        b[4096..4104].copy_from_slice(b"LPFOOTER");
        assert!(matches!(parse_blob_tail(&b), Err(Error::NydusV3 { .. })));
    }
}
