//! Any bytes as each scheduler message: what parses serializes and parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_node::fuzzing::sched_message(data));
