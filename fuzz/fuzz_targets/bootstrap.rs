//! Any bytes as a bootstrap: opening, walking the whole tree and mapping every file's chunks must
//! return values or errors, never panic or hang. Seed the corpus with the fixture bootstraps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_rafs::fuzzing::bootstrap(data));
