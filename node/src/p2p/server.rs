//! The serving side: accepts connections, admits members (see
//! `membership`), and answers their request streams from the store.
//!
//! A range upload holds an upload slot from its header to its last byte;
//! when none is free the request is answered `Busy` at once. Bodies are read
//! from the store in `spawn_blocking` (whole pieces at a time, at most
//! `READ_MAX`, so a piece is hashed once per read) and written in slices of
//! at most `WRITE_MAX`, each after the shared rate limiter allowed it;
//! writes wait for the receiver's flow control, so a slow reader holds at
//! most one read buffer here and one stream window in QUIC.
//!
//! A failure after the header was sent resets the stream (`ResetCode`), so
//! the receiver never mistakes a short body for a complete one.

use std::ops::Range;
use std::sync::Arc;

use quinn::{Connection, Incoming, RecvStream, SendStream};
use shoal_proto::wire::{
    CloseCode, ErrorCode, Frame, GetRange, PieceMap, RangeHeader, RangeStatus, ResetCode,
    MAX_AVAILABLE_RANGES,
};
use shoal_proto::{BlobId, NodeId};
use tracing::Instrument;

use super::frames::{read_frame, write_frame, FrameError};
use super::membership::HandshakeError;
use super::Inner;
use crate::store::pieces::{piece_count, piece_range};
use crate::store::{BlobReader, BlobRecord, StoreError};

/// Largest slice written (and rate-limited) at once.
pub const WRITE_MAX: usize = 256 * 1024;
/// Largest read from the store at once (a whole piece when pieces are at
/// most this big).
pub const READ_MAX: u64 = 4 * 1024 * 1024;

/// Accepts connections until cancelled.
pub(super) async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            incoming = inner.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            break;
        };
        let span = tracing::info_span!("p2p_conn", remote = %incoming.remote_address());
        inner
            .tracker
            .spawn(connection(Arc::clone(&inner), incoming).instrument(span));
    }
}

/// One incoming connection: TLS, membership, then its request streams.
async fn connection(inner: Arc<Inner>, incoming: Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(inner.cfg.connect_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "incoming connection failed in TLS");
            inner.metrics.count_handshake_failure("tls");
            return;
        }
        Err(_) => {
            inner.metrics.count_handshake_failure("timeout");
            return;
        }
    };
    let peer = match inner.membership.accept(&conn).await {
        Ok(peer) => peer,
        Err(error) => {
            log_refusal(&inner, &conn, &error);
            return;
        }
    };
    tracing::debug!(peer = %peer, "member connected");
    inner.metrics.connections.inc();
    loop {
        let (send, recv) = tokio::select! {
            _ = inner.cancel.cancelled() => {
                conn.close(CloseCode::Normal.to_u32().into(), b"shutting down");
                break;
            }
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(_) => break,
            },
        };
        let span = tracing::debug_span!("p2p_request", peer = %peer.short());
        inner
            .tracker
            .spawn(request(Arc::clone(&inner), peer, send, recv).instrument(span));
    }
    inner.metrics.connections.dec();
}

/// Logs (once, here) why a peer was not admitted.
fn log_refusal(inner: &Inner, conn: &Connection, error: &HandshakeError) {
    let remote = conn.remote_address();
    let peer = super::tls::peer_node_id(conn);
    let peer = peer.as_ref().map(NodeId::to_string).unwrap_or_default();
    let reason = match error {
        HandshakeError::Refused => "join_refused",
        HandshakeError::IncompatibleVersion { .. } => "version",
        HandshakeError::Timeout => "timeout",
        _ => "protocol",
    };
    inner.metrics.count_handshake_failure(reason);
    match error {
        HandshakeError::Refused | HandshakeError::IncompatibleVersion { .. } => {
            tracing::warn!(%remote, %peer, %error, "refused peer");
        }
        _ => tracing::info!(%remote, %peer, %error, "peer handshake failed"),
    }
}

/// One request stream.
async fn request(inner: Arc<Inner>, peer: NodeId, mut send: SendStream, mut recv: RecvStream) {
    let frame = match tokio::time::timeout(inner.cfg.request_timeout, read_frame(&mut recv)).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(FrameError::Wire(error))) => {
            tracing::debug!(%error, "malformed request");
            let _ = write_frame(&mut send, &Frame::Error(ErrorCode::BadRequest)).await;
            let _ = send.finish();
            return;
        }
        Ok(Err(_)) | Err(_) => return,
    };
    let outcome = match frame {
        Frame::GetRange(req) => {
            let span = tracing::debug_span!("upload", blob = %req.blob, offset = req.offset, len = req.len);
            upload(&inner, peer, &mut send, req).instrument(span).await
        }
        Frame::Have { blob } => {
            let reply = piece_map(&inner, &blob).await;
            let reply = match reply {
                Ok(map) => Frame::HaveReply(map),
                Err(_) => Frame::Error(ErrorCode::Internal),
            };
            let _ = write_frame(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
        other => {
            tracing::debug!(frame = other.name(), "unexpected request frame");
            let _ = write_frame(&mut send, &Frame::Error(ErrorCode::BadRequest)).await;
            let _ = send.finish();
            return;
        }
    };
    inner.metrics.count_upload(outcome);
}

/// Serves one `GetRange`; returns the outcome label.
async fn upload(inner: &Inner, peer: NodeId, send: &mut SendStream, req: GetRange) -> &'static str {
    let Some(_slot) = inner.slots.try_acquire() else {
        respond(send, RangeStatus::Busy).await;
        return "busy";
    };
    inner.metrics.uploads_active.inc();
    let outcome = upload_with_slot(inner, peer, send, req).await;
    inner.metrics.uploads_active.dec();
    outcome
}

async fn upload_with_slot(
    inner: &Inner,
    peer: NodeId,
    send: &mut SendStream,
    req: GetRange,
) -> &'static str {
    let (mut reader, mut header) = match open_and_plan(inner, &req).await {
        Ok(planned) => planned,
        Err(status) => {
            respond(send, status).await;
            return "error";
        }
    };
    if matches!(
        header.status,
        RangeStatus::NotPresent { .. } | RangeStatus::NotFound
    ) {
        // This node may be the blob's seed: then it fetches the range ahead of its own fill.
        if let Some(planned) = seed(inner, &req).await {
            (reader, header) = planned;
        }
    }
    let Some(reader) = reader else {
        respond(send, RangeStatus::NotFound).await;
        return "not_found";
    };
    let outcome = match &header.status {
        RangeStatus::Ok => "ok",
        RangeStatus::NotPresent { .. } => "not_present",
        RangeStatus::Error(ErrorCode::OutOfRange { .. }) => "out_of_range",
        _ => "error",
    };
    if write_frame(send, &Frame::RangeHeader(header.clone()))
        .await
        .is_err()
    {
        return "aborted";
    }
    if header.status != RangeStatus::Ok {
        let _ = send.finish();
        return outcome;
    }
    match send_body(
        inner,
        peer,
        send,
        reader,
        req.offset..req.offset + header.len,
    )
    .await
    {
        Ok(()) => {
            let _ = send.finish();
            "ok"
        }
        Err(code) => {
            let _ = send.reset(code.to_u32().into());
            "aborted"
        }
    }
}

/// The blob's reader (`None`: not held) and the answer to `req` from what it holds now.
async fn open_and_plan(
    inner: &Inner,
    req: &GetRange,
) -> Result<(Option<BlobReader>, RangeHeader), RangeStatus> {
    let store = inner.store.clone();
    let blob = req.blob.clone();
    match tokio::task::spawn_blocking(move || store.open_reader(&blob)).await {
        Ok(Ok(Some(reader))) => {
            let header = plan(reader.record(), req.offset, req.len);
            Ok((Some(reader), header))
        }
        Ok(Ok(None)) => Ok((
            None,
            RangeHeader {
                status: RangeStatus::NotFound,
                len: 0,
            },
        )),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot open blob for upload");
            Err(RangeStatus::Error(ErrorCode::Internal))
        }
        Err(_) => Err(RangeStatus::Error(ErrorCode::Internal)),
    }
}

/// When this node fetches `req.blob` under the origin lease, asks that download for the range
/// and waits (at most half the request timeout, so the asker still gets an answer in time) until
/// the start of it is present; then the new reader and answer. `None`: not seeded here, or the
/// range did not come in time (the asker falls back as before).
async fn seed(inner: &Inner, req: &GetRange) -> Option<(Option<BlobReader>, RangeHeader)> {
    let end = req.offset.checked_add(req.len)?;
    let mut progress = inner.seeds.want(&req.blob, req.offset..end)?;
    inner.metrics.count_seed_request();
    let deadline = tokio::time::sleep(inner.cfg.request_timeout / 2);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            changed = progress.changed() => if changed.is_err() {
                // The download stopped seeding (done, or the lease went): one last look.
                return open_and_plan(inner, req).await.ok();
            },
            _ = &mut deadline => return None,
            _ = inner.cancel.cancelled() => return None,
        }
        if let Ok(
            planned @ (
                Some(_),
                RangeHeader {
                    status: RangeStatus::Ok,
                    ..
                },
            ),
        ) = open_and_plan(inner, req).await
        {
            return Some(planned);
        }
    }
}

/// Streams `range` of the blob; on failure returns the code to reset the
/// stream with.
async fn send_body(
    inner: &Inner,
    peer: NodeId,
    send: &mut SendStream,
    reader: BlobReader,
    range: Range<u64>,
) -> Result<(), ResetCode> {
    let counter = inner.metrics.upload_counter(&peer);
    let piece = reader.record().piece_size.max(1);
    let reader = Arc::new(reader);
    let mut buf = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        let want = read_len(pos, range.end, piece);
        let r = Arc::clone(&reader);
        let mut b = std::mem::take(&mut buf);
        let read = tokio::task::spawn_blocking(move || {
            b.resize(want, 0);
            let n = r.read_at(pos, &mut b);
            (b, n)
        })
        .await;
        let Ok((b, n)) = read else {
            return Err(ResetCode::Internal);
        };
        buf = b;
        let n = match n {
            Ok(0) => return Err(ResetCode::Internal),
            Ok(n) => n,
            Err(error @ StoreError::Corrupt { .. }) => {
                tracing::warn!(%error, "blob corrupt while uploading; dropped");
                return Err(ResetCode::Corrupt);
            }
            Err(error) => {
                tracing::warn!(%error, "store read failed while uploading");
                return Err(ResetCode::Internal);
            }
        };
        #[cfg(feature = "fault-injection")]
        if inner.cfg.fault_corrupt_uploads {
            // Fault injection for tests of peer verification: a node that
            // serves wrong bytes.
            buf[0] ^= 0x55;
        }
        crate::faults::crash_point("p2p.serve.mid_body");
        for slice in buf[..n].chunks(WRITE_MAX) {
            inner.rate.acquire(slice.len() as u64).await;
            // `write` takes what flow control allows; counting each part
            // makes the counter exactly the bytes handed to QUIC.
            let mut sent = 0;
            while sent < slice.len() {
                let n = tokio::select! {
                    _ = inner.cancel.cancelled() => return Err(ResetCode::Shutdown),
                    // An error: the receiver stopped the stream or went away.
                    n = send.write(&slice[sent..]) => n.map_err(|_| ResetCode::Cancelled)?,
                };
                counter.inc_by(n as u64);
                inner.metrics.upload_total.inc_by(n as u64);
                sent += n;
            }
        }
        pos += n as u64;
    }
    Ok(())
}

/// How much to read at `pos` (before `end`): up to `READ_MAX`, ending on a
/// piece boundary when that leaves something to read.
fn read_len(pos: u64, end: u64, piece: u64) -> usize {
    let mut stop = end.min(pos.saturating_add(READ_MAX));
    if stop < end {
        let aligned = stop - stop % piece;
        if aligned > pos {
            stop = aligned;
        }
    }
    // At most READ_MAX, so it fits a usize.
    usize::try_from(stop - pos).unwrap_or(WRITE_MAX)
}

/// The header answering a request for `len` bytes at `offset` of `rec`.
pub fn plan(rec: &BlobRecord, offset: u64, len: u64) -> RangeHeader {
    let reply = |status| RangeHeader { status, len: 0 };
    let out_of_range = reply(RangeStatus::Error(ErrorCode::OutOfRange { size: rec.size }));
    let Some(end) = offset.checked_add(len) else {
        return out_of_range;
    };
    if end > rec.size || (len > 0 && offset >= rec.size) {
        return out_of_range;
    }
    if len == 0 {
        return RangeHeader {
            status: RangeStatus::Ok,
            len: 0,
        };
    }
    match rec.present.run_containing(offset) {
        Some(run) => RangeHeader {
            status: RangeStatus::Ok,
            len: run.end.min(end) - offset,
        },
        None => {
            let available = rec
                .present
                .iter()
                .filter(|r| r.end > offset && r.start < end)
                .map(|r| (r.start.max(offset), r.end.min(end)))
                .take(MAX_AVAILABLE_RANGES)
                .collect();
            reply(RangeStatus::NotPresent {
                size: rec.size,
                available,
            })
        }
    }
}

/// The fully present pieces of `blob`, if held.
async fn piece_map(inner: &Inner, blob: &BlobId) -> Result<Option<PieceMap>, StoreError> {
    let store = inner.store.clone();
    let blob = blob.clone();
    let rec = tokio::task::spawn_blocking(move || store.blob(&blob))
        .await
        .map_err(|_| StoreError::Config {
            field: "p2p",
            problem: "store task panicked",
        })??;
    Ok(rec.map(|rec| piece_map_of(&rec)))
}

pub fn piece_map_of(rec: &BlobRecord) -> PieceMap {
    let mut map = PieceMap::empty(rec.size, rec.piece_size, rec.complete);
    for piece in 0..piece_count(rec.size, rec.piece_size) {
        if rec
            .present
            .contains_range(&piece_range(piece, rec.piece_size, rec.size))
        {
            map.set(piece);
        }
    }
    map
}

async fn respond(send: &mut SendStream, status: RangeStatus) {
    let header = RangeHeader { status, len: 0 };
    if write_frame(send, &Frame::RangeHeader(header)).await.is_ok() {
        let _ = send.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RangeSet;
    use shoal_proto::Digest;

    fn record(size: u64, present: &[Range<u64>]) -> BlobRecord {
        let mut set = RangeSet::new();
        for r in present {
            set.insert(r.clone());
        }
        BlobRecord {
            id: Digest::sha256(b"x"),
            size,
            complete: false,
            present: set,
            piece_size: 256 * 1024,
            piece_sha256: Vec::new(),
            last_access_ms: 0,
            repos: Default::default(),
        }
    }

    #[test]
    fn plans_ranges() {
        let rec = record(1000, &[0..100, 200..300, 400..1000]);
        let ok = |len| RangeHeader {
            status: RangeStatus::Ok,
            len,
        };
        assert_eq!(plan(&rec, 0, 50), ok(50));
        // The committed run ends before the request: a short Ok.
        assert_eq!(plan(&rec, 50, 100), ok(50));
        assert_eq!(plan(&rec, 400, 600), ok(600));
        assert_eq!(plan(&rec, 1000, 0), ok(0));
        assert_eq!(
            plan(&rec, 150, 300).status,
            RangeStatus::NotPresent {
                size: 1000,
                available: vec![(200, 300), (400, 450)]
            }
        );
        for (offset, len) in [(900, 101), (1000, 1), (u64::MAX, 2)] {
            assert_eq!(
                plan(&rec, offset, len).status,
                RangeStatus::Error(ErrorCode::OutOfRange { size: 1000 })
            );
        }
    }

    #[test]
    fn reads_end_on_piece_boundaries() {
        let piece = 1 << 20;
        assert_eq!(read_len(0, 100, piece), 100);
        assert_eq!(read_len(0, 10 << 20, piece), READ_MAX as usize);
        assert_eq!(read_len(100, 10 << 20, piece), (READ_MAX - 100) as usize);
        // Pieces bigger than READ_MAX: read READ_MAX at a time.
        assert_eq!(read_len(100, 64 << 20, 16 << 20), READ_MAX as usize);
    }

    #[test]
    fn piece_maps_count_whole_pieces() {
        let p = 256 * 1024;
        let rec = record(3 * p + 10, &[0..p, p + 1..2 * p + 5, 3 * p..3 * p + 10]);
        let map = piece_map_of(&rec);
        assert_eq!(map.pieces(), 4);
        assert!(map.has(0) && !map.has(1) && !map.has(2) && map.has(3));
    }
}
