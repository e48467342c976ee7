//! Filling a download from the origin, in segments.
//!
//! The fill reads the blob in order and hashes every byte into the whole-blob digest, but it does
//! not fetch bytes the writer already holds: a segment is one request from the fill's position to
//! the next present range (or the end), and present ranges are hashed from the content file
//! instead. Present ranges ahead of the fill come from the seed (below) or from a lazy mount's
//! verified chunks; either way the whole-blob digest still checks every byte at the end.
//!
//! The seed (DESIGN, Scheduler): under an origin lease, the fill registers the blob with the p2p
//! data plane's [`Seeds`](crate::p2p::seeds::Seeds). When a peer asks for pieces the fill has not
//! reached (and will not reach within [`SEED_NEAR`]), the segment ends at the next read, those
//! pieces are fetched with one ranged request each, written, committed (which records their
//! SHA-256 for peers to check) and announced, and the fill goes on with a new segment from where
//! it was. Each byte still comes from the origin once. An origin that does not answer a ranged
//! request with `206` and the asked start ends seeding for this fill (peers then wait for the fill).

use std::ops::Range;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use super::{
    blocking, ensure_sink, uncommitted, write, Download, DownloadError, Fill, Inner, OriginEnd,
    Pending, Sink, Source, ABANDON_CHECK, COMMIT_EVERY, COMMIT_EVERY_SHARED, READ_CHUNK,
    WRITE_BATCH,
};
use crate::p2p::seeds::{self, Seed};
use crate::peering::Peering;
use crate::store::{BlobWriter, RangeSet, Verifier};

/// Wanted ranges the fill reaches within this many bytes are left to it.
const SEED_NEAR: u64 = 4 << 20;
/// Most bytes fetched out of order in one round (they are held in memory once).
const SEED_ROUND_MAX: u64 = 16 << 20;

/// How one segment ended.
enum Segment {
    /// It reached its end.
    End,
    /// The scheduler took the lease back.
    Revoked,
    /// Peers want these ranges ahead of the fill.
    Seed(Vec<Range<u64>>),
}

/// Fetch `[fill.pos, size)` from the origin. Under a lease, progress is announced as it commits,
/// a revocation stops the fill, and ranges peers ask for are fetched ahead of it.
pub(super) async fn origin_fill(
    inner: &Inner,
    d: &Download,
    src: &Source,
    fill: &mut Fill,
    lease: bool,
) -> Result<OriginEnd, DownloadError> {
    let id = d.id.clone();
    let peering = inner.peering.as_ref().filter(|_| lease);
    if fill.size.is_some_and(|s| fill.pos >= s) && fill.sink.is_some() {
        return Ok(OriginEnd::Done);
    }
    // At most `mirror.max_origin_downloads` origin fetches at once (a quarter of that, at most
    // ISOLATED_LIMIT, for isolated ones); the rest queue here.
    let slots = if src.isolated {
        &inner.isolated_slots
    } else {
        &inner.origin_slots
    };
    let _slot = tokio::select! {
        p = slots.clone().acquire_owned() => p.map_err(|_| DownloadError::Shutdown)?,
        _ = inner.cancel.cancelled() => return Err(DownloadError::Shutdown),
    };
    #[cfg(feature = "fault-injection")]
    crate::faults::maybe_panic_download(&id).await;
    let seed = peering.map(|p| p.p2p().seeds().register(&id));
    let mut seeding = seed.is_some();
    loop {
        skip_present(d, fill).await?;
        if fill.sink.is_some() && fill.size.is_some_and(|s| fill.pos >= s) {
            fill.expose(d);
            return Ok(OriginEnd::Done);
        }
        let seed = seed.as_deref().filter(|_| seeding);
        match segment(inner, d, src, fill, peering, seed).await? {
            Segment::End => {}
            Segment::Revoked => return Ok(OriginEnd::Revoked),
            Segment::Seed(ranges) => {
                if let (Some(p), Some(seed)) = (peering, seed) {
                    seeding = seed_fetch(inner, d, src, fill, p, seed, ranges).await?;
                }
            }
        }
    }
}

/// Where a request from `pos` may stop: the start of the next present range, or `size`.
fn next_present(present: &RangeSet, pos: u64, size: u64) -> u64 {
    present
        .iter()
        .map(|r| r.start)
        .find(|&s| s > pos)
        .unwrap_or(size)
        .min(size)
}

/// The first byte of a `Content-Range: bytes a-b/total` answer, and the total.
pub(crate) fn content_range(headers: &HeaderMap) -> Option<(u64, u64)> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// One request from `fill.pos` to the next present range (or the end).
async fn segment(
    inner: &Inner,
    d: &Download,
    src: &Source,
    fill: &mut Fill,
    peering: Option<&Peering>,
    seed: Option<&Seed>,
) -> Result<Segment, DownloadError> {
    let id = d.id.clone();
    let resume_from = fill.pos;
    // Skipping present bytes hashes them from the file; bytes not committed yet (held back or
    // deferred) are rewritten instead, as before.
    let skips = fill.may_commit();
    let known_stop = fill
        .sink
        .as_ref()
        .filter(|_| skips)
        .map(|s| next_present(s.writer.present(), resume_from, s.writer.size()));
    let path = format!("/v2/{}/blobs/{}", src.repo, id);
    let mut headers = HeaderMap::new();
    let asked = match known_stop {
        Some(stop) if stop < fill.size.unwrap_or(u64::MAX) => {
            Some(format!("bytes={resume_from}-{}", stop - 1))
        }
        _ if resume_from > 0 => Some(format!("bytes={resume_from}-")),
        _ => None,
    };
    if let Some(v) = asked.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
        headers.insert(RANGE, v);
    }
    let mut resp = src
        .origin
        .send(
            Method::GET,
            &path,
            &headers,
            &src.auth,
            Some(&src.repo),
            "blob",
        )
        .await
        .map_err(|e| DownloadError::Origin(e.to_string()))?;
    // Body bytes to drop before writing: an origin that ignores `Range` sends the blob from
    // its start, and the kept prefix is already written and hashed.
    let mut skip = 0u64;
    let size = match resp.status() {
        StatusCode::OK if resume_from == 0 => {
            resp.content_length().ok_or(DownloadError::NoLength)?
        }
        StatusCode::OK => {
            tracing::info!(
                from = resume_from,
                "origin ignored Range; reading the blob from its start"
            );
            skip = resume_from;
            resp.content_length().ok_or(DownloadError::NoLength)?
        }
        StatusCode::PARTIAL_CONTENT if asked.is_some() => match content_range(resp.headers()) {
            Some((start, total)) if start == resume_from => total,
            _ => {
                return Err(DownloadError::Origin(format!(
                    "origin answered a range other than {}",
                    asked.unwrap_or_default()
                )))
            }
        },
        status => {
            return Err(DownloadError::Status {
                status,
                challenge: resp.headers().get(WWW_AUTHENTICATE).cloned(),
            })
        }
    };
    ensure_sink(inner, d, fill, size).await?;
    let (stop, piece) = match &fill.sink {
        Some(s) if skips => (
            next_present(s.writer.present(), resume_from, size),
            s.writer.piece_size(),
        ),
        Some(s) => (size, s.writer.piece_size()),
        None => (size, 1),
    };
    let commit_every = if inner.peering.is_some() {
        COMMIT_EVERY_SHARED
    } else {
        COMMIT_EVERY
    };
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    // The previous batch's write runs while the next batch is read.
    let mut pending = Pending::default();
    let mut abandon = tokio::time::interval(ABANDON_CHECK);
    abandon.tick().await;
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c.map_err(|e| DownloadError::Origin(e.to_string())),
            _ = inner.cancel.cancelled() => Err(DownloadError::Shutdown),
            // An isolated download serves only its requesters: when they are all gone, stop
            // (its bytes could serve no one else, and a slow origin would hold a slot).
            _ = abandon.tick(), if src.isolated => {
                if d.progress.receiver_count() == 0 {
                    Err(DownloadError::Origin("every requester left".into()))
                } else {
                    continue;
                }
            }
            () = async { if let Some(s) = seed { s.wanted().await } }, if seed.is_some() => {
                let Some(s) = seed else { continue };
                if pending.settle(fill, d).await? {
                    // The next segment sees a revocation.
                    committed(&id, peering, seed);
                }
                let at = fill.pos + batch.len() as u64;
                let ranges = match &fill.sink {
                    Some(sink) => seeds::plan(
                        &s.take(),
                        piece,
                        size,
                        at,
                        SEED_NEAR,
                        sink.writer.present(),
                        SEED_ROUND_MAX,
                    ),
                    None => Vec::new(),
                };
                if ranges.is_empty() {
                    continue;
                }
                // Keep what arrived (committed, so peers may have it too), then go and get
                // what peers wait for; the fill resumes with a new request.
                let commit = fill.may_commit();
                write(fill, std::mem::take(&mut batch), commit).await?;
                fill.expose(d);
                return Ok(Segment::Seed(ranges));
            }
        };
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Keep what arrived intact: a later download resumes there.
                let _ = pending.settle(fill, d).await;
                let commit = fill.may_commit();
                let _ = write(fill, std::mem::take(&mut batch), commit).await;
                return Err(e);
            }
        };
        let Some(mut chunk) = chunk else { break };
        inner.metrics.from_origin("blob", chunk.len() as u64);
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            skip -= n;
            chunk = chunk.slice(n as usize..);
            if chunk.is_empty() {
                continue;
            }
        }
        if let Some(p) = peering {
            p.origin_progress(&id, chunk.len() as u64);
        }
        let mut after = fill.pos + batch.len() as u64 + chunk.len() as u64;
        let mut reached = false;
        if after > stop && stop < size {
            // The rest is present already: this segment ends here.
            chunk.truncate(chunk.len() - (after - stop) as usize);
            after = stop;
            reached = true;
        }
        if after > size {
            let _ = pending.settle(fill, d).await;
            if let Some(s) = fill.sink.take() {
                let _ = blocking(move || s.writer.discard()).await;
            }
            return Err(DownloadError::Length {
                got: after,
                expected: size,
            });
        }
        batch.extend_from_slice(&chunk);
        if batch.len() >= WRITE_BATCH {
            if pending.settle(fill, d).await? && committed(&id, peering, seed) {
                // The lease was taken back: keep what was read, and stop.
                let commit = fill.may_commit();
                write(fill, std::mem::take(&mut batch), commit).await?;
                fill.expose(d);
                return Ok(Segment::Revoked);
            }
            // Bytes held back (from a DHT provider) or deferred (an isolated
            // download) are committed only once the whole blob is verified.
            let commit =
                fill.may_commit() && uncommitted(fill) + batch.len() as u64 >= commit_every;
            let data = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
            pending.start(fill, data, commit)?;
        }
        if reached {
            break;
        }
    }
    if pending.settle(fill, d).await? {
        committed(&id, peering, seed);
    }
    let commit = fill.may_commit();
    write(fill, batch, commit).await?;
    if fill.pos != stop {
        return Err(DownloadError::Length {
            got: fill.pos,
            expected: stop,
        });
    }
    fill.expose(d);
    if commit {
        // A revocation now changes nothing: the segment is done; the next one sees it.
        committed(&id, peering, seed);
    }
    Ok(Segment::End)
}

/// Bytes were committed: waiting peers look again and the scheduler hears soon. Returns whether
/// the scheduler took the lease back.
fn committed(id: &shoal_proto::BlobId, peering: Option<&Peering>, seed: Option<&Seed>) -> bool {
    if let Some(s) = seed {
        s.progressed();
    }
    peering.is_some_and(|p| {
        p.changed(id);
        p.lease_revoked(id)
    })
}

/// Bytes present at the fill's position (fetched ahead of it): hashed from the file into the
/// whole-blob digest, and the fill moves past them.
async fn skip_present(d: &Download, fill: &mut Fill) -> Result<(), DownloadError> {
    if !fill.may_commit() {
        return Ok(());
    }
    let Some(sink) = fill.sink.take() else {
        return Ok(());
    };
    let pos = fill.pos;
    let (sink, end) = blocking(move || -> Result<(Sink, u64), DownloadError> {
        let mut sink = sink;
        let Some(run) = sink.writer.present().run_containing(pos) else {
            return Ok((sink, pos));
        };
        if run.end <= pos {
            return Ok((sink, pos));
        }
        // What the fill wrote before `pos` becomes present first, so `[0, run.end)` all is.
        if pos > sink.committed {
            sink.writer.commit(sink.committed..pos)?;
        }
        hash_from_file(&sink.writer, &mut sink.verifier, pos..run.end)?;
        sink.committed = run.end;
        Ok((sink, run.end))
    })
    .await??;
    fill.sink = Some(sink);
    if end > pos {
        fill.pos = end;
        fill.expose(d);
    }
    Ok(())
}

/// Feeds `range` of the writer's file into `verifier`.
pub(super) fn hash_from_file(
    writer: &BlobWriter,
    verifier: &mut Verifier,
    range: Range<u64>,
) -> Result<(), DownloadError> {
    let raw = writer.raw_reader()?;
    let mut buf = vec![0u8; READ_CHUNK.min(range.end - range.start) as usize];
    let mut off = range.start;
    while off < range.end {
        let want = (range.end - off).min(READ_CHUNK) as usize;
        let n = raw
            .read_at(off, &mut buf[..want])
            .map_err(|e| DownloadError::Store(e.to_string()))?;
        if n == 0 {
            return Err(DownloadError::Store(
                "partial blob shorter than recorded".into(),
            ));
        }
        verifier.update(&buf[..n]);
        off += n as u64;
    }
    Ok(())
}

/// Fetches `ranges` (ahead of the fill) with one ranged request each, writes and commits them,
/// and tells peers. Returns whether seeding goes on: `false` once the origin did not answer a
/// ranged request as asked (the fill still gets every byte; peers wait for it).
async fn seed_fetch(
    inner: &Inner,
    d: &Download,
    src: &Source,
    fill: &mut Fill,
    p: &Peering,
    seed: &Seed,
    ranges: Vec<Range<u64>>,
) -> Result<bool, DownloadError> {
    let id = d.id.clone();
    let path = format!("/v2/{}/blobs/{}", src.repo, id);
    for r in ranges {
        let asked = format!("bytes={}-{}", r.start, r.end - 1);
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&asked) {
            headers.insert(RANGE, v);
        }
        let data = match fetch_exact(inner, src, &path, &headers, &r).await {
            Ok(data) => data,
            Err(why) => {
                tracing::info!(range = %asked, why, "origin range for peers failed; they wait for the fill");
                return Ok(false);
            }
        };
        let n = data.len() as u64;
        p.origin_progress(&id, n);
        p.p2p().metrics().seed_bytes.inc_by(n);
        let sink = fill
            .sink
            .take()
            .ok_or_else(|| DownloadError::Store("writer not open".into()))?;
        let range = r.clone();
        let sink = blocking(move || -> Result<Sink, DownloadError> {
            let mut sink = sink;
            sink.writer.write_at(range.start, &data)?;
            sink.writer.commit(range)?;
            Ok(sink)
        })
        .await??;
        fill.sink = Some(sink);
        tracing::debug!(range = %asked, "fetched ahead of the fill for peers");
        p.changed(&id);
        seed.progressed();
    }
    Ok(true)
}

/// Exactly `r` of the blob from the origin, or why not.
async fn fetch_exact(
    inner: &Inner,
    src: &Source,
    path: &str,
    headers: &HeaderMap,
    r: &Range<u64>,
) -> Result<Vec<u8>, String> {
    let mut resp = src
        .origin
        .send(
            Method::GET,
            path,
            headers,
            &src.auth,
            Some(&src.repo),
            "blob",
        )
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::PARTIAL_CONTENT
        || content_range(resp.headers()).map(|(s, _)| s) != Some(r.start)
    {
        return Err(format!(
            "answered {} without the asked range",
            resp.status()
        ));
    }
    let len = r.end - r.start;
    let mut data = Vec::with_capacity(len as usize);
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c.map_err(|e| e.to_string())?,
            _ = inner.cancel.cancelled() => return Err("shutting down".into()),
        };
        let Some(chunk) = chunk else { break };
        inner.metrics.from_origin("blob", chunk.len() as u64);
        if data.len() as u64 + chunk.len() as u64 > len {
            return Err("sent more than the asked range".into());
        }
        data.extend_from_slice(&chunk);
    }
    if data.len() as u64 != len {
        return Err(format!("sent {} of {len} bytes", data.len()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_stop_at_the_next_present_range() {
        let mut present = RangeSet::from_range(0..100);
        present.insert(300..400);
        assert_eq!(next_present(&present, 100, 1000), 300);
        assert_eq!(next_present(&present, 400, 1000), 1000);
        assert_eq!(next_present(&RangeSet::new(), 0, 50), 50);
    }

    #[test]
    fn content_ranges_parse() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/1000"),
        );
        assert_eq!(content_range(&h), Some((100, 1000)));
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes */1000"));
        assert_eq!(content_range(&h), None);
    }
}
