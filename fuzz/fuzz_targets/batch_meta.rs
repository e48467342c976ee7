//! Any bytes as a bootstrap plus the compression-info region of its batch blobs
//! (`[u32 bootstrap length][bootstrap][region]`): attaching the table, placing batched chunks
//! and decoding them must return values or errors, never panic, hang or read out of bounds.
//! Seed the corpus with the batch fixture's bootstrap and its blob's CI region.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_rafs::fuzzing::batch_meta(data));
