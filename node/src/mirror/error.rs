//! The one place where mirror failures become HTTP: OCI distribution error
//! JSON (`{"errors":[{"code","message","detail"}]}`) with the status the spec
//! gives each code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use shoal_proto::{DigestError, NameError};

use crate::access::Denial;
use crate::upstream::OriginError;

/// Everything a mirror request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("invalid repository name: {0}")]
    NameInvalid(NameError),
    #[error("invalid digest: {0}")]
    DigestInvalid(DigestError),
    #[error("invalid reference: {0}")]
    ReferenceInvalid(NameError),
    #[error("blob unknown to registry")]
    BlobUnknown,
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("manifest from origin is invalid: {reason}")]
    ManifestInvalid { reason: String },
    #[error("manifest from origin is larger than mirror.max_manifest_size ({limit} bytes)")]
    ManifestTooLarge { limit: u64 },
    #[error("requested range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("malformed Range header {header:?}: expected bytes=START-END, bytes=START- or bytes=-SUFFIX")]
    RangeInvalid { header: String },
    #[error("authentication required")]
    Unauthorized { challenge: Option<HeaderValue> },
    #[error("requested access to the resource is denied")]
    Denied,
    #[error("{what} is not supported by this pull-through mirror")]
    Unsupported { what: String },
    #[error("not found")]
    NotFound,
    #[error("origin unavailable: {reason}")]
    OriginUnavailable { reason: String },
    #[error("origin answered {status}")]
    OriginStatus { status: StatusCode },
    #[error("content from origin does not match digest {digest}")]
    DigestMismatch { digest: String },
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("the proxy does not carry requests to {target}: {why}")]
    ProxyRefused { target: String, why: &'static str },
    #[error("too many open tunnels (mirror.max_tunnels)")]
    TooManyTunnels,
    #[error("request loop: this node reached itself")]
    Loop,
    #[error("internal error: {0}")]
    Internal(String),
}

impl MirrorError {
    fn code_and_status(&self) -> (&'static str, StatusCode) {
        use MirrorError::*;
        match self {
            NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            DigestInvalid(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            ReferenceInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestInvalid { .. } => ("MANIFEST_INVALID", StatusCode::BAD_GATEWAY),
            ManifestTooLarge { .. } => ("SIZE_INVALID", StatusCode::BAD_GATEWAY),
            RangeNotSatisfiable { .. } | RangeInvalid { .. } => {
                ("RANGE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE)
            }
            Unauthorized { .. } => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Denied => ("DENIED", StatusCode::FORBIDDEN),
            Unsupported { .. } => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            NotFound => ("NOT_FOUND", StatusCode::NOT_FOUND),
            OriginUnavailable { .. } => ("UNAVAILABLE", StatusCode::BAD_GATEWAY),
            OriginStatus { .. } => ("UNAVAILABLE", StatusCode::BAD_GATEWAY),
            DigestMismatch { .. } => ("DIGEST_INVALID", StatusCode::BAD_GATEWAY),
            Origin(OriginError::BadHost { .. }) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            Origin(OriginError::Unlisted { .. }) => ("NAME_UNKNOWN", StatusCode::BAD_REQUEST),
            Origin(OriginError::NoDefault) => ("NAME_UNKNOWN", StatusCode::BAD_REQUEST),
            Origin(OriginError::Local { .. }) => ("DENIED", StatusCode::FORBIDDEN),
            ProxyRefused { .. } => ("DENIED", StatusCode::FORBIDDEN),
            TooManyTunnels => ("TOOMANYREQUESTS", StatusCode::SERVICE_UNAVAILABLE),
            Loop => ("DENIED", StatusCode::LOOP_DETECTED),
            Origin(_) => ("UNAVAILABLE", StatusCode::BAD_GATEWAY),
            Internal(_) => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.code_and_status().1
    }

    /// A refused access check, as the client should see it.
    pub fn from_denial(d: Denial, not_found: MirrorError) -> Self {
        match d {
            Denial::Unauthorized(challenge) => Self::Unauthorized { challenge },
            Denial::Forbidden => Self::Denied,
            Denial::NotFound => not_found,
            Denial::Unavailable(reason) => Self::OriginUnavailable { reason },
        }
    }
}

impl IntoResponse for MirrorError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.to_string(), "detail": null }]
        });
        let mut resp = (status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        match &self {
            MirrorError::Unauthorized { challenge: Some(c) } => {
                h.insert(header::WWW_AUTHENTICATE, c.clone());
            }
            MirrorError::Unauthorized { challenge: None } => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"shoal\""),
                );
            }
            MirrorError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        h.insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        resp
    }
}
