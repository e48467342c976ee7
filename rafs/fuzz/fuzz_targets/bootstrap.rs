//! Any bytes as a bootstrap: opening, walking the whole tree and mapping every file's chunks must
//! return values or errors, never panic or hang. Seed the corpus with the fixture bootstraps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_rafs::{walk_tolerant, Bootstrap, FileType, Visit};

fuzz_target!(|data: &[u8]| {
    let Ok(b) = Bootstrap::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = b.summary();
    let _ = b.prefetch_table();
    walk_tolerant(&b, |v| {
        if let Visit::Entry(e) = v {
            let _ = b.xattrs(e.inode);
            match e.attr.file_type {
                FileType::Symlink => {
                    let _ = b.readlink(e.inode);
                }
                FileType::File => {
                    let _ = b.file_chunks(e.inode, 0, u64::MAX);
                    let _ = b.file_chunks(e.inode, e.attr.size / 3, 1 << 20);
                }
                _ => {}
            }
        }
        true
    });
    for i in 0..b.blobs().len() as u32 {
        let _ = b.blob_chunks(i);
    }
    let _ = shoal_rafs::tools::check(&b, None);
});
