//! shoal node: registry mirror and proxy, persistent blob store, download
//! engine, admin API. The `shoal` binary (`main.rs`) is a thin shell over this.

pub mod access;
pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod convert;
pub mod download;
pub mod faults;
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod metrics;
pub mod mirror;
pub mod mount;
pub mod node;
pub mod p2p;
pub mod peering;
pub mod prewarm;
pub mod serve;
pub mod snapshotter;
pub mod store;
pub use shoal_proto::units;
pub mod upstream;
