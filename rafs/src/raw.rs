//! Bounds-checked access to little-endian fields of untrusted byte buffers.
//!
//! Invariant: nothing here panics or allocates; every range is checked against the buffer and an
//! out-of-range access is an [`Error::OutOfBounds`] naming the structure being read.

use crate::error::{Error, Result};

/// The `len` bytes at `off` of `buf`, or an error naming `what`.
pub(crate) fn slice<'a>(buf: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8]> {
    let limit = buf.len() as u64;
    let oob = || Error::OutOfBounds {
        what,
        offset: off,
        len,
        limit,
    };
    let end = off.checked_add(len).ok_or_else(oob)?;
    if end > limit {
        return Err(oob());
    }
    let (Ok(start), Ok(end)) = (usize::try_from(off), usize::try_from(end)) else {
        return Err(oob());
    };
    buf.get(start..end).ok_or_else(oob)
}

/// A fixed-size array copied out of `buf` at `off`.
pub(crate) fn array<const N: usize>(buf: &[u8], off: u64, what: &'static str) -> Result<[u8; N]> {
    let s = slice(buf, off, N as u64, what)?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}

/// Field readers for a structure already copied into a fixed-size array or checked slice.
/// Out-of-range offsets read as zero; callers only use constant offsets inside the structure.
pub(crate) fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(fixed(b, off))
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(fixed(b, off))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(fixed(b, off))
}

pub(crate) fn bytes32_at(b: &[u8], off: usize) -> [u8; 32] {
    fixed(b, off)
}

fn fixed<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = off.checked_add(N).and_then(|end| b.get(off..end)) {
        a.copy_from_slice(s);
    }
    a
}

/// `v` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn round_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Bytes up to (not including) the first NUL.
pub(crate) fn until_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => b.get(..i).unwrap_or(b),
        None => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_rejects_overflow_and_out_of_range() {
        let b = [1u8, 2, 3, 4];
        assert_eq!(slice(&b, 1, 2, "x").unwrap(), &[2, 3]);
        assert!(slice(&b, 3, 2, "x").is_err());
        assert!(slice(&b, u64::MAX, 2, "x").is_err());
        assert_eq!(u32_at(&b, 0), 0x0403_0201);
        assert_eq!(u32_at(&b, 2), 0);
        assert_eq!(round_up(4097, 4096), Some(8192));
        assert_eq!(round_up(u64::MAX, 4096), None);
    }
}
