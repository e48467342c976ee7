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
//! - [`client`]: [`SchedulerClient`], what nodes use to talk to a scheduler.

pub mod state;
