//! Ranking a corpus by how a model reacts to each sample (per-token loss and entropy), to find label errors and
//! noise before training: the work behind `ytrainer sort`. The scores are `ytrainer_data::quality` (pure
//! functions); this module streams records, batches them by length, runs one forward pass per batch, ranks the
//! records and writes the ranked file and the report of the most suspicious ones.
//!
//! Memory stays bounded in the number of records: records are read a chunk at a time; each scored record goes to
//! a file next to the output (`.OUT.scored`) and only `(score, offset, length)` stays in memory; the ranked output
//! and the report are then copied from that file in order.
//!
//! Scoring a large corpus takes hours, so that file is also what makes `sort` resumable: it starts with the
//! settings that decide every score (model, adapter, data file, mode, supervision, longest sample, template
//! variables) and is flushed after every chunk. A rerun with the same settings keeps its complete lines and
//! scores only the records after them; other settings start it afresh. It is removed once the output is written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use ytrainer_core::burn::prelude::Device;
use ytrainer_core::loss::tensor_to_vec;
use ytrainer_core::observe::Silent;
use ytrainer_core::step::{entropy, head_stats, target_log_probs, to_device, token_ce};
use ytrainer_data::quality::{Analysis, QualityMode, TokenClass, analyze};
use ytrainer_data::stream::{RecordStream, StreamItem};
use ytrainer_data::{
    BatchOptions, DataError, DataOptions, Example, Message, Mode, Overlong, Record, RecordKind,
    TrainOn, plan_epoch, prepare,
};

use crate::error::{Context, Result};
use crate::source::{Loaded, inference_device, load_for_inference};
use crate::{bail, invalid};

/// Which part of the ranked order is written. One choice only: combining them would make the written share
/// depend on the order they apply in.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Selection {
    /// Every record.
    #[default]
    All,
    /// Only the first P percent of the ranked order (`--keep-top`).
    KeepTop(f64),
    /// All but the first P percent of the ranked order (`--drop-top`).
    DropTop(f64),
    /// Every record whose score is at most X (`--threshold`).
    Threshold(f64),
}

/// What to score and where the ranking goes. The messages of [`sort`]'s checks name the `ytrainer sort` flag
/// each field comes from, since that is where a user sets them.
#[derive(Debug, Clone)]
pub struct SortSettings {
    /// Hugging Face model directory or `.gguf` file.
    pub model: PathBuf,
    /// PEFT LoRA adapter applied on top of the model.
    pub adapter: Option<PathBuf>,
    /// SFT data file (any record layout the trainer reads).
    pub data: PathBuf,
    /// Ranked output: a JSON array when it ends in `.json`, JSON Lines otherwise.
    pub out: PathBuf,
    /// The score records are ranked by.
    pub mode: QualityMode,
    /// Cleanest first instead of most suspicious first.
    pub ascending: bool,
    /// Which part of the ranked order is written.
    pub selection: Selection,
    /// Report of the most suspicious records with their error spans marked (`.md` or `.html`).
    pub report: Option<PathBuf>,
    /// How many records the report lists.
    pub report_top: usize,
    /// What is supervised (scored) in chat data.
    pub train_on: TrainOn,
    /// Longest sample in tokens (longer ones are truncated and marked `truncated`).
    pub max_seq_len: usize,
    /// Most padded tokens in one forward pass.
    pub batch_tokens: usize,
    /// Most samples in one forward pass.
    pub batch_size: usize,
    /// Records read (and batched by length) at a time.
    pub chunk: usize,
    /// Chat-template variables.
    pub template_vars: Map<String, Value>,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
}

/// What [`sort`] did, for the front end's summary line.
#[derive(Debug, Clone, PartialEq)]
pub struct SortReport {
    /// Records scored (every record of the file, scorable or not).
    pub records: usize,
    /// Supervised (answer) tokens scored.
    pub answer_tokens: usize,
    /// Records whose quality carries a `reason` (nothing to score, or a degenerate score).
    pub with_reason: usize,
    /// Records that could not be scored in the chosen mode (the ones with a `reason`): marked `unscored`, kept
    /// out of the ranking and of `--keep-top` / `--drop-top` / `--threshold`; written after the ranked records
    /// when every record is written.
    pub unscored: usize,
    /// Seconds spent reading and scoring, before ranking and writing.
    pub seconds: f64,
    /// Records written to the output after the selection.
    pub written: usize,
    /// Records an interrupted run of the same settings had already scored (taken over, not scored again).
    pub resumed: usize,
}

/// Progress of [`sort`]. Scoring dominates its time and advances through the file, so progress is counted in
/// bytes of the data file.
pub trait SortObserver {
    /// Once the model is loaded, before the first record, with the data file's size in bytes.
    fn start(&mut self, _total_bytes: u64) {}
    /// After each chunk: bytes of the data file read, records scored and seconds spent so far.
    fn chunk(&mut self, _bytes_read: u64, _records: usize, _seconds: f64) {}
    /// Every record is scored; ranking and writing follow.
    fn scored(&mut self) {}
    /// An interrupted run with the same settings left `records` scored records (the first `bytes` of the data
    /// file) in `path`: they are kept and scoring goes on after them (called before [`SortObserver::start`]; the
    /// seconds of [`SortObserver::chunk`] count from then, its records and bytes from the file's start).
    fn resumed(&mut self, _records: usize, _bytes: u64, _path: &Path) {}
}

impl SortObserver for Silent {}

/// Where a scored record sits in the scored file.
struct Entry {
    score: f64,
    /// Nothing (or nothing meaningful) to score: kept out of the ranking.
    unscored: bool,
    index: usize,
    offset: u64,
    len: u32,
}

/// What the report shows of one record. Kept with the record in the scored file, so that the report of a
/// resumed sort is the one an uninterrupted sort writes.
#[derive(Serialize, Deserialize)]
struct ReportItem {
    score: f64,
    index: usize,
    origin: String,
    prompt: String,
    /// Answer text pieces; `Some(class)` marks an error span.
    answer: Vec<(String, Option<String>)>,
    summary: String,
}

/// One line of the scored file: the record as written out (`o`, without its rank) and what ranking and the
/// report need of it.
#[derive(Serialize, Deserialize)]
struct ScoredLine {
    /// Record index in the data file.
    i: usize,
    /// The ranking score as written in `quality.score` (rounded: a resumed sort ranks exactly like an
    /// uninterrupted one); `None` when unscored.
    s: Option<f64>,
    /// Answer tokens scored.
    n: usize,
    /// Its report entry.
    r: ReportItem,
    /// The record with its `quality` object.
    o: Map<String, Value>,
}

/// Only what ranking needs, when reading the scored file back.
#[derive(Deserialize)]
struct LineHead {
    i: usize,
    s: Option<f64>,
    n: usize,
}

/// Removes a temporary file on every exit path.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_percent(flag: &str, p: f64) -> Result<()> {
    if !(0.0..=100.0).contains(&p) {
        bail!("{flag} {p}: expected a percentage between 0 and 100");
    }
    Ok(())
}

/// Refuses settings that cannot work before the model is loaded, which can take minutes.
fn check(s: &SortSettings) -> Result<()> {
    match s.selection {
        Selection::KeepTop(p) => check_percent("--keep-top", p)?,
        Selection::DropTop(p) => check_percent("--drop-top", p)?,
        Selection::Threshold(x) if !x.is_finite() => {
            bail!("--threshold must be a finite number")
        }
        Selection::Threshold(_) | Selection::All => {}
    }
    if s.chunk == 0 || s.batch_size == 0 || s.batch_tokens == 0 {
        bail!("--chunk, --batch-size and --batch-tokens must be at least 1");
    }
    if let Some(r) = &s.report {
        let ext = r
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !matches!(ext.as_str(), "md" | "markdown" | "html" | "htm") {
            bail!(
                "--report {}: expected a .md or .html file name",
                r.display()
            );
        }
    }
    if s.mode == QualityMode::Ifd && s.train_on == TrainOn::Everything {
        bail!(
            "--mode ifd compares the answer's loss with and without its prompt, but --train-on everything \
             scores the prompt too: use all_assistant or last_assistant"
        );
    }
    Ok(())
}

/// One record of a chunk, tokenized (or why not).
struct Prepared {
    item: StreamItem,
    example: Option<Example>,
    truncated: bool,
    /// Why there is nothing to score.
    skipped: Option<String>,
}

fn prepare_one(item: StreamItem, l: &Loaded, opts: &DataOptions) -> Result<Prepared> {
    let record = match &item.record {
        Ok(r) => r.clone(),
        Err(reason) => {
            let skipped = Some(format!("dropped by the loader: {reason}"));
            return Ok(Prepared {
                item,
                example: None,
                truncated: false,
                skipped,
            });
        }
    };
    Ok(match tokenize(record, l, opts)? {
        Some((example, truncated)) => Prepared {
            item,
            truncated,
            example: Some(example),
            skipped: None,
        },
        None => Prepared {
            item,
            example: None,
            truncated: false,
            skipped: Some(
                "no supervised token within --max-seq-len (answer empty or cut off)".into(),
            ),
        },
    })
}

/// One record as the trainer tokenizes it, and whether it was cut to the longest sample; `None` when no
/// supervised token is left.
fn tokenize(record: Record, l: &Loaded, opts: &DataOptions) -> Result<Option<(Example, bool)>> {
    match prepare(&[record], &l.tok, l.template.as_ref(), opts) {
        Ok(mut p) => Ok(p.examples.pop().map(|ex| (ex, p.stats.truncated > 0))),
        Err(DataError::EmptyDataset { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Loss and (with `need_entropy`; else an empty series) entropy of every supervised token of every example, one
/// forward pass per length-bucketed batch.
fn score_chunk(
    l: &Loaded,
    examples: &[Example],
    need_entropy: bool,
    batch: &BatchOptions,
    device: &Device,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let mut series = vec![(Vec::new(), Vec::new()); examples.len()];
    // Sort by length so each batch pads little; `plan_epoch` without shuffling keeps this order.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (examples[i].len(), i));
    let sorted: Vec<Example> = order.iter().map(|&i| examples[i].clone()).collect();
    let steps = plan_epoch(&sorted, batch, 0)?;
    for mb in steps.iter().flat_map(|s| &s.micro_batches) {
        let b = to_device(mb, device);
        if b.n == 0 {
            continue;
        }
        // Loss and entropy from the head's row statistics, a bounded number of logits rows at a time (no
        // `[targets, vocab]` log-probability tensor).
        let (ce, ent) = match head_stats(&l.model, &b, need_entropy) {
            Some(stats) => (stats.ce, stats.entropy.unwrap_or_default()),
            None => {
                let lp = target_log_probs(&l.model, &b);
                let ce = tensor_to_vec(token_ce(lp.clone(), b.targets.clone()));
                let ent = if need_entropy {
                    tensor_to_vec(entropy(lp))
                } else {
                    Vec::new()
                };
                (ce, ent)
            }
        };
        if ce.len() != b.n || (need_entropy && ent.len() != b.n) {
            bail!(
                "internal: {} targets but {} losses / {} entropies",
                b.n,
                ce.len(),
                ent.len()
            );
        }
        // Targets come row-major, each row's in position order: `samples[k]` is the (sorted) example of target k.
        for k in 0..b.n {
            let s = &mut series[order[b.samples[k] as usize]];
            s.0.push(ce[k]);
            if need_entropy {
                s.1.push(ent[k]);
            }
        }
    }
    for (ex, s) in examples.iter().zip(&series) {
        if s.0.len() != ex.num_targets() {
            bail!(
                "internal: an example has {} supervised tokens but {} were scored",
                ex.num_targets(),
                s.0.len()
            );
        }
    }
    Ok(series)
}

/// The record with every non-assistant message emptied (same template, same answers), for the `ifd` mode's
/// second pass; `None` when there is no prompt text to remove.
fn prompt_free(r: &Record) -> Option<Record> {
    let RecordKind::Chat { messages } = &r.kind else {
        return None;
    };
    let prompt = |m: &Message| m.role != "assistant";
    if !messages
        .iter()
        .any(|m| prompt(m) && !m.content.trim().is_empty())
    {
        return None;
    }
    let messages = messages
        .iter()
        .map(|m| {
            if prompt(m) {
                Message::new(&m.role, "")
            } else {
                m.clone()
            }
        })
        .collect();
    Some(Record {
        origin: r.origin.clone(),
        kind: RecordKind::Chat { messages },
        weights: r.weights.clone(),
    })
}

/// Losses of the answer tokens of each example's prompt-free variant (`None`: no prompt, or nothing left to
/// score within the longest sample), in `with_ex` order.
fn prompt_free_losses(
    l: &Loaded,
    chunk: &[Prepared],
    with_ex: &[usize],
    opts: &DataOptions,
    batch: &BatchOptions,
    device: &Device,
) -> Result<Vec<Option<Vec<f32>>>> {
    let mut examples = Vec::new();
    let mut slot = Vec::with_capacity(with_ex.len());
    for &i in with_ex {
        let variant = chunk[i].item.record.as_ref().ok().and_then(prompt_free);
        let ex = match variant {
            Some(r) => tokenize(r, l, opts)?.map(|(ex, _)| ex),
            None => None,
        };
        slot.push(ex.map(|ex| {
            examples.push(ex);
            examples.len() - 1
        }));
    }
    let series = score_chunk(l, &examples, false, batch, device)?;
    Ok(slot
        .into_iter()
        .map(|k| k.map(|k| series[k].0.clone()))
        .collect())
}

fn answer_ids(ex: &Example) -> Vec<u32> {
    ex.input_ids
        .iter()
        .zip(&ex.targets)
        .skip(1)
        .filter(|&(_, &t)| t)
        .map(|(&id, _)| id)
        .collect()
}

/// Six decimals keep the output diffable across platforms whose last float bits differ.
fn round(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

fn quality_json(a: &Analysis, mode: QualityMode, ids: &[u32], l: &Loaded, p: &Prepared) -> Value {
    let mut classes = Map::new();
    for c in TokenClass::ALL {
        classes.insert(c.name().into(), json!(a.class_counts[c as usize]));
    }
    let spans: Vec<Value> = a
        .spans
        .iter()
        .map(|s| {
            json!({
                "start": s.start,
                "end": s.end,
                "text": l.tok.decode(&ids[s.start.min(ids.len())..s.end.min(ids.len())], false).unwrap_or_default(),
                "class": s.class.name(),
                "max_abs_d": round(s.max_abs_d),
                "mean_loss": round(s.mean_loss),
            })
        })
        .collect();
    let mut q = json!({
        "mode": mode.name(),
        "score": round(a.score(mode)),
        "n_tokens": a.n,
        "mean_loss": round(a.mean_loss),
        "mean_entropy": round(a.mean_entropy),
        "classes": classes,
        "confident_wrong": a.confident_wrong,
        "uncertain_wrong": a.uncertain_wrong,
        "pearson": a.pearson.map(round),
        "scores": {
            "filtered": round(a.score(QualityMode::Filtered)),
            "similarity": round(a.score(QualityMode::Similarity)),
            "divergence": round(a.score(QualityMode::Divergence)),
        },
        "spans": spans,
    });
    if mode == QualityMode::Ifd {
        q["scores"]["ifd"] = json!(round(a.score(QualityMode::Ifd)));
        q["mean_loss_without_prompt"] = json!(a.mean_loss_without_prompt.map(round));
    }
    let reason = p.skipped.clone().or_else(|| a.reason(mode));
    if let Some(r) = reason {
        // A record with nothing meaningful to score is not "clean": no score, no rank.
        q["reason"] = json!(r);
        q["unscored"] = json!(true);
        q["score"] = Value::Null;
    }
    if p.truncated {
        q["truncated"] = json!(true);
    }
    q
}

fn excerpt(s: &str, n: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn report_item(
    a: &Analysis,
    score: f64,
    ids: &[u32],
    l: &Loaded,
    p: &Prepared,
    reason: Option<String>,
) -> ReportItem {
    let prompt = match &p.item.record {
        Ok(r) => match &r.kind {
            RecordKind::Chat { messages } => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| excerpt(&m.content, 400))
                .unwrap_or_default(),
            RecordKind::Text { .. } => String::new(),
        },
        Err(_) => String::new(),
    };
    let mut answer = Vec::new();
    let mut at = 0;
    let dec = |a: usize, b: usize| l.tok.decode(&ids[a..b], false).unwrap_or_default();
    for s in &a.spans {
        let (s0, s1) = (s.start.min(ids.len()), s.end.min(ids.len()));
        if s0 > at {
            answer.push((dec(at, s0), None));
        }
        answer.push((dec(s0, s1), Some(s.class.name().to_string())));
        at = s1;
    }
    if at < ids.len() {
        answer.push((dec(at, ids.len()), None));
    }
    let nonzero: Vec<String> = TokenClass::ALL
        .into_iter()
        .filter(|&c| c != TokenClass::Normal && a.class_counts[c as usize] > 0)
        .map(|c| format!("{} {}", c.name(), a.class_counts[c as usize]))
        .collect();
    let mut summary = format!(
        "{} answer tokens, mean loss {:.3}, mean entropy {:.3}",
        a.n, a.mean_loss, a.mean_entropy
    );
    if !nonzero.is_empty() {
        summary.push_str(&format!("; {}", nonzero.join(", ")));
    }
    if let Some(r) = reason {
        summary.push_str(&format!("; {r}"));
    }
    ReportItem {
        score,
        index: p.item.origin.index,
        origin: p.item.origin.to_string(),
        prompt,
        answer,
        summary,
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Markdown keeps text as it is (`<|im_end|>` stays readable); only a `<` that could open an HTML tag is
/// escaped, so record text cannot inject markup into a rendered report.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '<'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || matches!(n, '/' | '!' | '?'))
        {
            out.push_str("&lt;");
        } else {
            out.push(c);
        }
    }
    out
}

fn write_report(
    path: &Path,
    items: &[ReportItem],
    unscored: &[ReportItem],
    mode: QualityMode,
    data: &Path,
    total: usize,
) -> Result<()> {
    let html = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"));
    let mut o = String::new();
    let title = format!(
        "ytrainer sort: the {} most suspicious of {total} records in {} (mode {mode})",
        items.len(),
        data.display()
    );
    let escape = |t: &str| if html { html_escape(t) } else { md_escape(t) };
    let answer_html = |it: &ReportItem| -> String {
        it.answer
            .iter()
            .map(|(t, c)| match c.as_deref() {
                Some(c) => format!("<mark title=\"{c}\">{}</mark>", escape(t)),
                None => escape(t),
            })
            .collect()
    };
    if html {
        o.push_str(&format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{0}</title>\n<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:.5em}}mark{{background:#ffb3b3}}</style></head><body>\n<h1>{0}</h1>\n<p>Error spans are <mark>marked</mark> (hover for their class).</p>\n",
            html_escape(&title)
        ));
        for (r, it) in items.iter().enumerate() {
            o.push_str(&format!(
                "<h2>{}. score {:.4} &mdash; {} (record {})</h2>\n<p>{}</p>\n<p><b>Prompt</b></p><pre>{}</pre>\n<p><b>Answer</b></p><pre>{}</pre>\n",
                r + 1,
                it.score,
                html_escape(&it.origin),
                it.index,
                html_escape(&it.summary),
                html_escape(&it.prompt),
                answer_html(it)
            ));
        }
        if !unscored.is_empty() {
            o.push_str("<h2>Unscored records (not ranked)</h2>\n<ul>\n");
            for it in unscored {
                o.push_str(&format!(
                    "<li>{} (record {}): {}</li>\n",
                    html_escape(&it.origin),
                    it.index,
                    html_escape(&it.summary)
                ));
            }
            o.push_str("</ul>\n");
        }
        o.push_str("</body></html>\n");
    } else {
        o.push_str(&format!(
            "# {title}\n\nError spans are marked `<mark>` (their class in the title).\n\n"
        ));
        for (r, it) in items.iter().enumerate() {
            let quote =
                |s: &str| -> String { s.lines().map(|l| format!("> {l}\n")).collect::<String>() };
            o.push_str(&format!(
                "## {}. score {:.4} — {} (record {})\n\n{}\n\n**Prompt**\n\n{}\n**Answer**\n\n{}\n",
                r + 1,
                it.score,
                it.origin,
                it.index,
                it.summary,
                quote(&md_escape(&it.prompt)),
                quote(&answer_html(it)),
            ));
        }
        if !unscored.is_empty() {
            o.push_str("## Unscored records (not ranked)\n\n");
            for it in unscored {
                o.push_str(&format!(
                    "- {} (record {}): {}\n",
                    it.origin,
                    it.index,
                    md_escape(&it.summary)
                ));
            }
        }
    }
    std::fs::write(path, o).with_context(|| format!("cannot write {}", path.display()))
}

/// The settings every score depends on, with the data file's size and modification time: a scored file
/// written under other settings (or for another version of the data) is not resumed. Batching (`--chunk`,
/// `--batch-size`, `--batch-tokens`), the order, the selection and the report do not change a score.
fn fingerprint(s: &SortSettings) -> Value {
    let canonical = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .to_string_lossy()
            .to_string()
    };
    let meta = std::fs::metadata(&s.data).ok();
    let modified = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().to_string());
    json!({
        "ytrainer_sort": env!("CARGO_PKG_VERSION"),
        "model": canonical(&s.model),
        "adapter": s.adapter.as_deref().map(canonical),
        "data": canonical(&s.data),
        "data_bytes": meta.map(|m| m.len()),
        "data_modified": modified,
        "mode": s.mode.name(),
        "train_on": format!("{:?}", s.train_on),
        "max_seq_len": s.max_seq_len,
        "template_vars": s.template_vars,
    })
}

/// The scored file: opened afresh (its first line the settings' fingerprint), or, when an interrupted sort with
/// the same fingerprint left one, cut after its last complete line and reopened for appending. Returns the
/// writer, the entries already scored, their answer tokens, and the offset where the next line goes.
fn open_scored(path: &Path, fp: &Value) -> Result<(BufWriter<File>, Vec<Entry>, usize, u64)> {
    let cannot = |what: &str| format!("cannot {what} {}", path.display());
    if let Ok(f) = File::open(path) {
        let mut r = BufReader::new(f);
        let mut line = Vec::new();
        let header_ok = r.read_until(b'\n', &mut line).is_ok()
            && line.ends_with(b"\n")
            && serde_json::from_slice::<Value>(&line).ok().as_ref() == Some(fp);
        if header_ok {
            let (mut entries, mut tokens, mut offset) = (Vec::new(), 0usize, line.len() as u64);
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(n) if n > 0 && line.ends_with(b"\n") => {}
                    // the end, or a line cut off by the interruption
                    _ => break,
                }
                let Ok(h) = serde_json::from_slice::<LineHead>(&line) else {
                    break;
                };
                tokens += h.n;
                entries.push(Entry {
                    score: h.s.unwrap_or(f64::NAN),
                    unscored: h.s.is_none(),
                    index: h.i,
                    offset,
                    len: (line.len() - 1) as u32,
                });
                offset += line.len() as u64;
            }
            drop(r);
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| cannot("reopen"))?;
            f.set_len(offset).with_context(|| cannot("truncate"))?;
            let mut w = BufWriter::new(f);
            w.seek(SeekFrom::Start(offset))?;
            return Ok((w, entries, tokens, offset));
        }
    }
    let mut w = BufWriter::new(File::create(path).with_context(|| cannot("create"))?);
    let header = serde_json::to_string(fp)?;
    w.write_all(header.as_bytes())?;
    w.write_all(b"\n")?;
    w.flush()?;
    Ok((w, Vec::new(), 0, header.len() as u64 + 1))
}

/// The line of the scored file an entry points at.
fn read_line(src: &mut File, e: &Entry, buf: &mut Vec<u8>) -> Result<ScoredLine> {
    buf.resize(e.len as usize, 0);
    src.seek(SeekFrom::Start(e.offset))?;
    src.read_exact(buf)?;
    Ok(serde_json::from_slice(buf)?)
}

/// Scores every record of `s.data`, writes the selected part of the ranking to `s.out` (replacing it only once
/// complete) and, when asked, the report. Every record is written with a `quality` object (its scores, rank,
/// error spans and, when it could not be scored, the reason), so the output can be filtered again without
/// rescoring. An interrupted sort rerun with the same settings resumes after the records it had scored.
pub fn sort(s: &SortSettings, observer: &mut dyn SortObserver) -> Result<SortReport> {
    check(s)?;
    let opts = DataOptions {
        max_seq_len: s.max_seq_len,
        overlong: Overlong::Truncate,
        train_on: s.train_on,
        cpt: false,
        template_vars: s.template_vars.clone(),
    };
    let batch = BatchOptions {
        seed: 0,
        shuffle: false,
        micro_batch_tokens: s.batch_tokens,
        max_micro_batch_size: s.batch_size,
        tokens_per_step: 1,
        micro_batches_per_step: 0,
        mode: Mode::OnePass,
        pad_id: 0,
    };
    let stream = RecordStream::open(&s.data)?;
    let device = inference_device(&s.device)?;
    let l = load_for_inference(&s.model, s.adapter.as_deref(), &device)?;

    let out_dir = s
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !out_dir.is_dir() {
        bail!(
            "--out {}: the directory {} does not exist",
            s.out.display(),
            out_dir.display()
        );
    }
    let file_name = s
        .out
        .file_name()
        .ok_or_else(|| invalid!("--out {}: not a file name", s.out.display()))?
        .to_string_lossy()
        .to_string();
    let scored_path = out_dir.join(format!(".{file_name}.scored"));
    let (mut scored, mut entries, mut tokens, mut offset) =
        open_scored(&scored_path, &fingerprint(s))?;
    let resumed = entries.len();
    let total_bytes = stream.total_bytes();
    let mut stream = stream.peekable();
    let mut bytes = 0;
    if resumed > 0 {
        for _ in 0..resumed {
            match stream.next() {
                Some(item) => bytes = item?.bytes_read,
                None => bail!(
                    "{}: holds {resumed} scored records but {} has fewer; delete it to sort afresh",
                    scored_path.display(),
                    s.data.display()
                ),
            }
        }
        observer.resumed(resumed, bytes, &scored_path);
    }

    observer.start(total_bytes);
    let start = Instant::now();
    while stream.peek().is_some() {
        let mut chunk = Vec::with_capacity(s.chunk);
        for item in stream.by_ref().take(s.chunk) {
            chunk.push(prepare_one(item?, &l, &opts)?);
        }
        let bytes = chunk.last().map(|p| p.item.bytes_read).unwrap_or(0);
        let with_ex: Vec<usize> = (0..chunk.len())
            .filter(|&i| chunk[i].example.is_some())
            .collect();
        let examples: Vec<Example> = with_ex
            .iter()
            .filter_map(|&i| chunk[i].example.clone())
            .collect();
        let series = score_chunk(&l, &examples, true, &batch, &device)?;
        let free = if s.mode == QualityMode::Ifd {
            prompt_free_losses(&l, &chunk, &with_ex, &opts, &batch, &device)?
        } else {
            Vec::new()
        };
        let mut series_of = vec![None; chunk.len()];
        for (k, &i) in with_ex.iter().enumerate() {
            series_of[i] = Some(k);
        }
        for (i, mut p) in chunk.into_iter().enumerate() {
            let (ids, analysis) = match series_of[i] {
                Some(k) => {
                    let ex = &examples[k];
                    let mut analysis = analyze(&series[k].0, &series[k].1);
                    if let Some(free) = free.get(k) {
                        analysis.set_prompt_free(&series[k].0, free.as_deref());
                    }
                    (answer_ids(ex), analysis)
                }
                None => (Vec::new(), analyze(&[], &[])),
            };
            tokens += analysis.n;
            let q = quality_json(&analysis, s.mode, &ids, &l, &p);
            let reason = q.get("reason").and_then(|r| r.as_str()).map(str::to_string);
            // The score as written (rounded), so that ranking agrees with the file and with a resumed sort.
            let score = q.get("score").and_then(Value::as_f64);
            // An unscored record's report entry shows no score (0 keeps the line valid JSON, where NaN is not).
            let item = report_item(&analysis, score.unwrap_or(0.0), &ids, &l, &p, reason);
            p.item.object.insert("quality".into(), q);
            let line = serde_json::to_string(&ScoredLine {
                i: p.item.origin.index,
                s: score,
                n: analysis.n,
                r: item,
                o: std::mem::take(&mut p.item.object),
            })?;
            scored.write_all(line.as_bytes())?;
            scored.write_all(b"\n")?;
            entries.push(Entry {
                score: score.unwrap_or(f64::NAN),
                unscored: score.is_none(),
                index: p.item.origin.index,
                offset,
                len: line.len() as u32,
            });
            offset += line.len() as u64 + 1;
        }
        // What is flushed survives a kill: a rerun resumes after it.
        scored.flush()?;
        observer.chunk(bytes, entries.len(), start.elapsed().as_secs_f64());
    }
    observer.scored();
    scored.flush()?;
    drop(scored);
    let seconds = start.elapsed().as_secs_f64();
    let degenerate = entries.iter().filter(|e| e.unscored).count();

    // Most suspicious first; ties keep the file order. Unscored records take no part in the ranking.
    let (mut ranked, unscored): (Vec<Entry>, Vec<Entry>) =
        entries.into_iter().partition(|e| !e.unscored);
    ranked.sort_by(|x, y| y.score.total_cmp(&x.score).then(x.index.cmp(&y.index)));
    let n = ranked.len() + unscored.len();
    let mut order: Vec<(Option<usize>, &Entry)> = ranked
        .iter()
        .enumerate()
        .map(|(r, e)| (Some(r + 1), e))
        .collect();
    if s.ascending {
        order.reverse();
    }
    let count = |p: f64| ((p / 100.0) * ranked.len() as f64).round() as usize;
    let selected: Vec<(Option<usize>, &Entry)> = match s.selection {
        Selection::KeepTop(p) => order.into_iter().take(count(p)).collect(),
        Selection::DropTop(p) => order.into_iter().skip(count(p)).collect(),
        Selection::Threshold(x) => order.into_iter().filter(|(_, e)| e.score <= x).collect(),
        Selection::All => order
            .into_iter()
            .chain(unscored.iter().map(|e| (None, e)))
            .collect(),
    };

    let json_array = s
        .out
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let part = out_dir.join(format!(".{file_name}.part-{}", std::process::id()));
    let part_guard = TempFile(part.clone());
    let mut src = File::open(&scored_path)
        .with_context(|| format!("cannot read {}", scored_path.display()))?;
    let mut buf = Vec::new();
    {
        let mut w = BufWriter::new(
            File::create(&part).with_context(|| format!("cannot create {}", part.display()))?,
        );
        if json_array {
            w.write_all(b"[\n")?;
        }
        for (k, (rank, e)) in selected.iter().enumerate() {
            let mut obj = read_line(&mut src, e, &mut buf)?.o;
            if let Some(q) = obj.get_mut("quality").and_then(|q| q.as_object_mut()) {
                q.insert("rank".into(), json!(rank));
            }
            if json_array && k > 0 {
                w.write_all(b",\n")?;
            }
            serde_json::to_writer(&mut w, &obj)?;
            if !json_array {
                w.write_all(b"\n")?;
            }
        }
        if json_array {
            w.write_all(b"\n]\n")?;
        }
        w.flush()?;
    }
    std::fs::rename(&part, &s.out).with_context(|| format!("cannot write {}", s.out.display()))?;
    drop(part_guard);

    if let Some(r) = &s.report {
        let mut items = |es: &[Entry]| -> Result<Vec<ReportItem>> {
            es.iter()
                .take(s.report_top)
                .map(|e| Ok(read_line(&mut src, e, &mut buf)?.r))
                .collect()
        };
        let top = items(&ranked[..])?;
        let unscored_items = items(&unscored[..])?;
        write_report(r, &top, &unscored_items, s.mode, &s.data, n)?;
    }
    drop(src);
    let _ = std::fs::remove_file(&scored_path);
    Ok(SortReport {
        records: n,
        answer_tokens: tokens,
        with_reason: degenerate,
        unscored: unscored.len(),
        seconds,
        written: selected.len(),
        resumed,
    })
}
