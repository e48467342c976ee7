//! An origin run by an attacker who knows a private blob's digest but not its bytes: it says
//! "yes" to everything. `HEAD` of any blob or manifest answers 200 with the digest echoed back;
//! `GET /v2/` answers 200; a blob `GET` answers 206 with random bytes of exactly the asked range,
//! or 200 with `claimed_size` random bytes; a manifest `GET` answers 200 with a made-up manifest.
//! The point of the tests using it: a node must give such a requester nothing from its cache.
//!
//! Counts every request by kind, so a test can see the node probed it (and how much).
//! Invariant: serves only 127.0.0.1; the accept thread ends when the handle is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;

use crate::tiny::{respond, Flow, Request, TinyServer};

/// What the liar saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub heads: AtomicU64,
    pub range_gets: AtomicU64,
    pub full_gets: AtomicU64,
    pub manifest_gets: AtomicU64,
    /// Bytes it sent in blob bodies.
    pub blob_bytes: AtomicU64,
}

/// The running liar.
#[derive(Debug)]
pub struct LyingOrigin {
    server: TinyServer,
    seen: Arc<Seen>,
}

impl LyingOrigin {
    /// Starts on a free loopback port; whole-blob answers are `claimed_size` bytes.
    pub fn start(claimed_size: u64) -> Result<Self> {
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let server = TinyServer::start(Arc::new(move |req, out| {
            answer(req, out, &s, claimed_size)?;
            Ok(Flow::KeepAlive)
        }))?;
        Ok(Self { server, seen })
    }

    /// `127.0.0.1:PORT` (as `?ns=` or a proxy URL names it).
    pub fn addr(&self) -> String {
        self.server.addr()
    }

    /// What it has seen so far.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }
}

fn answer(req: &Request, out: &mut std::net::TcpStream, seen: &Seen, claimed: u64) -> Result<()> {
    let path = req.path();
    let digest = path.rsplit('/').next().unwrap_or_default();
    let head = req.is_head();
    if head {
        seen.heads.fetch_add(1, Ordering::Relaxed);
    }
    if path == "/v2/" || path == "/v2" {
        return respond(out, "200 OK", &[], b"{}", head);
    }
    if path.contains("/manifests/") {
        if !head {
            seen.manifest_gets.fetch_add(1, Ordering::Relaxed);
        }
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let headers = [
            ("Docker-Content-Digest", digest),
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        ];
        return respond(out, "200 OK", &headers, body, head);
    }
    if !path.contains("/blobs/") {
        return respond(out, "200 OK", &[], b"yes", head);
    }
    let range = req.header("range").and_then(parse_range);
    let (status, body, content_range) = match range {
        Some((a, b)) if !head => {
            seen.range_gets.fetch_add(1, Ordering::Relaxed);
            let b = b.unwrap_or(claimed.saturating_sub(1)).max(a);
            let len = (b - a + 1).min(64 << 20);
            (
                "206 Partial Content",
                noise(len),
                Some(format!("bytes {a}-{}/{claimed}", a + len - 1)),
            )
        }
        _ => {
            if !head {
                seen.full_gets.fetch_add(1, Ordering::Relaxed);
            }
            ("200 OK", noise(claimed.min(64 << 20)), None)
        }
    };
    if !head {
        seen.blob_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
    }
    let mut headers = vec![
        ("Docker-Content-Digest", digest),
        ("Content-Type", "application/octet-stream"),
    ];
    if let Some(cr) = &content_range {
        headers.push(("Content-Range", cr.as_str()));
    }
    respond(out, status, &headers, &body, head)
}

/// `bytes=a-b` or `bytes=a-`.
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((a, b))
}

/// `len` pseudo-random bytes (unguessable content is not needed: it only has to be wrong).
fn noise(len: u64) -> Vec<u8> {
    crate::random::pseudo_random(usize::try_from(len).unwrap_or(0), len)
}
