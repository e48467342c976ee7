//! Any bytes as a stream of P2P frames from a peer: decoded frames re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_proto::fuzzing::wire_frames(data));
