//! Exit codes, the same for every `shoal` command, and the two error kinds that choose them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the operation failed: refused, not found, a check found problems, a job failed |
//! | 2 | the command line is wrong (clap's own code; also values checked after parsing) |
//! | 3 | the node, scheduler or registry the command talks to could not be reached |
//! | 4 | the operation was cancelled (a prewarm job) |
//!
//! A command returns `Err(Usage)` or `Err(Unreachable)` (through `anyhow`) for codes 2 and 3;
//! `main` maps them; any other error is 1.

use std::process::ExitCode;

pub const FAILED: u8 = 1;
pub const USAGE: u8 = 2;
pub const UNREACHABLE: u8 = 3;
pub const CANCELLED: u8 = 4;

/// A value on the command line that parsed but makes no sense (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The service the command talks to did not answer (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Shorthand for `anyhow::Error::new(Usage(..))`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}

/// Shorthand for `anyhow::Error::new(Unreachable(..))`.
pub fn unreachable(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Unreachable(message.into()))
}

/// The exit code for an error that ended a command.
pub fn code_for(e: &anyhow::Error) -> ExitCode {
    ExitCode::from(raw_code_for(e))
}

fn raw_code_for(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Usage>()) {
        USAGE
    } else if e.chain().any(|c| c.is::<Unreachable>()) {
        UNREACHABLE
    } else {
        FAILED
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_error_kind_through_context() {
        use anyhow::Context as _;
        let u: anyhow::Result<()> = Err(usage("bad"));
        assert_eq!(
            raw_code_for(&u.context("while parsing").unwrap_err()),
            USAGE
        );
        let n: anyhow::Result<()> = Err(unreachable("down"));
        assert_eq!(raw_code_for(&n.context("asking").unwrap_err()), UNREACHABLE);
        assert_eq!(raw_code_for(&anyhow::anyhow!("other")), FAILED);
        // clap's usage code is the same number.
        assert_eq!(
            i32::from(USAGE),
            clap::Error::new(clap::error::ErrorKind::InvalidValue).exit_code()
        );
    }
}
