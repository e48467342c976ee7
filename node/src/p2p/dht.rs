//! The DHT: how nodes find holders of a blob when no scheduler answers.
//!
//! A libp2p swarm (TCP + pnet + noise + yamux) runs identify
//! (`/shoal/id/1.0.0`) and a private Kademlia (`/shoal/kad/1.0.0`, always in
//! server mode). A node that holds a blob *provides* it: a provider record
//! keyed by the blob digest's raw bytes, re-announced every
//! `provide_interval` while held and expiring `provider_ttl` after the last
//! announcement, so a dead node's records vanish within one TTL.
//! `stop_providing` only stops the re-announcements (Kademlia has no
//! delete): other nodes forget within `provider_ttl`.
//!
//! Providers are found by libp2p peer id, which is the node's ed25519 key
//! (the same key as the data plane's `NodeId`, see [`node_id_of`]). Blobs move
//! over QUIC, so a provider's QUIC address is published too: in identify's
//! agent version and in a signed DHT record (see `addr_record` for the
//! format and why). A provider whose address is unknown is not returned.
//!
//! Membership: the transport is wrapped in a libp2p private network whose
//! pre-shared key is `SHA-256("shoal-pnet-v1" ‖ join secret)` ([`pnet_key`]),
//! so a node without the cluster's secret cannot complete any handshake,
//! let alone read or write the DHT.
//!
//! Bootstrap: every entry of `DhtConfig::bootstrap` is an `ip:port` or a
//! `host:port` (resolved to all its addresses, e.g. a headless Service) of
//! a libp2p TCP listener. They are dialed at start and re-dialed every
//! `rebootstrap_interval` while not connected; Kademlia bootstraps on each
//! new peer and on the same interval.
//!
//! Shape: [`Dht`] is a cloneable handle over a bounded channel to one task
//! (`actor`) that owns the swarm, as in rust-libp2p's file-sharing example.
//! Shutdown: cancelling the token (or [`Dht::shutdown`]) stops the task,
//! which drops the swarm and with it every connection; pending requests get
//! [`DhtError::Stopped`].

mod actor;
pub mod addr_record;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::{Keypair, PeerId, PublicKey};
use libp2p::pnet::PreSharedKey;
use sha2::{Digest as _, Sha256};
use shoal_proto::{BlobId, NodeId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default `p2p.dht_listen` (libp2p TCP).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 5053);
/// Port assumed for a bootstrap entry without one.
pub const DEFAULT_PORT: u16 = 5053;
/// Kademlia protocol name: private, so shoal never joins a public DHT.
pub const KAD_PROTOCOL: &str = "/shoal/kad/1.0.0";
/// identify's protocol version field; peers announcing another are ignored.
pub const ID_PROTOCOL: &str = "/shoal/id/1.0.0";
const COMMAND_QUEUE: usize = 256;

/// Runtime configuration of the DHT (validated by [`start`]).
#[derive(Clone, Debug)]
pub struct DhtConfig {
    /// libp2p TCP listener (`p2p.dht_listen`, default `0.0.0.0:5053`).
    pub listen: SocketAddr,
    /// Bootstrap peers (`p2p.peers`, `--peer`): `ip:port` or `host:port`
    /// of their libp2p listeners; a missing port means 5053.
    pub bootstrap: Vec<String>,
    /// Where this node's QUIC data plane is reachable. An unspecified IP
    /// (`0.0.0.0`) is filled in with the IP peers see us at.
    pub quic_addr: SocketAddr,
    /// How long other nodes keep a provider or address record after its
    /// last announcement (default 10 min).
    pub provider_ttl: Duration,
    /// Re-announcement interval of provided blobs and of the address record
    /// (default 4 min; less than half `provider_ttl`, so one lost
    /// announcement does not drop a holder).
    pub provide_interval: Duration,
    /// Re-dial of unconnected bootstrap peers, DNS re-resolution and the
    /// periodic Kademlia bootstrap (default 60 s).
    pub rebootstrap_interval: Duration,
    /// One Kademlia query (announcements, bootstrap; default 30 s).
    pub query_timeout: Duration,
    /// Blobs this node may provide, and keys it stores for others (default
    /// 100 000 each).
    pub max_keys: usize,
}

impl DhtConfig {
    /// Defaults for everything but the addresses.
    pub fn new(listen: SocketAddr, quic_addr: SocketAddr) -> Self {
        Self {
            listen,
            bootstrap: Vec::new(),
            quic_addr,
            provider_ttl: Duration::from_secs(600),
            provide_interval: Duration::from_secs(240),
            rebootstrap_interval: Duration::from_secs(60),
            query_timeout: Duration::from_secs(30),
            max_keys: 100_000,
        }
    }

    fn validate(&self) -> Result<Vec<BootstrapTarget>, DhtError> {
        let bad = |field, problem| Err(DhtError::Config { field, problem });
        if self.quic_addr.port() == 0 {
            return bad("quic_addr", "needs a port");
        }
        if self.provide_interval.is_zero() || self.provide_interval * 2 > self.provider_ttl {
            return bad(
                "provide_interval",
                "must be non-zero and at most provider_ttl / 2",
            );
        }
        if self.rebootstrap_interval.is_zero() || self.query_timeout.is_zero() {
            return bad("rebootstrap_interval", "and query_timeout must be non-zero");
        }
        if self.max_keys == 0 {
            return bad("max_keys", "must be at least 1");
        }
        self.bootstrap
            .iter()
            .map(|s| {
                BootstrapTarget::parse(s).ok_or(DhtError::Config {
                    field: "bootstrap",
                    problem: "entries must be ip:port or host:port",
                })
            })
            .collect()
    }
}

/// What [`Dht::status`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DhtStatus {
    /// Members in the routing table.
    pub peers: usize,
    /// Members with an open connection now.
    pub connected: usize,
    /// Outbound connections that failed (peer down, or not a member: with
    /// another join secret the handshake cannot complete).
    pub failed_dials: u64,
    /// Inbound connections whose handshake failed (not a member).
    pub refused_inbound: u64,
}

/// A holder of a blob, as the data plane dials it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Provider {
    pub node: NodeId,
    pub quic_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    #[error("dht config: {field} {problem}")]
    Config {
        field: &'static str,
        problem: &'static str,
    },
    #[error("the join secret must be at least {min} bytes", min = super::membership::MIN_SECRET_LEN)]
    SecretTooShort,
    #[error("the node key is not an ed25519 key")]
    NotEd25519,
    #[error("noise setup")]
    Noise(#[from] libp2p::noise::Error),
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("too many provided blobs (dht.max_keys)")]
    Store(#[from] libp2p::kad::store::Error),
    #[error("the DHT has stopped")]
    Stopped,
}

/// Handle to the running DHT; clones share it.
#[derive(Clone)]
pub struct Dht {
    tx: mpsc::Sender<actor::Command>,
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    local_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Starts the DHT: listens on `cfg.listen`, dials the bootstrap peers and
/// serves until `cancel` (or [`Dht::shutdown`]). `keypair` must be the
/// node's ed25519 identity (`Identity::keypair`), `join_secret` the raw
/// cluster secret.
pub async fn start(
    cfg: DhtConfig,
    keypair: Keypair,
    join_secret: &[u8],
    cancel: CancellationToken,
) -> Result<Dht, DhtError> {
    let bootstrap = cfg.validate()?;
    if join_secret.len() < super::membership::MIN_SECRET_LEN {
        return Err(DhtError::SecretTooShort);
    }
    let node_id = node_id_of(&keypair.public().to_peer_id()).ok_or(DhtError::NotEd25519)?;
    let (swarm, local_addr) = actor::build_swarm(&cfg, &keypair, pnet_key(join_secret)).await?;
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let cancel = cancel.child_token();
    let tracker = TaskTracker::new();
    let span = tracing::info_span!("dht", node = %node_id.short(), addr = %local_addr);
    let actor = actor::Actor::new(cfg, keypair, node_id, swarm, bootstrap, rx, local_addr);
    tracker.spawn(tracing::Instrument::instrument(
        actor.run(cancel.clone()),
        span,
    ));
    tracker.close();
    tracing::info!(node = %node_id, addr = %local_addr, "dht listening");
    Ok(Dht {
        tx,
        inner: Arc::new(Inner {
            node_id,
            local_addr,
            cancel,
            tracker,
        }),
    })
}

impl Dht {
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The bound libp2p TCP address (useful with port 0; an unspecified
    /// listen IP stays unspecified).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Announces that this node holds `blob`, now and every
    /// `provide_interval` until [`Dht::stop_providing`]. Returns once the
    /// record is stored locally; the announcement proceeds in the
    /// background (and is repeated when the node first finds peers).
    pub async fn provide(&self, blob: &BlobId) -> Result<(), DhtError> {
        self.ask(|reply| actor::Command::Provide {
            key: blob_key(blob),
            reply,
        })
        .await?
    }

    /// Stops announcing `blob`; other nodes forget it within `provider_ttl`.
    pub async fn stop_providing(&self, blob: &BlobId) -> Result<(), DhtError> {
        self.ask(|reply| actor::Command::StopProviding {
            key: blob_key(blob),
            reply,
        })
        .await
    }

    /// Up to `limit` holders of `blob` other than this node, with their
    /// QUIC addresses, found within `timeout` (whatever was found by then).
    pub async fn find_providers(
        &self,
        blob: &BlobId,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<Provider>, DhtError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.ask(|reply| actor::Command::FindProviders {
            key: blob_key(blob),
            limit,
            deadline: tokio::time::Instant::now() + timeout,
            reply,
        })
        .await
    }

    /// Members in this node's routing table.
    pub async fn peers(&self) -> Result<usize, DhtError> {
        Ok(self.status().await?.peers)
    }

    /// Counters for `shoal status` and metrics.
    pub async fn status(&self) -> Result<DhtStatus, DhtError> {
        self.ask(|reply| actor::Command::Status { reply }).await
    }

    /// Stops the DHT task (closing every connection) and waits for it.
    /// Idempotent; other clones get [`DhtError::Stopped`] afterwards.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.wait().await;
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> actor::Command,
    ) -> Result<T, DhtError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| DhtError::Stopped)?;
        rx.await.map_err(|_| DhtError::Stopped)
    }
}

impl std::fmt::Debug for Dht {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dht")
            .field("node_id", &self.inner.node_id)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// The private-network key of a cluster: `SHA-256("shoal-pnet-v1" ‖ secret)`.
pub fn pnet_key(join_secret: &[u8]) -> PreSharedKey {
    let mut h = Sha256::new();
    h.update(b"shoal-pnet-v1");
    h.update(join_secret);
    PreSharedKey::new(h.finalize().into())
}

/// The DHT key of a blob: its digest's raw bytes (32 for sha256, 64 for
/// sha512, so the two can never collide).
pub fn blob_key(blob: &BlobId) -> libp2p::kad::RecordKey {
    libp2p::kad::RecordKey::new(&blob.bytes())
}

/// The node id of a libp2p peer id, if it is an (inlined) ed25519 key —
/// the inverse of `identity::peer_id_of`.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let hash = peer.as_ref();
    // Code 0 is the identity multihash: ed25519 keys are inlined.
    if hash.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    Some(NodeId::from_bytes(key.try_into_ed25519().ok()?.to_bytes()))
}

/// One `DhtConfig::bootstrap` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BootstrapTarget {
    Addr(SocketAddr),
    /// Resolved anew on every re-bootstrap.
    Dns(String),
}

impl BootstrapTarget {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Some(Self::Addr(addr));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(Self::Addr(SocketAddr::new(ip, DEFAULT_PORT)));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok()?),
            None => (s, DEFAULT_PORT),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if host.is_empty() || host.len() > 253 || !host.chars().all(valid) {
            return None;
        }
        Some(Self::Dns(format!("{host}:{port}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::identity::{peer_id_of, Identity};

    #[test]
    fn peer_ids_are_node_ids() {
        let id = Identity::generate();
        assert_eq!(node_id_of(&id.peer_id()), Some(id.node_id()));
        assert_eq!(
            peer_id_of(&id.node_id()).expect("ed25519"),
            id.keypair().public().to_peer_id()
        );
        assert_eq!(node_id_of(&PeerId::random()), None);
    }

    #[test]
    fn pnet_keys_depend_on_the_secret() {
        assert!(pnet_key(&[1; 32]) == pnet_key(&[1; 32]));
        assert!(pnet_key(&[1; 32]) != pnet_key(&[2; 32]));
    }

    #[test]
    fn blob_keys_are_raw_digests() {
        let blob = BlobId::sha256(b"layer");
        assert_eq!(blob_key(&blob).to_vec(), blob.bytes().to_vec());
    }

    #[test]
    fn bootstrap_entries() {
        use BootstrapTarget::*;
        let p = |s| BootstrapTarget::parse(s);
        assert_eq!(
            p("10.0.0.1:7000"),
            Some(Addr("10.0.0.1:7000".parse().expect("addr")))
        );
        assert_eq!(
            p("10.0.0.1"),
            Some(Addr("10.0.0.1:5053".parse().expect("addr")))
        );
        assert_eq!(p("[::1]:9"), Some(Addr("[::1]:9".parse().expect("addr"))));
        assert_eq!(
            p("shoal.kube-system.svc"),
            Some(Dns("shoal.kube-system.svc:5053".into()))
        );
        assert_eq!(p("nodes.local:6000"), Some(Dns("nodes.local:6000".into())));
        assert_eq!(p("nodes.local:x"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("a b:1"), None);
        let mut cfg = DhtConfig::new(DEFAULT_LISTEN, "0.0.0.0:5052".parse().expect("addr"));
        assert!(cfg.validate().is_ok());
        cfg.bootstrap.push("bad host".into());
        assert!(matches!(
            cfg.validate(),
            Err(DhtError::Config {
                field: "bootstrap",
                ..
            })
        ));
    }
}
