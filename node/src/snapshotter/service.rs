//! The gRPC surface of the snapshotter: containerd's `Snapshots` service on a Unix socket, each
//! call turned into a [`Snapshotter`] request, and the one place snapshot errors become gRPC
//! statuses (containerd maps the codes back to its error classes: `NotFound`, `AlreadyExists`,
//! `FailedPrecondition`, `InvalidArgument`, `Unavailable`).
//!
//! The socket (`--snapshotter-socket`) is made like the control socket: mode 0600, owned by the
//! node's user, in a directory others cannot change; each connection's peer credentials are
//! checked again (root or the node's user: containerd runs as root).

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use prost_types::Timestamp;
use tonic::{Code, Request, Response, Status};

use super::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use super::api::snapshots::{self as pb};
use super::api::Mount;
use super::layout::MountSpec;
use super::state::{self, Kind};
use super::{Info, SnapError, Snapshotter};
use crate::control::{ControlListener, Policy};
use crate::metrics::{Metrics, OpOutcomeLabels};

/// Infos per `List` message (as containerd's own service batches them).
const LIST_BATCH: usize = 100;

/// Serves the snapshots API on `listener` until `stop`; the socket file is removed at the end.
pub async fn serve(
    listener: ControlListener,
    policy: Policy,
    snapshotter: Snapshotter,
    metrics: std::sync::Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let path = listener.path().to_owned();
    let incoming = listener.into_incoming(policy);
    let service = SnapshotsServer::new(Service {
        snapshotter,
        metrics,
    })
    .max_decoding_message_size(16 << 20);
    let result = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(service, incoming, stop)
        .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// The tonic service over a [`Snapshotter`].
pub struct Service {
    snapshotter: Snapshotter,
    metrics: std::sync::Arc<Metrics>,
}

impl Service {
    /// Counts the call and maps its error.
    fn done<T>(&self, op: &'static str, r: Result<T, SnapError>) -> Result<Response<T>, Status> {
        let r = r.map_err(|e| status(&e));
        let outcome = match &r {
            Ok(_) => "ok",
            Err(s) => outcome(s.code()),
        };
        self.metrics
            .snapshotter_requests
            .get_or_create(&OpOutcomeLabels { op, outcome })
            .inc();
        if let Err(s) = &r {
            if !matches!(
                s.code(),
                Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition
            ) {
                tracing::warn!(op, code = ?s.code(), message = s.message(), "snapshot call failed");
            }
        }
        r.map(Response::new)
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let out = self
            .snapshotter
            .prepare(r.key, parent(r.parent), sorted(r.labels), Kind::Active)
            .await
            .map(|m| pb::PrepareSnapshotResponse { mounts: mounts(m) });
        self.done("prepare", out)
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let out = self
            .snapshotter
            .prepare(r.key, parent(r.parent), sorted(r.labels), Kind::View)
            .await
            .map(|m| pb::ViewSnapshotResponse { mounts: mounts(m) });
        self.done("view", out)
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let out = self
            .snapshotter
            .mounts(req.into_inner().key)
            .await
            .map(|m| pb::MountsResponse { mounts: mounts(m) });
        self.done("mounts", out)
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let out = self
            .snapshotter
            .commit(r.name, r.key, sorted(r.labels))
            .await;
        self.done("commit", out)
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let out = self.snapshotter.remove(req.into_inner().key).await;
        self.done("remove", out)
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let out =
            self.snapshotter
                .stat(req.into_inner().key)
                .await
                .map(|i| pb::StatSnapshotResponse {
                    info: Some(to_pb(i)),
                });
        self.done("stat", out)
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(info) = r.info else {
            return self.done(
                "update",
                Err(state::Error::InvalidArgument("update without an info".into()).into()),
            );
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let out = self
            .snapshotter
            .update(info.name, sorted(info.labels), paths)
            .await
            .map(|i| pb::UpdateSnapshotResponse {
                info: Some(to_pb(i)),
            });
        self.done("update", out)
    }

    type ListStream =
        Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send + 'static>>;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let out = self
            .snapshotter
            .list(req.into_inner().filters)
            .await
            .map(|infos| {
                let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
                    .chunks(LIST_BATCH)
                    .map(|c| {
                        Ok(pb::ListSnapshotsResponse {
                            info: c.iter().cloned().map(to_pb).collect(),
                        })
                    })
                    .collect();
                Box::pin(futures::stream::iter(batches)) as Self::ListStream
            });
        self.done("list", out)
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let out = self
            .snapshotter
            .usage(req.into_inner().key)
            .await
            .map(|u| pb::UsageResponse {
                size: u.size,
                inodes: u.inodes,
            });
        self.done("usage", out)
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let out = self.snapshotter.cleanup().await;
        self.done("cleanup", out)
    }
}

/// The gRPC status of a snapshot error (containerd reads the code as its error class).
pub fn status(e: &SnapError) -> Status {
    let code = match e {
        SnapError::State(state::Error::NotFound(_)) => Code::NotFound,
        SnapError::State(state::Error::AlreadyExists(_)) => Code::AlreadyExists,
        SnapError::State(state::Error::FailedPrecondition(_)) => Code::FailedPrecondition,
        SnapError::State(state::Error::InvalidArgument(_)) | SnapError::Filter(_) => {
            Code::InvalidArgument
        }
        SnapError::Labels(_) => Code::FailedPrecondition,
        SnapError::Image { .. } | SnapError::ShuttingDown => Code::Unavailable,
        SnapError::Io { .. } | SnapError::Store(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn outcome(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::FailedPrecondition => "failed_precondition",
        Code::InvalidArgument => "invalid_argument",
        Code::Unavailable => "unavailable",
        _ => "internal",
    }
}

fn parent(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

fn sorted(labels: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

fn mounts(specs: Vec<MountSpec>) -> Vec<Mount> {
    specs
        .into_iter()
        .map(|m| Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn to_pb(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created_ns)),
        updated_at: Some(timestamp(i.updated_ns)),
        labels: i.labels.into_iter().collect(),
    }
}

fn timestamp(ns: u64) -> Timestamp {
    Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_containerds_classes() {
        let code = |e: SnapError| status(&e).code();
        assert_eq!(
            code(state::Error::NotFound("k".into()).into()),
            Code::NotFound
        );
        assert_eq!(
            code(state::Error::AlreadyExists("k".into()).into()),
            Code::AlreadyExists
        );
        assert_eq!(
            code(state::Error::FailedPrecondition("x".into()).into()),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(SnapError::Image {
                image: "i".into(),
                error: "down".into()
            }),
            Code::Unavailable
        );
        assert_eq!(timestamp(1_500_000_000).nanos, 500_000_000);
    }
}
