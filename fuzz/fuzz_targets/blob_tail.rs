//! Any bytes as the tail of a data blob: the reverse tar-header walk, the TOC parser and the
//! CI ("blob.meta") decoder must never panic or allocate from unchecked lengths.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_rafs::fuzzing::blob_tail(data));
