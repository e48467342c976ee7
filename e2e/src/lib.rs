//! Harness for end-to-end tests: starts a real origin registry (CNCF distribution), shoal nodes and
//! real clients (skopeo, containerd's `ctr`), each in its own temp dir on free loopback ports.
//!
//! A test is written as `shoal_e2e::run("name", &[Need::…], |t| { … })`: `run` checks what the test needs
//! (skipping with `SKIP name: why` when a privilege or tool is missing, and failing instead when
//! `CI` is set), gives it a [`TestCtx`] whose
//! temp dir outlives every process the test started, and on failure prints the tail of each
//! registered log before panicking. Every process is killed when its handle is dropped.
//!
//! Ground truth about the origin comes from the registry's own access log ([`registry_log`]), never
//! from numbers the node reports about itself.

pub mod cluster;
pub mod containerd;
pub mod crash;
pub mod ctx;
pub mod fixture;
pub mod hostile;
pub mod http;
pub mod lazy;
pub mod liar;
pub mod load;
pub mod loopback;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod nydus;
pub mod paths;
pub mod pressure;
pub mod random;
pub mod ranges;
pub mod registry;
pub mod registry_log;
pub mod rows;
pub mod scheduler;
pub mod setup;
pub mod skopeo;
pub mod soak;
pub mod tarball;
pub mod tiny;
pub mod token;
pub mod wait;

pub use ctx::{run, skip, Need, TestCtx};
