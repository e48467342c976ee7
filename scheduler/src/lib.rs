//! The shoal scheduler: which node holds which pieces of which blob, parent
//! ranking, origin leases and failure blame, served over HTTP/JSON (the
//! protocol types live in `shoal_proto::sched`).
//!
//! Layers, inside out:
//! - [`state`]: the pure state machine (no I/O, injected clock);
//! - [`service`]: the actor task that owns the state, reached through a
//!   cloneable [`service::SchedulerHandle`];
//! - [`http`]: thin axum handlers over the handle ([`http::router`]);
//! - [`server`]: config → listener → serve until shutdown ([`run`]);
//! - [`client`]: [`SchedulerClient`], what nodes use to talk to schedulers.

pub mod client;
pub mod config;
pub mod http;
pub mod metrics;
pub mod process_metrics;
pub mod server;
pub mod service;
#[doc(hidden)]
pub mod sim;
pub mod state;

pub use client::{ClientError, ClientOptions, SchedulerClient, SchedulerSet};
pub use config::{Config, ConfigError, FileConfig};
pub use server::{run, Scheduler, ServerError};
pub use service::SchedulerHandle;
