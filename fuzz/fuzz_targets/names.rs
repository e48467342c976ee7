//! Any bytes as a digest, repository, tag, reference, node id or piece bitmap: what parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_proto::fuzzing::names(data));
