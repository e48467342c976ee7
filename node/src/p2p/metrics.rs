//! `P2pMetrics`: data plane counters, passed in (no globals). Clones share
//! the same series; `register` adds them to a registry under `p2p_`.
//!
//! Per-peer series are labelled with the peer's full node id; their number
//! is bounded by the cluster's size.

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

#[derive(Clone, Debug, Default)]
pub struct P2pMetrics {
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
    }

    /// Bytes sent to all peers so far.
    pub fn uploaded_total(&self) -> u64 {
        self.upload_total.get()
    }

    /// Bytes sent to `peer` so far.
    pub fn uploaded_to(&self, peer: &NodeId) -> u64 {
        self.upload_bytes.get_or_create(&peer_labels(peer)).get()
    }

    /// Bytes received from `peer` so far.
    pub fn downloaded_from(&self, peer: &NodeId) -> u64 {
        self.download_bytes.get_or_create(&peer_labels(peer)).get()
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
        self.upload_bytes.get_or_create(&peer_labels(peer)).clone()
    }

    pub(crate) fn download_counter(&self, peer: &NodeId) -> Counter {
        self.download_bytes
            .get_or_create(&peer_labels(peer))
            .clone()
    }
}

fn peer_labels(peer: &NodeId) -> PeerLabels {
    PeerLabels {
        peer: peer.to_string(),
    }
}
