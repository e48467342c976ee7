//! Admin API routes of the mount manager (merged into the admin router):
//! `POST /api/v1/mounts {image, dir, mode, platform}` → 201 + [`MountInfo`],
//! `DELETE /api/v1/mounts?dir=DIR` → 204, `GET /api/v1/mounts` → `{"mounts": [MountInfo]}`.
//! Errors are `{"error": "..."}` with a status from [`status_of`], the one place mount errors
//! become HTTP statuses.

use std::path::PathBuf;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{Caller, MountError, MountInfo, MountRequest, Mounts};
use crate::mount::image::ImageError;
use shoal_rafs::erofs::ErofsError;

/// `GET /api/v1/mounts`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountList {
    pub mounts: Vec<MountInfo>,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Deserialize)]
struct DirQuery {
    dir: PathBuf,
}

pub fn router(mounts: Mounts) -> Router {
    Router::new()
        .route("/api/v1/mounts", get(list).post(create).delete(remove))
        .with_state(mounts)
}

async fn list(State(m): State<Mounts>) -> Response {
    match m.list().await {
        Ok(mounts) => Json(MountList { mounts }).into_response(),
        Err(e) => error(&e),
    }
}

async fn create(
    State(m): State<Mounts>,
    caller: Option<axum::extract::Extension<Caller>>,
    Json(req): Json<MountRequest>,
) -> Response {
    // The control socket's authorization layer says who the caller is; without it (a router
    // served elsewhere) the caller is treated as a group member with no directory of its own.
    let caller = caller.map_or(Caller::Member(u32::MAX), |c| c.0);
    match m.mount(req, caller).await {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(e) => error(&e),
    }
}

async fn remove(State(m): State<Mounts>, Query(q): Query<DirQuery>) -> Response {
    match m.unmount(&q.dir).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

fn error(e: &MountError) -> Response {
    let status = status_of(e);
    if status.is_server_error() {
        tracing::warn!(error = %e, "mount request failed");
    }
    (
        status,
        Json(ErrorBody {
            error: e.to_string(),
        }),
    )
        .into_response()
}

/// The HTTP status of a mount error.
pub fn status_of(e: &MountError) -> StatusCode {
    match e {
        MountError::Image(ImageError::NotNydus { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
        MountError::Image(ImageError::NoPlatform { .. }) => StatusCode::NOT_FOUND,
        MountError::Image(_) | MountError::Dir { .. } => StatusCode::BAD_REQUEST,
        MountError::Status { status: 404, .. } => StatusCode::NOT_FOUND,
        MountError::Status { .. }
        | MountError::Origin(_)
        | MountError::Fetch { .. }
        | MountError::Bootstrap { .. } => StatusCode::BAD_GATEWAY,
        MountError::Busy { .. } => StatusCode::CONFLICT,
        MountError::NotMounted { .. } => StatusCode::NOT_FOUND,
        MountError::Erofs(ErofsError::Unsupported { .. }) => StatusCode::NOT_IMPLEMENTED,
        MountError::Erofs(ErofsError::Image(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        MountError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        MountError::Store(_)
        | MountError::Fuse(_)
        | MountError::Erofs(_)
        | MountError::Table(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
