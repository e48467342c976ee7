//! containerd's snapshots API (`containerd.services.snapshots.v1`) and its `Mount` type: Rust
//! types and the tonic server, generated from `api/proto` by `api/gen` (run it after changing
//! a `.proto`; the output is checked in so that builds need neither `protoc` nor the
//! generator).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod containerd {
    pub mod types {
        include!("api/containerd.types.rs");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                include!("api/containerd.services.snapshots.v1.rs");
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
