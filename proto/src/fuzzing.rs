//! The bodies of the fuzz targets (`fuzz/`) for this crate's parsers, as plain functions so that
//! the test suite runs them on stable over seeded mutations (`node/tests/fuzz_smoke.rs`) and the
//! committed corpus. Each takes arbitrary bytes and must return without panicking; where a value
//! decodes, it must also survive a round trip, so the fuzzer hunts for codec disagreements, not
//! only crashes.

use std::str::FromStr;

use crate::auth::{self, Signed};
use crate::sched::PieceBits;
use crate::wire::{self, FRAME_HEADER_LEN};
use crate::{Digest, NodeId, Reference, RepoName, Tag};

/// Any bytes as a stream of P2P frames (length prefix and body), as a peer sends them: every
/// frame that decodes encodes, and what it encodes to decodes to the same frame. (Not the same
/// bytes: a `Hello` of another version, or an error code from a newer peer, is decoded without
/// its trailing fields.)
pub fn wire_frames(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = wire::try_decode(rest) {
        let again = wire::to_bytes(&frame).expect("a decoded frame encodes");
        let back = wire::try_decode(&again);
        assert!(
            matches!(&back, Ok(Some((f, n))) if *f == frame && *n == again.len()),
            "{frame:?} encodes to {again:?}, which decodes to {back:?}"
        );
        rest = &rest[used..];
    }
    if let Some(body) = data.get(FRAME_HEADER_LEN..) {
        let _ = wire::decode(body);
    }
}

/// Any bytes as the peer auth header: never panics, and never verifies without the key.
pub fn auth_header(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = auth::derive_key(b"fuzz-secret-fuzz-secret-fuzz-secret!", "fuzz");
    let req = Signed {
        method: "GET",
        host: "node:5000",
        path: "/v2/",
        body: b"",
    };
    let now = 1_700_000_000_000;
    if let Ok(stamp) = auth::verify(&key, Some(text), &req, now) {
        panic!("a header made without the key verified: {text:?} → {stamp:?}");
    }
    let _ = auth::parse_secret(data);
}

/// Any bytes as the textual identities a request or message carries (digest, repository, tag,
/// reference, node id, piece bitmap): what parses prints back to itself.
pub fn names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    fn round_trip<T: FromStr + ToString + PartialEq + std::fmt::Debug>(text: &str) {
        if let Ok(v) = text.parse::<T>() {
            let printed = v.to_string();
            let again = printed.parse::<T>().ok();
            assert_eq!(again.as_ref(), Some(&v), "{text:?} printed as {printed:?}");
        }
    }
    round_trip::<Digest>(text);
    round_trip::<RepoName>(text);
    round_trip::<Tag>(text);
    round_trip::<Reference>(text);
    round_trip::<NodeId>(text);
    round_trip::<PieceBits>(text);
}
