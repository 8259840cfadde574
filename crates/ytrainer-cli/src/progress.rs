//! Progress bars and notices for `ytrainer run` (the trainer reports through [`Observer`]).

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use ytrainer_core::observe::{Observer, Progress};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Bars drawn together (`ytrainer sweep`: the overall bar above the current trial's). Once called, every
/// training [`Bar`] joins it.
pub fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(MultiProgress::new)
}

/// Draws one bar over optimizer steps; shows loss, CE and tokens/s in the message.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar drawn on stderr (hidden when stderr is not a terminal, e.g. under CI).
    pub fn new() -> Self {
        Bar { bar: None }
    }
}

impl Observer for Bar {
    fn start(&mut self, total: usize, first: usize) {
        let bar = match MULTI.get() {
            Some(m) => m.add(ProgressBar::new(total as u64)),
            None => ProgressBar::new(total as u64),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(first as u64);
        self.bar = Some(bar);
    }

    fn step(&mut self, p: &Progress) {
        if let Some(b) = &self.bar {
            b.set_position(p.step as u64);
            b.set_message(format!(
                "loss {:.4} {} {:.0} tok/s",
                p.loss, p.detail, p.tokens_per_s
            ));
        }
        tracing::info!(step = p.step, loss = p.loss, lr = p.lr, detail = %p.detail, "step");
    }

    fn eval(&mut self, step: usize, summary: &str) {
        self.notice(&format!("eval @ step {step}: {summary}"));
    }

    fn notice(&mut self, msg: &str) {
        // A hidden bar (stderr not a terminal, e.g. CI or a pipe) swallows println: print directly then.
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
