//! The fetching side: one connection per peer (dialed once, shared by
//! concurrent fetches, redialed when closed), range and piece-map requests,
//! and the errors a caller branches on.
//!
//! Errors say what to do next: `Unreachable`/`Timeout`/`Lost` → try another
//! holder; `Busy` → another holder or later; `NotPresent`/`NotFound` → the
//! holder's map is stale; `NotMember`/`IncompatibleVersion`/
//! `Authentication`/`Protocol` → stop using that peer. Nothing here logs:
//! the caller handles (and logs) the error.
//!
//! The bytes a peer sends are not verified here; the fetch engine checks
//! them against piece hashes or digests before they reach anyone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use quinn::{Connection, ConnectionError, ReadError, RecvStream};
use shoal_proto::wire::{
    ErrorCode, Frame, GetRange, PieceMap, RangeHeader, RangeStatus, ResetCode,
};
use shoal_proto::{BlobId, NodeId};
use tracing::Instrument;

use super::frames::{read_frame, write_frame, FrameError};
use super::membership::HandshakeError;
use super::tls::SERVER_NAME;
use super::{endpoint, Inner, P2pHandle};

/// Largest chunk `RangeStream::next_chunk` returns.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Why a connection to a peer could not be had. Cloneable: concurrent
/// fetches waiting on one dial all get its outcome.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no answer within the connect timeout")]
    Timeout,
    #[error("cannot dial")]
    Dial(#[source] quinn::ConnectError),
    #[error("connection failed")]
    Connection(#[source] ConnectionError),
    #[error("TLS authentication failed: {reason}")]
    Authentication { reason: String },
    #[error("the peer does not prove it holds the join secret")]
    NotMember,
    #[error("the peer refused our join proof (different join secret?)")]
    RefusedByPeer,
    #[error("incompatible protocol version: {ours} here, {theirs} on the peer")]
    IncompatibleVersion { ours: u16, theirs: u16 },
    #[error("membership handshake failed")]
    Handshake(#[source] Arc<HandshakeError>),
    #[error("building the TLS client config")]
    Tls(#[source] Arc<super::tls::TlsError>),
    #[error("the data plane is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("peer {peer} at {addr} is unreachable")]
    Unreachable {
        peer: NodeId,
        addr: SocketAddr,
        #[source]
        source: ConnectError,
    },
    #[error("peer {peer} at {addr} failed TLS authentication: {reason}")]
    Authentication {
        peer: NodeId,
        addr: SocketAddr,
        reason: String,
    },
    #[error("peer {peer}: not a member of our cluster, or we not of its ({source})")]
    NotMember {
        peer: NodeId,
        #[source]
        source: ConnectError,
    },
    #[error("peer {peer} speaks protocol version {theirs}, this node {ours}")]
    IncompatibleVersion {
        peer: NodeId,
        ours: u16,
        theirs: u16,
    },
    #[error("peer {peer} has no free upload slot")]
    Busy { peer: NodeId },
    #[error("peer {peer} does not hold {blob}")]
    NotFound { peer: NodeId, blob: BlobId },
    #[error("peer {peer} does not hold byte {offset} of {blob}")]
    NotPresent {
        peer: NodeId,
        blob: BlobId,
        offset: u64,
        size: u64,
        /// The parts of the requested range the peer holds (possibly cut).
        available: Vec<Range<u64>>,
    },
    #[error("peer {peer} reports: {code}")]
    Remote { peer: NodeId, code: ErrorCode },
    #[error("peer {peer} aborted the transfer ({code:?})")]
    Aborted { peer: NodeId, code: ResetCode },
    #[error("peer {peer} timed out waiting for the {during}")]
    Timeout { peer: NodeId, during: &'static str },
    #[error("connection to peer {peer} lost")]
    Lost {
        peer: NodeId,
        #[source]
        source: ConnectionError,
    },
    #[error("peer {peer} broke the protocol: {detail}")]
    Protocol { peer: NodeId, detail: String },
    #[error("the data plane is shutting down")]
    ShuttingDown,
}

/// The body of a range response: exactly `len()` bytes.
pub struct RangeStream {
    peer: NodeId,
    recv: RecvStream,
    len: u64,
    remaining: u64,
    timeout: Duration,
    counter: Counter,
}

impl P2pHandle {
    /// Asks `peer` (at `addr`) for `len` bytes of `blob` at `offset`. On
    /// success the stream yields the committed prefix of that range held by
    /// the peer: `RangeStream::len()` bytes, possibly fewer than asked.
    pub async fn fetch_range(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        blob: &BlobId,
        offset: u64,
        len: u64,
    ) -> Result<RangeStream, FetchError> {
        let inner = &self.inner;
        let conn = self.connection(peer, addr).await?;
        let req = Frame::GetRange(GetRange {
            blob: blob.clone(),
            offset,
            len,
        });
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(peer, e))?;
        write_frame(&mut send, &req)
            .await
            .map_err(|e| frame_error(peer, e))?;
        let _ = send.finish();
        let reply = tokio::time::timeout(inner.cfg.request_timeout, read_frame(&mut recv))
            .await
            .map_err(|_| FetchError::Timeout {
                peer,
                during: "range header",
            })?
            .map_err(|e| frame_error(peer, e))?;
        let header = match reply {
            Frame::RangeHeader(header) => header,
            Frame::Error(code) => return Err(FetchError::Remote { peer, code }),
            other => return Err(unexpected(peer, &other)),
        };
        let RangeHeader { status, len: body } = header;
        match status {
            RangeStatus::Ok if body <= len => Ok(RangeStream {
                peer,
                recv,
                len: body,
                remaining: body,
                timeout: inner.cfg.request_timeout,
                counter: inner.metrics.download_counter(&peer),
            }),
            RangeStatus::Ok => Err(FetchError::Protocol {
                peer,
                detail: format!("announced {body} bytes for a request of {len}"),
            }),
            RangeStatus::NotPresent { size, available } => Err(FetchError::NotPresent {
                peer,
                blob: blob.clone(),
                offset,
                size,
                available: available.into_iter().map(|(s, e)| s..e).collect(),
            }),
            RangeStatus::Busy => Err(FetchError::Busy { peer }),
            RangeStatus::NotFound => Err(FetchError::NotFound {
                peer,
                blob: blob.clone(),
            }),
            RangeStatus::Error(code) => Err(FetchError::Remote { peer, code }),
        }
    }

    /// `fetch_range` of `buf.len()` bytes into `buf`; returns how many were
    /// filled (fewer than asked if the peer holds a shorter prefix).
    pub async fn fetch_range_into(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        blob: &BlobId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, FetchError> {
        let mut stream = self
            .fetch_range(peer, addr, blob, offset, buf.len() as u64)
            .await?;
        let mut filled = 0;
        loop {
            let n = stream.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Ok(filled);
            }
            filled += n;
        }
    }

    /// Exactly `len` bytes of `blob` at `offset` from `peer`; a peer that
    /// holds fewer is `NotPresent`.
    pub async fn fetch_exact(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        blob: &BlobId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FetchError> {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let n = self
            .fetch_range_into(peer, addr, blob, offset, &mut buf)
            .await?;
        if n as u64 != len {
            return Err(FetchError::NotPresent {
                peer,
                blob: blob.clone(),
                offset: offset + n as u64,
                size: 0,
                available: Vec::new(),
            });
        }
        Ok(buf)
    }

    /// Which pieces of `blob` `peer` holds completely; `None` if none.
    pub async fn have(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        blob: &BlobId,
    ) -> Result<Option<PieceMap>, FetchError> {
        let conn = self.connection(peer, addr).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(peer, e))?;
        write_frame(&mut send, &Frame::Have { blob: blob.clone() })
            .await
            .map_err(|e| frame_error(peer, e))?;
        let _ = send.finish();
        let reply = tokio::time::timeout(self.inner.cfg.request_timeout, read_frame(&mut recv))
            .await
            .map_err(|_| FetchError::Timeout {
                peer,
                during: "piece map",
            })?
            .map_err(|e| frame_error(peer, e))?;
        match reply {
            Frame::HaveReply(map) => Ok(map),
            Frame::Error(code) => Err(FetchError::Remote { peer, code }),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Dials `peer` now if there is no open connection to it (fetches do
    /// this themselves).
    pub async fn connect(&self, peer: NodeId, addr: SocketAddr) -> Result<(), FetchError> {
        self.connection(peer, addr).await.map(drop)
    }

    /// The pooled connection to `peer`, dialing it if needed.
    async fn connection(&self, peer: NodeId, addr: SocketAddr) -> Result<Connection, FetchError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(FetchError::ShuttingDown);
        }
        let (id, dial) = match inner.pool.lookup(peer) {
            Lookup::Ready(conn) => return Ok(conn),
            Lookup::Dialing(id, dial) => (id, dial),
            Lookup::Missing => {
                let dial = dial(Arc::clone(inner), peer, addr).boxed().shared();
                (inner.pool.insert_dial(peer, dial.clone()), dial)
            }
        };
        let result = dial.await;
        inner.pool.finish_dial(peer, id, &result);
        result.map_err(|source| connect_error(peer, addr, source))
    }
}

type Dial = Shared<BoxFuture<'static, Result<Connection, ConnectError>>>;

/// Connections by peer. The map is only touched briefly (no lock across an
/// await); a dial in progress is a shared future all callers await.
#[derive(Default)]
pub(super) struct Pool {
    slots: Mutex<HashMap<NodeId, Slot>>,
    next_id: AtomicU64,
}

enum Slot {
    Ready(Connection),
    Dialing(u64, Dial),
}

enum Lookup {
    Ready(Connection),
    Dialing(u64, Dial),
    Missing,
}

impl Pool {
    fn lookup(&self, peer: NodeId) -> Lookup {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match slots.get(&peer) {
            Some(Slot::Ready(conn)) if conn.close_reason().is_none() => Lookup::Ready(conn.clone()),
            Some(Slot::Dialing(id, dial)) => Lookup::Dialing(*id, dial.clone()),
            Some(Slot::Ready(_)) => {
                slots.remove(&peer);
                Lookup::Missing
            }
            None => Lookup::Missing,
        }
    }

    /// Records a dial (replacing nothing newer: a racing caller's dial is
    /// simply superseded) and returns its id.
    fn insert_dial(&self, peer: NodeId, dial: Dial) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|_, slot| match slot {
            Slot::Ready(conn) => conn.close_reason().is_none(),
            Slot::Dialing(..) => true,
        });
        slots.insert(peer, Slot::Dialing(id, dial));
        id
    }

    /// Forgets every connection and dial (on shutdown: a dial abandoned by
    /// all its callers would otherwise keep the data plane alive).
    pub(super) fn clear(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn finish_dial(&self, peer: NodeId, id: u64, result: &Result<Connection, ConnectError>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if !matches!(slots.get(&peer), Some(Slot::Dialing(current, _)) if *current == id) {
            return;
        }
        match result {
            Ok(conn) => slots.insert(peer, Slot::Ready(conn.clone())),
            Err(_) => slots.remove(&peer),
        };
    }
}

/// Dials `peer`, authenticates it (TLS) and proves membership both ways.
async fn dial(
    inner: Arc<Inner>,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<Connection, ConnectError> {
    let config = endpoint::client_config(&inner.cfg, &inner.cert, peer)
        .map_err(|e| ConnectError::Tls(Arc::new(e)))?;
    let connecting = inner
        .endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(ConnectError::Dial)?;
    let conn = match tokio::time::timeout(inner.cfg.connect_timeout, connecting).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(conn)) => conn,
    };
    if let Err(e) = inner.membership.dial(&conn, peer).await {
        return Err(match e {
            HandshakeError::Refused => ConnectError::NotMember,
            HandshakeError::RefusedByPeer => ConnectError::RefusedByPeer,
            HandshakeError::IncompatibleVersion { ours, theirs } => {
                ConnectError::IncompatibleVersion { ours, theirs }
            }
            HandshakeError::Connection(e) => classify(e),
            HandshakeError::Timeout => ConnectError::Timeout,
            other => ConnectError::Handshake(Arc::new(other)),
        });
    }
    inner.metrics.connections.inc();
    // Owned watcher: counts the connection until it closes, and closes it
    // on shutdown.
    let watched = conn.clone();
    let metrics = inner.metrics.clone();
    let cancel = inner.cancel.clone();
    let span = tracing::debug_span!("p2p_dialed", peer = %peer.short());
    inner.tracker.spawn(
        async move {
            tokio::select! {
                _ = watched.closed() => {}
                _ = cancel.cancelled() => watched.close(
                    shoal_proto::wire::CloseCode::Normal.to_u32().into(),
                    b"shutting down",
                ),
            }
            metrics.connections.dec();
        }
        .instrument(span),
    );
    Ok(conn)
}

/// TLS failures (a crypto alert: bad certificate, wrong node) are told
/// apart from unreachable peers.
fn classify(e: ConnectionError) -> ConnectError {
    match &e {
        ConnectionError::TransportError(t) if (0x100..0x200).contains(&u64::from(t.code)) => {
            ConnectError::Authentication {
                reason: t.reason.clone(),
            }
        }
        ConnectionError::ConnectionClosed(c)
            if (0x100..0x200).contains(&u64::from(c.error_code)) =>
        {
            ConnectError::Authentication {
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            }
        }
        ConnectionError::ApplicationClosed(c) => {
            match shoal_proto::wire::CloseCode::from_u64(c.error_code.into_inner()) {
                shoal_proto::wire::CloseCode::JoinRefused => ConnectError::RefusedByPeer,
                _ => ConnectError::Connection(e),
            }
        }
        _ => ConnectError::Connection(e),
    }
}

fn connect_error(peer: NodeId, addr: SocketAddr, source: ConnectError) -> FetchError {
    match source {
        ConnectError::NotMember | ConnectError::RefusedByPeer => {
            FetchError::NotMember { peer, source }
        }
        ConnectError::IncompatibleVersion { ours, theirs } => {
            FetchError::IncompatibleVersion { peer, ours, theirs }
        }
        ConnectError::Authentication { reason } => {
            FetchError::Authentication { peer, addr, reason }
        }
        ConnectError::ShuttingDown => FetchError::ShuttingDown,
        source => FetchError::Unreachable { peer, addr, source },
    }
}

fn lost(peer: NodeId, e: ConnectionError) -> FetchError {
    FetchError::Lost { peer, source: e }
}

fn frame_error(peer: NodeId, e: FrameError) -> FetchError {
    match e {
        FrameError::Read(e) => read_error(peer, e),
        FrameError::Write(quinn::WriteError::ConnectionLost(e)) => lost(peer, e),
        other => FetchError::Protocol {
            peer,
            detail: other.to_string(),
        },
    }
}

fn read_error(peer: NodeId, e: ReadError) -> FetchError {
    match e {
        ReadError::Reset(code) => FetchError::Aborted {
            peer,
            code: ResetCode::from_u64(code.into_inner()),
        },
        ReadError::ConnectionLost(e) => lost(peer, e),
        other => FetchError::Protocol {
            peer,
            detail: other.to_string(),
        },
    }
}

fn unexpected(peer: NodeId, frame: &Frame) -> FetchError {
    FetchError::Protocol {
        peer,
        detail: format!("unexpected {} frame", frame.name()),
    }
}

impl RangeStream {
    /// Bytes the peer announced (the whole body).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The next bytes (at most `MAX_CHUNK`); `None` after the last.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let max = usize::try_from(self.remaining)
            .unwrap_or(MAX_CHUNK)
            .min(MAX_CHUNK);
        let chunk = self.timed(|recv| recv.read_chunk(max, true)).await?;
        let Some(chunk) = chunk else {
            return Err(self.truncated());
        };
        self.consumed(chunk.bytes.len());
        Ok(Some(chunk.bytes))
    }

    /// Reads into `buf`; 0 after the last byte (or for an empty `buf`).
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, FetchError> {
        let max = usize::try_from(self.remaining)
            .unwrap_or(buf.len())
            .min(buf.len());
        if max == 0 {
            return Ok(0);
        }
        let n = self.timed(|recv| recv.read(&mut buf[..max])).await?;
        let Some(n) = n else {
            return Err(self.truncated());
        };
        self.consumed(n);
        Ok(n)
    }

    /// The rest of the body as a stream of chunks.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, FetchError>> {
        futures::stream::try_unfold(self, |mut s| async move {
            Ok(s.next_chunk().await?.map(|chunk| (chunk, s)))
        })
    }

    async fn timed<'a, T, F>(
        &'a mut self,
        op: impl FnOnce(&'a mut RecvStream) -> F,
    ) -> Result<T, FetchError>
    where
        F: std::future::Future<Output = Result<T, ReadError>> + 'a,
    {
        let (peer, timeout) = (self.peer, self.timeout);
        match tokio::time::timeout(timeout, op(&mut self.recv)).await {
            Err(_) => Err(FetchError::Timeout {
                peer,
                during: "range body",
            }),
            Ok(Err(e)) => Err(read_error(peer, e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn consumed(&mut self, n: usize) {
        self.remaining = self.remaining.saturating_sub(n as u64);
        self.counter.inc_by(n as u64);
    }

    fn truncated(&self) -> FetchError {
        FetchError::Protocol {
            peer: self.peer,
            detail: format!(
                "stream ended after {} of {} bytes",
                self.len - self.remaining,
                self.len
            ),
        }
    }
}

impl std::fmt::Debug for RangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeStream")
            .field("peer", &self.peer)
            .field("len", &self.len)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}
