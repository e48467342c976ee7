//! Library implementations of `shoal rafs inspect|check|unpack`; the CLI only parses arguments
//! and prints what these return.

pub mod check;
pub mod inspect;
pub mod unpack;

pub use check::{check, check_path, check_path_with_digest, CheckReport, Problem};
pub use inspect::{inspect, InspectReport, TreeStats};
pub use unpack::{unpack, UnpackError, UnpackOptions, UnpackStats};

/// Where the tools read `b`'s data blobs: `dirs`, and — when `b` was opened from a data blob
/// that carries it (`path`) — that blob file itself. `None` when neither gives any.
pub fn blob_source(
    b: &crate::Bootstrap,
    path: &std::path::Path,
    dirs: Vec<std::path::PathBuf>,
) -> Option<crate::LocalBlobDir> {
    let inlined = b.inlined_in();
    if dirs.is_empty() && inlined.is_none() {
        return None;
    }
    let source = crate::LocalBlobDir::with_dirs(dirs);
    Some(match inlined {
        Some(i) => source.with_file(i.blob_id.clone(), path),
        None => source,
    })
}

/// A path from the walker as text for reports (`/` for the root, lossy UTF-8).
pub(crate) fn display_path(p: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(p))
}

/// Caps the chunk references the tools follow across all distinct files at what the bootstrap's
/// size can describe (every reference costs at least 8 bytes of index in a legitimate image), so
/// a hostile image that aliases chunk-index arrays cannot make a walk quadratic.
pub(crate) struct ChunkBudget {
    left: u64,
    limit: u64,
}

impl ChunkBudget {
    pub(crate) fn new(b: &crate::Bootstrap) -> Self {
        let limit = b.as_bytes().len() as u64 / 8 + 16;
        ChunkBudget { left: limit, limit }
    }

    pub(crate) fn take(&mut self, n: usize) -> crate::Result<()> {
        match self.left.checked_sub(n as u64) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(crate::Error::LimitExceeded {
                what: "chunk references (more than the bootstrap's size can describe)",
                limit: self.limit,
            }),
        }
    }
}
