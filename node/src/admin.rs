//! The local admin API: health, Prometheus metrics, and the status the
//! `shoal status` command prints. Bound to loopback by default: it tells
//! what is cached, so it is not for the network.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::download::Downloads;
use crate::metrics::{Metrics, Totals};
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub downloads: Downloads,
    pub metrics: Arc<Metrics>,
    pub info: Arc<NodeInfo>,
    pub mounts: crate::mount::Mounts,
    pub peering: Option<crate::peering::Peering>,
}

/// Static facts about the running node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub version: String,
    pub data_dir: String,
    pub listen: String,
    pub admin: String,
    pub upstreams: Vec<String>,
    pub started_at_ms: u64,
}

/// `GET /api/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeInfo,
    pub store: StoreStatus,
    pub traffic: Traffic,
    pub downloads_in_flight: usize,
    /// The node's cluster side; absent on a standalone node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p: Option<P2pStatus>,
    pub blobs: Vec<BlobStatus>,
}

pub use crate::peering::{PeeringStatus as P2pStatus, SchedulerStatus};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreStatus {
    pub bytes: u64,
    pub blobs: usize,
    pub complete: usize,
    pub quota_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Traffic {
    pub served_bytes: u64,
    pub origin_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Blob bytes obtained from peers (verified).
    #[serde(default)]
    pub peer_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobStatus {
    pub digest: String,
    pub size: u64,
    pub complete: bool,
    pub present_bytes: u64,
    pub public: bool,
    pub repos: Vec<String>,
}

pub fn router(state: AdminState) -> Router {
    let mounts = crate::mount::api::router(state.mounts.clone());
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .with_state(state)
        .merge(mounts)
}

/// Readiness: this router is served only after the store was opened
/// (recovery done) and the mirror and admin listeners were bound, and stops
/// accepting at shutdown, so answering means ready; it also checks the data
/// directory is still there.
async fn readyz(State(st): State<AdminState>) -> Response {
    match std::fs::metadata(&st.info.data_dir) {
        Ok(m) if m.is_dir() => "ready".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "data directory is gone").into_response(),
    }
}

async fn metrics(State(st): State<AdminState>) -> Response {
    st.metrics
        .observe_store(&st.store, std::path::Path::new(&st.info.data_dir));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn status(State(st): State<AdminState>) -> Response {
    let store = st.store.clone();
    let blobs = match tokio::task::spawn_blocking(move || store.blobs()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let usage = st.store.usage();
    let t = &st.metrics.totals;
    let status = Status {
        node: (*st.info).clone(),
        store: StoreStatus {
            bytes: usage.bytes,
            blobs: usage.blobs,
            complete: usage.complete,
            quota_bytes: usage.quota_bytes,
        },
        traffic: Traffic {
            served_bytes: Totals::get(&t.served_bytes),
            origin_bytes: Totals::get(&t.origin_bytes),
            cache_hits: Totals::get(&t.cache_hits),
            cache_misses: Totals::get(&t.cache_misses),
            peer_bytes: Totals::get(&t.peer_bytes),
        },
        downloads_in_flight: st.downloads.active(),
        p2p: match &st.peering {
            Some(p) => Some(p.status().await),
            None => None,
        },
        blobs: blobs
            .into_iter()
            .map(|b| BlobStatus {
                digest: b.id.to_string(),
                size: b.size,
                complete: b.complete,
                present_bytes: b.present.len(),
                public: b.public,
                repos: b
                    .repos
                    .iter()
                    .map(|r| format!("{}/{}", r.upstream, r.repo))
                    .collect(),
            })
            .collect(),
    };
    Json(status).into_response()
}
