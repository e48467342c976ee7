//! A hostile origin for what the real registry refuses to produce: a minimal HTTP/1.1 server on a
//! free loopback port that answers `/v2/` and serves one oversized manifest (by any tag or by its
//! digest). distribution 2.8.2 rejects manifests over 4 MiB both on `PUT` ("request body too large")
//! and on read from its own storage ("storage: read exceeds limit"), so an oversized manifest can
//! only come from an origin like this one.
//!
//! Invariant: serves only 127.0.0.1; the accept thread ends when the handle is dropped.

use std::sync::Arc;

use anyhow::Result;

use crate::http::sha256_digest;
use crate::tiny::{respond, Flow, TinyServer};

/// The running server.
#[derive(Debug)]
pub struct HostileOrigin {
    server: TinyServer,
    manifest_digest: String,
    manifest_len: usize,
}

impl HostileOrigin {
    /// Starts a server whose manifests are a valid OCI image manifest of `size` bytes or more.
    pub fn oversized_manifest(size: usize) -> Result<Self> {
        let manifest = Arc::new(oversized_manifest_bytes(size));
        let manifest_digest = sha256_digest(&manifest);
        let digest = manifest_digest.clone();
        let body = manifest.clone();
        let server = TinyServer::start(Arc::new(move |req, out| {
            let path = req.path();
            let head = req.is_head();
            if path == "/v2/" || path == "/v2" {
                respond(
                    out,
                    "200 OK",
                    &[("Content-Type", "application/json")],
                    b"{}",
                    head,
                )?;
            } else if path.starts_with("/v2/") && path.contains("/manifests/") {
                let headers = [
                    ("Docker-Content-Digest", digest.as_str()),
                    ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                ];
                respond(out, "200 OK", &headers, &body, head)?;
            } else {
                let body = br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}"#;
                let headers = [("Content-Type", "application/json")];
                respond(out, "404 Not Found", &headers, body, head)?;
            }
            Ok(Flow::KeepAlive)
        }))?;
        Ok(Self {
            server,
            manifest_len: manifest.len(),
            manifest_digest,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// The digest of the manifest it serves.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    /// The size of the manifest it serves.
    pub fn manifest_len(&self) -> usize {
        self.manifest_len
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }
}

/// A syntactically valid OCI image manifest padded with an annotation to at least `size` bytes.
fn oversized_manifest_bytes(size: usize) -> Vec<u8> {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        },
        "layers": [],
        "annotations": { "org.example.padding": "x".repeat(size) }
    });
    manifest.to_string().into_bytes()
}
