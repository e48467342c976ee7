//! Any bytes as a stored chunk: decompression is bounded by the recorded uncompressed size and
//! the result is returned only if its digest matches.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_rafs::fuzzing::chunk_decode(data));
