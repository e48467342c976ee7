//! Recovery at `Store::open`: make the records and the content files agree
//! again after a crash (or after someone deleted files behind our back).
//!
//! - a record that does not decode, is inconsistent, or whose file is missing
//!   or shorter than its committed ranges is dropped (with its file);
//! - a content file without a record (or whose name is not a digest) is
//!   deleted: its bytes were never recorded, so nothing vouches for them;
//! - a partial blob keeps its committed ranges; bytes written after the last
//!   commit are not claimed (the record never said they were present).
//!
//! Returns the index entries of the blobs that survived.

use std::collections::HashSet;

use shoal_proto::BlobId;

use super::content::remove_path;
use super::error::StoreError;
use super::meta::Durability;
use super::records::StoredBlob;
use super::shared::Shared;
use super::shared::State;

/// What recovery did, for the caller to log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub kept: usize,
    pub dropped_records: usize,
    pub deleted_files: usize,
}

/// Loads every sound blob record into `state` and deletes the rest.
pub fn recover(shared: &Shared, state: &mut State) -> Result<RecoveryReport, StoreError> {
    let mut report = RecoveryReport::default();
    let mut kept = HashSet::new();
    for (id, stored) in shared.tables().all_blobs()? {
        match check(shared, &id, stored)? {
            Some(stored) => {
                let access = shared.tables().access(&id)?.unwrap_or(0);
                state.insert(
                    &id,
                    stored.size,
                    stored.present.len(),
                    stored.complete,
                    access,
                );
                kept.insert(id);
                report.kept += 1;
            }
            None => {
                let batch = shared.tables().delete_blob(&id)?;
                shared.db.write(batch, Durability::Sync)?;
                shared.content.remove(&id)?;
                report.dropped_records += 1;
            }
        }
    }
    for found in shared.content.list()? {
        if found.id.as_ref().is_some_and(|id| kept.contains(id)) {
            continue;
        }
        remove_path(&found.path)?;
        report.deleted_files += 1;
    }
    Ok(report)
}

/// The record if it and its file are usable (fixing the file's length).
fn check(
    shared: &Shared,
    id: &BlobId,
    stored: Option<StoredBlob>,
) -> Result<Option<StoredBlob>, StoreError> {
    let Some(stored) = stored.filter(StoredBlob::is_sane) else {
        return Ok(None);
    };
    let Some(file) = shared.content.open_rw(id)? else {
        return Ok(None);
    };
    let path = shared.content.path(id);
    let len = file.metadata().map_err(StoreError::io(&path))?.len();
    if len < stored.present.end() {
        return Ok(None);
    }
    if len != stored.size {
        // Beyond the committed ranges nothing is claimed: restore the
        // sparse full-size file a writer expects.
        file.set_len(stored.size).map_err(StoreError::io(&path))?;
    }
    Ok(Some(stored))
}
