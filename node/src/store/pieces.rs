//! Piece geometry: how a blob is cut into fixed-size pieces.
//!
//! Pieces are the unit of P2P bookkeeping and of read verification. Every
//! node must cut a blob the same way, so everything here is a pure function of
//! the blob size. Piece `i` covers `[i*p, min((i+1)*p, size))`; only the last
//! piece may be short.

use std::ops::Range;

/// Smallest piece size: keeps per-piece overhead (a hash, a bookkeeping
/// entry, a request) small relative to the bytes moved.
pub const MIN_PIECE_SIZE: u64 = 256 * 1024;
/// Largest piece size: an on-demand read never pulls more than this.
pub const MAX_PIECE_SIZE: u64 = 16 * 1024 * 1024;
/// Target upper bound on the number of pieces of a blob (exceeded only by
/// blobs larger than `MAX_PIECES * MAX_PIECE_SIZE` = 64 GiB).
pub const MAX_PIECES: u64 = 4096;

/// The piece size of a blob of `blob_size` bytes: the smallest power of two
/// `>= MIN_PIECE_SIZE` (256 KiB) that cuts the blob into at most `MAX_PIECES`
/// (4096) pieces, capped at `MAX_PIECE_SIZE` (16 MiB).
///
/// So blobs up to 1 GiB use 256 KiB pieces, a 10 GiB blob uses 4 MiB pieces,
/// and blobs over 64 GiB use 16 MiB pieces (and more than 4096 of them).
pub fn piece_size(blob_size: u64) -> u64 {
    let mut size = MIN_PIECE_SIZE;
    while size < MAX_PIECE_SIZE && blob_size.div_ceil(size) > MAX_PIECES {
        size *= 2;
    }
    size
}

/// Number of pieces of a blob of `blob_size` bytes cut into `piece_size`.
pub fn piece_count(blob_size: u64, piece_size: u64) -> u64 {
    blob_size.div_ceil(piece_size.max(1))
}

/// Byte range of piece `index` (empty if `index` is past the end).
pub fn piece_range(index: u64, piece_size: u64, blob_size: u64) -> Range<u64> {
    let start = index.saturating_mul(piece_size).min(blob_size);
    let end = start.saturating_add(piece_size).min(blob_size);
    start..end
}

/// Indices of the pieces sharing at least one byte with `range`.
pub fn pieces_overlapping(range: &Range<u64>, piece_size: u64) -> Range<u64> {
    if range.start >= range.end {
        return 0..0;
    }
    let piece_size = piece_size.max(1);
    range.start / piece_size..range.end.div_ceil(piece_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_sizes() {
        assert_eq!(piece_size(0), MIN_PIECE_SIZE);
        assert_eq!(piece_size(1), MIN_PIECE_SIZE);
        assert_eq!(piece_size(1 << 30), MIN_PIECE_SIZE);
        assert_eq!(piece_size((1 << 30) + 1), 2 * MIN_PIECE_SIZE);
        assert_eq!(piece_size(10 << 30), 4 << 20);
        assert_eq!(piece_size(1 << 40), MAX_PIECE_SIZE);
        assert_eq!(piece_size(u64::MAX), MAX_PIECE_SIZE);
        assert_eq!(piece_range(3, 10, 35), 30..35);
        assert_eq!(piece_range(4, 10, 35), 35..35);
        assert_eq!(pieces_overlapping(&(9..21), 10), 0..3);
        assert_eq!(pieces_overlapping(&(10..20), 10), 1..2);
    }

    proptest! {
        #[test]
        fn piece_size_is_minimal_power_of_two(size in any::<u64>()) {
            let p = piece_size(size);
            prop_assert!(p.is_power_of_two());
            prop_assert!((MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&p));
            if p < MAX_PIECE_SIZE {
                prop_assert!(piece_count(size, p) <= MAX_PIECES);
            }
            if p > MIN_PIECE_SIZE {
                // Half the size would have needed too many pieces.
                prop_assert!(piece_count(size, p / 2) > MAX_PIECES);
            }
        }

        #[test]
        fn piece_size_is_monotone(a in any::<u64>(), b in any::<u64>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(piece_size(lo) <= piece_size(hi));
        }

        #[test]
        fn pieces_tile_the_blob(size in 0u64..(1 << 34)) {
            let p = piece_size(size);
            let n = piece_count(size, p);
            let mut pos = 0;
            for i in 0..n {
                let r = piece_range(i, p, size);
                prop_assert_eq!(r.start, pos);
                prop_assert!(!r.is_empty());
                prop_assert!(r.end - r.start <= p);
                pos = r.end;
            }
            prop_assert_eq!(pos, size);
        }

        #[test]
        fn overlapping_pieces_cover_range(s in 0u64..10_000, len in 0u64..10_000, p in 1u64..3000) {
            let range = s..s + len;
            let idx = pieces_overlapping(&range, p);
            if len == 0 {
                prop_assert!(idx.is_empty());
            } else {
                prop_assert!(idx.start * p <= range.start);
                prop_assert!(idx.end * p >= range.end);
                prop_assert!((idx.start + 1) * p > range.start);
                prop_assert!((idx.end - 1) * p < range.end);
            }
        }
    }
}
