//! `ytrainer sort`: flags -> [`ytrainer_recipes::sort::sort`] (score, rank, write the ranked records and the
//! report) -> a progress bar over the data file and the summary line on stderr.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ytrainer_data::TrainOn;
use ytrainer_data::quality::QualityMode;
use ytrainer_recipes::sort::{Selection, SortObserver, SortSettings};

use crate::interop::parse_vars;

/// `ytrainer sort`
#[derive(Debug, Args)]
pub struct SortArgs {
    /// Hugging Face model directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// SFT data file (json, jsonl or csv; any record layout the trainer reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Ranked output: a JSON array when it ends in `.json`, JSON Lines otherwise.
    #[arg(long)]
    pub out: PathBuf,
    /// ifd (default: perplexity of the answer with its prompt over without it, finds answers that belong to
    /// another prompt; one more, shorter forward pass), filtered (high-loss tokens, confident ones count
    /// double), similarity (-Pearson(entropy, loss)) or divergence (z(loss) - z(entropy) anomalies and error
    /// spans). With `--train-on everything` the default is divergence (ifd needs a prompt to leave out).
    #[arg(long)]
    pub mode: Option<QualityMode>,
    /// Cleanest first instead of most suspicious first.
    #[arg(long)]
    pub ascending: bool,
    /// Write only the first P percent of the ranked order (with --ascending: the cleanest P%).
    #[arg(long, value_name = "P", group = "select")]
    pub keep_top: Option<f64>,
    /// Leave out the first P percent of the ranked order (by default: the P% most suspicious).
    #[arg(long, value_name = "P", group = "select")]
    pub drop_top: Option<f64>,
    /// Leave out every record whose score is above X (more suspicious than X).
    #[arg(long, value_name = "X", group = "select")]
    pub threshold: Option<f64>,
    /// Also write a report of the most suspicious records with their error spans marked (`.md` or `.html`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How many records the report lists.
    #[arg(long, default_value_t = 20)]
    pub report_top: usize,
    /// What is supervised (scored) in chat data: all_assistant, last_assistant, everything.
    #[arg(long, default_value = "all_assistant")]
    pub train_on: String,
    /// Longest sample in tokens (longer ones are truncated and marked `truncated`).
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Most padded tokens in one forward pass.
    #[arg(long, default_value_t = 2048)]
    pub batch_tokens: usize,
    /// Most samples in one forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Records read (and batched by length) at a time.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Template variable, repeatable: `--var enable_thinking=false`.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn train_on(s: &str) -> Result<TrainOn> {
    Ok(match s {
        "all_assistant" => TrainOn::AllAssistant,
        "last_assistant" => TrainOn::LastAssistant,
        "everything" => TrainOn::Everything,
        other => {
            bail!("--train-on `{other}`: expected all_assistant, last_assistant or everything")
        }
    })
}

/// A bar over the data file's bytes, with records and records/s in its message; off a terminal, plain lines at an
/// interval (percent of the file, records, records/s, elapsed, ETA).
#[derive(Default)]
struct Bar {
    bar: Option<ProgressBar>,
    plain: Option<(crate::progress::Plain, u64)>,
    /// Records and bytes an interrupted sort had scored: rates and the ETA count only what this run scores.
    resumed: (usize, u64),
}

impl SortObserver for Bar {
    fn resumed(&mut self, records: usize, bytes: u64, path: &std::path::Path) {
        self.resumed = (records, bytes);
        eprintln!(
            "sort: resuming an interrupted sort of the same settings: {records} records already scored (kept in {}; \
             delete it to start afresh)",
            path.display()
        );
    }

    fn start(&mut self, total_bytes: u64) {
        if !crate::progress::stderr_is_terminal() {
            self.plain = Some((crate::progress::Plain::new(), total_bytes.max(1)));
            return;
        }
        let bar = ProgressBar::new(total_bytes.max(1));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {percent}% (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar = Some(bar);
    }

    fn chunk(&mut self, bytes_read: u64, records: usize, seconds: f64) {
        let rate = records.saturating_sub(self.resumed.0) as f64 / seconds.max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_position(bytes_read);
            bar.set_message(format!("{records} records, {rate:.1} records/s"));
        }
        if let Some((when, total)) = &mut self.plain
            && when.due(bytes_read >= *total)
        {
            let frac = (bytes_read as f64 / *total as f64).clamp(0.0, 1.0);
            // This run's share of the file so far sets the pace of what is left.
            let done = frac - (self.resumed.1 as f64 / *total as f64).clamp(0.0, frac);
            let eta = if done > 0.0 {
                seconds / done * (1.0 - frac)
            } else {
                0.0
            };
            eprintln!(
                "sort: {:.0}% of the file, {records} records scored, {rate:.1} records/s, elapsed {} eta {}",
                100.0 * frac,
                crate::progress::clock(seconds),
                crate::progress::clock(eta)
            );
        }
    }

    fn scored(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `ytrainer sort`
pub fn sort(a: SortArgs) -> Result<()> {
    let selection = match (a.keep_top, a.drop_top, a.threshold) {
        (Some(p), _, _) => Selection::KeepTop(p),
        (_, Some(p), _) => Selection::DropTop(p),
        (_, _, Some(x)) => Selection::Threshold(x),
        _ => Selection::All,
    };
    let train_on = train_on(&a.train_on)?;
    let mode = a.mode.unwrap_or(if train_on == TrainOn::Everything {
        QualityMode::Divergence
    } else {
        QualityMode::Ifd
    });
    let settings = SortSettings {
        train_on,
        template_vars: parse_vars(&a.vars)?,
        model: a.model,
        adapter: a.adapter,
        data: a.data,
        out: a.out,
        mode,
        ascending: a.ascending,
        selection,
        report: a.report,
        report_top: a.report_top,
        max_seq_len: a.max_seq_len,
        batch_tokens: a.batch_tokens,
        batch_size: a.batch_size,
        chunk: a.chunk,
        device: a.device,
    };
    let mut bar = Bar::default();
    let r = ytrainer_recipes::sort::sort(&settings, &mut bar);
    bar.scored();
    let r = r?;
    let secs = r.seconds;
    let resumed = if r.resumed > 0 {
        format!(", {} of them by the interrupted run", r.resumed)
    } else {
        String::new()
    };
    eprintln!(
        "scored {} records ({} answer tokens, {} unscored{resumed}) in {secs:.1}s: {:.2} records/s{}; wrote {} records to {}{}",
        r.records,
        r.answer_tokens,
        r.unscored,
        (r.records - r.resumed) as f64 / secs.max(1e-9),
        // The answer tokens of the records this run scored are not known apart from the interrupted run's.
        if r.resumed == 0 {
            format!(", {:.0} tokens/s", r.answer_tokens as f64 / secs.max(1e-9))
        } else {
            String::new()
        },
        r.written,
        settings.out.display(),
        settings
            .report
            .as_ref()
            .map(|r| format!(", report {}", r.display()))
            .unwrap_or_default()
    );
    if r.unscored > 0 {
        eprintln!(
            "{} records could not be scored in mode {} (`quality.unscored`, the reason in `quality.reason`: \
             prompt longer than --max-seq-len, too few answer tokens, ...); they are not ranked{}",
            r.unscored,
            settings.mode.name(),
            if settings.selection == Selection::All {
                " and are written after the ranked records"
            } else {
                " and are left out by the selection"
            }
        );
    }
    Ok(())
}
