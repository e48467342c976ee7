//! The bodies of the fuzz targets (`fuzz/`) for what a node parses from the network: HTTP
//! `Range`, `Content-Range` and `WWW-Authenticate` values, manifests and indexes, registry
//! notifications, and scheduler messages. Plain functions, so that the test suite runs them on
//! stable over seeded mutations and the committed corpus (`tests/fuzz_smoke.rs`). Each takes
//! arbitrary bytes and must return without panicking; where the code has an invariant the
//! callers rely on, the body asserts it too.

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::sched::{
    AnnounceRequest, AnnounceResponse, FailureReport, JobRequest, ParentsRequest, ParentsResponse,
    StatusResponse,
};
use shoal_proto::Digest;

use crate::mirror::range;

/// Blob sizes a range is resolved against: the edges, and one taken from the input.
fn sizes(data: &[u8]) -> [u64; 5] {
    let mut tail = [0u8; 8];
    let n = data.len().min(8);
    tail[..n].copy_from_slice(&data[data.len() - n..]);
    [0, 1, 4096, u64::MAX, u64::from_le_bytes(tail)]
}

/// Any bytes as a client's `Range` and an origin's `Content-Range` and `WWW-Authenticate`.
/// A range that resolves lies inside the blob and is not empty; its `Content-Range` reads back
/// as the same start and size.
pub fn http_headers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = range::parse(text) {
        for size in sizes(data) {
            if let Ok(span) = r.resolve(size) {
                assert!(
                    span.start < span.end && span.end <= size,
                    "{text:?} resolved to {span:?} in a blob of {size}"
                );
                let mut h = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&range::content_range(&span, size)) {
                    h.insert(CONTENT_RANGE, v);
                }
                assert_eq!(
                    crate::download::origin::content_range(&h),
                    Some((span.start, size))
                );
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(text) {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, v);
        let _ = crate::download::origin::content_range(&h);
    }
    let _ = crate::upstream::BearerChallenge::parse(text);
}

/// Any bytes as a manifest or index, as `shoal convert`, prewarm and the mirror read one.
pub fn manifest(data: &[u8]) {
    use crate::convert::image;
    for content_type in [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "",
    ] {
        let _ = image::classify("fuzz", content_type, data, None);
        let _ = image::classify("fuzz", content_type, data, Some("linux/amd64"));
    }
    let _ = image::config_platform(data);
    let _ = image::nydus_config("fuzz", data, &[], &Digest::sha256(b""));
    let _ = crate::prewarm::parse("fuzz", &Digest::sha256(data), data).is_ok();
}

/// Any bytes as a registry's push notification (distribution envelope or Harbor webhook).
pub fn notification(data: &[u8]) {
    let _ = crate::convert::service::events::parse(data);
}

/// Parses `data` as `T`; what parses must serialize and parse again.
fn json_round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let again = serde_json::to_vec(&v).map(|j| serde_json::from_slice::<T>(&j).is_ok());
        assert!(
            matches!(again, Ok(true)),
            "{} parsed but does not round-trip: {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(data)
        );
    }
}

/// Any bytes as each scheduler message, either way.
pub fn sched_message(data: &[u8]) {
    json_round_trip::<AnnounceRequest>(data);
    json_round_trip::<AnnounceResponse>(data);
    json_round_trip::<ParentsRequest>(data);
    json_round_trip::<ParentsResponse>(data);
    json_round_trip::<FailureReport>(data);
    json_round_trip::<JobRequest>(data);
    json_round_trip::<StatusResponse>(data);
}
