//! Fault injection for end-to-end tests, compiled only with the `fault-injection` cargo feature
//! (which release builds do not enable). Each fault is switched on by an environment variable:
//!
//! - `SHOAL_FAULT_CORRUPT_UPLOADS=1`: flip a byte of every range served to peers (a node that
//!   serves wrong bytes, for the peer-verification tests);
//! - `SHOAL_FAULT_PANIC_DOWNLOAD=<digest>|any`: panic inside the first download task of that
//!   blob (or of each blob) once it has its origin slot (the drop-guard test: its followers must
//!   get an error, and the next request must find the blob free and fetch it);
//! - `SHOAL_FAULT_CRASH_AT=<point>:<n>`: SIGKILL this process (no unwinding, no flush, as
//!   `kill -9` would) the `n`-th time it reaches the crash point named `point` ([`crash_point`]),
//!   or, for the byte-offset point `write`, at the first store write that reaches byte `n` of a
//!   blob ([`crash_at_offset`]). The crash-point suite (`e2e/tests/crash.rs`, `crash-bench`)
//!   restarts the node after each and checks every byte it then holds and serves.
//!
//! A binary built without the feature refuses to start when one of these is set
//! ([`check_env`]), so a test can never believe it injected a fault that was not there.

/// The variables that switch faults on.
pub const VARIABLES: [&str; 3] = [
    "SHOAL_FAULT_CORRUPT_UPLOADS",
    "SHOAL_FAULT_PANIC_DOWNLOAD",
    "SHOAL_FAULT_CRASH_AT",
];

/// Every named crash point, in the order a download reaches them (the suite iterates these).
pub const CRASH_POINTS: [&str; 8] = [
    "commit.before_sync",
    "commit.before_record",
    "commit.after_record",
    "complete.before_record",
    "complete.after_record",
    "drop.after_record",
    "drop.after_file",
    "p2p.serve.mid_body",
];

/// Crashes here if `SHOAL_FAULT_CRASH_AT` names `point` and this is its `n`-th hit. Compiles to
/// nothing without the `fault-injection` feature.
#[inline]
pub fn crash_point(point: &'static str) {
    #[cfg(feature = "fault-injection")]
    crash::hit(point);
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

/// Crashes here if `SHOAL_FAULT_CRASH_AT` is `write:<n>` and a blob's bytes now reach `n`
/// (`end`: the end offset of the write just made). Compiles to nothing without the feature.
#[inline]
pub fn crash_at_offset(end: u64) {
    #[cfg(feature = "fault-injection")]
    crash::offset(end);
    #[cfg(not(feature = "fault-injection"))]
    let _ = end;
}

#[cfg(feature = "fault-injection")]
mod crash {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    fn spec() -> Option<&'static (String, u64)> {
        SPEC.get_or_init(|| {
            let v = std::env::var("SHOAL_FAULT_CRASH_AT").ok()?;
            let (point, n) = v.rsplit_once(':')?;
            Some((point.to_owned(), n.parse().ok()?))
        })
        .as_ref()
    }

    fn die(what: &str) -> ! {
        eprintln!("FAULT INJECTION: crash at {what}");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort()
    }

    pub(super) fn hit(point: &str) {
        if let Some((p, n)) = spec() {
            if p == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
                die(&format!("{point} (hit {n})"));
            }
        }
    }

    pub(super) fn offset(end: u64) {
        if let Some((p, n)) = spec() {
            if p == "write" && end >= *n {
                die(&format!("a write reaching byte {end} (asked {n})"));
            }
        }
    }
}

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
