//! Proof of possession: may an origin the *requester* chose be trusted to hold a blob?
//!
//! An origin that is not configured on this node (an unlisted host named by `?ns=`, the
//! `X-Shoal-Registry` header or a forward-proxy URL) may be run by the requester, so its word
//! proves nothing: a `HEAD` answered `200` by a server that says yes to everything would hand out
//! any cached private blob. Instead the node asks that origin, with the requester's credentials,
//! for small ranges of the blob at offsets the node picks at random, and compares them with the
//! verified bytes it holds. An origin that returns them holds the blob (or the requester already
//! knows its bytes, which is the same thing for secrecy).
//!
//! How the offsets are picked ([`plan`]): the blob is cut into `samples` equal strata and one
//! range is drawn at random within the held bytes of each stratum, plus the blob's last bytes
//! (for a gzip layer they carry the CRC of the whole content). Ranges whose held bytes are all one
//! value are redrawn (a run of zeros proves nothing). Blobs of at most [`WHOLE_BLOB_MAX`] bytes are
//! fetched whole and checked against their digest instead.
//!
//! Outcomes: proven; refuted (the origin returned other bytes — a lying origin, logged by the
//! caller); the origin's own refusal (401/403/404); or not provable here (too little held, or the
//! origin ignores `Range`), in which case the requester gets nothing from the cache and is served
//! from its origin alone.

use std::ops::Range;

use futures::StreamExt as _;
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use shoal_proto::{BlobId, Digest, RepoName};

use crate::store::{BlobReader, RangeSet};
use crate::upstream::{AuthMode, Origin};

/// Blobs up to this size are fetched whole and digest-checked.
pub const WHOLE_BLOB_MAX: u64 = 1 << 20;
/// Bytes per sampled range.
pub const SAMPLE_LEN: u64 = 1024;
/// Sample requests in flight at once, per proof.
const PARALLEL: usize = 8;
/// Redraws of a range whose held bytes are all one value.
const REDRAWS: usize = 4;

/// What asking the origin established.
#[derive(Debug)]
pub enum Outcome {
    /// The origin returned the right bytes for every sample.
    Proven,
    /// The origin returned other bytes: it does not hold this blob.
    Refuted { why: String },
    /// The origin refused: its status and challenge.
    Refused {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },
    /// The origin could not be asked.
    Unavailable(String),
    /// Nothing can be proven here (too few held bytes, or the origin ignores `Range`).
    NotProvable(String),
}

/// Ranges to ask for: one drawn in each of `samples` strata of `[0, size)`, within `held`, plus
/// the last [`SAMPLE_LEN`] bytes when held. `trivial(range)` says whether the held bytes of a
/// range are all one value (such a range is redrawn a few times). Sorted, disjoint (overlapping
/// draws merged), each within `held` and at most 2 × [`SAMPLE_LEN`] long.
pub fn plan(
    size: u64,
    held: &RangeSet,
    samples: u64,
    rng: &mut impl Rng,
    mut trivial: impl FnMut(&Range<u64>) -> bool,
) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    if size == 0 || samples == 0 {
        return out;
    }
    let stratum = size.div_ceil(samples).max(1);
    let mut start = 0;
    while start < size {
        let end = (start + stratum).min(size);
        let runs: Vec<Range<u64>> = held
            .iter()
            .filter_map(|r| {
                let s = r.start.max(start);
                let e = r.end.min(end);
                (s < e).then_some(s..e)
            })
            .collect();
        let mut pick = None;
        for _ in 0..=REDRAWS {
            let Some(r) = draw(&runs, rng) else { break };
            let nontrivial = !trivial(&r);
            pick = Some(r);
            if nontrivial {
                break;
            }
        }
        out.extend(pick);
        start = end;
    }
    let tail = size.saturating_sub(SAMPLE_LEN)..size;
    if held.contains_range(&tail) {
        out.push(tail);
    }
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// A range of at most [`SAMPLE_LEN`] bytes at a random place within `runs`, weighted by length.
fn draw(runs: &[Range<u64>], rng: &mut impl Rng) -> Option<Range<u64>> {
    let total: u64 = runs.iter().map(|r| r.end - r.start).sum();
    if total == 0 {
        return None;
    }
    let mut at = rng.random_range(0..total);
    for r in runs {
        let len = r.end - r.start;
        if at < len {
            let run_len = len.min(SAMPLE_LEN);
            // Start so that the whole sample stays within the run.
            let latest = r.end - run_len;
            let s = (r.start + at).min(latest);
            return Some(s..s + run_len);
        }
        at -= len;
    }
    None
}

/// Asks `origin` for samples of blob `digest` in `repo` as `auth`, and compares them with what
/// `reader` (a verified reader of the node's copy) holds. `samples`: strata to draw from.
pub async fn prove(
    origin: &Origin,
    repo: &RepoName,
    digest: &BlobId,
    auth: &AuthMode,
    reader: std::sync::Arc<BlobReader>,
    samples: u64,
) -> Outcome {
    let record = reader.record();
    let path = format!("/v2/{repo}/blobs/{digest}");
    if record.complete && record.size <= WHOLE_BLOB_MAX {
        return whole(origin, repo, &path, digest, auth, record.size).await;
    }
    let ranges = {
        let reader = reader.clone();
        let held = record.present.clone();
        let size = record.size;
        let planned = tokio::task::spawn_blocking(move || {
            let mut rng = rand::rng();
            plan(size, &held, samples, &mut rng, |r| {
                stored(&reader, r).is_none_or(|b| b.iter().all(|x| *x == b[0]))
            })
        })
        .await;
        match planned {
            Ok(r) => r,
            Err(e) => return Outcome::Unavailable(format!("planning samples: {e}")),
        }
    };
    if ranges.is_empty() {
        return Outcome::NotProvable("the node holds none of the blob's bytes yet".into());
    }
    let asks = ranges.into_iter().map(|r| {
        let reader = reader.clone();
        let path = path.as_str();
        async move { sample(origin, repo, path, auth, reader, r).await }
    });
    let mut results = futures::stream::iter(asks).buffer_unordered(PARALLEL);
    while let Some(outcome) = results.next().await {
        if !matches!(outcome, Outcome::Proven) {
            return outcome;
        }
    }
    Outcome::Proven
}

/// Ask for one range and compare it with the node's bytes.
async fn sample(
    origin: &Origin,
    repo: &RepoName,
    path: &str,
    auth: &AuthMode,
    reader: std::sync::Arc<BlobReader>,
    r: Range<u64>,
) -> Outcome {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("bytes={}-{}", r.start, r.end - 1)) {
        headers.insert(RANGE, v);
    }
    let resp = match origin
        .send(Method::GET, path, &headers, auth, Some(repo), "possession")
        .await
    {
        Ok(resp) => resp,
        Err(e) => return Outcome::Unavailable(e.to_string()),
    };
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => {
            return Outcome::NotProvable("the origin ignores Range requests".into());
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Outcome::Refuted {
                why: format!("range {r:?} is outside the origin's blob"),
            }
        }
        status if status.is_client_error() => {
            return Outcome::Refused {
                status,
                challenge: resp.headers().get(WWW_AUTHENTICATE).cloned(),
            }
        }
        status => return Outcome::Unavailable(format!("origin answered {status}")),
    }
    let want = r.end - r.start;
    let got = match read_at_most(resp, want).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Outcome::Refuted {
                why: format!("more than the {want} bytes asked for"),
            }
        }
        Err(e) => return Outcome::Unavailable(e),
    };
    let reader2 = reader.clone();
    let r2 = r.clone();
    let ours = tokio::task::spawn_blocking(move || stored(&reader2, &r2))
        .await
        .ok()
        .flatten();
    match ours {
        Some(ours) if ours == got => Outcome::Proven,
        Some(_) => Outcome::Refuted {
            why: format!("bytes {}-{} differ from the blob's", r.start, r.end - 1),
        },
        None => Outcome::Unavailable("the node's copy could not be read".into()),
    }
}

/// Fetch a small blob whole and check its digest.
async fn whole(
    origin: &Origin,
    repo: &RepoName,
    path: &str,
    digest: &Digest,
    auth: &AuthMode,
    size: u64,
) -> Outcome {
    let resp = match origin
        .send(
            Method::GET,
            path,
            &HeaderMap::new(),
            auth,
            Some(repo),
            "possession",
        )
        .await
    {
        Ok(resp) => resp,
        Err(e) => return Outcome::Unavailable(e.to_string()),
    };
    match resp.status() {
        StatusCode::OK => {}
        status if status.is_client_error() => {
            return Outcome::Refused {
                status,
                challenge: resp.headers().get(WWW_AUTHENTICATE).cloned(),
            }
        }
        status => return Outcome::Unavailable(format!("origin answered {status}")),
    }
    match read_at_most(resp, size).await {
        Ok(Some(body)) if Digest::of(digest.algorithm(), &body) == *digest => Outcome::Proven,
        Ok(_) => Outcome::Refuted {
            why: "the origin's blob does not match its digest".into(),
        },
        Err(e) => Outcome::Unavailable(e),
    }
}

/// The body; `Ok(None)` when it is longer than `limit` (not the answer to this request), an
/// error when it breaks off.
async fn read_at_most(mut resp: reqwest::Response, limit: u64) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(1 << 20));
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

/// The node's verified bytes of `r`, if it can read them all.
fn stored(reader: &BlobReader, r: &Range<u64>) -> Option<Vec<u8>> {
    let len = usize::try_from(r.end - r.start).ok()?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match reader.read_at(r.start + filled as u64, &mut buf[filled..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => filled += n,
        }
    }
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    #[test]
    fn a_whole_blob_gets_one_range_per_stratum_and_its_tail() {
        let size = 64 << 20;
        let held = RangeSet::from_range(0..size);
        let ranges = plan(size, &held, 32, &mut rng(1), |_| false);
        assert!(ranges.len() >= 32 && ranges.len() <= 33, "{}", ranges.len());
        assert_eq!(
            ranges.last().map(|r| r.end),
            Some(size),
            "the tail is asked"
        );
        let stratum = size / 32;
        for i in 0..32 {
            let s = i * stratum..(i + 1) * stratum;
            assert!(
                ranges.iter().any(|r| r.start >= s.start && r.end <= s.end),
                "stratum {i} has no sample"
            );
        }
    }

    #[test]
    fn nothing_held_plans_nothing_and_trivial_ranges_are_redrawn() {
        assert!(plan(1 << 20, &RangeSet::new(), 32, &mut rng(2), |_| false).is_empty());
        let held = RangeSet::from_range(0..(8 << 20));
        let mut asked = 0;
        let _ = plan(8 << 20, &held, 4, &mut rng(3), |_| {
            asked += 1;
            true
        });
        assert_eq!(
            asked,
            4 * (REDRAWS + 1),
            "every draw of a trivial range is redrawn"
        );
    }

    proptest! {
        #[test]
        fn ranges_stay_within_held_bytes(
            size in 1u64..(1 << 30),
            runs in proptest::collection::vec((0u64..(1 << 30), 1u64..(1 << 22)), 0..8),
            samples in 1u64..64,
            seed: u64,
        ) {
            let mut held = RangeSet::new();
            for (s, l) in runs {
                let s = s % size;
                held.insert(s..(s + l).min(size));
            }
            let ranges = plan(size, &held, samples, &mut rng(seed), |_| false);
            let mut prev_end = 0;
            for r in &ranges {
                prop_assert!(r.start < r.end);
                prop_assert!(r.start >= prev_end, "sorted and disjoint");
                prop_assert!(held.contains_range(r), "{:?} not held", r);
                prev_end = r.end;
            }
            prop_assert!(ranges.len() as u64 <= samples + 1);
            prop_assert_eq!(ranges.is_empty(), held.is_empty());
        }
    }
}
