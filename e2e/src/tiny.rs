//! A minimal HTTP/1.1 server for the test origins a real registry cannot play (an oversized
//! manifest, a lying origin, a token service, an origin that ignores `Range`): each of those is a
//! handler over [`Request`]s; this module owns the accept loop, the keep-alive connection loop,
//! request parsing and response writing.
//!
//! Invariant: serves only 127.0.0.1; the accept thread ends when the handle is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// One request: its line and headers (bodies are not read: test origins serve `GET`/`HEAD`).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// As sent: origin form (`/v2/…?q`) or absolute form (`http://host/v2/…`).
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path, without the query and without an absolute form's scheme and authority.
    pub fn path(&self) -> &str {
        let t = self.target.split('?').next().unwrap_or_default();
        t.split_once("://")
            .map_or(t, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]))
    }

    /// The target parsed as a URL (relative targets against `http://x`).
    pub fn url(&self) -> Result<reqwest::Url> {
        if self.target.contains("://") {
            Ok(reqwest::Url::parse(&self.target)?)
        } else {
            Ok(reqwest::Url::parse(&format!("http://x{}", self.target))?)
        }
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// What the connection does after a handler answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    KeepAlive,
    /// Close the connection (e.g. after a deliberately broken answer).
    Close,
}

/// Reads one request; `None` when the peer closed the connection.
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut parts = line.split_whitespace();
    Ok(Some(Request {
        method: parts.next().unwrap_or_default().to_owned(),
        target: parts.next().unwrap_or_default().to_owned(),
        headers,
    }))
}

/// Writes a response with `Content-Length: body.len()` (the body left out for `HEAD`).
pub fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nDocker-Distribution-Api-Version: registry/2.0\r\n",
        body.len()
    );
    for (name, value) in headers {
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

/// A handler: answers one request on the connection.
pub type Handler = dyn Fn(&Request, &mut TcpStream) -> Result<Flow> + Send + Sync;

/// A running server.
pub struct TinyServer {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TinyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TinyServer")
            .field("port", &self.port)
            .finish()
    }
}

impl TinyServer {
    /// Starts on a free loopback port, answering every request with `handler`.
    pub fn start(handler: Arc<Handler>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a test origin")?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (connections, stop) = (connections.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::Relaxed);
                    let handler = handler.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &*handler);
                    });
                }
            })
        };
        Ok(Self {
            port,
            connections,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves keep-alive requests on one connection until it closes or the handler says so.
fn serve(stream: TcpStream, handler: &Handler) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(req) = read_request(&mut reader)? {
        if handler(&req, &mut out)? == Flow::Close {
            break;
        }
    }
    Ok(())
}
