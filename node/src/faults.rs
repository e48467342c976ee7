//! Fault injection for end-to-end tests, compiled only with the `fault-injection` cargo feature
//! (which release builds do not enable). Each fault is switched on by an environment variable:
//!
//! - `SHOAL_FAULT_CORRUPT_UPLOADS=1`: flip a byte of every range served to peers (a node that
//!   serves wrong bytes, for the peer-verification tests);
//! - `SHOAL_FAULT_PANIC_DOWNLOAD=<digest>|any`: panic inside the first download task of that
//!   blob (or of each blob) once it has its origin slot (the drop-guard test: its followers must
//!   get an error, and the next request must find the blob free and fetch it).
//!
//! A binary built without the feature refuses to start when one of these is set
//! ([`check_env`]), so a test can never believe it injected a fault that was not there.

/// The variables that switch faults on.
pub const VARIABLES: [&str; 2] = ["SHOAL_FAULT_CORRUPT_UPLOADS", "SHOAL_FAULT_PANIC_DOWNLOAD"];

/// Errors when a fault variable is set but this binary cannot inject faults; warns when it can.
pub fn check_env() -> anyhow::Result<()> {
    let set: Vec<&str> = VARIABLES
        .iter()
        .copied()
        .filter(|v| std::env::var_os(v).is_some())
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    if !cfg!(feature = "fault-injection") {
        anyhow::bail!(
            "{} set, but this shoal was built without the fault-injection feature \
             (cargo build -p shoal-node --features fault-injection)",
            set.join(", ")
        );
    }
    tracing::warn!(variables = ?set, "FAULT INJECTION is on: this node misbehaves on purpose (tests only)");
    Ok(())
}

/// Whether to corrupt every range served to peers.
#[cfg(feature = "fault-injection")]
pub fn corrupt_uploads() -> bool {
    std::env::var("SHOAL_FAULT_CORRUPT_UPLOADS").is_ok_and(|v| v == "1")
}

/// Panics, two seconds in (so that followers have joined), the first time it is called for a
/// blob `SHOAL_FAULT_PANIC_DOWNLOAD` names (or for each blob, with `any`).
#[cfg(feature = "fault-injection")]
pub async fn maybe_panic_download(id: &shoal_proto::BlobId) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static PANICKED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let Ok(v) = std::env::var("SHOAL_FAULT_PANIC_DOWNLOAD") else {
        return;
    };
    let id = id.to_string();
    if v != "any" && v != id {
        return;
    }
    let first = PANICKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(id.clone());
    if first {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        panic!("fault injection: download task of {id} panics");
    }
}
