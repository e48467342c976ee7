//! Any bytes as a registry push notification.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_node::fuzzing::notification(data));
