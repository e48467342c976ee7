//! The node's RAFS [`ChunkSource`] for one mount: local store first, then peers holding the range
//! (on a node in a cluster), then origin `Range` GETs,
//! every chunk verified before it is returned or stored. Prefetch (`prefetch.rs`) uses the same
//! path through [`ChunkBackend::prefetch_chunk`], behind on-demand reads (it waits while any
//! read is in the backend), and reads can be recorded into the image's access list. This file is the one sync→async bridge
//! of the FUSE path: the FUSE read workers (plain threads) call [`ChunkBackend::read_chunk`],
//! which blocks on the node's runtime for origin requests.
//!
//! Order for a chunk: the blob's store record is complete or holds the chunk's compressed range →
//! `BlobReader::read_at` (piece-verified by the store) and `decode_chunk` (digest-verified);
//! otherwise a range that also covers the following chunks of the blob that are neither present
//! nor in flight, up to [`MAX_REQUEST`] bytes, and past the end of the file only up to
//! [`AMPLIFY`] ([`plan`]), asked of a peer holding it
//! (`Peering::read_range`) and else of the origin; a peer range in which any chunk fails its
//! digest blames the peer and is fetched from the origin instead. Concurrent readers of
//! a chunk covered by a request in flight wait for it instead of asking again (single flight keyed
//! by (blob index, compressed offset)).
//!
//! Batch blobs (`nydus-image --batch-size`): a batched chunk's stored range is its whole batch's,
//! so the chunks of one batch share a flight and a stored range, and each reader cuts its own
//! chunk out of the batch (`decode_chunk`); the blob's CI table, which places them, is read once
//! at mount ([`ChunkBackend::locate_batches`]).
//!
//! Invariants: bytes reach a caller only through `decode_chunk` (digest from the bootstrap, whose
//! own digest came from the manifest). Only verified chunks are written to the store's partial
//! blob; a chunk that fails verification is an error for its readers (EIO) and is never written.
//! The store allows one writer per blob: the backend opens one only for the moment it writes and
//! commits, and when the blob is complete or another writer (a whole-blob download) holds it, the
//! fetched chunks are simply not kept. The flight map is only ever locked briefly, never across a
//! fetch.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use reqwest::header::{HeaderMap, HeaderValue, RANGE};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use shoal_proto::{BlobId, NodeId, RepoName};
use shoal_rafs::{
    decode_chunk, BlobInfo, Bootstrap, ChunkRef, ChunkSource, VerifiedChunk, MAX_CHUNK_SIZE,
};
use tokio_util::sync::CancellationToken;

use super::prefetch::AccessLog;
use crate::metrics::{KindLabels, Metrics};
use crate::store::{RangeSet, Store, StoreError};
use crate::upstream::{AuthMode, Origin};

/// Largest origin request: adjacent missing chunks are merged up to this many bytes.
pub const MAX_REQUEST: u64 = 4 << 20;
/// Chunks separated by at most this many bytes still count as adjacent.
const MAX_GAP: u64 = 64 << 10;
/// A request that goes past the end of the file being read takes other files' chunks along up
/// to this many bytes in all (nydusd amplifies its reads the same way, to 1 MiB): a cold read of
/// many small files then costs far fewer requests than one per file. Kept small because every
/// byte of it is a guess: at 64 KiB, reading every file of the debian-python image cold took 803
/// origin requests instead of 6,665 (7.8 s instead of 34.9 s on loopback), while a container's
/// python3 start read 6.6 % of the image's data instead of 5.9 % (at 1 MiB: 19 MB, 22 %).
/// Within one file, requests go up to [`MAX_REQUEST`].
pub const AMPLIFY: u64 = 64 << 10;

/// Where one data blob of the image lives.
#[derive(Clone, Debug)]
pub struct BlobSpec {
    /// The registry digest (`sha256:<blob id>`).
    pub id: BlobId,
    /// The blob's size as the manifest says.
    pub size: u64,
    /// Whether the node may read this blob in the mount's repository ([`super::resolve::node_access`]):
    /// only then are stored and peer copies used and fetched chunks kept in the store. An
    /// image's bootstrap names its blobs (whoever pushed it chose them), so otherwise the mount
    /// gets only what its origin sends, fetched for it alone.
    pub shared: bool,
}

/// Counters of one mount's chunk backend.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub local_chunks: AtomicU64,
    /// Compressed bytes read from the local store.
    pub local_bytes: AtomicU64,
    pub origin_chunks: AtomicU64,
    /// Bytes received from the origin (whole requests, so merged neighbours count too).
    pub origin_bytes: AtomicU64,
    pub origin_requests: AtomicU64,
    pub origin_errors: AtomicU64,
    /// Chunks from the origin (or the store) that failed verification.
    pub verify_failures: AtomicU64,
    /// Verified chunks written to the store.
    pub stored_chunks: AtomicU64,
    /// Verified chunks not kept: another writer (a whole-blob download) held the blob.
    pub unkept_chunks: AtomicU64,
    /// Chunks fetched from peers, and their bytes (a slot for the P2P path; 0 until it lands).
    pub peer_chunks: AtomicU64,
    pub peer_bytes: AtomicU64,
    /// Of the origin figures above: chunks and bytes fetched for prefetch, not for a read.
    pub prefetch_chunks: AtomicU64,
    pub prefetch_bytes: AtomicU64,
}

/// A plain copy of [`SourceStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SourceSnapshot {
    pub local_chunks: u64,
    pub local_bytes: u64,
    pub origin_chunks: u64,
    pub origin_bytes: u64,
    pub origin_requests: u64,
    pub origin_errors: u64,
    pub verify_failures: u64,
    pub stored_chunks: u64,
    #[serde(default)]
    pub peer_chunks: u64,
    #[serde(default)]
    pub peer_bytes: u64,
    #[serde(default)]
    pub prefetch_chunks: u64,
    #[serde(default)]
    pub prefetch_bytes: u64,
    #[serde(default)]
    pub unkept_chunks: u64,
}

impl SourceStats {
    pub fn snapshot(&self) -> SourceSnapshot {
        SourceSnapshot {
            local_chunks: self.local_chunks.load(Relaxed),
            local_bytes: self.local_bytes.load(Relaxed),
            origin_chunks: self.origin_chunks.load(Relaxed),
            origin_bytes: self.origin_bytes.load(Relaxed),
            origin_requests: self.origin_requests.load(Relaxed),
            origin_errors: self.origin_errors.load(Relaxed),
            verify_failures: self.verify_failures.load(Relaxed),
            stored_chunks: self.stored_chunks.load(Relaxed),
            peer_chunks: self.peer_chunks.load(Relaxed),
            peer_bytes: self.peer_bytes.load(Relaxed),
            prefetch_chunks: self.prefetch_chunks.load(Relaxed),
            prefetch_bytes: self.prefetch_bytes.load(Relaxed),
            unkept_chunks: self.unkept_chunks.load(Relaxed),
        }
    }
}

/// What the backend needs from the node.
#[derive(Clone)]
pub struct Deps {
    pub rt: tokio::runtime::Handle,
    pub store: Store,
    pub origin: Arc<Origin>,
    pub repo: RepoName,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    /// The cluster: chunks are asked of peers before the origin.
    pub peering: Option<crate::peering::Peering>,
    /// Where verified chunks the store must not keep are kept for this mount alone.
    pub private: Arc<super::private::PrivateChunks>,
}

/// The chunk source of one mount. See the module docs.
pub struct ChunkBackend {
    deps: Deps,
    /// Indexed by bootstrap blob index.
    blobs: Vec<BlobEntry>,
    flights: Mutex<HashMap<(u32, u64), Arc<Flight>>>,
    stats: Arc<SourceStats>,
    /// On-demand reads in the backend now; prefetch waits for none.
    demand: DemandGate,
    /// Where first touches are recorded (the image's first run), if anywhere.
    access: Option<Arc<AccessLog>>,
}

struct BlobEntry {
    spec: BlobSpec,
    /// The blob's chunks by compressed offset, one per offset.
    chunks: Vec<ChunkRef>,
    /// Held while this backend writes the blob (one writer per blob in the store).
    writing: Mutex<()>,
}

/// One chunk's fetch in progress: the verified compressed bytes, or why there are none.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Result<Arc<Vec<u8>>, String>>>,
    cv: Condvar,
}

impl ChunkBackend {
    /// A backend for blobs `specs` (in bootstrap blob order) with their chunk tables.
    pub fn new(deps: Deps, blobs: Vec<(BlobSpec, Vec<ChunkRef>)>) -> Self {
        let blobs = blobs
            .into_iter()
            .map(|(spec, mut chunks)| {
                chunks.sort_by_key(|c| c.compressed_offset);
                chunks.dedup_by_key(|c| c.compressed_offset);
                BlobEntry {
                    spec,
                    chunks,
                    writing: Mutex::new(()),
                }
            })
            .collect();
        ChunkBackend {
            deps,
            blobs,
            flights: Mutex::new(HashMap::new()),
            stats: Arc::new(SourceStats::default()),
            demand: DemandGate::default(),
            access: None,
        }
    }

    /// Place the batched chunks of `boot`'s batch blobs (`nydus-image --batch-size`): read each
    /// such blob's compression-info table ([`ChunkBackend::read_range`]), attach it to `boot`
    /// (which checks it against the bootstrap's chunk table) and take the blob's chunk table
    /// again, now with every batched chunk at its batch's stored range. Blocking.
    pub fn locate_batches(&mut self, boot: &Bootstrap) -> Result<(), String> {
        for blob in boot.blobs_needing_meta() {
            let (offset, len) = boot
                .blob_meta_range(blob.index)
                .map_err(|e| e.to_string())?;
            let region = self.read_range(blob.index, offset..offset + len)?;
            boot.attach_blob_meta(blob.index, &region)
                .map_err(|e| format!("blob {}: {e}", blob.blob_id))?;
            let mut chunks = boot.blob_chunks(blob.index).map_err(|e| e.to_string())?;
            chunks.sort_by_key(|c| c.compressed_offset);
            chunks.dedup_by_key(|c| c.compressed_offset);
            if let Some(entry) = self.blobs.get_mut(blob.index as usize) {
                entry.chunks = chunks;
            }
        }
        Ok(())
    }

    /// `range` of blob `index` as stored: from the store when it holds it (and the node may
    /// read the blob there, [`BlobSpec::shared`]), else from the origin — never from peers:
    /// these are not chunks, so nothing checks them on arrival.
    /// Callers use such bytes only where what they say is checked otherwise (a CI table says
    /// where chunks lie; the chunks are verified by digest). At most 1 GiB. Blocking.
    pub fn read_range(&self, index: u32, range: Range<u64>) -> Result<Vec<u8>, String> {
        let entry = self
            .blobs
            .get(index as usize)
            .ok_or_else(|| format!("no blob {index} in the image"))?;
        let len = range.end.saturating_sub(range.start);
        if len > 1 << 30 || range.end > entry.spec.size {
            return Err(format!(
                "range {range:?} of blob {} ({} bytes) refused",
                entry.spec.id, entry.spec.size
            ));
        }
        let stored = match entry.spec.shared {
            true => self.deps.store.open_reader(&entry.spec.id),
            false => Ok(None),
        };
        if let Ok(Some(reader)) = stored {
            let rec = reader.record();
            if rec.complete || rec.present.contains_range(&range) {
                let mut buf = vec![0u8; len as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    match reader.read_at(range.start + filled as u64, &mut buf[filled..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => filled += n,
                    }
                }
                if filled == buf.len() {
                    return Ok(buf);
                }
            }
        }
        self.fetch(entry, range, false)
    }

    /// Record the chunks reads ask for into `log` (first touch, in order).
    pub fn record_into(&mut self, log: Arc<AccessLog>) {
        self.access = Some(log);
    }

    /// Fetch `chunk` for prefetch unless the store holds it: Ok(true) fetched, Ok(false) held.
    pub fn prefetch_chunk(&self, blob: &BlobInfo, chunk: &ChunkRef) -> shoal_rafs::Result<bool> {
        let entry = self.entry(blob, chunk)?;
        let Some(present) = self.missing(entry, chunk) else {
            return Ok(false);
        };
        self.remote(entry, blob, chunk, &present, true)
            .map(|_| true)
    }

    /// Wait until no on-demand read is in the backend; false if cancelled first.
    pub fn wait_idle(&self, cancel: &CancellationToken) -> bool {
        self.demand.wait_idle(cancel)
    }

    /// `None` when the store holds `chunk`'s bytes; else what it holds of the blob.
    fn missing(&self, entry: &BlobEntry, chunk: &ChunkRef) -> Option<RangeSet> {
        if self
            .deps
            .private
            .holds(chunk.blob_index, &compressed_range(chunk))
        {
            return None;
        }
        if !entry.spec.shared {
            return Some(RangeSet::new());
        }
        let reader = match self.deps.store.open_reader(&entry.spec.id) {
            Ok(Some(r)) => r,
            _ => return Some(RangeSet::new()),
        };
        let rec = reader.record();
        if rec.complete || rec.present.contains_range(&compressed_range(chunk)) {
            return None;
        }
        Some(rec.present.clone())
    }

    pub fn stats(&self) -> &Arc<SourceStats> {
        &self.stats
    }

    /// The chunk of blob `blob_index` stored at `compressed_offset`, as this image's bootstrap
    /// describes it (what a mount served from another process asks for); for a batch, one of
    /// the chunks packed in it.
    pub fn chunk_at(&self, blob_index: u32, compressed_offset: u64) -> Option<&ChunkRef> {
        let entry = self.blobs.get(blob_index as usize)?;
        let i = entry
            .chunks
            .binary_search_by_key(&compressed_offset, |c| c.compressed_offset)
            .ok()?;
        entry.chunks.get(i)
    }

    fn entry(&self, blob: &BlobInfo, chunk: &ChunkRef) -> shoal_rafs::Result<&BlobEntry> {
        if chunk.blob_index != blob.index {
            return Err(shoal_rafs::Error::InvalidField {
                what: "chunk blob index",
                value: chunk.blob_index.into(),
                reason: "differs from the blob read",
            });
        }
        if chunk.compressed_size > MAX_CHUNK_SIZE {
            return Err(shoal_rafs::Error::InvalidField {
                what: "chunk compressed size",
                value: chunk.compressed_size.into(),
                reason: "above 16 MiB",
            });
        }
        self.blobs
            .get(blob.index as usize)
            .ok_or(shoal_rafs::Error::InvalidField {
                what: "blob index",
                value: blob.index.into(),
                reason: "not in the image's blob table",
            })
    }

    /// The chunk from the store, if it holds it and it verifies; also what the store holds.
    fn local(
        &self,
        entry: &BlobEntry,
        blob: &BlobInfo,
        chunk: &ChunkRef,
    ) -> (Option<VerifiedChunk>, RangeSet) {
        let range = compressed_range(chunk);
        if let Some(buf) = self.deps.private.read(blob.index, &range) {
            match decode_chunk(blob, chunk, &buf) {
                Ok(v) => {
                    self.stats.local_chunks.fetch_add(1, Relaxed);
                    self.stats
                        .local_bytes
                        .fetch_add(chunk.compressed_size.into(), Relaxed);
                    return (Some(v), RangeSet::new());
                }
                Err(e) => {
                    self.stats.verify_failures.fetch_add(1, Relaxed);
                    tracing::warn!(blob = %entry.spec.id, error = %e, "privately kept chunk does not verify; fetching it again");
                }
            }
        }
        if !entry.spec.shared {
            return (None, RangeSet::new());
        }
        let reader = match self.deps.store.open_reader(&entry.spec.id) {
            Ok(Some(r)) => r,
            Ok(None) => return (None, RangeSet::new()),
            Err(e) => {
                tracing::warn!(blob = %entry.spec.id, error = %e, "store unreadable; asking the origin");
                return (None, RangeSet::new());
            }
        };
        let present = reader.record().present.clone();
        if !(reader.record().complete || present.contains_range(&range)) {
            return (None, present);
        }
        let mut buf = vec![0u8; chunk.compressed_size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read_at(range.start + filled as u64, &mut buf[filled..]) {
                Ok(0) => return (None, RangeSet::new()),
                Ok(n) => filled += n,
                Err(e) => {
                    // Corrupt pieces drop the blob; either way the origin is asked.
                    tracing::warn!(blob = %entry.spec.id, error = %e, "stored chunk unreadable; asking the origin");
                    return (None, RangeSet::new());
                }
            }
        }
        match decode_chunk(blob, chunk, &buf) {
            Ok(v) => {
                self.stats.local_chunks.fetch_add(1, Relaxed);
                self.deps
                    .metrics
                    .mount_chunk_bytes
                    .get_or_create(&KindLabels { kind: "local" })
                    .inc_by(chunk.compressed_size.into());
                self.stats
                    .local_bytes
                    .fetch_add(chunk.compressed_size.into(), Relaxed);
                (Some(v), present)
            }
            Err(e) => {
                self.stats.verify_failures.fetch_add(1, Relaxed);
                tracing::warn!(blob = %entry.spec.id, error = %e, "stored chunk does not verify; asking the origin");
                (None, RangeSet::new())
            }
        }
    }

    /// Join the fetch of `chunk` in flight, or lead one covering it and its missing neighbours.
    fn remote(
        &self,
        entry: &BlobEntry,
        blob: &BlobInfo,
        chunk: &ChunkRef,
        present: &RangeSet,
        prefetch: bool,
    ) -> shoal_rafs::Result<VerifiedChunk> {
        let key = (blob.index, chunk.compressed_offset);
        let lead = {
            let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(f) = flights.get(&key) {
                Err(f.clone())
            } else {
                let private = &self.deps.private;
                let planned = plan(&entry.chunks, chunk, blob.chunk_size, |c| {
                    let r = compressed_range(c);
                    !present.contains_range(&r)
                        && !private.holds(blob.index, &r)
                        && !flights.contains_key(&(blob.index, c.compressed_offset))
                });
                let flights_of: Vec<_> = planned
                    .iter()
                    .map(|c| {
                        let f = Arc::new(Flight::default());
                        flights.insert((blob.index, c.compressed_offset), f.clone());
                        f
                    })
                    .collect();
                Ok(Lead {
                    backend: self,
                    blob_index: blob.index,
                    chunks: planned,
                    flights: flights_of,
                })
            }
        };
        match lead {
            Err(flight) => {
                let bytes = flight.wait().map_err(|reason| fetch_error(entry, reason))?;
                decode_chunk(blob, chunk, &bytes)
            }
            Ok(lead) => self.lead(entry, blob, chunk, lead, prefetch),
        }
    }

    fn lead(
        &self,
        entry: &BlobEntry,
        blob: &BlobInfo,
        chunk: &ChunkRef,
        lead: Lead<'_>,
        prefetch: bool,
    ) -> shoal_rafs::Result<VerifiedChunk> {
        let (Some(first), Some(last)) = (lead.chunks.first(), lead.chunks.last()) else {
            return Err(fetch_error(entry, "empty fetch plan".into()));
        };
        let range = first.compressed_offset..compressed_range(last).end;
        // Peers first; their bytes are checked chunk by chunk like the
        // origin's, and a peer whose range does not verify is blamed and
        // the range fetched from the origin instead.
        let mut from_peer = self.fetch_from_peer(entry, range.clone());
        let mut data = match from_peer.take() {
            Some((peer, d)) => {
                from_peer = Some((peer, Vec::new()));
                d
            }
            None => match self.fetch(entry, range.clone(), prefetch) {
                Ok(d) => d,
                Err(reason) => {
                    self.stats.origin_errors.fetch_add(1, Relaxed);
                    lead.fail(&reason);
                    return Err(fetch_error(entry, reason));
                }
            },
        };
        let decoded = loop {
            let decoded: Vec<_> = lead
                .chunks
                .iter()
                .map(|c| {
                    let at = (c.compressed_offset - range.start) as usize;
                    decode_chunk(blob, c, &data[at..at + c.compressed_size as usize])
                })
                .collect();
            let Some((peer, _)) = from_peer.take() else {
                break decoded;
            };
            if decoded.iter().all(|r| r.is_ok()) {
                self.stats
                    .peer_chunks
                    .fetch_add(lead.chunks.len() as u64, Relaxed);
                self.stats.peer_bytes.fetch_add(data.len() as u64, Relaxed);
                self.deps
                    .metrics
                    .mount_chunk_bytes
                    .get_or_create(&KindLabels { kind: "peer" })
                    .inc_by(data.len() as u64);
                return self
                    .finish_lead(entry, chunk, lead, &range, &data, decoded, prefetch, true);
            }
            self.stats.verify_failures.fetch_add(1, Relaxed);
            self.deps.metrics.bad_pieces.inc();
            tracing::warn!(blob = %entry.spec.id, peer = %peer, "chunks from a peer do not verify; peer blamed, asking the origin");
            if let Some(p) = &self.deps.peering {
                p.blame(
                    &entry.spec.id,
                    peer,
                    shoal_proto::sched::FailureReason::BadPiece,
                );
            }
            data = match self.fetch(entry, range.clone(), prefetch) {
                Ok(d) => d,
                Err(reason) => {
                    self.stats.origin_errors.fetch_add(1, Relaxed);
                    lead.fail(&reason);
                    return Err(fetch_error(entry, reason));
                }
            };
        };
        self.finish_lead(entry, chunk, lead, &range, &data, decoded, prefetch, false)
    }

    /// Hand the decoded chunks of a fetch to their waiters, keep the good
    /// ones, and return the asked-for one.
    #[allow(clippy::too_many_arguments)]
    fn finish_lead(
        &self,
        entry: &BlobEntry,
        chunk: &ChunkRef,
        lead: Lead<'_>,
        range: &Range<u64>,
        data: &[u8],
        decoded: Vec<shoal_rafs::Result<VerifiedChunk>>,
        prefetch: bool,
        from_peer: bool,
    ) -> shoal_rafs::Result<VerifiedChunk> {
        let mut mine = None;
        let mut keep = Vec::new();
        for ((c, flight), result) in lead.chunks.iter().zip(&lead.flights).zip(decoded) {
            let at = (c.compressed_offset - range.start) as usize;
            let stored = &data[at..at + c.compressed_size as usize];
            match result {
                Ok(v) => {
                    if !from_peer {
                        self.stats.origin_chunks.fetch_add(1, Relaxed);
                    }
                    if prefetch {
                        self.stats.prefetch_chunks.fetch_add(1, Relaxed);
                    }
                    let bytes = Arc::new(stored.to_vec());
                    keep.push((c.compressed_offset, bytes.clone()));
                    flight.set(Ok(bytes));
                    if c.compressed_offset == chunk.compressed_offset {
                        mine = Some(Ok(v));
                    }
                }
                Err(e) => {
                    self.stats.verify_failures.fetch_add(1, Relaxed);
                    tracing::warn!(blob = %entry.spec.id, ci = c.ci_index, error = %e, "chunk from the origin does not verify; not kept");
                    flight.set(Err(e.to_string()));
                    if c.compressed_offset == chunk.compressed_offset {
                        mine = Some(Err(e));
                    }
                }
            }
        }
        // Kept before the flights go: a reader arriving meanwhile finds the (resolved) flight,
        // never neither it nor the stored bytes. Only bytes the configured origin sent for a
        // blob the node may read there: they are that blob's bytes. A peer's (or an unproven
        // origin's) bytes are checked only against this image's bootstrap, which whoever pushed
        // the image wrote — kept, they could stand in the store for another image's blob.
        if entry.spec.shared && !from_peer {
            self.persist(entry, &keep);
        } else if !keep.is_empty() {
            if let Err(e) = self.deps.private.write(lead.blob_index, &keep) {
                tracing::warn!(blob = %entry.spec.id, error = %e, "cannot keep fetched chunks for this mount");
            }
        }
        drop(lead);
        mine.unwrap_or_else(|| {
            Err(fetch_error(
                entry,
                "chunk missing from its own fetch".into(),
            ))
        })
    }

    /// `range` of the blob from a peer holding it, unverified.
    fn fetch_from_peer(&self, entry: &BlobEntry, range: Range<u64>) -> Option<(NodeId, Vec<u8>)> {
        if !entry.spec.shared {
            return None;
        }
        let p = self.deps.peering.as_ref()?;
        let d = &self.deps;
        d.rt.block_on(async {
            tokio::select! {
                r = p.read_range(&entry.spec.id, range) => r,
                _ = d.cancel.cancelled() => None,
            }
        })
    }

    /// GET `range` of the blob from the origin, as the node.
    fn fetch(
        &self,
        entry: &BlobEntry,
        range: Range<u64>,
        prefetch: bool,
    ) -> Result<Vec<u8>, String> {
        let d = &self.deps;
        let path = format!("/v2/{}/blobs/{}", d.repo, entry.spec.id);
        let mut headers = HeaderMap::new();
        let value = format!("bytes={}-{}", range.start, range.end - 1);
        headers.insert(
            RANGE,
            HeaderValue::from_str(&value).map_err(|e| e.to_string())?,
        );
        self.stats.origin_requests.fetch_add(1, Relaxed);
        let want = (range.end - range.start) as usize;
        let work = async {
            let mut resp = d
                .origin
                .send(
                    Method::GET,
                    &path,
                    &headers,
                    &AuthMode::Node,
                    Some(&d.repo),
                    "chunk",
                )
                .await
                .map_err(|e| e.to_string())?;
            // A 200 means the origin ignored the range: skip to it, stop after it.
            let skip = match resp.status() {
                StatusCode::PARTIAL_CONTENT => 0,
                StatusCode::OK => range.start,
                s => return Err(format!("origin answered {s} to a range request")),
            };
            let mut out = Vec::with_capacity(want);
            let mut pos = 0u64;
            while out.len() < want {
                let Some(bytes) = resp.chunk().await.map_err(|e| e.to_string())? else {
                    break;
                };
                d.metrics.from_origin("chunk", bytes.len() as u64);
                d.metrics
                    .mount_chunk_bytes
                    .get_or_create(&KindLabels { kind: "origin" })
                    .inc_by(bytes.len() as u64);
                self.stats
                    .origin_bytes
                    .fetch_add(bytes.len() as u64, Relaxed);
                if prefetch {
                    self.stats
                        .prefetch_bytes
                        .fetch_add(bytes.len() as u64, Relaxed);
                }
                let end = pos + bytes.len() as u64;
                if end > skip {
                    let from = skip.saturating_sub(pos) as usize;
                    let take = (want - out.len()).min(bytes.len() - from);
                    out.extend_from_slice(&bytes[from..from + take]);
                }
                pos = end;
            }
            if out.len() != want {
                return Err(format!("origin sent {} of {want} bytes", out.len()));
            }
            Ok(out)
        };
        d.rt.block_on(async {
            tokio::select! {
                r = work => r,
                _ = d.cancel.cancelled() => Err("the node is shutting down".into()),
            }
        })
    }

    /// Write verified chunks into the blob's partial file, when nobody else is writing it: this
    /// backend's own writes of a blob take turns (they used to drop each other's chunks); a
    /// whole-blob download holding the writer keeps it (its bytes cover these).
    fn persist(&self, entry: &BlobEntry, chunks: &[(u64, Arc<Vec<u8>>)]) {
        if chunks.is_empty() {
            return;
        }
        let spec = &entry.spec;
        let _turn = entry.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut writer = match self.deps.store.open_writer(&spec.id, spec.size) {
            Ok(w) => w,
            Err(StoreError::AlreadyComplete { .. }) => return,
            Err(e @ (StoreError::WriterBusy { .. } | StoreError::SizeMismatch { .. })) => {
                self.stats
                    .unkept_chunks
                    .fetch_add(chunks.len() as u64, Relaxed);
                tracing::debug!(blob = %spec.id, error = %e, "fetched chunks not kept");
                return;
            }
            Err(e) => {
                tracing::warn!(blob = %spec.id, error = %e, "cannot keep fetched chunks");
                return;
            }
        };
        let mut runs = RangeSet::new();
        for (off, bytes) in chunks {
            if let Err(e) = writer.write_at(*off, bytes) {
                tracing::warn!(blob = %spec.id, error = %e, "cannot keep fetched chunks");
                return;
            }
            runs.insert(*off..*off + bytes.len() as u64);
        }
        for run in runs.iter() {
            if let Err(e) = writer.commit(run) {
                tracing::warn!(blob = %spec.id, error = %e, "cannot commit fetched chunks");
                return;
            }
        }
        self.stats
            .stored_chunks
            .fetch_add(chunks.len() as u64, Relaxed);
        if let Some(p) = &self.deps.peering {
            // Pieces this completed become known to the scheduler.
            p.changed(&spec.id);
        }
    }
}

impl ChunkSource for ChunkBackend {
    fn read_chunk(&self, blob: &BlobInfo, chunk: &ChunkRef) -> shoal_rafs::Result<VerifiedChunk> {
        let _demand = self.demand.enter();
        let entry = self.entry(blob, chunk)?;
        if let Some(log) = &self.access {
            log.touch((blob.index, chunk.compressed_offset));
        }
        let (local, present) = self.local(entry, blob, chunk);
        if let Some(v) = local {
            return Ok(v);
        }
        self.remote(entry, blob, chunk, &present, false)
    }
}

/// Counts on-demand reads in flight so that lower-priority work (prefetch) can wait for none.
#[derive(Debug, Default)]
pub struct DemandGate {
    busy: Mutex<usize>,
    idle: Condvar,
}

/// One on-demand read; leaving when dropped.
pub struct Demand<'a>(&'a DemandGate);

impl DemandGate {
    /// An on-demand read starts.
    pub fn enter(&self) -> Demand<'_> {
        *self.busy.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Demand(self)
    }

    /// Wait until no on-demand read is in flight; false if `cancel` fired first.
    pub fn wait_idle(&self, cancel: &CancellationToken) -> bool {
        let mut n = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            if cancel.is_cancelled() {
                return false;
            }
            n = self
                .idle
                .wait_timeout(n, std::time::Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        !cancel.is_cancelled()
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        let mut n = self.0.busy.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The leader's flights; whatever it has not resolved when dropped fails and leaves the map.
struct Lead<'a> {
    backend: &'a ChunkBackend,
    blob_index: u32,
    chunks: Vec<ChunkRef>,
    flights: Vec<Arc<Flight>>,
}

impl Lead<'_> {
    fn fail(&self, reason: &str) {
        for f in &self.flights {
            f.set(Err(reason.to_owned()));
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        for f in &self.flights {
            f.set(Err("fetch abandoned".into()));
        }
        let mut map = self
            .backend
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (c, f) in self.chunks.iter().zip(&self.flights) {
            let key = (self.blob_index, c.compressed_offset);
            if map.get(&key).is_some_and(|x| Arc::ptr_eq(x, f)) {
                map.remove(&key);
            }
        }
    }
}

impl Flight {
    /// Resolve (the first resolution wins).
    fn set(&self, r: Result<Arc<Vec<u8>>, String>) {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        if done.is_none() {
            *done = Some(r);
            self.cv.notify_all();
        }
    }

    fn wait(&self) -> Result<Arc<Vec<u8>>, String> {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = &*done {
                return r.clone();
            }
            done = self.cv.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn compressed_range(c: &ChunkRef) -> Range<u64> {
    c.compressed_offset..c.compressed_offset + u64::from(c.compressed_size)
}

fn fetch_error(entry: &BlobEntry, reason: String) -> shoal_rafs::Error {
    shoal_rafs::Error::Io {
        path: std::path::PathBuf::from(format!("origin:{}", entry.spec.id)),
        source: std::io::Error::other(reason),
    }
}

/// The chunks one origin request fetches for `chunk`: it, then the chunks that follow it in the
/// blob (each starting at most [`MAX_GAP`] after the previous one ends) while `wanted` says so
/// and the request stays within [`MAX_REQUEST`] bytes. `table` is sorted by compressed offset.
///
/// Only a full chunk (`full` uncompressed bytes, the blob's chunk size) is followed: a shorter
/// one ends its file, and the next chunk belongs to another file nobody asked for yet.
pub fn plan(
    table: &[ChunkRef],
    chunk: &ChunkRef,
    full: u32,
    wanted: impl Fn(&ChunkRef) -> bool,
) -> Vec<ChunkRef> {
    let mut out = vec![chunk.clone()];
    let Ok(at) = table.binary_search_by_key(&chunk.compressed_offset, |c| c.compressed_offset)
    else {
        return out;
    };
    let start = chunk.compressed_offset;
    let mut end = compressed_range(chunk).end;
    let mut last_full = chunk.uncompressed_size == full;
    let mut crossed = false;
    for c in &table[at + 1..] {
        let r = compressed_range(c);
        // Past a file's end (a chunk shorter than full), other files' chunks come along only up
        // to AMPLIFY in all.
        crossed |= !last_full;
        if r.start < end
            || r.start - end > MAX_GAP
            || r.end - start > MAX_REQUEST
            || (crossed && r.end - start > AMPLIFY)
            || !wanted(c)
        {
            break;
        }
        end = r.end;
        last_full = c.uncompressed_size == full;
        out.push(c.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u32 = 1 << 20;

    fn chunk(i: u32, off: u64, size: u32) -> ChunkRef {
        ChunkRef {
            blob_index: 0,
            ci_index: i,
            digest: [0; 32],
            compressed: true,
            compressed_offset: off,
            compressed_size: size,
            uncompressed_offset: u64::from(i) << 20,
            uncompressed_size: 1 << 20,
            file_offset: 0,
            batch: None,
        }
    }

    fn offsets(v: &[ChunkRef]) -> Vec<u64> {
        v.iter().map(|c| c.compressed_offset).collect()
    }

    #[test]
    fn plan_merges_adjacent_wanted_chunks_up_to_the_limit() {
        let t: Vec<_> = (0..10)
            .map(|i| chunk(i, u64::from(i) * 1_000_000, 1_000_000))
            .collect();
        assert_eq!(
            offsets(&plan(&t, &t[2], FULL, |_| true)),
            vec![2_000_000, 3_000_000, 4_000_000, 5_000_000]
        );
        // Stops at a chunk not wanted (present or in flight).
        assert_eq!(
            offsets(&plan(&t, &t[2], FULL, |c| c.ci_index != 4)),
            vec![2_000_000, 3_000_000]
        );
        // The last chunk has no neighbour.
        assert_eq!(offsets(&plan(&t, &t[9], FULL, |_| true)), vec![9_000_000]);
    }

    #[test]
    fn prefetch_waits_for_on_demand_reads_to_finish() {
        let gate = Arc::new(DemandGate::default());
        let cancel = CancellationToken::new();
        assert!(gate.wait_idle(&cancel), "idle gate");
        let read = gate.enter();
        let (g, c) = (gate.clone(), cancel.clone());
        let waiter = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            (g.wait_idle(&c), t.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(150));
        drop(read);
        let (ok, waited) = waiter.join().expect("waiter");
        assert!(
            ok && waited >= std::time::Duration::from_millis(100),
            "{waited:?}"
        );
        // A cancelled wait gives up even while a read is in flight.
        let _read = gate.enter();
        cancel.cancel();
        assert!(!gate.wait_idle(&cancel));
    }

    #[test]
    fn plan_follows_a_file_end_only_up_to_the_amplification() {
        // Small files (chunks shorter than full): neighbours come along, within AMPLIFY.
        let mut t: Vec<_> = (0..4).map(|i| chunk(i, u64::from(i) * 100, 100)).collect();
        t[1].uncompressed_size = 4096;
        assert_eq!(
            offsets(&plan(&t, &t[0], FULL, |_| true)),
            vec![0, 100, 200, 300]
        );
        assert_eq!(
            offsets(&plan(&t, &t[1], FULL, |_| true)),
            vec![100, 200, 300]
        );
        // Big chunks: past the end of the file, nothing that would exceed AMPLIFY.
        let mut t: Vec<_> = (0..4)
            .map(|i| chunk(i, u64::from(i) * 600_000, 600_000))
            .collect();
        t[1].uncompressed_size = 4096;
        assert_eq!(offsets(&plan(&t, &t[0], FULL, |_| true)), vec![0, 600_000]);
        assert_eq!(offsets(&plan(&t, &t[1], FULL, |_| true)), vec![600_000]);
    }

    #[test]
    fn plan_stops_at_gaps_and_unknown_chunks() {
        let t = vec![chunk(0, 0, 100), chunk(1, 100, 100), chunk(2, 1 << 20, 100)];
        assert_eq!(offsets(&plan(&t, &t[0], FULL, |_| true)), vec![0, 100]);
        let stray = chunk(7, 50, 10);
        assert_eq!(offsets(&plan(&t, &stray, FULL, |_| true)), vec![50]);
    }

    proptest::proptest! {
        #[test]
        fn plan_is_contiguous_bounded_and_starts_with_the_chunk(
            sizes in proptest::collection::vec(1u32..3_000_000, 1..40),
            gaps in proptest::collection::vec(0u64..100_000, 40),
            pick in 0usize..40,
            partial in proptest::collection::vec(proptest::bool::ANY, 40),
        ) {
            let mut t = Vec::new();
            let mut off = 0;
            for (i, s) in sizes.iter().enumerate() {
                let mut c = chunk(i as u32, off, *s);
                if partial[i] {
                    c.uncompressed_size = 4096;
                }
                t.push(c);
                off += u64::from(*s) + gaps[i];
            }
            let c = &t[pick % t.len()];
            let p = plan(&t, c, FULL, |_| true);
            proptest::prop_assert_eq!(p[0].compressed_offset, c.compressed_offset);
            let end = compressed_range(&p[p.len() - 1]).end;
            proptest::prop_assert!(p.len() == 1 || end - c.compressed_offset <= MAX_REQUEST);
            // Past a chunk shorter than full, the request stays within AMPLIFY.
            let crosses = p[..p.len() - 1].iter().any(|x| x.uncompressed_size != FULL);
            proptest::prop_assert!(!crosses || end - c.compressed_offset <= AMPLIFY);
            for w in p.windows(2) {
                let gap = w[1].compressed_offset - compressed_range(&w[0]).end;
                proptest::prop_assert!(gap <= MAX_GAP);
            }
        }
    }
}
