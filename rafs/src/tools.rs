//! Library implementations of `shoal rafs inspect|check|unpack`; the CLI only parses arguments
//! and prints what these return.

pub mod check;
pub mod inspect;
pub mod unpack;

pub use check::{check, check_path, CheckReport, Problem};
pub use inspect::{inspect, InspectReport, TreeStats};
pub use unpack::{unpack, UnpackError, UnpackOptions, UnpackStats};

/// A path from the walker as text for reports (`/` for the root, lossy UTF-8).
pub(crate) fn display_path(p: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(p))
}
