//! The progress bar: one bar per phase on stderr (hidden when stderr is not a terminal or
//! with `--no-progress`).

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static HIDDEN: AtomicBool = AtomicBool::new(false);

pub fn hide() {
    HIDDEN.store(true, Ordering::Relaxed);
}

/// A bar of `len` steps labelled `msg`; `finish_and_clear` it when the phase ends.
pub fn bar(len: u64, msg: &str) -> ProgressBar {
    if HIDDEN.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:44} [{bar:30}] {pos}/{len} ({per_sec}, {elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(Duration::from_millis(250));
    pb
}
