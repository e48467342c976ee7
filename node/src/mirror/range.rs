//! HTTP `Range` for blobs: one byte range, resolved against the blob size.
//! Pure; property-tested.

use std::ops::Range;

/// A parsed `Range` header before the size is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (inclusive b) or `bytes=a-` (b = None).
    FromTo(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Why a Range header cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeError {
    Malformed,
    Unsatisfiable,
}

/// Parse one `bytes=` range. Multi-range requests are rejected as malformed:
/// registries serve one range, and no client sends more.
pub fn parse(header: &str) -> Result<ByteRange, RangeError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Malformed)?;
    if spec.contains(',') {
        return Err(RangeError::Malformed);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    match (a.trim(), b.trim()) {
        ("", n) => Ok(ByteRange::Suffix(num(n)?)),
        (s, "") => Ok(ByteRange::FromTo(num(s)?, None)),
        (s, e) => {
            let (s, e) = (num(s)?, num(e)?);
            if e < s {
                return Err(RangeError::Malformed);
            }
            Ok(ByteRange::FromTo(s, Some(e)))
        }
    }
}

impl ByteRange {
    /// The half-open byte range within a blob of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<Range<u64>, RangeError> {
        match self {
            ByteRange::FromTo(s, _) if s >= size => Err(RangeError::Unsatisfiable),
            ByteRange::FromTo(s, None) => Ok(s..size),
            ByteRange::FromTo(s, Some(e)) => Ok(s..e.saturating_add(1).min(size)),
            ByteRange::Suffix(0) => Err(RangeError::Unsatisfiable),
            ByteRange::Suffix(_) if size == 0 => Err(RangeError::Unsatisfiable),
            ByteRange::Suffix(n) => Ok(size.saturating_sub(n)..size),
        }
    }
}

/// `Content-Range` value for a served range.
pub fn content_range(r: &Range<u64>, size: u64) -> String {
    format!("bytes {}-{}/{}", r.start, r.end.saturating_sub(1), size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses() {
        assert_eq!(parse("bytes=0-9"), Ok(ByteRange::FromTo(0, Some(9))));
        assert_eq!(parse("bytes=5-"), Ok(ByteRange::FromTo(5, None)));
        assert_eq!(parse("bytes=-3"), Ok(ByteRange::Suffix(3)));
        for bad in [
            "bytes=5-2",
            "bytes=abc",
            "bytes=",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=-",
            "0-1",
        ] {
            assert_eq!(parse(bad), Err(RangeError::Malformed), "{bad}");
        }
    }

    #[test]
    fn resolves() {
        assert_eq!(parse("bytes=0-9").and_then(|r| r.resolve(5)), Ok(0..5));
        assert_eq!(
            parse("bytes=5-").and_then(|r| r.resolve(5)),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(parse("bytes=-3").and_then(|r| r.resolve(10)), Ok(7..10));
        assert_eq!(parse("bytes=-30").and_then(|r| r.resolve(10)), Ok(0..10));
        assert_eq!(content_range(&(7..10), 10), "bytes 7-9/10");
    }

    proptest! {
        #[test]
        fn resolved_ranges_are_inside_the_blob(s in 0u64..1000, e in 0u64..1000, size in 0u64..1000, suffix: bool) {
            let h = if suffix { format!("bytes=-{e}") } else { format!("bytes={s}-{e}") };
            if let Ok(r) = parse(&h).and_then(|r| r.resolve(size)) {
                prop_assert!(r.start < r.end && r.end <= size);
            }
        }
    }
}
