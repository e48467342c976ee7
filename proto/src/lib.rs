//! Types shared by shoal nodes and schedulers: content identities and
//! registry names, each parsed and validated once at the edge so that a value
//! of these types that reaches the core is known to be well formed.
//!
//! This crate does no I/O and spawns no tasks.

pub mod digest;
pub mod name;

pub use digest::{BlobId, Digest, DigestAlgorithm, DigestError};
pub use name::{NameError, Reference, RepoName, Tag};
