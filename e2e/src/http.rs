//! HTTP client helpers: blocking reqwest clients (direct or through a forward proxy), whole-response
//! fetches that keep a body-read failure apart from an HTTP status, and SHA-256 helpers.
//!
//! Invariant: clients never use proxy settings from the environment, so traffic only goes where a
//! test points it (127.0.0.1).

use std::io::Read;
use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};

static CRYPTO: Once = Once::new();

/// A client that talks to loopback servers directly.
pub fn client() -> Result<Client> {
    builder()
        .no_proxy()
        .build()
        .context("building an HTTP client")
}

/// A client that talks to loopback servers directly and keeps its connections open between
/// requests (as containerd and other registry clients do), with `timeout` per request.
pub fn pooled_client(timeout: Duration) -> Result<Client> {
    builder()
        .no_proxy()
        .pool_max_idle_per_host(4)
        .timeout(timeout)
        .build()
        .context("building an HTTP client")
}

/// A client that sends every plain-HTTP request as an absolute URI to the proxy at `proxy_addr`
/// (`127.0.0.1:P`), the way nydusd uses `backend.config.proxy.url`.
pub fn proxy_client(proxy_addr: &str) -> Result<Client> {
    let proxy = reqwest::Proxy::http(format!("http://{proxy_addr}"))?;
    builder()
        .proxy(proxy)
        .build()
        .context("building a proxy HTTP client")
}

/// A response read to its end, or to the point where reading failed.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Set when the body could not be read to its end (connection reset, truncated, …).
    pub body_error: Option<String>,
}

impl Fetched {
    /// The body's SHA-256 as `sha256:<hex>`.
    pub fn digest(&self) -> String {
        sha256_digest(&self.body)
    }

    /// A header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether this is a finished success: 2xx and the whole body read.
    pub fn completed_ok(&self) -> bool {
        self.status.is_success() && self.body_error.is_none()
    }

    /// The body as text (lossy), for error messages and JSON checks.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON ({}): {}", self.status, self.short()))
    }

    /// The OCI error codes in the body (`{"errors":[{"code":…}]}`), empty if there are none.
    pub fn oci_error_codes(&self) -> Vec<String> {
        let Ok(json) = self.json() else {
            return Vec::new();
        };
        json["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e["code"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A one-line description: status and the start of the body.
    pub fn short(&self) -> String {
        let text = self.text();
        let head: String = text.chars().take(300).collect();
        match &self.body_error {
            Some(err) => format!("{} (body error: {err}) {head}", self.status),
            None => format!("{} {head}", self.status),
        }
    }
}

/// Sends `request` and reads the whole body. Fails only when no response head arrived; a body that
/// breaks off is reported in [`Fetched::body_error`].
pub fn fetch(request: RequestBuilder) -> Result<Fetched> {
    let mut response = request.send()?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = Vec::new();
    let body_error = response.read_to_end(&mut body).err().map(|e| e.to_string());
    Ok(Fetched {
        status,
        headers,
        body,
        body_error,
    })
}

/// Like [`fetch`] but hashes the body instead of keeping it (for large blobs).
pub fn fetch_hashed(request: RequestBuilder) -> Result<HashedFetch> {
    let mut response = request.send()?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let body_error = loop {
        match response.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(err) => break Some(err.to_string()),
        }
    };
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    Ok(HashedFetch {
        status,
        headers,
        len,
        digest,
        body_error,
    })
}

/// A response whose body was hashed and counted, not kept.
#[derive(Debug)]
pub struct HashedFetch {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub len: u64,
    /// `sha256:<hex>` of the bytes received.
    pub digest: String,
    pub body_error: Option<String>,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file's contents, streamed.
pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn builder() -> reqwest::blocking::ClientBuilder {
    CRYPTO.call_once(|| {
        // Only plain HTTP is used, but a rustls-backed client still wants a provider installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(0)
}

/// A response read from a raw socket (for request targets a URL library would normalise).
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The OCI error codes in the body, empty when it is not OCI error JSON.
    pub fn oci_error_codes(&self) -> Vec<String> {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&self.body) else {
            return Vec::new();
        };
        json["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|e| e["code"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Sends `GET <target>` verbatim (no normalisation of `..` or percent-encoding) to `addr` with
/// `Connection: close`, and reads the response (chunked bodies are decoded).
pub fn raw_get(addr: &str, target: &str) -> Result<RawResponse> {
    use std::io::Write;
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("reading raw response")?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of head")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok(RawResponse { status, head, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        let start = eol + 2;
        if size == 0 || start + size > data.len() {
            break;
        }
        out.extend_from_slice(&data[start..start + size]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}
