//! The peer data plane: node identity, cluster membership by join secret,
//! and range transfers between nodes over QUIC.
//!
//! Module map: `identity` (the node key), `tls` (certificates bound to node
//! ids, mutual TLS), `membership` (join secret and the connection
//! handshake), `frames` (wire frames on QUIC streams), `endpoint` (the quinn
//! endpoint and its transport limits), `server` (serving ranges from the
//! store), `client` (the connection pool and fetches), `limits` (upload
//! slots, bandwidth), `seeds` (ranges peers want of a blob this node fetches under lease),
//! `metrics`.
//!
//! A node runs the data plane only if it has a join secret: without one it
//! is standalone (the mirror, the store and origin downloads work; nothing is
//! shared with or fetched from peers). The caller decides that by calling
//! [`start`] or not.
//!
//! Invariants:
//! - Nothing is served on a connection before the peer proved it holds the
//!   join secret; a peer that does not is closed with
//!   `CloseCode::JoinRefused` and logged once.
//! - Only committed bytes are served, read through `BlobReader` (whole
//!   pieces verified against their SHA-256). The receiver still verifies
//!   what it gets: a peer is never trusted for content.
//! - A slow receiver cannot make a sender buffer without bound: bodies are
//!   written in ≤ 256 KiB slices with `write`, which waits for QUIC flow
//!   control (the receiver's stream window, `P2pConfig::stream_window`).
//! - Every task is owned by the handle's `TaskTracker`. Shutdown order:
//!   stop accepting → cancel uploads (streams reset) → close connections →
//!   wait for the endpoint to drain.

pub mod client;
pub mod dht;
pub mod endpoint;
pub mod frames;
pub mod identity;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod seeds;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::wire::{CloseCode, PROTOCOL_VERSION};
use shoal_proto::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::store::Store;

pub use client::{ConnectError, FetchError, RangeStream};
pub use identity::{Identity, IdentityError};
pub use membership::{JoinSecret, JoinSecretError};
pub use metrics::P2pMetrics;
pub use shoal_proto::wire::PieceMap;

/// Default `p2p.listen`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5052";
/// Default `p2p.upload_slots`.
pub const DEFAULT_UPLOAD_SLOTS: usize = 8;

/// Runtime configuration of the data plane (validated by [`start`]).
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// UDP address to listen on (`p2p.listen`, `--p2p`).
    pub listen: SocketAddr,
    /// The cluster secret (`p2p.join_secret_file`, `--join-secret-file`,
    /// loaded with [`JoinSecret::load`]).
    pub join_secret: JoinSecret,
    /// Concurrent range uploads; more are answered `Busy` (default 8).
    pub upload_slots: usize,
    /// Upload bandwidth for all peers together, bytes/s; 0 = unlimited.
    pub upload_rate: u64,
    /// Dialing a peer, QUIC and TLS handshake included (default 5 s).
    pub connect_timeout: Duration,
    /// The membership handshake after TLS (default 5 s).
    pub handshake_timeout: Duration,
    /// Waiting for a response header, or for the next bytes of a body
    /// (default 10 s).
    pub request_timeout: Duration,
    /// A connection with no traffic (keep-alives included) for this long is
    /// dead (default 30 s).
    pub idle_timeout: Duration,
    /// Keep-alive interval on open connections (default 10 s).
    pub keep_alive: Duration,
    /// Bytes a peer may send us on one stream ahead of what we consumed:
    /// the bound on what a sender buffers for a slow reader (default 2 MiB).
    pub stream_window: u64,
    /// The same for a whole connection (default 16 MiB).
    pub connection_window: u64,
    /// The protocol version spoken: [`PROTOCOL_VERSION`]. Only tests of
    /// version negotiation change it.
    #[doc(hidden)]
    pub protocol_version: u16,
    /// Fault injection for end-to-end tests (`SHOAL_FAULT_CORRUPT_UPLOADS=1`,
    /// `crate::faults`): flip a byte of every range served to peers.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fault_corrupt_uploads: bool,
}

impl P2pConfig {
    /// Defaults for everything but the address and the secret.
    pub fn new(listen: SocketAddr, join_secret: JoinSecret) -> Self {
        Self {
            listen,
            join_secret,
            upload_slots: DEFAULT_UPLOAD_SLOTS,
            upload_rate: 0,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            stream_window: 2 << 20,
            connection_window: 16 << 20,
            protocol_version: PROTOCOL_VERSION,
            #[cfg(feature = "fault-injection")]
            fault_corrupt_uploads: false,
        }
    }

    fn validate(&self) -> Result<(), StartError> {
        let bad = |field, problem| Err(StartError::Config { field, problem });
        if self.upload_slots == 0 {
            return bad("upload_slots", "must be at least 1");
        }
        if self.stream_window < 16 * 1024 || self.stream_window > 1 << 32 {
            return bad("stream_window", "must be between 16 KiB and 4 GiB");
        }
        if self.connection_window < self.stream_window || self.connection_window > 1 << 34 {
            return bad(
                "connection_window",
                "must be at least stream_window and at most 16 GiB",
            );
        }
        let timeouts = [
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keep_alive", self.keep_alive),
        ];
        for (field, t) in timeouts {
            if t.is_zero() || t > Duration::from_secs(24 * 3600) {
                return bad(field, "must be between 1 ms and 24 h");
            }
        }
        if self.keep_alive >= self.idle_timeout {
            return bad("keep_alive", "must be shorter than idle_timeout");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("p2p config: {field} {problem}")]
    Config {
        field: &'static str,
        problem: &'static str,
    },
    #[error("p2p TLS setup")]
    Tls(#[from] tls::TlsError),
    #[error("binding the p2p endpoint to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Handle to a running data plane; clones share it.
#[derive(Clone)]
pub struct P2pHandle {
    inner: Arc<Inner>,
}

/// State shared by the accept loop, connection and stream tasks, and
/// fetches. Nothing here is mutable except through its own types' locks.
struct Inner {
    cfg: P2pConfig,
    node_id: NodeId,
    local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    cert: tls::NodeCert,
    membership: membership::Membership,
    store: Store,
    metrics: P2pMetrics,
    slots: limits::UploadSlots,
    rate: limits::RateLimiter,
    pool: client::Pool,
    seeds: Arc<seeds::Seeds>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Starts the data plane: binds `cfg.listen`, serves ranges of `store` to
/// member peers, and returns the handle for fetching from them. It stops
/// when `cancel` (or a child of it) is cancelled or on
/// [`P2pHandle::shutdown`].
pub async fn start(
    cfg: P2pConfig,
    store: Store,
    identity: Identity,
    metrics: P2pMetrics,
    cancel: CancellationToken,
) -> Result<P2pHandle, StartError> {
    cfg.validate()?;
    let cert = tls::NodeCert::new(&identity)?;
    let endpoint = endpoint::bind(&cfg, &cert)?;
    let local_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let membership = membership::Membership {
        secret: cfg.join_secret.clone(),
        local: identity.node_id(),
        version: cfg.protocol_version,
        timeout: cfg.handshake_timeout,
    };
    let inner = Arc::new(Inner {
        node_id: identity.node_id(),
        local_addr,
        endpoint,
        cert,
        membership,
        store,
        metrics,
        slots: limits::UploadSlots::new(cfg.upload_slots),
        rate: limits::RateLimiter::new(cfg.upload_rate, cfg.upload_rate / 10),
        pool: client::Pool::default(),
        seeds: Arc::default(),
        cancel: cancel.child_token(),
        tracker: TaskTracker::new(),
        cfg,
    });
    let span = tracing::info_span!("p2p", node = %inner.node_id.short(), addr = %local_addr);
    inner
        .tracker
        .spawn(server::accept_loop(Arc::clone(&inner)).instrument(span));
    tracing::info!(node = %inner.node_id, addr = %local_addr, "p2p data plane listening");
    Ok(P2pHandle { inner })
}

impl P2pHandle {
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The blobs this node seeds (fetches under an origin lease), for the download that does.
    pub fn seeds(&self) -> &Arc<seeds::Seeds> {
        &self.inner.seeds
    }

    /// Upload slots free now (for announcements to the scheduler).
    pub fn free_upload_slots(&self) -> usize {
        self.inner.slots.free()
    }

    pub fn metrics(&self) -> &P2pMetrics {
        &self.inner.metrics
    }

    /// Stops accepting, cancels uploads, closes every connection and waits
    /// (at most 5 s) for the endpoint to drain. Idempotent.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.cancel.cancel();
        inner.pool.clear();
        inner.tracker.close();
        let drain = async {
            inner.tracker.wait().await;
            inner
                .endpoint
                .close(CloseCode::Normal.to_u32().into(), b"shutting down");
            inner.endpoint.wait_idle().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            tracing::warn!("p2p shutdown did not drain in 5 s");
        }
    }
}

impl std::fmt::Debug for P2pHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pHandle")
            .field("node_id", &self.inner.node_id)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}
