//! Any bytes as a layer tar: the builder returns an error or an image that opens and checks
//! clean; it never panics, escapes its output directory or allocates without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("shoal-rafs-fuzz-tar-{}", std::process::id()));
    shoal_rafs::fuzzing::tar_layer(data, &dir);
});
