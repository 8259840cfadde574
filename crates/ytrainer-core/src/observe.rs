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
        // One write per line, then fsync: a crash or a full disk loses at most the line being written, and a
        // resume drops a partial line (`keep_through`).
        writeln!(self.file, "{json}")
            .and_then(|_| self.file.sync_data())
            .map_err(|e| TrainError::Output {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

/// Rewrites a run's JSON-lines log for a resume from the checkpoint of `step`: only complete JSON objects whose
/// `step` is at most `step` stay (a killed run logged steps after its last checkpoint, which the resumed run
/// trains again, and may have left a torn last line). Returns the kept lines. A missing file is empty.
pub fn keep_through(path: &Path, step: usize) -> Result<Vec<String>, TrainError> {
    let err = |e: std::io::Error| TrainError::Output {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    let kept: Vec<String> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v.get("step")
                    .and_then(serde_json::Value::as_u64)
                    .is_some_and(|s| s as usize <= step)
            })
        })
        .map(str::to_string)
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    fs::write(&tmp, body)
        .and_then(|_| fs::File::open(&tmp)?.sync_all())
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(err)?;
    Ok(kept)
}

/// `metrics.jsonl` and `eval.jsonl` of a run directory.
pub struct JsonlSink {
    steps: Jsonl,
    evals: Jsonl,
}

impl JsonlSink {
    /// Opens both files in `dir`: new, or, when resuming from the checkpoint of step `resume_at`, cut back to that
    /// step ([`keep_through`]) and appended to.
    pub fn open(dir: &Path, resume_at: Option<usize>) -> Result<Self, TrainError> {
        if let Some(step) = resume_at {
            keep_through(&dir.join("metrics.jsonl"), step)?;
            keep_through(&dir.join("eval.jsonl"), step)?;
        }
        Ok(JsonlSink {
            steps: Jsonl::open(dir.join("metrics.jsonl"), resume_at.is_some())?,
            evals: Jsonl::open(dir.join("eval.jsonl"), resume_at.is_some())?,
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

    /// For a resumed run: replaces the directory's event files by one that holds the records of the (already cut
    /// back) `metrics.jsonl` and `eval.jsonl`, so each resume neither adds a file nor repeats steps.
    pub fn resume(dir: &Path) -> Result<Self, TrainError> {
        let entries = fs::read_dir(dir).map_err(|e| TrainError::Output {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        for e in entries.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("events.out.tfevents."))
            {
                fs::remove_file(e.path()).map_err(|err| TrainError::Output {
                    path: e.path(),
                    message: err.to_string(),
                })?;
            }
        }
        let mut sink = Self::create(dir)?;
        for (name, stream) in [
            ("metrics.jsonl", Stream::Step),
            ("eval.jsonl", Stream::Eval),
        ] {
            let text = fs::read_to_string(dir.join(name)).unwrap_or_default();
            for line in text.lines() {
                let step = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
                if let Some(step) = step {
                    sink.record(stream, step as usize, line)?;
                }
            }
        }
        Ok(sink)
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
