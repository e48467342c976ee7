//! A hostile origin for what the real registry refuses to produce: a minimal HTTP/1.1 server on a
//! free loopback port that answers `/v2/` and serves one oversized manifest (by any tag or by its
//! digest). distribution 2.8.2 rejects manifests over 4 MiB both on `PUT` ("request body too large")
//! and on read from its own storage ("storage: read exceeds limit"), so an oversized manifest can
//! only come from an origin like this one.
//!
//! Invariant: serves only 127.0.0.1; the accept thread ends when the handle is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::http::sha256_digest;

/// The running server.
#[derive(Debug)]
pub struct HostileOrigin {
    port: u16,
    manifest_digest: String,
    manifest_len: usize,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostileOrigin {
    /// Starts a server whose manifests are a valid OCI image manifest of `size` bytes or more.
    pub fn oversized_manifest(size: usize) -> Result<Self> {
        let manifest = Arc::new(oversized_manifest_bytes(size));
        let manifest_digest = sha256_digest(&manifest);
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the hostile origin")?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop, manifest) = (requests.clone(), stop.clone(), manifest.clone());
            let digest = manifest_digest.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    requests.fetch_add(1, Ordering::Relaxed);
                    let (manifest, digest) = (manifest.clone(), digest.clone());
                    std::thread::spawn(move || {
                        let _ = serve(stream, &manifest, &digest);
                    });
                }
            })
        };
        Ok(Self {
            port,
            manifest_digest,
            manifest_len: manifest.len(),
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HostileOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves keep-alive requests on one connection until it closes.
fn serve(stream: TcpStream, manifest: &[u8], digest: &str) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
                break;
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default();
        let path = target.split('?').next().unwrap_or_default();
        let path = path
            .split_once("://")
            .map_or(path, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]));
        let head = method == "HEAD";
        if path == "/v2/" || path == "/v2" {
            respond(&mut out, "200 OK", "application/json", &[], b"{}", head)?;
        } else if path.starts_with("/v2/") && path.contains("/manifests/") {
            let extra = [("Docker-Content-Digest", digest)];
            let media = "application/vnd.oci.image.manifest.v1+json";
            respond(&mut out, "200 OK", media, &extra, manifest, head)?;
        } else {
            let body = br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}"#;
            respond(
                &mut out,
                "404 Not Found",
                "application/json",
                &[],
                body,
                head,
            )?;
        }
    }
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Docker-Distribution-Api-Version: registry/2.0\r\n",
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if !head_only {
        out.write_all(body)?;
    }
    out.flush()?;
    Ok(())
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
