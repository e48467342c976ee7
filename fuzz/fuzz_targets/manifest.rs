//! Any bytes as a manifest or index, as convert, prewarm and the mirror read one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_node::fuzzing::manifest(data));
