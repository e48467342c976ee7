//! `P2pMetrics`: data plane counters, passed in (no globals). Clones share
//! the same series; `register` adds them to a registry under `p2p_`.
//!
//! Per-peer series are labelled with the peer's full node id, for at most
//! [`MAX_PEER_SERIES`] peers; bytes of peers met after that are counted
//! under `peer="other"`, so a large cluster (or a peer minting identities)
//! cannot grow the scrape without bound.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_proto::NodeId;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Most peers with series of their own.
pub const MAX_PEER_SERIES: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct P2pMetrics {
    /// Peers that have series of their own (at most [`MAX_PEER_SERIES`]).
    labelled_peers: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<NodeId>>>,
    /// Range bytes sent to each peer (counted once written to QUIC).
    pub upload_bytes: Family<PeerLabels, Counter>,
    /// Range bytes received from each peer.
    pub download_bytes: Family<PeerLabels, Counter>,
    /// Range requests served, by outcome (ok, busy, not_found,
    /// not_present, out_of_range, aborted, error).
    pub upload_requests: Family<OutcomeLabels, Counter>,
    /// Connections refused or failed in the handshake, by reason
    /// (join_refused, version, timeout, protocol).
    pub handshake_failures: Family<OutcomeLabels, Counter>,
    /// Uploads in progress (holding a slot).
    pub uploads_active: Gauge,
    /// Member connections open (both directions).
    pub connections: Gauge,
    /// All range bytes sent to peers (the sum of `upload_bytes`).
    pub upload_total: Counter,
    /// Range requests for bytes not held yet of a blob this node fetches under the origin lease.
    pub seed_requests: Counter,
    /// Bytes this node fetched from the origin ahead of its sequential fill because peers asked.
    pub seed_bytes: Counter,
}

impl P2pMetrics {
    /// Registers every series (sharing state with `self`) under `p2p_`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("p2p");
        sub.register(
            "upload_bytes",
            "Range bytes sent to peers, by peer node id",
            self.upload_bytes.clone(),
        );
        sub.register(
            "download_bytes",
            "Range bytes received from peers, by peer node id",
            self.download_bytes.clone(),
        );
        sub.register(
            "upload_requests",
            "Range requests from peers, by outcome",
            self.upload_requests.clone(),
        );
        sub.register(
            "handshake_failures",
            "Peer connections refused or failed in the membership handshake, by reason",
            self.handshake_failures.clone(),
        );
        sub.register(
            "uploads_active",
            "Range uploads holding a slot",
            self.uploads_active.clone(),
        );
        sub.register(
            "connections",
            "Open member connections",
            self.connections.clone(),
        );
        sub.register(
            "seed_requests",
            "Range requests for bytes not held yet of a blob this node fetches under the origin lease",
            self.seed_requests.clone(),
        );
        sub.register(
            "seed_bytes",
            "Bytes fetched from the origin ahead of the sequential fill because peers asked for them",
            self.seed_bytes.clone(),
        );
    }

    /// Bytes sent to all peers so far.
    pub fn uploaded_total(&self) -> u64 {
        self.upload_total.get()
    }

    /// Bytes sent to `peer` so far.
    pub fn uploaded_to(&self, peer: &NodeId) -> u64 {
        self.upload_bytes
            .get_or_create(&self.peer_labels(peer))
            .get()
    }

    /// Bytes received from `peer` so far.
    pub fn downloaded_from(&self, peer: &NodeId) -> u64 {
        self.download_bytes
            .get_or_create(&self.peer_labels(peer))
            .get()
    }

    pub fn upload_outcome(&self, outcome: &'static str) -> u64 {
        self.upload_requests
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }

    pub fn handshake_failure_count(&self, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&OutcomeLabels { outcome: reason })
            .get()
    }

    pub(crate) fn count_seed_request(&self) {
        self.seed_requests.inc();
    }

    pub(crate) fn count_upload(&self, outcome: &'static str) {
        self.upload_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn count_handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&OutcomeLabels { outcome: reason })
            .inc();
    }

    pub(crate) fn upload_counter(&self, peer: &NodeId) -> Counter {
        self.upload_bytes
            .get_or_create(&self.peer_labels(peer))
            .clone()
    }

    pub(crate) fn download_counter(&self, peer: &NodeId) -> Counter {
        self.download_bytes
            .get_or_create(&self.peer_labels(peer))
            .clone()
    }

    /// The peer's own label while fewer than [`MAX_PEER_SERIES`] peers have
    /// one, else `other`.
    fn peer_labels(&self, peer: &NodeId) -> PeerLabels {
        let mut seen = self
            .labelled_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let own = seen.contains(peer) || {
            let room = seen.len() < MAX_PEER_SERIES;
            if room {
                seen.insert(*peer);
            }
            room
        };
        PeerLabels {
            peer: if own {
                peer.to_string()
            } else {
                "other".to_owned()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_series_are_capped() {
        let m = P2pMetrics::default();
        let peer = |i: usize| {
            let mut b = [0u8; shoal_proto::node_id::NODE_ID_LEN];
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            NodeId::from_bytes(b)
        };
        for i in 0..MAX_PEER_SERIES + 10 {
            m.upload_counter(&peer(i)).inc_by(1);
        }
        // The first peers keep their own series, later ones share `other`.
        assert_eq!(m.uploaded_to(&peer(0)), 1);
        assert_eq!(m.uploaded_to(&peer(MAX_PEER_SERIES + 5)), 10);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        let series = out
            .lines()
            .filter(|l| l.starts_with("p2p_upload_bytes_total{"))
            .count();
        assert_eq!(series, MAX_PEER_SERIES + 1, "{out}");
    }
}
