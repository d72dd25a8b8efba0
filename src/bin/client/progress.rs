//! A progress line redrawn in place on a terminal: indicatif's bar with the
//! `bench` feature. Without it there is no bar ([`Bar`] has no values), and
//! the commands print a line now and then, as they do when stderr is not a
//! terminal.

use std::time::Duration;

/// A redrawn progress line.
#[cfg(feature = "bench")]
pub struct Bar(indicatif::ProgressBar);

/// A redrawn progress line: none in a build without the `bench` feature.
#[cfg(not(feature = "bench"))]
pub enum Bar {}

impl Bar {
    /// A bar counting to `length` (a spinner when `None`) drawn with
    /// indicatif's `template`, or `None` when stderr is not a terminal.
    #[cfg(feature = "bench")]
    pub fn on_terminal(template: &str, length: Option<u64>) -> Option<Bar> {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let bar = match length {
            Some(length) => indicatif::ProgressBar::new(length),
            None => indicatif::ProgressBar::new_spinner(),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        Some(Bar(bar))
    }

    /// No bar without the `bench` feature.
    #[cfg(not(feature = "bench"))]
    pub fn on_terminal(_template: &str, _length: Option<u64>) -> Option<Bar> {
        None
    }

    /// Redraws by itself every `every` (for a spinner).
    pub fn tick_every(&self, every: Duration) {
        #[cfg(feature = "bench")]
        self.0.enable_steady_tick(every);
        #[cfg(not(feature = "bench"))]
        let _ = (self, every);
    }

    pub fn set_message(&self, message: String) {
        #[cfg(feature = "bench")]
        self.0.set_message(message);
        #[cfg(not(feature = "bench"))]
        let _ = (self, message);
    }

    pub fn set_position(&self, position: u64) {
        #[cfg(feature = "bench")]
        self.0.set_position(position);
        #[cfg(not(feature = "bench"))]
        let _ = (self, position);
    }

    pub fn finish_and_clear(&self) {
        #[cfg(feature = "bench")]
        self.0.finish_and_clear();
        #[cfg(not(feature = "bench"))]
        let _ = self;
    }
}
