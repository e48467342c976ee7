//! Waiting without fixed sleeps: poll a condition until a deadline, and pick free loopback ports.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How often [`poll`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Ok(Some(value))` or `timeout` passes. The last error (or "not
/// yet") is reported with `what` on timeout. Errors from `check` count as "not yet".
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last = format!("{err:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
