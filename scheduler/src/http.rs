//! The scheduler's HTTP surface: thin axum handlers over a
//! [`SchedulerHandle`], built by [`router`] (which tests call directly).
//!
//! Every response carries `x-shoal-protocol: 1`. A request naming another
//! major version is refused with 400 and an [`ErrorBody`] naming both
//! versions; a POST without the header is refused the same way (GETs without
//! it are allowed, for browsers and curl). This file is the one place that
//! maps errors to statuses and [`ErrorBody`]s.

mod page;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use shoal_proto::auth::{self, AuthError, ReplayGuard, AUTH_HEADER};
use shoal_proto::sched::{
    check_version, ErrorBody, ErrorCode, JobId, JobList, VersionError, PROTOCOL_HEADER,
    PROTOCOL_VERSION,
};
use shoal_proto::BlobId;

use crate::service::{Closed, SchedulerHandle};
use crate::state::{JobError, WrongScheduler};

/// Largest request body: a full announcement of a node holding many blobs,
/// with piece hash lists.
const MAX_BODY: usize = 32 << 20;

/// All routes of a scheduler, trusting every client.
pub fn router(handle: SchedulerHandle) -> Router {
    router_with_auth(handle, None)
}

/// All routes of a scheduler; with `auth_key`, every request but `/healthz` and `/metrics` must
/// be signed with it (`shoal_proto::auth`) — reads too, since the status and the job list name
/// blobs and node addresses — and a signed request is accepted once (no replays).
pub fn router_with_auth(handle: SchedulerHandle, auth_key: Option<[u8; 32]>) -> Router {
    let guard = Arc::new(ReplayGuard::default());
    Router::new()
        .route("/api/v1/announce", post(announce))
        .route("/api/v1/blobs/{blob}/parents", post(parents))
        .route("/api/v1/blobs/{blob}/failure", post(failure))
        .route("/api/v1/status", get(status))
        .route("/api/v1/jobs", post(create_job).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(job).delete(cancel_job))
        .route(
            "/api/v1/access-lists/{key}",
            get(get_access_list).put(put_access_list),
        )
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(move |req, next| {
            authenticate(auth_key, guard.clone(), req, next)
        }))
        .layer(middleware::from_fn(protocol_version))
        .with_state(handle)
}

/// The operator listener's routes: reads only (status page, status JSON, jobs, metrics,
/// health), unsigned. Nothing here changes the scheduler.
pub fn status_router(handle: SchedulerHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(job))
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn(protocol_version))
        .with_state(handle)
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("missing {PROTOCOL_HEADER} header (this scheduler speaks {PROTOCOL_VERSION})")]
    MissingVersion,
    #[error(transparent)]
    WrongScheduler(#[from] WrongScheduler),
    #[error(transparent)]
    Closed(#[from] Closed),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("no such path")]
    NotFound,
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = ErrorBody {
            error: self.to_string(),
            code: ErrorCode::BadRequest,
            supported: None,
            requested: None,
            owner: None,
        };
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Version(v) => {
                body.code = ErrorCode::ProtocolVersion;
                body.supported = Some(PROTOCOL_VERSION);
                body.requested = Some(v.theirs.clone());
                StatusCode::BAD_REQUEST
            }
            Self::MissingVersion => {
                body.code = ErrorCode::ProtocolVersion;
                body.supported = Some(PROTOCOL_VERSION);
                StatusCode::BAD_REQUEST
            }
            Self::WrongScheduler(w) => {
                body.code = ErrorCode::WrongScheduler;
                body.owner = Some(w.owner.clone());
                StatusCode::MISDIRECTED_REQUEST
            }
            Self::Closed(_) => {
                body.code = ErrorCode::Unavailable;
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NotFound => {
                body.code = ErrorCode::Other;
                StatusCode::NOT_FOUND
            }
            Self::Unauthorized(_) => {
                body.code = ErrorCode::Other;
                StatusCode::UNAUTHORIZED
            }
            Self::Job(JobError::NotFound(_)) => {
                body.code = ErrorCode::NotFound;
                StatusCode::NOT_FOUND
            }
            Self::Job(JobError::NoNodes { .. } | JobError::TooFewNodes { .. }) => {
                body.code = ErrorCode::NoNodes;
                StatusCode::CONFLICT
            }
            Self::Job(JobError::TooMany) => {
                body.code = ErrorCode::Unavailable;
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Job(JobError::BadImage { .. } | JobError::Duplicate(_)) => {
                StatusCode::BAD_REQUEST
            }
        };
        if status.is_server_error() {
            tracing::warn!(error = %body.error, "request failed");
        } else {
            tracing::debug!(error = %body.error, %status, "request refused");
        }
        (status, Json(body)).into_response()
    }
}

/// Refuse other protocol versions; stamp ours on every response.
async fn protocol_version(req: Request, next: Next) -> Response {
    let checked = match req.headers().get(PROTOCOL_HEADER) {
        Some(v) => check_version(v.to_str().unwrap_or("?")).map_err(ApiError::from),
        None if req.method() == Method::POST => Err(ApiError::MissingVersion),
        None => Ok(()),
    };
    let mut resp = match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    resp.headers_mut()
        .insert(PROTOCOL_HEADER, HeaderValue::from(PROTOCOL_VERSION));
    resp
}

/// With a key, every request but the health check and metrics (which name nothing) must carry a
/// valid signature over its method, host, path and body, seen for the first time.
async fn authenticate(
    key: Option<[u8; 32]>,
    guard: Arc<ReplayGuard>,
    req: Request,
    next: Next,
) -> Response {
    let Some(key) = key else {
        return next.run(req).await;
    };
    let open = matches!(req.uri().path(), "/healthz" | "/metrics");
    if open && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return ApiError::BadRequest("request body too large or unreadable".into()).into_response();
    };
    let header = parts.headers.get(AUTH_HEADER).and_then(|v| v.to_str().ok());
    let host = parts
        .headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let signed = auth::Signed {
        method: parts.method.as_str(),
        host,
        path: parts.uri.path(),
        body: &bytes,
    };
    let checked =
        auth::verify(&key, header, &signed, now_ms).and_then(|stamp| guard.admit(&stamp, now_ms));
    if let Err(e) = checked {
        tracing::info!(error = %e, path = parts.uri.path(), "unauthenticated request refused");
        return ApiError::from(e).into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
}

fn blob_id(raw: &str) -> Result<BlobId, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::BadRequest(format!("bad blob id: {e}")))
}

#[tracing::instrument(level = "debug", skip_all)]
async fn announce(
    State(h): State<SchedulerHandle>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(h.announce(json(&body)?).await?))
}

#[tracing::instrument(level = "debug", skip_all, fields(blob = %raw))]
async fn parents(
    State(h): State<SchedulerHandle>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let blob = blob_id(&raw)?;
    Ok(Json(h.parents(blob, json(&body)?).await??))
}

#[tracing::instrument(level = "debug", skip_all, fields(blob = %raw))]
async fn failure(
    State(h): State<SchedulerHandle>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let blob = blob_id(&raw)?;
    Ok(Json(h.report_failure(blob, json(&body)?).await?))
}

async fn status(State(h): State<SchedulerHandle>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(h.status().await?))
}

#[tracing::instrument(level = "debug", skip_all, fields(key = %raw))]
async fn put_access_list(
    State(h): State<SchedulerHandle>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let key = blob_id(&raw)?;
    let list: shoal_proto::sched::AccessList = json(&body)?;
    if list.chunks.len() > shoal_proto::sched::MAX_SHARED_ACCESS {
        return Err(ApiError::BadRequest(format!(
            "an access list of {} chunks (at most {})",
            list.chunks.len(),
            shoal_proto::sched::MAX_SHARED_ACCESS
        )));
    }
    h.put_access_list(key, list).await?;
    Ok(Json(serde_json::json!({})))
}

async fn get_access_list(
    State(h): State<SchedulerHandle>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let key = blob_id(&raw)?;
    match h.access_list(key).await? {
        Some(list) => Ok(Json(list).into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

fn job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::BadRequest(format!("bad job id: {e}")))
}

#[tracing::instrument(level = "debug", skip_all)]
async fn create_job(
    State(h): State<SchedulerHandle>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let status = h.create_job(json(&body)?).await??;
    Ok((StatusCode::CREATED, Json(status)))
}

async fn list_jobs(State(h): State<SchedulerHandle>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(JobList {
        jobs: h.jobs().await?,
    }))
}

async fn job(
    State(h): State<SchedulerHandle>,
    Path(raw): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(h.job(job_id(&raw)?).await??))
}

#[tracing::instrument(level = "debug", skip_all, fields(job = %raw))]
async fn cancel_job(
    State(h): State<SchedulerHandle>,
    Path(raw): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(h.cancel_job(job_id(&raw)?).await??))
}

async fn status_page(State(h): State<SchedulerHandle>) -> Result<impl IntoResponse, ApiError> {
    Ok(Html(page::render(&h.status().await?)))
}

async fn metrics(State(h): State<SchedulerHandle>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics().encode(),
    )
}

/// Liveness and readiness: 200 `ok` while the scheduler actor answers,
/// 503 once it is shutting down.
async fn healthz(State(h): State<SchedulerHandle>) -> Result<&'static str, ApiError> {
    h.ping().await?;
    Ok("ok")
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}
