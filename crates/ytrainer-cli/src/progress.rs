//! Progress for `ytrainer run`, `sweep` and `sort` (the trainer reports through [`Observer`]): a bar on a terminal;
//! off a terminal (stderr redirected to a file, a pipe, CI) plain lines at an interval instead, with no escape
//! codes.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use ytrainer_core::observe::{Observer, Progress};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Bars drawn together (`ytrainer sweep`: the overall bar above the current trial's). Once called, every
/// training [`Bar`] joins it.
pub fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(MultiProgress::new)
}

/// Whether stderr is a terminal (bars and colour) or not (plain progress lines, no escape codes).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Environment variable: seconds between plain progress lines off a terminal (default 30; 0 = every update).
pub const PROGRESS_SECS_ENV: &str = "YTRAINER_PROGRESS_SECS";

/// When the next plain progress line is due: the first update, then one per interval, and the last.
pub struct Plain {
    interval: Duration,
    last: Option<Instant>,
}

impl Plain {
    /// The interval from [`PROGRESS_SECS_ENV`] (default 30 s).
    pub fn new() -> Self {
        let secs = std::env::var(PROGRESS_SECS_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(30.0);
        Plain {
            interval: Duration::from_secs_f64(secs),
            last: None,
        }
    }

    /// Whether to print now (`last`: the final update, always printed).
    pub fn due(&mut self, last: bool) -> bool {
        let now = Instant::now();
        let due = last || self.last.is_none_or(|t| now - t >= self.interval);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// `h:mm:ss` of a number of seconds.
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Draws one bar over optimizer steps (loss, CE and tokens/s in the message) on a terminal; off a terminal prints
/// `step i/N` lines with loss, tokens/s, elapsed time and ETA.
pub struct Bar {
    bar: Option<ProgressBar>,
    plain: Option<PlainSteps>,
}

/// The state of plain step lines.
struct PlainSteps {
    when: Plain,
    total: usize,
    first: usize,
    started: Instant,
}

impl Bar {
    /// A bar on stderr when it is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        Bar {
            bar: None,
            plain: None,
        }
    }
}

impl Observer for Bar {
    fn start(&mut self, total: usize, first: usize) {
        if !stderr_is_terminal() {
            self.plain = Some(PlainSteps {
                when: Plain::new(),
                total,
                first,
                started: Instant::now(),
            });
            return;
        }
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
        if let Some(s) = &mut self.plain
            && s.when.due(p.step >= s.total)
        {
            let elapsed = s.started.elapsed().as_secs_f64();
            let done = p.step.saturating_sub(s.first).max(1);
            let eta = elapsed / done as f64 * s.total.saturating_sub(p.step) as f64;
            eprintln!(
                "step {}/{} loss {:.4} {} {:.0} tok/s elapsed {} eta {}{}",
                p.step,
                s.total,
                p.loss,
                p.detail,
                p.tokens_per_s,
                clock(elapsed),
                clock(eta),
                if p.skipped { " (update skipped)" } else { "" }
            );
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
