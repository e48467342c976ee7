//! Any bytes as Range, Content-Range and WWW-Authenticate values: resolved ranges lie inside the blob.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_node::fuzzing::http_headers(data));
