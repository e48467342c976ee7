//! Types shared by shoal nodes and schedulers: content and node identities,
//! registry names and the scheduler protocol ([`sched`]), each parsed and
//! validated once at the edge so that a value of these types that reaches the
//! core is known to be well formed.
//!
//! This crate does no I/O and spawns no tasks.

pub mod auth;
pub mod digest;
#[doc(hidden)]
pub mod fuzzing;
pub mod name;
pub mod node_id;
pub mod sched;
pub mod units;
pub mod wire;

pub use digest::{BlobId, Digest, DigestAlgorithm, DigestError};
pub use name::{NameError, Reference, RepoName, Tag};
pub use node_id::{NodeId, NodeIdError};
