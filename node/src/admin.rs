//! The read-only admin listener: health, Prometheus metrics, and the status
//! the `shoal status` command prints. Nothing here changes the node (that is
//! the control socket's job, `control`): it answers `GET`/`HEAD` only, so a
//! Prometheus server or a kubelet probe can reach it without reaching
//! anything that mutates. A request whose `Host` header names something other
//! than an IP literal, `localhost` or one of `admin_hosts` is refused, so a
//! web page cannot read it through DNS rebinding. Bound to loopback by
//! default: the status tells what is cached — digests and sizes, never the
//! (possibly private) repository names they came from, which only the control
//! socket's `/api/v1/status` lists (`shoal status --control`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
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
    pub peering: Option<crate::peering::Peering>,
    /// Host names accepted besides IP literals and `localhost` (`admin_hosts`).
    pub hosts: Arc<Vec<String>>,
    pub snapshotter: Option<crate::snapshotter::Snapshotter>,
}

/// Static facts about the running node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub version: String,
    pub data_dir: String,
    pub listen: String,
    pub admin: String,
    /// The control socket (state-changing calls).
    #[serde(default)]
    pub control: String,
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
    /// containerd's snapshotter: snapshots and the images mounted under containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<crate::snapshotter::SnapshotterStatus>,
    pub blobs: Vec<BlobStatus>,
}

pub use crate::peering::{PeeringStatus as P2pStatus, SchedulerStatus};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreStatus {
    pub bytes: u64,
    pub blobs: usize,
    pub complete: usize,
    /// The byte quota, or the filesystem's size under a filesystem quota; 0: unlimited.
    pub quota_bytes: u64,
    /// Bytes written and not committed yet.
    #[serde(default)]
    pub inflight_bytes: u64,
    /// Eviction starts above this (0: never).
    #[serde(default)]
    pub high_watermark_bytes: u64,
    /// What is measured against it: content bytes, or the filesystem's used bytes.
    #[serde(default)]
    pub measured_bytes: u64,
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
    /// Where it was fetched or confirmed: `upstream/repo`, with ` (open)` where any client of
    /// that upstream and repository may read it. Listed on the control socket only (empty on
    /// the admin listener: repository names may be private).
    #[serde(default)]
    pub repos: Vec<String>,
}

pub fn router(state: AdminState) -> Router {
    let hosts = state.hosts.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .with_state(state)
        .layer(middleware::from_fn(move |req, next| {
            guard(hosts.clone(), req, next)
        }))
}

/// Read-only, and only for requests that name this host by address, `localhost` or a configured
/// name.
async fn guard(hosts: Arc<Vec<String>>, req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "the admin listener is read-only; state-changing calls go to the control socket (--control)\n",
        )
            .into_response();
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host {
        if !host_allowed(host, &hosts) {
            tracing::info!(host, "admin request refused: unknown Host (DNS rebinding?)");
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "this Host is not one the admin listener answers to (admin_hosts)\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Whether a `Host` value (`name[:port]`, `[v6][:port]`) is an IP literal, `localhost` or one of
/// `names`.
fn host_allowed(host: &str, names: &[String]) -> bool {
    // `[v6]` or `[v6]:port`; otherwise `name` or `name:port`, the port all digits.
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => return port_ok(port),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    if port.is_some_and(|p| !port_ok(p)) {
        return false;
    }
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn port_ok(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
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
    status_of(&st, false).await
}

/// The control socket's status: the admin listener's, with each blob's repositories.
pub fn control_router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/api/v1/status",
            get(|State(st): State<AdminState>| async move { status_of(&st, true).await }),
        )
        .with_state(state)
}

async fn status_of(st: &AdminState, repos: bool) -> Response {
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
            inflight_bytes: usage.inflight_bytes,
            high_watermark_bytes: usage.high_watermark_bytes,
            measured_bytes: usage.measured_bytes,
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
        snapshotter: match &st.snapshotter {
            Some(s) => Some(s.status().await),
            None => None,
        },
        blobs: blobs
            .into_iter()
            .map(|b| BlobStatus {
                digest: b.id.to_string(),
                size: b.size,
                complete: b.complete,
                present_bytes: b.present.len(),
                repos: b
                    .repos
                    .iter()
                    .filter(|_| repos)
                    .map(|(r, open)| {
                        let open = if open { " (open)" } else { "" };
                        format!("{}/{}{open}", r.upstream, r.repo)
                    })
                    .collect(),
            })
            .collect(),
    };
    Json(status).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let names = vec!["node-1.example".to_owned()];
        for ok in [
            "127.0.0.1:5051",
            "10.1.2.3",
            "[::1]:5051",
            "localhost:5051",
            "LOCALHOST",
            "node-1.example:5051",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in [
            "evil.example:5051",
            "127.0.0.1.nip.io",
            "[::1",
            "node-2.example",
            "[::1]evil",
            "10.0.0.1:evil",
            "[::1]:",
            "127.0.0.1:99999",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }
}
