//! Progress display for the client commands, on `indicatif`: bars that fit the terminal's width,
//! with rates and ETA, drawn only for a person at a terminal (not off a terminal, not with
//! `-q`, not with `--json`). Off a terminal the commands print plain lines instead.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A set of bars on stderr, or nothing when progress is not shown.
#[derive(Clone)]
pub struct Bars {
    multi: Option<MultiProgress>,
    /// Whether [`Bars::println`] prints (not with `-q`).
    lines: bool,
}

impl Bars {
    /// Bars when `show`, else a set that draws nothing; `lines` says whether
    /// [`Bars::println`] prints.
    pub fn new(show: bool, lines: bool) -> Self {
        let multi = show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { multi, lines }
    }

    /// As the command line asks: bars for a person at a terminal unless `-q` or `json`; lines
    /// unless `-q`.
    pub fn for_command(json: bool) -> Self {
        let v = super::Verbosity::get();
        Self::new(!json && v.show_progress(), !v.quiet)
    }

    /// Whether anything is drawn.
    pub fn shown(&self) -> bool {
        self.multi.is_some()
    }

    /// A byte-counting bar: `prefix [=====>   ] 12.0 MiB/40.0 MiB 80 MiB/s ETA 1s message`;
    /// without a known total, a spinner with bytes and rate.
    pub fn bytes(&self, prefix: impl Into<String>, total: Option<u64>) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(bytes_style()),
            None => ProgressBar::new_spinner().with_style(spinner_style()),
        };
        multi.add(bar.with_prefix(prefix.into()))
    }

    /// A bar counting items (nodes, blobs): `prefix [=====>   ] 3/16 message`.
    pub fn count(&self, prefix: impl Into<String>, total: u64) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        multi.add(
            ProgressBar::new(total)
                .with_style(count_style())
                .with_prefix(prefix.into()),
        )
    }

    /// Print a line above the bars (or plainly on stderr when no bars are drawn).
    pub fn println(&self, line: &str) {
        if !self.lines {
            return;
        }
        match &self.multi {
            Some(m) => {
                if m.println(line).is_err() {
                    eprintln!("{line}");
                }
            }
            None => eprintln!("{line}"),
        }
    }

    /// Remove every bar from the screen.
    pub fn clear(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

/// Give a byte bar its total once known (a bar), or take it away (a spinner).
pub fn set_total(bar: &ProgressBar, total: Option<u64>) {
    match total {
        Some(t) => {
            bar.set_length(t);
            bar.set_style(bytes_style());
        }
        None => bar.set_style(spinner_style()),
    }
}

const BYTES: &str =
    "{prefix} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}";
const SPINNER: &str = "{prefix} {spinner} {bytes} {binary_bytes_per_sec} {wide_msg}";
const COUNT: &str = "{prefix} [{wide_bar}] {pos}/{len} {elapsed} {wide_msg}";

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(BYTES)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template(SPINNER).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn count_style() -> ProgressStyle {
    ProgressStyle::with_template(COUNT)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_bars_draw_nothing_and_count_anyway() {
        let bars = Bars::new(false, false);
        assert!(!bars.shown());
        let b = bars.bytes("layer 1/1", Some(100));
        b.inc(40);
        assert!(b.is_hidden());
        assert_eq!(b.position(), 40);
        bars.clear();
    }

    #[test]
    fn the_templates_parse() {
        for t in [BYTES, SPINNER, COUNT] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }
}
