//! An origin run by an attacker who knows a private blob's digest but not its bytes: it says
//! "yes" to everything. `HEAD` of any blob or manifest answers 200 with the digest echoed back;
//! `GET /v2/` answers 200; a blob `GET` answers 206 with random bytes of exactly the asked range,
//! or 200 with `claimed_size` random bytes; a manifest `GET` answers 200 with a made-up manifest.
//! The point of the tests using it: a node must give such a requester nothing from its cache.
//!
//! Counts every request by kind, so a test can see the node probed it (and how much).
//! Invariant: serves only 127.0.0.1; the accept thread ends when the handle is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

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
    port: u16,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LyingOrigin {
    /// Starts on a free loopback port; whole-blob answers are `claimed_size` bytes.
    pub fn start(claimed_size: u64) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the lying origin")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let seen = seen.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &seen, claimed_size);
                    });
                }
            })
        };
        Ok(Self {
            port,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT` (as `?ns=` or a proxy URL names it).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What it has seen so far.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }
}

impl Drop for LyingOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, seen: &Seen, claimed: u64) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("range") {
                    range = parse_range(v.trim());
                }
            }
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default();
        let path = target.split('?').next().unwrap_or_default();
        let path = path
            .split_once("://")
            .map_or(path, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]));
        let digest = path.rsplit('/').next().unwrap_or_default().to_owned();
        let head = method == "HEAD";
        if head {
            seen.heads.fetch_add(1, Ordering::Relaxed);
        }
        if path == "/v2/" || path == "/v2" {
            respond(&mut out, "200 OK", &[], b"{}", head)?;
        } else if path.contains("/manifests/") {
            if !head {
                seen.manifest_gets.fetch_add(1, Ordering::Relaxed);
            }
            let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
            let extra = [
                ("Docker-Content-Digest", digest.as_str()),
                ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
            ];
            respond(&mut out, "200 OK", &extra, body, head)?;
        } else if path.contains("/blobs/") {
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
            let mut extra = vec![
                ("Docker-Content-Digest", digest.as_str()),
                ("Content-Type", "application/octet-stream"),
            ];
            if let Some(cr) = &content_range {
                extra.push(("Content-Range", cr.as_str()));
            }
            respond(&mut out, status, &extra, &body, head)?;
        } else {
            respond(&mut out, "200 OK", &[], b"yes", head)?;
        }
    }
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
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ len;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nDocker-Distribution-Api-Version: registry/2.0\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if !head_only {
        out.write_all(body)?;
    }
    out.flush()?;
    Ok(())
}
