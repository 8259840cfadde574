//! Where a run's records go. The training loop emits two kinds of record, a step and an evaluation, each
//! serialised once; *sinks* persist them (`metrics.jsonl` / `eval.jsonl`, TensorBoard event files) and an
//! [`Observer`] shows progress to a person (the CLI's bars, a test's recorder). Splitting the two keeps the
//! files identical whatever the front end, and lets a new destination (a web board, a remote logger) be one
//! more sink instead of another branch in the loop — the shape of burn-train's `logger/`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::TrainError;

/// Which stream a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// One line per optimizer step (`metrics.jsonl`).
    Step,
    /// One line per evaluation (`eval.jsonl`).
    Eval,
}

/// A destination for the loop's records. `json` is one JSON object (the metrics struct serialised with its
/// fields in declaration order); `step` is the optimizer step it belongs to.
pub trait Sink {
    /// Persists one record.
    fn record(&mut self, stream: Stream, step: usize, json: &str) -> Result<(), TrainError>;
}

/// What a person watching a run is told. The objective-specific numbers arrive pre-formatted, so a front end
/// does not need to know every objective's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Optimizer step just done (1-based).
    pub step: usize,
    /// The optimised loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Trained tokens per second in this step.
    pub tokens_per_s: f64,
    /// Whether the update was skipped.
    pub skipped: bool,
    /// The objective's own short summary (e.g. `ce 2.1034 w 0.812`).
    pub detail: String,
}

/// Receives progress (the CLI draws bars; tests record).
pub trait Observer {
    /// Called once before the first step with the planned number of steps and the first step to run.
    fn start(&mut self, _total_steps: usize, _first_step: usize) {}
    /// After each optimizer step.
    fn step(&mut self, _p: &Progress) {}
    /// After each evaluation, with the objective's one-line summary of it.
    fn eval(&mut self, _step: usize, _summary: &str) {}
    /// Free-form notice (checkpoint written, step skipped...).
    fn notice(&mut self, _msg: &str) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// An append-only JSON-lines log, truncated unless resuming.
pub struct Jsonl {
    file: fs::File,
    path: PathBuf,
}

impl Jsonl {
    /// Opens `path` for appending (`append`, i.e. resuming) or truncates it.
    pub fn open(path: PathBuf, append: bool) -> Result<Self, TrainError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .map_err(|e| TrainError::Output {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Jsonl { file, path })
    }

    fn write_line(&mut self, json: &str) -> Result<(), TrainError> {
        writeln!(self.file, "{json}").map_err(|e| TrainError::Output {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}

/// `metrics.jsonl` and `eval.jsonl` of a run directory.
pub struct JsonlSink {
    steps: Jsonl,
    evals: Jsonl,
}

impl JsonlSink {
    /// Opens both files in `dir` (appending when resuming).
    pub fn open(dir: &Path, append: bool) -> Result<Self, TrainError> {
        Ok(JsonlSink {
            steps: Jsonl::open(dir.join("metrics.jsonl"), append)?,
            evals: Jsonl::open(dir.join("eval.jsonl"), append)?,
        })
    }
}

impl Sink for JsonlSink {
    fn record(&mut self, stream: Stream, _step: usize, json: &str) -> Result<(), TrainError> {
        match stream {
            Stream::Step => self.steps.write_line(json),
            Stream::Eval => self.evals.write_line(json),
        }
    }
}

/// TensorBoard event files beside the JSONL files: the same records, as scalars under the same names.
pub struct TensorboardSink(crate::tensorboard::EventWriter);

impl TensorboardSink {
    /// Creates a new event file in `dir`.
    pub fn create(dir: &Path) -> Result<Self, TrainError> {
        crate::tensorboard::EventWriter::create(dir)
            .map(TensorboardSink)
            .map_err(|e| TrainError::Output {
                path: dir.to_path_buf(),
                message: format!("cannot create the TensorBoard event file: {e}"),
            })
    }
}

impl Sink for TensorboardSink {
    fn record(&mut self, _stream: Stream, step: usize, json: &str) -> Result<(), TrainError> {
        // The JSON text round-trips every f64 exactly, so the scalars equal those of the struct itself.
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| TrainError::Output {
                path: self.0.path().to_path_buf(),
                message: format!("internal: a metrics record is not JSON: {e}"),
            })?;
        self.0
            .record_fields(step, &value)
            .map_err(|e| TrainError::Output {
                path: self.0.path().to_path_buf(),
                message: e.to_string(),
            })
    }
}
