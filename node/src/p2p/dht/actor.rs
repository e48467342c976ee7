//! The task that owns the libp2p swarm: it answers [`Command`]s from the
//! `Dht` handles and reacts to swarm events.
//!
//! Invariants:
//! - Only this task touches the swarm; requests that span several
//!   Kademlia queries (a provider lookup, then address lookups) are state
//!   machines in `lookups`, keyed by a lookup id, finished by their last
//!   query or their deadline, whichever comes first — a reply is never
//!   later than the caller's deadline.
//! - At most one address-record query per peer is in flight (`waiting`
//!   holds an entry exactly while one is); every lookup needing that peer
//!   waits on it.
//! - The local node is never a returned provider.
//! - Records from other nodes are stored only after checks (`StoreInserts::
//!   FilterBoth`): address records must carry their node's signature and
//!   must not be older than the stored one.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::core::transport::Transport as _;
use libp2p::core::{upgrade, ConnectedPoint};
use libp2p::identity::{Keypair, PeerId};
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{
    self, GetProvidersOk, GetRecordOk, Mode, ProviderRecord, QueryId, QueryResult, Quorum, Record,
    RecordKey, StoreInserts,
};
use libp2p::multiaddr::{Multiaddr, Protocol};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::{dial_opts::DialOpts, ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, tcp, yamux, StreamProtocol, Swarm};
use shoal_proto::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::addr_record::{self, AddrRecord};
use super::{
    node_id_of, BootstrapTarget, DhtConfig, DhtError, DhtStatus, Provider, ID_PROTOCOL,
    KAD_PROTOCOL,
};

/// TCP connect + pnet + noise + yamux negotiation.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection no protocol uses is closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Address records are tiny; anything bigger is refused.
const MAX_RECORD_BYTES: usize = 256;

pub(super) enum Command {
    Provide {
        key: RecordKey,
        reply: oneshot::Sender<Result<(), DhtError>>,
    },
    StopProviding {
        key: RecordKey,
        reply: oneshot::Sender<()>,
    },
    FindProviders {
        key: RecordKey,
        limit: usize,
        deadline: Instant,
        reply: oneshot::Sender<Vec<Provider>>,
    },
    Status {
        reply: oneshot::Sender<DhtStatus>,
    },
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
}

/// Builds the swarm and starts listening; returns it with the bound
/// address (the configured IP, the real port).
pub(super) async fn build_swarm(
    cfg: &DhtConfig,
    keypair: &Keypair,
    psk: PreSharedKey,
) -> Result<(Swarm<Behaviour>, SocketAddr), DhtError> {
    let peer_id = keypair.public().to_peer_id();
    let transport = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .boxed();

    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg
        .set_query_timeout(cfg.query_timeout)
        .set_record_ttl(Some(cfg.provider_ttl))
        .set_publication_interval(Some(cfg.provide_interval))
        .set_replication_interval(Some(cfg.provide_interval))
        .set_provider_record_ttl(Some(cfg.provider_ttl))
        .set_provider_publication_interval(Some(cfg.provide_interval))
        .set_periodic_bootstrap_interval(Some(cfg.rebootstrap_interval))
        .set_record_filtering(StoreInserts::FilterBoth);
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_records: cfg.max_keys,
            max_value_bytes: MAX_RECORD_BYTES,
            max_provided_keys: cfg.max_keys,
            max_providers_per_key: kad::K_VALUE.get(),
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    // Without an external address kad would stay a client and answer
    // nothing; every member serves the DHT.
    kad.set_mode(Some(Mode::Server));
    let identify = identify::Behaviour::new(
        identify::Config::new(ID_PROTOCOL.to_owned(), keypair.public())
            .with_agent_version(addr_record::agent_version(cfg.quic_addr)),
    );
    let mut swarm = Swarm::new(
        transport,
        Behaviour { kad, identify },
        peer_id,
        libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(IDLE_TIMEOUT),
    );

    let listen_err = |source| DhtError::Listen {
        addr: cfg.listen,
        source,
    };
    swarm
        .listen_on(multiaddr(cfg.listen))
        .map_err(|e| listen_err(std::io::Error::other(e.to_string())))?;
    let bound = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(addr) = socket_addr(&address) {
                        return Ok(SocketAddr::new(cfg.listen.ip(), addr.port()));
                    }
                }
                SwarmEvent::ListenerError { error, .. } => return Err(error),
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(reason
                        .err()
                        .unwrap_or_else(|| std::io::Error::other("listener closed")))
                }
                _ => {}
            }
        }
    };
    let local_addr = tokio::time::timeout(Duration::from_secs(10), bound)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no listen address after 10 s")))
        .map_err(listen_err)?;
    Ok((swarm, local_addr))
}

/// A peer's QUIC address as we learned it.
struct Known {
    addr: SocketAddr,
    /// The record's `seq`; `None` if identify told us.
    seq: Option<u64>,
    expires: Instant,
}

/// One `find_providers` request.
struct Lookup {
    limit: usize,
    /// Providers in the order found, without the local node.
    found: Vec<PeerId>,
    /// Providers whose address record is being looked up.
    pending: HashSet<PeerId>,
    reply: oneshot::Sender<Vec<Provider>>,
}

type Deadline = Pin<Box<dyn Future<Output = u64> + Send>>;

pub(super) struct Actor {
    cfg: DhtConfig,
    keypair: Keypair,
    node_id: NodeId,
    local_peer: PeerId,
    listen: SocketAddr,
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    bootstrap: Vec<BootstrapTarget>,
    /// Every bootstrap address dialed → the peer that answered there.
    bootstrap_peers: HashMap<SocketAddr, Option<PeerId>>,
    /// Bootstrap addresses that turned out to be this node.
    self_addrs: HashSet<SocketAddr>,
    /// The QUIC address we publish; `None` while its IP is unknown.
    quic: Option<SocketAddr>,
    /// Has the routing table had a peer yet (then announcements go out).
    joined: bool,
    conn_ips: HashMap<ConnectionId, IpAddr>,
    addrs: HashMap<PeerId, Known>,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    provider_queries: HashMap<QueryId, u64>,
    record_queries: HashMap<QueryId, PeerId>,
    /// Lookups waiting for a peer's address record query.
    waiting: HashMap<PeerId, Vec<u64>>,
    deadlines: FuturesUnordered<Deadline>,
    resolving: JoinSet<Vec<SocketAddr>>,
    /// The counters of [`DhtStatus`].
    status: DhtStatus,
}

impl Actor {
    pub(super) fn new(
        cfg: DhtConfig,
        keypair: Keypair,
        node_id: NodeId,
        swarm: Swarm<Behaviour>,
        bootstrap: Vec<BootstrapTarget>,
        rx: mpsc::Receiver<Command>,
        listen: SocketAddr,
    ) -> Self {
        let quic = (!cfg.quic_addr.ip().is_unspecified()).then_some(cfg.quic_addr);
        Self {
            local_peer: *swarm.local_peer_id(),
            cfg,
            keypair,
            node_id,
            listen,
            swarm,
            rx,
            bootstrap,
            bootstrap_peers: HashMap::new(),
            self_addrs: HashSet::new(),
            quic,
            joined: false,
            conn_ips: HashMap::new(),
            addrs: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 0,
            provider_queries: HashMap::new(),
            record_queries: HashMap::new(),
            waiting: HashMap::new(),
            deadlines: FuturesUnordered::new(),
            resolving: JoinSet::new(),
            status: DhtStatus::default(),
        }
    }

    pub(super) async fn run(mut self, cancel: CancellationToken) {
        self.publish_self();
        let mut rebootstrap = tokio::time::interval(self.cfg.rebootstrap_interval);
        rebootstrap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                command = self.rx.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(lookup) = self.deadlines.next(), if !self.deadlines.is_empty() => {
                    self.complete(lookup);
                }
                _ = rebootstrap.tick() => self.rebootstrap(),
                Some(resolved) = self.resolving.join_next(), if !self.resolving.is_empty() => {
                    for addr in resolved.unwrap_or_default() {
                        self.dial_bootstrap(addr);
                    }
                }
            }
        }
        self.resolving.abort_all();
        tracing::debug!("dht stopped");
    }

    fn kad(&mut self) -> &mut kad::Behaviour<MemoryStore> {
        &mut self.swarm.behaviour_mut().kad
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Provide { key, reply } => {
                let result = self.kad().start_providing(key).map(drop);
                let _ = reply.send(result.map_err(DhtError::from));
            }
            Command::StopProviding { key, reply } => {
                self.kad().stop_providing(&key);
                let _ = reply.send(());
            }
            Command::FindProviders {
                key,
                limit,
                deadline,
                reply,
            } => {
                let id = self.next_lookup;
                self.next_lookup += 1;
                let query = self.kad().get_providers(key);
                self.provider_queries.insert(query, id);
                self.lookups.insert(
                    id,
                    Lookup {
                        limit,
                        found: Vec::new(),
                        pending: HashSet::new(),
                        reply,
                    },
                );
                self.deadlines.push(Box::pin(async move {
                    tokio::time::sleep_until(deadline).await;
                    id
                }));
            }
            Command::Status { reply } => {
                let status = DhtStatus {
                    peers: self.kad().kbuckets().map(|b| b.num_entries()).sum(),
                    connected: self.swarm.connected_peers().count(),
                    ..self.status
                };
                let _ = reply.send(status);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                connection_id,
                peer_id,
                info,
            })) => self.on_identify(peer_id, connection_id, info),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                if let Some(addr) = socket_addr(remote) {
                    self.conn_ips.insert(connection_id, addr.ip());
                    if endpoint.is_dialer() {
                        if let Some(slot) = self.bootstrap_peers.get_mut(&addr) {
                            *slot = Some(peer_id);
                        }
                    }
                }
                tracing::debug!(peer = %peer_id, addr = %remote, "connected");
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.conn_ips.remove(&connection_id);
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                if let DialError::LocalPeerId { address } = &error {
                    self.self_addrs.extend(socket_addr(address));
                } else {
                    self.status.failed_dials += 1;
                }
                // A peer with another join secret fails here (pnet garbles
                // the noise handshake); so does a peer that is down.
                tracing::debug!(%error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                self.status.refused_inbound += 1;
                tracing::debug!(from = %send_back_addr, %error, "inbound connection refused");
            }
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(result) => {
                    let found = match result {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => providers,
                        _ => HashSet::new(),
                    };
                    self.on_providers(id, found, step.last);
                }
                QueryResult::GetRecord(result) => {
                    let record = match result {
                        Ok(GetRecordOk::FoundRecord(found)) => Some(found.record),
                        _ => None,
                    };
                    self.on_record(id, record, step.last);
                }
                QueryResult::StartProviding(Err(e)) | QueryResult::RepublishProvider(Err(e)) => {
                    tracing::debug!(error = %e, "provider announcement incomplete");
                }
                QueryResult::PutRecord(Err(e)) | QueryResult::RepublishRecord(Err(e)) => {
                    tracing::debug!(error = %e, "address record publication incomplete");
                }
                _ => {}
            },
            kad::Event::InboundRequest { request } => match request {
                kad::InboundRequest::PutRecord {
                    record: Some(record),
                    ..
                } => self.accept_record(record),
                kad::InboundRequest::AddProvider {
                    record: Some(record),
                } => self.accept_provider(record),
                _ => {}
            },
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } if is_new_peer && !self.joined => {
                tracing::info!(%peer, "joined the DHT");
                self.joined = true;
                self.announce_all();
            }
            _ => {}
        }
    }

    /// Provider announcements made before we had peers reached nobody:
    /// make them again, with our address record.
    fn announce_all(&mut self) {
        let kad = self.kad();
        let keys: Vec<RecordKey> = kad.store_mut().provided().map(|r| r.key.clone()).collect();
        for key in keys {
            let _ = kad.start_providing(key);
        }
        self.publish_self();
    }

    fn publish_self(&mut self) {
        let Some(addr) = self.quic else { return };
        let seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let Some(value) = (AddrRecord { addr, seq }).encode(&self.node_id, &self.keypair) else {
            return;
        };
        let record = Record::new(addr_record::record_key(&self.node_id), value);
        if let Err(e) = self.kad().put_record(record, Quorum::One) {
            tracing::warn!(error = %e, "cannot store our address record");
        }
    }

    fn on_identify(&mut self, peer: PeerId, conn: ConnectionId, info: identify::Info) {
        if info.protocol_version != ID_PROTOCOL {
            tracing::debug!(%peer, version = %info.protocol_version, "not a shoal peer");
            return;
        }
        if info.protocols.contains(&StreamProtocol::new(KAD_PROTOCOL)) {
            for addr in info.listen_addrs {
                if self.routable(&addr) {
                    self.kad().add_address(&peer, addr);
                }
            }
        }
        let conn_ip = self.conn_ips.get(&conn).copied();
        if let Some(addr) = addr_record::parse_agent(&info.agent_version, conn_ip) {
            let expires = Instant::now() + self.cfg.provider_ttl;
            let known = Known {
                addr,
                seq: None,
                expires,
            };
            self.addrs.insert(peer, known);
        }
        if self.quic.is_none() {
            let observed = ip_of(&info.observed_addr).filter(|ip| !ip.is_unspecified());
            if let Some(ip) = observed {
                self.quic = Some(SocketAddr::new(ip, self.cfg.quic_addr.port()));
                tracing::info!(quic = ?self.quic, "QUIC address learned from peers");
                self.publish_self();
            }
        }
    }

    /// A listen address worth keeping for a peer: TCP on a real IP, and
    /// loopback only if we listen on loopback ourselves (tests).
    fn routable(&self, addr: &Multiaddr) -> bool {
        socket_addr(addr).is_some_and(|a| {
            !a.ip().is_unspecified() && (!a.ip().is_loopback() || self.listen.ip().is_loopback())
        })
    }

    fn accept_record(&mut self, record: Record) {
        let Some(node) = addr_record::node_of_key(record.key.as_ref()) else {
            tracing::debug!("refused a record that is not an address record");
            return;
        };
        if node == self.node_id {
            return;
        }
        let Some(new) = AddrRecord::verify(&node, &record.value) else {
            tracing::debug!(%node, "refused an address record with a bad signature");
            return;
        };
        let store = self.kad().store_mut();
        let older = store
            .get(&record.key)
            .and_then(|old| AddrRecord::verify(&node, &old.value))
            .is_some_and(|old| old.seq > new.seq);
        if older {
            return;
        }
        if let Err(e) = store.put(record) {
            tracing::debug!(error = %e, "address record not stored");
        }
    }

    fn accept_provider(&mut self, record: ProviderRecord) {
        // Keys are raw sha256 or sha512 digests.
        if !matches!(record.key.as_ref().len(), 32 | 64) {
            return;
        }
        if let Err(e) = self.kad().store_mut().add_provider(record) {
            tracing::debug!(error = %e, "provider record not stored");
        }
    }

    fn on_providers(&mut self, query: QueryId, providers: HashSet<PeerId>, last: bool) {
        let Some(&id) = self.provider_queries.get(&query) else {
            return;
        };
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        for peer in providers {
            if peer != self.local_peer && !lookup.found.contains(&peer) {
                lookup.found.push(peer);
            }
        }
        let enough = lookup.found.len() >= lookup.limit;
        if !(last || enough) {
            return;
        }
        self.provider_queries.remove(&query);
        if let Some(mut q) = self.kad().query_mut(&query) {
            q.finish();
        }
        self.resolve_addrs(id);
    }

    /// Second phase of a lookup: the QUIC addresses of its providers.
    fn resolve_addrs(&mut self, id: u64) {
        let now = Instant::now();
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        for peer in &lookup.found {
            if self.addrs.get(peer).is_some_and(|k| k.expires > now) {
                continue;
            }
            let Some(node) = node_id_of(peer) else {
                continue;
            };
            lookup.pending.insert(*peer);
            match self.waiting.entry(*peer) {
                Entry::Occupied(mut e) => e.get_mut().push(id),
                Entry::Vacant(e) => {
                    e.insert(vec![id]);
                    let key = RecordKey::new(&addr_record::record_key(&node));
                    let query = self.swarm.behaviour_mut().kad.get_record(key);
                    self.record_queries.insert(query, *peer);
                }
            }
        }
        if lookup.pending.is_empty() {
            self.complete(id);
        }
    }

    fn on_record(&mut self, query: QueryId, record: Option<Record>, last: bool) {
        let Some(&peer) = self.record_queries.get(&query) else {
            return;
        };
        let verified = record.and_then(|r| {
            let node = node_id_of(&peer)?;
            (addr_record::node_of_key(r.key.as_ref()) == Some(node))
                .then(|| AddrRecord::verify(&node, &r.value))
                .flatten()
        });
        if let Some(rec) = verified {
            self.learn(peer, rec);
        } else if !last {
            return;
        }
        self.record_queries.remove(&query);
        if let Some(mut q) = self.kad().query_mut(&query) {
            q.finish();
        }
        for id in self.waiting.remove(&peer).unwrap_or_default() {
            let Some(lookup) = self.lookups.get_mut(&id) else {
                continue;
            };
            lookup.pending.remove(&peer);
            if lookup.pending.is_empty() {
                self.complete(id);
            }
        }
    }

    fn learn(&mut self, peer: PeerId, rec: AddrRecord) {
        let now = Instant::now();
        let newer = match self.addrs.get(&peer) {
            None => true,
            Some(k) if k.expires <= now => true,
            Some(k) => k.seq.is_some_and(|seq| seq <= rec.seq),
        };
        if newer {
            let expires = now + self.cfg.provider_ttl;
            let known = Known {
                addr: rec.addr,
                seq: Some(rec.seq),
                expires,
            };
            self.addrs.insert(peer, known);
        }
    }

    /// Replies to lookup `id` with the providers whose address is known,
    /// and forgets it (a no-op if it already finished).
    fn complete(&mut self, id: u64) {
        let Some(lookup) = self.lookups.remove(&id) else {
            return;
        };
        let kad = &mut self.swarm.behaviour_mut().kad;
        self.provider_queries.retain(|query, lookup| {
            if *lookup != id {
                return true;
            }
            if let Some(mut q) = kad.query_mut(query) {
                q.finish();
            }
            false
        });
        for waiters in self.waiting.values_mut() {
            waiters.retain(|w| *w != id);
        }
        let now = Instant::now();
        let providers: Vec<Provider> = lookup
            .found
            .iter()
            .filter_map(|peer| {
                let known = self.addrs.get(peer).filter(|k| k.expires > now)?;
                Some(Provider {
                    node: node_id_of(peer)?,
                    quic_addr: known.addr,
                })
            })
            .take(lookup.limit)
            .collect();
        let _ = lookup.reply.send(providers);
    }

    /// Dials the bootstrap peers we are not connected to (resolving names
    /// anew) and drops expired addresses.
    fn rebootstrap(&mut self) {
        let now = Instant::now();
        self.addrs.retain(|_, k| k.expires > now);
        for target in self.bootstrap.clone() {
            match target {
                BootstrapTarget::Addr(addr) => self.dial_bootstrap(addr),
                BootstrapTarget::Dns(name) => {
                    self.resolving.spawn(async move {
                        match tokio::net::lookup_host(&name).await {
                            Ok(addrs) => addrs.collect(),
                            Err(e) => {
                                tracing::warn!(%name, error = %e, "cannot resolve bootstrap name");
                                Vec::new()
                            }
                        }
                    });
                }
            }
        }
    }

    fn dial_bootstrap(&mut self, addr: SocketAddr) {
        if addr == self.listen || self.self_addrs.contains(&addr) {
            return;
        }
        let known = self.bootstrap_peers.entry(addr).or_insert(None);
        if known.is_some_and(|peer| self.swarm.is_connected(&peer)) {
            return;
        }
        let opts = DialOpts::unknown_peer_id().address(multiaddr(addr)).build();
        if let Err(error) = self.swarm.dial(opts) {
            tracing::debug!(%addr, %error, "cannot dial bootstrap peer");
        }
    }
}

fn multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::from(addr.ip()))
        .with(Protocol::Tcp(addr.port()))
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The IP and TCP port of a multiaddr like `/ip4/1.2.3.4/tcp/5053[/p2p/…]`.
fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let port = addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(port),
        _ => None,
    })?;
    Some(SocketAddr::new(ip_of(addr)?, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiaddrs_round_trip() {
        for s in ["127.0.0.1:5053", "[fd00::2]:7"] {
            let addr: SocketAddr = s.parse().expect("addr");
            assert_eq!(socket_addr(&multiaddr(addr)), Some(addr));
        }
        let udp: Multiaddr = "/ip4/1.2.3.4/udp/5052/quic-v1".parse().expect("multiaddr");
        assert_eq!(socket_addr(&udp), None);
        assert_eq!(ip_of(&udp), Some(IpAddr::from([1, 2, 3, 4])));
    }
}
