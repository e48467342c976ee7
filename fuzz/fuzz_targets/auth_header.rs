//! Any bytes as the peer auth header: never verifies without the key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_proto::fuzzing::auth_header(data));
