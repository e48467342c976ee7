//! The one place FUSE failures become errno values.
//!
//! Invariants: a missing name is ENOENT; everything that means "the image or its data cannot be
//! trusted or reached" (malformed metadata, a chunk that fails to fetch, decode or verify) is
//! EIO, so a program sees a read error and never wrong bytes; type mismatches are decided by the
//! callers (ENOTDIR, EISDIR, EINVAL) before they reach here.

use fuser::Errno;

use crate::error::Error;
use crate::fuse::reader::ReadError;

/// errno for a metadata error from the bootstrap.
pub(crate) fn image(e: &Error) -> Errno {
    match e {
        Error::NotFound { .. } => Errno::ENOENT,
        _ => Errno::EIO,
    }
}

/// errno for a failed read.
pub(crate) fn read(e: &ReadError) -> Errno {
    match e {
        ReadError::Metadata { source, .. } => image(source),
        ReadError::IsDir { .. } => Errno::EISDIR,
        ReadError::NotFile { .. } => Errno::EINVAL,
        ReadError::Chunk { .. } => Errno::EIO,
    }
}

/// Whether a read error deserves a warning (the image or its data is at fault, not the caller).
pub(crate) fn is_data_failure(e: &ReadError) -> bool {
    read(e) == Errno::EIO
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::reader::ChunkFailure;
    use std::sync::Arc;

    #[test]
    fn chunk_failures_are_eio_and_missing_names_enoent() {
        let mismatch = Error::DigestMismatch {
            blob_id: "b".into(),
            ci_index: 3,
            expected: "aa".into(),
            actual: "bb".into(),
        };
        let e = ReadError::Chunk {
            ino: 1,
            blob_index: 0,
            ci_index: 3,
            reason: ChunkFailure::Source(Arc::new(mismatch)),
        };
        assert_eq!(read(&e), Errno::EIO);
        assert!(is_data_failure(&e));
        assert_eq!(read(&ReadError::IsDir { ino: 1 }), Errno::EISDIR);
        assert_eq!(image(&Error::NotFound { path: "/x".into() }), Errno::ENOENT);
        assert_eq!(
            image(&Error::BadInode {
                ino: 9,
                reason: "bad"
            }),
            Errno::EIO
        );
    }
}
